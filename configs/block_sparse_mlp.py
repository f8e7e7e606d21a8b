"""Block-sparse RigL on a wide MLP, trained as stored 32x32 blocks (execution="bsr").

    python -m experiments.main --config=configs/block_sparse_mlp.py --workdir=runs/bsr
    python -m experiments.main --config=configs/block_sparse_mlp.py --workdir=runs/masked \
        --config.sparsity.execution=masked

An MLP 4096-4096-4096-10 (two 4096x4096 hidden kernels, ``hidden_0`` and ``hidden_1``)
on teacher-student data (`experiments.data.load_teacher_student`) with 4096 input
features, so both hidden kernels are 4096x4096 and divide into 32x32 blocks. RigL
(Evci et al. 2020) with ``structure="block"`` keeps 10% of the blocks of each hidden
kernel (uniform), moves 30% (cosine decay) every 100 steps until 75% of training; the
output kernel (4096x10: 10 outputs do not divide into 32-wide blocks) stays dense.

``execution="bsr"`` holds and runs the hidden kernels as their stored blocks
(`experiments.block_execution`, `sparsejax.block_sparse`); ``"masked"`` trains dense
weights times masks. With the COO layout both modes pick the same blocks from the same
seed. ``--config.sparsity.block_layout=fan_in`` keeps a constant fan-in per block column.

``runlocal``: a 64-256-256-10 MLP for 20 steps (seconds on a CPU).
"""

from __future__ import annotations

import ml_collections

from configs.base import get_base_config, is_runlocal, shrink_for_runlocal


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Block RigL at 90% in bsr mode; ``arg='runlocal'`` shrinks it to seconds."""
    runlocal = is_runlocal(arg)
    config = get_base_config()
    width = 256 if runlocal else 4096
    config.dataset.name = "teacher_student"
    # The teacher's input width: the first hidden kernel is input_dim x width.
    config.dataset.input_dim = 64 if runlocal else 4096
    config.dataset.hidden = 64
    # 8000 examples were memorized (train 100%, test 29%); 64000 give test ~59%.
    config.dataset.num_train = 512 if runlocal else 64000
    config.dataset.num_test = 256 if runlocal else 1000
    config.model = ml_collections.ConfigDict(
        {"name": "mlp", "api": "linen", "features": (width, width)}
    )
    config.optimizer.learning_rate = 1e-3
    config.sparsity.algorithm = "rigl"
    config.sparsity.target = 0.9
    config.sparsity.distribution = "uniform"
    config.sparsity.structure = "block"
    config.sparsity.block_shape = (32, 32)
    config.sparsity.keep_dense = ("output",)
    config.sparsity.update_every_steps = 100
    config.sparsity.end_fraction = 0.75
    config.sparsity.drop_fraction = 0.3
    config.sparsity.execution = "bsr"
    config.sparsity.block_layout = "coo"
    config.total_steps = 2000
    config.batch_size = 128
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 1000
    if runlocal:
        shrink_for_runlocal(config)
    return config
