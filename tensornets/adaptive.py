"""Rank-adaptive training as algorithms of the masked optax transform.

Factorized layers stay at their maximum rank; a rank mask (`tensornets.rank`) says
which components are live and `sparsejax.transforms.masked` keeps the dead ones at
exactly zero. Both algorithms below only change masks (and, for the spectral one,
the basis of the factors), so every step runs one compiled shape, and
`tensornets.rank.compact` turns the result into smaller factors at the end.

`SpectralTruncation` (Schotthöfer, Zangrando, Kusch, Ceruti & Tudisco 2022,
"Low-rank lottery tickets: finding efficient low-rank neural networks via matrix
differential equations" (DLRT); Schotthöfer et al. 2024, "Rank-adaptive spectral
pruning of convolutional layers during training"). A low-rank layer
W = A diag(w) B^T (the ``"low_rank"`` 2-factor CP) is periodically brought to its
singular value form inside jit, with fixed shapes:

  A = Q_A R_A,  B = Q_B R_B            (QR; dead columns are zero)
  R_A diag(w) R_B^T = P S V^T          (SVD of the small r x r core)
  A <- Q_A P,  B <- Q_B V,  w <- diag(S)

so W is unchanged and the components are its singular triplets. The rank is then
cut to the smallest k whose discarded tail satisfies
sqrt(sum_{i >= k} s_i^2) <= tau * ||s||_2 (a relative tolerance, as in DLRT's
truncation step).

The basis change is also applied to the optimizer's moments, so they are carried
over instead of being reset. With G = dL/dW, M = A^T G B (r x r), A' = A T_A and
B' = B T_B (T_A = R_A^{-1} P, T_B = R_B^{-1} V, R restricted to the live
components), the gradients at the new point are linear in those at the old one:

  dL/dA' = dL/dA T_A^{-T} = dL/dA R_A^T P     (no inverse needed)
  dL/dB' = dL/dB R_B^T V
  dL/dw' = diag(T_A^T M T_B)

The last needs M's off-diagonal entries, which dL/dw = diag(M) does not hold; they
are recovered from the factors' gradients, A^T dL/dA = M diag(w) and
B^T dL/dB = M^T diag(w), as M_jk = (w_k (A^T dL/dA)_jk + w_j (B^T dL/dB)_kj) /
(w_j^2 + w_k^2) (keeping only the diagonal, diag(T_A^T diag(dL/dw) T_B), is exact
only when T_A and T_B are one signed permutation: orthonormal factors with distinct
|w|). *First moments* (Adam's ``mu``, momentum traces: linear in the gradients)
follow these maps, which is exact: the moment of a gradient taken at the rotation
point becomes the gradient at the new point, for every leaf of the live
components. *Second moments* (Adam's ``nu``) are elementwise means of squares, and
g' = sum_l c_l g_l has E[g'^2] = sum_l c_l^2 E[g_l^2] only for uncorrelated zero-mean
g_l; an elementwise state holds no covariances, so no map of it is exact in
general. ``nu`` follows every stage of the same maps with squared coefficients
(nu' = sum_l c_l^2 nu_l, the usual diagonal approximation; for dL/dw' first M's
entries, then T_A^T M T_B). That is exact when each new entry draws on one old one
(permutations and diagonal scalings: orthonormal factors with distinct |w|) and an
approximation otherwise, e.g. at the first truncation of randomly initialized
factors. It keeps every term's contribution, so for a single gradient (nu = g^2)
mu'^2 <= K nu', K the product of the stages' term counts (Cauchy-Schwarz): Adam's
first step in the new basis stays bounded.

Tucker layers (every mode factorized, no group axis) get the same treatment with a
truncated HOSVD of the core: QR of every factor, an SVD of every mode-k unfolding of
the small core, factors and core rotated (the core's mode-k slices become
orthogonal, their norms the mode-k singular values), each mode truncated with tau;
there the core's first moments map exactly, dL/dG' = dL/dG x_k T_k^T (when every
component is live), and second moments with squared coefficients as above. TT /
TT-matrix layers go through TT rounding's two sweeps (QR right to left, SVD left to
right) as gauge changes of their bonds, every gauge also applied to the moments
(first moments exactly, second moments with squared coefficients), and each bond is
truncated by its singular values. What is not reproduced: DLRT's K/L/S integrator
with basis augmentation (here the factors are trained directly by the optimizer, so
the rank only decreases).

`GreedyGrowth` (Hashemizadeh, Liu, Miller & Rabusseau 2020/2024, "Adaptive
Learning of Tensor Network Structures"): start every rank axis small and, every
few steps, grow by one component the bond whose growth most reduces the loss,
as long as the factor parameters stay within a budget. A dead component keeps
random values everywhere but on its gate slice (CP's weight, Tucker's core
slice, one side of a TT bond, the tubal ``s``), which is exactly zero
(``gate_only`` rank masks), so growing is function-preserving and the raw
gradient on the dead gate slice g is available to the transform: under gradient
flow the loss falls at rate ||g||^2 right after the component is switched on.
That first-order decrease is the score of the candidate (the paper trains each
candidate briefly and keeps the best; this is the first-order version of that
comparison, computed for all candidates from one gradient).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax import algorithms
from sparsejax.algorithms import Algorithm
from tensornets import rank as rank_lib

PyTree = Any

__all__ = [
    "GreedyGrowth",
    "SpectralTruncation",
    "truncation_mask",
    "tt_bond_norms",
    "unfolding_norms",
]


# ------------------------------------------------------------------ helpers
def _layers(params: PyTree, include: Sequence[str], predicate) -> dict[tuple, Mapping]:
    """{key path: layer params} of the factorized layers passing ``predicate``."""
    out = {}

    def walk(node, path):
        if rank_lib.layer_format(node) is not None:
            name = "/".join(path)
            if predicate(node) and (not include or any(s in name for s in include)):
                out[path] = node
            return
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, (*path, str(k)))

    walk(params, ())
    return out


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set_layers(tree: PyTree, new: dict[tuple, Any]) -> PyTree:
    """Replaces the sub-trees at the given key paths (nested dicts are copied)."""

    def walk(node, path):
        if path in new:
            return new[path]
        if isinstance(node, Mapping):
            return {k: walk(v, (*path, str(k))) for k, v in node.items()}
        return node

    return walk(tree, ())


def _masks_for(params: PyTree, rank_masks: dict[tuple, Mapping], gate_only: bool) -> PyTree:
    nested: dict = {}
    for path, rm in rank_masks.items():
        node = nested
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = rm
    return rank_lib.param_masks(params, nested, gate_only=gate_only)


def _rank_masks_of(masks: PyTree, params: PyTree, paths) -> dict[tuple, Mapping]:
    recovered = rank_lib.rank_masks_from_param_masks(masks, params)
    return {p: _get(recovered, p) for p in paths}


def _check_steps(update_every_steps, begin_step, end_step):
    every = update_every_steps
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"update_every_steps must be a positive int, got {every!r}")
    if isinstance(begin_step, bool) or not isinstance(begin_step, int) or begin_step < 0:
        raise ValueError(f"begin_step must be a non-negative int, got {begin_step!r}")
    if end_step is not None and (not isinstance(end_step, int) or end_step < begin_step):
        raise ValueError(f"end_step must be None or an int >= begin_step, got {end_step!r}")


def _scheduled(step, update_every_steps, begin_step, end_step):
    ok = (step > 0) & (step >= begin_step) & ((step - begin_step) % update_every_steps == 0)
    if end_step is not None:
        ok = ok & (step <= end_step)
    return ok


# ------------------------------------------------------- spectral truncation
def _is_low_rank(node: Mapping) -> bool:
    return (
        rank_lib.layer_format(node) == "cp"
        and len(node) - ("bias" in node) == 3
        and jnp.ndim(node["factor_0"]) == 2
    )


def _svd_basis(node: Mapping, live: jax.Array):
    """QR of both factors and SVD of the small core (fixed shapes, masked components)."""
    a = node["factor_0"] * live
    b = node["factor_1"] * live
    w = node["weights"] * live
    qa, ra = jnp.linalg.qr(a)
    qb, rb = jnp.linalg.qr(b)
    core = (ra * w) @ rb.T
    p, s, vt = jnp.linalg.svd(core)
    return qa, ra, qb, rb, p, s, vt.T


def truncation_mask(singular_values: jax.Array, live: jax.Array, tau: float, min_rank: int):
    """Live components after truncating with relative tolerance ``tau``.

    Keeps the fewest largest values whose discarded tail has
    ``||tail||_2 <= tau * ||s||_2`` (at least ``min_rank``, never reviving dead ones).

    Args:
      singular_values: float[r], any order, dead entries zero.
      live: bool[r].
      tau: relative tolerance in [0, 1).
      min_rank: lower bound on the kept count.

    Returns:
      bool[r].
    """
    s = jnp.where(live, jnp.abs(singular_values), 0.0)
    order = jnp.argsort(-s)
    sorted_sq = s[order] ** 2
    tail = jnp.cumsum(sorted_sq[::-1])[::-1]  # tail[k] = sum_{i >= k} s_(i)^2
    keep = jnp.sum(tail > (tau**2) * tail[0])
    keep = jnp.maximum(keep, min_rank)
    position = jnp.zeros_like(order).at[order].set(jnp.arange(order.size))
    return live & (position < keep)


def _map_moments(inner_state, params, linear, squared):
    """Applies ``linear`` to first-moment-like slots and ``squared`` to ``nu`` slots."""
    treedef = jax.tree.structure(params)
    shapes = [jnp.shape(p) for p in jax.tree.leaves(params)]

    def is_slot(x):
        if x is None or isinstance(x, jax.Array) or jax.tree.structure(x) != treedef:
            return False
        return [jnp.shape(v) for v in jax.tree.leaves(x)] == shapes

    def visit(node, field=None):
        if is_slot(node):
            return squared(node) if field == "nu" else linear(node)
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*[visit(getattr(node, f), f) for f in node._fields])
        if isinstance(node, tuple | list):
            return type(node)(visit(v) for v in node)
        return node

    return visit(inner_state)


def _inverse_on_live(r: jax.Array, rho: jax.Array, rhs: jax.Array) -> jax.Array:
    """R^{-1} rhs for the triangular R of a QR whose dead columns are zero.

    The dead components' diagonal entries (zero) are set to one, so the solve is
    defined; their moments are zero, so what it gives them does not matter.
    """
    eye = jnp.eye(rho.size, dtype=r.dtype)
    return jax.scipy.linalg.solve_triangular(r + eye * (1 - rho), rhs, lower=False)


def _cross_term_coefficients(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """alpha, beta (r x r) with M_jk = alpha_jk X_jk + beta_jk Y_kj for j != k.

    X = A^T dL/dA = M diag(w) and Y = B^T dL/dB = M^T diag(w) both carry M_jk (scaled
    by w_k and w_j); the least-squares combination is (w_k X_jk + w_j Y_kj) /
    (w_j^2 + w_k^2). Zero on the diagonal (M_jj is dL/dw_j itself) and where
    w_j = w_k = 0 (dead components, whose factor columns are zero anyway).
    """
    w2 = w**2
    denominator = w2[:, None] + w2[None, :]
    off = ~jnp.eye(w.size, dtype=bool) & (denominator > 0)
    safe = jnp.where(off, denominator, 1.0)
    return jnp.where(off, w[None, :] / safe, 0.0), jnp.where(off, w[:, None] / safe, 0.0)


def _rotate_low_rank(node: Mapping, live: Mapping):
    """W = A diag(w) B^T in its singular basis, and the map of the moments.

    With G = dL/dW and M = A^T G B, the gradients are dL/dA = G B diag(w),
    dL/dB = G^T A diag(w), dL/dw = diag(M); in the new basis (A' = A T_A, B' = B T_B)
    dL/dA' = dL/dA R_A^T P, dL/dB' = dL/dB R_B^T V and dL/dw' = diag(T_A^T M T_B),
    where M's off-diagonal entries come from the factors' gradients
    (`_cross_term_coefficients`). ``slot_map(slot, 1)`` is this linear map (exact for
    first moments); ``slot_map(slot, 2)`` the same stages with squared coefficients,
    for second moments (see the module docstring).
    """
    rho = live["rank"].astype(node["weights"].dtype)
    qa, ra, qb, rb, p, s, v = _svd_basis(node, rho)
    new = {**node, "factor_0": qa @ p, "factor_1": qb @ v, "weights": s.astype(rho.dtype)}
    ma, mb = ra.T @ p, rb.T @ v  # gradient maps of the factors: dL/dA' = dL/dA R_A^T P
    # T_A = R_A^{-1} P on the live components: column i of it is D R_B^T v_i / s_i
    # (zero on dead rows) whenever s_i > 0, which is all the moments of w' need.
    ta, tb = _inverse_on_live(ra, rho, p), _inverse_on_live(rb, rho, v)
    a, b, w = node["factor_0"] * rho, node["factor_1"] * rho, node["weights"] * rho
    alpha, beta = _cross_term_coefficients(w)

    def slot_map(slot, power):
        # M (r x r): the slot's diagonal dL/dw, cross terms from dL/dA and dL/dB.
        x = (a**power).T @ slot["factor_0"]  # X_jk = sum_l A_lj m_A[l, k]
        y = ((b**power).T @ slot["factor_1"]).T  # [j, k] = Y_kj
        m = alpha**power * x + beta**power * y + jnp.diag(slot["weights"])
        return {
            **slot,
            "factor_0": slot["factor_0"] @ ma**power,
            "factor_1": slot["factor_1"] @ mb**power,
            "weights": jnp.einsum("ji,jk,ki->i", ta**power, m, tb**power),
        }

    return new, slot_map


def _is_tucker(node: Mapping) -> bool:
    """A Tucker layer without a group axis whose every core mode is factorized."""
    if rank_lib.layer_format(node) != "tucker" or jnp.ndim(node["factor_0"]) != 2:
        return False
    return len(node) - ("bias" in node) - 1 == jnp.ndim(node["core"])


def _mode_dot(x: jax.Array, m: jax.Array, k: int) -> jax.Array:
    """x x_k m: contracts mode k of x with the columns of m (m has shape (new, old))."""
    return jnp.moveaxis(jnp.tensordot(m, x, axes=(1, k)), 0, k)


def unfolding_norms(core: jax.Array, k: int) -> jax.Array:
    """Norms of the mode-k slices of a Tucker core (its mode-k singular values after HOSVD).

    Args:
      core: float[r_0, ..., r_{N-1}].
      k: the mode.

    Returns:
      float[r_k]: ``sqrt(sum of core**2 over every axis but k)``.
    """
    return jnp.sqrt(jnp.sum(core**2, axis=tuple(i for i in range(core.ndim) if i != k)))


def _rotate_tucker(node: Mapping, live: Mapping):
    """Tucker G x_1 U_1 ... x_N U_N in its HOSVD basis, and the map of the moments.

    U_k = Q_k R_k (QR), G1 = G x_k R_k for every k, P_k = left singular vectors of
    G1's mode-k unfolding, then U_k <- Q_k P_k and G <- G1 x_k P_k^T: the same
    tensor, orthonormal factors, and a core whose mode-k slices are orthogonal with
    norms equal to the mode-k singular values (the all-orthogonality of the HOSVD).
    """
    n = jnp.ndim(node["core"])
    masked = rank_lib.mask_layer(node, live)
    rhos = [live[f"rank_{k}"].astype(node["core"].dtype) for k in range(n)]
    qs, rs = zip(*(jnp.linalg.qr(masked[f"factor_{k}"]) for k in range(n)))
    g1 = masked["core"]
    for k in range(n):
        g1 = _mode_dot(g1, rs[k], k)
    ps = []
    for k in range(n):
        unfolding = jnp.moveaxis(g1, k, 0).reshape(g1.shape[k], -1)
        p, _, _ = jnp.linalg.svd(unfolding, full_matrices=False)
        ps.append(p)
    g2 = g1
    for k in range(n):
        g2 = _mode_dot(g2, ps[k].T, k)
    new = {**node, "core": g2, **{f"factor_{k}": qs[k] @ ps[k] for k in range(n)}}
    # G'' = G x_k T_k^{-1} with T_k = R_k^{-1} P_k, so dL/dG'' = dL/dG x_k T_k^T (exact),
    # and dL/dU_k' = dL/dU_k R_k^T P_k, as for the low-rank layer.
    ms = [rs[k].T @ ps[k] for k in range(n)]
    ts = [_inverse_on_live(rs[k], rhos[k], ps[k]) for k in range(n)]

    def slot_map(slot, power):
        core = slot["core"]
        for k in range(n):
            core = _mode_dot(core, (ts[k] ** power).T, k)
        factors = {f"factor_{k}": slot[f"factor_{k}"] @ ms[k] ** power for k in range(n)}
        return {**slot, "core": core, **factors}

    return new, slot_map


def _tt_cores(node: Mapping) -> list[jax.Array]:
    d = len(node) - ("bias" in node)
    return [node[f"core_{k}"] for k in range(d)]


def _is_tt(node: Mapping) -> bool:
    """A TT / TT-matrix layer (no group axis) whose bonds fit the sweeps' fixed shapes."""
    fmt = rank_lib.layer_format(node)
    if fmt not in ("tt", "tt_matrix") or (fmt == "tt_matrix" and jnp.ndim(node["core_0"]) != 4):
        return False
    cores = [c.reshape(c.shape[0], -1, c.shape[-1]) for c in _tt_cores(node)]
    if len(cores) < 2:
        return False
    ok_qr = all(c.shape[0] <= c.shape[1] * c.shape[2] for c in cores[1:])
    ok_svd = all(c.shape[0] * c.shape[1] >= c.shape[2] for c in cores[:-1])
    return ok_qr and ok_svd


