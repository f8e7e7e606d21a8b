"""Tubal algebra: the t-product, t-SVD, tubal rank, and the truncated t-SVD format.

Reference: Kilmer & Martin 2011, "Factorization strategies for third-order
tensors" (Linear Algebra Appl.); used for layers by Newman, Horesh, Avron &
Kilmer 2018, "Stable Tensor Neural Networks for Rapid Deep Learning".

A third-order tensor A of shape (n1, n2, n3) is an n1 x n2 matrix whose entries
are tubes (vectors of length n3), multiplied by circular convolution. The
t-product C = A * B of A (n1, n2, n3) and B (n2, n4, n3) is
  C[i, k, :] = sum_j circconv(A[i, j, :], B[j, k, :]),
which the DFT along mode 3 turns into one matrix product per frontal face:
  C_hat[:, :, f] = A_hat[:, :, f] @ B_hat[:, :, f].
Under it, the identity is the tensor whose first frontal slice is I and others 0;
the transpose A^T transposes every frontal slice and reverses slices 2..n3; the
algebra is associative. The t-SVD is A = U * S * V^T with orthogonal U, V and an
f-diagonal S: the SVD of each Fourier face. The tubal rank is the number of
nonzero singular tubes (the largest rank of a face), and keeping the k largest
singular values of every face gives the best tubal-rank-k approximation in the
Frobenius norm (Kilmer & Martin, Theorem 4.3).

Real inputs use the real FFT: faces 0 .. n3//2 carry everything, the others are
their complex conjugates. Faces 0 (and n3/2 when n3 is even) are real, and are
factorized with a real SVD so the factors stay real after the inverse transform.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from tensornets.formats import validation
from tensornets.formats.single_rank import SingleRank, resolve_single_rank

__all__ = [
    "Tubal",
    "t_identity",
    "t_product",
    "t_svd",
    "t_transpose",
    "tubal_rank",
]


def _check3(a: jax.Array, name: str):
    if a.ndim < 3:
        raise ValueError(f"{name} must have shape (..., n1, n2, n3), got {a.shape}")


@jax.jit
def t_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """t-product A * B: facewise matmul in the Fourier domain of mode 3.

    Args:
      a: (..., n1, n2, n3).
      b: (..., n2, n4, n3).

    Returns:
      (..., n1, n4, n3), real.
    """
    _check3(a, "a")
    _check3(b, "b")
    if a.shape[-2] != b.shape[-3] or a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"t_product needs a (n1, n2, n3) and b (n2, n4, n3), got {a.shape} and {b.shape}"
        )
    n3 = a.shape[-1]
    c_hat = jnp.einsum("...ijf,...jkf->...ikf", jnp.fft.rfft(a, axis=-1), jnp.fft.rfft(b, axis=-1))
    return jnp.fft.irfft(c_hat, n=n3, axis=-1).astype(jnp.result_type(a, b))


@jax.jit
def t_transpose(a: jax.Array) -> jax.Array:
    """A^T: transpose each frontal slice, then reverse the order of slices 2..n3.

    Args:
      a: (..., n1, n2, n3).

    Returns:
      (..., n2, n1, n3).
    """
    _check3(a, "a")
    at = jnp.swapaxes(a, -3, -2)
    return jnp.concatenate([at[..., :1], at[..., :0:-1]], axis=-1)


@functools.partial(jax.jit, static_argnames=("n", "n3", "dtype"))
def t_identity(n: int, n3: int, dtype=jnp.float32) -> jax.Array:
    """Identity of the t-product: first frontal slice I_n, the others zero. (n, n, n3)."""
    eye = jnp.zeros((n, n, n3), dtype)
    return eye.at[:, :, 0].set(jnp.eye(n, dtype=dtype))


def _faces(a: jax.Array) -> jax.Array:
    """rfft along mode 3, faces first: (nf, n1, n2) complex."""
    return jnp.moveaxis(jnp.fft.rfft(a, axis=-1), -1, 0)


def _real_faces(n3: int) -> tuple[int, ...]:
    return (0, n3 // 2) if n3 % 2 == 0 and n3 > 1 else (0,)


def _face_svd(a: jax.Array):
    """SVD of every Fourier face; real faces (DC, Nyquist) by a real SVD."""
    n3 = a.shape[-1]
    faces = _faces(a)
    u, s, vh = jnp.linalg.svd(faces, full_matrices=False)
    for f in _real_faces(n3):
        ur, sr, vhr = jnp.linalg.svd(faces[f].real, full_matrices=False)
        u = u.at[f].set(ur.astype(u.dtype))
        s = s.at[f].set(sr)
        vh = vh.at[f].set(vhr.astype(vh.dtype))
    return u, s, vh


@functools.partial(jax.jit, static_argnames=("rank",))
def _truncated_t_svd(a: jax.Array, rank: int | None):
    n3 = a.shape[-1]
    out_dtype = a.dtype if jnp.issubdtype(a.dtype, jnp.floating) else jnp.float32
    a = a.astype(jnp.result_type(a.dtype, jnp.float32))
    u, s, vh = _face_svd(a)
    if rank is not None:
        u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    v = jnp.conj(jnp.swapaxes(vh, -1, -2))  # (nf, n2, k)

    def back(x_hat):  # (nf, ..., ) faces-first -> tubes last, real
        return jnp.fft.irfft(jnp.moveaxis(x_hat, 0, -1), n=n3, axis=-1).astype(out_dtype)

    return back(u), back(s.astype(u.dtype)), back(v)


def t_svd(a: jax.Array):
    """Economy t-SVD A = U * diag(s) * V^T.

    Args:
      a: (n1, n2, n3) real.

    Returns:
      ``(u, s, v)``: u (n1, k, n3) and v (n2, k, n3) orthogonal under the t-product
      (U^T * U = identity), s (k, n3) the singular tubes, k = min(n1, n2).
    """
    _check3(a, "a")
    return _truncated_t_svd(a, None)


@functools.partial(jax.jit, static_argnames=("rtol",))
def tubal_rank(a: jax.Array, rtol: float | None = None) -> jax.Array:
    """Number of nonzero singular tubes: the largest matrix rank of a Fourier face.

    Args:
      a: (n1, n2, n3).
      rtol: singular values below ``rtol * largest`` count as zero (default
        ``max(n1, n2) * eps``, as ``jnp.linalg.matrix_rank``).

    Returns:
      int32 scalar (jit-able).
    """
    _check3(a, "a")
    dtype = jnp.result_type(a.dtype, jnp.float32)
    s = jnp.linalg.svd(_faces(a.astype(dtype)), compute_uv=False)
    if rtol is None:
        rtol = max(a.shape[-3], a.shape[-2]) * jnp.finfo(dtype).eps
    return jnp.max(jnp.sum(s > rtol * jnp.max(s), axis=-1)).astype(jnp.int32)


@flax.struct.dataclass
class Tubal(SingleRank):
    """A third-order tensor as a truncated t-SVD, A = U * diag(s) * V^T.

    Attributes:
      u: (n1, k, n3) left singular lateral slices.
      s: (k, n3) singular tubes.
      v: (n2, k, n3) right singular lateral slices.
    """

    u: jax.Array
    s: jax.Array
    v: jax.Array

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.u.shape[0]), int(self.v.shape[0]), int(self.u.shape[-1]))

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    @staticmethod
    def num_params_for(shape, rank: int) -> int:
        """(n1 + n2 + 1) * k * n3."""
        n1, n2, n3 = shape
        return (n1 + n2 + 1) * rank * n3

    @classmethod
    def resolve_rank(cls, shape: Any, rank: Any) -> int:
        """An int tubal rank in [1, min(n1, n2)], from an int or a float fraction.

        Raises:
          ValueError: for a rank <= 0 or above min(n1, n2), or a shape that is not 3-d.
        """
        shape = validation.check_shape(shape)
        if len(shape) != 3:
            raise ValueError(f"a tubal tensor is 3-d (n1, n2, n3), got shape {shape}")
        return resolve_single_rank(
            shape,
            rank,
            min(shape[0], shape[1]),
            lambda r: cls.num_params_for(shape, r),
            what=f"shape {shape}",
            bound_name="min(n1, n2)",
        )

    def _hat(self):
        return _faces(self.u), jnp.fft.rfft(self.s, axis=-1).T, _faces(self.v)

    def to_dense(self) -> jax.Array:
        """A = U * diag(s) * V^T, shape (n1, n2, n3)."""
        u, s, v = self._hat()
        a_hat = jnp.einsum("fik,fk,fjk->fij", u, s, jnp.conj(v))
        return jnp.fft.irfft(jnp.moveaxis(a_hat, 0, -1), n=self.shape[2], axis=-1).astype(
            self.u.dtype
        )

    @classmethod
    def from_dense(cls, a: jax.Array, rank: Any) -> Tubal:
        """Truncated t-SVD: the best tubal-rank-k approximation (jit-able, rank static).

        Args:
          a: (n1, n2, n3) real.
          rank: int k in [1, min(n1, n2)], or a float fraction (0, 1] of a.size.

        Raises:
          ValueError: for a rank out of range, or an ``a`` that is not real floating or
            holds NaN/inf (checked when concrete).
        """
        a = jnp.asarray(a)
        validation.check_dense_input(a, "a")
        rank = cls.resolve_rank(a.shape, rank)
        u, s, v = _truncated_t_svd(a, rank)
        return cls(u=u, s=s, v=v)

    def to_params(self) -> dict[str, jax.Array]:
        return {"u": self.u, "s": self.s, "v": self.v}

    @classmethod
    def from_params(cls, params: dict[str, jax.Array]) -> Tubal:
        return cls(u=params["u"], s=params["s"], v=params["v"])

    def apply(self, x: jax.Array, method: str = "factorized") -> jax.Array:
        """t-product A * X without forming A: U * (diag(s) * (V^T * X)), facewise.

        Args:
          x: (n2, m, n3).
          method: "factorized" (default) or "dense" (form A, then one t-product).

        Returns:
          (n1, m, n3).
        """
        n1, n2, n3 = self.shape
        if x.ndim != 3 or x.shape[0] != n2 or x.shape[2] != n3:
            raise ValueError(f"x must have shape ({n2}, m, {n3}), got {x.shape}")
        if method == "dense":
            return t_product(self.to_dense(), x)
        if method != "factorized":
            raise ValueError(f"method must be 'factorized' or 'dense', got {method!r}")
        u, s, v = self._hat()
        y_hat = jnp.einsum("fik,fk,fjk,fjm->fim", u, s, jnp.conj(v), _faces(x))
        return jnp.fft.irfft(jnp.moveaxis(y_hat, 0, -1), n=n3, axis=-1).astype(
            jnp.result_type(self.u, x)
        )

    def apply_costs(self, m: int) -> dict[str, int]:
        """Estimated real FLOPs of `apply` on (n2, m, n3): both methods.

        Real FFTs of length n3 count 2.5 n3 log2 n3 each; a complex multiply-add 8.
        """
        n1, n2, n3 = self.shape
        k, nf = self.rank, n3 // 2 + 1
        fft = lambda tubes: int(tubes * 2.5 * n3 * max(math.log2(n3), 1.0))
        io = fft(n2 * m) + fft(n1 * m)
        factorized = io + fft((n1 + n2 + 1) * k) + 8 * nf * m * k * (n1 + n2) + 2 * nf * m * k
        # dense: U, s, V to the Fourier domain, faces of A, back (A is real), then the
        # t-product A * X transforms A again.
        reconstruct = fft((n1 + n2 + 1) * k) + 8 * nf * n1 * n2 * k + fft(n1 * n2)
        dense = reconstruct + io + fft(n1 * n2) + 8 * nf * n1 * n2 * m
        return {"factorized": factorized, "dense": dense}

    def flops(self, m: int, method: str = "factorized") -> int:
        return self.apply_costs(m)[method]
