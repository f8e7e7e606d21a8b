"""Optimizer-state bytes of dense vs masked training, with bool or bit-packed masks.

    python -m benchmarks.memory

For each model (the quickstart 1D CNN, 64 channels; the MNIST-1D MLP widened
to 1024x1024) and optimizer (Adam; SGD with momentum), builds the training
state the trainer builds (``experiments.state.create_train_state``) three ways
and counts the bytes of its optimizer state, measured from the arrays:

  dense    plain training (``masked(opt, Dense())``: no masks, only the
           optimizer's slots and a step counter and key)
  bool     RigL at 90% ERK, masks as bool arrays (1 byte a weight)
  packed   the same with ``config.pack_masks = True`` (1 bit a weight)

The parameters themselves (the same in all three) are printed once. Adam keeps
two float32 slots a weight (8 bytes), so bool masks add 1/8 = 12.5% of its
state, packed masks 1.6%; momentum keeps one slot, so 25% vs 3.1%.
"""

from __future__ import annotations

import argparse

import jax
import ml_collections
import numpy as np

from configs import quickstart
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import state as state_lib
from sparsejax import transforms

MODELS = {
    "cnn1d-64": {"name": "cnn1d", "channels": 64},
    "mlp-1024x1024": {"name": "mlp", "features": (1024, 1024)},
}
OPTIMIZERS = ("adam", "momentum")


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of ``tree``."""
    return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))


def state_bytes(model_config: dict, optimizer: str, variant: str, dataset) -> dict[str, int]:
    """Bytes of params, optimizer state and masks of one variant's initial state."""
    config = quickstart.get_config()
    config.model = ml_collections.ConfigDict(model_config)
    config.optimizer.name = optimizer
    if variant == "dense":
        config.sparsity = ml_collections.ConfigDict({"algorithm": "dense"})
    config.pack_masks = variant == "packed"
    model = models_lib.make_model(config, dataset.num_classes)
    state = state_lib.create_train_state(config, model, dataset)[0]
    (masked_state,) = [
        node
        for node in jax.tree.leaves(
            state.opt_state, is_leaf=lambda x: isinstance(x, transforms.MaskedState)
        )
        if isinstance(node, transforms.MaskedState)
    ]
    return {
        "params": tree_bytes(state.params),
        "opt_state": tree_bytes(state.opt_state),
        "masks": tree_bytes(masked_state.masks),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    dataset = data_lib.load_mnist1d()
    print(
        "| model | optimizer | params (B) | dense opt state (B) | + bool masks (B) "
        "| + packed masks (B) | bool / dense | packed / dense | bool / packed masks |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, model_config in MODELS.items():
        for optimizer in OPTIMIZERS:
            got = {
                v: state_bytes(model_config, optimizer, v, dataset)
                for v in ("dense", "bool", "packed")
            }
            dense, bool_, packed = (got[v]["opt_state"] for v in ("dense", "bool", "packed"))
            print(
                f"| {name} | {optimizer} | {got['dense']['params']:,} | {dense:,} | {bool_:,} "
                f"| {packed:,} | {bool_ / dense:.3f} | {packed / dense:.3f} "
                f"| {got['bool']['masks'] / got['packed']['masks']:.2f} |"
            )


if __name__ == "__main__":
    main()
