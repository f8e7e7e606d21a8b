"""Selection rules: which latents of a sparse autoencoder fire, given the pre-activations.

Every rule maps pre-activations ``pre [tokens, n_latents]`` (``W_enc (x - b_dec) + b_enc``)
to codes ``z`` of the same shape. Per-token rules (ReLU, TopK, AbsTopK, JumpReLU) also take
any leading batch shape; the batch-level rules (BatchTopK, Mutual Choice, Feature Choice)
look at a whole ``[tokens, n_latents]`` batch at once, so a latent's code depends on the other
tokens of the batch; at inference they use the per-latent thresholds of `threshold_select`.

JumpReLU's threshold is learned through straight-through pseudo-derivatives (`jumprelu`,
`step`); `jumprelu_smoothed_reference` and `step_smoothed_reference` are the functions whose
exact derivatives in the threshold those pseudo-derivatives are.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = [
    "abs_topk",
    "batch_topk",
    "feature_choice",
    "jumprelu",
    "jumprelu_smoothed_reference",
    "mutual_choice",
    "rectangle",
    "relu",
    "step",
    "step_smoothed_reference",
    "threshold_select",
    "topk",
    "topk_indices",
]


def _check_budget(name: str, value: int, limit: int, limit_name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"{name} must be an int in [1, {limit_name}={limit}], got {value!r}")


def _check_batch(pre: jax.Array) -> None:
    if pre.ndim != 2:
        raise ValueError(f"pre must be [tokens, n_latents] for a batch rule, got shape {pre.shape}")


def relu(pre: jax.Array) -> jax.Array:
    """The standard SAE's activation: ``z = max(pre, 0)``.

    Args:
      pre: ``float[..., n_latents]`` pre-activations.

    Returns:
      ``float[..., n_latents]``, as many nonzeros as positive pre-activations.

    Reference: Bricken et al. 2023, "Towards Monosemanticity: Decomposing Language Models With
    Dictionary Learning". Sparsity comes from an L1 penalty on ``z`` in the loss (weighted by the
    decoder row norms, so shrinking the decoder cannot cheat it), not from the activation.
    """
    return jax.nn.relu(pre)


def topk_indices(pre: jax.Array, k: int, *, absolute: bool = False) -> tuple[jax.Array, jax.Array]:
    """The k largest pre-activations of each token, largest first, and where they are.

    Args:
      pre: ``float[..., n_latents]``.
      k: latents kept per token, in [1, n_latents].
      absolute: rank by ``|pre|`` instead of ``pre`` (values keep their sign).

    Returns:
      ``(values float[..., k], indices int32[..., k])``, sorted by (absolute) value,
      descending; the values are the raw pre-activations (no ReLU applied).

    Raises:
      ValueError: for ``k`` outside [1, n_latents].
    """
    _check_budget("k", k, pre.shape[-1], "n_latents")
    if absolute:
        _, indices = jax.lax.top_k(jnp.abs(pre), k)
        return jnp.take_along_axis(pre, indices, axis=-1), indices
    return jax.lax.top_k(pre, k)


def _keep(pre: jax.Array, mask: jax.Array, *, signed: bool = False) -> jax.Array:
    return jnp.where(mask, pre if signed else jax.nn.relu(pre), 0)


def _mask_from_indices(indices: jax.Array, n: int) -> jax.Array:
    rows = indices.shape[:-1]
    flat = indices.reshape(-1, indices.shape[-1])
    mask = jnp.zeros((flat.shape[0], n), jnp.bool_)
    mask = mask.at[jnp.arange(flat.shape[0])[:, None], flat].set(True)
    return mask.reshape(*rows, n)


def topk(pre: jax.Array, k: int) -> jax.Array:
    """TopK activation: each token keeps its k largest pre-activations, then ReLU.

    Args:
      pre: ``float[..., n_latents]``.
      k: latents kept per token, in [1, n_latents].

    Returns:
      ``float[..., n_latents]``: exactly k selected latents per token carry
      ``max(pre, 0)``, every other latent is 0 (so at most k nonzeros, exactly k when the
      k-th largest pre-activation is positive). Gradients reach only the selected entries.

    Raises:
      ValueError: for ``k`` outside [1, n_latents].

    Reference: Gao et al. 2024, "Scaling and evaluating sparse autoencoders". The sparsity
    level is set directly by k instead of being traded off against reconstruction by an L1
    coefficient, which removes the L1's shrinkage of the kept activations.
    """
    _, indices = topk_indices(pre, k)
    return _keep(pre, _mask_from_indices(indices, pre.shape[-1]))


def abs_topk(pre: jax.Array, k: int) -> jax.Array:
    """AbsTopK: each token keeps the k pre-activations largest in magnitude, with their sign.

    Args:
      pre: ``float[..., n_latents]``.
      k: latents kept per token, in [1, n_latents].

    Returns:
      ``float[..., n_latents]`` with exactly k selected latents per token carrying ``pre``
      unchanged (negative ones included) and zeros elsewhere.

    Raises:
      ValueError: for ``k`` outside [1, n_latents].

    Reference: Zhu et al. 2025 (AbsTopK sparse autoencoders). Without the ReLU one latent
    can stand for both directions of a concept (a negative code moves against its decoder
    row), so opposite concepts need not take two latents.
    """
    _, indices = topk_indices(pre, k, absolute=True)
    return _keep(pre, _mask_from_indices(indices, pre.shape[-1]), signed=True)


def batch_topk(pre: jax.Array, k: int) -> jax.Array:
    """BatchTopK: the batch keeps its ``k * tokens`` largest pre-activations, then ReLU.

    Args:
      pre: ``float[tokens, n_latents]``, one training batch.
      k: mean latents per token, in [1, n_latents].

    Returns:
      ``float[tokens, n_latents]`` with exactly ``k * tokens`` selected entries over the
      whole batch (any token may take more or fewer than k) carrying ``max(pre, 0)``.

    Raises:
      ValueError: for ``pre`` that is not 2-D or ``k`` outside [1, n_latents].

    Reference: Bussmann et al. 2024, "BatchTopK Sparse Autoencoders". Relaxing TopK's
    per-token budget to a per-batch budget lets hard tokens use more latents and easy ones
    fewer at the same mean L0. Because a token's code then depends on its batch, inference
    instead keeps every pre-activation above one global threshold estimated during
    training (`threshold_select`).
    """
    _check_batch(pre)
    tokens, n = pre.shape
    _check_budget("k", k, n, "n_latents")
    _, flat = jax.lax.top_k(pre.reshape(-1), k * tokens)
    mask = jnp.zeros(tokens * n, jnp.bool_).at[flat].set(True).reshape(tokens, n)
    return _keep(pre, mask)


def mutual_choice(pre: jax.Array, k: int) -> jax.Array:
    """Mutual Choice: the top ``k * tokens`` (token, latent) pairs of the batch, then ReLU.

    Args:
      pre: ``float[tokens, n_latents]``, one training batch.
      k: mean latents per token, in [1, n_latents].

    Returns:
      ``float[tokens, n_latents]`` with exactly ``k * tokens`` selected pairs.

    Raises:
      ValueError: for ``pre`` that is not 2-D or ``k`` outside [1, n_latents].

    Reference: Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature
    Choice Sparse Autoencoders". Token-latent matching is posed as allocating a total budget
    of ``k * tokens`` matches; Mutual Choice allocates it with no per-token or per-latent
    limit, which is the same selection as `batch_topk` (found independently). Inference uses
    the global threshold of `threshold_select`.
    """
    return batch_topk(pre, k)


def feature_choice(pre: jax.Array, m: int) -> jax.Array:
    """Feature Choice: each latent picks the m tokens of the batch it responds to most.

    Args:
      pre: ``float[tokens, n_latents]``, one training batch.
      m: tokens per latent, in [1, tokens]; ``m = k * tokens / n_latents`` spends the same
        total budget as TopK at k.

    Returns:
      ``float[tokens, n_latents]``: every latent has exactly m selected tokens carrying
      ``max(pre, 0)`` (so at most m nonzeros per latent); a token may get any number.

    Raises:
      ValueError: for ``pre`` that is not 2-D or ``m`` outside [1, tokens].

    Reference: Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature
    Choice Sparse Autoencoders". The per-latent budget (as in expert-choice routing) means
    no latent can go unused, so dead latents cannot form; tokens get as many latents as
    pick them. Inference keeps each latent's pre-activations above its own threshold
    (`threshold_select`) estimated during training.
    """
    _check_batch(pre)
    tokens, n = pre.shape
    _check_budget("m", m, tokens, "tokens")
    _, rows = jax.lax.top_k(pre.T, m)  # [n, m]: the chosen tokens of each latent
    mask = jnp.zeros((n, tokens), jnp.bool_).at[jnp.arange(n)[:, None], rows].set(True)
    return _keep(pre, mask.T)


def threshold_select(pre: jax.Array, threshold: jax.Array) -> jax.Array:
    """Inference rule of the batch-level selections: ``z = pre * [pre > threshold]`` (ReLU'd).

    Args:
      pre: ``float[..., n_latents]``.
      threshold: ``float[n_latents]`` (or a scalar): BatchTopK and Mutual Choice use one
        global value for every latent, Feature Choice one per latent.

    Returns:
      ``float[..., n_latents]``: ``max(pre, 0)`` where ``pre > threshold``, else 0. Each
      token's code no longer depends on the rest of its batch.
    """
    return jnp.where(pre > threshold, jax.nn.relu(pre), 0)


def rectangle(u: jax.Array) -> jax.Array:
    """The rectangle kernel ``K(u) = 1`` for ``-1/2 < u < 1/2``, else 0 (it integrates to 1)."""
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _sum_to(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums a broadcast cotangent back to ``shape`` (the threshold's shape)."""
    lead = g.ndim - len(shape)
    g = jnp.sum(g, axis=tuple(range(lead))) if lead else g
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    return jnp.sum(g, axis=axes, keepdims=True) if axes else g


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """JumpReLU ``z = pre * H(pre - threshold)`` with a straight-through threshold gradient.

    Args:
      pre: ``float[..., n_latents]``.
      threshold: ``float[n_latents]``, positive (one learned threshold per latent).
      bandwidth: the kernel width epsilon of the pseudo-derivative (the paper uses 0.001
        on inputs normalised to unit mean squared norm).

    Returns:
      ``float[..., n_latents]``: ``pre`` where ``pre > threshold``, else 0.

    Gradients: d z / d pre = H(pre - threshold), as for a ReLU shifted to the threshold;
    d z / d threshold = -(threshold / bandwidth) * K((pre - threshold) / bandwidth) with the
    rectangle kernel K: the jump of height ``threshold`` at ``pre = threshold``, spread over a
    window of width ``bandwidth``. It is the exact derivative in ``threshold`` of
    `jumprelu_smoothed_reference`.

    Reference: Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity
    with JumpReLU Sparse Autoencoders". The true derivative in the threshold is zero almost
    everywhere; averaged over a batch, the kernel pseudo-derivative is a kernel density
    estimate of the derivative of the expected loss, which is what lets gradient descent move
    the thresholds.
    """
    return jnp.where(pre > threshold, pre, 0)


def _jumprelu_fwd(pre, threshold, bandwidth):
    return jumprelu(pre, threshold, bandwidth), (pre, threshold)


def _jumprelu_bwd(bandwidth, residuals, g):
    pre, threshold = residuals
    d_pre = jnp.where(pre > threshold, g, 0)
    d_threshold = -(threshold / bandwidth) * rectangle((pre - threshold) / bandwidth) * g
    return d_pre, _sum_to(d_threshold, jnp.shape(threshold))


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """The Heaviside step ``H(pre - threshold)`` (1.0 where a JumpReLU latent fires).

    Summed over latents it is the L0 norm JumpReLU penalises.

    Args:
      pre: ``float[..., n_latents]``.
      threshold: ``float[n_latents]``.
      bandwidth: kernel width epsilon of the pseudo-derivative.

    Returns:
      ``float[..., n_latents]`` of 0.0 / 1.0.

    Gradients: none to ``pre`` (the paper passes none, so the L0 penalty trains only the
    thresholds); d H / d threshold = -(1 / bandwidth) * K((pre - threshold) / bandwidth), the
    exact derivative of `step_smoothed_reference`.

    Reference: Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity
    with JumpReLU Sparse Autoencoders".
    """
    return (pre > threshold).astype(pre.dtype)


def _step_fwd(pre, threshold, bandwidth):
    return step(pre, threshold, bandwidth), (pre, threshold)


def _step_bwd(bandwidth, residuals, g):
    pre, threshold = residuals
    d_threshold = -(1.0 / bandwidth) * rectangle((pre - threshold) / bandwidth) * g
    return jnp.zeros_like(pre), _sum_to(d_threshold, jnp.shape(threshold))


step.defvjp(_step_fwd, _step_bwd)


def step_smoothed_reference(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """The step smoothed by the rectangle kernel: ``clip((pre - threshold) / eps + 1/2, 0, 1)``.

    Its derivative in ``threshold`` is exactly `step`'s pseudo-derivative.
    """
    return jnp.clip((pre - threshold) / bandwidth + 0.5, 0.0, 1.0)


def jumprelu_smoothed_reference(
    pre: jax.Array, threshold: jax.Array, bandwidth: float
) -> jax.Array:
    """A JumpReLU smoothed in its threshold, whose threshold derivative is `jumprelu`'s.

    Integrating ``-(t / eps) K((pre - t) / eps)`` over the threshold t gives ``pre`` for
    ``threshold <= pre - eps/2``, 0 for ``threshold >= pre + eps/2`` and, inside the window,
    ``pre - (threshold**2 - (pre - eps/2)**2) / (2 eps)``, which joins both continuously.
    """
    lo = pre - 0.5 * bandwidth
    inside = pre - (jnp.square(threshold) - jnp.square(lo)) / (2.0 * bandwidth)
    return jnp.where(threshold <= lo, pre, jnp.where(threshold >= pre + 0.5 * bandwidth, 0, inside))
