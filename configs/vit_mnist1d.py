"""Dense MNIST-1D transformer (`experiments.models.ViT1D`): 10 tokens of 4 positions.

The model of the `posttrain` table: width 32, 2 pre-norm blocks of 4 heads, MLP 64, Adam 3e-3
with cosine decay. Prune it after training with `sparsejax.posttrain.prune_model`.
"""

import ml_collections

from configs.base import get_base_config, is_runlocal, shrink_for_runlocal


def get_config(arg=None):
    """The transformer; ``arg='runlocal'`` shrinks the run to seconds (width 8, MLP 16)."""
    runlocal = is_runlocal(arg)
    config = get_base_config()
    config.model = ml_collections.ConfigDict(
        {
            "name": "vit1d",
            "api": "linen",
            "patch_size": 4,
            "width": 8 if runlocal else 32,
            "depth": 2,
            "num_heads": 4,
            "mlp_dim": 16 if runlocal else 64,
        }
    )
    config.total_steps = 2000
    if runlocal:
        shrink_for_runlocal(config)
    return config
