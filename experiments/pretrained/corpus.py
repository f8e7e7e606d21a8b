"""An offline English corpus, CPython's own documentation, and the evaluation tasks run on it.

Every Python ships the plain-text rendering of its language reference in
``pydoc_data.topics.topics`` (a dict topic name -> text; 79 topics, about 465k characters on
CPython 3.11). `load_corpus` turns it into clean English passages, deterministically:

1. each topic's text is cut into blank-line separated blocks; headings, tables, grammar
   (``::=``), doctests and other code, definition terms and blocks that do not end a sentence
   are dropped; list markers, footnote markers and ``*emphasis*`` are removed, words hyphenated
   across a line break are rejoined and whitespace is collapsed;
2. the remaining prose is split into sentences by one regular expression (`_SENTENCE_BREAK`:
   whitespace after ``.``, ``!``, ``?`` or ``:``, optionally closed by a quote or parenthesis,
   before an upper-case letter);
3. the topics nest (``compound`` holds ``if``, ``while``, ``try``, ...), so each sentence is
   kept only in the smallest topic holding it (topics taken by number of sentences, then name),
   at its first occurrence there: no sentence occurs twice in the corpus;
4. each topic's consecutive sentences are grouped into passages of `MIN_PASSAGE_WORDS` to
   `MAX_PASSAGE_WORDS` words, the grouping closest to `TARGET_PASSAGE_WORDS` words a passage.

A topic belongs to the "calibration" split when the first byte of the SHA-256 of its name is
divisible by 3 (about a third of the topics; stable across Python versions while the topic
names are), or when it is too short for the retrieval task (fewer than two sentences or fewer
than `MIN_PASSAGE_WORDS` words); every other topic is in the "evaluation" split. The text
differs between Python versions, so every result records `corpus_info` (the Python version and
a SHA-256 of the source text).

The tasks, for a model given as ``embed_fn(list[str]) -> [n, d]``:

* calibration inputs for post-training pruning: `calibration_ids`, windows of token ids from
  the calibration split, each a well-formed ``[CLS] ... [SEP]`` sequence without padding;
* embedding fidelity: `fidelity`, the mean cosine between a compressed model's and the dense
  model's embeddings of the held-out `evaluation_passages`;
* retrieval whose labels come from the text's structure: `retrieval_task`, each evaluation
  topic's first sentence must retrieve the rest of its own topic among all evaluation topics,
  scored by `retrieval_metrics` (recall@1, recall@5, MRR);
* `evaluate` runs both and returns one results dict.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import platform
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "CALIBRATION",
    "EVALUATION",
    "MAX_PASSAGE_WORDS",
    "MIN_PASSAGE_WORDS",
    "TARGET_PASSAGE_WORDS",
    "Corpus",
    "Topic",
    "build_corpus",
    "calibration_ids",
    "corpus_info",
    "evaluate",
    "evaluation_passages",
    "fidelity",
    "load_corpus",
    "retrieval_metrics",
    "retrieval_task",
]

CALIBRATION = "calibration"
EVALUATION = "evaluation"
MIN_PASSAGE_WORDS = 40
MAX_PASSAGE_WORDS = 120
TARGET_PASSAGE_WORDS = 80


class Topic(NamedTuple):
    """One documentation topic.

    Attributes:
        name: the topic's key in ``pydoc_data.topics.topics`` (e.g. ``"assert"``).
        passages: its prose, in order, as passages of consecutive sentences (single-spaced).
        split: `CALIBRATION` or `EVALUATION`.
    """

    name: str
    passages: tuple[str, ...]
    split: str


class Corpus(NamedTuple):
    """The corpus: the source's identity and its topics, sorted by name.

    Attributes:
        python_version: ``platform.python_version()`` of the interpreter that built it.
        text_sha256: hex SHA-256 of the source text (see `build_corpus`).
        topics: every topic with at least one passage, sorted by name.
    """

    python_version: str
    text_sha256: str
    topics: tuple[Topic, ...]


# --- Cleaning: raw topic text -> prose paragraphs -------------------------------------------

# A line made of one repeated rule character: a heading underline or a transition.
_RULE_LINE = re.compile(r"^\s*([*=\-~^#])\1{2,}\s*$")
# Lines that only code, grammar, tables or interactive sessions begin with.
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |\||\+-|-\[|->|\(Pdb\))")
_LIST_MARKER = re.compile(r"^(?:[*\u2022-]|\d+\.|\(\d+\)|\[\d+\])\s+")
_FOOTNOTE_REF = re.compile(r"\s+\[\d+\]")
# ``*emphasis*`` and ``**strong**`` not inside a quoted literal such as "*args" or "**".
_EMPHASIS = re.compile(r"(?<![\w\"'*])(\*{1,2})([^\s*\"][^*]*?(?<=[^\s*\"]))\1(?![\w*\"'])")
_LINE_HYPHEN = re.compile(r"(?<=[A-Za-z])-\n\s*(?=[a-z])")
# A natural-language word, possibly quoted, bracketed or followed by punctuation.
_WORD = re.compile(
    r"[(\[\"'\u2018\u201c]*[A-Za-z]+(?:['\u2019-][A-Za-z]+)*[)\]\"'\u2019\u201d]*[.,;:!?]?"
    r"[)\]\"'\u2019\u201d]*"
)
_SENTENCE_END = re.compile(r"[.!?:][)\]\"'\u2019\u201d]*$")
# Fraction of a block's tokens that must be words for the block to count as prose: code such
# as ``if not expression: raise AssertionError`` also scores high, which is why prose must also
# end a sentence.
_MIN_WORD_FRACTION = 0.75
_MIN_PARAGRAPH_WORDS = 4


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _clean_block(lines: list[str]) -> str | None:
    """One blank-line separated block -> a single-spaced prose paragraph, or None to drop it."""
    if any(_RULE_LINE.match(line) or _CODE_LINE.match(line) for line in lines):
        return None
    if any("::=" in line for line in lines):
        return None
    text = "\n".join(line.strip() for line in lines)
    marker = _LIST_MARKER.match(text)
    if marker:
        text = text[marker.end() :]
    elif len(lines) > 1 and _indent(lines[0]) < _indent(lines[1]):
        # A definition list item: the term (e.g. 'Module "faulthandler"') heads an indented body.
        text = "\n".join(line.strip() for line in lines[1:])
    text = _LINE_HYPHEN.sub("-", text)
    text = " ".join(text.split())
    text = _FOOTNOTE_REF.sub("", text)
    text = _EMPHASIS.sub(r"\2", text)
    tokens = text.split()
    if len(tokens) < _MIN_PARAGRAPH_WORDS or not _SENTENCE_END.search(text):
        return None
    if sum(bool(_WORD.fullmatch(t)) for t in tokens) < _MIN_WORD_FRACTION * len(tokens):
        return None
    return text


def _paragraphs(text: str) -> list[str]:
    """A topic's raw text -> its prose paragraphs, in order."""
    paragraphs, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.strip():
            block.append(line.rstrip())
        elif block:
            cleaned = _clean_block(block)
            if cleaned is not None:
                paragraphs.append(cleaned)
            block = []
    return paragraphs


