"""posttrain_lm: one-shot pruning of a real pretrained transformer (all-MiniLM-L6-v2).

Every encoder projection of all-MiniLM-L6-v2 (36 Dense kernels: Q, K, V, attention output, MLP
in and out of 6 layers) is pruned with magnitude, Wanda and SparseGPT (each ± DSnoT) at
50/60/70% and 2:4, 4:8, calibrated on 128 windows of 64 tokens of the corpus's calibration split
(`experiments.pretrained.corpus`), one transformer block at a time as the reference
implementations do (`prune_model(block_depth=2)`: one encoder layer), and evaluated on held-out
text with no retraining: embedding fidelity (mean cosine to the dense model's embeddings of the
evaluation passages; the table's values), retrieval recall@1 and MRR, the mean relative output
error of the pruned layers and each pruner's run time. A seed is one draw of the calibration
windows (magnitude ignores them: one run, repeated). Also measured: the input-feature outlier
statistic that motivates Wanda (largest / median input-feature norm per layer) on MiniLM and on
the project's own MNIST-1D transformer.

Full run: about 45 s per pruned model on 2 idle cores (the prune and an evaluation on 160
passages and 46 retrieval topics), 105 models for 5 seeds; per-model results are kept in
``WORKDIR/posttrain_lm_cells.jsonl``, so an interrupted run resumes where it stopped.

Papers: Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (Wanda,
2024); Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot" (2023); Zhang et al., "Dynamic Sparse No Training" (DSnoT, 2024).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments import data as data_lib
from experiments import models as models_lib
from experiments import pretrained, stats, sweep
from experiments.pretrained import corpus as corpus_lib
from experiments.tables import base
from sparsejax import posttrain

_MODEL = "all-MiniLM-L6-v2"
_METHODS = base.POSTTRAIN_METHODS
_PATTERNS = base.POSTTRAIN_PATTERNS
_RECALL = "retrieval recall@1 on the evaluation topics (%)"
_MRR = "retrieval MRR on the evaluation topics (%)"
_ERRORS = "mean relative output error of the pruned layers on the calibration inputs, seed 0"
_SECONDS = "pruning time (s; calibration forward passes included), seed 0"
_SPARSITY = "exact zeros over the pruned kernels' entries, seed 0"
_OUTLIERS = "input-feature outliers: largest / median input-feature norm, per layer kind"


def _settings(quick: bool) -> dict:
    """Sizes of the run; ``quick`` prunes only the first encoder layer on a tiny batch."""
    if quick:
        return {
            "calibration": 8,
            "length": 16,
            "passages": 16,
            "queries": 8,
            "cols": ["50%", "2:4"],
            "dsnot": False,
            "layers": 1,
        }
    return {
        "calibration": 128,
        "length": 64,
        "passages": 160,
        "queries": None,
        "cols": list(_PATTERNS),
        "dsnot": True,
        "layers": None,
    }


def _rows(dsnot: bool) -> list[tuple[str, str, bool]]:
    rows = [(label, method, False) for label, method in _METHODS]
    if dsnot:
        rows += [(f"{label} + DSnoT", method, True) for label, method in _METHODS[1:]]
    return rows


def _skip(config, layers: int | None) -> list[str]:
    """The projections left dense: none, or all but those of the first ``layers`` layers."""
    names = pretrained.dense_layer_names(config)
    if layers is None:
        return []
    kept = {f"encoder/layer_{i}/" for i in range(layers)}
    return [n for n in names if not any(n.startswith(k) for k in kept)]


def _vit_outliers(quick: bool) -> dict[str, float]:
    """Outlier ratios of the project's MNIST-1D transformer, trained dense (seed 0)."""
    config = base.vit1d_config(quick)
    if quick:
        config.total_steps = config.eval_every_steps = 100
    data = data_lib.load_mnist1d()
    trained = sweep.train_seeds(config, [0], dataset=data, progress=False)
    model = models_lib.make_model(config, data.num_classes)
    params = jax.tree.map(lambda a: a[0], trained.final_state.params)
    x = jnp.asarray(data.x_train[:128])
    calls = posttrain.layer_calls(model.apply, {"params": params}, x)
    paths = [c.path for c in calls if c.name not in ("embed", "head")]
    return posttrain.outlier_ratios(model.apply, {"params": params}, x, paths)


def _kind(name: str) -> str:
    for part, kind in (
        ("query", "Q/K/V input"),
        ("key", "Q/K/V input"),
        ("value", "Q/K/V input"),
        ("attention/output", "attention output input"),
        ("attention/out", "attention output input"),
        ("intermediate", "MLP in input"),
        ("mlp_in", "MLP in input"),
        ("output/dense", "MLP out input"),
        ("mlp_out", "MLP out input"),
    ):
        if part in name:
            return kind
    return "other"


