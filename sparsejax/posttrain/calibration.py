"""Calibration inputs of a model's Dense and Conv layers, captured without changing the model.

Every ``flax.linen.Dense`` / ``flax.linen.Conv`` call is seen through
`flax.linen.intercept_methods` (the mechanism `sparsejax.flops` uses), so any Linen model
works as written. A Conv's input becomes a matrix of im2col patches whose columns line up
with the kernel flattened to ``[window * in, out]``, so one pruner serves both layer types.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "LayerCall",
    "capture_input",
    "capture_inputs",
    "input_matrix",
    "layer_calls",
    "outlier_ratios",
]


class LayerCall(NamedTuple):
    """One Dense or Conv layer of a model, in call order.

    Attributes:
      path: the layer's parameter path, e.g. ``('block_0', 'attention', 'query')``;
        its kernel is ``params[path...]['kernel']``.
      module: the bound module (Dense or Conv), for its hyperparameters.
    """

    path: tuple[str, ...]
    module: nn.Module

    @property
    def name(self) -> str:
        return "/".join(self.path)


def _is_layer(module: Any) -> bool:
    return isinstance(module, (nn.Dense, nn.Conv))


def layer_calls(apply_fn: Callable[..., Any], variables: Any, x: Any) -> list[LayerCall]:
    """The Dense and Conv layers ``apply_fn(variables, x)`` calls, in order (shapes only).

    Args:
      apply_fn: e.g. ``model.apply``.
      variables: e.g. ``{"params": params}`` (arrays or `jax.ShapeDtypeStruct`).
      x: an input batch (array or `jax.ShapeDtypeStruct`).

    Returns:
      One `LayerCall` per layer.

    Raises:
      ValueError: if a layer is called more than once (its calibration inputs would be
        ambiguous).
    """
    calls: list[LayerCall] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and _is_layer(context.module):
            calls.append(LayerCall(tuple(context.module.path), context.module))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(apply_fn, variables, x)
    names = [c.name for c in calls]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"layers {repeated} are called more than once; cannot calibrate them")
    return calls


class _Captured(Exception):
    """Stops the forward pass once the wanted layer's input is seen."""

    def __init__(self, value):
        super().__init__("captured")
        self.value = value


def capture_input(
    apply_fn: Callable[..., Any], variables: Any, x: jax.Array, path: tuple[str, ...]
) -> jax.Array:
    """The input the layer at ``path`` receives in ``apply_fn(variables, x)``.

    The forward pass stops at that layer (nothing after it runs).

    Args:
      apply_fn: e.g. ``model.apply``.
      variables: e.g. ``{"params": params}``.
      x: calibration batch.
      path: the layer's path (`LayerCall.path`).

    Returns:
      The layer's input array, e.g. ``[batch, tokens, features]``.

    Raises:
      ValueError: if no Dense/Conv layer at ``path`` is called.
    """
    path = tuple(path)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and _is_layer(module) and module.path == path:
            raise _Captured(args[0])
        return next_fun(*args, **kwargs)

    try:
        with nn.intercept_methods(interceptor):
            apply_fn(variables, x)
    except _Captured as captured:
        return captured.value
    raise ValueError(f"no Dense or Conv layer at path={'/'.join(path)!r} was called")


