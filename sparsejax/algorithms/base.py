"""The algorithm interface shared by every sparse-training method.

An algorithm is an immutable dataclass of static hyperparameters with pure
methods; `sparsejax.transforms.masked` and the trainer call them (the hooks are
listed, with their defaults, on `Algorithm`). It never holds arrays or mutable
state: masks, counters and keys live in the optimizer state.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import distributions, masks, scores

PyTree = Any

__all__ = [
    "STRUCTURES",
    "Algorithm",
    "Dense",
    "NMAlgorithm",
    "SparseAlgorithm",
    "from_config",
    "get",
    "names",
    "register",
]

STRUCTURES = ("unstructured", "block", "channel")


def _target_count(size: int, sparsity: float) -> int:
    """round((1 - sparsity) * size) in float64, kept in [1, size] (`masks.num_kept`'s rule).

    float64 gives back a distribution's integer count exactly (ER and ERK return
    s = 1 - c / n); the float32 of `masks.num_kept` misses c by one on layers of
    more than 2**24 entries.
    """
    return min(max(int(np.round((1.0 - float(sparsity)) * size)), min(1, size)), size)


def _layer_topk(scores: jax.Array, sparsity: float, fraction: Any = 1.0) -> jax.Array:
    """Top-k of one layer's ``scores`` at ``fraction`` (possibly traced) of its ``sparsity``.

    From fraction 1 on the count is the layer's exact target (`_target_count`);
    below it, a schedule's intermediate count, `masks.num_kept` of
    sparsity * fraction (float32, as under jit). At least one entry is kept.
    """
    size = int(np.size(scores))
    target = _target_count(size, sparsity)
    if isinstance(fraction, (int, float)):
        count = target if fraction >= 1 else masks.num_kept(size, sparsity * fraction)
    else:
        count = jnp.where(fraction >= 1, target, masks.num_kept(size, sparsity * fraction))
    return masks.topk_mask_by_count(scores, count)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """The interface between a sparse-training method and whoever trains with it.

    An algorithm is an immutable dataclass of static hyperparameters. This base
    class is a dense algorithm that never masks anything, and it declares every
    hook a trainer or `sparsejax.transforms.masked` may call, each with a no-op
    default: a subclass overrides only what it changes, and callers call the hooks
    unconditionally (never ``hasattr`` / ``isinstance`` on an algorithm).

    Class flags (static, read at trace time):
      updates_masks: the masks change during training; ``masked`` then calls
        ``is_update_step`` every step and ``update_masks`` on the steps it picks.
      skip_update_on_mask_step: on a mask-update step the inner optimizer does not
        run (RigL, SET; spectral truncation, whose gradient is in the old basis).
      reset_grown_moments: zero the optimizer slots of newly grown entries.
      straight_through: dense weights are kept and trained; the model runs on
        ``forward_params_with_state`` and gradients are not masked.
      reparametrizes: ``reparametrize`` changes the params' basis on update steps.

    Hooks called by `sparsejax.transforms.masked` (inside the jitted update):
      init_masks(params, key) -> masks at step 0.
      init_state(params) / update_state(state, params, grads, step) -> the
        algorithm's own state (`MaskedState.algo_state`), advanced every step.
      is_update_step(step) -> traced bool: does ``update_masks`` run at ``step``.
      update_masks(masks, params, grads, step, key, algo_state) -> new masks.
      reparametrize(params, inner_state, masks) -> (params, inner_state): the same
        weights in a new basis and the optimizer moments mapped alike, run on update
        steps before ``update_masks`` when ``reparametrizes`` is set.

    Hooks called by a trainer (around the model):
      masks_from_model(params, key=, apply_fn=, batch=, loss_fn=) -> masks computed
        with the model before training (GraSP, SynFlow, SNIP), or None: use
        ``init_masks``. The trainer passes them as ``masked(..., masks=...)``.
      forward_params_with_state(params, masks, algo_state) -> the weights the model
        computes with at this step: ``forward_params`` of ``params`` and
        ``forward_masks(params, masks, algo_state)`` (both the params themselves
        unless ``straight_through``).
      forward_masks(params, masks, algo_state) -> the masks that forward pass
        applies: the stored ``masks`` by default; straight-through methods recompute
        them from the current ``params`` (Zhou et al. 2021 rebuild the N:M mask from
        the weights at every forward pass), so the model never runs on a mask built
        from the previous step's weights.
      forward_params(params, masks) -> the weights the model computes with under
        the given ``masks`` (for callers without the state).
      model_context(params, masks, algo_state) -> a context manager held while the
        model runs (e.g. a Flax method interceptor changing a layer's backward pass).
      metrics(algo_state) -> scalars worth logging.
      nm_pattern() -> ``(n, m)`` of an N:M method, for exporting its masks as
        `pallas_kernels.NM` (`sparsejax.export.export_trained`), else None.
    """

    updates_masks = False
    skip_update_on_mask_step = False
    reset_grown_moments = False
    straight_through = False
    reparametrizes = False

    def init_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        """Masks at step 0 (None on every leaf: nothing is sparsified)."""
        del key
        return jax.tree.map(lambda p: None, params)

    def init_state(self, params: PyTree) -> PyTree:
        """The algorithm's own state (kept in `MaskedState.algo_state`)."""
        del params
        return ()

    def update_state(self, state: PyTree, params: PyTree, grads: PyTree, step: jax.Array):
        """Advances the algorithm's state by one step (every step, before mask updates)."""
        del params, grads, step
        return state

    def masks_from_model(
        self,
        params: PyTree,
        *,
        key: jax.Array,
        apply_fn: Callable[[PyTree, jax.Array], jax.Array],
        batch: tuple[jax.Array, jax.Array] | None = None,
        loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> PyTree | None:
        """Masks computed with the model before training, or None to use `init_masks`.

        Args:
          params: the initial parameters.
          key: a ``jax.random.key`` for random choices.
          apply_fn: ``(params, x) -> outputs`` of the model.
          batch: ``(x, y)``, a calibration batch (x with a leading batch axis).
          loss_fn: ``(outputs, y) -> scalar`` loss of the model's outputs.
          input_shape: one example's shape (default ``batch[0].shape[1:]``).

        Returns:
          A mask pytree for ``masked(..., masks=...)``, or None (the default).
        """
        del params, key, apply_fn, batch, loss_fn, input_shape
        return None

    def forward_params(self, params: PyTree, masks: PyTree) -> PyTree:
        """The weights the model computes with under ``masks``; by default ``params``.

        Pruned weights are already zero in ``params`` unless the algorithm is
        ``straight_through``. A training step calls `forward_params_with_state`.
        """
        del masks
        return params

    def forward_masks(self, params: PyTree, masks: PyTree, algo_state: PyTree) -> PyTree:
        """The masks the forward pass applies to ``params`` at the state's step.

        The default is the stored ``masks``. Straight-through methods override it to
        recompute the mask from ``params``, the weights the forward pass runs on (the
        optimizer updates them after the stored masks were made); what they store in
        their state is the mask this returned in the last step's forward pass.

        Args:
          params: the current parameters.
          masks: the stored masks (`sparsejax.transforms.get_masks`).
          algo_state: the algorithm's state (`MaskedState.algo_state`).

        Returns:
          A mask pytree of the structure of ``masks``.
        """
        del params, algo_state
        return masks

    def forward_params_with_state(self, params: PyTree, masks: PyTree, algo_state: PyTree):
        """The weights the model computes with at the state's step: what a training step calls.

        ``forward_params(params, forward_masks(params, masks, algo_state))`` by
        default; algorithms whose forward pass reads more of their state override it
        (N:M mask decay needs its step, S-STE its frozen scales).
        """
        return self.forward_params(params, self.forward_masks(params, masks, algo_state))

    def model_context(self, params: PyTree, masks: PyTree, algo_state: PyTree):
        """A context manager the training step holds while it runs the model.

        Algorithms that change a layer's backward pass (bidirectional N:M masks)
        return a Flax method interceptor here; the default does nothing.
        ``params`` are the dense parameters being differentiated.
        """
        del params, masks, algo_state
        return contextlib.nullcontext()

    def metrics(self, algo_state: PyTree) -> dict[str, jax.Array]:
        """Scalars worth logging from the algorithm's state (e.g. the N:M mask flip rate)."""
        del algo_state
        return {}

    def nm_pattern(self) -> tuple[int, int] | None:
        """``(n, m)``: the N:M pattern the masks follow (N:M methods), else None."""
        return None

    def is_update_step(self, step: jax.Array) -> jax.Array:
        """Traced bool: whether ``update_masks`` (and ``reparametrize``) run at ``step``."""
        del step
        return jnp.asarray(False)

    def update_masks(
        self,
        masks: PyTree,
        params: PyTree,
        grads: PyTree,
        step: jax.Array,
        key: jax.Array,
        algo_state: PyTree = (),
    ) -> PyTree:
        """New masks on an update step, from the params and the incoming gradients."""
        del params, grads, step, key, algo_state
        return masks

    def reparametrize(
        self, params: PyTree, inner_state: PyTree, masks: PyTree
    ) -> tuple[PyTree, PyTree]:
        """The same weights in a new basis, and the inner optimizer state mapped alike.

        Runs on update steps, before ``update_masks``, only when the class sets
        ``reparametrizes = True`` (spectral truncation rotates factorized layers into
        their singular basis). The default is the identity.

        Args:
          params: the parameter tree.
          inner_state: the wrapped optimizer's state.
          masks: the current masks (bool arrays, None where not sparsified).

        Returns:
          ``(params, inner_state)``.
        """
        del masks
        return params, inner_state


@dataclasses.dataclass(frozen=True)
class Dense(Algorithm):
    """Dense training: ``masked(inner, Dense())`` behaves exactly like ``inner``."""


@dataclasses.dataclass(frozen=True)
class SparseAlgorithm(Algorithm):
    """Common fields: the global target and how it is spread over layers.

    Attributes:
      sparsity: global target over the sparsified leaves, in [0, 1).
      distribution: 'uniform', 'er' or 'erk' (see `sparsejax.distributions`),
        or 'global': one ranking pooled over all sparsified leaves, so layer
        densities follow the scores.
      power_scale: ERK exponent.
      keep_dense: substrings of leaf names ('conv1/kernel') left dense.
      structure: what a mask keeps or drops as one unit. 'unstructured': single
        weights. 'block': blocks of ``block_shape`` over a leaf's trailing axes
        (leading axes in blocks of 1, e.g. (4, 4) on a conv kernel (k, in, out)
        takes (1, 4, 4) blocks), the pattern `pallas_kernels.BSR` stores and runs
        fast. 'channel': all weights into one output unit (a leaf's last axis:
        a neuron of a Dense kernel, a filter of a conv kernel). Scores of a unit
        are the sums of its weights' scores; a layer's target sparsity is met in
        whole units (exact, since a layer's units have equal size), and a mask
        is constant on every unit at every step.
      block_shape: the block for ``structure='block'``.
    """

    sparsity: float = 0.9
    distribution: str = "erk"
    power_scale: float = 1.0
    keep_dense: Sequence[str] = ()
    structure: str = "unstructured"
    block_shape: Sequence[int] = (1, 1)

    # Algorithms whose mask updates act on single weights only set this to False.
    supports_structure = True

    def __post_init__(self):
        masks.validate_sparsity(self.sparsity, "sparsity")
        if self.distribution != "global":
            distributions.get(self.distribution)
        # Refused here, at construction, not when the first masks are drawn: NaN or inf
        # would make ERK empty whole layers.
        power = self.power_scale
        if isinstance(power, bool) or not isinstance(power, (int, float, np.integer, np.floating)):
            raise ValueError(f"power_scale must be a finite number >= 0, got power_scale={power!r}")
        if not np.isfinite(power) or power < 0:
            raise ValueError(f"power_scale must be a finite number >= 0, got power_scale={power!r}")
        object.__setattr__(self, "keep_dense", distributions.validate_keep_dense(self.keep_dense))
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {self.structure!r}")
        block = tuple(self.block_shape)
        if not block or any(
            isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in block
        ):
            raise ValueError(f"block_shape must be positive ints, got {self.block_shape!r}")
        object.__setattr__(self, "block_shape", tuple(int(b) for b in block))
        if self.structure != "unstructured":
            if not self.supports_structure:
                raise ValueError(
                    f"{type(self).__name__} supports structure='unstructured' only, got "
                    f"structure={self.structure!r}"
                )
            if self.distribution == "global":
                raise ValueError(
                    f"structure={self.structure!r} needs a per-layer distribution "
                    "('uniform', 'er', 'erk'), got distribution='global'"
                )

    def unit_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of one mask unit of a leaf of ``shape`` (all ones if unstructured).

        Raises:
          ValueError: if ``block_shape`` has more axes than the leaf or does not
            divide its trailing axes.
        """
        shape = tuple(shape)
        if self.structure == "unstructured":
            return (1,) * len(shape)
        if self.structure == "channel":
            return shape[:-1] + (1,)
        block = self.block_shape
        if len(block) > len(shape) or any(
            d % b for d, b in zip(shape[len(shape) - len(block) :], block)
        ):
            raise ValueError(
                f"block_shape={block} must divide the trailing axes of every sparsified "
                f"leaf; a leaf has shape {shape} (leave it dense with keep_dense)"
            )
        return (1,) * (len(shape) - len(block)) + block

    def pool(self, x: jax.Array, unit: Sequence[int]) -> jax.Array:
        """Sums ``x`` over each unit: shape ``x.shape // unit`` (the unit grid)."""
        if all(u == 1 for u in unit):
            return x
        split = []
        for d, u in zip(x.shape, unit):
            split += [d // u, u]
        return x.reshape(split).sum(axis=tuple(range(1, 2 * x.ndim, 2)))

    @staticmethod
    def expand(units: jax.Array, unit: Sequence[int]) -> jax.Array:
        """Repeats every unit-grid entry over its unit (the inverse layout of `pool`)."""
        for axis, u in enumerate(unit):
            if u != 1:
                units = jnp.repeat(units, u, axis=axis)
        return units

    def layer_sparsities(self, params: PyTree) -> PyTree:
        """Per-leaf target sparsities (Python floats, None where not sparsified).

        For 'global' these are the uniform targets; they only mark which leaves
        are sparsified, since the pooled ranking decides each layer's count.
        """
        if self.distribution == "global":
            return distributions.uniform(params, self.sparsity, keep_dense=self.keep_dense)
        fn = distributions.get(self.distribution)
        kwargs = {"keep_dense": self.keep_dense}
        if self.distribution == "erk":
            kwargs["power_scale"] = self.power_scale
        return fn(params, self.sparsity, **kwargs)

    def target_counts(self, params: PyTree) -> PyTree:
        """Per-leaf kept weights at the target (Python ints, None where not sparsified).

        Exact: round((1 - s_l) * n_l) in float64, the distribution's own integer
        count, at least one (`masks.num_kept`'s rule). For 'global' these are the
        uniform counts (the pooled ranking decides each layer's real count).
        """
        return jax.tree.map(
            lambda s, p: None if s is None else _target_count(int(np.size(p)), s),
            self.layer_sparsities(params),
            params,
            is_leaf=masks.is_none,
        )

    def dense_masks(self, params: PyTree) -> PyTree:
        """All-True masks on the sparsified leaves, None elsewhere."""
        return jax.tree.map(
            lambda s, p: None if s is None else jnp.ones(jnp.shape(p), bool),
            self.layer_sparsities(params),
            params,
            is_leaf=masks.is_none,
        )

    def score_masks(self, score_tree: PyTree, params: PyTree, fraction: Any = 1.0) -> PyTree:
        """Top-k masks of ``score_tree`` at ``fraction`` of each target sparsity.

        Per leaf for uniform/ER/ERK, pooled over leaves for 'global'. ``fraction``
        (possibly traced) scales the targets, for schedules; from 1 on a layer
        keeps exactly its `target_counts`. Every layer keeps at least one weight
        (unit) under uniform/ER/ERK; the pooled 'global' ranking keeps at least
        one in total and may empty a layer (layer collapse, Tanaka et al. 2020).
        """
        sparsities = self.layer_sparsities(params)
        if self.distribution == "global":
            return masks.global_topk_masks(score_tree, self.sparsity * fraction, sparsities)

        def leaf_mask(s, sc):
            if s is None:
                return None
            unit = self.unit_shape(jnp.shape(sc))
            return self.expand(_layer_topk(self.pool(sc, unit), s, fraction), unit)

        return jax.tree.map(leaf_mask, sparsities, score_tree, is_leaf=masks.is_none)

    def random_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        """Random masks with each leaf's exact target density."""
        if self.distribution == "global":
            return self.score_masks(scores.random(params, key=key), params)
        sparsities = self.layer_sparsities(params)
        leaves, treedef = jax.tree.flatten(sparsities, is_leaf=masks.is_none)
        keys = jax.random.split(key, max(len(leaves), 1))
        param_leaves = treedef.flatten_up_to(params)

        def leaf_mask(s, k, p):
            if s is None:
                return None
            unit = self.unit_shape(jnp.shape(p))
            grid = tuple(d // u for d, u in zip(jnp.shape(p), unit))
            return self.expand(_layer_topk(jax.random.uniform(k, grid), s), unit)

        out = [leaf_mask(s, k, p) for s, k, p in zip(leaves, keys, param_leaves)]
        return jax.tree.unflatten(treedef, out)


@dataclasses.dataclass(frozen=True)
class NMAlgorithm(Algorithm):
    """Fields and mask computation shared by the N:M methods.

    Every N:M method keeps N of every M consecutive weights along one axis of each
    sparsified kernel: by default the input (reduction) axis ``-2`` of a Dense
    ``(in, out)`` or convolution ``(..., in, out)`` kernel, the axis sparse tensor
    cores compress. With ``transposable=True`` the mask is N:M along both of the
    last two axes (`sparsejax.masks.transposable_nm_mask`), so W^T is N:M too.
    The families: `sparsejax.algorithms.nm_ste` (straight-through: NMSTE, SRSTE,
    SSTE), `nm_decay` (NMDecay, NMOneShot) and `nm_bimask` (BiMask).

    Attributes:
      n, m: keep ``n`` of every ``m`` consecutive weights (0 < n <= m).
      axis: the grouped axis of every sparsified leaf (-2: a kernel's input axis).
      transposable: N:M along both of the last two axes instead (Hubara et al. 2021).
      keep_dense: substrings of leaf names left dense (e.g. 'conv_0' for a first
        layer with a single input channel). Leaves with fewer than 2 axes (biases)
        are never sparsified.
    """

    n: int = 2
    m: int = 4
    axis: int = -2
    transposable: bool = False
    keep_dense: Sequence[str] = ()

    def __post_init__(self):
        masks.validate_nm(self.n, self.m)
        if isinstance(self.axis, bool) or not isinstance(self.axis, (int, np.integer)):
            raise ValueError(f"axis must be an integer, got axis={self.axis!r}")
        if isinstance(self.keep_dense, str):
            object.__setattr__(self, "keep_dense", (self.keep_dense,))
        object.__setattr__(self, "keep_dense", tuple(self.keep_dense))

    @property
    def sparsity(self) -> float:
        """The N:M sparsity 1 - n/m."""
        return 1.0 - self.n / self.m

    def nm_pattern(self) -> tuple[int, int]:
        """``(n, m)``: the pattern the final masks follow."""
        return (self.n, self.m)

    def selected(self, params: PyTree) -> PyTree:
        """True on the sparsified leaves (rank >= 2, not in ``keep_dense``), None elsewhere."""
        chosen = distributions.uniform(params, 0.0, keep_dense=self.keep_dense)
        return jax.tree.map(lambda s: None if s is None else True, chosen, is_leaf=masks.is_none)

    def check_shapes(self, params: PyTree) -> None:
        """Raises ValueError naming a sparsified leaf whose grouped axis ``m`` does not divide."""
        chosen = jax.tree_util.tree_leaves_with_path(self.selected(params), is_leaf=masks.is_none)
        for (path, sel), p in zip(chosen, jax.tree.leaves(params), strict=True):
            if sel is None:
                continue
            shape = tuple(jnp.shape(p))
            axes = (-2, -1) if self.transposable else (self.axis,)
            for a in axes:
                if not -len(shape) <= a < len(shape) or shape[a] % self.m:
                    raise ValueError(
                        f"parameter {masks.path_name(path)} of shape {shape} cannot be "
                        f"{self.n}:{self.m} along axis {a}; list it in keep_dense"
                    )

    def nm_masks(self, score_tree: PyTree, params: PyTree, n: Any = None) -> PyTree:
        """N:M (or transposable) masks of ``score_tree`` on the sparsified leaves.

        ``n`` overrides ``self.n``; it may be traced (structure decay), in which
        case ranks inside each group are compared with it.
        """
        self.check_shapes(params)
        n = self.n if n is None else n

        def one(sel, s):
            if sel is None:
                return None
            if self.transposable:
                return masks.transposable_nm_mask(s, self.n, self.m)
            if isinstance(n, int):
                return masks.nm_mask(s, n, self.m, self.axis)
            return _nm_mask_traced(s, n, self.m, self.axis)

        return jax.tree.map(one, self.selected(params), score_tree, is_leaf=masks.is_none)

    def magnitude_masks(self, params: PyTree, n: Any = None) -> PyTree:
        """`nm_masks` of the weights' magnitudes."""
        return self.nm_masks(jax.tree.map(jnp.abs, params), params, n)


def _nm_mask_traced(scores: jax.Array, n: jax.Array, m: int, axis: int) -> jax.Array:
    """`masks.nm_mask` with a traced ``n`` (the ``m`` - ``n`` smallest per group dropped)."""
    full = masks.nm_mask(scores, m, m, axis)  # validates the axis and divisibility
    axis = masks.normalize_axis(axis, scores.ndim)
    moved = jnp.moveaxis(scores, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    keep = (masks.group_ranks(groups) < n).reshape(moved.shape)
    return jnp.moveaxis(keep, -1, axis) & full


# ------------------------------------------------------------------ the registry
# name -> (class, the defaults that distinguish the registered variant).
_REGISTRY: dict[str, tuple[type[Algorithm], dict[str, Any]]] = {}

# Config keys understood by `from_config` beyond the dataclass fields. ``execution`` and
# ``block_layout`` choose how a trainer runs the algorithm (experiments/block_execution.py)
# and are ignored here.
_CONFIG_ONLY_KEYS = (
    "algorithm",
    "target",
    "begin_fraction",
    "end_fraction",
    "execution",
    "block_layout",
)


def _fields(cls: type[Algorithm]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def register(name: str, factory: type[Algorithm], **defaults: Any) -> None:
    """Registers ``factory`` under ``name`` for `get` and `from_config`.

    Configs name algorithms by these strings (a config never holds a callable).
    sparsejax registers its own algorithms when imported; another package registers
    its algorithms when it is imported (``import tensornets`` adds
    ``spectral_truncation`` and ``greedy_growth``), so sparsejax never imports it.

        register("rigl", RigL)
        register("grasp", PruneAtInit, score="grasp", rounds=1)

    Args:
      name: the config name, a non-empty string not registered yet.
      factory: an `Algorithm` dataclass; its fields are the hyperparameters `get`
        accepts.
      **defaults: field values that distinguish this variant (e.g. the score);
        arguments given to `get` override them.

    Raises:
      ValueError: for a name that is not a non-empty string or is already
        registered, a factory that is not an `Algorithm` dataclass, or defaults
        that are not fields of it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got name={name!r}")
    if name in _REGISTRY:
        raise ValueError(
            f"algorithm name={name!r} is already registered (to "
            f"{_REGISTRY[name][0].__qualname__}); pick another name"
        )
    if not (
        isinstance(factory, type)
        and issubclass(factory, Algorithm)
        and dataclasses.is_dataclass(factory)
    ):
        raise ValueError(f"factory must be an Algorithm dataclass, got factory={factory!r}")
    unknown = sorted(set(defaults) - _fields(factory))
    if unknown:
        raise ValueError(
            f"defaults {unknown} of algorithm {name!r} are not fields of "
            f"{factory.__qualname__}; it takes {sorted(_fields(factory))}"
        )
    _REGISTRY[name] = (factory, dict(defaults))


def names() -> list[str]:
    """Sorted names of the registered algorithms."""
    return sorted(_REGISTRY)


def _check_name(name: Any) -> None:
    if name not in _REGISTRY:
        raise ValueError(
            f"algorithm={name!r} is unknown; known algorithms: {names()} (other packages "
            "register theirs when imported: `import tensornets` adds the rank-adaptive "
            "spectral_truncation and greedy_growth)"
        )


def get(name: str, **kwargs: Any) -> Algorithm:
    """Builds the algorithm registered as ``name`` with hyperparameters ``kwargs``.

    Args:
      name: one of `names()`.
      **kwargs: fields of the algorithm's dataclass (e.g. ``sparsity``,
        ``distribution``, ``end_step``).

    Returns:
      An immutable `Algorithm`.

    Raises:
      ValueError: for an unknown name (listing the known ones), an argument the
        algorithm does not take, or an invalid value.
    """
    _check_name(name)
    cls, defaults = _REGISTRY[name]
    unknown = sorted(set(kwargs) - _fields(cls))
    if unknown:
        raise ValueError(
            f"algorithm {name!r} takes no argument(s) {unknown}; it takes {sorted(_fields(cls))}"
        )
    return cls(**{**defaults, **kwargs})


def from_config(config: Mapping[str, Any], total_steps: int) -> Algorithm:
    """Builds an algorithm from a config section such as ``config.sparsity``.

    Keys: ``algorithm`` (name), ``target`` (the global sparsity), any field of
    any registered algorithm, and ``begin_fraction`` / ``end_fraction`` which
    set ``begin_step`` / ``end_step`` as fractions of ``total_steps``. Keys that
    belong to other algorithms are ignored (so ``--config.sparsity.algorithm``
    can be switched from the command line); keys no algorithm knows are refused.

    Args:
      config: a mapping (``ml_collections.ConfigDict`` or dict).
      total_steps: training length, for the fractional keys.

    Raises:
      ValueError: for unknown keys or names, or invalid values.
    """
    config = dict(config)
    name = config.pop("algorithm", "dense")
    _check_name(name)
    known = set(_CONFIG_ONLY_KEYS).union(*(_fields(cls) for cls, _ in _REGISTRY.values()))
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(
            f"config.sparsity has unknown key(s) {unknown}; known keys: {sorted(known)}"
        )
    if "target" in config:
        config["sparsity"] = config.pop("target")
    for frac_key, step_key in (("begin_fraction", "begin_step"), ("end_fraction", "end_step")):
        if frac_key in config:
            frac = config.pop(frac_key)
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"config.sparsity.{frac_key} must be in [0, 1], got {frac!r}")
            config.setdefault(step_key, int(round(frac * total_steps)))
    accepted = _fields(_REGISTRY[name][0])
    return get(name, **{k: v for k, v in config.items() if k in accepted})
