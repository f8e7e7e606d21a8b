"""The sparse autoencoder: one encode -> select -> decode core with a pluggable selection rule.

    x_n   = (x - input_mean) * input_scale                 (input normalisation)
    pre   = (x_n - b_dec) @ W_enc + b_enc                   [tokens, n_latents]
    z     = select(pre)                                     (the kind's rule, `selection`)
    x_hat = (z @ W_dec + b_dec) / input_scale + input_mean  [tokens, d_in]

`SAE` is a pytree (a ``flax.struct`` dataclass): trainable ``params``, the inference
``threshold`` of the batch-level rules, the normalisation constants, and a static `SAESpec`.
``encode`` / ``decode`` work in the units of the data; the loss works on normalised inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from sparsejax.sae import median as median_lib
from sparsejax.sae import selection

__all__ = [
    "B_DEC_INITS",
    "KINDS",
    "NEEDS_K",
    "PER_TOKEN_K",
    "SAE",
    "SAESpec",
    "SELECTIONS",
    "THRESHOLDED",
    "init_sae",
    "make_spec",
    "sparse_decode",
    "sparse_decode_reference",
]

# kind -> (default selection rule, objective). Selections: how latents fire; objectives: which
# reconstructions the loss asks for (one, every nested prefix, or several budgets k).
KINDS: dict[str, tuple[str, str]] = {
    "abstopk": ("abstopk", "single"),
    "batchtopk": ("batchtopk", "single"),
    "feature_choice": ("feature_choice", "single"),
    "jumprelu": ("jumprelu", "single"),
    "matryoshka": ("batchtopk", "matryoshka"),
    "multi_k": ("topk", "multi_k"),
    "mutual_choice": ("mutual_choice", "single"),
    "relu_l1": ("relu_l1", "single"),
    "topk": ("topk", "single"),
}
SELECTIONS = tuple(sorted({rule for rule, _ in KINDS.values()}))
# Spellings people use for the same kinds.
_ALIASES = {"relu": "relu_l1", "standard": "relu_l1", "l1": "relu_l1", "multik": "multi_k"}
# Rules that need a budget k, and the batch-level ones that use a learned threshold at inference.
NEEDS_K = ("abstopk", "batchtopk", "feature_choice", "mutual_choice", "topk")
THRESHOLDED = ("batchtopk", "feature_choice", "mutual_choice")
PER_TOKEN_K = ("abstopk", "topk")


def _canonical_kind(kind: Any) -> str:
    if not isinstance(kind, str):
        raise ValueError(f"kind must be a string, one of {sorted(KINDS)}, got {kind!r}")
    key = kind.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, _ALIASES.get(key.replace("_", ""), key))
    squeezed = {name.replace("_", ""): name for name in KINDS}
    key = squeezed.get(key.replace("_", ""), key)
    if key not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    return key


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | jnp.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class SAESpec:
    """Static description of an SAE (hashable, so it can sit in a jitted function's closure).

    Attributes:
      kind: the name it was built from (a key of `KINDS`).
      selection: the rule that picks active latents (one of ``SELECTIONS``).
      objective: ``"single"``, ``"matryoshka"`` or ``"multi_k"``.
      d_in: input width.
      n_latents: dictionary size.
      k: latents per token (mean per token for the batch rules); None for ReLU-L1 and JumpReLU.
      prefixes: Matryoshka's nested prefix sizes, increasing, the last equal to n_latents.
      ks: multi-k's budgets, increasing, the last equal to k.
      tokens_per_latent: Feature Choice's m; None derives ``round(k * tokens / n_latents)``
        from each batch.
      bandwidth: JumpReLU's kernel width epsilon.
    """

    kind: str
    selection: str
    objective: str
    d_in: int
    n_latents: int
    k: int | None = None
    prefixes: tuple[int, ...] = ()
    ks: tuple[int, ...] = ()
    tokens_per_latent: int | None = None
    bandwidth: float = 0.001

    def tokens_per_latent_for(self, tokens: int) -> int:
        """Feature Choice's m for a batch of ``tokens``: the spec's, or the TopK-equal budget."""
        if self.tokens_per_latent is not None:
            return min(self.tokens_per_latent, tokens)
        return max(1, min(tokens, round(self.k * tokens / self.n_latents)))


def make_spec(
    kind: str,
    *,
    d_in: int,
    n_latents: int,
    k: int | None = None,
    selection: str | None = None,
    prefixes: tuple[int, ...] | None = None,
    ks: tuple[int, ...] | None = None,
    tokens_per_latent: int | None = None,
    bandwidth: float = 0.001,
) -> SAESpec:
    """Validates an SAE's hyperparameters once and returns its `SAESpec`.

    Args:
      kind: one of `KINDS` (``"topk"``, ``"batchtopk"``, ``"relu_l1"``, ``"jumprelu"``,
        ``"abstopk"``, ``"feature_choice"``, ``"mutual_choice"``, ``"matryoshka"``,
        ``"multi_k"``); ``relu`` and spellings without underscores are accepted too.
      d_in: input width.
      n_latents: dictionary size.
      k: latents per token; required by every rule but ReLU-L1 and JumpReLU (ignored there).
      selection: overrides the kind's rule, e.g. ``kind="matryoshka", selection="topk"``.
      prefixes: Matryoshka's prefix sizes (default: n_latents / 16, / 8, / 4, / 2 and
        n_latents); n_latents is appended if missing.
      ks: multi-k's budgets (default k / 4, k / 2 and k); k is appended if missing.
      tokens_per_latent: Feature Choice's m (default derived from k per batch).
      bandwidth: JumpReLU's kernel width (default 0.001 as in the paper).

    Returns:
      The `SAESpec`.

    Raises:
      ValueError: naming the argument, for an unknown kind or selection (listing the known
        ones), a nonpositive size, ``k > n_latents``, a missing k, or bad prefixes / ks.
    """
    kind = _canonical_kind(kind)
    d_in = _positive_int("d_in", d_in)
    n_latents = _positive_int("n_latents", n_latents)
    default_selection, objective = KINDS[kind]
    if selection is None:
        selection = default_selection
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {sorted(SELECTIONS)}, got {selection!r}")
    if k is not None:
        k = _positive_int("k", k)
        if k > n_latents:
            raise ValueError(f"k must be at most n_latents={n_latents}, got k={k}")
    if selection in NEEDS_K and k is None:
        raise ValueError(f"k is required for kind={kind!r} (selection {selection!r}), got None")
    if selection not in NEEDS_K:
        k = None
    if objective == "multi_k" and selection not in PER_TOKEN_K:
        raise ValueError(
            f"selection must be one of {list(PER_TOKEN_K)} for kind='multi_k', got {selection!r}"
        )
    if objective == "matryoshka":
        if prefixes is None:
            prefixes = tuple(n_latents // 2**j for j in (4, 3, 2, 1) if n_latents // 2**j > 0)
        prefixes = _increasing("prefixes", prefixes, n_latents, "n_latents")
    elif prefixes is not None:
        raise ValueError(f"prefixes apply only to kind='matryoshka', got kind={kind!r}")
    if objective == "multi_k":
        if ks is None:
            ks = tuple(k // d for d in (4, 2) if k // d > 0)
        ks = _increasing("ks", ks, k, "k")
    elif ks is not None:
        raise ValueError(f"ks apply only to kind='multi_k', got kind={kind!r}")
    if tokens_per_latent is not None:
        if selection != "feature_choice":
            raise ValueError(
                f"tokens_per_latent applies only to feature choice, got selection={selection!r}"
            )
        tokens_per_latent = _positive_int("tokens_per_latent", tokens_per_latent)
    if not (isinstance(bandwidth, int | float) and math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"bandwidth must be a positive float, got {bandwidth!r}")
    return SAESpec(
        kind=kind,
        selection=selection,
        objective=objective,
        d_in=d_in,
        n_latents=n_latents,
        k=k,
        prefixes=tuple(prefixes or ()),
        ks=tuple(ks or ()),
        tokens_per_latent=tokens_per_latent,
        bandwidth=float(bandwidth),
    )


def _increasing(name: str, values: Any, last: int, last_name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of ints, got {values!r}") from None
    if values[-1:] != (last,):
        values = values + (last,)
    if any(v < 1 for v in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(
            f"{name} must increase strictly from >= 1 to {last_name}={last}, got {values!r}"
        )
    return values


def _gather_sum(values: jax.Array, indices: jax.Array, decoder: jax.Array) -> jax.Array:
    """``[T, k] x [T, k] -> [T, d]``: one gathered row per rank at a time, summed in a loop."""
    dtype = jnp.result_type(values, decoder)

    def add_rank(r, out):
        return out + values[:, r, None] * jnp.take(decoder, indices[:, r], axis=0)

    out = jnp.zeros((values.shape[0], decoder.shape[1]), dtype)
    return jax.lax.fori_loop(0, indices.shape[1], add_rank, out)


@jax.custom_vjp
def _sparse_decode(values, indices, decoder):
    return _gather_sum(values, indices, decoder)


def _sparse_decode_fwd(values, indices, decoder):
    return _gather_sum(values, indices, decoder), (values, indices, decoder)


def _sparse_decode_bwd(residuals, g):
    values, indices, decoder = residuals

    def rank(r, carry):
        d_values, d_decoder = carry
        rows = jnp.take(decoder, indices[:, r], axis=0)
        d_values = d_values.at[:, r].set(jnp.sum(rows * g, axis=-1).astype(values.dtype))
        # Duplicate latents across tokens accumulate: a scatter-add of k rows a token.
        update = (values[:, r, None] * g).astype(decoder.dtype)
        d_decoder = d_decoder.at[indices[:, r]].add(update)
        return d_values, d_decoder

    zeros = (jnp.zeros_like(values), jnp.zeros_like(decoder))
    d_values, d_decoder = jax.lax.fori_loop(0, indices.shape[1], rank, zeros)
    return d_values, None, d_decoder


_sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


def sparse_decode(values: jax.Array, indices: jax.Array, decoder: jax.Array) -> jax.Array:
    """``sum_r values[..., r] * decoder[indices[..., r]]``: decoding from k rows per token.

    Args:
      values: ``float[..., k]`` the kept codes of each token.
      indices: ``int[..., k]`` their latents.
      decoder: ``float[n_latents, d_in]``.

    Returns:
      ``float[..., d_in]``, equal to `sparse_decode_reference` (the dense matmul of the
      scattered codes) in 2 k d FLOPs a token instead of 2 n_latents d, never touching the
      rows a token does not use. The loop over the k ranks gathers one ``[tokens, d_in]``
      slab at a time (no ``[tokens, k, d_in]`` intermediate); the custom backward pass does
      the same for the codes' gradient (a gather-dot) and the decoder's (a scatter-add of k
      rows a token).
    """
    values, indices = jnp.asarray(values), jnp.asarray(indices)
    if values.shape != indices.shape or values.ndim < 1:
        raise ValueError(
            f"values and indices must have the same shape [..., k], got {values.shape} and "
            f"{indices.shape}"
        )
    if decoder.ndim != 2:
        raise ValueError(f"decoder must be [n_latents, d_in], got shape {decoder.shape}")
    lead, k = values.shape[:-1], values.shape[-1]
    out = _sparse_decode(values.reshape(-1, k), indices.reshape(-1, k), decoder)
    return out.reshape(*lead, decoder.shape[1])


def sparse_decode_reference(values: jax.Array, indices: jax.Array, decoder: jax.Array) -> jax.Array:
    """Dense reference of `sparse_decode`: scatter the codes to ``[..., n_latents]``, matmul."""
    z = jnp.sum(
        jax.nn.one_hot(indices, decoder.shape[0], dtype=values.dtype) * values[..., None], -2
    )
    return z @ decoder


@flax.struct.dataclass
class SAE:
    """A sparse autoencoder as a pytree. Build one with `init_sae` or `sparsejax.sae.fit`.

    Attributes:
      params: trainable ``{"W_enc": [d_in, n], "b_enc": [n], "W_dec": [n, d_in],
        "b_dec": [d_in]}`` plus ``"log_threshold": [n]`` for JumpReLU.
      threshold: ``float[n]`` inference threshold of the batch-level rules (BatchTopK and
        Mutual Choice hold one global value in every entry, Feature Choice one per latent);
        learned during training, unused by the other rules.
      input_mean: ``float[d_in]`` subtracted before scaling (zeros without mean-centring).
      input_scale: ``float[]`` making the centred inputs' mean squared norm d_in.
      spec: the static `SAESpec`.
    """

    params: dict[str, jax.Array]
    threshold: jax.Array
    input_mean: jax.Array
    input_scale: jax.Array
    spec: SAESpec = flax.struct.field(pytree_node=False)

    @property
    def decoder(self) -> jax.Array:
        """``float[n_latents, d_in]`` dictionary: row i is latent i's (unit-norm) direction."""
        return self.params["W_dec"]

    @property
    def encoder(self) -> jax.Array:
        """``float[d_in, n_latents]`` encoder weights."""
        return self.params["W_enc"]

    @property
    def n_latents(self) -> int:
        return self.spec.n_latents

    @property
    def d_in(self) -> int:
        return self.spec.d_in

    def _check_last(self, name: str, a: jax.Array, width: int, width_name: str) -> jax.Array:
        a = jnp.asarray(a)
        if a.ndim < 1 or a.shape[-1] != width:
            raise ValueError(f"{name} must be [..., {width_name}={width}], got shape {a.shape}")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            a = a.astype(jnp.float32)
        return a.astype(jnp.promote_types(a.dtype, self.params["W_dec"].dtype))

    def normalize(self, x: jax.Array) -> jax.Array:
        """Inputs ``[..., d_in]`` in the units the SAE trains on: ``(x - mean) * scale``."""
        x = self._check_last("x", x, self.d_in, "d_in")
        return (x - self.input_mean) * self.input_scale

    def pre_activations(self, x_normalized: jax.Array) -> jax.Array:
        """``(x_n - b_dec) @ W_enc + b_enc`` for normalised inputs: ``[..., n_latents]``."""
        p = self.params
        return (x_normalized - p["b_dec"]) @ p["W_enc"] + p["b_enc"]

    def jump_threshold(self) -> jax.Array:
        """JumpReLU's positive per-latent threshold ``exp(log_threshold)``: ``[n_latents]``."""
        return jnp.exp(self.params["log_threshold"])

    def select(self, pre: jax.Array, *, training: bool = False, k: int | None = None):
        """Applies the spec's rule to pre-activations ``[..., n_latents]``.

        With ``training=True`` the batch-level rules select over the batch (``pre`` must be
        ``[tokens, n_latents]``); otherwise they keep what exceeds ``threshold``. ``k``
        overrides the per-token budget of TopK and AbsTopK (e.g. any of multi-k's ks).
        """
        rule, spec = self.spec.selection, self.spec
        if k is not None and rule not in PER_TOKEN_K:
            raise ValueError(f"k can override only the per-token rules {PER_TOKEN_K}, not {rule!r}")
        if k is None:
            k = spec.k
        if rule == "relu_l1":
            return selection.relu(pre)
        if rule == "topk":
            return selection.topk(pre, k)
        if rule == "abstopk":
            return selection.abs_topk(pre, k)
        if rule == "jumprelu":
            return selection.jumprelu(pre, self.jump_threshold(), spec.bandwidth)
        if not training:
            return selection.threshold_select(pre, self.threshold)
        if rule == "batchtopk":
            return selection.batch_topk(pre, k)
        if rule == "mutual_choice":
            return selection.mutual_choice(pre, k)
        return selection.feature_choice(pre, spec.tokens_per_latent_for(pre.shape[0]))

    def encode(self, x: jax.Array, *, k: int | None = None) -> jax.Array:
        """Codes of inputs ``x [..., d_in]`` (data units): ``float[..., n_latents]``.

        The per-token rules apply as in training; BatchTopK, Mutual Choice and Feature
        Choice keep the pre-activations above the thresholds learned in training, so a
        token's code does not depend on the rest of its batch. ``k`` overrides TopK's and
        AbsTopK's budget (any k, e.g. one of a multi-k SAE's budgets).

        Raises:
          ValueError: for ``x`` whose last axis is not d_in, or a bad ``k``.
        """
        return self.select(self.pre_activations(self.normalize(x)), k=k)

    def decode_normalized(self, z: jax.Array) -> jax.Array:
        """``z @ W_dec + b_dec``: the reconstruction in normalised units."""
        return z @ self.params["W_dec"] + self.params["b_dec"]

    def decode(self, z: jax.Array) -> jax.Array:
        """Reconstruction ``float[..., d_in]`` in data units from codes ``z [..., n_latents]``.

        Raises:
          ValueError: for ``z`` whose last axis is not n_latents.
        """
        z = self._check_last("z", z, self.n_latents, "n_latents")
        return self.decode_normalized(z) / self.input_scale + self.input_mean

    def __call__(self, x: jax.Array) -> jax.Array:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x))


