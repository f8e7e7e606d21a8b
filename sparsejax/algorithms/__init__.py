"""Sparse-training algorithms and their registry, by name.

    algo = sparsejax.algorithms.get("rigl", sparsity=0.9, end_step=7500)
    tx = sparsejax.transforms.masked(optax.adam(1e-3), algo)

Algorithms are immutable dataclasses of static hyperparameters; `Algorithm` lists
every hook a trainer may call. Configs name them by string and never hold
callables: `register` adds a name (other packages register theirs when imported,
e.g. ``import tensornets`` adds ``spectral_truncation`` and ``greedy_growth``),
`get` and `from_config` build one.
"""

from __future__ import annotations

from sparsejax.algorithms.base import (
    Algorithm,
    Dense,
    NMAlgorithm,
    SparseAlgorithm,
    from_config,
    get,
    names,
    register,
)
from sparsejax.algorithms.dst import SET, RigL, Static
from sparsejax.algorithms.nm_bimask import BiMask
from sparsejax.algorithms.nm_decay import NMDecay, NMOneShot
from sparsejax.algorithms.nm_ste import NMSTE, SRSTE, SSTE
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
    "NMAlgorithm",
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
    "register",
]

register("dense", Dense)
register("magnitude", Prune, score="magnitude")
register("random", Prune, score="random")
register("snip", Prune, score="saliency", schedule="one_shot", begin_step=0)
register("static", Static)
register("set", SET)
register("rigl", RigL)
register("snfs", SNFS)
register("ste", STE)
register("grasp", PruneAtInit, score="grasp", rounds=1)
register("synflow", PruneAtInit, score="synflow", rounds=100)
register("nm_ste", NMSTE)
register("sr_ste", SRSTE)
register("s_ste", SSTE)
register("nm_decay", NMDecay)
register("nm_oneshot", NMOneShot)
register("bimask", BiMask)
register("srigl", SRigL)
