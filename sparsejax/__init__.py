"""sparsejax: sparse training in JAX as pure functions over pytrees and one optax transform."""

from sparsejax import algorithms
from sparsejax import distributions
from sparsejax import masks
from sparsejax import schedules
from sparsejax import scores
from sparsejax import transforms

__all__ = [
    "algorithms",
    "distributions",
    "masks",
    "schedules",
    "scores",
    "transforms",
]
