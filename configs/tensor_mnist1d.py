"""TT-matrix MLP on MNIST-1D: 40-256-256-10 with hidden_1 at 10% of its dense parameters.

The 256 x 256 kernel (83% of the dense MLP's parameters) is a TT-matrix with
input and output modes (4, 8, 8) and bond ranks chosen as the largest uniform
rank within 10% of 65,536 entries (Novikov, Podoprikhin, Osokin & Vetrov 2015,
"Tensorizing Neural Networks"). Swap the format from the command line, e.g.
``--config.model.factorize.hidden_1.format=low_rank`` (W = U diag(w) V^T),
``cp``, ``tucker``, ``tubal``; ``--config.model.factorize.hidden_1.rank=0.25``.
"""

import ml_collections

from configs.base import get_base_config, is_runlocal, shrink_for_runlocal


def get_config(arg=None):
    """The TT-matrix MLP; ``arg='runlocal'`` shrinks the run to seconds (a 64-64 MLP)."""
    runlocal = is_runlocal(arg)
    config = get_base_config()
    config.model = ml_collections.ConfigDict(
        {
            "name": "mlp",
            "api": "linen",
            "features": (64, 64) if runlocal else (256, 256),
            "factorize": {"hidden_1": {"format": "tt_matrix", "rank": 0.1}},
        }
    )
    config.total_steps = 3000
    config.eval_every_steps = 500
    if runlocal:
        shrink_for_runlocal(config)
    return config
