"""Compresses a pretrained BERT-family model in one command: prune, factorize, heal, evaluate, save.

    python -m experiments.compress --config=configs/compress_minilm.py --workdir=runs/minilm_sgpt50
    python -m experiments.compress --config=configs/compress_minilm.py:runlocal --workdir=/tmp/c \
        --config.prune.method=wanda --config.prune.pattern=2:4 --config.prune.sparsity=0

The config's keys are listed in ``configs/compress_minilm.py``. `compress` runs the phases in
this order, each timed:

1. load the checkpoint (`experiments.pretrained.load`) and draw the calibration windows of the
   corpus's calibration split (`experiments.pretrained.corpus.calibration_ids`);
2. factorize the chosen projections (`tensornets.factorize_params`, each kernel at
   ``factorize.budget`` of its parameters);
3. prune the chosen projections that are still dense with `sparsejax.posttrain.prune_model`
   (one transformer layer per call, each calibrated on the model whose earlier layers are
   already compressed, so the result is that of one sequential call), by weights, N:M or
   whole blocks (``block_shape``);
4. heal by distillation to the dense model's embeddings (`experiments.pretrained.distill`;
   it trains the factorized projections);
5. evaluate the dense and the compressed model on held-out text: embedding fidelity and
   retrieval (`experiments.pretrained.corpus`);
6. save the compressed model as a Hugging Face folder (`experiments.pretrained.save`;
   factorized projections densified).

The workdir receives ``model/`` (the saved folder), ``embeddings.npz`` (the dense and the
compressed model's embeddings of the evaluation passages) and ``report.json``: fidelity,
retrieval of both models, every projection's exact zero count, parameter counts, each
phase's time, the corpus it was measured on and the config.

As in `experiments.main`, bad input (a flag, the config file, a key or value, the model
folder, the workdir) ends the program with one ``error: ...`` line and exit status 2 before
anything is written. The distributed flags that `experiments.main` defines are accepted and
ignored: compression runs in one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, logging
from tqdm import tqdm

import tensornets
from experiments import checkpoints, pretrained
from experiments import models as models_lib
from experiments.pretrained import corpus as corpus_lib
from experiments.pretrained import distill
from experiments.pretrained.compression import CompressPlan, check_config, select_projections
from sparsejax import posttrain

__all__ = ["CompressResult", "compress", "count_zeros", "main"]

PyTree = Any

_MODEL_FOLDER = "model"
_REPORT = "report.json"
_EMBEDDINGS = "embeddings.npz"


class CompressResult(NamedTuple):
    """What `compress` returns.

    Attributes:
      report: the dict written to ``report.json``.
      model: the compressed `experiments.pretrained.BertModel` (built with ``factorize``).
      params: its params (pruned kernels hold exact zeros).
      factorize: the factorize spec of ``model`` (empty without factorization).
    """

    report: dict[str, Any]
    model: pretrained.BertModel
    params: PyTree
    factorize: dict[str, dict[str, Any]]


# --- Config checks ------------------------------------------------------------------------


def _node(tree: PyTree, name: str) -> PyTree:
    for key in name.split("/"):
        tree = tree[key]
    return tree


def _merge_masks(total: PyTree, new: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: a if b is None else b, total, new, is_leaf=lambda x: x is None)


def _prune(model, params, ids, plan: CompressPlan, layers: Sequence[str], phase) -> Any:
    """Prunes ``layers`` one transformer layer at a time, each inside ``phase(layer_name)``."""
    calls = [c.name for c in posttrain.layer_calls(model.apply, {"params": params}, ids)]
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(name.split("/")[1], []).append(name)
    masks = jax.tree.map(lambda _: None, params)
    errors: dict[str, float] = {}
    for block, group in groups.items():
        with phase(block):
            # One call per transformer layer gives the result of one call over all of them
            # (prune_model is sequential: each layer or block is calibrated on the model whose
            # earlier ones are already pruned), and a progress bar that moves.
            result = posttrain.prune_model(
                model.apply,
                params,
                ids,
                method=plan.method,
                sparsity=plan.sparsity,
                n=plan.n,
                m=plan.m,
                dsnot=plan.dsnot,
                skip=[c for c in calls if c not in group],
                block_depth=plan.block_depth,
                block_shape=plan.block_shape,
            )
        params = result.params
        masks = _merge_masks(masks, result.masks)
        errors.update(result.errors)
    return params, masks, errors


def _check_against_model(
    plan: CompressPlan, model: pretrained.BertModel, params: PyTree, names: Sequence[str]
) -> tuple[list[str], list[str]]:
    """The projections to prune and to factorize, checked against the loaded model.

    Raises:
      ValueError: naming the key: a selection that matches nothing, a projection selected
        for both, a pattern group or block that does not divide a chosen kernel, or a
        calibration length beyond the model's positions.
    """
    prune_layers, factorize_layers = [], []
    if plan.prunes:
        prune_layers = select_projections(plan.prune_layers, names, "prune.layers")
    if plan.factorizes:
        factorize_layers = select_projections(plan.factorize_layers, names, "factorize.layers")
    both = [n for n in prune_layers if n in factorize_layers]
    if both:
        raise ValueError(
            f"prune.layers={plan.prune_layers!r} and factorize.layers="
            f"{plan.factorize_layers!r} both select {both[:2]}{' ...' if len(both) > 2 else ''}"
            f": a projection is pruned or factorized, not both (e.g. prune.layers=attention "
            f"with factorize.layers=mlp)"
        )
    for name in prune_layers:
        rows, cols = _node(params, name)["kernel"].shape
        if plan.m is not None and rows % plan.m:
            raise ValueError(
                f"prune.pattern={plan.n}:{plan.m}: M={plan.m} does not divide the input width "
                f"{rows} of {name}"
            )
        block = plan.block_shape
        if block is not None and (rows % block[0] or cols % block[1]):
            raise ValueError(
                f"prune.block_structure={block[0]}x{block[1]} does not divide the kernel shape "
                f"{(rows, cols)} of {name}"
            )
    limit = model.config.max_position_embeddings
    if plan.calibration_length > limit:
        raise ValueError(
            f"calibration.length={plan.calibration_length} exceeds the model's {limit} positions"
        )
    return prune_layers, factorize_layers


def _heal(plan, student, student_params, teacher, teacher_params, tokenizer):
    """Distills the compressed student's embeddings to the dense teacher's (its factorized
    projections train; every other weight, pruned kernels included, stays as it is)."""
    result = distill.distill(
        jax.random.key(plan.seed),
        student,
        student_params,
        teacher,
        teacher_params,
        tokenizer,
        steps=plan.heal_steps,
        batch_size=plan.heal_batch_size,
        length=plan.calibration_length,
        learning_rate=plan.heal_learning_rate,
        trainable="factorized",
        progress=plan.progress_bar,
    )
    losses = np.asarray(result.losses)
    return result.params, {
        "steps": plan.heal_steps,
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
    }


def count_zeros(params: PyTree, layers: Sequence[str]) -> dict[str, dict[str, float]]:
    """Exact zero counts of the chosen Dense kernels.

    Args:
      params: dense params (a factorized model's densified).
      layers: projection paths.

    Returns:
      ``{path: {"zeros", "size", "sparsity"}}`` with ``sparsity = zeros / size``.
    """
    counts = {}
    for name in layers:
        kernel = np.asarray(_node(params, name)["kernel"])
        zeros = int(kernel.size - np.count_nonzero(kernel))
        counts[name] = {"zeros": zeros, "size": int(kernel.size), "sparsity": zeros / kernel.size}
    return counts


def _size(tree: PyTree) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def _nonzero(tree: PyTree) -> int:
    return int(sum(np.count_nonzero(np.asarray(leaf)) for leaf in jax.tree.leaves(tree)))


def _evaluate(embed_fn, passages, queries, documents, reference=None):
    """Retrieval metrics and passage embeddings, plus fidelity against ``reference``."""
    embeddings = np.asarray(embed_fn(passages), np.float32)
    results = corpus_lib.retrieval_metrics(embed_fn(queries), embed_fn(documents))
    if reference is not None:
        results["fidelity"] = corpus_lib.fidelity(reference, embeddings)
    return results, embeddings


def _write_json(path: Path, value: Any) -> None:
    """Writes JSON atomically (`experiments.checkpoints.write_atomically`)."""
    checkpoints.write_atomically(str(path), json.dumps(value, indent=2) + "\n")


def _check_workdir(workdir: Any) -> Path:
    if not isinstance(workdir, (str, os.PathLike)) or not str(workdir):
        raise ValueError(f"workdir must be a folder path, got {workdir!r}")
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"workdir={str(workdir)!r} is a file, not a folder")
    return path


def compress(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> CompressResult:
    """Compresses the config's model and writes it, its embeddings and a report to ``workdir``.

    Every value is checked (`check_config`, then the layer selections and shapes against the
    loaded model) before anything is written.

    Args:
      config: a compression config (``configs/compress_minilm.py``).
      workdir: the output folder (created; files of an earlier run are replaced).

    Returns:
      A `CompressResult`.

    Raises:
      ValueError: naming the config key (or ``workdir``) of a bad value.
    """
    plan = check_config(config)
    workdir = _check_workdir(workdir)
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    # One tick per phase and per pruned transformer layer; the total is known after loading.
    bar = tqdm(total=None, disable=not plan.progress_bar, unit="phase")

    @contextlib.contextmanager
    def phase(name: str, key: str | None = None) -> Iterator[None]:
        bar.set_description(name)
        began = time.perf_counter()
        yield
        key = key or name
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - began
        bar.update(1)

    try:
        with phase("load"):
            try:
                model, params, tokenizer = pretrained.load(plan.model)
            except ValueError as error:
                raise ValueError(f"model.name={plan.model!r}: {error}") from None
            names = pretrained.dense_layer_names(model.config)
            prune_layers, factorize_layers = _check_against_model(plan, model, params, names)
            passages = corpus_lib.evaluation_passages()
            queries, documents = corpus_lib.retrieval_task()
            for key, value, total in (
                ("evaluation.passages", plan.evaluation_passages, len(passages)),
                ("evaluation.topics", plan.evaluation_topics, len(queries)),
            ):
                if value > total:
                    raise ValueError(f"{key}={value} exceeds the {total} there are (0 means all)")
            blocks = {n.split("/")[1] for n in prune_layers}
            bar.total = 5 + plan.factorizes + len(blocks) + bool(plan.heal_steps)
            bar.refresh()

        with phase("calibration"):
            ids = jnp.asarray(
                corpus_lib.calibration_ids(
                    tokenizer,
                    n=plan.calibration_sequences,
                    length=plan.calibration_length,
                    seed=plan.calibration_seed,
                )
            )

        spec: dict[str, dict[str, Any]] = {}
        compressed_model, compressed = model, params
        if plan.factorizes:
            with phase("factorize"):
                spec = {
                    n: {"format": plan.factorize_format, "rank": plan.factorize_budget}
                    for n in factorize_layers
                }
                compressed_model = pretrained.BertModel(model.config, factorize=spec)
                compressed = tensornets.factorize_params(params, models_lib.factorize_spec(spec))
                jax.block_until_ready(compressed)

        prune_errors: dict[str, float] = {}
        if plan.prunes:
            compressed, _, prune_errors = _prune(
                compressed_model,
                compressed,
                ids,
                plan,
                prune_layers,
                lambda block: phase(f"prune {block}", "prune"),
            )
        heal: dict[str, Any] = {"steps": 0}
        if plan.heal_steps:
            with phase("heal"):
                compressed, heal = _heal(
                    plan, compressed_model, compressed, model, params, tokenizer
                )

        if plan.evaluation_passages:
            passages = corpus_lib.evaluation_passages(n=plan.evaluation_passages)
        k = plan.evaluation_topics or len(queries)
        queries, documents = queries[:k], documents[:k]
        batch = plan.evaluation_batch_size
        with phase("evaluate dense", "evaluate_dense"):
            dense, dense_embeddings = _evaluate(
                lambda s: pretrained.embed(model, params, tokenizer, s, batch_size=batch),
                passages,
                queries,
                documents,
            )
        with phase("evaluate compressed", "evaluate_compressed"):
            result, embeddings = _evaluate(
                lambda s: pretrained.embed(
                    compressed_model, compressed, tokenizer, s, batch_size=batch
                ),
                passages,
                queries,
                documents,
                reference=dense_embeddings,
            )

        with phase("save"):
            workdir.mkdir(parents=True, exist_ok=True)
            folder = pretrained.save(
                compressed, workdir / _MODEL_FOLDER, like=plan.model, factorize=spec
            )
            np.savez(workdir / _EMBEDDINGS, dense=dense_embeddings, compressed=embeddings)
            saved = (
                tensornets.densify_params(compressed, models_lib.factorize_spec(spec))
                if spec
                else compressed
            )
            zeros = count_zeros(saved, names)
    finally:
        bar.close()
    seconds["total"] = time.perf_counter() - start

    pruned_zeros = sum(zeros[n]["zeros"] for n in prune_layers)
    pruned_size = sum(zeros[n]["size"] for n in prune_layers)
    all_zeros = sum(z["zeros"] for z in zeros.values())
    all_size = sum(z["size"] for z in zeros.values())
    report = {
        "model": plan.model,
        "saved_model": folder.name,
        "compressed": result,
        "dense": dense,
        "evaluation": {
            "passages": len(passages),
            "retrieval_topics": len(queries),
            "batch_size": batch,
        },
        "sparsity": {
            "pruned_layers": prune_layers,
            "pruned_layers_sparsity": pruned_zeros / pruned_size if pruned_size else 0.0,
            "projections_sparsity": all_zeros / all_size,
            "kernels": zeros,
        },
        "prune_errors": prune_errors,
        "factorize": {
            "layers": factorize_layers,
            "spec": spec,
        },
        "heal": heal,
        "params": {
            "dense": _size(params),
            "compressed": _size(compressed),
            "compressed_nonzero": _nonzero(compressed),
        },
        "time_s": seconds,
        "corpus": corpus_lib.corpus_info(),
        "versions": {"jax": jax.__version__, "python": sys.version.split()[0]},
        "config": config.to_dict(),
    }
    _write_json(workdir / _REPORT, report)
    return CompressResult(report, compressed_model, compressed, spec)


# --- Command line -------------------------------------------------------------------------


# As experiments.main: bad input, nothing written.
EXIT_BAD_INPUT = 2


def _fail(message: str, status: int = EXIT_BAD_INPUT) -> NoReturn:
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"error: {one_line}", file=sys.stderr)
    sys.exit(status)


def main(argv: Sequence[str]) -> None:
    """The command line (after `experiments.main.parse_flags`): runs `compress` and prints a
    one-line summary; a bad value ends the program with one ``error:`` line, status 2."""
    # experiments.main defines the flags this command shares (--config, --workdir) when it is
    # imported, so it is imported only here: a process that imports this module for
    # `compress` itself (a test, a notebook) keeps its flag namespace to itself.
    from experiments import main as main_lib  # noqa: PLC0415

    FLAGS = main_lib.FLAGS
    if len(argv) > 1:
        _fail(f"unexpected arguments: {list(argv[1:])}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        logging.info("Config:\n%s", FLAGS.config)
        report = compress(FLAGS.config, FLAGS.workdir).report
    except ValueError as error:
        logging.info("Refused", exc_info=True)
        _fail(str(error))
    summary = {
        "fidelity": report["compressed"].get("fidelity"),
        "recall@1": report["compressed"]["recall@1"],
        "dense recall@1": report["dense"]["recall@1"],
        "mrr": report["compressed"]["mrr"],
        "dense mrr": report["dense"]["mrr"],
        "pruned sparsity": report["sparsity"]["pruned_layers_sparsity"],
        "params": report["params"]["compressed"],
        "seconds": report["time_s"]["total"],
        "saved": str(Path(FLAGS.workdir) / report["saved_model"]),
    }
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})


if __name__ == "__main__":
    from experiments import main as main_lib

    app.run(main, flags_parser=main_lib.parse_flags)
