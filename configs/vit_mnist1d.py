"""Dense MNIST-1D transformer (`experiments.models.ViT1D`): 10 tokens of 4 positions.

The model of the `posttrain` table: width 32, 2 pre-norm blocks of 4 heads, MLP 64, Adam 3e-3
with cosine decay. Prune it after training with `sparsejax.posttrain.prune_model`.
"""

import ml_collections

from configs.base import apply_variant, get_base_config


def get_config(arg=None):
    config = get_base_config()
    config.model = ml_collections.ConfigDict(
        {"name": "vit1d", "patch_size": 4, "width": 32, "depth": 2, "num_heads": 4, "mlp_dim": 64}
    )
    config.total_steps = 2000
    config = apply_variant(config, arg)
    if arg == "runlocal":
        # The shared runlocal variant narrows a CNN's channels; narrow the transformer instead.
        del config.model["channels"]
        config.model.width = 8
        config.model.mlp_dim = 16
    return config
