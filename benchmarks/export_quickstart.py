"""Train the quickstart briefly, export it to BSR, compare test accuracy.

    python benchmarks/export_quickstart.py [--steps=1000] [--block=8,5] [--conv-block=8,8]
        [--no-convs] [--workdir=DIR]

Runs ``configs/quickstart.py`` (RigL at 90% ERK, 1D CNN on MNIST-1D) for ``--steps`` steps
with `experiments.train.train_and_evaluate` in a temporary workdir, restores the final
checkpoint, exports the params with `sparsejax.export.export` (the CNN's Dense head and,
unless ``--no-convs``, its three conv kernels, as their im2col matrices, become
`pallas_kernels.BSR`) and evaluates both the masked dense model and the exported one, run
through `sparsejax.nn.sparse_dense_calls`, on the 1000 test examples. Prints both
accuracies, the largest logit difference, and the bytes each exported kernel stores
relative to dense.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from configs import quickstart
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import state as state_lib
from experiments import train
from sparsejax import export, masks, transforms
from sparsejax import nn as snn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--block", default="8,5", help="BSR block of the (320, 10) head")
    parser.add_argument("--conv-block", default="8,8", help="BSR block of the conv matrices")
    parser.add_argument("--no-convs", action="store_true", help="keep conv kernels dense")
    parser.add_argument("--workdir", default="", help="default: a temporary directory")
    args = parser.parse_args()
    block = tuple(int(b) for b in args.block.split(","))
    conv_block = tuple(int(b) for b in args.conv_block.split(","))
    # conv1's im2col matrix has 1 input channel x 5 taps = 5 rows: one block row of 5.
    blocks = {
        "dense/kernel": block,
        "conv1/kernel": (5, conv_block[1]),
        "conv2/kernel": conv_block,
        "conv3/kernel": conv_block,
    }

    config = quickstart.get_config()
    config.total_steps = args.steps
    config.eval_every_steps = args.steps
    config.checkpoint_every_steps = args.steps
    config.progress_bar = False
    workdir = args.workdir or tempfile.mkdtemp(prefix="export_quickstart_")
    record = train.train_and_evaluate(config, workdir)
    print(f"trained {args.steps} steps in {workdir}: {record}")

    # Rebuild the state's structure, then restore the last checkpoint into it.
    dataset = data_lib.load_mnist1d()
    model = models_lib.get_model(
        config.model.name, channels=config.model.channels, num_classes=dataset.num_classes
    )
    state = state_lib.create_train_state(config, model, dataset)[0]
    manager = ocp.CheckpointManager(f"{workdir}/checkpoints")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
    mask_tree = transforms.get_masks(state.opt_state)
    masked = masks.apply_masks(state.params, mask_tree)
    exported = export.export(
        state.params, mask_tree, format="bsr", block_shape=blocks, convs=not args.no_convs
    )

    x, y = jnp.asarray(dataset.x_test), np.asarray(dataset.y_test)
    dense_logits = jax.jit(model.apply)({"params": masked}, x)
    with snn.sparse_dense_calls():
        sparse_logits = jax.jit(model.apply)({"params": exported}, x)
    acc = lambda logits: float(np.mean(np.argmax(np.asarray(logits), -1) == y))
    print(f"test accuracy, masked dense model: {acc(dense_logits):.4f}")
    print(f"test accuracy, exported BSR model: {acc(sparse_logits):.4f}")
    print(f"max |logit difference|: {float(jnp.max(jnp.abs(dense_logits - sparse_logits))):.2e}")
    for path, info in export.storage_summary(exported).items():
        kernel = exported[path.split("/")[0]]["kernel"]
        print(
            f"{path}: {kernel.shape} block {kernel.block_shape}, {kernel.nnz_blocks} of "
            f"{np.prod(kernel.layout.grid)} blocks stored, bytes {info['ratio']:.3f} of dense"
        )


if __name__ == "__main__":
    main()
