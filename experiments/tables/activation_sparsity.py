"""activation_sparsity: activation sparsity that training creates (Lazy Neuron) and TEAL imposes.

    python -m experiments.reproduce --table=activation_sparsity --workdir=runs/tables --seeds=5

Part 1, the Lazy Neuron phenomenon (Li et al. 2023): the project's MNIST-1D transformer
(`experiments.models.ViT1D` with `base.vit1d_config`'s recipe: patch 4, width 32, depth 2, 4
heads, MLP 64, Adam at 3e-3 with cosine decay, batch 100, 2,000 steps, trained by
`experiments.sweep.train_seeds`) is trained once with a ReLU MLP and once with a GELU MLP. At
steps 0, 100, 250, 500, 1,000 and 2,000 (the columns) the input of each block's ``mlp_out``
(the post-activation hidden layer) is captured on the 1,000 test examples
(`sparsejax.activations.dense_inputs`, the capture behind `nonzero_fractions`), and the
fraction of its entries that are nonzero is measured: exactly for ReLU, and as ``|a| > c *
RMS(a)`` with c = 0.1 for GELU, whose output is never exactly zero (an entry below that bound
carries under 1% of the layer's mean squared activation; c = 0.05 and 0.2 are in an extra
table). A seed is the model's initialisation and the data order. Extra tables: the trained
models' test accuracy (ReLU vs GELU, Mirzadeh et al. 2023) and ReLU's dead units.

Part 2, TEAL (Liu et al. 2024) on all-MiniLM-L6-v2: magnitude thresholds for the inputs of all
36 projections, calibrated as `sparsejax.activations.teal_thresholds` does (one capture for
every sparsity: `teal_thresholds_from_inputs`) on 32 windows x 64 tokens of the corpus's
calibration split at 25%, 40% and 50% model-wide sparsity, applied through
`sparsejax.activations.teal` inside a jitted forward (thresholds are jit arguments: one
program for every sparsity), and evaluated on held-out text (fidelity to the dense model's
embeddings on 100 passages, retrieval recall@1 and MRR on all evaluation topics). Measured too:
the sparsity TEAL reaches on the evaluation passages' real tokens, and a control that drops
the same fraction of each projection's input at random (`sparsejax.activations.random_drop`,
each layer at the rate TEAL reached on it, nothing rescaled), scored on fidelity only: its
random draws cost as much as the model on CPU, and the retrieval documents are most of the
evaluation's tokens. A seed is the draw of the calibration windows and of the control's
masks. TEAL's results are in extra tables with their own columns.

Cost of the full run with 5 seeds, measured in pieces on this project's 2 cores while other
jobs shared them (load average 5-7): training the 5 seeds of one activation with their
snapshots 105 s (measuring the 30 snapshots, one jitted capture each, takes seconds); TEAL's
dense evaluation 20-30 s (it compiles the forward for each padded length), a seed's
calibration (32 windows x 64 tokens, one jitted capture of the 36 inputs for all sparsities,
quantiles on the host) 3-6 s, then per seed and sparsity a TEAL evaluation of about 22 s and a
control of about 17 s (the first of each compiles, +15 s). About 4 minutes for part 1 and 11
for part 2: an estimated 15 minutes in all, less on idle cores. Per-seed results are kept in
``WORKDIR/activation_sparsity_cells.jsonl``, so an interrupted run resumes where it stopped.
``--quick`` (the quick ViT sizes, width 16 and depth 1, for 100 steps, columns 0, 50, 100;
TEAL calibrated on 8 windows x 32 tokens and evaluated on 16 passages and 8 topics cut to 32
tokens) took 58 s as a test at load average 6 (34 s of CPU), half of it compiling.
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments import data as data_lib
from experiments import models as models_lib
from experiments import pretrained, stats, sweep
from experiments.pretrained import corpus as corpus_lib
from experiments.tables import base
from sparsejax import activations

_MODEL = "all-MiniLM-L6-v2"
_ACTIVATIONS = (("ReLU", "relu"), ("GELU", "gelu"))
# GELU's near-zero bound, relative to the layer's RMS activation on the measured batch, and
# the other bounds of the sensitivity table.
_RELATIVE_EPS = 0.1
_OTHER_EPS = (0.05, 0.2)
# Thresholds fixed before the run: TEAL at 25% keeps fidelity >= 0.99; at 40-50% the
# degradation is "small": fidelity >= 0.95 and recall@1 at most 5 points below dense.
_FIDELITY_AT_25 = 0.99
_FIDELITY_AT_HIGH = 0.95
_RECALL_DROP = 0.05
_DENSE, _TEAL, _RANDOM = "dense", "TEAL", "random drop"
_TRAINING = "training"  # the cache's column for a trained model's measurements

_ACCURACY = "test accuracy of the trained MNIST-1D transformers (%)"
_DEAD = "ReLU hidden units that never fire on the measured test examples (dead units, %)"
_EPS = "GELU's near-zero measure at other bounds: fraction with |a| > c·RMS(a) (%)"
_FIDELITY = (
    "TEAL on all-MiniLM-L6-v2: embedding fidelity (mean cosine to the dense model on the "
    "evaluation passages, %)"
)
_RECALL = "TEAL on all-MiniLM-L6-v2: retrieval recall@1 on the evaluation topics (%)"
_MRR = "TEAL on all-MiniLM-L6-v2: retrieval MRR on the evaluation topics (%)"
_REACHED = (
    "TEAL on all-MiniLM-L6-v2: sparsity reached on the evaluation passages' real tokens, mean "
    "over the 36 projection inputs (%)"
)
_KINDS = (
    "TEAL's sparsity reached on the evaluation passages' real tokens, by projection input "
    "(mean over the 6 layers, %)"
)
_SECONDS = "TEAL calibration time per seed, all sparsities (s)"


class _Settings(NamedTuple):
    steps: tuple[int, ...]
    measure_examples: int
    sparsities: tuple[float, ...]
    n_windows: int
    length: int
    passages: int
    queries: int | None
    eval_tokens: int | None
    eval_batch_size: int


def _settings(quick: bool) -> _Settings:
    """The run's sizes; ``quick`` trains the quick ViT for 100 steps and evaluates TEAL on 16
    passages and 8 topics cut to 32 tokens (fewer shapes to compile)."""
    if quick:
        return _Settings(
            steps=(0, 50, 100),
            measure_examples=256,
            sparsities=(0.25, 0.4, 0.5),
            n_windows=8,
            length=32,
            passages=16,
            queries=8,
            eval_tokens=32,
            eval_batch_size=8,
        )
    return _Settings(
        steps=(0, 100, 250, 500, 1000, 2000),
        measure_examples=1000,
        sparsities=(0.25, 0.4, 0.5),
        n_windows=32,
        length=64,
        passages=100,
        queries=None,
        eval_tokens=None,
        eval_batch_size=32,
    )


# --- Part 1: the Lazy Neuron phenomenon on the MNIST-1D transformer ------------------------


def _vit_config(quick: bool, activation: str, total_steps: int):
    config = base.vit1d_config(quick)
    config.total_steps = config.eval_every_steps = total_steps
    config.model.activation = activation
    return config


def _row(label: str, block: int) -> str:
    if label == "GELU":
        return f"GELU, block {block} (|a| > {_RELATIVE_EPS:g} RMS)"
    return f"{label}, block {block}"


def _hidden_statistics(hidden: list[jax.Array]) -> list[dict[str, float]]:
    """Per block: nonzero fractions of the MLP's hidden layer (exact and at each bound
    relative to its RMS) and the fraction of hidden units that never fire.

    Args:
      hidden: per block, the ``mlp_out`` input ``[examples, tokens, hidden]``.
    """
    out = []
    for a in hidden:
        a = a.reshape(-1, a.shape[-1])  # [examples * tokens, hidden]
        rms = float(jnp.sqrt(jnp.mean(jnp.square(a))))
        entry = {
            "nonzero": float(activations.nonzero_fraction(a)),
            "dead": float(jnp.mean(jnp.all(a == 0, axis=0))),
        }
        for c in (_RELATIVE_EPS, *_OTHER_EPS):
            entry[f"near_{c:g}"] = float(activations.nonzero_fraction(a, eps=c * rms))
        out.append(entry)
    return out


def _lazy_neurons(quick, seeds, dataset, s: _Settings, cells, progress) -> dict[str, dict]:
    """{activation label: {seed: cached result}}: each model's statistics at every step."""
    x = jnp.asarray(dataset.x_test[: s.measure_examples])
    out: dict[str, dict] = {}
    for label, activation in _ACTIVATIONS:
        config = _vit_config(quick, activation, s.steps[-1])
        missing = [seed for seed in seeds if cells.get(label, _TRAINING, seed) is None]
        if missing:
            trained = sweep.train_seeds(
                config,
                missing,
                dataset=dataset,
                snapshot_steps=list(s.steps),
                progress=progress,
                desc=f"activation_sparsity {label}",
            )
            model = models_lib.make_model(config, dataset.num_classes)
            paths = [(f"block_{i}", "mlp_out") for i in range(config.model.depth)]
            # The capture traced once, so each snapshot runs one compiled program.
            capture = jax.jit(
                lambda p, model=model, paths=paths: [
                    activations.dense_inputs(model.apply, {"params": p}, x, paths=paths)[q]
                    for q in paths
                ]
            )
            for i, seed in enumerate(missing):
                at_steps = [
                    _hidden_statistics(
                        capture(jax.tree.map(lambda a, i=i: a[i], trained.snapshots[step]))
                    )
                    for step in s.steps
                ]
                result = {"blocks": at_steps, "accuracy": float(trained.test_accuracy[i, -1])}
                cells.put(label, _TRAINING, seed, result)
        out[label] = {seed: cells.get(label, _TRAINING, seed) for seed in seeds}
    return out


