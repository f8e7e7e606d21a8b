"""The Flax NNX front end: NNX models through the same pure sparsity functions as Linen models.

Every algorithm, mask, score and pruner of sparsejax is one implementation over parameter
pytrees. This module is the only place where Linen and NNX differ, and it only adapts inputs:

- **Parameters.** Linen keeps them in nested dicts handed to ``model.apply``; an NNX
  module owns them as `nnx.Param` Variables. Here the pure side is always the Linen
  layout: ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``, nested dicts of arrays keyed
  by attribute names (and list indices), which ``nnx.update`` and ``nnx.merge`` take back.
  `functional` splits a module into those params and a pure ``apply_fn(params, x)``: what
  the model-based algorithms take (`masks_from_model`: SNIP, GraSP and SynFlow of
  `sparsejax.algorithms.PruneAtInit`).
- **The optimizer.** A Linen trainer calls ``tx.init(params)`` and ``tx.update`` on the same
  dicts of arrays. ``nnx.Optimizer`` hands ``tx.init`` an `nnx.State` of Variables,
  ``tx.update`` an `nnx.State` of arrays, and writes the new state back into one Variable
  per leaf. ``masked(tx, algorithm)`` works under it as is for the masks sparsejax's own
  algorithms draw, but a bit-packed mask (``packed=True``, a pytree) does not survive that
  write-back, masks given as ``masked(..., masks=...)`` are not keyed like Variables, and
  algorithms that rebuild dicts (tensornets' rank-adaptive ones) change the tree type.
  `optimizer` builds an ``nnx.Optimizer`` whose ``tx`` sees the Linen layout in both calls,
  which serves all cases. `get_masks` and `sparsify` read an optimizer.
- **The forward pass.** A Linen step runs ``model.apply`` on
  ``algorithm.forward_params_with_state(...)`` inside ``algorithm.model_context(...)``, a
  Linen method interceptor. An NNX model computes with its own Variables, so
  `forward_context` writes the forward params into them for the duration of the call (the
  gradient still reaches the dense weights, straight through) and puts the dense ones back.
  NNX has no method interceptors: the layers of one model are reached by wrapping
  ``nnx.Linear.__call__`` / ``nnx.Conv.__call__`` for exactly that model's layer objects
  (found, with their paths, by ``nnx.iter_graph``) while a context is open. Bi-Mask's
  backward mask, a Linen interceptor on ``nn.Dense``, is done that way on ``nnx.Linear``.
- **Layer calls.** `sparsejax.posttrain` finds a Linen model's Dense and Conv layers in call
  order and captures their inputs through interceptors; `prune_model` does the same with
  the wrapped calls, describes each layer by its Linen twin (an unbound ``nn.Dense`` /
  ``nn.Conv`` with the same hyperparameters, for `sparsejax.posttrain.input_matrix`) and runs
  the one layer loop, `sparsejax.posttrain.prune_calls`.
- **Real sparse storage.** `SparseLinear` (the NNX `sparsejax.nn.SparseDense`) stores a
  Linear kernel as BSR or N:M values, and `export_model` turns a trained model and its
  masks into one (`sparsejax.export.export` for Linen params); both live in
  `sparsejax.nnx_sparse` and are re-exported here.

A training step, with any registered algorithm::

    opt = sparsejax.nnx.optimizer(model, masked(optax.adam(1e-3), algorithm))
    sparsejax.nnx.sparsify(model, opt)  # once (not for straight-through algorithms)

    @nnx.jit
    def train_step(model, opt, x, y):
        def loss_fn(model):
            with sparsejax.nnx.forward_context(model, opt, algorithm):
                return cross_entropy(model(x), y)
        grads = nnx.grad(loss_fn)(model)
        opt.update(model, grads)

Checkpoints are ``nnx.state(opt)`` (masks, counters and keys are in it) through orbax.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparsejax import algorithms, posttrain, transforms
from sparsejax import masks as masks_lib
from sparsejax.algorithms.nm_bimask import bidirectional_matmul
from sparsejax.nnx_sparse import SparseIndices, SparseLinear, export_model

PyTree = Any

__all__ = [
    "SparseIndices",
    "SparseLinear",
    "export_model",
    "forward_context",
    "functional",
    "get_masks",
    "linen_twin",
    "masks_from_model",
    "optimizer",
    "prune_model",
    "sparsify",
]

# The layer types whose calls are reached (the NNX twins of Linen's Dense and Conv).
_LAYERS = (nnx.Linear, nnx.Conv)


def _check_model(model: Any) -> None:
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be an nnx.Module, got model={type(model).__name__}")


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, nnx.Optimizer):
        raise ValueError(
            f"optimizer must be an nnx.Optimizer, got optimizer={type(optimizer).__name__}"
        )


def _params(model: nnx.Module, wrt: Any = nnx.Param) -> dict:
    """The model's params in the Linen layout: nested dicts of arrays."""
    return nnx.to_pure_dict(nnx.state(model, wrt))