# --- Sentences and passages ---------------------------------------------------------------

# Whitespace after a sentence end (optionally closed by a quote or bracket) before a capital.
# Two fixed-width look-behinds because `re` allows no variable-width one.
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?:])|(?<=[.!?:][)\]\"'\u2019\u201d]))\s+(?=[A-Z])")


def _split_sentences(text: str) -> list[str]:
    """Single-spaced text -> sentences; joining them with one space gives ``text`` back."""
    return [s for s in _SENTENCE_BREAK.split(text) if s]


def _chop(sentence: str) -> list[str]:
    """Cuts a sentence longer than `MAX_PASSAGE_WORDS` words into near-equal word chunks."""
    words = sentence.split()
    k = math.ceil(len(words) / MAX_PASSAGE_WORDS)
    bounds = np.linspace(0, len(words), k + 1).round().astype(int)
    return [" ".join(words[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _group(units: list[str]) -> list[str] | None:
    """Consecutive units -> passages of MIN..MAX words closest to TARGET, or None if impossible.

    Dynamic programming over cut points: best[j] is the least cost of grouping units[:j], a
    passage of w words costing (w - TARGET)^2.
    """
    prefix = [0, *itertools.accumulate(len(u.split()) for u in units)]
    best = [0.0] + [math.inf] * len(units)
    back = [0] * (len(units) + 1)
    for j in range(1, len(units) + 1):
        for i in range(j - 1, -1, -1):
            words = prefix[j] - prefix[i]
            if words > MAX_PASSAGE_WORDS:
                break
            cost = best[i] + (words - TARGET_PASSAGE_WORDS) ** 2
            if words >= MIN_PASSAGE_WORDS and cost < best[j]:
                best[j], back[j] = cost, i
    if math.isinf(best[-1]):
        return None
    passages, j = [], len(units)
    while j > 0:
        passages.append(" ".join(units[back[j] : j]))
        j = back[j]
    return passages[::-1]


def _passages(sentences: list[str]) -> list[str]:
    """Sentences of one topic -> passages of MIN..MAX words (one shorter one if the topic is).

    Passages break between sentences where a grouping within the bounds exists; otherwise
    (rare: e.g. a 30-word sentence between two 100-word ones) the topic's words are cut into
    near-equal chunks, which always fit the bounds.
    """
    units = [piece for s in sentences for piece in _chop(s)]
    text = " ".join(units)
    n_words = len(text.split())
    if n_words == 0:
        return []
    if n_words < MIN_PASSAGE_WORDS:
        return [text]
    grouped = _group(units)
    if grouped is not None:
        return grouped
    return _chop(text) if n_words > MAX_PASSAGE_WORDS else [text]


def _name_split(name: str) -> str:
    return CALIBRATION if hashlib.sha256(name.encode()).digest()[0] % 3 == 0 else EVALUATION


def build_corpus(topics: Mapping[str, str]) -> Corpus:
    """Builds a `Corpus` from raw topic texts (the steps are in the module docstring).

    Args:
        topics: topic name -> raw text in the layout of ``pydoc_data.topics.topics``.

    Returns:
        The corpus; ``text_sha256`` hashes, over the topics sorted by name, each name and text
        encoded as UTF-8 and each followed by a NUL byte. Topics without prose are left out.

    Raises:
        ValueError: if ``topics`` is empty or not a mapping of strings to strings.
    """
    if not isinstance(topics, Mapping) or not topics:
        raise ValueError(f"topics must be a non-empty mapping of name -> text, got {topics!r:.80}")
    digest = hashlib.sha256()
    sentences = {}
    for name in sorted(topics):
        text = topics[name]
        if not isinstance(name, str) or not isinstance(text, str):
            raise ValueError(f"topics must map str to str, got {name!r:.40} -> {text!r:.40}")
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
        sentences[name] = _split_sentences(" ".join(_paragraphs(text)))
    # The topics nest ("compound" holds "if", "while", "try", ...; "specialnames" holds
    # "customization"): each sentence stays in the smallest topic holding it (and there at its
    # first occurrence), so no text is in both splits and a query's sentence is in no other
    # topic's document.
    seen = set()
    for name in sorted(sentences, key=lambda k: (len(sentences[k]), k)):
        kept = []
        for sentence in sentences[name]:
            if sentence not in seen:
                seen.add(sentence)
                kept.append(sentence)
        sentences[name] = kept
    built = []
    for name in sorted(sentences):
        passages = _passages(sentences[name])
        if not passages:
            continue
        n_words = sum(len(p.split()) for p in passages)
        too_short = len(sentences[name]) < 2 or n_words < MIN_PASSAGE_WORDS
        split = CALIBRATION if too_short else _name_split(name)
        built.append(Topic(name, tuple(passages), split))
    return Corpus(platform.python_version(), digest.hexdigest(), tuple(built))


@functools.cache
def load_corpus() -> Corpus:
    """The corpus of this interpreter's ``pydoc_data.topics`` (built once per process).

    Returns:
        A `Corpus`; on CPython 3.11.7: 31 calibration topics (220 passages, 26k tokens of
        all-MiniLM-L6-v2) and 46 evaluation topics (307 passages).
    """
    from pydoc_data.topics import topics

    return build_corpus(topics)


def _resolve(corpus: Corpus | None) -> Corpus:
    if corpus is None:
        return load_corpus()
    if not isinstance(corpus, Corpus):
        raise ValueError(f"corpus must be a Corpus or None, got {type(corpus).__name__}")
    return corpus


def _split_topics(corpus: Corpus, split: str) -> list[Topic]:
    return [t for t in corpus.topics if t.split == split]


def corpus_info(corpus: Corpus | None = None) -> dict[str, Any]:
    """What a results file records about the corpus it was measured on (JSON-serializable).

    Args:
        corpus: a `Corpus`; None means `load_corpus()`.

    Returns:
        ``{"source", "python_version", "text_sha256", "calibration_topics",
        "calibration_passages", "evaluation_topics", "evaluation_passages"}``.
    """
    corpus = _resolve(corpus)
    info: dict[str, Any] = {
        "source": "pydoc_data.topics",
        "python_version": corpus.python_version,
        "text_sha256": corpus.text_sha256,
    }
    for split in (CALIBRATION, EVALUATION):
        topics = _split_topics(corpus, split)
        info[f"{split}_topics"] = len(topics)
        info[f"{split}_passages"] = sum(len(t.passages) for t in topics)
    return info


# --- Calibration inputs -------------------------------------------------------------------


def _plain_tokenizer(tokenizer):
    """A copy of ``tokenizer`` without truncation or padding (tokenizer.json may set both)."""
    if tokenizer.truncation is None and tokenizer.padding is None:
        return tokenizer
    copy = type(tokenizer).from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def calibration_ids(
    tokenizer, *, n: int = 128, length: int = 64, seed: int = 0, corpus: Corpus | None = None
) -> np.ndarray:
    """Windows of calibration-split token ids, each a ``[CLS] ... [SEP]`` sequence.

    The calibration passages, in topic order, are tokenized without special tokens into one
    stream; each window is ``[CLS]``, ``length - 2`` consecutive stream ids from a start drawn
    uniformly by ``np.random.default_rng(seed)``, and ``[SEP]``. Windows may overlap and cross
    passage boundaries (as the C4 windows of the SparseGPT and Wanda papers cross documents);
    none is padded, so every position is real text for the model to calibrate on.

    Args:
        tokenizer: a Hugging Face ``tokenizers.Tokenizer`` with ``[CLS]`` and ``[SEP]`` tokens;
            its truncation and padding settings are ignored (and left unchanged).
        n: number of windows, >= 1.
        length: tokens per window including ``[CLS]`` and ``[SEP]``, >= 3.
        seed: seed of the window starts.
        corpus: a `Corpus`; None means `load_corpus()`.

    Returns:
        int32 array [n, length].

    Raises:
        ValueError: for ``n`` < 1, ``length`` < 3, a tokenizer without ``[CLS]``/``[SEP]``, or a
            calibration split with fewer than ``length - 2`` tokens.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 3:
        raise ValueError(f"length must be an integer >= 3 (CLS, text, SEP), got {length!r}")
    corpus = _resolve(corpus)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise ValueError("tokenizer must have [CLS] and [SEP] tokens")
    texts = [p for t in _split_topics(corpus, CALIBRATION) for p in t.passages]
    plain = _plain_tokenizer(tokenizer)
    encodings = plain.encode_batch(texts, add_special_tokens=False) if texts else []
    stream = np.asarray([i for e in encodings for i in e.ids], np.int32)
    inner = int(length) - 2
    if stream.size < inner:
        raise ValueError(
            f"the calibration split has {stream.size} tokens, fewer than length - 2 = {inner}"
        )
    starts = np.random.default_rng(seed).integers(0, stream.size - inner + 1, size=int(n))
    windows = np.empty((int(n), int(length)), np.int32)
    windows[:, 0], windows[:, -1] = cls_id, sep_id
    windows[:, 1:-1] = stream[starts[:, None] + np.arange(inner)]
    return windows


# --- Evaluation tasks ---------------------------------------------------------------------


def evaluation_passages(
    corpus: Corpus | None = None, *, n: int | None = None, seed: int = 0
) -> list[str]:
    """Held-out passages (the evaluation split's, in topic order) for embedding fidelity.

    Args:
        corpus: a `Corpus`; None means `load_corpus()`.
        n: None for all of them, else how many, drawn without replacement by
            ``np.random.default_rng(seed)`` and kept in corpus order.
        seed: seed of the subset.

    Returns:
        A list of ``n`` (or all) passages.

    Raises:
        ValueError: if ``n`` is not in [1, number of evaluation passages].
    """
    passages = [p for t in _split_topics(_resolve(corpus), EVALUATION) for p in t.passages]
    if n is None:
        return passages
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(passages):
        raise ValueError(f"n must be None or an integer in [1, {len(passages)}], got {n!r}")
    chosen = np.sort(np.random.default_rng(seed).choice(len(passages), size=int(n), replace=False))
    return [passages[i] for i in chosen]


def retrieval_task(corpus: Corpus | None = None) -> tuple[list[str], list[str]]:
    """Queries and documents whose labels come from the documentation's structure.

    For every evaluation topic, the query is its first sentence and the document is the rest of
    its text (the remaining passages joined by spaces; a model truncates long ones itself).

    Args:
        corpus: a `Corpus`; None means `load_corpus()`.

    Returns:
        ``(queries, documents)``, two lists of equal length; query i's answer is document i.
    """
    queries, documents = [], []
    for topic in _split_topics(_resolve(corpus), EVALUATION):
        first, *rest = _split_sentences(topic.passages[0])
        document = " ".join([*rest, *topic.passages[1:]])
        if document:
            queries.append(first)
            documents.append(document)
    return queries, documents


def _embeddings(x, name: str, rows: int | None = None) -> np.ndarray:
    """Validates a float [n, d] embedding array (finite, n >= 1, d >= 1) and returns it."""
    array = np.asarray(x)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty [n, d] array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise ValueError(f"{name} must hold finite floats (dtype {array.dtype})")
    if rows is not None and array.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {array.shape}")
    return array


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # A zero row has no direction: its cosine with anything is taken to be 0.
    return x / np.where(norms > 0, norms, 1.0)


def fidelity(reference, other) -> float:
    """Mean row-wise cosine similarity of two embeddings of the same inputs.

    Args:
        reference: float array [n, d], e.g. the dense model's embeddings.
        other: float array [n, d], e.g. the compressed model's embeddings of the same inputs.

    Returns:
        ``mean_i cos(reference[i], other[i])`` in [-1, 1]; 1 when every row points the same
        way. A zero row counts as cosine 0.

    Raises:
        ValueError: if either is not a non-empty finite [n, d] float array, or shapes differ.
    """
    reference = _embeddings(reference, "reference")
    other = _embeddings(other, "other")
    if other.shape != reference.shape:
        raise ValueError(
            f"other must have the shape of reference {reference.shape}, got {other.shape}"
        )
    return float(np.mean(np.sum(_unit_rows(reference) * _unit_rows(other), axis=1)))


def retrieval_metrics(query_embeddings, document_embeddings) -> dict[str, float]:
    """Recall@1, recall@5 and MRR of cosine retrieval where query i's answer is document i.

    The rank of the answer is 1 + the number of other documents scoring at least as high, so a
    tie counts against the answer and a constant embedding ranks every answer last.

    Args:
        query_embeddings: float array [n, d].
        document_embeddings: float array [m, d], m >= n; rows after the n-th are distractors.

    Returns:
        ``{"recall@1", "recall@5", "mrr"}``: the fraction of queries whose answer ranks first,
        within the first five, and the mean of 1 / rank.

    Raises:
        ValueError: for arrays that are not non-empty finite [*, d] floats, different d, or
            fewer documents than queries.
    """
    queries = _embeddings(query_embeddings, "query_embeddings")
    documents = _embeddings(document_embeddings, "document_embeddings")
    if documents.shape[1] != queries.shape[1]:
        raise ValueError(
            f"document_embeddings must have d = {queries.shape[1]} columns like "
            f"query_embeddings, got shape {documents.shape}"
        )
    n = queries.shape[0]
    if documents.shape[0] < n:
        raise ValueError(
            f"document_embeddings must have at least {n} rows (one answer per query), "
            f"got shape {documents.shape}"
        )
    scores = _unit_rows(queries) @ _unit_rows(documents).T
    answer = scores[np.arange(n), np.arange(n)]
    rank = (scores >= answer[:, None]).sum(axis=1)  # counts the answer itself once
    return {
        "recall@1": float(np.mean(rank <= 1)),
        "recall@5": float(np.mean(rank <= 5)),
        "mrr": float(np.mean(1.0 / rank)),
    }


def evaluate(
    embed_fn: Callable[[list[str]], Any],
    *,
    reference: Mapping[str, Any] | None = None,
    corpus: Corpus | None = None,
    n_passages: int | None = None,
    n_queries: int | None = None,
) -> dict[str, Any]:
    """Runs the evaluation tasks on a sentence-embedding model.

    Args:
        embed_fn: ``list[str]`` of n texts -> float array [n, d] (numpy or jax), e.g.
            ``lambda s: embed(model, params, tokenizer, s)``.
        reference: a dict an earlier `evaluate` call returned (the dense model's), on the same
            corpus and ``n_passages``; adds ``"fidelity"``.
        corpus: a `Corpus`; None means `load_corpus()`.
        n_passages: None for every evaluation passage, else the size of the fixed (seed 0)
            subset `evaluation_passages` draws.
        n_queries: None for the whole `retrieval_task`, else its first ``n_queries`` topics
            (a cheaper, harder-to-fail task for quick runs: fewer candidates to rank).

    Returns:
        ``{"recall@1", "recall@5", "mrr"}`` of `retrieval_task`, ``"n_queries"``,
        ``"n_passages"``, ``"corpus"`` (`corpus_info`), ``"fidelity"`` when ``reference`` is
        given, and ``"passage_embeddings"``: the float32 numpy array [n_passages, d] of the
        evaluation passages that a later call's ``reference`` compares against. Every value but
        ``"passage_embeddings"`` is JSON-serializable: drop that key before writing JSON.

    Raises:
        ValueError: if ``embed_fn`` returns the wrong number of rows or non-finite values, or
            ``reference`` was measured on another corpus, subset or embedding width.
    """
    corpus = _resolve(corpus)
    info = corpus_info(corpus)
    passages = evaluation_passages(corpus, n=n_passages)
    queries, documents = retrieval_task(corpus)
    if n_queries is not None:
        if isinstance(n_queries, bool) or not isinstance(n_queries, int) or n_queries < 1:
            raise ValueError(f"n_queries must be None or a positive int, got {n_queries!r}")
        queries, documents = queries[:n_queries], documents[:n_queries]

    def run(texts: list[str]) -> np.ndarray:
        return _embeddings(embed_fn(list(texts)), "embed_fn's output", rows=len(texts))

    passage_embeddings = run(passages).astype(np.float32)
    results: dict[str, Any] = dict(retrieval_metrics(run(queries), run(documents)))
    results.update(n_queries=len(queries), n_passages=len(passages), corpus=info)
    if reference is not None:
        if not isinstance(reference, Mapping) or "passage_embeddings" not in reference:
            raise ValueError("reference must be a dict returned by evaluate (passage_embeddings)")
        if reference.get("corpus", {}).get("text_sha256") != info["text_sha256"]:
            raise ValueError(
                f"reference was measured on another corpus: text_sha256 "
                f"{reference.get('corpus', {}).get('text_sha256')!r} != {info['text_sha256']!r}"
            )
        ref = _embeddings(reference["passage_embeddings"], "reference['passage_embeddings']")
        if ref.shape != passage_embeddings.shape:
            raise ValueError(
                f"reference['passage_embeddings'] has shape {ref.shape}, this run "
                f"{passage_embeddings.shape}: use the same n_passages and embedding width"
            )
        results["fidelity"] = fidelity(ref, passage_embeddings)
    results["passage_embeddings"] = passage_embeddings
    return results