# --- Part 2: TEAL on all-MiniLM-L6-v2 ------------------------------------------------------


def _forwards(model, paths: list[tuple[str, ...]]):
    """Jitted forwards under TEAL's thresholds or the random drop, each returning the mean-
    pooled embeddings and, per projection, its input's zeros and entries on real tokens."""
    wanted = set(paths)

    def counted(params, ids, mask):
        counts = {}

        # Entered inside TEAL's (or the drop's) interceptor, so it sees the zeroed inputs.
        def count(next_fun, args, kwargs, context):
            path = tuple(context.module.path)
            if context.method_name == "__call__" and path in wanted:
                a = args[0]  # [batch, tokens, features]
                real = mask[..., None].astype(a.dtype)
                counts[path] = (jnp.sum((a == 0) * real), jnp.sum(real) * a.shape[-1])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(count):
            states = model.apply({"params": params}, ids, mask)
        zeros = jnp.stack([counts[p][0] for p in paths])
        entries = jnp.stack([counts[p][1] for p in paths])
        return pretrained.mean_pool(states, mask), zeros, entries

    @jax.jit
    def teal_forward(params, ids, mask, thresholds):
        with activations.teal(thresholds):
            return counted(params, ids, mask)

    @jax.jit
    def random_forward(params, ids, mask, key, rates):
        with activations.random_drop(key, rates):
            return counted(params, ids, mask)

    return teal_forward, random_forward


