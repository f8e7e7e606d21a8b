"""On-disk activation shards: the writer (atomic shards and JSON indexes), the memory-mapped
reader with its seeded shuffle buffer, and array batches. See `experiments.activations`."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from experiments import checkpoints

__all__ = [
    "INDEX_FILE",
    "check_json",
    "layer_folder",
    "write_json",
    "CAPTURES",
    "FORMAT",
    "ActivationShards",
    "ShardWriter",
    "array_batches",
    "check_capture",
    "open_activations",
]

CAPTURES = ("output", "input")
FORMAT = "sparsejax-activations/1"
_DTYPES = ("float32", "float16")
# Every folder written here (the data set's and each layer's) describes itself in this file.
INDEX_FILE = "index.json"


def check_capture(capture: str) -> str:
    """``capture`` if it is one of `CAPTURES`, else a ValueError naming it."""
    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {list(CAPTURES)}, got {capture!r}")
    return capture


def layer_folder(layer: str) -> str:
    """A folder name for a module path: ``"encoder/layer_3"`` -> ``"encoder.layer_3"``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", layer.replace("/", "."))


def write_json(path: str, data: Mapping[str, Any]) -> None:
    """Writes an index as JSON, atomically (`experiments.checkpoints.write_atomically`)."""
    checkpoints.write_atomically(path, json.dumps(data, indent=1))


def check_json(name: str, value: Any) -> Any:
    """``value`` as JSON reads it back, or a ValueError naming ``name`` if it is not JSON."""
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
        index_path = os.path.join(folder, INDEX_FILE)
        if os.path.exists(index_path):
            if not overwrite:
                raise ValueError(
                    f"folder={folder!r} already holds activations ({INDEX_FILE}); pass "
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
            "capture": check_capture(capture),
            "source": check_json("source", source),
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
        write_json(os.path.join(self.folder, INDEX_FILE), self.index)

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
        path = os.path.join(folder, INDEX_FILE)
        if not os.path.exists(path):
            raise ValueError(f"folder={folder!r} holds no activations index ({INDEX_FILE})")
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
    path = os.path.join(folder, INDEX_FILE)
    if not os.path.exists(path):
        raise ValueError(f"folder={folder!r} holds no activations index ({INDEX_FILE})")
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