def _outlier_rows(model, params, ids, quick: bool) -> dict:
    """``{(model, layer kind): mean ratio over its layers}`` plus each model's maximum."""
    names = pretrained.dense_layer_names(model.config)
    paths = [tuple(n.split("/")) for n in names]
    minilm = posttrain.outlier_ratios(model.apply, {"params": params}, ids, paths)
    vit = _vit_outliers(quick)
    out = {}
    for label, ratios in (("all-MiniLM-L6-v2", minilm), ("MNIST-1D ViT (this project)", vit)):
        kinds: dict[str, list[float]] = {}
        for name, ratio in ratios.items():
            kinds.setdefault(_kind(name), []).append(ratio)
        for kind, values in kinds.items():
            out[(label, f"{kind} (mean over layers)")] = float(np.mean(values))
        out[(label, "largest over layers")] = float(max(ratios.values()))
    return out


def _run(quick, seeds, dataset, workdir, progress) -> base.TableRun:
    del dataset
    settings = _settings(quick)
    model, params, tokenizer = pretrained.load(_MODEL)
    corpus = corpus_lib.load_corpus()
    info = corpus_lib.corpus_info(corpus)
    skip = _skip(model.config, settings["layers"])

    def evaluate(p, reference=None):
        return corpus_lib.evaluate(
            lambda s: pretrained.embed(model, p, tokenizer, s, batch_size=32),
            reference=reference,
            corpus=corpus,
            n_passages=settings["passages"],
            n_queries=settings["queries"],
        )

    dense = evaluate(params)
    signature = {
        "quick": quick,
        "text_sha256": info["text_sha256"],
        "block_depth": 2,
        **settings,
    }
    cells = base.CellCache(
        os.path.join(workdir, "posttrain_lm_cells.jsonl") if workdir else None, signature
    )
    cols = settings["cols"]
    rows_spec = _rows(settings["dsnot"])
    rows = ["dense"] + [label for label, _, _ in rows_spec]
    results: dict = {}
    extra = {_RECALL: {}, _MRR: {}, _ERRORS: {}, _SECONDS: {}, _SPARSITY: {}}
    for col in cols:
        results[("dense", col)] = [1.0] * len(seeds)
        extra[_RECALL][("dense", col)] = [dense["recall@1"]] * len(seeds)
        extra[_MRR][("dense", col)] = [dense["mrr"]] * len(seeds)
    # Seed-major, so an interrupted run has whole seeds done.
    jobs = [(r, c, s) for s in seeds for r in rows_spec for c in cols]
    calibration = {}
    for (label, method, refined), col, seed in tqdm(
        jobs, desc="posttrain_lm", disable=not progress
    ):
        # Magnitude pruning does not read the calibration data: one run serves every seed.
        run_seed = seeds[0] if method == "magnitude" else seed
        result = cells.get(label, col, run_seed)
        if result is None:
            if run_seed not in calibration:
                calibration[run_seed] = jnp.asarray(
                    corpus_lib.calibration_ids(
                        tokenizer,
                        n=settings["calibration"],
                        length=settings["length"],
                        seed=run_seed,
                        corpus=corpus,
                    )
                )
            sparsity, n, m = _PATTERNS[col]
            start = time.perf_counter()
            out = posttrain.prune_model(
                model.apply,
                params,
                calibration[run_seed],
                method=method,
                sparsity=sparsity,
                n=n,
                m=m,
                dsnot=refined,
                skip=skip,
                block_depth=2,
            )
            seconds = time.perf_counter() - start
            scores = evaluate(out.params, reference=dense)
            result = {
                "fidelity": scores["fidelity"],
                "recall@1": scores["recall@1"],
                "mrr": scores["mrr"],
                "error": float(np.mean(list(out.errors.values()))),
                "seconds": seconds,
                "sparsity": _kernel_sparsity(out.params, model.config, skip),
            }
            cells.put(label, col, run_seed, result)
        for key, title in (("fidelity", None), ("recall@1", _RECALL), ("mrr", _MRR)):
            target = results if title is None else extra[title]
            target.setdefault((label, col), []).append(result[key])
        if seed == seeds[0]:
            extra[_ERRORS][(label, col)] = result["error"]
            extra[_SECONDS][(label, col)] = result["seconds"]
            extra[_SPARSITY][(label, col)] = result["sparsity"]
    if not calibration:
        calibration[seeds[0]] = jnp.asarray(
            corpus_lib.calibration_ids(
                tokenizer, n=settings["calibration"], length=settings["length"], corpus=corpus
            )
        )
    extra[_OUTLIERS] = _outlier_rows(model, params, next(iter(calibration.values())), quick)
    return base.TableRun(rows, cols, results, extra)


