"""The plan of a compression run: a `configs/compress_minilm.py`-style config, validated.

`check_config` turns the config into a `CompressPlan` (every value checked, a ValueError naming
the key otherwise) before `experiments.compress` loads anything; `select_projections` resolves
the layer selections ("all", "attention", "mlp" or globs over projection paths);
`parse_pattern` and `parse_block_structure` read "N:M" and "RxC".
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from experiments.pretrained.distill import LAYER_GROUPS

__all__ = [
    "FACTORIZE_FORMATS",
    "PRUNE_METHODS",
    "CompressPlan",
    "check_config",
    "parse_block_structure",
    "parse_pattern",
    "select_projections",
]

PRUNE_METHODS = ("none", "magnitude", "wanda", "sparsegpt")
FACTORIZE_FORMATS = ("none", "low_rank", "tucker", "tt_matrix")
# Block-structured pruning ranks blocks by these scores.
_BLOCK_METHODS = ("magnitude", "wanda")


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
            # A group names paths relative to "encoder/layer_{i}/" (`distill.LAYER_GROUPS`).
            matched = [n for n in names if n.split("/", 2)[-1] in LAYER_GROUPS[term]]
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
