"""Flax NNX versions of the MNIST-1D models, and the adapter the trainer runs them through.

`MLP` and `CNN1D` are the NNX twins of `experiments.models.MLP` and
`experiments.models.CNN1D`: the same layers, the same initializers (lecun normal kernels,
zero biases: the defaults of both APIs) and attributes named as the Linen submodules, so
``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (what `sparsejax.nnx.functional`
returns) is exactly the Linen model's ``params`` tree: same paths, same shapes. ERK
distributions keyed by path, masks, checkpoints and export therefore see no difference.

NNX modules are built with their params and need the input size up front; Linen modules
take it from the example input of ``init``. `NNXAdapter` bridges the two for the trainer
(`experiments.state`, `experiments.sweep`, the tables), which only ever calls
``model.init(key, x)["params"]`` and ``model.apply({"params": params}, x)``: it builds the
NNX model for the input's shape and runs it through `sparsejax.nnx.functional`, a pure
``apply_fn(params, x)``. A run selects it with ``config.model.api = "nnx"``
(`experiments.models.make_model`).

Initialization: ``NNXAdapter.init(key, x)`` returns the Linen twin's initial params for the
same key. NNX and Linen derive per-layer keys differently, so the NNX model's own init
(``MLP(..., rngs=nnx.Rngs(key))``) draws other values from the same distributions;
defining the adapter's init as the twin's makes a seed mean the same weights under both
APIs, so switching ``config.model.api`` changes only which module computes the forward
pass and a run is checkable against its Linen twin (tests/experiments/test_nnx_models.py
holds the two runs' final params equal).

What Linen offers and the adapter does not: method interceptors. Straight-through
algorithms need none (the trainer hands the model ``algorithm.forward_params_with_state``,
pure over the params), but an algorithm whose ``model_context`` is a Linen interceptor
(Bi-Mask's backward mask on ``nn.Dense``) would silently not reach ``nnx.Linear`` layers:
`check_algorithm` refuses it. Train those NNX models with `sparsejax.nnx.forward_context`
in an NNX training step, or with ``config.model.api = "linen"``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import sparsejax.nnx
from sparsejax import algorithms

PyTree = Any

__all__ = [
    "CNN1D",
    "MLP",
    "NNXAdapter",
    "NNX_MODELS",
    "adapt",
    "check_algorithm",
]


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class MLP(nnx.Module):
    """Multilayer perceptron: flatten, ``Linear + ReLU`` per hidden width, then a ``Linear`` head.

    The NNX twin of `experiments.models.MLP` (MNIST-1D's baseline: two hidden layers of 100).

    Args:
      in_features: the flattened input size (MNIST-1D: 40).
      features: hidden widths, e.g. ``(100, 100)``; may be empty (a linear classifier).
      num_classes: output width.
      rngs: ``nnx.Rngs`` for the initial params.

    Input ``x: float[batch, ...]`` with ``in_features`` values an example (flattened), output
    logits ``float32[batch, num_classes]``. Params ``hidden_0, hidden_1, ...`` and ``output``,
    each ``{'kernel': [in, out], 'bias': [out]}``.

    Raises:
      ValueError: naming the argument, for a width that is not a positive int.

    Reference: Greydanus, "Scaling down Deep Learning", 2020.
    """

    def __init__(
        self,
        in_features: int,
        features: Sequence[int] = (100, 100),
        num_classes: int = 10,
        *,
        rngs: nnx.Rngs,
    ):
        _check_positive_int(in_features, "in_features")
        if not isinstance(features, Sequence) or isinstance(features, str):
            raise ValueError(f"features must be a sequence of positive ints, got {features!r}")
        for width in features:
            _check_positive_int(width, "every entry of features")
        _check_positive_int(num_classes, "num_classes")
        widths = (in_features, *features)
        # Attributes, not an nnx.List: the params are then keyed 'hidden_0' as in Linen.
        for i, (fan_in, fan_out) in enumerate(zip(widths, features, strict=False)):
            setattr(self, f"hidden_{i}", nnx.Linear(fan_in, fan_out, rngs=rngs))
        self.output = nnx.Linear(widths[-1], num_classes, rngs=rngs)
        self.num_hidden = len(features)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i in range(self.num_hidden):
            x = jax.nn.relu(getattr(self, f"hidden_{i}")(x))
        return self.output(x)


# (name, kernel size) of CNN1D's convs; all have stride 2 and padding 1 on both sides.
_CONVS = (("conv1", 5), ("conv2", 3), ("conv3", 3))


def _conv_length(length: int, kernel: int) -> int:
    """Output length of a stride-2 conv with one zero of padding on each side."""
    return (length + 2 - kernel) // 2 + 1


class CNN1D(nnx.Module):
    """The MNIST-1D 1D CNN: three strided ``Conv + ReLU`` layers, flatten, one ``Linear``.

    The NNX twin of `experiments.models.CNN1D`: conv1 kernel 5, conv2 and conv3 kernel 3,
    all stride 2 with padding 1, then the head on the flattened (length-major,
    channels-last) features. A length-``L`` input shrinks as ``L' = (L + 2 - k) // 2 + 1``
    (40 -> 19 -> 10 -> 5), so the head ``dense`` has ``5 * channels`` inputs for MNIST-1D;
    NNX sizes it at construction, hence ``length``.

    Args:
      in_channels: input channels (MNIST-1D: 1).
      length: input length (MNIST-1D: 40); at least 3.
      channels: width of every conv layer.
      num_classes: output width.
      rngs: ``nnx.Rngs`` for the initial params.

    Input ``x: float[batch, length, in_channels]``, output logits
    ``float32[batch, num_classes]``. Params ``conv1, conv2, conv3`` (kernels
    ``[k, in, channels]``) and ``dense`` (``[L' * channels, num_classes]``), with biases.

    Raises:
      ValueError: naming the argument, for a size that is not a positive int or a
        ``length`` the convs shrink to nothing.

    Reference: Greydanus, "Scaling down Deep Learning", 2020.
    """

    def __init__(
        self,
        in_channels: int = 1,
        length: int = 40,
        channels: int = 64,
        num_classes: int = 10,
        *,
        rngs: nnx.Rngs,
    ):
        for value, name in (
            (in_channels, "in_channels"),
            (length, "length"),
            (channels, "channels"),
            (num_classes, "num_classes"),
        ):
            _check_positive_int(value, name)
        if length < _CONVS[0][1] - 2:
            raise ValueError(f"length must be at least {_CONVS[0][1] - 2}, got {length}")
        fan_in, out_length = in_channels, length
        for name, kernel in _CONVS:
            # Explicit symmetric padding (not 'SAME'), as the Linen twin and the paper.
            conv = nnx.Conv(fan_in, channels, (kernel,), (2,), padding=((1, 1),), rngs=rngs)
            setattr(self, name, conv)
            fan_in, out_length = channels, _conv_length(out_length, kernel)
        self.dense = nnx.Linear(out_length * channels, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for name, _ in _CONVS:
            x = jax.nn.relu(getattr(self, name)(x))
        return self.dense(x.reshape(x.shape[0], -1))


def _build_mlp(twin: nn.Module, input_shape: tuple[int, ...], rngs: nnx.Rngs) -> nnx.Module:
    return MLP(math.prod(input_shape), tuple(twin.features), twin.num_classes, rngs=rngs)


def _build_cnn1d(twin: nn.Module, input_shape: tuple[int, ...], rngs: nnx.Rngs) -> nnx.Module:
    if len(input_shape) != 2:
        raise ValueError(
            f"cnn1d takes inputs [batch, length, channels], got one example of shape {input_shape}"
        )
    length, in_channels = input_shape
    return CNN1D(in_channels, length, twin.channels, twin.num_classes, rngs=rngs)


# The experiments.models names with an NNX twin: (twin's attributes, input shape) -> model.
_BUILDERS: dict[str, Callable[[nn.Module, tuple[int, ...], nnx.Rngs], nnx.Module]] = {
    "cnn1d": _build_cnn1d,
    "mlp": _build_mlp,
}
NNX_MODELS = tuple(sorted(_BUILDERS))


@functools.lru_cache(maxsize=64)
def _functional(
    name: str, twin: nn.Module, input_shape: tuple[int, ...]
) -> tuple[Callable[..., jax.Array], PyTree]:
    """`sparsejax.nnx.functional` of the NNX model for one example shape, and its param shapes.

    The model is built abstractly (no FLOPs, no random draws): only its graph is kept, the
    params always come from the caller.
    """
    model = nnx.eval_shape(lambda: _BUILDERS[name](twin, input_shape, nnx.Rngs(0)))
    apply_fn, params = sparsejax.nnx.functional(model)
    return apply_fn, jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)


def _shapes(tree: PyTree) -> dict[str, tuple[tuple[int, ...], Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): (jnp.shape(x), jnp.result_type(x)) for path, x in leaves}


@dataclasses.dataclass(frozen=True)
class NNXAdapter:
    """An NNX model behind Linen's ``init`` / ``apply``, for the trainer: `adapt` builds one.

    Hashable and stateless like a Linen module: the NNX model is built (abstractly, once
    per example shape) from ``twin``'s attributes and the input's shape, and run through
    `sparsejax.nnx.functional`.

    Attributes:
      name: the `experiments.models` name (one of `NNX_MODELS`).
      twin: the Linen model with the same params tree; its ``init`` is the adapter's.
    """

    name: str
    twin: nn.Module

    def nnx_model(self, x: jax.Array, *, rngs: nnx.Rngs) -> nnx.Module:
        """The NNX model for inputs like ``x`` (``[batch, ...]``), initialized by ``rngs``."""
        return _BUILDERS[self.name](self.twin, tuple(jnp.shape(x)[1:]), rngs)

    def _functional(self, x: jax.Array):
        shape = jnp.shape(x)
        if len(shape) < 2:
            raise ValueError(f"x must be a batch [batch, ...], got shape {shape}")
        return _functional(self.name, self.twin, tuple(shape[1:]))

    def init(self, key: jax.Array, x: jax.Array) -> dict[str, PyTree]:
        """``{'params': params}``: the Linen twin's initial params for ``key`` (see module doc).

        Args:
          key: a ``jax.random.key``.
          x: an example batch ``[batch, ...]`` (shapes only).

        Returns:
          ``{'params': ...}`` in the layout of the NNX model's ``nnx.Param`` state.

        Raises:
          ValueError: if the twin's params are not the NNX model's tree (paths, shapes).
        """
        params = self.twin.init(key, x)["params"]
        _, expected = self._functional(x)
        if _shapes(params) != _shapes(expected):
            raise ValueError(
                f"the Linen {self.name!r} params {_shapes(params)} are not the NNX model's "
                f"{_shapes(expected)}"
            )
        return {"params": params}

    def apply(self, variables: dict[str, PyTree], x: jax.Array) -> jax.Array:
        """The NNX model's output on ``x`` with ``variables['params']``: pure, jit-able.

        Args:
          variables: ``{'params': params}`` (the models have no other collections).
          x: an input batch ``[batch, ...]``.

        Returns:
          Logits ``float32[batch, num_classes]``.

        Raises:
          ValueError: for collections other than ``'params'``.
        """
        if set(variables) != {"params"}:
            raise ValueError(
                f"variables must be {{'params': ...}} (the NNX models keep no other "
                f"collections), got keys {sorted(variables)}"
            )
        apply_fn, _ = self._functional(x)
        return apply_fn(variables["params"], x)


def adapt(name: str, twin: nn.Module) -> NNXAdapter:
    """The `NNXAdapter` running the NNX twin of the Linen model ``twin``.

    Args:
      name: ``twin``'s `experiments.models` name.
      twin: the Linen model (``experiments.models.get_model(name, ...)``).

    Returns:
      The adapter.

    Raises:
      ValueError: for a ``name`` without an NNX version (the message lists those with one)
        and for a factorized twin (its tensor-network layers have no NNX twin here).
    """
    if name not in _BUILDERS:
        raise ValueError(
            f"config.model.api='nnx' has NNX versions of the models {list(NNX_MODELS)}, "
            f"got config.model.name={name!r}"
        )
    if getattr(twin, "factorize", ()):
        raise ValueError(
            "config.model.factorize is not supported with config.model.api='nnx' (the NNX "
            f"models here are dense); got factorize={twin.factorize!r}"
        )
    return NNXAdapter(name, twin)


def check_algorithm(model: Any, algorithm: algorithms.Algorithm) -> None:
    """Refuses an algorithm the model cannot run: a Linen interceptor with an NNX model.

    Args:
      model: what `experiments.models.make_model` returned (a Linen module or an
        `NNXAdapter`).
      algorithm: the run's algorithm.

    Raises:
      ValueError: naming ``config.model.api`` and the algorithm, if ``model`` is an
        `NNXAdapter` and the algorithm changes layers through ``model_context`` (a Linen
        method interceptor the NNX layers would silently escape: Bi-Mask).
    """
    if not isinstance(model, NNXAdapter):
        return
    if type(algorithm).model_context is not algorithms.Algorithm.model_context:
        raise ValueError(
            f"config.model.api='nnx' cannot train with algorithm={type(algorithm).__name__}: "
            "its model_context changes layers through a Linen method interceptor, which "
            "nnx.Linear / nnx.Conv layers do not pass; use config.model.api='linen', or "
            "sparsejax.nnx.forward_context in an NNX training step"
        )