def _kind(name: str) -> str:
    if "/attention/self/" in name:
        return "Q/K/V input"
    if "/attention/output/" in name:
        return "attention output input"
    if "/intermediate/" in name:
        return "MLP in input"
    return "MLP out input (post-GELU)"


def _teal(seeds, s: _Settings, cells, progress) -> tuple[dict, list[str], list[str]]:
    """TEAL and its control on all-MiniLM-L6-v2.

    Returns:
      ``(scores, names, cols)``: ``scores[(row, col, seed)]`` = {fidelity, recall@1, mrr,
      reached (per layer)} for rows dense (col "") , TEAL and random drop, and
      ``scores[("calibration", "", seed)]`` = {seconds} (None if never calibrated); the
      projections' names in call order; the column labels ('25%', ...).
    """
    model, params, tokenizer = pretrained.load(_MODEL)
    corpus = corpus_lib.load_corpus()
    eval_tokenizer = tokenizer
    if s.eval_tokens:
        eval_tokenizer = type(tokenizer).from_str(tokenizer.to_str())
        eval_tokenizer.enable_truncation(s.eval_tokens)
    names = pretrained.dense_layer_names(model.config)
    paths = [tuple(n.split("/")) for n in names]
    passages = corpus_lib.evaluation_passages(corpus, n=s.passages)
    teal_forward, random_forward = _forwards(model, paths)
    capture = jax.jit(
        lambda p, ids: activations.dense_inputs(model.apply, {"params": p}, ids, paths=paths)
    )

    def evaluate(run, *args, reference=None, retrieval=True) -> dict[str, Any]:
        """Scores of the model run by ``run(params, ids, mask, *args)`` and the sparsity it
        reaches per layer on the evaluation passages; with ``retrieval=False`` only the
        passages are embedded (fidelity, no recall or MRR)."""
        counts = []

        def embed_fn(texts):
            record = texts == passages

            def forward(p, ids, mask):
                pooled, zeros, entries = run(p, ids, mask, *args)
                if record:
                    counts.append((np.asarray(zeros), np.asarray(entries)))
                return pooled

            return pretrained.embed(
                model, params, eval_tokenizer, texts, s.eval_batch_size, forward=forward
            )

        if retrieval:
            out = corpus_lib.evaluate(
                embed_fn,
                reference=reference,
                corpus=corpus,
                n_passages=s.passages,
                n_queries=s.queries,
            )
        else:
            embedded = embed_fn(passages)
            out = {"fidelity": corpus_lib.fidelity(reference["passage_embeddings"], embedded)}
        zeros = np.sum([z for z, _ in counts], axis=0)
        entries = np.sum([e for _, e in counts], axis=0)
        out["reached"] = (zeros / entries).tolist()
        return out

    def scores(evaluated: dict) -> dict[str, Any]:
        keys = ("fidelity", "recall@1", "mrr", "reached")
        return {k: evaluated[k] for k in keys if k in evaluated}

    nothing = {p: jnp.float32(-1.0) for p in paths}  # |a| > -1 always: the dense model
    dense = evaluate(teal_forward, nothing)
    dense["fidelity"] = 1.0  # by definition
    out = {}
    for seed in seeds:
        out[(_DENSE, "", seed)] = scores(dense)
    cols = [base.percent(x) for x in s.sparsities]
    jobs = [(seed, sparsity) for seed in seeds for sparsity in s.sparsities]
    thresholds: dict[int, dict[float, dict]] = {}
    for seed, sparsity in tqdm(jobs, desc="activation_sparsity TEAL", disable=not progress):
        col = base.percent(sparsity)
        teal = cells.get(_TEAL, col, seed)
        if teal is None:
            if seed not in thresholds:
                start = time.perf_counter()
                ids = jnp.asarray(
                    corpus_lib.calibration_ids(
                        tokenizer, n=s.n_windows, length=s.length, seed=seed, corpus=corpus
                    )
                )
                # One capture of the 36 inputs serves every sparsity (`teal_thresholds`,
                # once per sparsity, would capture them again each time).
                inputs = capture(params, ids)
                thresholds[seed] = activations.teal_thresholds_from_inputs(inputs, s.sparsities)
                del inputs
                cells.put("calibration", "", seed, {"seconds": time.perf_counter() - start})
            chosen = {p: jnp.float32(t) for p, t in thresholds[seed][sparsity].items()}
            teal = scores(evaluate(teal_forward, chosen, reference=dense))
            cells.put(_TEAL, col, seed, teal)
        control = cells.get(_RANDOM, col, seed)
        if control is None:
            # Each layer loses the fraction TEAL removed from it on the evaluation passages.
            rates = {p: jnp.float32(r) for p, r in zip(paths, teal["reached"], strict=True)}
            # An RBG key: the control needs independent bits, not threefry's splitting
            # guarantees, and RBG draws them faster on CPU.
            key = jax.random.key(seed, impl="rbg")
            # Fidelity only: the random draws cost as much as the model on CPU, and the
            # retrieval documents are most of the evaluation's tokens.
            control = scores(evaluate(random_forward, key, rates, reference=dense, retrieval=False))
            cells.put(_RANDOM, col, seed, control)
        out[(_TEAL, col, seed)] = teal
        out[(_RANDOM, col, seed)] = control
    for seed in seeds:
        out[("calibration", "", seed)] = cells.get("calibration", "", seed)
    return out, names, cols


