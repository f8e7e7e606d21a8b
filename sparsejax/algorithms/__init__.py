"""Registry of sparse-training algorithms, by name.

    algo = sparsejax.algorithms.get("rigl", sparsity=0.9, end_step=7500)
    tx = sparsejax.transforms.masked(optax.adam(1e-3), algo)

Algorithms are immutable dataclasses of static hyperparameters (see `base`);
configs name them by string and never hold callables.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from sparsejax.algorithms.base import Algorithm, Dense, SparseAlgorithm
from sparsejax.algorithms.dst import SET, RigL, Static
from sparsejax.algorithms.nm import NMSTE, SRSTE, SSTE, BiMask, NMDecay, NMOneShot
from sparsejax.algorithms.pai import PruneAtInit
from sparsejax.algorithms.pruning import Prune
from sparsejax.algorithms.snfs import SNFS
from sparsejax.algorithms.srigl import SRigL
from sparsejax.algorithms.ste import STE

__all__ = [
    "SET",
    "Algorithm",
    "BiMask",
    "Dense",
    "NMDecay",
    "NMOneShot",
    "NMSTE",
    "Prune",
    "PruneAtInit",
    "RigL",
    "SNFS",
    "SRSTE",
    "SRigL",
    "SSTE",
    "STE",
    "SparseAlgorithm",
    "Static",
    "from_config",
    "get",
    "names",
]

# name -> (class, defaults that distinguish the registered variant).
_REGISTRY: dict[str, tuple[type | str, dict[str, Any]]] = {
    "dense": (Dense, {}),
    "magnitude": (Prune, {"score": "magnitude"}),
    "random": (Prune, {"score": "random"}),
    "snip": (Prune, {"score": "saliency", "schedule": "one_shot", "begin_step": 0}),
    "static": (Static, {}),
    "set": (SET, {}),
    "rigl": (RigL, {}),
    "snfs": (SNFS, {}),
    "ste": (STE, {}),
    "grasp": (PruneAtInit, {"score": "grasp", "rounds": 1}),
    "synflow": (PruneAtInit, {"score": "synflow", "rounds": 100}),
    "nm_ste": (NMSTE, {}),
    "sr_ste": (SRSTE, {}),
    "s_ste": (SSTE, {}),
    "nm_decay": (NMDecay, {}),
    "nm_oneshot": (NMOneShot, {}),
    "bimask": (BiMask, {}),
    "srigl": (SRigL, {}),
    # Rank adaptivity of factorized layers, imported when first used (sparsejax never
    # imports tensornets at import time). Spectral truncation also rotates the params on
    # its update steps, so it runs through tensornets.rank_adaptive (experiments.train
    # picks that transform for it), not masked alone.
    "greedy_growth": ("tensornets.adaptive:GreedyGrowth", {}),
    "spectral_truncation": ("tensornets.adaptive:SpectralTruncation", {}),
}

# Config keys understood by `from_config` beyond the dataclass fields.
_CONFIG_ONLY_KEYS = ("algorithm", "target", "begin_fraction", "end_fraction")


def names() -> list[str]:
    """Sorted names of the registered algorithms."""
    return sorted(_REGISTRY)


def _class(entry: type | str) -> type:
    """The algorithm class of a registry entry ("module:Class" strings are imported lazily)."""
    if isinstance(entry, str):
        module, name = entry.split(":")
        return getattr(importlib.import_module(module), name)
    return entry


def _fields(cls: type | str) -> set[str]:
    return {f.name for f in dataclasses.fields(_class(cls))}


def get(name: str, **kwargs: Any) -> Algorithm:
    """Builds the algorithm registered as ``name`` with hyperparameters ``kwargs``.

    Args:
      name: one of `names()`.
      **kwargs: fields of the algorithm's dataclass (e.g. ``sparsity``,
        ``distribution``, ``end_step``).

    Returns:
      An immutable `Algorithm`.

    Raises:
      ValueError: for an unknown name (listing the known ones), an argument the
        algorithm does not take, or an invalid value.
    """
    if name not in _REGISTRY:
        raise ValueError(f"algorithm={name!r} is unknown; known algorithms: {names()}")
    cls, defaults = _REGISTRY[name]
    cls = _class(cls)
    unknown = sorted(set(kwargs) - _fields(cls))
    if unknown:
        raise ValueError(
            f"algorithm {name!r} takes no argument(s) {unknown}; it takes {sorted(_fields(cls))}"
        )
    return cls(**{**defaults, **kwargs})


def from_config(config: Mapping[str, Any], total_steps: int) -> Algorithm:
    """Builds an algorithm from a config section such as ``config.sparsity``.

    Keys: ``algorithm`` (name), ``target`` (the global sparsity), any field of
    any registered algorithm, and ``begin_fraction`` / ``end_fraction`` which
    set ``begin_step`` / ``end_step`` as fractions of ``total_steps``. Keys that
    belong to other algorithms are ignored (so ``--config.sparsity.algorithm``
    can be switched from the command line); keys no algorithm knows are refused.

    Args:
      config: a mapping (``ml_collections.ConfigDict`` or dict).
      total_steps: training length, for the fractional keys.

    Raises:
      ValueError: for unknown keys or names, or invalid values.
    """
    config = dict(config)
    known = set(_CONFIG_ONLY_KEYS).union(*(_fields(cls) for cls, _ in _REGISTRY.values()))
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(
            f"config.sparsity has unknown key(s) {unknown}; known keys: {sorted(known)}"
        )
    name = config.pop("algorithm", "dense")
    if "target" in config:
        config["sparsity"] = config.pop("target")
    for frac_key, step_key in (("begin_fraction", "begin_step"), ("end_fraction", "end_step")):
        if frac_key in config:
            frac = config.pop(frac_key)
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"config.sparsity.{frac_key} must be in [0, 1], got {frac!r}")
            config.setdefault(step_key, int(round(frac * total_steps)))
    if name not in _REGISTRY:
        raise ValueError(f"algorithm={name!r} is unknown; known algorithms: {names()}")
    cls, _ = _REGISTRY[name]
    accepted = _fields(cls)
    return get(name, **{k: v for k, v in config.items() if k in accepted})
