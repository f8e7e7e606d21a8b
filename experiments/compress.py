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
   already compressed, so the result is that of one sequential call), or by whole blocks
   (`prune_blocks`);
4. heal by distillation to the dense model's embeddings (`experiments.pretrained.distill`,
   imported only when ``heal.steps > 0``; it trains the factorized projections);
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
import fnmatch
import json
import math
import numbers
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, logging
from tqdm import tqdm

import tensornets
from experiments import main as main_lib
from experiments import models as models_lib
from experiments import pretrained
from experiments.pretrained import corpus as corpus_lib
from experiments.pretrained import distill
from sparsejax import masks as masks_lib
from sparsejax import posttrain

__all__ = [
    "FACTORIZE_FORMATS",
    "LAYER_GROUPS",
    "PRUNE_METHODS",
    "CompressPlan",
    "CompressResult",
    "check_config",
    "compress",
    "count_zeros",
    "main",
    "parse_block_structure",
    "parse_pattern",
    "prune_blocks",
    "select_projections",
]

PyTree = Any
FLAGS = main_lib.FLAGS

PRUNE_METHODS = ("none", "magnitude", "wanda", "sparsegpt")
FACTORIZE_FORMATS = ("none", "low_rank", "tucker", "tt_matrix")
# Which projections a group name selects, as a test on the projection's path.
LAYER_GROUPS: dict[str, Callable[[str], bool]] = {
    "all": lambda name: True,
    "attention": lambda name: "/attention/" in name,
    "mlp": lambda name: "/attention/" not in name,
}
# Block-structured pruning ranks blocks by these scores.
_BLOCK_METHODS = ("magnitude", "wanda")
_MODEL_FOLDER = "model"
_REPORT = "report.json"
_EMBEDDINGS = "embeddings.npz"


class CompressPlan(NamedTuple):
    """A config's values, checked and parsed (`check_config`).

    Attributes:
      model: the checkpoint folder or model name.
      method: a `PRUNE_METHODS` entry.
      sparsity: fraction pruned per layer (of entries, or of blocks with ``block_shape``).
      n, m: the N:M pattern, or None.
      dsnot: refine masks with DSnoT.
      block_shape: ``(rows, cols)`` of the blocks pruned as units, or None.
      prune_layers: the ``prune.layers`` selection (resolved against the model later).
      calibration_sequences, calibration_length, calibration_seed: the calibration windows.
      block_depth: layers whose paths share this many leading names are calibrated together
        (`sparsejax.posttrain.prune_model`'s ``block_depth``); None: layer by layer.
      factorize_format: a `FACTORIZE_FORMATS` entry.
      factorize_budget: parameters of each factorized kernel over its dense size.
      factorize_layers: the ``factorize.layers`` selection.
      heal_steps, heal_learning_rate, heal_batch_size: the distillation.
      evaluation_passages, evaluation_topics: 0 for all.
      evaluation_batch_size: sentences per forward pass.
      progress_bar: show a progress bar.
      seed: the distillation's random seed.
    """

    model: str
    method: str
    sparsity: float
    n: int | None
    m: int | None
    dsnot: bool
    block_shape: tuple[int, int] | None
    prune_layers: str
    calibration_sequences: int
    calibration_length: int
    calibration_seed: int
    block_depth: int | None
    factorize_format: str
    factorize_budget: float
    factorize_layers: str
    heal_steps: int
    heal_learning_rate: float
    heal_batch_size: int
    evaluation_passages: int
    evaluation_topics: int
    evaluation_batch_size: int
    progress_bar: bool
    seed: int

    @property
    def prunes(self) -> bool:
        return self.method != "none"

    @property
    def factorizes(self) -> bool:
        return self.factorize_format != "none"


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


def _value(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            raise ValueError(f"the config has no key {key!r}")
        node = node[part]
    return node


def _int(config, key: str, minimum: int) -> int:
    value = _value(config, key)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _bool(config, key: str) -> bool:
    value = _value(config, key)
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{key} must be True or False, got {value!r}")
    return bool(value)


def _choice(config, key: str, choices: Sequence[str]) -> str:
    value = _value(config, key)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{key}={value!r} is unknown; known: {list(choices)}")
    return value


def _number(config, key: str) -> float:
    value = _value(config, key)
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
    ):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _selection(config, key: str) -> str:
    value = _value(config, key)
    if not isinstance(value, str) or not [t for t in value.split(",") if t.strip()]:
        raise ValueError(
            f"{key} must be a comma-separated selection such as 'all', 'mlp' or "
            f"'encoder/layer_0/*', got {value!r}"
        )
    return value