def tt_bond_norms(node: Mapping) -> dict[str, jax.Array]:
    """Row norms of every bond's right part: its singular values once rounded.

    After `SpectralTruncation.reparametrize` (TT rounding's two sweeps) the rows of
    each bond's right part are orthogonal, so these norms are the singular values
    of the tensor's unfolding at that bond.

    Args:
      node: a TT / TT-matrix layer's params (``core_0`` ... and optionally ``bias``).

    Returns:
      ``{"bond_k": float[r_k]}`` for every inner bond k.
    """
    cores = [c.reshape(c.shape[0], -1, c.shape[-1]) for c in _tt_cores(node)]
    gram = jnp.ones((1, 1), cores[-1].dtype)
    out = {}
    for k in range(len(cores) - 1, 0, -1):
        gram = jnp.einsum("anc,bnd,cd->ab", cores[k], cores[k], gram)
        out[f"bond_{k - 1}"] = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    return out


def _rotate_tt(node: Mapping, live: Mapping):
    """TT rounding's two sweeps as gauge changes; the moments follow every gauge.

    Right to left, core k = R^T Q^T (QR of its transposed unfolding): core k <- Q^T and
    R^T moves into core k-1. Left to right, core k = U S V^T (SVD of its unfolding):
    core k <- U and S V^T moves into core k+1. The tensor is unchanged; afterwards the
    rows of every bond's right part are orthogonal with norms equal to that bond's
    singular values (Oseledets 2011, "Tensor-Train Decomposition", rounding). A gauge
    G on bond k (core k <- core k G, core k+1 <- G^{-1} core k+1) maps the gradients as
    g_k <- g_k G^{-T} and g_{k+1} <- G^T g_{k+1}, exactly when G is invertible.
    """
    masked = rank_lib.mask_layer(node, live)
    shapes = [c.shape for c in _tt_cores(masked)]
    cores = [c.reshape(c.shape[0], -1, c.shape[-1]) for c in _tt_cores(masked)]
    d = len(cores)
    rhos = [live[f"bond_{k}"].astype(cores[0].dtype) for k in range(d - 1)]
    ops = []  # (bond k, matrix right-multiplying core k's moments, left-multiplying core k+1's)
    for k in range(d - 1, 0, -1):
        r0, n, r1 = cores[k].shape
        q, r = jnp.linalg.qr(cores[k].reshape(r0, n * r1).T)
        cores[k] = q.T.reshape(r0, n, r1)
        cores[k - 1] = jnp.einsum("anb,cb->anc", cores[k - 1], r)
        eye = jnp.eye(r0, dtype=r.dtype)
        ops.append((k - 1, _inverse_on_live(r, rhos[k - 1], eye), r))
    for k in range(d - 1):
        r0, n, r1 = cores[k].shape
        u, sv, vt = jnp.linalg.svd(cores[k].reshape(r0 * n, r1), full_matrices=False)
        cores[k] = u.reshape(r0, n, r1)
        cores[k + 1] = jnp.einsum("ab,bnc->anc", sv[:, None] * vt, cores[k + 1])
        tiny = sv <= jnp.finfo(sv.dtype).eps * jnp.maximum(sv[0], 1e-30) * r1
        inv = jnp.where(tiny, 0.0, 1.0 / jnp.where(tiny, 1.0, sv))
        ops.append((k, vt.T * sv, inv[:, None] * vt))
    new = {**node, **{f"core_{k}": cores[k].reshape(shapes[k]) for k in range(d)}}

    def slot_map(slot, power):
        gs = [c.reshape(c.shape[0], -1, c.shape[-1]) for c in _tt_cores(slot)]
        for k, right, left in ops:
            gs[k] = jnp.einsum("anb,bc->anc", gs[k], right**power)
            gs[k + 1] = jnp.einsum("ab,bnc->anc", left**power, gs[k + 1])
        return {**slot, **{f"core_{k}": gs[k].reshape(shapes[k]) for k in range(d)}}

    return new, slot_map


