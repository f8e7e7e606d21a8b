"""Interleaved timing shared by the benchmark scripts (imported as a sibling module: running
``python benchmarks/x.py`` puts this folder first on ``sys.path``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def time_interleaved(fns: dict[str, Callable[[], object]], iters: int, rounds: int) -> dict:
    """Median over rounds of the per-round median time (seconds) of each callable.

    Every callable runs twice first (compilation, warm caches); then each round calls them
    in turn ``iters`` times, so machine noise hits all of them alike.
    """
    for f in fns.values():
        for _ in range(2):
            jax.block_until_ready(f())
    per_round: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(iters):
            for k, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f())
                samples[k].append(time.perf_counter() - t0)
        for k in fns:
            per_round[k].append(statistics.median(samples[k]))
    return {k: statistics.median(v) for k, v in per_round.items()}
