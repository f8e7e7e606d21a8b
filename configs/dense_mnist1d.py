"""Dense baseline: the MNIST-1D 1D CNN (64 channels) trained with Adam."""

from configs.base import apply_variant, get_base_config


def get_config(arg=None):
    config = get_base_config()
    return apply_variant(config, arg)
