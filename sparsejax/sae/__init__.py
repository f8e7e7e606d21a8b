"""Sparse autoencoders: encode -> select -> decode with pluggable selection rules.

`fit` is the short path::

    sae = sparsejax.sae.fit(key, acts, kind="topk", n_latents=4096, k=32, steps=2000)
    z = sae.encode(acts)          # [tokens, n_latents]
    x_hat = sae.decode(z)         # [tokens, d_in]
    sae.decoder                   # [n_latents, d_in], unit-norm rows

Kinds (`KINDS`): ReLU-L1, TopK, BatchTopK, JumpReLU, AbsTopK, Feature Choice, Mutual Choice,
and the multi-budget objectives Matryoshka and multi-k. The pieces are public for research
code: selection rules (`selection`), losses and AuxK (`losses`), the unit-norm decoder optax
transform (`unit_norm_decoder`), the geometric median, metrics (FVU, L0, dead fraction,
shrinkage, MMCS, MCC, F1) and a synthetic ground-truth generator (`synthetic`).
"""

from sparsejax.sae import losses, metrics, selection, synthetic
from sparsejax.sae.decoder_norm import (
    remove_parallel_gradient,
    renormalize_rows,
    unit_norm_decoder,
)
from sparsejax.sae.median import geometric_median
from sparsejax.sae.metrics import (
    dead_fraction,
    evaluate,
    feature_f1,
    fvu,
    l0,
    match_features,
    mcc,
    mmcs,
    recovery,
    shrinkage,
)
from sparsejax.sae.model import (
    KINDS,
    SAE,
    SAESpec,
    init_sae,
    make_spec,
    sparse_decode,
    sparse_decode_reference,
)
from sparsejax.sae.training import (
    TrainOptions,
    TrainState,
    fit,
    init_train_state,
    make_optimizer,
    make_train_step,
    resolve_options,
)

__all__ = [
    "KINDS",
    "SAE",
    "SAESpec",
    "TrainOptions",
    "TrainState",
    "dead_fraction",
    "evaluate",
    "feature_f1",
    "fit",
    "fvu",
    "geometric_median",
    "init_sae",
    "init_train_state",
    "l0",
    "losses",
    "make_optimizer",
    "make_spec",
    "make_train_step",
    "match_features",
    "mcc",
    "metrics",
    "mmcs",
    "recovery",
    "remove_parallel_gradient",
    "renormalize_rows",
    "resolve_options",
    "selection",
    "shrinkage",
    "sparse_decode",
    "sparse_decode_reference",
    "synthetic",
    "unit_norm_decoder",
]
