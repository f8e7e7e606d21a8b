"""One-shot pruning of trained models from calibration data: magnitude, Wanda, SparseGPT, DSnoT.

Each pruner works on one layer, a kernel ``[in, out]`` with calibration inputs
``[tokens, in]``, and returns ``(pruned kernel, mask)``; `prune_model` applies one to every
Dense and Conv layer of a Flax model in call order, each calibrated on the outputs of the
already pruned layers before it.
"""

from sparsejax.posttrain.calibration import (
    LayerCall,
    capture_input,
    capture_inputs,
    input_matrix,
    layer_calls,
    outlier_ratios,
)
from sparsejax.posttrain.dsnot import dsnot
from sparsejax.posttrain.layerwise import (
    METHODS,
    PruneResult,
    prune_calls,
    prune_layer,
    prune_model,
)
from sparsejax.posttrain.magnitude import magnitude
from sparsejax.posttrain.sparsegpt import hessian_inverse_factor, sparsegpt
from sparsejax.posttrain.wanda import wanda, wanda_scores

__all__ = [
    "METHODS",
    "LayerCall",
    "PruneResult",
    "capture_input",
    "capture_inputs",
    "dsnot",
    "hessian_inverse_factor",
    "input_matrix",
    "layer_calls",
    "magnitude",
    "outlier_ratios",
    "prune_calls",
    "prune_layer",
    "prune_model",
    "sparsegpt",
    "wanda",
    "wanda_scores",
]
