"""Sparse Wide MLP on MNIST-1D at the dense MLP's FLOPs (Sparse-IFT, Thangarasa et al. 2023).

The hidden-to-hidden layers of the 40-128-128-128-10 MLP are widened and trained sparse
with RigL at 90% (uniform over the transformed kernels; stem, head and low-rank parts
dense), so inference costs the dense MLP's FLOPs. Other families from the command line:
``--config.model.family=parallel`` (``factorized``, ``doped``, ``sltrain``; ``sltrain``
keeps its own fixed support, so pair it with ``--config.sparsity.algorithm=dense``) and
``--config.model.sparsity=0.75 --config.sparsity.target=0.75``.
"""

import ml_collections

from configs.base import get_base_config, is_runlocal, shrink_for_runlocal

# The leaf-name substrings of `experiments.sparse_ift.SparseIFTMLP` that sparse training
# leaves dense; written out here because configs import nothing from experiments (a test
# holds it equal to `experiments.sparse_ift.KEEP_DENSE`).
KEEP_DENSE = ("stem", "head", "lowrank", "sltrain")


def get_config(arg=None):
    """Sparse Wide at 90%; ``arg='runlocal'`` shrinks the run to seconds (a 16-16 MLP)."""
    runlocal = is_runlocal(arg)
    config = get_base_config()
    config.model = ml_collections.ConfigDict(
        {
            "name": "sparse_ift_mlp",
            "api": "linen",
            "features": (16, 16) if runlocal else (128, 128, 128),
            "family": "wide",
            "sparsity": 0.9,
        }
    )
    config.sparsity = ml_collections.ConfigDict(
        {
            "algorithm": "rigl",
            "target": 0.9,
            "distribution": "uniform",
            "keep_dense": KEEP_DENSE,
            "update_every_steps": 100,
            "end_fraction": 0.75,
            "drop_fraction": 0.3,
            "execution": "masked",
            "block_layout": "coo",
        }
    )
    config.total_steps = 3000
    config.eval_every_steps = 500
    if runlocal:
        shrink_for_runlocal(config)
    return config