def functional(model: nnx.Module, *, wrt: Any = nnx.Param) -> tuple[Callable[..., Any], dict]:
    """The model as a pure function and its params: ``(apply_fn, params)``.

    Args:
      model: an NNX module.
      wrt: the filter of the Variables that are params (``nnx.Param``).

    Returns:
      ``params``: ``nnx.to_pure_dict(nnx.state(model, wrt))``, nested dicts of arrays in
      the Linen layout. ``apply_fn(params, *args, **kwargs)``: the output of
      ``model(*args, **kwargs)`` computed with ``params``; jit- and differentiable. It
      runs on a copy of the model's other state (batch statistics, RNG counters), so it
      never changes ``model``; put the model in the mode you want (``model.eval()``)
      before calling this.

    Raises:
      ValueError: if ``model`` is not an ``nnx.Module``.
    """
    _check_model(model)
    graphdef, params, rest = nnx.split(model, wrt, ...)
    # Arrays, not the model's Variables: merging them makes fresh Variables, so a forward
    # pass that updates batch statistics updates the copy only (and leaks no tracer).
    rest = nnx.as_pure(rest)

    def apply_fn(params: dict, *args: Any, **kwargs: Any) -> Any:
        return nnx.merge(graphdef, params, rest)(*args, **kwargs)

    return apply_fn, nnx.to_pure_dict(params)


def masks_from_model(
    algorithm: algorithms.Algorithm,
    model: nnx.Module,
    *,
    key: jax.Array,
    batch: tuple[jax.Array, jax.Array] | None = None,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    input_shape: Sequence[int] | None = None,
) -> PyTree | None:
    """``algorithm.masks_from_model`` of an NNX model (SNIP, GraSP, SynFlow before training).

    Args:
      algorithm: e.g. ``algorithms.get('grasp', sparsity=0.9)`` or
        ``algorithms.PruneAtInit(score='snip', rounds=1)``.
      model: the NNX model at initialization.
      key, batch, loss_fn, input_shape: as for `sparsejax.algorithms.Algorithm.masks_from_model`
        (``loss_fn(model(x) / temperature, y)`` is the scored loss).

    Returns:
      A mask tree in the layout of `functional`'s params, or None for algorithms that
      draw their own masks. Pass it as ``masked(..., masks=masks)`` to an optimizer built
      by `optimizer`.
    """
    apply_fn, params = functional(model)
    return algorithm.masks_from_model(
        params, key=key, apply_fn=apply_fn, batch=batch, loss_fn=loss_fn, input_shape=input_shape
    )


def optimizer(
    model: nnx.Module, tx: optax.GradientTransformation, *, wrt: Any = nnx.Param
) -> nnx.Optimizer:
    """``nnx.Optimizer(model, tx, wrt=wrt)`` whose ``tx`` sees params in the Linen layout.

    ``nnx.Optimizer`` initializes ``tx`` on an `nnx.State` of Variables and updates it on
    an `nnx.State` of arrays. Built here, ``tx.init`` and ``tx.update`` both get nested
    dicts of arrays (`functional`'s layout) and the updates go back as an `nnx.State`, so
    ``masked`` keeps exactly the state it keeps for the Linen twin: bit-packed masks,
    ``masked(..., masks=...)`` and algorithms that rebuild dicts all work. (The optimizer
    state carries no Variable metadata such as ``optimizer_sharding``.)

    Args:
      model: the NNX model.
      tx: e.g. ``masked(optax.adam(1e-3), algorithm)``.
      wrt: the filter of the trained Variables, as for ``nnx.Optimizer``.

    Returns:
      The ``nnx.Optimizer``; train with ``opt.update(model, grads)``.

    Raises:
      ValueError: for a ``model`` that is not an ``nnx.Module`` or a ``tx`` that is not an
        optax transformation.
    """
    _check_model(model)
    if not isinstance(tx, optax.GradientTransformation):
        raise ValueError(f"tx must be an optax.GradientTransformation, got tx={type(tx)!r}")

    def init(params):
        return tx.init(nnx.to_pure_dict(params))

    def update(updates, state, params=None, **extra_args):
        pure = None if params is None else nnx.to_pure_dict(params)
        updates, state = tx.update(nnx.to_pure_dict(updates), state, pure, **extra_args)
        return nnx.State(updates), state

    # _replace keeps the class (GradientTransformationExtraArgs too).
    return nnx.Optimizer(model, tx._replace(init=init, update=update), wrt=wrt)