def _kernel_sparsity(params, config, skip) -> float:
    """Exact zeros over the pruned kernels' entries."""
    zeros = size = 0
    for name in pretrained.dense_layer_names(config):
        if name in skip:
            continue
        kernel = params
        for key in name.split("/"):
            kernel = kernel[key]
        kernel = np.asarray(kernel["kernel"])
        zeros, size = zeros + int(kernel.size - np.count_nonzero(kernel)), size + kernel.size
    return zeros / size


def _claims(results: dict, cols: list) -> list[stats.Claim]:
    claims = []
    r = lambda row, col: results[(row, col)]  # noqa: E731
    for col in ("50%", "2:4"):
        if col not in cols:
            continue
        for method, paper in (
            ("Wanda", "Sun et al. 2024"),
            ("SparseGPT", "Frantar & Alistarh 2023"),
        ):
            claims.append(
                stats.better(
                    f"{col}: {method} keeps the embeddings far closer to the dense model's than "
                    f"magnitude pruning ({paper})",
                    method,
                    r(method, col),
                    "magnitude",
                    r("magnitude", col),
                )
            )
    if "50%" in cols:
        wanda, sgpt = np.asarray(r("Wanda", "50%")), np.asarray(r("SparseGPT", "50%"))
        d, lo, hi = stats.diff_ci(wanda, sgpt)
        claims.append(
            stats.Claim(
                "50%: Wanda is close to SparseGPT, within 1 point of fidelity (Sun et al. 2024: "
                "7.26 vs 7.22 perplexity on LLaMA-7B)",
                bool(lo >= -0.01 and hi <= 0.01),
                f"Wanda {stats.fmt(wanda)} vs SparseGPT {stats.fmt(sgpt)}; difference "
                f"{100 * d:+.1f}, 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}]",
            )
        )
    if "50%" in cols and "2:4" in cols:
        for method in ("Wanda", "SparseGPT"):
            claims.append(
                stats.better(
                    f"2:4 is harder than 50% unstructured for {method} (both papers: the 2:4 "
                    "model is further from the dense one)",
                    "50%",
                    r(method, "50%"),
                    "2:4",
                    r(method, "2:4"),
                )
            )
    if "4:8" in cols and "2:4" in cols:
        claims.append(
            stats.better(
                "4:8 is easier than 2:4 for SparseGPT (Frantar & Alistarh 2023, Table 4)",
                "4:8",
                r("SparseGPT", "4:8"),
                "2:4",
                r("SparseGPT", "2:4"),
            )
        )
    if "70%" in cols and ("Wanda + DSnoT", "70%") in results:
        for method in ("Wanda", "SparseGPT"):
            claims.append(
                stats.better(
                    f"70%: DSnoT improves {method} without training (Zhang et al. 2024)",
                    f"{method} + DSnoT",
                    r(f"{method} + DSnoT", "70%"),
                    method,
                    r(method, "70%"),
                )
            )
    return claims


def _notes(quick: bool) -> str:
    settings = _settings(quick)
    info = corpus_lib.corpus_info()
    scope = (
        "the 6 projections of the first encoder layer (quick mode)"
        if settings["layers"]
        else "all 36 encoder projections (Q, K, V, attention output, MLP in and out of 6 layers)"
    )
    passages = settings["passages"] or info["evaluation_passages"]
    topics = f"the first {settings['queries']}" if settings["queries"] else "all"
    return (
        f"all-MiniLM-L6-v2 (from its wheel): {scope} pruned once, no retraining; the word, "
        "position and type embeddings stay dense, as the papers keep embeddings dense. "
        f"Calibration: {settings['calibration']} windows of {settings['length']} tokens from the "
        "calibration topics of the CPython documentation (`pydoc_data.topics`, Python "
        f"{info['python_version']}, text sha256 {info['text_sha256'][:16]}…), drawn by the seed; "
        "one transformer block at a time, each block's layers calibrated on the outputs of the "
        "already pruned blocks (`prune_model(block_depth=2)`). Magnitude compares |W| per "
        "layer; Wanda |W|·||X|| per output; SparseGPT uses 1% dampening and blocks of 128 "
        "inputs; + DSnoT refines each layer's mask (50 cycles) keeping the dense values of the "
        f"kept weights. Evaluation on held-out text: fidelity over {passages} evaluation "
        "passages (mean cosine of the pruned and the dense model's embeddings), retrieval over "
        f"{topics} evaluation topics (a topic's first sentence must "
        "retrieve the rest of its topic; dense MiniLM: see the dense row). Magnitude does not "
        "read calibration data, so its seeds repeat one run."
    )


base.register(
    base.Table(
        "posttrain_lm",
        "One-shot pruning of a pretrained transformer (all-MiniLM-L6-v2): magnitude vs Wanda vs "
        "SparseGPT (+DSnoT)",
        "sparsity pattern (per pruned kernel)",
        str,
        lambda quick: [],
        _claims,
        _notes,
        run_all=_run,
        metric="Embedding fidelity (mean cosine to the dense model, %)",
    )
)
