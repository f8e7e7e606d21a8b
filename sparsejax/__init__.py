"""sparsejax: sparse training in JAX as pure functions over pytrees and one optax transform."""

from sparsejax import algorithms, distributions, masks, schedules, scores, transforms

__all__ = [
    "algorithms",
    "distributions",
    "masks",
    "schedules",
    "scores",
    "transforms",
]
