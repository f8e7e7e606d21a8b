"""RigL (Evci et al. 2020) at 90% ERK: drop smallest |w|, regrow by largest |gradient|.

ΔT = 100 steps, T_end = 0.75 of training, initial drop fraction 0.3 with cosine decay.
"""

from configs.base import get_base_config, is_runlocal, shrink_for_runlocal


def get_config(arg=None):
    """RigL on the CNN; ``arg='runlocal'`` shrinks the run to seconds (8 channels)."""
    runlocal = is_runlocal(arg)
    config = get_base_config()
    config.sparsity.algorithm = "rigl"
    config.sparsity.target = 0.9
    config.sparsity.distribution = "erk"
    config.sparsity.update_every_steps = 100
    config.sparsity.end_fraction = 0.75
    config.sparsity.drop_fraction = 0.3
    if runlocal:
        shrink_for_runlocal(config)
        config.model.channels = 8
    return config
