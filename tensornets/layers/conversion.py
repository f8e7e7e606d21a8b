"""Trained dense params <-> factorized params: `factorize_params` and `densify_params`.

Decompose a trained dense model's kernels into the factors of the layers that replace
them (Lebedev et al. 2015's decompose, then fine-tune), and rebuild dense kernels
from factors. Both take a factorize spec (`tensornets.layers.check_factorize_spec`)
keyed by the modules' parameter paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax.core import unfreeze

from tensornets.formats import validation
from tensornets.formats.cp import CP
from tensornets.formats.tt import TT, TTMatrix
from tensornets.formats.tubal import Tubal
from tensornets.formats.tucker import Tucker
from tensornets.layers.layouts import Layout, conv_layout, dense_layout, embed_layout
from tensornets.layers.spec import canonical_format, check_factorize_spec
from tensornets.layers.tubal import kernel_to_tubal, tubal_to_kernel

__all__ = ["densify_params", "factorize_params"]


def _split(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise ValueError(f"empty parameter path {path!r}")
    return parts


def _paths(tree, prefix=()) -> list[str]:
    out = []
    if isinstance(tree, Mapping):
        if any(not isinstance(v, Mapping) for v in tree.values()):
            out.append("/".join(prefix))
        for k, v in tree.items():
            if isinstance(v, Mapping):
                out.extend(_paths(v, (*prefix, str(k))))
    return out


def _locate(params, path: str):
    """(root tree, list of keys) with 'params' looked through when present."""
    tree = unfreeze(params) if hasattr(params, "unfreeze") else params
    keys = _split(path)
    for root_keys in ([], ["params"]):
        node, ok = tree, True
        for k in root_keys + keys:
            if isinstance(node, Mapping) and k in node:
                node = node[k]
            else:
                ok = False
                break
        if ok and isinstance(node, Mapping):
            return root_keys + keys, node
    raise ValueError(f"no module at parameter path {path!r}; known paths: {_paths(tree)}")


def _replace(tree, keys: list[str], new_keys: list[str], value):
    def without(node, ks):
        node = dict(node)
        if len(ks) == 1:
            node.pop(ks[0])
        else:
            node[ks[0]] = without(node[ks[0]], ks[1:])
        return node

    def with_(node, ks):
        node = dict(node)
        if len(ks) == 1:
            node[ks[0]] = value
        else:
            node[ks[0]] = with_(node.get(ks[0], {}), ks[1:])
        return node

    return with_(without(tree, keys), new_keys)


def _convert(params: Any, spec: dict[str, dict], convert_node) -> Any:
    """Replaces the module at each path of ``spec`` by ``convert_node(node, entry)``."""
    out = unfreeze(params) if hasattr(params, "unfreeze") else params
    for path, entry in spec.items():
        keys, node = _locate(out, path)
        new_keys = keys[: len(keys) - len(_split(path))] + _split(entry.get("to", path))
        out = _replace(out, keys, new_keys, convert_node(node, entry))
    return out


def _kind_of(node: Mapping, entry: dict) -> str:
    if "kind" in entry:
        return entry["kind"]  # checked by check_factorize_spec
    if "embedding" in node:
        return "embed"
    if "kernel" in node:
        return "dense" if node["kernel"].ndim == 2 else "conv"
    raise ValueError(f"cannot tell the layer kind of params with keys {sorted(node)}; set 'kind'")


def _decompose(layout: Layout, w: jax.Array, n_iter: int) -> dict[str, jax.Array]:
    """Fits ``w`` (the layout's tensor; tubal: the (in, out) kernel) at the layout's ranks."""
    if layout.format == "tubal":
        n1, n2, n3 = layout.shape
        return Tubal.from_dense(kernel_to_tubal(w, n1, n2, n3), layout.ranks[0]).to_params()
    if layout.format in ("cp", "low_rank"):
        # For a matrix, ALS starts at the truncated SVD, its optimum (Eckart & Young).
        return CP.from_dense(w, layout.ranks, n_iter_max=n_iter).to_params()
    if layout.format == "tucker":
        t = Tucker.from_dense(w, layout.ranks, modes=layout.modes, n_iter_max=n_iter)
        return t.to_params()
    if layout.format == "tt":
        return TT.from_dense(w, layout.ranks).to_params()
    w = w.reshape(layout.shape)
    return TTMatrix.from_dense(w, layout.in_shape, layout.out_shape, layout.ranks).to_params()


def _factorize_node(node: Mapping, entry: dict) -> dict:
    kind = _kind_of(node, entry)
    fmt = canonical_format(entry["format"], kind)
    rank, n_iter = entry["rank"], entry.get("n_iter_max", 100)
    in_shape, out_shape = entry.get("in_shape"), entry.get("out_shape")
    extra = {"bias": node["bias"]} if "bias" in node else {}

    if kind == "embed":
        table = jnp.asarray(node["embedding"])
        layout = embed_layout(fmt, *table.shape, rank, in_shape, out_shape)
        return {**_decompose(layout, table, n_iter), **extra}
    kernel = jnp.asarray(node["kernel"])
    if kind == "dense":
        layout = dense_layout(fmt, *kernel.shape, rank, in_shape, out_shape)
        if fmt == "tubal":  # _decompose projects the (in, out) kernel itself
            return {**_decompose(layout, kernel, n_iter), **extra}
        return {**_decompose(layout, kernel.reshape(layout.shape), n_iter), **extra}
    g = validation.check_int_rank(entry.get("feature_group_count", 1), "feature_group_count")
    *ks, cg, f = kernel.shape
    if f % g:
        raise ValueError(f"feature_group_count={g} must divide the kernel's features ({f})")
    layout = conv_layout(fmt, tuple(ks), cg, f // g, rank, in_shape, out_shape)
    per_group = jnp.moveaxis(kernel.reshape(*ks, cg, g, f // g), -2, 0)  # (g, k..., C/g, F/g)
    return {**jax.vmap(lambda w: _decompose(layout, w, n_iter))(per_group), **extra}


def factorize_params(params: Any, spec: Mapping[str, Mapping[str, Any]]) -> Any:
    """Decomposes chosen kernels of a trained dense model into factorized-layer params.

    Each kernel is fitted with the formats' ``from_dense`` (CP and low_rank: ALS,
    Tucker: HOOI, TT: TT-SVD, tubal: projection onto t-product operators, then the
    truncated t-SVD) at the ranks the matching factorized layer resolves, so the
    result loads into a model that uses `Factorized` / `FactorizedDense` /
    `FactorizedConv` / `FactorizedEmbedding` at the same place, ready for
    fine-tuning. Biases are copied. Pure: the input tree is not modified.

    Args:
      params: a parameter tree (or a variables dict with a "params" collection).
      spec: ``{"path/to/module": {"format": ..., "rank": ..., optional "in_shape",
        "out_shape", "feature_group_count" (conv; the kernel shape does not show
        it), "kind" ("dense" | "conv" | "embed", inferred by default), "to" (a new
        path, e.g. the factorized module's name), "n_iter_max"}}``; the layer keys
        "contraction", "init_variance", "rank_dropout" are allowed and ignored, so the
        spec that builds the model also converts its params.

    Returns:
      A new tree with those modules' ``kernel`` / ``embedding`` replaced by factors.

    Raises:
      ValueError: for unknown paths (listing the known ones), unknown spec keys,
        bad ranks or shapes.
    """
    return _convert(params, check_factorize_spec(spec), _factorize_node)


def _densify_node(node: Mapping, entry: dict) -> dict:
    fmt = canonical_format(entry["format"])
    kind = entry.get("kind")
    extra = {"bias": node["bias"]} if "bias" in node else {}
    factors = {k: v for k, v in node.items() if k != "bias"}
    if fmt == "tubal":
        return {"kernel": tubal_to_kernel(Tubal.from_params(factors).to_dense()), **extra}
    if fmt == "low_rank":
        matrix = CP.from_params(factors).to_dense()
        return {"embedding": matrix} if kind == "embed" else {"kernel": matrix, **extra}
    grouped = {"cp": "factor_0", "tucker": "factor_0", "tt": "core_0", "tt_matrix": "core_0"}
    lead = factors[grouped[fmt]].ndim
    if kind is None:
        base = {"cp": 2, "tucker": 2, "tt": 3, "tt_matrix": 4}[fmt]
        kind = "conv" if lead == base + 1 or (fmt == "tt" and lead == 5) else "dense"
    if kind == "embed":
        return {"embedding": TTMatrix.from_params(factors).to_dense()}
    if kind == "dense":
        in_shape = entry.get("in_shape")
        n_in = 1 if in_shape is None else len(validation.check_shape(in_shape, "in_shape"))
        if fmt == "cp":
            w = CP.from_params(factors).to_dense()
        elif fmt == "tucker":
            w = Tucker.from_params(factors).to_dense()
        elif fmt == "tt":
            w = TT.from_params(factors).to_dense()
        else:
            return {"kernel": TTMatrix.from_params(factors).to_dense(), **extra}
        return {"kernel": w.reshape(math.prod(w.shape[:n_in]), -1), **extra}

    def one(group):
        if fmt == "cp":
            return CP.from_params(group).to_dense()
        if fmt == "tucker":
            core = group["core"]
            return Tucker.from_params(group, (core.ndim - 2, core.ndim - 1)).to_dense()
        return TTMatrix.from_params(group).to_dense()

    w = jax.vmap(one)(factors)  # (g, k..., C/g, F/g) or (g, K C/g, F/g)
    g = w.shape[0]
    if fmt in ("tt", "tt_matrix"):
        k = factors["core_0"].shape[2]
        ks = entry.get("kernel_size", (k,))
        w = w.reshape(g, *ks, -1, w.shape[-1])
    kernel = jnp.moveaxis(w, 0, -2)
    return {"kernel": kernel.reshape(*kernel.shape[:-2], -1), **extra}


def densify_params(params: Any, spec: Mapping[str, Mapping[str, Any]]) -> Any:
    """Inverse of `factorize_params`: rebuild dense kernels from factors.

    Args:
      params: a tree with factorized modules at the paths of ``spec``.
      spec: as for `factorize_params` ("format" required; "in_shape" for cp /
        tucker / tt dense kernels tensorized over several input modes; "kind"
        "embed" for embeddings; "kernel_size" for TT convs, whose factors only
        know the flattened spatial size; "to" renames back).

    Returns:
      A new tree with ``kernel`` (or ``embedding``) and ``bias`` at those paths.

    Raises:
      ValueError: for unknown paths or spec keys, or a spec entry without "format".
    """
    return _convert(params, check_factorize_spec(spec, required=("format",)), _densify_node)