# --- The table -----------------------------------------------------------------------------


def _run(quick, seeds, dataset, workdir, progress) -> base.TableRun:
    s = _settings(quick)
    dataset = data_lib.load_mnist1d() if dataset is None else dataset
    info = corpus_lib.corpus_info()
    signature = {
        "quick": quick,
        "text_sha256": info["text_sha256"],
        "relative_eps": [_RELATIVE_EPS, *_OTHER_EPS],
        "vit": _vit_config(quick, "relu", s.steps[-1]).to_dict(),
        **s._asdict(),
    }
    cells = base.CellCache(
        os.path.join(workdir, "activation_sparsity_cells.jsonl") if workdir else None, signature
    )
    results: dict = {}
    extra: dict[str, dict] = {
        _ACCURACY: {},
        _DEAD: {},
        _EPS: {},
        _FIDELITY: {},
        _RECALL: {},
        _MRR: {},
        _REACHED: {},
        _KINDS: {},
        _SECONDS: {},
    }

    lazy = _lazy_neurons(quick, seeds, dataset, s, cells, progress)
    cols = list(s.steps)
    depth = len(lazy["ReLU"][seeds[0]]["blocks"][0])
    rows = [_row(label, b) for label, _ in _ACTIVATIONS for b in range(depth)]
    for label, _ in _ACTIVATIONS:
        per_seed = [lazy[label][seed] for seed in seeds]
        extra[_ACCURACY][(label, "test accuracy")] = [r["accuracy"] for r in per_seed]
        for b in range(depth):
            row = _row(label, b)
            key = "nonzero" if label == "ReLU" else f"near_{_RELATIVE_EPS:g}"
            for j, step in enumerate(cols):
                results[(row, step)] = [r["blocks"][j][b][key] for r in per_seed]
                if label == "ReLU":
                    extra[_DEAD][(row, step)] = [r["blocks"][j][b]["dead"] for r in per_seed]
                else:
                    for c in _OTHER_EPS:
                        other = f"GELU, block {b} (|a| > {c:g} RMS)"
                        extra[_EPS][(other, step)] = [
                            r["blocks"][j][b][f"near_{c:g}"] for r in per_seed
                        ]

    teal, names, teal_cols = _teal(seeds, s, cells, progress)
    kinds = [_kind(n) for n in names]
    for row in (_DENSE, _TEAL, _RANDOM):
        for col in teal_cols:
            got = [teal[(row, "" if row == _DENSE else col, seed)] for seed in seeds]
            for title, key in ((_FIDELITY, "fidelity"), (_RECALL, "recall@1"), (_MRR, "mrr")):
                if key in got[0]:
                    extra[title][(row, col)] = [float(g[key]) for g in got]
            extra[_REACHED][(row, col)] = [float(np.mean(g["reached"])) for g in got]
            if row == _TEAL:
                for kind in dict.fromkeys(kinds):
                    extra[_KINDS][(kind, col)] = [
                        float(np.mean([r for r, k in zip(g["reached"], kinds) if k == kind]))
                        for g in got
                    ]
    for seed in seeds:
        calibration = teal[("calibration", "", seed)]
        if calibration is not None:
            extra[_SECONDS][(f"seed {seed}", "seconds")] = calibration["seconds"]
    if not extra[_SECONDS]:
        del extra[_SECONDS]
    for title, values in extra.items():  # the claims read extras as results[(row, col, title)]
        for (row, col), value in values.items():
            results[(row, col, title)] = value
    return base.TableRun(rows, cols, results, extra)


