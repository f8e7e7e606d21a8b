"""SAE training objectives: reconstruction (single, Matryoshka, multi-k), sparsity, AuxK.

All losses work on normalised inputs ``x_n [tokens, d_in]`` (see `SAE.normalize`); a
reconstruction error is the squared norm summed over the d_in features, averaged over tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparsejax.sae import model, selection
from sparsejax.sae.model import SAE

__all__ = [
    "Forward",
    "aux_k_loss",
    "forward",
    "l0_penalty",
    "l1_penalty",
    "matryoshka_reconstructions",
    "multi_k_reconstructions",
    "reconstruction_error",
    "sae_loss",
]


class Forward(NamedTuple):
    """One training forward pass.

    Attributes:
      pre: ``[tokens, n_latents]`` pre-activations.
      z: ``[tokens, n_latents]`` codes of the training selection.
      x_hat: ``[tokens, d_in]`` the main reconstruction (normalised units): the full
        dictionary for Matryoshka, budget k for multi-k.
      recon: scalar reconstruction loss of the objective (mean over its reconstructions).
    """

    pre: jax.Array
    z: jax.Array
    x_hat: jax.Array
    recon: jax.Array


def reconstruction_error(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """``mean_tokens ||x - x_hat||^2`` (summed over features): a float scalar."""
    return jnp.mean(jnp.sum(jnp.square(x - x_hat), axis=-1))


def matryoshka_reconstructions(sae: SAE, z: jax.Array) -> list[jax.Array]:
    """The reconstruction from every nested prefix of latents, smallest first.

    Args:
      sae: an SAE whose spec has ``prefixes`` m_1 < ... < m_P = n_latents.
      z: ``[tokens, n_latents]`` codes.

    Returns:
      P arrays ``[tokens, d_in]``: ``z[:, :m_i] @ W_dec[:m_i] + b_dec``, built as a running
      sum over the groups between prefixes, so all of them cost one decode.

    Reference: Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka Sparse
    Autoencoders", and Nabeshima 2024, "Matryoshka Sparse Autoencoders". Asking every prefix
    to reconstruct on its own makes the first latents learn general features (a parent
    concept) that later latents refine, instead of a child latent absorbing its parent.
    """
    w_dec = sae.params["W_dec"]
    out, running, start = [], sae.params["b_dec"], 0
    for stop in sae.spec.prefixes:
        running = running + z[:, start:stop] @ w_dec[start:stop]
        out.append(running)
        start = stop
    return out


def multi_k_reconstructions(sae: SAE, pre: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    """Reconstructions at every budget of a multi-k SAE from one sort of the pre-activations.

    Args:
      sae: an SAE whose spec has ``ks`` k_1 < ... < k_J = k and a TopK or AbsTopK rule.
      pre: ``[tokens, n_latents]`` pre-activations.

    Returns:
      ``(reconstructions, z)``: J arrays ``[tokens, d_in]`` decoded from each token's k_j
      largest (absolute, for AbsTopK) pre-activations through `sparse_decode`, and the codes
      ``z`` at the main budget k.

    Reference: "Train One Sparse Autoencoder Across Multiple Sparsity Budgets" (2025), after
    HierarchicalTopK: the top k_j of a token are the first k_j of its top k_J, so one SAE
    trained on the average of the J reconstruction losses serves every budget (the budget
    becomes an inference choice, `SAE.encode(x, k=...)`).
    """
    spec = sae.spec
    signed = spec.selection == "abstopk"
    values, indices = selection.topk_indices(pre, spec.ks[-1], absolute=signed)
    if not signed:
        values = jax.nn.relu(values)
    w_dec, b_dec = sae.params["W_dec"], sae.params["b_dec"]
    recons = [model.sparse_decode(values[:, :kj], indices[:, :kj], w_dec) + b_dec for kj in spec.ks]
    return recons, sae.select(pre, training=True)


def forward(sae: SAE, x_n: jax.Array, *, sparse_decode: bool = False) -> Forward:
    """The training forward pass of ``sae`` on normalised inputs ``x_n [tokens, d_in]``.

    With ``sparse_decode`` a TopK or AbsTopK SAE decodes through `sparse_decode` from its k
    kept latents a token (same values and gradients as the dense decode, fewer FLOPs).
    """
    pre = sae.pre_activations(x_n)
    objective = sae.spec.objective
    if sparse_decode:
        if sae.spec.selection not in ("topk", "abstopk") or objective != "single":
            raise ValueError(
                "sparse_decode applies to single-objective topk / abstopk SAEs, got "
                f"kind={sae.spec.kind!r}"
            )
        signed = sae.spec.selection == "abstopk"
        values, indices = selection.topk_indices(pre, sae.spec.k, absolute=signed)
        if not signed:
            values = jax.nn.relu(values)
        x_hat = model.sparse_decode(values, indices, sae.params["W_dec"]) + sae.params["b_dec"]
        # The dense codes serve the statistics (L0, firing counts, thresholds) only.
        z = jax.lax.stop_gradient(sae.select(pre, training=True))
        return Forward(pre=pre, z=z, x_hat=x_hat, recon=reconstruction_error(x_n, x_hat))
    if objective == "multi_k":
        recons, z = multi_k_reconstructions(sae, pre)
        x_hat = recons[-1]
    else:
        z = sae.select(pre, training=True)
        if objective == "matryoshka":
            recons = matryoshka_reconstructions(sae, z)
            x_hat = recons[-1]
        else:
            x_hat = sae.decode_normalized(z)
            recons = [x_hat]
    recon = jnp.mean(jnp.stack([reconstruction_error(x_n, r) for r in recons]))
    return Forward(pre=pre, z=z, x_hat=x_hat, recon=recon)


def l1_penalty(z: jax.Array, decoder: jax.Array) -> jax.Array:
    """``mean_tokens sum_i |z_i| * ||W_dec[i]||``: the standard SAE's sparsity penalty.

    Reference: Anthropic, "Towards Monosemanticity" (2023) and its April 2024 update.
    Weighting each code by its decoder row's norm makes the penalty invariant to moving
    scale between a code and its row, so it cannot be lowered by shrinking codes.
    """
    norms = jnp.linalg.norm(decoder, axis=-1)
    return jnp.mean(jnp.sum(jnp.abs(z) * norms, axis=-1))


def l0_penalty(sae: SAE, pre: jax.Array) -> jax.Array:
    """``mean_tokens ||z||_0`` of a JumpReLU SAE, with `selection.step`'s threshold gradient.

    Reference: Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity
    with JumpReLU Sparse Autoencoders". Penalising L0 itself instead of L1 leaves the kept
    codes unshrunk; the straight-through kernel gives the thresholds a gradient.
    """
    fired = selection.step(pre, sae.jump_threshold(), sae.spec.bandwidth)
    return jnp.mean(jnp.sum(fired, axis=-1))


def aux_k_loss(
    sae: SAE, pre: jax.Array, residual: jax.Array, dead: jax.Array, k_aux: int
) -> jax.Array:
    """AuxK: the dead latents' top-k_aux reconstruction of what the model missed.

    Args:
      sae: the SAE.
      pre: ``[tokens, n_latents]`` pre-activations.
      residual: ``[tokens, d_in]`` ``x_n - x_hat`` (taken as a constant: only the dead
        latents learn from it).
      dead: ``bool[n_latents]`` latents that have not fired for the dead window.
      k_aux: latents per token used from the dead ones (fewer where fewer are dead).

    Returns:
      A float scalar: ``||e - e_hat||^2 / ||e - mean(e)||^2`` over the batch, where
      ``e_hat = sum of the k_aux largest positive dead pre-activations times their decoder
      rows`` (no bias); 0 when no latent is dead. Normalising by the residual's variance
      keeps the coefficient (1/32) meaningful as the residual shrinks.

    Reference: Gao et al. 2024, "Scaling and evaluating sparse autoencoders". A latent that
    never fires gets no gradient from the main loss; asking the dead latents to explain the
    residual error gives them one, pulling them back to useful directions.
    """
    n = pre.shape[-1]
    k_aux = min(k_aux, n)
    residual = jax.lax.stop_gradient(residual)
    # Live latents are pushed below any dead pre-activation; those picked anyway (when fewer
    # than k_aux are dead) are then zeroed, so only dead latents contribute.
    floor = jnp.finfo(pre.dtype).min
    values, indices = jax.lax.top_k(jnp.where(dead, pre, floor), k_aux)
    values = jnp.where(dead[indices], jax.nn.relu(values), 0)
    e_hat = model.sparse_decode(values, indices, sae.params["W_dec"])
    error = jnp.sum(jnp.square(residual - e_hat))
    variance = jnp.sum(jnp.square(residual - jnp.mean(residual, axis=0)))
    loss = error / jnp.maximum(variance, jnp.finfo(pre.dtype).tiny)
    return jnp.where(jnp.any(dead), loss, 0.0)


def sae_loss(
    params: dict,
    sae: SAE,
    x_n: jax.Array,
    *,
    sparsity_coeff: jax.Array | float = 0.0,
    dead: jax.Array | None = None,
    k_aux: int = 0,
    aux_coeff: float = 0.0,
    sparse_decode: bool = False,
) -> tuple[jax.Array, tuple[dict, Forward]]:
    """The full training loss of ``sae`` with ``params`` on normalised inputs ``x_n``.

    Args:
      params: the trainable params (differentiated; replaces ``sae.params``).
      sae: the SAE (spec, thresholds, normalisation).
      x_n: ``[tokens, d_in]`` normalised inputs.
      sparsity_coeff: lambda of the L1 penalty (ReLU-L1) or the L0 penalty (JumpReLU);
        unused by the rules whose sparsity is a budget.
      dead: ``bool[n_latents]`` dead latents for AuxK (None: no AuxK).
      k_aux: AuxK's budget.
      aux_coeff: AuxK's coefficient.
      sparse_decode: decode a TopK / AbsTopK SAE from its k rows a token (`forward`).

    Returns:
      ``(loss, (terms, forward))`` where ``terms`` holds ``recon``, ``sparsity`` and ``aux``
      scalars and ``forward`` is the `Forward` pass.
    """
    sae = sae.replace(params=params)
    out = forward(sae, x_n, sparse_decode=sparse_decode)
    rule = sae.spec.selection
    if rule == "relu_l1":
        sparsity = l1_penalty(out.z, params["W_dec"])
    elif rule == "jumprelu":
        sparsity = l0_penalty(sae, out.pre)
    else:
        sparsity = jnp.zeros((), out.recon.dtype)
    loss = out.recon + sparsity_coeff * sparsity
    aux = jnp.zeros((), out.recon.dtype)
    if dead is not None and aux_coeff > 0:
        aux = aux_k_loss(sae, out.pre, x_n - out.x_hat, dead, k_aux)
        loss = loss + aux_coeff * aux
    return loss, ({"recon": out.recon, "sparsity": sparsity, "aux": aux}, out)
