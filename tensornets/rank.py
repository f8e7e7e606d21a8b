"""Rank masks for factorized layers, and `compact`: masked factors -> smaller factors.

A factorized layer is kept at its maximum rank; a *rank mask* says which of its
components are live. Every format has one or more rank axes, each with a boolean
vector over its components:

  ``"cp"``          ``{"rank": bool[R]}``: rank-1 term r is ``weights[r] * outer(factor_n[:, r])``.
  ``"tucker"``      ``{"rank_k": bool[R_k]}`` per factor k: column r of ``factor_k`` and the
                    core slice r along factor k's mode.
  ``"tt"``,
  ``"tt_matrix"``   ``{"bond_k": bool[r_k]}`` for the bond between ``core_k`` and
                    ``core_{k+1}`` (k = 0 .. d-2): the last axis of one, the first of the other.
  ``"tubal"``       ``{"rank": bool[k]}``: slice r of ``u``, ``s`` and ``v`` (a t-SVD term).

Grouped convolutions carry a leading group axis on every factor; the rank mask is
shared by the groups. A model's rank masks are a nested dict that mirrors the
parameter tree down to the factorized layers (``{"hidden_1": {"rank": ...}}``); it is
also the ``"rank_masks"`` variable collection the factorized layers read
(``model.apply({"params": p, "rank_masks": rm}, x)`` runs the masked model).

The masked optax transform (`sparsejax.transforms.masked`) wants masks shaped like
the parameters: `param_masks` broadcasts a rank mask onto the factor leaves. With
``gate_only=True`` only one leaf per rank axis is masked (the *gate*: CP's weights,
Tucker's core, the second core of a TT bond, the tubal ``s``). A dead component's
gate slice is exactly zero, so it contributes nothing, while its other slices may
keep values: the gradient on the gate slice then measures how fast the loss would
fall if the component were switched on, which is what rank growth needs
(`tensornets.adaptive.GreedyGrowth`).

`compact` slices the dead components out; the model built with `compact_ranks`
gives the same outputs (up to float summation order) with strictly fewer
parameters whenever a component is dead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = [
    "RANK_COLLECTION",
    "apply_rank_masks",
    "check_boolean_rank_mask",
    "compact",
    "compact_ranks",
    "init_rank_masks",
    "layer_format",
    "layer_rank_axes",
    "mask_layer",
    "num_live_params",
    "param_masks",
    "rank_masks_from_param_masks",
]

RANK_COLLECTION = "rank_masks"


# ------------------------------------------------------------- layer anatomy
def _factors(node: Mapping) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k != "bias"}


def _numbered(keys, prefix: str) -> bool:
    return all(k.startswith(prefix) and k[len(prefix) :].isdigit() for k in keys)


def layer_format(node: Any) -> str | None:
    """The format of a factorized layer's params node, from its leaf names and ndims.

    Args:
      node: a mapping of a layer's params (``bias`` ignored).

    Returns:
      "cp", "tucker", "tt", "tt_matrix", "tubal", or None if ``node`` is not the params of
      a factorized layer (e.g. a dense ``kernel``).
    """
    if not isinstance(node, Mapping) or not node:
        return None
    if any(isinstance(v, Mapping) for v in node.values()):
        return None
    keys = set(_factors(node))
    if not keys:
        return None
    if keys == {"u", "s", "v"}:
        return "tubal"
    if "weights" in keys and len(keys) > 1 and _numbered(keys - {"weights"}, "factor_"):
        return "cp"
    if "core" in keys and len(keys) > 1 and _numbered(keys - {"core"}, "factor_"):
        return "tucker"
    if _numbered(keys, "core_"):
        ndim = jnp.ndim(node["core_0"])
        return "tt" if ndim == 3 else "tt_matrix"
    return None


def _lead(node: Mapping, fmt: str) -> int:
    """1 when the factors carry a leading group axis (grouped convolutions), else 0."""
    if fmt in ("cp", "tucker"):
        return jnp.ndim(node["factor_0"]) - 2
    if fmt == "tt_matrix":
        return jnp.ndim(node["core_0"]) - 4
    return 0


def layer_rank_axes(node: Mapping) -> dict[str, list[tuple[str, int]]]:
    """Which slices each rank axis selects: ``{axis name: [(leaf name, leaf axis), ...]}``.

    The first pair of every list is the gate (see the module docstring).

    Raises:
      ValueError: if ``node`` is not a factorized layer's params.
    """
    fmt = layer_format(node)
    if fmt is None:
        raise ValueError(f"node is not a factorized layer's params: keys {sorted(node)}")
    lead = _lead(node, fmt)
    factors = _factors(node)
    if fmt == "cp":
        n = len(factors) - 1
        return {"rank": [("weights", -1)] + [(f"factor_{i}", -1) for i in range(n)]}
    if fmt == "tucker":
        n = len(factors) - 1
        core_nd = jnp.ndim(node["core"]) - lead
        # All modes factorized (dense layers), or only the last n (Tucker-2 convs).
        first = 0 if n == core_nd else core_nd - n
        return {f"rank_{k}": [("core", lead + first + k), (f"factor_{k}", -1)] for k in range(n)}
    if fmt == "tubal":
        return {"rank": [("s", 0), ("u", 1), ("v", 1)]}
    d = len(factors)
    return {f"bond_{k}": [(f"core_{k + 1}", lead), (f"core_{k}", -1)] for k in range(d - 1)}


def _axis_sizes(node: Mapping) -> dict[str, int]:
    return {
        name: jnp.shape(node[leaf])[ax] for name, ((leaf, ax), *_) in layer_rank_axes(node).items()
    }


# ------------------------------------------------------------ tree traversal
def _is_layer(node: Any) -> bool:
    return layer_format(node) is not None


def _map_layers(fn, params: PyTree, *rest: PyTree, missing=None) -> dict:
    """Applies ``fn(node, *rest_nodes)`` to every factorized layer, mirroring the nesting.

    Returns a nested dict holding only the factorized layers (and their parents).
    ``rest`` trees are indexed by the same keys; absent entries give ``missing``.
    """

    def walk(node, others):
        if _is_layer(node):
            return fn(node, *others)
        if not isinstance(node, Mapping):
            return None
        out = {}
        for k, v in node.items():
            sub = [o.get(k, missing) if isinstance(o, Mapping) else missing for o in others]
            r = walk(v, sub)
            if r is not None and r != {}:
                out[k] = r
        return out

    return walk(params, list(rest))


def init_rank_masks(params: PyTree, live: int | None = None) -> dict:
    """Rank masks of every factorized layer in ``params``: all components live.

    Args:
      params: a parameter tree (factorized layers are found by their leaf names).
      live: if given, only the first ``live`` components of every rank axis are live
        (at least 1, at most the axis size): the starting point of rank growth.

    Returns:
      ``{... layer: {axis name: bool[size]}}`` for the factorized layers only.
    """
    if live is not None and (isinstance(live, bool) or not isinstance(live, int) or live < 1):
        raise ValueError(f"live must be a positive int or None, got {live!r}")

    def one(node):
        sizes = _axis_sizes(node)
        k = lambda s: s if live is None else min(live, s)
        return {name: jnp.arange(s) < k(s) for name, s in sizes.items()}

    return _map_layers(one, params)


def _map_masked_layers(on_layer, on_other, params: PyTree, rank_masks: PyTree) -> PyTree:
    """Rebuilds ``params``: ``on_layer(node, mask)`` for each layer that has a rank mask.

    Every other leaf (biases, dense layers, the leaves of unmasked factorized layers)
    becomes ``on_other(leaf)``, so the result has the structure of ``params``.
    """

    def walk(node, rm):
        if _is_layer(node) and rm is not None:
            return on_layer(node, rm)
        if isinstance(node, Mapping):
            return {
                k: walk(v, rm.get(k) if isinstance(rm, Mapping) else None) for k, v in node.items()
            }
        return on_other(node)

    return walk(params, rank_masks)


def _check_layer_mask(node: Mapping, mask: Mapping, where: str = "") -> None:
    sizes = _axis_sizes(node)
    if set(mask) != set(sizes):
        raise ValueError(f"rank mask{where} has axes {sorted(mask)}, the layer has {sorted(sizes)}")
    for name, s in sizes.items():
        if jnp.shape(mask[name]) != (s,):
            raise ValueError(
                f"rank mask{where}[{name!r}] must have shape ({s},), got {jnp.shape(mask[name])}"
            )


def check_boolean_rank_mask(mask: Mapping, where: str, remedy: str) -> None:
    """Refuses a layer's rank mask that is not boolean: a float would scale the factors.

    Only dtypes are read, so traced masks are checked as well.

    Args:
      mask: ``{axis name: vector}``, one layer's rank mask.
      where: how the message names the mask, e.g. ``"rank_masks['dense']"``.
      remedy: what to use for float multipliers instead, ending the message.

    Raises:
      ValueError: "{where}[axis] must be boolean, got dtype ..." for the first float axis.
    """
    for name, vec in mask.items():
        dtype = jnp.result_type(vec)
        if dtype != jnp.bool_:
            raise ValueError(
                f"{where}[{name!r}] must be boolean, got dtype {dtype} (a float would scale "
                f"the factors; {remedy})"
            )


def _check_rank_masks(params: PyTree, rank_masks: PyTree) -> None:
    """Fails, naming the entry, on rank masks that do not fit ``params``.

    Every entry must lead to a factorized layer of ``params`` (a mask for a layer that
    does not exist would otherwise be ignored), with the layer's axes and shapes, and
    boolean vectors: a float would scale the factors instead of masking them (float
    multipliers, e.g. tensor dropout, go through `mask_layer`). Only structure, shapes
    and dtypes are read, so traced masks are checked too.
    """

    def walk(node, rm, where):
        if rm is None:
            return
        if _is_layer(node):
            if not isinstance(rm, Mapping):
                raise ValueError(
                    f"rank_masks{where} must map the layer's rank axes to bool vectors, got "
                    f"{type(rm).__name__}"
                )
            _check_layer_mask(node, rm, where)
            check_boolean_rank_mask(rm, f"rank_masks{where}", "multipliers go through mask_layer")
            return
        if not isinstance(rm, Mapping):
            raise ValueError(
                f"rank_masks{where} must be a nested dict down to factorized layers, got "
                f"{type(rm).__name__}"
            )
        for k, sub in rm.items():
            if not isinstance(node, Mapping) or k not in node:
                keys = sorted(node) if isinstance(node, Mapping) else []
                raise ValueError(
                    f"rank_masks{where}[{k!r}] names no factorized layer of params "
                    f"(params{where} has keys {keys})"
                )
            if not isinstance(node[k], Mapping):
                raise ValueError(
                    f"rank_masks{where}[{k!r}] names params{where}[{k!r}], which is not a "
                    "factorized layer"
                )
            walk(node[k], sub, f"{where}[{k!r}]")

    walk(params, rank_masks, "")


def _broadcast(vec: jax.Array, ndim: int, axis: int) -> jax.Array:
    axis = axis % ndim
    return vec.reshape((1,) * axis + (-1,) + (1,) * (ndim - axis - 1))


def _layer_leaf_masks(node: Mapping, mask: Mapping, gate_only: bool) -> dict[str, Any]:
    """Per-leaf multipliers (bool or float) broadcast to the leaf shapes; absent = untouched."""
    out: dict[str, Any] = {}
    for name, pairs in layer_rank_axes(node).items():
        for leaf, ax in pairs[:1] if gate_only else pairs:
            shape = jnp.shape(node[leaf])
            m = jnp.broadcast_to(_broadcast(jnp.asarray(mask[name]), len(shape), ax), shape)
            if leaf not in out:
                out[leaf] = m
            elif m.dtype == bool:
                out[leaf] = out[leaf] & m
            else:
                out[leaf] = out[leaf] * m
    return out


def mask_layer(node: Mapping, mask: Mapping, *, gate_only: bool = False) -> dict:
    """Applies one layer's rank mask (or float multipliers, e.g. tensor dropout) to its params.

    Args:
      node: the layer's params (``bias`` passes through).
      mask: ``{axis name: bool[size] or float[size]}`` as from `init_rank_masks`.
      gate_only: scale only the gate leaf of each axis (enough to remove a component).

    Returns:
      The params with dead components exactly zero (``jnp.where``) or scaled by the
      float multipliers.
    """
    _check_layer_mask(node, mask)
    leaf_masks = _layer_leaf_masks(node, mask, gate_only)
    out = dict(node)
    for leaf, m in leaf_masks.items():
        x = node[leaf]
        if m.dtype == bool:
            out[leaf] = jnp.where(m, x, jnp.zeros_like(x))
        else:
            out[leaf] = x * m.astype(x.dtype)
    return out


def param_masks(params: PyTree, rank_masks: PyTree, *, gate_only: bool = False) -> PyTree:
    """Broadcasts rank masks onto the factor leaves: a mask pytree shaped like ``params``.

    Args:
      params: the parameter tree.
      rank_masks: as from `init_rank_masks` (layers not in it are not masked).
      gate_only: mask only each rank axis's gate leaf (see the module docstring).

    Returns:
      A tree with the structure of ``params``: bool arrays on masked factor leaves,
      None elsewhere (biases, dense layers): the masks of `sparsejax.transforms.masked`.

    Raises:
      ValueError: for rank masks of a layer ``params`` does not have, or of the wrong
        axes, shapes or dtype (not boolean).
    """
    _check_rank_masks(params, rank_masks)

    def layer_masks(node, rm):
        _check_layer_mask(node, rm)
        leaf_masks = _layer_leaf_masks(node, rm, gate_only)
        return {k: leaf_masks.get(k) for k in node}

    return _map_masked_layers(layer_masks, lambda leaf: None, params, rank_masks)


def rank_masks_from_param_masks(param_mask_tree: PyTree, params: PyTree) -> dict:
    """Recovers rank masks from masks made by `param_masks` (either mode): jit-able.

    A component is live if any entry of its gate slice is live. This is exact as long
    as every other rank axis sharing that gate keeps at least one live component.
    """

    def one(node, pm):
        out = {}
        for name, ((leaf, ax), *_) in layer_rank_axes(node).items():
            m = None if pm is None else pm.get(leaf)
            size = jnp.shape(node[leaf])[ax]
            if m is None:
                out[name] = jnp.ones((size,), bool)
                continue
            ax = ax % m.ndim
            other = tuple(i for i in range(m.ndim) if i != ax)
            out[name] = jnp.any(m, axis=other) if other else m
        return out

    return _map_layers(one, params, param_mask_tree)


def apply_rank_masks(params: PyTree, rank_masks: PyTree, *, gate_only: bool = False) -> PyTree:
    """``params`` with the dead components of every masked layer set to exactly zero.

    Raises:
      ValueError: for rank masks of a layer ``params`` does not have, or of the wrong
        axes, shapes or dtype (not boolean).
    """
    _check_rank_masks(params, rank_masks)
    return _map_masked_layers(
        lambda node, rm: mask_layer(node, rm, gate_only=gate_only),
        lambda leaf: leaf,
        params,
        rank_masks,
    )


# -------------------------------------------------------------- parameters
def num_live_params(params: PyTree, rank_masks: PyTree) -> jax.Array:
    """Entries of the factors that `compact` would keep (jit-able; rank masks may be traced).

    Leaf by leaf, the product over its axes of the live count (rank axes) or the size.
    Leaves outside masked layers (biases, dense kernels) count in full.

    Returns:
      int32 scalar.

    Raises:
      ValueError: for rank masks that do not fit ``params`` (as `apply_rank_masks`).
    """
    _check_rank_masks(params, rank_masks)
    total = jnp.zeros((), jnp.int32)

    def walk(node, rm):
        nonlocal total
        if _is_layer(node) and rm is not None:
            _check_layer_mask(node, rm)
            axes_of: dict[str, dict[int, jax.Array]] = {}
            for name, pairs in layer_rank_axes(node).items():
                count = jnp.sum(jnp.asarray(rm[name], jnp.int32))
                for leaf, ax in pairs:
                    axes_of.setdefault(leaf, {})[ax % jnp.ndim(node[leaf])] = count
            for leaf, x in node.items():
                n = jnp.ones((), jnp.int32)
                for i, s in enumerate(jnp.shape(x)):
                    n = n * axes_of.get(leaf, {}).get(i, s)
                total = total + n
            return
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, rm.get(k) if isinstance(rm, Mapping) else None)
            return
        total = total + jnp.size(node)

    walk(params, rank_masks)
    return total


def compact(params: PyTree, rank_masks: PyTree) -> PyTree:
    """Slices the dead components out of every masked factorized layer.

    Host-side (the result has data-dependent shapes). The model built with the ranks of
    `compact_ranks` computes the same function on these params as the model at full
    rank does on ``apply_rank_masks(params, rank_masks)``: the removed terms were
    exactly zero. An axis with no live component keeps one component, set to zero, so
    the layer stays valid (its rank cannot be 0).

    Args:
      params: the full-rank parameter tree.
      rank_masks: as from `init_rank_masks` (concrete arrays).

    Returns:
      A new tree: masked layers' factors with smaller rank axes; everything else as is.

    Raises:
      ValueError: for rank masks of a layer ``params`` does not have (``compact({}, rm)``
        must not return ``{}``), or of the wrong axes, shapes or dtype.
    """
    _check_rank_masks(params, rank_masks)

    def one(node, rm):
        _check_layer_mask(node, rm)
        zeroed = mask_layer(node, rm)
        out = {k: np.asarray(v) for k, v in zeroed.items()}
        for name, pairs in layer_rank_axes(node).items():
            keep = np.flatnonzero(np.asarray(rm[name]))
            if keep.size == 0:
                keep = np.array([0])
            for leaf, ax in pairs:
                out[leaf] = np.take(out[leaf], keep, axis=ax)
        return {k: jnp.asarray(v) for k, v in out.items()}

    return _map_masked_layers(one, lambda leaf: leaf, params, rank_masks)


def compact_ranks(rank_masks: PyTree) -> dict:
    """The ``rank`` argument that builds each compacted layer: ``{path: int | tuple}``.

    Paths are "/"-joined module names (``"hidden_1"``). CP and tubal give an int; Tucker
    (one per factor) and TT / TT-matrix (one per bond) give tuples. Host-side.

    Raises:
      ValueError: naming the layer, for a layer mask whose axes are not ``rank`` or
        ``rank_0 .. rank_{n-1}`` / ``bond_0 .. bond_{n-1}``, or whose vectors are not 1-D
        booleans.
    """
    out = {}

    def check(node, prefix):
        keys = sorted(node, key=str)
        numbered = [[f"{p}_{k}" for k in range(len(node))] for p in ("rank", "bond")]
        if keys != ["rank"] and not any(sorted(n) == keys for n in numbered):
            raise ValueError(
                f"rank_masks[{prefix!r}] has axes {keys}; a layer's rank mask has 'rank', "
                "or 'rank_0'.. (Tucker) or 'bond_0'.. (TT) numbered from 0"
            )
        for k, v in node.items():
            if jnp.result_type(v) != jnp.bool_ or jnp.ndim(v) != 1:
                raise ValueError(
                    f"rank_masks[{prefix!r}][{k!r}] must be a 1-D bool vector, got dtype "
                    f"{jnp.result_type(v)} and shape {jnp.shape(v)}"
                )

    def walk(node, prefix):
        if (
            isinstance(node, Mapping)
            and node
            and all(not isinstance(v, Mapping) for v in node.values())
        ):
            check(node, prefix)
            counts = {k: max(int(np.sum(np.asarray(v))), 1) for k, v in node.items()}
            if set(counts) == {"rank"}:
                out[prefix] = counts["rank"]
            else:
                prefix_name = next(iter(counts)).rsplit("_", 1)[0]
                n = len(counts)
                out[prefix] = tuple(counts[f"{prefix_name}_{k}"] for k in range(n))
            return
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))

    walk(rank_masks, "")
    return out