def _lower(values) -> float:
    """Lower end of the 95% CI of the mean (the mean itself for a single value)."""
    mean, half = stats.mean_ci(values)
    return mean if np.isnan(half) else mean - half


def _claims(results: dict, cols: list) -> list[stats.Claim]:
    claims = []
    first, last = cols[0], cols[-1]
    rows = list(dict.fromkeys(k[0] for k in results if len(k) == 2))
    for row in rows:
        relu = row.startswith("ReLU")
        paper = (
            "Li et al. 2023, the Lazy Neuron phenomenon"
            if relu
            else "an extension, not a claim of the paper: Li et al. 2023 define their measure "
            "on ReLU MLPs, counting exact zeros after the ReLU"
        )
        what = "nonzero fraction" if relu else "fraction not near zero"
        claims.append(
            stats.better(
                f"{row}: sparsity emerges with training, the {what} of the MLP's hidden layer "
                f"after {last} steps is below its value at step {first} ({paper})",
                f"step {first}",
                results[(row, first)],
                f"step {last}",
                results[(row, last)],
            )
        )
    if ("ReLU", "test accuracy", _ACCURACY) in results:
        claims.append(
            stats.at_least(
                "A ReLU MLP costs no test accuracy against GELU, within noise (Mirzadeh et al. "
                "2023, ReLU Strikes Back)",
                "ReLU",
                results[("ReLU", "test accuracy", _ACCURACY)],
                "GELU",
                results[("GELU", "test accuracy", _ACCURACY)],
            )
        )
    teal_cols = [k[1] for k in results if len(k) == 3 and k[0] == _TEAL and k[2] == _FIDELITY]
    for col in teal_cols:
        teal = results[(_TEAL, col, _FIDELITY)]
        claims.append(
            stats.better(
                f"At {col} sparsity TEAL's magnitude thresholds keep more embedding fidelity "
                "than dropping the same fraction of each projection's input at random (Liu et "
                "al. 2024: magnitude is a good proxy for importance)",
                _TEAL,
                teal,
                _RANDOM,
                results[(_RANDOM, col, _FIDELITY)],
            )
        )
        sparsity = float(col.rstrip("%")) / 100
        evidence = f"fidelity {stats.fmt(teal)}, lower end of the 95% CI {100 * _lower(teal):.1f}"
        if sparsity <= 0.25:
            claims.append(
                stats.Claim(
                    f"At {col} sparsity TEAL keeps embedding fidelity >= {_FIDELITY_AT_25:g} "
                    "(lower end of the 95% CI; Liu et al. 2024 find 25% nearly free on 7B-70B "
                    "LLMs, here a 22M-parameter encoder)",
                    bool(_lower(teal) >= _FIDELITY_AT_25),
                    evidence,
                )
            )
            continue
        claims.append(
            stats.Claim(
                f"At {col} sparsity TEAL's fidelity loss is small: >= {_FIDELITY_AT_HIGH:g} "
                "(lower end of the 95% CI; Liu et al. 2024 report minimal degradation at "
                "40-50% on 7B-70B LLMs, here a 22M-parameter encoder)",
                bool(_lower(teal) >= _FIDELITY_AT_HIGH),
                evidence,
            )
        )
        recall = np.asarray(results[(_TEAL, col, _RECALL)], np.float64)
        dense = np.asarray(results[(_DENSE, col, _RECALL)], np.float64)
        d, lo, _ = stats.diff_ci(recall, dense)
        claims.append(
            stats.Claim(
                f"At {col} sparsity TEAL's retrieval recall@1 is within "
                f"{100 * _RECALL_DROP:g} points of the dense model's (lower end of the 95% CI "
                "of the difference; Liu et al. 2024)",
                bool(lo >= -_RECALL_DROP),
                f"recall@1 TEAL {stats.fmt(recall)} vs dense {stats.fmt(dense)}; difference "
                f"{100 * d:+.1f}, lower end {100 * lo:+.1f}",
            )
        )
    return claims