def parse_pattern(pattern: Any, key: str = "pattern") -> tuple[int, int] | None:
    """``"N:M"`` -> ``(n, m)``; ``""`` -> None.

    Raises:
      ValueError: naming ``key``, for anything else or ``not 1 <= n <= m``.
    """
    if pattern == "":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ValueError(
            f'{key} must be "N:M" with 1 <= N <= M (e.g. "2:4"), or "" for none; got {pattern!r}'
        )
    return int(match.group(1)), int(match.group(2))


def parse_block_structure(block: Any, key: str = "block_structure") -> tuple[int, int] | None:
    """``"RxC"`` -> ``(r, c)`` with positive ints; ``""`` -> None.

    Raises:
      ValueError: naming ``key``, for anything else.
    """
    if block == "":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", block) if isinstance(block, str) else None
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ValueError(
            f'{key} must be "RxC" with positive R, C (e.g. "32x32"), or "" for none; got {block!r}'
        )
    return int(match.group(1)), int(match.group(2))


def check_config(config: ml_collections.ConfigDict) -> CompressPlan:
    """Checks every value of a compression config (``configs/compress_minilm.py``).

    Args:
      config: the config.

    Returns:
      The `CompressPlan` it describes.

    Raises:
      ValueError: naming the key: a missing key, an unknown ``prune.method`` or
        ``factorize.format``, a ``prune.sparsity`` outside [0, 1), a ``prune.pattern`` that
        is not "N:M", both a sparsity and a pattern, a block structure that is not "RxC" or
        that is combined with a pattern, DSnoT or SparseGPT, a ``factorize.budget`` outside
        (0, 1], a non-positive count, or healing without a factorization.
    """
    model = _value(config, "model.name")
    if not isinstance(model, str) or not model:
        raise ValueError(f"model.name must be a folder path or a model name, got {model!r}")
    method = _choice(config, "prune.method", PRUNE_METHODS)
    sparsity = _number(config, "prune.sparsity")
    if not 0 <= sparsity < 1:
        raise ValueError(f"prune.sparsity must be in [0, 1), got {sparsity!r}")
    nm = parse_pattern(_value(config, "prune.pattern"), "prune.pattern")
    if nm is not None and sparsity > 0:
        raise ValueError(
            f"give prune.sparsity or prune.pattern, not both: got prune.sparsity={sparsity!r} "
            f"and prune.pattern={_value(config, 'prune.pattern')!r} (set prune.sparsity=0 for "
            f"a pattern)"
        )
    dsnot = _bool(config, "prune.dsnot")
    block_shape = parse_block_structure(
        _value(config, "prune.block_structure"), "prune.block_structure"
    )
    if block_shape is not None and method != "none":
        if nm is not None:
            raise ValueError(
                "prune.block_structure and prune.pattern exclude each other: blocks are kept "
                f"or dropped whole; got {config.prune.block_structure!r} and "
                f"{config.prune.pattern!r}"
            )
        if method not in _BLOCK_METHODS:
            raise ValueError(
                f"prune.block_structure needs prune.method in {list(_BLOCK_METHODS)} (block "
                f"scores), got prune.method={method!r}"
            )
        if dsnot:
            raise ValueError("prune.dsnot swaps single weights; it cannot refine block masks")
    fmt = _choice(config, "factorize.format", FACTORIZE_FORMATS)
    budget = _number(config, "factorize.budget")
    if not 0 < budget <= 1:
        raise ValueError(
            f"factorize.budget must be a fraction in (0, 1] of each kernel's parameters, "
            f"got {budget!r}"
        )
    heal_steps = _int(config, "heal.steps", 0)
    learning_rate = _number(config, "heal.learning_rate")
    if learning_rate <= 0:
        raise ValueError(f"heal.learning_rate must be positive, got {learning_rate!r}")
    if heal_steps and fmt == "none":
        raise ValueError(
            f"heal.steps={heal_steps} needs factorize.format other than 'none': the "
            f"distillation trains the factorized projections (pruned kernels would lose their "
            f"zeros)"
        )
    return CompressPlan(
        model=model,
        method=method,
        sparsity=sparsity,
        n=None if nm is None else nm[0],
        m=None if nm is None else nm[1],
        dsnot=dsnot,
        block_shape=block_shape,
        prune_layers=_selection(config, "prune.layers"),
        calibration_sequences=_int(config, "calibration.sequences", 1),
        calibration_length=_int(config, "calibration.length", 3),
        calibration_seed=_int(config, "calibration.seed", 0),
        block_depth=_int(config, "calibration.block_depth", 0) or None,
        factorize_format=fmt,
        factorize_budget=budget,
        factorize_layers=_selection(config, "factorize.layers"),
        heal_steps=heal_steps,
        heal_learning_rate=learning_rate,
        heal_batch_size=_int(config, "heal.batch_size", 1),
        evaluation_passages=_int(config, "evaluation.passages", 0),
        evaluation_topics=_int(config, "evaluation.topics", 0),
        evaluation_batch_size=_int(config, "evaluation.batch_size", 1),
        progress_bar=_bool(config, "progress_bar"),
        seed=_int(config, "seed", 0),
    )


