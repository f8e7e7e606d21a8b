"""Train the quickstart briefly, export its Dense head to BSR, compare test accuracy.

    python benchmarks/export_quickstart.py [--steps=1000] [--block=8,5] [--workdir=DIR]

Runs ``configs/quickstart.py`` (RigL at 90% ERK, 1D CNN on MNIST-1D) for ``--steps`` steps
with `experiments.train.train_and_evaluate` in a temporary workdir, restores the final
checkpoint, exports the params with `sparsejax.export.export` (the CNN's Dense head becomes
a `pallas_kernels.BSR`; its 1D conv kernels stay dense with the mask applied) and evaluates
both the masked dense model and the exported one, run through
`sparsejax.nn.sparse_dense_calls`, on the 1000 test examples. Prints both accuracies,
the largest logit difference, and the bytes the head stores relative to dense.
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
from experiments import train
from sparsejax import export, masks, transforms
from sparsejax import nn as snn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--block", default="8,5", help="BSR block of the (320, 10) head")
    parser.add_argument("--workdir", default="", help="default: a temporary directory")
    args = parser.parse_args()
    block = tuple(int(b) for b in args.block.split(","))

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
    state = train.create_train_state(config, model, dataset)[0]
    manager = ocp.CheckpointManager(f"{workdir}/checkpoints")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
    mask_tree = transforms.get_masks(state.opt_state)
    masked = masks.apply_masks(state.params, mask_tree)
    exported = export.export(state.params, mask_tree, format="bsr", block_shape=block)

    x, y = jnp.asarray(dataset.x_test), np.asarray(dataset.y_test)
    dense_logits = jax.jit(model.apply)({"params": masked}, x)
    with snn.sparse_dense_calls():
        sparse_logits = jax.jit(model.apply)({"params": exported}, x)
    acc = lambda logits: float(np.mean(np.argmax(np.asarray(logits), -1) == y))
    print(f"test accuracy, masked dense model: {acc(dense_logits):.4f}")
    print(f"test accuracy, exported BSR head:  {acc(sparse_logits):.4f}")
    print(f"max |logit difference|: {float(jnp.max(jnp.abs(dense_logits - sparse_logits))):.2e}")
    for path, info in export.storage_summary(exported).items():
        head = exported["dense"]["kernel"]
        print(
            f"{path}: block {head.block_shape}, {head.nnz_blocks} of "
            f"{np.prod(head.layout.grid)} blocks stored, bytes {info['ratio']:.3f} of dense"
        )


if __name__ == "__main__":
    main()
