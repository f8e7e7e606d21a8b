"""Training an SAE with optax: options, the jitted train step, and `fit`, the short path.

One step does everything: the loss (objective + sparsity penalty + AuxK) and its gradient,
the optimizer update through `unit_norm_decoder` (so decoder rows stay unit-norm), the
dead-latent counters (in tokens) and the inference thresholds of the batch-level rules.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.sae import decoder_norm
from sparsejax.sae import losses as losses_lib
from sparsejax.sae import metrics as metrics_lib
from sparsejax.sae.model import (
    B_DEC_INITS,
    PER_TOKEN_K,
    SAE,
    THRESHOLDED,
    SAESpec,
    init_sae,
    make_spec,
)

__all__ = [
    "SPEC_OPTIONS",
    "TrainOptions",
    "TrainState",
    "fit",
    "init_train_state",
    "make_optimizer",
    "make_train_step",
    "resolve_options",
]

# fit's keyword options that describe the SAE (make_spec) rather than its training.
SPEC_OPTIONS = ("selection", "prefixes", "ks", "tokens_per_latent", "bandwidth")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Training hyperparameters; None means "the reference default for this SAE" (see
    `resolve_options`).

    Attributes:
      batch_size: tokens per step (4096 as in Bussmann et al.; capped at the data size).
      learning_rate: Adam's peak rate; default ``2e-4 / sqrt(n_latents / 2**14)``, the
        inverse-square-root scaling in the number of latents of Gao et al. 2024.
      adam_b1, adam_b2, adam_eps: Adam's constants (Gao et al.: 0.9, 0.999, 6.25e-10).
      lr_warmup_steps: linear warm-up of the learning rate from 0 (Gao et al. use none).
      lr_decay_steps: linear decay to 0 over the last steps (Anthropic's April 2024 update
        decays over the last 20%; default 0).
      sparsity_coeff: lambda of the L1 (ReLU-L1, default 5.0 as in Anthropic's April 2024
        update at E||x||^2 = d_in) or L0 penalty (JumpReLU, default 1.0, our choice for
        these units); ignored by the budgeted rules.
      sparsity_warmup_steps: linear warm-up of lambda from 0 (default 5% of the steps, as in
        Anthropic's update; Rajamanoharan et al. warm up too).
      aux_k: AuxK's budget (default d_in // 2, Gao et al.).
      aux_coeff: AuxK's coefficient (default 1/32 for the TopK-family rules, 0 for ReLU-L1
        and JumpReLU, which the references train without it).
      dead_after_tokens: a latent is dead after this many training tokens without firing
        (Gao et al.: 10M).
      unit_norm_decoder: keep decoder rows unit-norm (`decoder_norm.unit_norm_decoder`).
      threshold_decay: running-average decay of the batch rules' inference threshold (the
        average of the smallest kept activation; the first steps average faster, as
        ``min(decay, (1 + t) / (10 + t))``).
      b_dec_init, normalize_input, center_input, jumprelu_init_threshold: see `init_sae`.
        JumpReLU's thresholds are trained in log space, so from the paper's 0.001 they grow
        by about the learning rate's factor a step: the reference runs take billions of
        tokens. On small data start them near the codes' scale (e.g. 0.3 with
        ``bandwidth=0.05`` for unit-scale features).
      init_tokens: tokens of the data sample used for normalisation and ``b_dec``.
      sparse_decode: train TopK / AbsTopK SAEs through `sparse_decode` (k rows per token).
    """

    batch_size: int = 4096
    learning_rate: float | None = None
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 6.25e-10
    lr_warmup_steps: int = 0
    lr_decay_steps: int = 0
    sparsity_coeff: float | None = None
    sparsity_warmup_steps: int | None = None
    aux_k: int | None = None
    aux_coeff: float | None = None
    dead_after_tokens: int = 10_000_000
    unit_norm_decoder: bool = True
    threshold_decay: float = 0.999
    b_dec_init: str = "geometric_median"
    normalize_input: bool = True
    center_input: bool = False
    jumprelu_init_threshold: float = 0.001
    init_tokens: int = 16384
    sparse_decode: bool = False


