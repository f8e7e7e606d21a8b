"""N:M structured sparse training on MNIST-1D: an MLP whose kernels are N:M along their inputs.

    python -m experiments.main --config=configs/nm_mnist1d.py --workdir=runs/nm
    python -m experiments.main --config=configs/nm_mnist1d.py --workdir=runs/nm \
        --config.sparsity.algorithm=nm_decay --config.sparsity.n=1 --config.sparsity.m=8

Algorithms: nm_ste, sr_ste, s_ste, bimask, nm_decay, nm_oneshot (see
`sparsejax.algorithms.nm_ste`, `nm_decay` and `nm_bimask`). Every kernel of the MLP
(40-256-256-10) has an input width divisible by 8, so 2:4, 1:4 and 1:8 apply to all of
them. The straight-through methods log ``mask_flip_rate`` to metrics.jsonl.
"""

from __future__ import annotations

import ml_collections

from configs.base import get_base_config, is_runlocal, shrink_for_runlocal


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """SR-STE at 2:4; ``arg='runlocal'`` shrinks the run to seconds (a 16-16 MLP)."""
    runlocal = is_runlocal(arg)
    config = get_base_config()
    features = (16, 16) if runlocal else (256, 256)
    config.model = ml_collections.ConfigDict({"name": "mlp", "api": "linen", "features": features})
    config.total_steps = 3000
    config.eval_every_steps = 500
    config.sparsity = ml_collections.ConfigDict(
        {
            "algorithm": "sr_ste",
            "n": 2,
            "m": 4,
            "lambda_w": 2e-4,
            # nm_decay: the decay window as fractions of training, and its schedule.
            "decay_schedule": "mask_exponential",
            "begin_fraction": 0.0,
            "end_fraction": 0.5,
            "execution": "masked",
            "block_layout": "coo",
        }
    )
    if runlocal:
        shrink_for_runlocal(config)
    return config
