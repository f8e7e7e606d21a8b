"""Gradual magnitude pruning (Zhu & Gupta 2017) to 90% with the cubic schedule.

Pruning runs every 100 steps from 10% to 60% of training, uniform per layer as
in the paper, then the sparse network is fine-tuned for the remaining steps.
"""

from configs.base import get_base_config, is_runlocal, shrink_for_runlocal


def get_config(arg=None):
    """GMP on the CNN; ``arg='runlocal'`` shrinks the run to seconds (8 channels)."""
    runlocal = is_runlocal(arg)
    config = get_base_config()
    config.sparsity.algorithm = "magnitude"
    config.sparsity.target = 0.9
    config.sparsity.distribution = "uniform"
    config.sparsity.schedule = "polynomial"
    config.sparsity.begin_fraction = 0.1
    config.sparsity.end_fraction = 0.6
    config.sparsity.update_every_steps = 100
    config.sparsity.power = 3.0
    if runlocal:
        shrink_for_runlocal(config)
        config.model.channels = 8
    return config