@dataclasses.dataclass(frozen=True)
class SpectralTruncation(Algorithm):
    """Rank-adaptive low-rank training by periodic SVD truncation (see the module docstring).

    Use with `sparsejax.transforms.masked`, which calls `reparametrize` (rotating the
    params and optimizer moments into the singular basis) on the update steps before
    the masks are updated; applies to ``"low_rank"`` layers
    (2-factor CP, W = A diag(w) B^T), Tucker layers (all modes factorized) and TT /
    TT-matrix layers (no group axis) whose path contains one of ``layers`` (all
    when empty).

    Attributes:
      tau: relative truncation tolerance in [0, 1).
      update_every_steps: steps between truncations.
      begin_step: first truncation step.
      end_step: last truncation step (None: no end).
      min_rank: fewest components kept per layer.
      layers: substrings of layer paths to adapt.
    """

    tau: float = 0.1
    update_every_steps: int = 100
    begin_step: int = 0
    end_step: int | None = None
    min_rank: int = 1
    layers: Sequence[str] = ()

    updates_masks = True
    skip_update_on_mask_step = True  # the step's gradient is in the old basis
    reparametrizes = True

    def __post_init__(self):
        if not isinstance(self.tau, int | float) or not 0.0 <= self.tau < 1.0:
            raise ValueError(f"tau must be in [0, 1), got {self.tau!r}")
        _check_steps(self.update_every_steps, self.begin_step, self.end_step)
        if isinstance(self.min_rank, bool) or not isinstance(self.min_rank, int):
            raise ValueError(f"min_rank must be a positive int, got {self.min_rank!r}")
        if self.min_rank < 1:
            raise ValueError(f"min_rank must be a positive int, got {self.min_rank!r}")
        object.__setattr__(self, "layers", tuple(self.layers))

    def _targets(self, params):
        found = _layers(
            params, self.layers, lambda n: _is_low_rank(n) or _is_tucker(n) or _is_tt(n)
        )
        if not found:
            raise ValueError(
                "SpectralTruncation found no low-rank (2-factor CP), Tucker or TT layer"
                + (f" matching layers={self.layers!r}" if self.layers else "")
            )
        return found

    def init_masks(self, params, key):
        del key
        targets = self._targets(params)
        full = {p: rank_lib.init_rank_masks({"l": n})["l"] for p, n in targets.items()}
        return _masks_for(params, full, gate_only=False)

    def is_update_step(self, step):
        return _scheduled(step, self.update_every_steps, self.begin_step, self.end_step)

    def update_masks(self, masks, params, grads, step, key, algo_state=()):
        del grads, step, key, algo_state
        targets = self._targets(params)
        live = _rank_masks_of(masks, params, targets)
        # After `reparametrize` the components are in the singular basis: s_i = |w_i| for a
        # low-rank layer, the norms of the core's mode-k slices for Tucker, sorted in
        # decreasing order, so the live ones are the first (however the old mask was laid out).
        new = {}
        for p, n in targets.items():
            if _is_low_rank(n):
                s = {"rank": n["weights"]}
            elif _is_tt(n):
                s = tt_bond_norms(n)
            else:
                s = {f"rank_{k}": unfolding_norms(n["core"], k) for k in range(n["core"].ndim)}
            first = {a: jnp.arange(m.size) < jnp.sum(m) for a, m in live[p].items()}
            new[p] = {a: truncation_mask(s[a], first[a], self.tau, self.min_rank) for a in s}
        return _masks_for(params, new, gate_only=False)

    def reparametrize(self, params, inner_state, masks):
        """Rotates every target layer into its singular basis; maps the moments alike.

        First moments (every slot of the inner state shaped like ``params``) follow the
        gradients' linear map exactly; Adam's ``nu`` follows it with squared
        coefficients, exact for orthonormal factors and an approximation otherwise
        (see the module docstring).

        Args:
          params: the parameter tree.
          inner_state: the wrapped optimizer's state.
          masks: the current param masks.

        Returns:
          ``(params, inner_state)`` in the new basis; the layers' weights are unchanged.
        """
        targets = self._targets(params)
        live = _rank_masks_of(masks, params, targets)
        new_nodes, slot_maps = {}, {}
        for path, node in targets.items():
            if _is_low_rank(node):
                rotate = _rotate_low_rank
            else:
                rotate = _rotate_tt if _is_tt(node) else _rotate_tucker
            new_nodes[path], slot_maps[path] = rotate(node, live[path])

        def mapper(power):
            def apply(slot):
                return _set_layers(
                    slot, {p: fn(_get(slot, p), power) for p, fn in slot_maps.items()}
                )

            return apply

        inner_state = _map_moments(inner_state, params, mapper(1), mapper(2))
        return _set_layers(params, new_nodes), inner_state