def select_projections(selection: str, names: Sequence[str], key: str = "layers") -> list[str]:
    """The projections a comma-separated selection names, in call order.

    Args:
      selection: terms separated by commas, each ``"all"``, ``"attention"`` (query, key,
        value, attention output), ``"mlp"`` (intermediate and output), or a glob over
        projection paths (``"encoder/layer_0/*"``).
      names: the model's projections in call order (`experiments.pretrained.dense_layer_names`).
      key: the config key, for messages.

    Returns:
      The selected names, in the order of ``names``.

    Raises:
      ValueError: naming ``key``, when a term matches no projection.
    """
    chosen: set[str] = set()
    for term in (t.strip() for t in selection.split(",")):
        if not term:
            continue
        if term in LAYER_GROUPS:
            matched = [n for n in names if LAYER_GROUPS[term](n)]
        else:
            matched = fnmatch.filter(names, term)
        if not matched:
            raise ValueError(
                f"{key}={selection!r}: {term!r} matches no projection; use "
                f"{sorted(LAYER_GROUPS)} or a glob over paths such as {names[0]!r}"
            )
        chosen.update(matched)
    return [n for n in names if n in chosen]


# --- Phases -------------------------------------------------------------------------------


def _node(tree: PyTree, name: str) -> PyTree:
    for key in name.split("/"):
        tree = tree[key]
    return tree


def _replace_kernel(tree: PyTree, name: str, kernel: Any) -> PyTree:
    """A copy of nested dict ``tree`` with ``tree[name...]["kernel"] = kernel``."""

    def go(node, keys):
        node = dict(node)
        if keys:
            node[keys[0]] = go(node[keys[0]], keys[1:])
        else:
            node["kernel"] = kernel
        return node

    return go(tree, name.split("/"))


def _relative_error(x: jax.Array, kernel: jax.Array, pruned: jax.Array) -> float:
    dense = x @ kernel
    return float(jnp.linalg.norm(dense - x @ pruned) / jnp.maximum(jnp.linalg.norm(dense), 1e-30))