@functools.partial(jax.jit, static_argnames=("normalize", "center", "b_dec_init"))
def _data_statistics(sample: jax.Array, *, normalize: bool, center: bool, b_dec_init: str):
    """Input mean, input scale and decoder bias from a sample, in one compiled function."""
    d = sample.shape[-1]
    mean = jnp.mean(sample, axis=0) if center else jnp.zeros(d, sample.dtype)
    scale = jnp.ones((), sample.dtype)
    if normalize:
        mean_sq = jnp.mean(jnp.sum(jnp.square(sample - mean), axis=-1))
        scale = jnp.sqrt(d / jnp.maximum(mean_sq, jnp.finfo(sample.dtype).tiny))
    normalized = (sample - mean) * scale
    if b_dec_init == "geometric_median":
        b_dec = median_lib.weiszfeld(normalized, jnp.ones(sample.shape[0], sample.dtype))
    elif b_dec_init == "mean":
        b_dec = jnp.mean(normalized, axis=0)
    else:
        b_dec = jnp.zeros(d, sample.dtype)
    return mean, scale, b_dec


@functools.partial(jax.jit, static_argnames=("n", "d", "dtype"))
def _unit_rows(key: jax.Array, n: int, d: int, dtype: Any) -> jax.Array:
    w = jax.random.normal(key, (n, d), dtype)
    return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