# ----------------------------------------------------------- greedy growth
@dataclasses.dataclass(frozen=True)
class GreedyGrowth(Algorithm):
    """Greedy rank growth under a parameter budget (see the module docstring).

    Works with plain `sparsejax.transforms.masked` (no basis change) on every format:
    the candidates are all rank axes (CP / tubal rank, each Tucker mode, each TT bond)
    of the factorized layers whose path contains one of ``layers``.

    Attributes:
      budget: the factor parameters allowed, as a fraction in (0, 1] of the adapted
        layers' factors at full rank.
      initial_rank: live components of every axis at step 0.
      update_every_steps: steps between growths (one component each).
      begin_step, end_step: growth window (end None: no end).
      layers: substrings of layer paths to adapt (all factorized layers when empty).
    """

    budget: float = 0.5
    initial_rank: int = 1
    update_every_steps: int = 50
    begin_step: int = 0
    end_step: int | None = None
    layers: Sequence[str] = ()

    updates_masks = True
    reset_grown_moments = True

    def __post_init__(self):
        if not isinstance(self.budget, int | float) or not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget!r}")
        if isinstance(self.initial_rank, bool) or not isinstance(self.initial_rank, int):
            raise ValueError(f"initial_rank must be a positive int, got {self.initial_rank!r}")
        if self.initial_rank < 1:
            raise ValueError(f"initial_rank must be a positive int, got {self.initial_rank!r}")
        _check_steps(self.update_every_steps, self.begin_step, self.end_step)
        object.__setattr__(self, "layers", tuple(self.layers))

    def _targets(self, params):
        found = _layers(params, self.layers, lambda n: True)
        if not found:
            raise ValueError(
                "GreedyGrowth found no factorized layer"
                + (f" matching layers={self.layers!r}" if self.layers else "")
            )
        return found

    def _budget(self, targets) -> int:
        # At full rank every factor entry is live: the budget is static.
        full = sum(
            math.prod(jnp.shape(v))
            for node in targets.values()
            for k, v in node.items()
            if k != "bias"
        )
        return int(self.budget * full)

    def init_masks(self, params, key):
        del key
        targets = self._targets(params)
        start = {
            p: rank_lib.init_rank_masks({"l": n}, live=self.initial_rank)["l"]
            for p, n in targets.items()
        }
        return _masks_for(params, start, gate_only=True)

    def is_update_step(self, step):
        return _scheduled(step, self.update_every_steps, self.begin_step, self.end_step)

    def update_masks(self, masks, params, grads, step, key, algo_state=()):
        del step, key, algo_state
        targets = self._targets(params)
        live = _rank_masks_of(masks, params, targets)

        def factor_params(p, rm):
            node = {k: v for k, v in targets[p].items() if k != "bias"}
            return rank_lib.num_live_params(node, rm)

        used = sum(factor_params(p, live[p]) for p in targets)
        budget = self._budget(targets)
        scores, choices, cands = [], [], []
        for path, node in targets.items():
            g = _get(grads, path)
            for name, ((leaf, ax), *_) in rank_lib.layer_rank_axes(node).items():
                m = live[path][name]
                gl = g[leaf]
                ax = ax % gl.ndim
                energy = jnp.sum(gl**2, axis=tuple(i for i in range(gl.ndim) if i != ax))
                energy = jnp.where(m, -jnp.inf, energy)
                idx = jnp.argmax(energy)
                grown = {**live[path], name: m.at[idx].set(True)}
                cost = factor_params(path, grown) - factor_params(path, live[path])
                feasible = (~m[idx]) & (used + cost <= budget)
                scores.append(jnp.where(feasible, energy[idx], -jnp.inf))
                choices.append(idx)
                cands.append((path, name))
        scores = jnp.stack(scores)
        best = jnp.argmax(scores)
        any_ok = jnp.isfinite(scores[best])
        new = {p: dict(rm) for p, rm in live.items()}
        for c, (path, name) in enumerate(cands):
            grow = any_ok & (best == c)
            m = new[path][name]
            new[path][name] = m.at[choices[c]].set(m[choices[c]] | grow)
        return _masks_for(params, new, gate_only=True)


# Configs name these algorithms by string (``config.sparsity.algorithm``); sparsejax
# never imports tensornets, so tensornets adds them to sparsejax's registry here.
algorithms.register("spectral_truncation", SpectralTruncation)
algorithms.register("greedy_growth", GreedyGrowth)
