"""Layouts of factorized weights: the tensor that is factorized, its ranks, its factors.

A `Layout` is the static description of one factorized weight: the tensor that is
factorized, its resolved ranks and the shape of every factor parameter. Every layer
builds one from its hyperparameters and input shape (`dense_layout`, `conv_layout`,
`embed_layout`), declares the factors (`tensornets.layers.params`) and rebuilds the
format object with `format_of`; `factorize_params` resolves the same layout to fit a
trained kernel at the same ranks.

Ranks: an int (a cap per mode / bond), a tuple (one per mode / bond), or a float
meaning a fraction of the dense parameter count (see the formats' ``resolve_*``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax

from tensornets.formats import validation
from tensornets.formats.cp import CP
from tensornets.formats.tt import TT, TTMatrix
from tensornets.formats.tubal import Tubal
from tensornets.formats.tucker import Tucker
from tensornets.layers.spec import canonical_format, check_low_rank_shapes
from tensornets.layers.tubal import default_tube

__all__ = [
    "CP_FORMATS",
    "Layout",
    "balanced_factors",
    "conv_layout",
    "dense_layout",
    "embed_layout",
    "format_of",
]

CP_FORMATS = ("cp", "low_rank")  # "low_rank" is a 2-factor CP of the (in, out) matrix


def balanced_factors(n: int, d: int = 3) -> tuple[int, ...]:
    """Splits ``n`` into ``d`` factors as equal as its prime factors allow, ascending.

    ``balanced_factors(1024, 3) == (8, 8, 16)``; a prime n gives (1, ..., 1, n).
    """
    n = validation.check_int_rank(n, "n")
    d = validation.check_int_rank(d, "d")
    primes, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    bins = [1] * d
    for q in sorted(primes, reverse=True):
        bins[bins.index(min(bins))] *= q
    return tuple(sorted(bins))


class Layout(NamedTuple):
    """Static description of a factorized weight: resolved shapes, ranks, params."""

    format: str
    shape: tuple[int, ...]  # tensor factorized per group (tt_matrix: (M, N))
    n_in: int  # leading input modes of ``shape`` (cp / low_rank / tucker / tt)
    ranks: tuple[int, ...]
    modes: tuple[int, ...] | None  # tucker's factorized modes
    in_shape: tuple[int, ...]  # tt_matrix row factors
    out_shape: tuple[int, ...]  # tt_matrix column factors
    param_shapes: dict[str, tuple[int, ...]]


def _tensor_layout(fmt: str, shape, rank, n_in: int, modes=None) -> Layout:
    if fmt in CP_FORMATS:
        r = CP.resolve_rank(shape, rank)
        params = {"weights": (r,)}
        params.update({f"factor_{n}": (s, r) for n, s in enumerate(shape)})
        return Layout(fmt, shape, n_in, (r,), None, (), (), params)
    if fmt == "tucker":
        modes = tuple(range(len(shape))) if modes is None else tuple(modes)
        ranks = Tucker.resolve_ranks(shape, rank, modes)
        core = list(shape)
        for m, r in zip(modes, ranks):
            core[m] = r
        params = {"core": tuple(core)}
        params.update({f"factor_{k}": (shape[m], r) for k, (m, r) in enumerate(zip(modes, ranks))})
        return Layout(fmt, shape, n_in, ranks, modes, (), (), params)
    if fmt == "tt":
        bonds = TT.resolve_ranks(shape, rank)
        full = (1, *bonds, 1)
        params = {f"core_{k}": (full[k], s, full[k + 1]) for k, s in enumerate(shape)}
        return Layout(fmt, shape, n_in, bonds, None, (), (), params)
    raise AssertionError(fmt)


def _tt_matrix_layout(in_shape, out_shape, rank) -> Layout:
    bonds = TTMatrix.resolve_ranks(in_shape, out_shape, rank)
    full = (1, *bonds, 1)
    params = {
        f"core_{k}": (full[k], m, n, full[k + 1])
        for k, (m, n) in enumerate(zip(in_shape, out_shape))
    }
    shape = (math.prod(in_shape), math.prod(out_shape))
    return Layout("tt_matrix", shape, 1, bonds, None, in_shape, out_shape, params)


def _tubal_layout(n_in, n_out, rank, in_shape, out_shape) -> Layout:
    """(n_in, n_out) kernel as a t-product operator W (n1, n2, n3): in (n2, n3), out (n1, n3)."""
    if in_shape is None and out_shape is None:
        n3 = default_tube(n_in, n_out)
        in_shape, out_shape = (n_in // n3, n3), (n_out // n3, n3)
    elif in_shape is None or out_shape is None:
        raise ValueError(
            f"format 'tubal' needs both in_shape=(n2, n3) and out_shape=(n1, n3) or neither, "
            f"got in_shape={in_shape!r}, out_shape={out_shape!r}"
        )
    in_shape = validation.check_factorization(in_shape, n_in, "in_shape")
    out_shape = validation.check_factorization(out_shape, n_out, "out_shape")
    if len(in_shape) != 2 or len(out_shape) != 2 or in_shape[1] != out_shape[1]:
        raise ValueError(
            f"format 'tubal' needs in_shape=(n2, n3) and out_shape=(n1, n3) with the same tube "
            f"length n3, got in_shape={in_shape}, out_shape={out_shape}"
        )
    (n2, n3), (n1, _) = in_shape, out_shape
    if validation.is_fraction(rank):
        # A fraction of the dense kernel (n_in * n_out = n1 n2 n3^2 entries), as for the
        # other formats, not of the tensor W (n1 n2 n3): capped at full tubal rank.
        budget = validation.check_fraction(rank) * n_in * n_out
        k = validation.uniform_rank_for_budget(
            budget, lambda r: Tubal.num_params_for((n1, n2, n3), r), min(n1, n2)
        )
    else:
        k = Tubal.resolve_rank((n1, n2, n3), rank)
    params = {"u": (n1, k, n3), "s": (k, n3), "v": (n2, k, n3)}
    return Layout("tubal", (n1, n2, n3), 1, (k,), None, in_shape, out_shape, params)


def _matrix_layout(fmt: str, n_in: int, n_out: int, rank, in_shape, out_shape) -> Layout:
    """Layout of a (n_in, n_out) kernel; tt_matrix needs factorized dims."""
    if fmt == "tubal":
        return _tubal_layout(n_in, n_out, rank, in_shape, out_shape)
    if fmt == "low_rank":
        check_low_rank_shapes(in_shape, out_shape)
        return _tensor_layout(fmt, (n_in, n_out), rank, 1)
    if fmt == "tt_matrix":
        if in_shape is None and out_shape is None:
            d = 3
        else:
            d = len(validation.check_shape(in_shape if in_shape is not None else out_shape))
        in_shape = balanced_factors(n_in, d) if in_shape is None else in_shape
        out_shape = balanced_factors(n_out, d) if out_shape is None else out_shape
        in_shape = validation.check_factorization(in_shape, n_in, "in_shape")
        out_shape = validation.check_factorization(out_shape, n_out, "out_shape")
        if len(in_shape) != len(out_shape):
            raise ValueError(
                f"in_shape={in_shape} and out_shape={out_shape} must have the same length "
                "for a TT-matrix (one core per pair)"
            )
        return _tt_matrix_layout(in_shape, out_shape, rank)
    in_shape = (
        (n_in,) if in_shape is None else validation.check_factorization(in_shape, n_in, "in_shape")
    )
    out_shape = (
        (n_out,)
        if out_shape is None
        else validation.check_factorization(out_shape, n_out, "out_shape")
    )
    return _tensor_layout(fmt, in_shape + out_shape, rank, len(in_shape))


def dense_layout(fmt: Any, in_features: int, features: int, rank, in_shape, out_shape) -> Layout:
    """Layout of a dense kernel (in_features, features) in any of the dense formats.

    Args:
      fmt: a format name or alias (see `tensornets.layers.FORMATS`).
      in_features, features: the kernel's shape.
      rank: int, tuple or float fraction of in_features * features.
      in_shape, out_shape: factorizations of the two dimensions, or None for the
        format's default.

    Raises:
      ValueError: for an unknown format, bad ranks or shapes, naming the value.
    """
    fmt = canonical_format(fmt, "dense")
    return _matrix_layout(fmt, in_features, features, rank, in_shape, out_shape)


def conv_layout(fmt: str, kernel_size, c_group: int, f_group: int, rank, in_shape, out_shape):
    """Layout of one group's conv kernel (k_1..k_s, C/g, F/g) (``fmt`` canonical, conv).

    cp: CP of the whole kernel; tucker: Tucker-2 over the two channel modes; tt /
    tt_matrix: the TT-matrix (K, c_1..c_d) x (1, f_1..f_d), K = prod k_i, where
    ``in_shape`` / ``out_shape`` factorize C/g and F/g (default whole).
    """
    s = len(kernel_size)
    if fmt == "cp":
        return _tensor_layout("cp", (*kernel_size, c_group, f_group), rank, s + 1)
    if fmt == "tucker":
        return _tensor_layout("tucker", (*kernel_size, c_group, f_group), rank, s + 1, (s, s + 1))
    # tt / tt_matrix: TT-matrix over (spatial, c_1..c_d) x (1, f_1..f_d)
    in_shape = (c_group,) if in_shape is None else in_shape
    out_shape = (f_group,) if out_shape is None else out_shape
    in_shape = validation.check_factorization(in_shape, c_group, "in_shape")
    out_shape = validation.check_factorization(out_shape, f_group, "out_shape")
    if len(in_shape) != len(out_shape):
        raise ValueError(f"in_shape={in_shape} and out_shape={out_shape} must have the same length")
    return _tt_matrix_layout((math.prod(kernel_size), *in_shape), (1, *out_shape), rank)


def embed_layout(fmt: str, num_embeddings: int, features: int, rank, in_shape, out_shape):
    """Layout of an embedding table (num_embeddings, features): TT-matrix or low_rank.

    ``fmt`` is canonical and one the embedding takes ("tt" means the TT-matrix).
    """
    fmt = "tt_matrix" if fmt == "tt" else fmt
    return _matrix_layout(fmt, num_embeddings, features, rank, in_shape, out_shape)


def format_of(layout: Layout, params: Mapping[str, jax.Array]):
    """The format object (`CP`, `Tucker`, `TT`, `TTMatrix`, `Tubal`) holding ``params``."""
    if layout.format in CP_FORMATS:
        return CP.from_params(params)
    if layout.format == "tucker":
        return Tucker.from_params(params, layout.modes)
    if layout.format == "tt":
        return TT.from_params(params)
    if layout.format == "tubal":
        return Tubal.from_params(params)
    return TTMatrix.from_params(params)
