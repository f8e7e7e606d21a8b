"""Helpers shared by the tensor-format tests: errors, noisy low-rank inputs, random tensors."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

RTOL = 1e-4  # relative Frobenius error allowed for float32 "exact" reconstructions


def rel_err(a, b) -> float:
    """||a - b||_F / ||b||_F in float64 (a zero ``b`` counts as norm 1e-30)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def add_noise(x: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` plus Gaussian noise whose RMS is ``noise`` times the RMS of ``x``, as float32."""
    x = x + noise * np.linalg.norm(x) / np.sqrt(x.size) * rng.standard_normal(x.shape)
    return x.astype(np.float32)


@st.composite
def gaussian_tensors(draw, max_dim: int, max_ndim: int) -> np.ndarray:
    """Standard normal float32 tensors of 1 to ``max_ndim`` modes of sizes 1 to ``max_dim``."""
    shape = tuple(draw(st.lists(st.integers(1, max_dim), min_size=1, max_size=max_ndim)))
    seed = draw(st.integers(0, 2**16))
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