def _notes(quick: bool) -> str:
    s = _settings(quick)
    config = _vit_config(quick, "relu", s.steps[-1])
    m = config.model
    info = corpus_lib.corpus_info()
    topics = f"the first {s.queries}" if s.queries else "all"
    cut = f", every text cut to {s.eval_tokens} tokens" if s.eval_tokens else ""
    return (
        f"Part 1 (main table): `ViT1D` on MNIST-1D (patch {m.patch_size}, width {m.width}, "
        f"depth {m.depth}, {m.num_heads} heads, MLP {m.mlp_dim}), Adam at "
        f"{config.optimizer.learning_rate:g} with cosine decay, batch {config.batch_size}, "
        f"{config.total_steps} steps, once with a ReLU and once with a GELU (tanh "
        "approximation) MLP; a seed is the initialisation and the data order. The columns are "
        "training steps; the values are the fraction of nonzero entries of each block's MLP "
        f"hidden layer (the input of `mlp_out`) on the first {s.measure_examples} test "
        "examples (all tokens): exact nonzeros for ReLU (Li et al. 2023's measure); for GELU, "
        f"which is never exactly zero, entries with |a| > {_RELATIVE_EPS:g}·RMS(a), the RMS "
        "taken over the same layer and examples, i.e. entries carrying at least 1% of the "
        "mean squared activation (a bound relative to the scale, which training changes; "
        f"{', '.join(f'{c:g}' for c in _OTHER_EPS)} in an extra table). Part 2 (extra "
        f"tables): TEAL on all-MiniLM-L6-v2: per-layer thresholds on the inputs of all 36 "
        "projections (Q, K, V, attention output, MLP in and out of 6 layers), the column's "
        f"quantile of |input| over {s.n_windows} calibration windows of {s.length} tokens "
        "(a seed draws the windows), applied at inference; the control zeroes each "
        "projection's input entries independently at random with the probability TEAL "
        "reached on that layer (no rescaling, as TEAL does none), scored on fidelity only "
        "(its random draws are costly on CPU). Evaluation: fidelity over "
        f"{s.passages} evaluation passages (mean cosine to the dense model's embeddings), "
        f"retrieval over {topics} evaluation topics{cut}; the reached sparsity counts the "
        "zero entries of each projection's input over the passages' real (unpadded) tokens. "
        f"Corpus: the CPython documentation (`pydoc_data.topics`, Python "
        f"{info['python_version']}, text sha256 {info['text_sha256'][:16]}…). Thresholds of "
        f"the claims, fixed in advance: fidelity >= {_FIDELITY_AT_25:g} at 25%, >= "
        f"{_FIDELITY_AT_HIGH:g} and recall@1 within {100 * _RECALL_DROP:g} points of dense "
        "at 40-50%."
    )


base.register(
    base.Table(
        "activation_sparsity",
        "Activation sparsity: its emergence in training (Lazy Neuron, ReLU vs GELU) and "
        "training-free TEAL thresholds on all-MiniLM-L6-v2 against random dropping",
        "training step",
        lambda step: f"step {step}",
        lambda quick: [],
        _claims,
        _notes,
        run_all=_run,
        metric="Nonzero fraction of the MLP hidden layer (%)",
    )
)