def get_masks(optimizer: nnx.Optimizer) -> dict:
    """The masks of the `masked` state inside ``optimizer``, keyed like the model's params.

    Args:
      optimizer: an ``nnx.Optimizer`` with ``masked(...)`` in its transformation (built
        by `optimizer`, or a plain one).

    Returns:
      Nested dicts of bool arrays in `functional`'s layout (bit-packed masks unpacked),
      None on the leaves that are not sparsified.

    Raises:
      ValueError: as `sparsejax.transforms.get_masks`, for an ``optimizer`` that is not an
        ``nnx.Optimizer``, and for bit-packed masks that a plain ``nnx.Optimizer`` wrote
        back as bytes (build it with `optimizer`).
    """
    _check_optimizer(optimizer)
    masks = transforms.get_masks(nnx.as_pure(optimizer.opt_state))
    for path, mask in jax.tree_util.tree_flatten_with_path(masks, is_leaf=masks_lib.is_none)[0]:
        if mask is not None and jnp.result_type(mask) != jnp.bool_:
            raise ValueError(
                f"optimizer holds a mask of dtype {jnp.result_type(mask)} at "
                f"{masks_lib.path_name(path)}: bit-packed masks do not survive a plain "
                "nnx.Optimizer's update; build it with sparsejax.nnx.optimizer(model, tx)"
            )
    # A plain nnx.Optimizer keeps them in an nnx.State.
    return nnx.to_pure_dict(masks) if isinstance(masks, nnx.State) else masks


def _algo_state(opt_state: PyTree) -> PyTree:
    """The algorithm's state in the first `MaskedState` of a pure ``opt_state``."""
    is_state = lambda x: isinstance(x, transforms.MaskedState)  # noqa: E731
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]
    return found[0].algo_state if found else ()


def sparsify(model: nnx.Module, optimizer: nnx.Optimizer) -> None:
    """Zeroes, in place, the weights of ``model`` that the masks of ``optimizer`` prune.

    Call it once after building the optimizer, so the first forward pass already runs on
    the initial sparse network (`sparsejax.transforms.sparsify` for a Linen params tree);
    every later ``optimizer.update`` keeps them zero. Not for straight-through algorithms,
    which keep dense weights (`forward_context` masks them).

    Raises:
      ValueError: as `get_masks`, and if ``model`` is not an ``nnx.Module``.
    """
    _check_model(model)
    nnx.update(model, masks_lib.apply_masks(_params(model, optimizer.wrt), get_masks(optimizer)))