TRAIN_OPTIONS = tuple(f.name for f in dataclasses.fields(TrainOptions))


def _nonneg_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def resolve_options(options: TrainOptions, spec: SAESpec, steps: int) -> TrainOptions:
    """Fills the None defaults for ``spec`` and ``steps`` and validates every option.

    Raises:
      ValueError: naming the option and its value.
    """
    o = options
    for name in ("batch_size", "init_tokens", "dead_after_tokens"):
        _nonneg_int(name, getattr(o, name))
        if getattr(o, name) == 0:
            raise ValueError(f"{name} must be positive, got 0")
    for name in ("lr_warmup_steps", "lr_decay_steps"):
        _nonneg_int(name, getattr(o, name))
    if o.lr_warmup_steps + o.lr_decay_steps > steps:
        raise ValueError(
            f"lr_warmup_steps + lr_decay_steps must be at most steps={steps}, got "
            f"{o.lr_warmup_steps} + {o.lr_decay_steps}"
        )
    lr = o.learning_rate
    if lr is None:
        lr = 2e-4 / math.sqrt(spec.n_latents / 2**14)
    _positive_float("learning_rate", lr)
    _positive_float("adam_eps", o.adam_eps)
    for name in ("adam_b1", "adam_b2", "threshold_decay"):
        value = getattr(o, name)
        if not (isinstance(value, int | float) and 0 <= value < 1):
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    budgeted = spec.selection not in ("relu_l1", "jumprelu")
    coeff = o.sparsity_coeff
    if coeff is None:
        coeff = {"relu_l1": 5.0, "jumprelu": 1.0}.get(spec.selection, 0.0)
    if not (isinstance(coeff, int | float) and math.isfinite(coeff) and coeff >= 0):
        raise ValueError(f"sparsity_coeff must be a finite float >= 0, got {coeff!r}")
    warm = o.sparsity_warmup_steps
    if warm is None:
        warm = 0 if budgeted else int(0.05 * steps)
    _nonneg_int("sparsity_warmup_steps", warm)
    aux_k = max(1, spec.d_in // 2) if o.aux_k is None else o.aux_k
    _nonneg_int("aux_k", aux_k)
    if aux_k == 0:
        raise ValueError("aux_k must be positive, got 0")
    aux_k = min(aux_k, spec.n_latents)
    aux_coeff = o.aux_coeff
    if aux_coeff is None:
        aux_coeff = 1 / 32 if budgeted else 0.0
    if not (isinstance(aux_coeff, int | float) and math.isfinite(aux_coeff) and aux_coeff >= 0):
        raise ValueError(f"aux_coeff must be a finite float >= 0, got {aux_coeff!r}")
    if o.b_dec_init not in B_DEC_INITS:
        raise ValueError(f"b_dec_init must be one of {list(B_DEC_INITS)}, got {o.b_dec_init!r}")
    for name in ("unit_norm_decoder", "normalize_input", "center_input", "sparse_decode"):
        if not isinstance(getattr(o, name), bool):
            raise ValueError(f"{name} must be a bool, got {getattr(o, name)!r}")
    if o.sparse_decode and (spec.selection not in PER_TOKEN_K or spec.objective != "single"):
        raise ValueError(
            f"sparse_decode applies to single-objective {list(PER_TOKEN_K)} SAEs, got "
            f"kind={spec.kind!r}"
        )
    _positive_float("jumprelu_init_threshold", o.jumprelu_init_threshold)
    return dataclasses.replace(
        o,
        learning_rate=float(lr),
        sparsity_coeff=float(coeff),
        sparsity_warmup_steps=int(warm),
        aux_k=int(aux_k),
        aux_coeff=float(aux_coeff),
    )


class TrainState(NamedTuple):
    """Everything a training run carries (a pytree; checkpoint it as is).

    Attributes:
      sae: the `SAE` (params, inference thresholds, normalisation).
      opt_state: the optax state over ``sae.params``.
      tokens_since_fired: ``int32[n_latents]`` training tokens since each latent last fired
        (capped, so it cannot overflow).
      step: int32 scalar, steps taken.
    """

    sae: SAE
    opt_state: optax.OptState
    tokens_since_fired: jax.Array
    step: jax.Array


def make_optimizer(options: TrainOptions, steps: int) -> optax.GradientTransformation:
    """Adam on the resolved ``options``' schedule, wrapped to keep decoder rows unit-norm."""
    lr, warm, decay = options.learning_rate, options.lr_warmup_steps, options.lr_decay_steps
    pieces, boundaries = [], []
    if warm:
        pieces.append(optax.linear_schedule(0.0, lr, warm))
        boundaries.append(warm)
    pieces.append(optax.constant_schedule(lr))
    if decay:
        boundaries.append(steps - decay)
        pieces.append(optax.linear_schedule(lr, 0.0, decay))
    schedule = pieces[0] if len(pieces) == 1 else optax.join_schedules(pieces, boundaries)
    adam = optax.adam(schedule, b1=options.adam_b1, b2=options.adam_b2, eps=options.adam_eps)
    return decoder_norm.unit_norm_decoder(adam) if options.unit_norm_decoder else adam


def init_train_state(
    key: jax.Array,
    spec: SAESpec,
    sample: jax.Array,
    options: TrainOptions,
    tx: optax.GradientTransformation,
) -> TrainState:
    """A fresh `TrainState`: `init_sae` on ``sample`` with the options, and ``tx.init``."""
    sae = init_sae(
        key,
        spec,
        sample,
        b_dec_init=options.b_dec_init,
        normalize_input=options.normalize_input,
        center_input=options.center_input,
        jumprelu_init_threshold=options.jumprelu_init_threshold,
    )
    return TrainState(
        sae=sae,
        opt_state=tx.init(sae.params),
        tokens_since_fired=jnp.zeros(spec.n_latents, jnp.int32),
        step=jnp.zeros((), jnp.int32),
    )


def _smallest_kept(z: jax.Array, per_latent: bool) -> tuple[jax.Array, jax.Array]:
    """Smallest positive code (globally or per latent) and whether there was one."""
    big = jnp.finfo(z.dtype).max
    masked = jnp.where(z > 0, z, big)
    smallest = jnp.min(masked, axis=0) if per_latent else jnp.min(masked)
    return smallest, smallest < big


def make_train_step(spec: SAESpec, options: TrainOptions, tx: optax.GradientTransformation):
    """The jitted train step ``step(state, x) -> (state, metrics)`` for batches ``x [B, d_in]``.

    Args:
      spec: the SAE's spec.
      options: resolved `TrainOptions` (`resolve_options`).
      tx: the optimizer (`make_optimizer`).

    Returns:
      A jitted function; ``metrics`` holds float scalars ``loss``, ``recon`` (the objective's
      reconstruction error, normalised units), ``fvu`` (of the main reconstruction on the
      batch), ``l0``, ``sparsity``, ``sparsity_coeff``, ``aux``, ``dead_fraction`` (latents
      unfired for ``dead_after_tokens``) and ``threshold`` (mean inference threshold).
      It traces once per batch shape and donates its ``state`` argument (the new state
      reuses its buffers), so read what you need from a state before stepping it.
    """
    o = options
    cap = np.iinfo(np.int32).max // 2

    def loss_fn(params, sae, x_n, coeff, dead):
        return losses_lib.sae_loss(
            params,
            sae,
            x_n,
            sparsity_coeff=coeff,
            dead=dead if o.aux_coeff > 0 else None,
            k_aux=o.aux_k,
            aux_coeff=o.aux_coeff,
            sparse_decode=o.sparse_decode,
        )

    def train_step(state: TrainState, x: jax.Array):
        sae = state.sae
        x_n = sae.normalize(x)
        tokens = x_n.shape[0]
        warm = o.sparsity_warmup_steps
        ramp = jnp.minimum(1.0, (state.step + 1) / warm) if warm else 1.0
        coeff = o.sparsity_coeff * ramp
        dead = state.tokens_since_fired >= o.dead_after_tokens
        (loss, (terms, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            sae.params, sae, x_n, coeff, dead
        )
        updates, opt_state = tx.update(grads, state.opt_state, sae.params)
        params = optax.apply_updates(sae.params, updates)

        z = jax.lax.stop_gradient(out.z)
        fired = jnp.any(z != 0, axis=0)
        since = jnp.where(fired, 0, jnp.minimum(state.tokens_since_fired + tokens, cap))
        threshold = sae.threshold
        if spec.selection in THRESHOLDED:
            per_latent = spec.selection == "feature_choice"
            smallest, seen = _smallest_kept(z, per_latent)
            t = state.step.astype(z.dtype)
            decay = jnp.minimum(o.threshold_decay, (1.0 + t) / (10.0 + t))
            averaged = decay * threshold + (1.0 - decay) * smallest
            threshold = jnp.where(seen, averaged, threshold)
        new_sae = sae.replace(params=params, threshold=threshold)
        x_hat = jax.lax.stop_gradient(out.x_hat)
        metrics = {
            "loss": loss,
            "recon": terms["recon"],
            "fvu": metrics_lib.fvu(x_n, x_hat),
            "l0": metrics_lib.l0(z),
            "sparsity": terms["sparsity"],
            "sparsity_coeff": jnp.asarray(coeff, jnp.float32),
            "aux": terms["aux"],
            "dead_fraction": jnp.mean((since >= o.dead_after_tokens).astype(jnp.float32)),
            "threshold": jnp.mean(threshold),
        }
        return TrainState(new_sae, opt_state, since, state.step + 1), metrics

    return jax.jit(train_step, donate_argnums=0)


def _check_key(key: Any) -> jax.Array:
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if isinstance(key, jax.Array | np.ndarray) and key.dtype == np.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(jnp.asarray(key))  # a legacy PRNGKey
    raise ValueError(f"key must be a jax.random.key, got {getattr(key, 'dtype', type(key))!r}")


def _check_batch(name: str, x: Any, d_in: int | None, check_finite: bool = True) -> jax.Array:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [tokens, d_in] array, got shape {shape}")
    if d_in is not None and shape[1] != d_in:
        raise ValueError(f"{name} must have d_in={d_in} columns like the first batch, got {shape}")
    if not np.issubdtype(np.dtype(x.dtype), np.number) or np.dtype(x.dtype) == np.bool_:
        raise ValueError(f"{name} must hold numbers, got dtype {x.dtype}")
    x = jnp.asarray(x, jnp.float32)
    if check_finite and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{name} must be finite, got NaN or infinite entries")
    return x


def _array_batches(key: jax.Array, tokens: int, batch_size: int) -> Iterator[np.ndarray]:
    """Row indices of shuffled batches, in epochs without replacement."""
    seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(tokens).astype(np.int32)
        for start in range(0, tokens - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


@functools.lru_cache(maxsize=16)
def _step_functions(spec: SAESpec, options: TrainOptions, steps: int):
    """The optimizer and jitted steps of one configuration, kept so that repeated `fit` calls
    with the same configuration reuse one compilation."""
    tx = make_optimizer(options, steps)
    train_step = make_train_step(spec, options, tx)
    # Batches of an array are gathered inside the step: one dispatch a step, not two.
    gather_step = jax.jit(lambda state, x, rows: train_step(state, x[rows]), donate_argnums=0)
    return tx, train_step, gather_step


def fit(
    key: jax.Array,
    x: jax.Array | Iterable[jax.Array],
    *,
    kind: str = "topk",
    n_latents: int,
    k: int | None = None,
    steps: int,
    **options: Any,
) -> SAE:
    """Trains a sparse autoencoder on activations and returns it.

    Args:
      key: ``jax.random.key`` (initialisation and batch order).
      x: activations ``[tokens, d_in]`` (sampled in shuffled epochs of ``batch_size``), or
        an iterable of batches ``[batch, d_in]`` (the first one also supplies the sample
        for normalisation and ``b_dec``; training stops early, with a warning, if it ends
        before ``steps``).
      kind: one of `sparsejax.sae.KINDS`: ``"topk"`` (Gao et al. 2024), ``"batchtopk"``
        (Bussmann et al. 2024), ``"relu_l1"``, ``"jumprelu"`` (Rajamanoharan et al. 2024),
        ``"abstopk"``, ``"feature_choice"``, ``"mutual_choice"`` (Ayonrinde 2024),
        ``"matryoshka"`` (Bussmann et al. / Nabeshima 2025) or ``"multi_k"``.
      n_latents: dictionary size.
      k: active latents per token (mean per token for the batch rules); required except for
        ``relu_l1`` and ``jumprelu``.
      steps: optimizer steps.
      **options: the spec options ``selection``, ``prefixes``, ``ks``,
        ``tokens_per_latent``, ``bandwidth`` (see `make_spec`) and any field of
        `TrainOptions` (``batch_size``, ``learning_rate``, ``aux_k``, ``aux_coeff``,
        ``dead_after_tokens``, ``sparsity_coeff``, ``b_dec_init``, ``center_input``, ...).

    Returns:
      The trained `SAE`, with ``encode(x) -> z [tokens, n_latents]``, ``decode(z) -> x_hat``
      and ``decoder [n_latents, d_in]``.

    Raises:
      ValueError: naming the argument, for a bad key, an ``x`` that is not ``[tokens,
        d_in]`` (or batches of different widths), an unknown kind (listing the known ones),
        ``k > n_latents``, nonpositive sizes or steps, an unknown option (listing the
        known ones), or an ``x`` (its first batch) holding NaN or infinite values.
      FloatingPointError: if the trained params are not finite (training diverged).

    Example::

        sae = sparsejax.sae.fit(jax.random.key(0), acts, kind="topk", n_latents=4096, k=32,
                                steps=2000)
        z = sae.encode(acts)       # [tokens, 4096], 32 nonzeros a token at most
        x_hat = sae.decode(z)
    """
    key = _check_key(key)
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    steps = int(steps)
    unknown = sorted(set(options) - set(SPEC_OPTIONS) - set(TRAIN_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown}; known options: {sorted(SPEC_OPTIONS + TRAIN_OPTIONS)}"
        )
    spec_options = {name: options[name] for name in SPEC_OPTIONS if name in options}
    train_options = TrainOptions(**{n: options[n] for n in TRAIN_OPTIONS if n in options})

    if hasattr(x, "shape"):
        data = _check_batch("x", x, None)
        batches, first = None, None
        d_in = data.shape[1]
    else:
        if not isinstance(x, Iterable):
            raise ValueError(
                f"x must be a [tokens, d_in] array or an iterable of batches, got {type(x)!r}"
            )
        batches = iter(x)
        try:
            first = _check_batch("x's first batch", next(batches), None)
        except StopIteration:
            raise ValueError("x must yield at least one batch, got an empty iterable") from None
        d_in = first.shape[1]

    spec = make_spec(kind, d_in=d_in, n_latents=n_latents, k=k, **spec_options)
    o = resolve_options(train_options, spec, steps)
    init_key, data_key = jax.random.split(key)
    if batches is None:
        batch_size = min(o.batch_size, data.shape[0])
        order = np.asarray(jax.random.permutation(data_key, data.shape[0]))[: o.init_tokens]
        sample = data[jnp.asarray(order)]
        rows = _array_batches(data_key, data.shape[0], batch_size)
    else:
        sample = first[: o.init_tokens]

        def chain_first():
            yield first
            for i, batch in enumerate(batches):
                # Later batches are not scanned for NaN: that would sync every step.
                yield _check_batch(f"x's batch {i + 1}", batch, d_in, check_finite=False)

        stream = chain_first()

    tx, train_step, gather_step = _step_functions(spec, o, steps)
    state = init_train_state(init_key, spec, sample, o, tx)
    for step in range(steps):
        if batches is None:
            state, _ = gather_step(state, data, next(rows))
            continue
        try:
            batch = next(stream)
        except StopIteration:
            warnings.warn(f"x ran out of batches after {step} of steps={steps} steps", stacklevel=2)
            break
        state, _ = train_step(state, batch)
    if not all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(state.sae.params)):
        raise FloatingPointError(
            f"training diverged: the SAE's params hold NaN or infinite values after {steps} "
            "steps; lower learning_rate or check x"
        )
    return state.sae