B_DEC_INITS = ("geometric_median", "mean", "zeros")


def init_sae(
    key: jax.Array,
    spec: SAESpec,
    sample: jax.Array | None = None,
    *,
    b_dec_init: str = "geometric_median",
    normalize_input: bool = True,
    center_input: bool = False,
    jumprelu_init_threshold: float = 0.001,
    dtype: Any = jnp.float32,
) -> SAE:
    """A freshly initialised SAE.

    Args:
      key: ``jax.random.key``.
      spec: from `make_spec`.
      sample: ``float[tokens, d_in]`` activations used for the input normalisation and the
        decoder bias; without one the normalisation is the identity and ``b_dec`` is 0.
      b_dec_init: ``"geometric_median"`` (Gao et al.), ``"mean"`` or ``"zeros"``.
      normalize_input: scale inputs so their (centred) mean squared norm is d_in, as in
        Anthropic's April 2024 update and Bussmann et al.; one constant for the data set.
      center_input: subtract the sample mean before scaling (an outlier direction shared by
        every token, common in LM residual streams, otherwise dominates the scale and
        starves the other directions, leaving latents dead).
      jumprelu_init_threshold: JumpReLU's initial threshold (0.001 as in the paper).
      dtype: parameter dtype.

    Returns:
      The `SAE`: decoder rows are random unit vectors, ``W_enc = W_dec^T`` (Gao et al. 2024:
      each latent starts reading the direction it writes, which leaves fewer dead latents),
      ``b_enc = 0``.

    Raises:
      ValueError: for an unknown ``b_dec_init`` or a sample that is not ``[tokens, d_in]``.
    """
    if b_dec_init not in B_DEC_INITS:
        raise ValueError(f"b_dec_init must be one of {list(B_DEC_INITS)}, got {b_dec_init!r}")
    d, n = spec.d_in, spec.n_latents
    w_dec = _unit_rows(key, n, d, jnp.dtype(dtype))
    mean, scale = jnp.zeros(d, dtype), jnp.ones((), dtype)
    b_dec = jnp.zeros(d, dtype)
    if sample is not None:
        sample = jnp.asarray(sample, dtype)
        if sample.ndim != 2 or sample.shape[1] != d or sample.shape[0] == 0:
            raise ValueError(f"sample must be [tokens, d_in={d}], got shape {sample.shape}")
        mean, scale, b_dec = _data_statistics(
            sample, normalize=normalize_input, center=center_input, b_dec_init=b_dec_init
        )
    params = {"W_enc": w_dec.T, "b_enc": jnp.zeros(n, dtype), "W_dec": w_dec, "b_dec": b_dec}
    if spec.selection == "jumprelu":
        if not jumprelu_init_threshold > 0:
            raise ValueError(
                f"jumprelu_init_threshold must be positive, got {jumprelu_init_threshold!r}"
            )
        params["log_threshold"] = jnp.full(n, math.log(jumprelu_init_threshold), dtype)
    return SAE(
        params=params,
        threshold=jnp.zeros(n, dtype),
        input_mean=mean,
        input_scale=scale,
        spec=spec,
    )
