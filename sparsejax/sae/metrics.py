"""SAE quality: reconstruction and sparsity metrics, and recovery of a known dictionary.

FVU, L0, dead fraction and shrinkage are jit-able jnp functions. The recovery metrics for
synthetic data with a known dictionary (MMCS, MCC, per-feature F1) match features to latents
with ``scipy.optimize.linear_sum_assignment`` and run on the host.

Reference for the set: Makelov et al. 2024, "Towards Principled Evaluations of Sparse
Autoencoders for Interpretability and Control", and SAEBench (Karvonen et al. 2025); MMCS from
Sharkey et al. 2022, "Taking features out of superposition with sparse autoencoders".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "dead_fraction",
    "evaluate",
    "feature_f1",
    "fvu",
    "l0",
    "match_features",
    "mcc",
    "mmcs",
    "recovery",
    "shrinkage",
]


def fvu(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """Fraction of variance unexplained on the batch: ``1 - explained variance``.

    Args:
      x: ``float[tokens, d]`` inputs; x_hat: their reconstructions, same shape.

    Returns:
      ``sum ||x - x_hat||^2 / sum ||x - mean_tokens(x)||^2``, a float scalar (0 is perfect,
      1 is no better than predicting the batch mean).
    """
    x, x_hat = jnp.asarray(x, jnp.float32), jnp.asarray(x_hat, jnp.float32)
    error = jnp.sum(jnp.square(x - x_hat))
    total = jnp.sum(jnp.square(x - jnp.mean(x, axis=0)))
    return error / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)


def l0(z: jax.Array) -> jax.Array:
    """Mean number of nonzero codes per token of ``z [tokens, n_latents]``."""
    return jnp.mean(jnp.sum(jnp.asarray(z) != 0, axis=-1).astype(jnp.float32))


def dead_fraction(z: jax.Array) -> jax.Array:
    """Fraction of latents never nonzero over the tokens of ``z [tokens, n_latents]``."""
    fired = jnp.any(jnp.asarray(z) != 0, axis=tuple(range(jnp.ndim(z) - 1)))
    return jnp.mean((~fired).astype(jnp.float32))  # not 1 - mean(fired): that rounds below 0


def shrinkage(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """Mean over tokens of ``||x_hat|| / ||x||`` (1 is unbiased; an L1 penalty gives < 1).

    Tokens with ``x == 0`` are left out.
    """
    nx = jnp.linalg.norm(jnp.asarray(x, jnp.float32), axis=-1)
    nh = jnp.linalg.norm(jnp.asarray(x_hat, jnp.float32), axis=-1)
    keep = nx > 0
    ratio = jnp.where(keep, nh / jnp.where(keep, nx, 1.0), 0.0)
    return jnp.sum(ratio) / jnp.maximum(jnp.sum(keep), 1)


def _assignment(score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the one-to-one matching maximising the summed score (Hungarian)."""
    # Imported here: scipy.optimize takes a third of a second to import, and only the
    # recovery metrics need it.
    import scipy.optimize

    return scipy.optimize.linear_sum_assignment(score, maximize=True)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def _cosines(true_dictionary, decoder) -> np.ndarray:
    true_dictionary = np.asarray(true_dictionary, np.float64)
    decoder = np.asarray(decoder, np.float64)
    if true_dictionary.ndim != 2 or decoder.ndim != 2:
        raise ValueError(
            "true_dictionary and decoder must be [features, d] and [latents, d], got shapes "
            f"{true_dictionary.shape} and {decoder.shape}"
        )
    if true_dictionary.shape[1] != decoder.shape[1]:
        raise ValueError(
            f"decoder must have d={true_dictionary.shape[1]} columns like true_dictionary, "
            f"got shape {decoder.shape}"
        )
    return _unit(true_dictionary) @ _unit(decoder).T


def mmcs(true_dictionary: jax.Array, decoder: jax.Array) -> float:
    """Mean max cosine similarity: each true feature's best cosine to any decoder row, averaged.

    Args:
      true_dictionary: ``[n_features, d]``; decoder: ``[n_latents, d]``.

    Returns:
      A float in [-1, 1]; 1 when every true direction is some decoder row.
    """
    return float(np.mean(np.max(_cosines(true_dictionary, decoder), axis=1)))


