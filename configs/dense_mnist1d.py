"""Dense baseline: the MNIST-1D 1D CNN (64 channels) trained with Adam."""

from configs.base import get_base_config, is_runlocal, shrink_for_runlocal


def get_config(arg=None):
    """The dense CNN; ``arg='runlocal'`` shrinks the run to seconds (8 channels)."""
    runlocal = is_runlocal(arg)
    config = get_base_config()
    if runlocal:
        shrink_for_runlocal(config)
        config.model.channels = 8
    return config
