"""SET (Mocanu et al. 2018) at 90% ERK: drop smallest |w|, regrow at random.

The RigL config with random regrowth: same ΔT, T_end and drop fraction, so the
two differ only in how connections grow.
"""

from configs import rigl_mnist1d


def get_config(arg=None):
    config = rigl_mnist1d.get_config(arg)
    config.sparsity.algorithm = "set"
    return config