def match_features(true_dictionary: jax.Array, decoder: jax.Array) -> np.ndarray:
    """One-to-one matching of true features to latents maximising the summed cosine.

    Args:
      true_dictionary: ``[n_features, d]``; decoder: ``[n_latents, d]``.

    Returns:
      ``int[n_features]``: the latent matched to each feature (-1 where there are fewer
      latents than features and a feature stays unmatched).
    """
    cos = _cosines(true_dictionary, decoder)
    rows, cols = _assignment(cos)
    latent = np.full(cos.shape[0], -1, np.int64)
    latent[rows] = cols
    return latent


def _correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    c = (a.T @ b) / np.maximum(np.outer(na, nb), 1e-30)
    # A constant column correlates with nothing.
    return np.where(np.outer(na > 0, nb > 0), c, 0.0)


def mcc(true_codes: jax.Array, codes: jax.Array) -> float:
    """Mean correlation coefficient after one-to-one matching of features to latents.

    Args:
      true_codes: ``[tokens, n_features]`` ground-truth codes; codes: ``[tokens, n_latents]``.

    Returns:
      The mean over features of ``|Pearson correlation|`` between each feature's codes and
      its matched latent's, the matching maximising the sum (Hungarian algorithm); features
      left unmatched (more features than latents) count 0.

    Raises:
      ValueError: for arrays that are not 2-D with the same number of tokens.

    Reference: the identifiability literature of ICA (Hyvärinen & Morioka 2016) and of SAEs
    on synthetic data, where one latent per feature is the goal.
    """
    a, b = np.asarray(true_codes, np.float64), np.asarray(codes, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            "true_codes and codes must be [tokens, features] and [tokens, latents], got "
            f"shapes {a.shape} and {b.shape}"
        )
    corr = np.abs(_correlations(a, b))
    rows, cols = _assignment(corr)
    return float(np.sum(corr[rows, cols]) / a.shape[1])


def feature_f1(true_codes: jax.Array, codes: jax.Array, latent_of_feature: np.ndarray):
    """Per-feature F1 of firing: does the matched latent fire exactly when the feature does?

    Args:
      true_codes: ``[tokens, n_features]``; codes: ``[tokens, n_latents]``.
      latent_of_feature: ``int[n_features]`` from `match_features` (-1 for unmatched).

    Returns:
      ``float64[n_features]``: ``2 TP / (2 TP + FP + FN)`` with "fires" meaning nonzero;
      1.0 for a feature that never fires matched to a latent that never fires, 0.0 for an
      unmatched feature.
    """
    truth = np.asarray(true_codes) != 0
    fired = np.asarray(codes) != 0
    latent_of_feature = np.asarray(latent_of_feature)
    if truth.shape[1] != latent_of_feature.shape[0]:
        raise ValueError(
            f"latent_of_feature must have {truth.shape[1]} entries (one per feature), got "
            f"{latent_of_feature.shape}"
        )
    pred = fired[:, np.maximum(latent_of_feature, 0)]
    tp = np.sum(truth & pred, axis=0)
    fp = np.sum(~truth & pred, axis=0)
    fn = np.sum(truth & ~pred, axis=0)
    denominator = 2 * tp + fp + fn
    f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)
    return np.where(latent_of_feature >= 0, f1, 0.0)


@jax.jit
def _encode(sae, x):
    return sae.encode(x)


@jax.jit
def _evaluate(sae, x):
    z = sae.encode(x)
    x_hat = sae.decode(z)
    return {
        "fvu": fvu(x, x_hat),
        "l0": l0(z),
        "dead_fraction": dead_fraction(z),
        "shrinkage": shrinkage(x - sae.input_mean, x_hat - sae.input_mean),
    }


def evaluate(sae, x: jax.Array) -> dict[str, float]:
    """FVU, L0, dead fraction and shrinkage of ``sae`` on activations ``x [tokens, d_in]``.

    Everything is measured in data units with inference-time encoding (`SAE.encode`); the
    dead fraction counts latents that never fire on these tokens. One compiled call.
    """
    return {name: float(value) for name, value in _evaluate(sae, jnp.asarray(x)).items()}


def recovery(sae, x: jax.Array, true_codes: jax.Array, true_dictionary: jax.Array):
    """Dictionary recovery of ``sae`` on synthetic data with a known dictionary.

    Returns:
      ``{"mmcs", "mcc", "f1"}``: MMCS of the decoder, MCC of the codes on ``x``, and the
      mean per-feature F1 of firing after matching features to latents by decoder cosine.
    """
    z = _encode(sae, jnp.asarray(x))
    latent = match_features(true_dictionary, sae.decoder)
    return {
        "mmcs": mmcs(true_dictionary, sae.decoder),
        "mcc": mcc(true_codes, z),
        "f1": float(np.mean(feature_f1(true_codes, z, latent))),
    }
