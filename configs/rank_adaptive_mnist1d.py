"""Rank-adaptive low-rank MLP on MNIST-1D: the settings of the ``rank_adaptive`` table.

An MLP 40-128-128-10 whose two hidden layers are low-rank matrices
W = A diag(w) B^T kept at full rank (40 and 128); the output layer stays dense.
``config.rank_adaptive`` picks the method (`tensornets.adaptive`):

  "fixed"                fixed ranks (the model's own), no masks;
  "spectral_truncation"  SVD truncation with relative tolerance ``tau`` every
                         ``update_every_steps`` steps between ``begin_step`` and
                         ``end_step``;
  "greedy_growth"        rank 1 per layer, one component grown every ``growth_every_steps``
                         steps until ``end_step``, within ``budget`` (a fraction of
                         the full-rank factors).

``get_config("runlocal")`` is the tiny version the tests run (its own: a 32-32 MLP for 200
steps, enough for the truncation to act, not the shared 20-step shrink). Used by
``python -m experiments.reproduce --table=rank_adaptive``; ``python -m experiments.main``
with this file trains the spectral-truncation row (``config.sparsity``).
"""

import ml_collections

from configs.base import get_base_config, is_runlocal


def get_config(arg=None):
    """The low-rank MLP and its methods; ``arg='runlocal'`` is the tiny version."""
    runlocal = is_runlocal(arg)
    config = get_base_config()
    config.progress_bar = False
    width = 32 if runlocal else 128
    config.model = ml_collections.ConfigDict(
        {
            "name": "mlp",
            "api": "linen",
            "features": (width, width),
            "factorize": {
                "hidden_0": {"format": "low_rank", "rank": min(40, width)},
                "hidden_1": {"format": "low_rank", "rank": width},
            },
        }
    )
    config.total_steps = 200 if runlocal else 3000
    config.eval_every_steps = config.total_steps
    config.rank_adaptive = ml_collections.ConfigDict(
        {
            "algorithm": "spectral_truncation",
            "tau": 0.1,
            "budget": 0.45,
            "update_every_steps": 20 if runlocal else 100,
            "begin_step": 20 if runlocal else 200,
            "end_step": 150 if runlocal else 2000,
            "growth_every_steps": 5 if runlocal else 20,
        }
    )
    # The same spectral truncation for `python -m experiments.main` (the table builds its
    # own algorithm for each row from config.rank_adaptive).
    ra = config.rank_adaptive
    config.sparsity = ml_collections.ConfigDict(
        {
            "algorithm": "spectral_truncation",
            "tau": ra.tau,
            "update_every_steps": ra.update_every_steps,
            "begin_step": ra.begin_step,
            "end_step": ra.end_step,
            "execution": "masked",
            "block_layout": "coo",
        }
    )
    return config
