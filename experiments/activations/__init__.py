"""Activations of a Flax model for sparse autoencoders: capture, on-disk shards, shuffled batches.

    shards = write_activations("runs/acts", model.apply, {"params": params},
                               array_batches(x, batch_size=256), ["hidden_1"], capture="input")
    sae = sparsejax.sae.fit(key, shards["hidden_1"].batches(1024, seed=0), kind="topk",
                            n_latents=512, k=16, steps=2000)
    spliced_fidelity(model.apply, {"params": params}, x_test, y_test, "hidden_1", sae,
                     capture="input")

- `capture`: the outputs (or inputs) of any Linen modules, named by module path
  (``"encoder/layer_3"``, ``"hidden_1"``), for several layers in one forward pass, seen through
  `flax.linen.intercept_methods` so the model runs as written.
- `write_activations`: one forward pass per batch over a data set, every captured layer's
  rows (the leading axes flattened: one row per example, token or position; padding tokens
  left out through the model's own attention mask) streamed into ``.npy`` shards, one folder
  per layer with a JSON index. Shards and indexes are written under a temporary name and
  renamed, so a crash never leaves a partial shard indexed.
- `ActivationShards`: a layer's shards opened with memory mapping; `ActivationShards.batches`
  streams them through a shuffle buffer (deterministic given a seed, every row once an epoch):
  the iterator of batches `sparsejax.sae.fit` accepts.
- `write_text_activations` / `write_corpus_activations`: token states of a pretrained
  BERT-family model (`experiments.pretrained`) on texts or on its corpus.
- `splice` and `spliced_fidelity`: a layer's activations replaced by an SAE's reconstruction,
  and what that does to an MNIST-1D model's accuracy and loss.

Layout of a folder written by `write_activations`::

    FOLDER/index.json                    {"format", "capture", "source", "layers": {layer: dir}}
    FOLDER/<layer dir>/index.json        {"layer", "capture", "source", "dtype", "d", "rows",
                                          "shape", "shards": [{"file", "rows"}], "complete"}
    FOLDER/<layer dir>/shard_000000.npy  [rows, d]
"""

from experiments.activations.capture import (
    capture,
    module_calls,
    splice,
    spliced_fidelity,
    write_activations,
    write_corpus_activations,
    write_text_activations,
)
from experiments.activations.shards import (
    CAPTURES,
    FORMAT,
    ActivationShards,
    ShardWriter,
    array_batches,
    open_activations,
)

__all__ = [
    "CAPTURES",
    "FORMAT",
    "ActivationShards",
    "ShardWriter",
    "array_batches",
    "capture",
    "module_calls",
    "open_activations",
    "splice",
    "spliced_fidelity",
    "write_activations",
    "write_corpus_activations",
    "write_text_activations",
]