def prune_blocks(
    apply_fn: Callable[..., Any],
    params: PyTree,
    ids: jax.Array,
    layers: Sequence[str],
    *,
    method: str,
    sparsity: float,
    block_shape: tuple[int, int],
    block_depth: int | None = None,
) -> posttrain.PruneResult:
    """Drops whole ``block_shape`` blocks of each chosen kernel, in call order.

    Each kernel ``[in, out]`` keeps the ``round((1 - sparsity) * blocks)`` blocks with the
    largest score sums (`sparsejax.masks.block_mask`): ``|W|`` for ``"magnitude"``, the Wanda
    score ``|W_ij| * ||X_i||`` for ``"wanda"``, X being the layer's inputs in the model whose
    earlier layers are already pruned, calibrated as `sparsejax.posttrain.prune_model` does
    (``block_depth`` included). Whole blocks are what `sparsejax.export` stores as BSR
    without padding.

    Reference: Gray, Radford & Kingma, "GPU Kernels for Block-Sparse Weights" (2017) for the
    format; Sun et al., "A Simple and Effective Pruning Approach for Large Language Models"
    (Wanda, 2024) for the score.

    Args:
      apply_fn: ``model.apply``.
      params: the model's params.
      ids: int32 [batch, tokens] calibration inputs.
      layers: the Dense projections to prune (paths), in call order.
      method: ``"magnitude"`` or ``"wanda"``.
      sparsity: fraction of blocks dropped per kernel, in [0, 1).
      block_shape: ``(rows, cols)`` dividing each kernel's shape.
      block_depth: None calibrates each layer on the outputs of every pruned layer before it;
        an int calibrates consecutive layers whose paths share their first ``block_depth``
        names in one forward pass (as `sparsejax.posttrain.prune_model`).

    Returns:
      A `sparsejax.posttrain.PruneResult` (params, masks, relative output errors).

    Raises:
      ValueError: for another method or a bad ``block_depth``, or a block shape that does
        not divide a kernel (naming the layer).
    """
    if method not in _BLOCK_METHODS:
        raise ValueError(f"method must be one of {_BLOCK_METHODS}, got {method!r}")
    if block_depth is not None and (
        isinstance(block_depth, bool) or not isinstance(block_depth, int) or block_depth < 1
    ):
        raise ValueError(f"block_depth must be None or a positive int, got {block_depth!r}")
    masks = jax.tree.map(lambda _: None, params)
    errors = {}
    # Consecutive layers sharing their first block_depth path names are calibrated together.
    groups: list[list[str]] = []
    for name in layers:
        same = block_depth and groups
        if same and groups[-1][-1].split("/")[:block_depth] == name.split("/")[:block_depth]:
            groups[-1].append(name)
        else:
            groups.append([name])
    for group in groups:
        paths = [tuple(name.split("/")) for name in group]
        captured = posttrain.capture_inputs(apply_fn, {"params": params}, ids, paths)
        for name, path in zip(group, paths):
            kernel = _node(params, name)["kernel"]
            x = captured[path].reshape(-1, captured[path].shape[-1]).astype(jnp.float32)
            if method == "magnitude":
                scores = jnp.abs(kernel)
            else:
                scores = posttrain.wanda_scores(kernel, x)
            try:
                mask = masks_lib.block_mask(scores, sparsity, block_shape)
            except ValueError as error:
                raise ValueError(f"layer {name!r} of shape {kernel.shape}: {error}") from None
            pruned = jnp.where(mask, kernel, jnp.zeros_like(kernel))
            errors[name] = _relative_error(
                x, kernel.astype(jnp.float32), pruned.astype(jnp.float32)
            )
            params = _replace_kernel(params, name, pruned)
            masks = _replace_kernel(masks, name, mask)
    return posttrain.PruneResult(params, masks, errors)


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
            if plan.block_shape is not None:
                result = prune_blocks(
                    model.apply,
                    params,
                    ids,
                    group,
                    method=plan.method,
                    sparsity=plan.sparsity,
                    block_shape=plan.block_shape,
                    block_depth=plan.block_depth,
                )
            else:
                # One call per transformer layer gives the result of one call over all of them
                # (prune_model is sequential: each layer or block is calibrated on the model
                # whose earlier ones are already pruned), and a progress bar that moves.
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
    """Writes JSON to a temporary sibling, then renames it into place (never half-written)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as f:
            json.dump(value, f, indent=2)
            f.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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


def _fail(message: str, status: int = main_lib.EXIT_BAD_INPUT) -> NoReturn:
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"error: {one_line}", file=sys.stderr)
    sys.exit(status)


def main(argv: Sequence[str]) -> None:
    """The command line (after `experiments.main.parse_flags`): runs `compress` and prints a
    one-line summary; a bad value ends the program with one ``error:`` line, status 2."""
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
    app.run(main, flags_parser=main_lib.parse_flags)
