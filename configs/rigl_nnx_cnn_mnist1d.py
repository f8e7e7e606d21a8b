"""RigL at 90% ERK on the MNIST-1D 1D CNN written in Flax NNX (``config.model.api = "nnx"``).

The RigL config (rigl_mnist1d.py) with the NNX twin of its CNN: same params tree, same
initial params for a seed, same masks and schedule, so it trains to the params the Linen
run reaches. ``--config.model.api=nnx`` does the same to any config of the MLP or the CNN.
"""

from configs import rigl_mnist1d


def get_config(arg=None):
    """RigL on the NNX CNN; ``arg='runlocal'`` shrinks the run to seconds (8 channels)."""
    config = rigl_mnist1d.get_config(arg)
    config.model.api = "nnx"
    return config
