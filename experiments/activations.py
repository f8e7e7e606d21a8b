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

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

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

CAPTURES = ("output", "input")
FORMAT = "sparsejax-activations/1"
_DTYPES = ("float32", "float16")
_INDEX = "index.json"

Layer = str | Sequence[str]


def _layer_name(layer: Any) -> str:
    """``"a/b"`` from ``"a/b"`` or ``("a", "b")``."""
    if isinstance(layer, str):
        return layer.strip("/")
    if isinstance(layer, Sequence) and all(isinstance(p, str) for p in layer):
        return "/".join(layer)
    raise ValueError(f"a layer must be a module path like 'encoder/layer_0', got {layer!r}")


def _layer_names(layers: Any) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    names = [_layer_name(layer) for layer in layers]
    if not names or any(not n for n in names):
        raise ValueError(f"layers must name at least one module path, got {layers!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"layers names {repeated} more than once")
    return names


def _check_capture(capture: str) -> str:
    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {list(CAPTURES)}, got {capture!r}")
    return capture


def _as_args(batch: Any) -> tuple:
    """A batch as the positional arguments of ``apply_fn`` after the variables."""
    return tuple(batch) if isinstance(batch, tuple | list) else (batch,)


def module_calls(apply_fn: Callable[..., Any], variables: Any, *args: Any) -> dict[str, int]:
    """How many times each Linen module is called in ``apply_fn(variables, *args)``.

    Shapes only (`jax.eval_shape`): nothing is computed.

    Args:
      apply_fn: e.g. ``model.apply``.
      variables: e.g. ``{"params": params}`` (arrays or `jax.ShapeDtypeStruct`).
      *args: the model's inputs (arrays or `jax.ShapeDtypeStruct`).

    Returns:
      ``{"module/path": calls}`` in first-call order; the root module (path ``""``) is left
      out.
    """
    calls: dict[str, int] = {}

    def interceptor(next_fun, fargs, kwargs, context):
        if context.method_name == "__call__":
            name = "/".join(context.module.path)
            if name:
                calls[name] = calls.get(name, 0) + 1
        return next_fun(*fargs, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(apply_fn, variables, *args)
    return calls


def _check_layers(apply_fn, variables, args, names: list[str]) -> None:
    calls = module_calls(apply_fn, variables, *args)
    unknown = [n for n in names if n not in calls]
    if unknown:
        known = list(calls)
        shown = known if len(known) <= 40 else known[:40] + ["..."]
        raise ValueError(
            f"layers {unknown} are not modules the model calls; module paths it calls: {shown}"
        )
    repeated = [n for n in names if calls[n] > 1]
    if repeated:
        raise ValueError(
            f"layers {repeated} are called more than once in a forward pass; their "
            "activations would be ambiguous"
        )


def _recording_interceptor(names: Sequence[str], capture: str, seen: dict[str, Any]):
    wanted = set(names)

    def interceptor(next_fun, args, kwargs, context):
        name = "/".join(context.module.path)
        if context.method_name != "__call__" or name not in wanted:
            return next_fun(*args, **kwargs)
        if capture == "input":
            if not args:
                raise ValueError(f"layer {name!r} got no positional input to capture")
            seen[name] = args[0]
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        seen[name] = out
        return out

    return interceptor


def _capture_fn(apply_fn, names: list[str], capture: str):
    """``f(variables, *args) -> {layer: array}``, jitted: the forward pass with recording."""

    def run(variables, *args):
        seen: dict[str, Any] = {}
        with nn.intercept_methods(_recording_interceptor(names, capture, seen)):
            apply_fn(variables, *args)
        for name in names:
            if not isinstance(seen.get(name), jax.Array):
                raise ValueError(
                    f"layer {name!r}'s {capture} is a {type(seen.get(name)).__name__}, not an "
                    "array; capture a module whose output is one array"
                )
        return {name: seen[name] for name in names}

    return jax.jit(run)


def capture(
    apply_fn: Callable[..., Any],
    variables: Any,
    *args: Any,
    layers: Layer | Sequence[Layer],
    capture: str = "output",
) -> dict[str, jax.Array]:
    """The outputs (or inputs) of several modules in one forward pass of ``apply_fn``.

    Args:
      apply_fn: e.g. ``model.apply``.
      variables: e.g. ``{"params": params}``.
      *args: the model's inputs, e.g. ``x`` or ``(input_ids, attention_mask)``.
      layers: module paths, ``"encoder/layer_3"`` or ``("encoder", "layer_3")``, or one path.
      capture: ``"output"`` (what the module returns) or ``"input"`` (its first positional
        argument, e.g. an MLP's hidden activations as the next Dense layer receives them).

    Returns:
      ``{"module/path": array}``, each as the module produced or received it (e.g.
      ``[batch, tokens, d]``).

    Raises:
      ValueError: naming the layers the model does not call (listing those it does), layers
        called more than once, a non-array output, or an unknown ``capture``.
    """
    names = _layer_names(layers)
    capture = _check_capture(capture)
    _check_layers(apply_fn, variables, args, names)
    return _capture_fn(apply_fn, names, capture)(variables, *args)


def _dirname(layer: str) -> str:
    """A folder name for a module path: ``"encoder/layer_3"`` -> ``"encoder.layer_3"``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", layer.replace("/", "."))


def _write_json(path: str, data: Mapping[str, Any]) -> None:
    """Writes JSON atomically: a temporary file renamed over ``path``."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_json(name: str, value: Any) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be JSON-serializable, got {value!r}") from None


class ShardWriter:
    """Appends rows ``[n, d]`` of one layer to ``.npy`` shards of ``shard_rows`` rows.

    Each full shard is written under a temporary name and renamed, then the layer's
    ``index.json`` is rewritten the same way to list it: a crash leaves the shards written so
    far indexed (``"complete": false``) and none half-written. `close` writes the last,
    shorter shard and marks the index complete.

    Args:
      folder: the layer's folder (created).
      layer: the module path recorded in the index.
      d: row width.
      capture: ``"output"`` or ``"input"`` (recorded).
      source: what the rows come from, JSON-serializable (recorded).
      dtype: ``"float32"`` or ``"float16"`` on disk.
      shard_rows: rows per shard.
      overwrite: replace an existing index and its shards; otherwise a folder that already
        holds an index is refused.

    Raises:
      ValueError: naming the argument, for a bad dtype, size or source, or an existing index
        without ``overwrite``.
    """

    def __init__(
        self,
        folder: str,
        layer: str,
        *,
        d: int,
        capture: str = "output",
        source: Any = "",
        dtype: str = "float32",
        shard_rows: int = 65536,
        overwrite: bool = False,
    ):
        if str(dtype) not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        for name, value in (("d", d), ("shard_rows", shard_rows)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.folder, self.d, self.dtype = folder, int(d), np.dtype(str(dtype))
        self.shard_rows = int(shard_rows)
        os.makedirs(folder, exist_ok=True)
        index_path = os.path.join(folder, _INDEX)
        if os.path.exists(index_path):
            if not overwrite:
                raise ValueError(
                    f"folder={folder!r} already holds activations ({_INDEX}); pass "
                    "overwrite=True to replace them"
                )
            with open(index_path) as f:
                old = json.load(f)
            os.remove(index_path)
            for shard in old.get("shards", []):
                path = os.path.join(folder, shard["file"])
                if os.path.exists(path):
                    os.remove(path)
        self.index = {
            "format": FORMAT,
            "layer": layer,
            "capture": _check_capture(capture),
            "source": _check_json("source", source),
            "dtype": self.dtype.name,
            "d": self.d,
            "rows": 0,
            "shape": [0, self.d],
            "shards": [],
            "complete": False,
        }
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._write_index()

    def _write_index(self) -> None:
        _write_json(os.path.join(self.folder, _INDEX), self.index)

    def _write_shard(self, rows: np.ndarray) -> None:
        name = f"shard_{len(self.index['shards']):06d}.npy"
        tmp = os.path.join(self.folder, f".{name}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(rows, self.dtype))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.folder, name))
        self.index["shards"].append({"file": name, "rows": int(rows.shape[0])})
        self.index["rows"] += int(rows.shape[0])
        self.index["shape"] = [self.index["rows"], self.d]
        self._write_index()

    def append(self, rows: Any) -> None:
        """Adds ``rows [n, d]``; writes a shard each time ``shard_rows`` rows are pending."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.d:
            raise ValueError(f"rows must be [n, d={self.d}], got shape {rows.shape}")
        if self.index["complete"]:
            raise ValueError(f"the writer of {self.folder!r} is closed")
        self._pending.append(rows.astype(self.dtype, copy=False))
        self._pending_rows += rows.shape[0]
        if self._pending_rows >= self.shard_rows:
            block = np.concatenate(self._pending)
            cut = (block.shape[0] // self.shard_rows) * self.shard_rows
            for start in range(0, cut, self.shard_rows):
                self._write_shard(block[start : start + self.shard_rows])
            self._pending = [block[cut:]] if cut < block.shape[0] else []
            self._pending_rows = block.shape[0] - cut

    def close(self) -> ActivationShards:
        """Writes the pending rows and marks the index complete; returns the shards opened."""
        if not self.index["complete"]:
            if self._pending_rows:
                self._write_shard(np.concatenate(self._pending))
            self._pending, self._pending_rows = [], 0
            self.index["complete"] = True
            self._write_index()
        return ActivationShards(self.folder)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # After an error the index stays incomplete: what was written is kept, marked partial.
        if exc_type is None:
            self.close()


class ActivationShards:
    """One layer's activations on disk: ``.npy`` shards opened with memory mapping.

    Args:
      folder: a layer folder written by `ShardWriter` / `write_activations`.

    Attributes:
      layer, capture, source, dtype, d, rows, complete: from the index.
      shards: the shards as read-only memory-mapped arrays ``[rows_i, d]``.

    Raises:
      ValueError: if ``folder`` holds no index, or a shard disagrees with it.
    """

    def __init__(self, folder: str):
        path = os.path.join(folder, _INDEX)
        if not os.path.exists(path):
            raise ValueError(f"folder={folder!r} holds no activations index ({_INDEX})")
        with open(path) as f:
            self.index = json.load(f)
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{path} has format {self.index.get('format')!r}, expected {FORMAT!r}")
        self.folder = folder
        self.layer: str = self.index["layer"]
        self.capture: str = self.index["capture"]
        self.source = self.index["source"]
        self.dtype = np.dtype(self.index["dtype"])
        self.d: int = self.index["d"]
        self.rows: int = self.index["rows"]
        self.complete: bool = self.index["complete"]
        self.shards: list[np.ndarray] = []
        for shard in self.index["shards"]:
            array = np.load(os.path.join(folder, shard["file"]), mmap_mode="r")
            if array.shape != (shard["rows"], self.d) or array.dtype != self.dtype:
                raise ValueError(
                    f"shard {shard['file']} of {folder!r} is {array.shape} {array.dtype}, the "
                    f"index says ({shard['rows']}, {self.d}) {self.dtype}"
                )
            self.shards.append(array)

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return (
            f"ActivationShards(layer={self.layer!r}, capture={self.capture!r}, rows={self.rows}, "
            f"d={self.d}, dtype={self.dtype.name}, shards={len(self.shards)})"
        )

    def array(self) -> np.ndarray:
        """Every row in order, ``float32[rows, d]`` in memory (for data sets that fit)."""
        if not self.shards:
            return np.zeros((0, self.d), np.float32)
        return np.concatenate([np.asarray(s, np.float32) for s in self.shards])

    def batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        buffer_rows: int = 65536,
        chunk_rows: int = 1024,
        epochs: int | None = None,
        drop_last: bool = True,
    ) -> Iterator[np.ndarray]:
        """Shuffled batches ``float32[batch_size, d]``, streamed through a shuffle buffer.

        Each epoch reads the shards in chunks of ``chunk_rows`` consecutive rows, in an order
        drawn from ``seed``; every ``buffer_rows`` rows read are permuted together and
        appended to the stream. An epoch thus holds every row exactly once, the stream is
        the epochs one after another, and batches are cut from it (a batch may span two
        epochs), so all have ``batch_size`` rows. The same seed gives the same batches.

        Args:
          batch_size: rows per batch.
          seed: the shuffle's seed (``numpy.random.default_rng``).
          buffer_rows: rows permuted together (memory: ``buffer_rows * d`` floats).
          chunk_rows: rows read at once from a shard.
          epochs: passes over the data; None streams forever (what `sparsejax.sae.fit`
            wants: it stops after its ``steps``).
          drop_last: with ``epochs`` set, leave out the final batch when it is short.

        Raises:
          ValueError: for nonpositive sizes or epochs, or no rows.
        """
        for name, value in (
            ("batch_size", batch_size),
            ("buffer_rows", buffer_rows),
            ("chunk_rows", chunk_rows),
        ):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if epochs is not None and (
            isinstance(epochs, bool) or not isinstance(epochs, int | np.integer) or epochs < 1
        ):
            raise ValueError(f"epochs must be a positive int or None, got {epochs!r}")
        if self.rows == 0:
            raise ValueError(f"{self.folder!r} holds no rows")
        return self._batches(batch_size, seed, buffer_rows, chunk_rows, epochs, drop_last)

    def _epoch(self, rng: np.random.Generator, buffer_rows: int, chunk_rows: int):
        """One epoch's rows, as permuted blocks of up to ``buffer_rows`` rows."""
        chunks = [
            (i, start, min(start + chunk_rows, shard.shape[0]))
            for i, shard in enumerate(self.shards)
            for start in range(0, shard.shape[0], chunk_rows)
        ]
        buffer: list[np.ndarray] = []
        held = 0
        for c in rng.permutation(len(chunks)):
            i, start, stop = chunks[c]
            buffer.append(np.asarray(self.shards[i][start:stop], np.float32))
            held += stop - start
            if held >= buffer_rows:
                block = np.concatenate(buffer)
                yield block[rng.permutation(block.shape[0])]
                buffer, held = [], 0
        if buffer:
            block = np.concatenate(buffer)
            yield block[rng.permutation(block.shape[0])]

    def _batches(self, batch_size, seed, buffer_rows, chunk_rows, epochs, drop_last):
        rng = np.random.default_rng(seed)
        pending: list[np.ndarray] = []
        held = 0
        epoch = 0
        while epochs is None or epoch < epochs:
            for block in self._epoch(rng, buffer_rows, chunk_rows):
                pending.append(block)
                held += block.shape[0]
                if held >= batch_size:
                    stream = np.concatenate(pending)
                    cut = (held // batch_size) * batch_size
                    for start in range(0, cut, batch_size):
                        yield stream[start : start + batch_size]
                    pending = [stream[cut:]]
                    held -= cut
            epoch += 1
        if held and not drop_last:
            yield np.concatenate(pending)


def open_activations(folder: str) -> dict[str, ActivationShards]:
    """The layers of a folder written by `write_activations`: ``{"module/path": shards}``.

    Raises:
      ValueError: if ``folder`` holds no index.
    """
    path = os.path.join(folder, _INDEX)
    if not os.path.exists(path):
        raise ValueError(f"folder={folder!r} holds no activations index ({_INDEX})")
    with open(path) as f:
        index = json.load(f)
    return {
        layer: ActivationShards(os.path.join(folder, sub)) for layer, sub in index["layers"].items()
    }


def array_batches(*arrays: Any, batch_size: int) -> Iterator[tuple]:
    """Consecutive slices ``(a[i:i+batch_size], b[i:i+batch_size], ...)`` of equal-length arrays.

    For `write_activations` over a data set held in memory (the last batch may be shorter).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"arrays must have the same length, got {sorted(lengths)}")
    n = lengths.pop()
    for start in range(0, n, batch_size):
        yield tuple(a[start : start + batch_size] for a in arrays)


def _rows(name: str, value: jax.Array, mask: np.ndarray | None) -> np.ndarray:
    """Flattens ``[..., d]`` to rows ``[n, d]``, keeping those where ``mask [...]`` is set."""
    value = np.asarray(value)
    if value.ndim < 2:
        raise ValueError(
            f"layer {name!r} gave shape {value.shape}; need [..., d] with a batch axis"
        )
    if mask is None:
        return value.reshape(-1, value.shape[-1])
    if mask.shape != value.shape[:-1]:
        raise ValueError(
            f"the mask's shape {mask.shape} does not match layer {name!r}'s leading axes "
            f"{value.shape[:-1]}"
        )
    return value[mask]


def write_activations(
    folder: str,
    apply_fn: Callable[..., Any],
    variables: Any,
    batches: Iterable[Any],
    layers: Layer | Sequence[Layer],
    *,
    capture: str = "output",
    mask_arg: int | None = None,
    source: Any = "",
    dtype: str = "float32",
    shard_rows: int = 65536,
    overwrite: bool = False,
) -> dict[str, ActivationShards]:
    """Captures layers' activations over a data set into on-disk shards, one folder per layer.

    One jitted forward pass per batch records every layer at once (`capture`); each layer's
    activations ``[..., d]`` become rows ``[n, d]`` (leading axes flattened) appended to its
    `ShardWriter`.

    Args:
      folder: output folder; layer ``"encoder/layer_3"`` goes to ``folder/encoder.layer_3``.
      apply_fn: e.g. ``model.apply``.
      variables: e.g. ``{"params": params}``.
      batches: the model's inputs batch by batch: an array, or a tuple of positional
        arguments (e.g. ``(input_ids, attention_mask)``); see `array_batches`.
      layers: module paths (or one).
      capture: ``"output"`` or ``"input"`` of each module.
      mask_arg: index of the batch argument that marks the rows to keep (nonzero = keep),
        shaped like the activations' leading axes: ``1`` for a BERT's attention mask, so
        padding tokens are left out. None keeps every row.
      source: what the data is, JSON-serializable, recorded in every index.
      dtype: ``"float32"`` or ``"float16"`` on disk.
      shard_rows: rows per shard.
      overwrite: replace activations already in the layer folders.

    Returns:
      ``{"module/path": ActivationShards}``.

    Raises:
      ValueError: naming the bad argument: unknown or repeated layers (listing the module
        paths the model calls), a bad ``capture``, ``mask_arg`` or dtype, existing
        activations without ``overwrite``, no batches.
    """
    names = _layer_names(layers)
    capture = _check_capture(capture)
    source = _check_json("source", source)
    iterator = iter(batches)
    try:
        first = _as_args(next(iterator))
    except StopIteration:
        raise ValueError("batches must yield at least one batch, got none") from None
    if mask_arg is not None and not (
        isinstance(mask_arg, int) and not isinstance(mask_arg, bool) and 0 <= mask_arg < len(first)
    ):
        raise ValueError(
            f"mask_arg must index one of the batch's {len(first)} arguments, got {mask_arg!r}"
        )
    _check_layers(apply_fn, variables, first, names)
    run = _capture_fn(apply_fn, names, capture)
    dirs = {name: _dirname(name) for name in names}
    clashes = sorted(n for n in names if list(dirs.values()).count(dirs[n]) > 1)
    if clashes:
        raise ValueError(f"layers {clashes} map to the same folder name")
    # Refused before anything is written, so a refusal leaves the folder as it was.
    existing = [n for n in names if os.path.exists(os.path.join(folder, dirs[n], _INDEX))]
    if existing and not overwrite:
        raise ValueError(
            f"folder={folder!r} already holds activations of layers {existing}; pass "
            "overwrite=True to replace them"
        )
    os.makedirs(folder, exist_ok=True)
    _write_json(
        os.path.join(folder, _INDEX),
        {"format": FORMAT, "capture": capture, "source": source, "layers": dirs},
    )
    writers: dict[str, ShardWriter] = {}

    def consume(args: tuple) -> None:
        out = run(variables, *args)
        mask = None if mask_arg is None else np.asarray(args[mask_arg]) != 0
        for name in names:
            rows = _rows(name, out[name], mask)
            if name not in writers:
                writers[name] = ShardWriter(
                    os.path.join(folder, dirs[name]),
                    name,
                    d=rows.shape[1],
                    capture=capture,
                    source=source,
                    dtype=dtype,
                    shard_rows=shard_rows,
                    overwrite=overwrite,
                )
            writers[name].append(rows)

    consume(first)
    for batch in iterator:
        consume(_as_args(batch))
    return {name: writers[name].close() for name in names}


def write_text_activations(
    folder: str,
    model: nn.Module,
    params: Any,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Layer | Sequence[Layer],
    *,
    batch_size: int = 32,
    capture: str = "output",
    source: Any = None,
    **options: Any,
) -> dict[str, ActivationShards]:
    """Token activations of a pretrained BERT-family model on ``texts``, padding excluded.

    Each batch of texts is tokenized (`experiments.pretrained.tokenize`, padded to its
    longest text) and run as ``model.apply({"params": params}, input_ids, attention_mask)``;
    only real tokens' rows (``[CLS]`` and ``[SEP]`` included) are kept.

    Args:
      folder, layers, capture: as for `write_activations`; e.g. ``"encoder/layer_3"`` for
        the token states after encoder layer 3.
      model, params, tokenizer: from `experiments.pretrained.load`.
      texts: the sentences or passages.
      batch_size: texts per forward pass.
      source: recorded in the index (default: the number of texts).
      **options: more `write_activations` options (``dtype``, ``shard_rows``,
        ``overwrite``).

    Returns:
      ``{"module/path": ActivationShards}``, one row per real token.
    """
    from experiments import pretrained  # only this helper needs the tokenizer's packages

    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty sequence of strings")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    def batches():
        for start in range(0, len(texts), batch_size):
            enc = pretrained.tokenize(tokenizer, texts[start : start + batch_size])
            yield enc["input_ids"], enc["attention_mask"]

    return write_activations(
        folder,
        model.apply,
        {"params": params},
        batches(),
        layers,
        capture=capture,
        mask_arg=1,
        source={"texts": len(texts)} if source is None else source,
        **options,
    )


def write_corpus_activations(
    folder: str,
    model: nn.Module,
    params: Any,
    tokenizer: Any,
    layers: Layer | Sequence[Layer],
    *,
    n: int = 128,
    length: int = 64,
    seed: int = 0,
    batch_size: int = 32,
    capture: str = "output",
    **options: Any,
) -> dict[str, ActivationShards]:
    """Token activations of a pretrained model on its corpus's calibration split.

    The windows are `experiments.pretrained.corpus.calibration_ids` (``n`` windows of
    ``length`` tokens, ``[CLS] ... [SEP]``, no padding), so every token is a row; the
    corpus's identity (`corpus_info`) and the window settings are recorded as the source.

    Args:
      folder, layers, capture: as for `write_activations`.
      model, params, tokenizer: from `experiments.pretrained.load`.
      n, length, seed: the calibration windows.
      batch_size: windows per forward pass.
      **options: more `write_activations` options.

    Returns:
      ``{"module/path": ActivationShards}`` with ``n * length`` rows each.
    """
    from experiments.pretrained import corpus as corpus_lib

    corpus = corpus_lib.load_corpus()
    ids = corpus_lib.calibration_ids(tokenizer, n=n, length=length, seed=seed, corpus=corpus)
    info = corpus_lib.corpus_info(corpus)
    source = {
        "split": "calibration",
        "windows": n,
        "length": length,
        "seed": seed,
        **{k: v for k, v in info.items() if isinstance(v, str | int | float)},
    }
    return write_activations(
        folder,
        model.apply,
        {"params": params},
        array_batches(ids, batch_size=batch_size),
        layers,
        capture=capture,
        source=source,
        **options,
    )


def splice(
    apply_fn: Callable[..., Any],
    layer: Layer,
    replace: Callable[[jax.Array], jax.Array],
    *,
    capture: str = "output",
) -> Callable[..., Any]:
    """``apply_fn`` with one module's output (or input) replaced by ``replace`` of it.

    Args:
      apply_fn: e.g. ``model.apply``.
      layer: the module path.
      replace: ``[..., d] -> [..., d]``, e.g. a trained `sparsejax.sae.SAE` (calling one
        is ``decode(encode(x))``) or ``jnp.zeros_like`` for zero ablation.
      capture: replace what the module returns (``"output"``) or the first argument it
        receives (``"input"``).

    Returns:
      ``f(variables, *args)``, the model's output with the replacement spliced in (jit-able;
      the model is used as written, through `flax.linen.intercept_methods`). The layer is
      checked when ``f`` first runs: `spliced_fidelity` checks it up front.
    """
    name = _layer_name(layer)
    capture = _check_capture(capture)

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or "/".join(context.module.path) != name:
            return next_fun(*args, **kwargs)
        if capture == "input":
            return next_fun(replace(args[0]), *args[1:], **kwargs)
        return replace(next_fun(*args, **kwargs))

    def spliced(variables, *args):
        with nn.intercept_methods(interceptor):
            return apply_fn(variables, *args)

    return spliced


def spliced_fidelity(
    apply_fn: Callable[..., Any],
    variables: Any,
    x: Any,
    y: Any,
    layer: Layer,
    reconstruct: Callable[[jax.Array], jax.Array],
    *,
    capture: str = "output",
    batch_size: int = 1000,
) -> dict[str, float]:
    """A classifier's accuracy and loss with a layer's activations replaced by a reconstruction.

    Args:
      apply_fn, variables: the classifier (e.g. an `experiments.models` MNIST-1D model),
        returning logits ``[batch, classes]``.
      x: inputs ``[n, ...]``; y: integer labels ``[n]``.
      layer: the module path whose activations are replaced.
      reconstruct: ``[..., d] -> [..., d]``, e.g. a trained `sparsejax.sae.SAE`.
      capture: replace the module's ``"output"`` or its ``"input"``.
      batch_size: examples per forward pass.

    Returns:
      ``{"accuracy", "loss"}`` of the model as is, ``{"spliced_accuracy", "spliced_loss"}``
      with the reconstruction spliced in, ``{"ablated_accuracy", "ablated_loss"}`` with the
      activations zeroed, and ``"loss_recovered"`` = (ablated loss - spliced loss) /
      (ablated loss - loss): 1 when the reconstruction is as good as the activations, 0
      when it is no better than zeros (nan when zeroing costs nothing). Losses are mean
      softmax cross-entropies.

    Raises:
      ValueError: naming the layer if the model does not call it once, or for mismatched
        ``x`` and ``y``.

    Reference: the spliced-in (downstream) loss of Bricken et al. 2023, "Towards
    Monosemanticity", and the "loss recovered" of Gao et al. 2024 relative to zero ablation.
    """
    name = _layer_name(layer)
    capture = _check_capture(capture)
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[0] != y.shape[0] or y.ndim != 1:
        raise ValueError(f"x and y must be [n, ...] and [n], got shapes {x.shape} and {y.shape}")
    _check_layers(apply_fn, variables, (jnp.asarray(x[:1]),), [name])
    # A reconstruction that is a pytree of arrays (an SAE) is a jit argument, not constants
    # folded into the program.
    leaves = jax.tree.leaves(reconstruct)
    traced = bool(leaves) and all(isinstance(a, jax.Array | np.ndarray) for a in leaves)

    @jax.jit
    def scores(variables, replacement, xb, yb):
        replace = replacement if traced else reconstruct
        models = {
            "": apply_fn,
            "spliced_": splice(apply_fn, name, replace, capture=capture),
            "ablated_": splice(apply_fn, name, jnp.zeros_like, capture=capture),
        }
        out = {}
        for prefix, fn in models.items():
            logits = fn(variables, xb)
            out[f"{prefix}correct"] = jnp.sum(jnp.argmax(logits, -1) == yb)
            out[f"{prefix}loss"] = jnp.sum(
                optax.softmax_cross_entropy_with_integer_labels(logits, yb)
            )
        return out

    totals: dict[str, float] = {}
    for xb, yb in array_batches(x, y, batch_size=batch_size):
        batch_scores = scores(
            variables, reconstruct if traced else None, jnp.asarray(xb), jnp.asarray(yb)
        )
        for key, value in batch_scores.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    n = x.shape[0]
    result = {}
    for prefix in ("", "spliced_", "ablated_"):
        result[f"{prefix}accuracy"] = totals[f"{prefix}correct"] / n
        result[f"{prefix}loss"] = totals[f"{prefix}loss"] / n
    gap = result["ablated_loss"] - result["loss"]
    result["loss_recovered"] = (
        (result["ablated_loss"] - result["spliced_loss"]) / gap if gap > 0 else math.nan
    )
    return result
