"""tensor_lm: a pretrained transformer (all-MiniLM-L6-v2) factorized, then healed by distillation.

    python -m experiments.reproduce --table=tensor_lm --workdir=runs/tables --seeds=5

The MLP kernels of all 6 encoder layers of all-MiniLM-L6-v2 (12 kernels, 384 -> 1536 and
1536 -> 384, 7.1M of the model's 22.7M parameters) are decomposed at 25% and 50% of their
entries as a low-rank matrix, a Tucker-2 matrix and a TT-matrix (Novikov et al. 2015,
"Tensorizing Neural Networks"), each fitted to the trained kernel by truncated SVDs
(`experiments.pretrained.distill.factorize_projections`), and evaluated on held-out text right
after decomposition and after a short distillation to the dense model's sentence embeddings on
the corpus's calibration split (`experiments.pretrained.distill.distill`): the decompose, then
fine-tune recipe of Lebedev et al. 2015 with DistilBERT's cosine embedding loss (Sanh et al.
2019; Hinton et al. 2015). Values: embedding fidelity (mean cosine to the dense model's
embeddings of held-out passages); extra tables: retrieval recall@1 and MRR, the factorized
kernels' parameter counts, decomposition and healing time. A seed is the data order of the
distillation (its key); the decomposition itself is deterministic, so the rows before healing
repeat one value.

The projections factorized are the MLP kernels by default; the environment variable
``TENSOR_LM_LAYERS=all`` (or ``attention``) selects the attention projections (Q, K, V,
attention output) as well (or instead), since `experiments.reproduce` has no per-table flags:

    TENSOR_LM_LAYERS=all python -m experiments.reproduce --table=tensor_lm --workdir=runs/tables

Cost of the full run with 5 seeds: 6 factorized models, each decomposed once and evaluated
before healing, then per seed 200 distillation steps of 8 windows x 64 tokens and one
evaluation on 100 passages and 46 retrieval topics. Measured on this project's 2 cores while
other jobs shared them (load average 6): decomposing the 12 kernels 25-65 s, an evaluation
11-38 s (the first of each model compiles), a healing run 80 s for low-rank and Tucker-2 and
170 s for TT-matrix; about 70 minutes in all, and an estimated 30-40 minutes on idle cores.
Per-seed results are kept in ``WORKDIR/tensor_lm_cells.jsonl``, so an interrupted run resumes
where it stopped. ``--quick`` (the last layer's MLP, 6 healing steps, 16 passages and 8 topics
cut to 32 tokens) takes under a minute.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, NamedTuple

import jax
from tqdm import tqdm

from experiments import pretrained, stats
from experiments.pretrained import corpus as corpus_lib
from experiments.pretrained import distill as distill_lib
from experiments.tables import base

_MODEL = "all-MiniLM-L6-v2"
# Which projections to factorize: a group of `distill.LAYER_GROUPS` ("mlp", "attention", "all").
LAYERS_VARIABLE = "TENSOR_LM_LAYERS"
# (row label, format)
_FORMATS = (("low-rank", "low_rank"), ("Tucker-2", "tucker"), ("TT-matrix", "tt_matrix"))
_BEFORE, _AFTER = "decomposed", "healed"
_RECALL = "retrieval recall@1 on the evaluation topics (%)"
_MRR = "retrieval MRR on the evaluation topics (%)"
_PARAMS = "factorized kernels' entries (x the dense kernels'; the budget is an upper bound)"
_MILLIONS = "factorized kernels' entries (millions; dense row: the dense kernels)"
_DECOMPOSE = "decomposition time (s)"
_HEAL = "healing time per seed (s; compilation included in the first)"
_LOSS = "distillation loss (1 - cosine) at the last step, per seed (%)"


class _Settings(NamedTuple):
    formats: tuple[tuple[str, str], ...]
    budgets: tuple[float, ...]
    layers: str
    blocks: tuple[int, ...] | None
    steps: int
    batch_size: int
    length: int
    n_windows: int
    learning_rate: float
    passages: int
    queries: int | None
    eval_tokens: int | None
    eval_batch_size: int


def _settings(quick: bool) -> _Settings:
    """The run's sizes; ``quick`` factorizes only the last layer's MLP, heals for 6 steps and
    evaluates on 16 passages and 8 topics cut to 32 tokens (fewer shapes to compile)."""
    layers = os.environ.get(LAYERS_VARIABLE, "mlp")
    if layers not in distill_lib.LAYER_GROUPS:
        raise ValueError(
            f"{LAYERS_VARIABLE}={layers!r} must be one of {sorted(distill_lib.LAYER_GROUPS)}"
        )
    if quick:
        return _Settings(
            formats=(_FORMATS[0], _FORMATS[2]),
            budgets=(0.5,),
            layers=layers,
            blocks=(5,),
            steps=6,
            batch_size=4,
            length=32,
            n_windows=32,
            learning_rate=3e-4,
            passages=16,
            queries=8,
            eval_tokens=32,
            eval_batch_size=8,
        )
    return _Settings(
        formats=_FORMATS,
        budgets=(0.25, 0.5),
        layers=layers,
        blocks=None,
        steps=200,
        batch_size=8,
        length=64,
        n_windows=512,
        learning_rate=3e-4,
        passages=100,
        queries=None,
        eval_tokens=None,
        eval_batch_size=32,
    )


def _row(label: str, stage: str) -> str:
    return f"{label} ({stage})"


def _scores(evaluated: dict) -> dict[str, float]:
    return {k: float(evaluated[k]) for k in ("fidelity", "recall@1", "mrr")}


def _run(quick, seeds, dataset, workdir, progress) -> base.TableRun:
    del dataset
    settings = _settings(quick)
    model, params, tokenizer = pretrained.load(_MODEL)
    corpus = corpus_lib.load_corpus()
    info = corpus_lib.corpus_info(corpus)
    eval_tokenizer = tokenizer
    if settings.eval_tokens:
        eval_tokenizer = type(tokenizer).from_str(tokenizer.to_str())
        eval_tokenizer.enable_truncation(settings.eval_tokens)

    def evaluate(m, p, reference=None) -> dict[str, Any]:
        return corpus_lib.evaluate(
            lambda s: pretrained.embed(
                m, p, eval_tokenizer, s, batch_size=settings.eval_batch_size
            ),
            reference=reference,
            corpus=corpus,
            n_passages=settings.passages,
            n_queries=settings.queries,
        )

    dense = evaluate(model, params)
    signature = {"quick": quick, "text_sha256": info["text_sha256"], **settings._asdict()}
    signature = json.loads(json.dumps(signature))  # tuples as lists, as read back
    cells = base.CellCache(
        os.path.join(workdir, "tensor_lm_cells.jsonl") if workdir else None, signature
    )
    data = None  # the teacher's embeddings of the calibration windows, computed when needed

    cols = list(settings.budgets)
    rows = ["dense"]
    results: dict = {}
    extra: dict[str, dict] = {
        _RECALL: {},
        _MRR: {},
        _PARAMS: {},
        _MILLIONS: {},
        _DECOMPOSE: {},
        _HEAL: {},
        _LOSS: {},
    }
    dense_entries = None
    for label, fmt in settings.formats:
        before, after = _row(label, _BEFORE), _row(label, _AFTER)
        rows += [before, after]
        for budget in cols:
            start = time.perf_counter()
            student, student_params, factorize = distill_lib.factorize_projections(
                model,
                params,
                layers=settings.layers,
                blocks=settings.blocks,
                format=fmt,
                budget=budget,
            )
            jax.block_until_ready(student_params)
            extra[_DECOMPOSE][(before, budget)] = time.perf_counter() - start
            counts = distill_lib.kernel_parameters(model.config, factorize)
            factorized = sum(c["factorized"] for c in counts.values())
            dense_entries = sum(c["dense"] for c in counts.values())
            extra[_PARAMS][(before, budget)] = factorized / dense_entries
            extra[_MILLIONS][(before, budget)] = factorized / 1e6

            decomposed = cells.get(before, budget, -1)
            if decomposed is None:
                decomposed = _scores(evaluate(student, student_params, reference=dense))
                cells.put(before, budget, -1, decomposed)
            for key, target in (("fidelity", results), ("recall@1", extra[_RECALL])):
                target[(before, budget)] = [decomposed[key]] * len(seeds)
            extra[_MRR][(before, budget)] = [decomposed["mrr"]] * len(seeds)

            for seed in tqdm(seeds, desc=f"tensor_lm {label} {budget:g}", disable=not progress):
                healed = cells.get(after, budget, seed)
                if healed is None:
                    if data is None:
                        data = distill_lib.distillation_data(
                            model,
                            params,
                            tokenizer,
                            n_windows=settings.n_windows,
                            length=settings.length,
                        )
                    out = distill_lib.distill(
                        jax.random.key(seed),
                        student,
                        student_params,
                        model,
                        params,
                        tokenizer,
                        steps=settings.steps,
                        batch_size=settings.batch_size,
                        length=settings.length,
                        learning_rate=settings.learning_rate,
                        data=data,
                    )
                    healed = _scores(evaluate(student, out.params, reference=dense))
                    healed.update(seconds=out.seconds, last_loss=float(out.losses[-1]))
                    cells.put(after, budget, seed, healed)
                results.setdefault((after, budget), []).append(healed["fidelity"])
                extra[_RECALL].setdefault((after, budget), []).append(healed["recall@1"])
                extra[_MRR].setdefault((after, budget), []).append(healed["mrr"])
                extra[_LOSS].setdefault((after, budget), []).append(healed["last_loss"])
                extra[_HEAL].setdefault((after, budget), []).append(healed["seconds"])
    for budget in cols:
        # The dense model's fidelity to itself is 1 by definition.
        results[("dense", budget)] = [1.0] * len(seeds)
        extra[_RECALL][("dense", budget)] = [dense["recall@1"]] * len(seeds)
        extra[_MRR][("dense", budget)] = [dense["mrr"]] * len(seeds)
        extra[_PARAMS][("dense", budget)] = 1.0
        extra[_MILLIONS][("dense", budget)] = dense_entries / 1e6
        for row in [r for r in rows if r.endswith(f"({_AFTER})")]:
            times = extra[_HEAL][(row, budget)]
            extra[_HEAL][(row, budget)] = sum(times) / len(times)
    for title, values in extra.items():  # the claims read extras as results[(row, col, title)]
        for (row, col), value in values.items():
            results[(row, col, title)] = value
    return base.TableRun(rows, cols, results, extra)


def _claims(results: dict, cols: list) -> list[stats.Claim]:
    labels = [label for label, _ in _FORMATS if (_row(label, _AFTER), cols[0]) in results]
    claims = []
    for label in labels:
        before, after = _row(label, _BEFORE), _row(label, _AFTER)
        for b in cols:
            claims.append(
                stats.better(
                    f"{label} at {base.percent(b)}: healing by distillation raises the embedding "
                    "fidelity of the decomposed model (Lebedev et al. 2015, decompose then "
                    "fine-tune)",
                    _AFTER,
                    results[(after, b)],
                    _BEFORE,
                    results[(before, b)],
                )
            )
            claims.append(
                stats.at_least(
                    f"{label} at {base.percent(b)}: healing does not lower retrieval recall@1 "
                    "(the distillation target is the dense model, whose recall is higher)",
                    _AFTER,
                    results[(after, b, _RECALL)],
                    _BEFORE,
                    results[(before, b, _RECALL)],
                )
            )
        claims += base.grows(
            results,
            cols,
            _row(label, _AFTER),
            f"{label}, healed: a {{high}} parameter budget keeps more fidelity than {{low}}",
        )
    if "TT-matrix" in labels and "low-rank" in labels:
        for b in cols:
            claims.append(
                stats.at_least(
                    f"At {base.percent(b)} of the MLP kernels' parameters, the healed TT-matrix "
                    "is at least as faithful as the healed low-rank matrix (Novikov et al. 2015: "
                    "TT-matrix layers compress better than low-rank ones at equal parameters)",
                    "TT-matrix",
                    results[(_row("TT-matrix", _AFTER), b)],
                    "low-rank",
                    results[(_row("low-rank", _AFTER), b)],
                )
            )
    return claims


def _notes(quick: bool) -> str:
    s = _settings(quick)
    info = corpus_lib.corpus_info()
    scope = {
        "mlp": "MLP kernels",
        "attention": "attention projections (Q, K, V, output)",
        "all": "MLP kernels and attention projections",
    }[s.layers]
    where = "of the last encoder layer (quick mode)" if s.blocks else "of all 6 encoder layers"
    passages = s.passages or info["evaluation_passages"]
    topics = f"the first {s.queries}" if s.queries else "all"
    cut = f", every text cut to {s.eval_tokens} tokens" if s.eval_tokens else ""
    return (
        f"all-MiniLM-L6-v2 (from its wheel): the {scope} {where} are decomposed at each "
        "column's fraction of every kernel's entries, each format taking the largest uniform "
        "rank that fits (biases kept, not counted): low-rank W = U diag(w) V^T by truncated SVD; "
        "Tucker-2 W = U G V^T with a dense core by HOOI, which for a matrix is the low-rank "
        "class with r^2 extra core entries; TT-matrix with rows 384 = 6·8·8 and columns "
        "1536 = 8·12·16 (or the reverse) by TT-SVD. Healing: the factorized projections' "
        "factors and biases train, everything else is frozen, minimizing 1 - cos(student, "
        "teacher sentence embedding) for "
        f"{s.steps} AdamW steps (peak {s.learning_rate:g}, 10% linear warmup, cosine decay to a "
        f"tenth) of {s.batch_size} windows x {s.length} tokens drawn by the seed from a fixed "
        f"pool of {s.n_windows} windows of the calibration topics of the CPython documentation "
        f"(`pydoc_data.topics`, Python {info['python_version']}, text sha256 "
        f"{info['text_sha256'][:16]}…); the evaluation topics stay held out. Evaluation: "
        f"fidelity over {passages} evaluation passages (mean cosine of the compressed and the "
        f"dense model's embeddings; 100% for the dense model by definition), retrieval over "
        f"{topics} evaluation topics (a topic's first sentence must retrieve the rest of its "
        f"topic){cut}. The rows before healing do not depend on the seed."
    )


base.register(
    base.Table(
        "tensor_lm",
        "A pretrained transformer (all-MiniLM-L6-v2) factorized with low-rank, Tucker-2 and "
        "TT-matrix layers, before and after healing by distillation",
        "parameter budget of each factorized kernel",
        base.percent,
        lambda quick: [],
        _claims,
        _notes,
        run_all=_run,
        metric="Embedding fidelity (mean cosine to the dense model, %)",
    )
)