@contextlib.contextmanager
def _patched_layers(model: nnx.Module, call: Callable[..., Any]) -> Iterator[None]:
    """Routes every call of ``model``'s ``nnx.Linear`` / ``nnx.Conv`` layers through ``call``.

    ``call(path, layer, original, args, kwargs)`` runs instead of ``layer(*args, **kwargs)``,
    ``original(layer, *args, **kwargs)`` being the layer's own ``__call__`` and ``path`` its
    key path in the model (``('layers', 0)``). NNX has no method interceptors, so the
    classes' ``__call__`` is swapped while the context is open; layers of other models
    (and layers created during the call) run unchanged. A subclass that overrides
    ``__call__`` without calling ``super().__call__`` is not reached.
    """
    paths = {
        id(node): tuple(path) for path, node in nnx.iter_graph(model) if isinstance(node, _LAYERS)
    }
    originals = {cls: cls.__dict__["__call__"] for cls in _LAYERS}

    def wrap(original):
        def __call__(self, *args, **kwargs):
            path = paths.get(id(self))
            if path is None:
                return original(self, *args, **kwargs)
            return call(path, self, original, args, kwargs)

        return __call__

    for cls, original in originals.items():
        cls.__call__ = wrap(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


def _flat(tree: PyTree) -> dict[tuple[Any, ...], Any]:
    """``{key path: leaf}`` of a pure State or nested dict, None leaves included."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=masks_lib.is_none)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in leaves}


def _bimask_context(algorithm, model, params, masks_tree, algo_state):
    """`sparsejax.algorithms.BiMask.model_context` for the ``nnx.Linear`` layers of ``model``."""
    forward = _flat(algorithm.forward_masks(params, masks_tree, algo_state))
    backward = _flat(algorithm.backward_masks(jax.lax.stop_gradient(params)))
    dense = _flat(params)

    def call(path, layer, original, args, kwargs):
        key = (*path, "kernel")
        forward_mask, backward_mask = forward.get(key), backward.get(key)
        if not isinstance(layer, nnx.Linear) or forward_mask is None or backward_mask is None:
            return original(layer, *args, **kwargs)
        y = bidirectional_matmul(args[0], dense[key], forward_mask, backward_mask)
        return y if layer.bias is None else y + layer.bias[...]

    return _patched_layers(model, call)


# Algorithms whose `model_context` (a Linen interceptor by contract) has an NNX version here.
_NNX_CONTEXTS = {algorithms.BiMask: _bimask_context}


def _model_context(algorithm, model, params, masks_tree, algo_state):
    if type(algorithm).model_context is algorithms.Algorithm.model_context:
        return contextlib.nullcontext()
    for cls, make in _NNX_CONTEXTS.items():
        if isinstance(algorithm, cls):
            return make(algorithm, model, params, masks_tree, algo_state)
    raise ValueError(
        f"algorithm={type(algorithm).__name__} changes layers through a Linen interceptor "
        f"(model_context); sparsejax.nnx has NNX versions for {[c.__name__ for c in _NNX_CONTEXTS]}"
    )


@contextlib.contextmanager
def forward_context(
    model: nnx.Module, optimizer: nnx.Optimizer, algorithm: algorithms.Algorithm
) -> Iterator[nnx.Module]:
    """Runs ``model`` as a sparse-training step must: on the algorithm's forward params.

    Inside the context the model's params are
    ``algorithm.forward_params_with_state(params, masks, algo_state)`` (for straight-through
    algorithms ``w * mask`` with the mask recomputed from ``w``; the params themselves
    otherwise), written into its Variables so the gradient of the loss still reaches the
    dense weights, and the algorithm's layer changes are active (Bi-Mask's backward mask on
    ``nnx.Linear``). On exit the dense params are put back. This is the NNX form of the
    Linen step's ``model.apply({'params': forward}, x)`` inside ``algorithm.model_context``.

    Open it inside the function ``nnx.grad`` differentiates (and inside ``nnx.jit``), on the
    model that function receives::

        def loss_fn(model):
            with forward_context(model, opt, algorithm):
                return loss(model(x), y)

    Args:
      model: the NNX model being trained.
      optimizer: its ``nnx.Optimizer`` with ``masked(..., algorithm)``.
      algorithm: the algorithm of that ``masked``.

    Yields:
      ``model``.

    Raises:
      ValueError: as `get_masks`, and for an algorithm whose ``model_context`` has no NNX
        version here.
    """
    _check_model(model)
    dense = _params(model, optimizer.wrt)
    masks_tree = get_masks(optimizer)
    algo_state = _algo_state(nnx.as_pure(optimizer.opt_state))
    layers = _model_context(algorithm, model, dense, masks_tree, algo_state)
    nnx.update(model, algorithm.forward_params_with_state(dense, masks_tree, algo_state))
    try:
        with layers:
            yield model
    finally:
        nnx.update(model, dense)


# --------------------------------------------------------------- post-training pruning
class _Captured(Exception):
    """Stops the forward pass once every wanted layer input is seen."""


def linen_twin(layer: nnx.Module) -> nn.Module:
    """The unbound Linen ``nn.Dense`` / ``nn.Conv`` with ``layer``'s hyperparameters.

    Args:
      layer: an ``nnx.Linear`` or ``nnx.Conv``.

    Returns:
      A Linen layer whose params (``kernel``, ``bias``) have the NNX layer's names, shapes
      and dtypes and whose call computes the same function: what Linen-side code (e.g.
      `sparsejax.posttrain.input_matrix`, `tensornets.layers.Factorized`) reads a layer by.

    Raises:
      ValueError: for any other layer type.
    """
    common = {
        "use_bias": layer.bias is not None,
        "dtype": layer.dtype,
        "param_dtype": layer.param_dtype,
        "precision": layer.precision,
    }
    if isinstance(layer, nnx.Linear):
        return nn.Dense(layer.out_features, **common)
    if isinstance(layer, nnx.Conv):
        return nn.Conv(
            layer.out_features,
            kernel_size=layer.kernel_size,
            strides=layer.strides,
            padding=layer.padding,
            input_dilation=layer.input_dilation,
            kernel_dilation=layer.kernel_dilation,
            feature_group_count=layer.feature_group_count,
            **common,
        )
    raise ValueError(f"layer must be an nnx.Linear or nnx.Conv, got layer={type(layer).__name__}")


def _names(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(k) for k in path)


def _nested(params: dict) -> dict:
    """``params`` with every key a string (`prune_calls`'s layout; list indices are ints)."""
    out: dict = {}
    for path, leaf in _flat(params).items():
        node = out
        for key in _names(path[:-1]):
            node = node.setdefault(key, {})
        node[str(path[-1])] = leaf
    return out


def _keys_like(nested: dict, like: dict) -> dict:
    """The inverse of `_nested`: ``nested``'s leaves at the key paths of ``like``."""

    def leaf(path, _):
        node = nested
        for key in path:
            node = node.get(str(key.key)) if isinstance(node, dict) else None
        return node

    return jax.tree_util.tree_map_with_path(leaf, like)


def prune_model(
    model: nnx.Module,
    x: jax.Array,
    *,
    method: str,
    sparsity: Any = 0.0,
    n: int | None = None,
    m: int | None = None,
    dsnot: Any = False,
    skip: Sequence[str] = (),
    block_depth: int | None = None,
    block_shape: tuple[int, int] | None = None,
    **options: Any,
) -> posttrain.PruneResult:
    """`sparsejax.posttrain.prune_model` for an NNX model: every ``nnx.Linear`` / ``nnx.Conv``.

    Layers are pruned in call order, each calibrated on the inputs it receives from the
    model with the layers before it already pruned (the same loop, `posttrain.prune_calls`,
    and the same pruners as for Linen). ``model`` is not changed: apply the result with
    ``nnx.update(model, result.params)``. Put the model in evaluation mode first
    (``model.eval()``); its other state is copied, never updated.

    Args:
      model: the trained NNX model; ``model(x)`` must run.
      x: a calibration batch of model inputs.
      method, sparsity, n, m, dsnot, block_depth, block_shape, **options: as for
        `sparsejax.posttrain.prune_model`.
      skip: layer names left dense, the layer's path joined by '/' (``'layers/0'``).

    Returns:
      A `sparsejax.posttrain.PruneResult` whose ``params`` and ``masks`` are in the layout
      of `functional`'s params (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``).

    Raises:
      ValueError: as `sparsejax.posttrain.prune_model`, and if ``model`` is not an
        ``nnx.Module`` or a layer is called more than once.
    """
    _check_model(model)
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"x must be a batch of at least one example, got shape {x.shape}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.as_pure(rest)
    if not jax.tree.leaves(params):
        raise ValueError(f"model must have nnx.Param arrays, got none in {type(model).__name__}")

    def run(state: dict, call: Callable[..., Any]) -> Any:
        copy = nnx.merge(graphdef, state, rest)
        with _patched_layers(copy, call):
            return copy(x)

    calls: list[posttrain.LayerCall] = []

    def record(path, layer, original, args, kwargs):
        calls.append(posttrain.LayerCall(_names(path), linen_twin(layer)))
        return original(layer, *args, **kwargs)

    try:
        jax.eval_shape(lambda p: run(p, record), params)
    except (TypeError, ValueError) as error:
        raise ValueError(f"x of shape {x.shape} does not fit the model: {error}") from None
    names = [c.name for c in calls]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"layers {repeated} are called more than once; cannot calibrate them")

    def capture(nested: dict, paths: list[tuple[str, ...]]) -> dict:
        wanted, seen = set(paths), {}

        def grab(path, layer, original, args, kwargs):
            if _names(path) in wanted:
                seen[_names(path)] = args[0]
                if len(seen) == len(wanted):
                    raise _Captured
            return original(layer, *args, **kwargs)

        try:
            run(_keys_like(nested, params), grab)
        except _Captured:
            return seen
        missing = sorted("/".join(p) for p in wanted - set(seen))
        raise ValueError(f"no nnx.Linear or nnx.Conv layer was called at paths {missing}")

    result = posttrain.prune_calls(
        calls,
        capture,
        _nested(params),
        method=method,
        sparsity=sparsity,
        n=n,
        m=m,
        dsnot=dsnot,
        skip=skip,
        block_depth=block_depth,
        block_shape=block_shape,
        **options,
    )
    return posttrain.PruneResult(
        _keys_like(result.params, params), _keys_like(result.masks, params), result.errors
    )