def capture_inputs(
    apply_fn: Callable[..., Any],
    variables: Any,
    x: jax.Array,
    paths: Sequence[tuple[str, ...]],
) -> dict[tuple[str, ...], jax.Array]:
    """The inputs several layers receive in one forward pass ``apply_fn(variables, x)``.

    The pass stops once the last of them has been seen.

    Args:
      apply_fn, variables, x: as for `capture_input`.
      paths: the layers' paths (`LayerCall.path`).

    Returns:
      ``{path: input array}``.

    Raises:
      ValueError: naming the paths no Dense/Conv layer was called at.
    """
    wanted = {tuple(p) for p in paths}
    seen: dict[tuple[str, ...], jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and _is_layer(module) and module.path in wanted:
            seen[tuple(module.path)] = args[0]
            if len(seen) == len(wanted):
                raise _Captured(seen)
        return next_fun(*args, **kwargs)

    if not wanted:
        return {}
    try:
        with nn.intercept_methods(interceptor):
            apply_fn(variables, x)
    except _Captured:
        return dict(seen)
    missing = sorted("/".join(p) for p in wanted - set(seen))
    raise ValueError(f"no Dense or Conv layer was called at paths {missing}")


def _tuple(value: Any, rank: int, name: str) -> tuple[int, ...]:
    if value is None:
        return (1,) * rank
    if isinstance(value, (int, np.integer)):
        return (int(value),) * rank
    value = tuple(int(v) for v in value)
    if len(value) != rank:
        raise ValueError(f"{name}={value} must have {rank} entries")
    return value


def input_matrix(module: nn.Module, x: jax.Array) -> jax.Array:
    """A layer's input as ``[tokens, fan_in]``, the X of the layer-wise problem ``X @ kernel``.

    Args:
      module: the Dense or Conv (from `LayerCall.module`).
      x: its input, channels last with leading batch axes.

    Returns:
      Dense: ``x`` flattened to ``[-1, in]``. Conv: its im2col patches ``[-1, window * in]``,
      ordered (window position, input channel) like ``kernel.reshape(-1, out)``, so
      ``input_matrix(conv, x) @ kernel.reshape(-1, out)`` is the conv output without bias.

    Raises:
      ValueError: for a grouped, circular or causal convolution, or another module type.
    """
    if isinstance(module, nn.Dense):
        return x.reshape(-1, x.shape[-1])
    if not isinstance(module, nn.Conv):
        raise ValueError(f"module must be a Dense or Conv, got {type(module).__name__}")
    if module.feature_group_count != 1:
        raise ValueError(
            f"grouped convolutions are not supported, got feature_group_count="
            f"{module.feature_group_count}"
        )
    # Flax reads an int kernel_size as a 1D kernel.
    size = module.kernel_size
    kernel_size = (int(size),) if isinstance(size, (int, np.integer)) else tuple(size)
    rank = len(kernel_size)
    padding = nn.linear.canonicalize_padding(module.padding, rank)
    if isinstance(padding, str) and padding not in ("SAME", "VALID"):
        raise ValueError(f"padding={padding!r} is not supported for calibration")
    x = x.reshape(-1, *x.shape[-rank - 1 :])
    spatial = "DHW"[-rank:] if rank <= 3 else None
    if spatial is None:
        raise ValueError(f"convolutions of rank {rank} > 3 are not supported")
    patches = lax.conv_general_dilated_patches(
        x,
        kernel_size,
        _tuple(module.strides, rank, "strides"),
        padding,
        lhs_dilation=_tuple(module.input_dilation, rank, "input_dilation"),
        rhs_dilation=_tuple(module.kernel_dilation, rank, "kernel_dilation"),
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
    )
    channels = x.shape[-1]
    # The patches' features come channel-major (channel, window); the kernel is
    # (window..., channel, out), so swap to (window, channel).
    patches = patches.reshape(-1, channels, int(np.prod(kernel_size)))
    return jnp.swapaxes(patches, 1, 2).reshape(-1, int(np.prod(kernel_size)) * channels)


def outlier_ratios(
    apply_fn: Callable[..., Any], variables: Any, x: jax.Array, paths: Sequence[tuple[str, ...]]
) -> dict[str, float]:
    """Input-feature outliers per layer: the largest input-feature norm over the median one.

    For a layer with calibration inputs X ``[tokens, in]`` (`input_matrix`), the feature
    norms are ``||X[:, j]||_2``; the ratio ``max_j / median_j`` is large when a few input
    features carry most of the magnitude, the emergent outlier features of large
    transformers that make ``|W|·||X||`` (Wanda) choose better weights than ``|W|``.

    References: Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at
    Scale" (2022); Sun et al., "A Simple and Effective Pruning Approach for Large Language
    Models" (Wanda, 2024).

    Args:
      apply_fn, variables, x: as for `capture_inputs` (one forward pass).
      paths: the layers to measure (`LayerCall.path`).

    Returns:
      ``{layer name: max / median feature norm}``.
    """
    calls = {c.path: c for c in layer_calls(apply_fn, variables, x)}
    inputs = capture_inputs(apply_fn, variables, x, paths)
    ratios = {}
    for path in paths:
        matrix = input_matrix(calls[tuple(path)].module, inputs[tuple(path)])
        norms = np.linalg.norm(np.asarray(matrix, np.float64), axis=0)
        ratios["/".join(path)] = float(norms.max() / max(np.median(norms), 1e-30))
    return ratios
