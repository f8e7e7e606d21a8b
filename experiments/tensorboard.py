"""TensorBoard scalar event files beside ``metrics.jsonl``, when a writer package is installed.

`open_writer(logdir, start_step=...)` returns a `ScalarWriter`. With ``tensorboardX`` (the
``tensorboard`` extra; preferred, it needs only protobuf) or else ``tensorboard`` itself
importable, every `ScalarWriter.write` appends one TensorBoard event per metrics row: each
numeric value of the row as a scalar at the row's step. Without either package the writer does
nothing (one INFO log line says so), and training is unchanged.

A resumed run never rewrites old event files: it opens a new one in the same folder that starts
with a ``SessionLog.START`` event at ``start_step + 1``. TensorBoard then hides, from the older
files, the scalars of steps ``>= start_step + 1`` (those the crashed run wrote after the
checkpoint the resume starts from), the same rewind `experiments.train` applies to
``metrics.jsonl``.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from absl import logging

__all__ = [
    "ScalarWriter",
    "backend_name",
    "open_writer",
]


# An open event file's (add_event, flush, close).
_EventFile = tuple[Callable[[Any], Any], Callable[[], Any], Callable[[], Any]]


class _Backend(NamedTuple):
    """One writer package: its name, an event-file opener and its protobuf message classes.

    ``open_file(logdir, filename_suffix)`` creates a new event file in ``logdir`` and returns its
    ``(add_event, flush, close)`` functions; ``flush`` blocks until every added event is on disk.
    """

    name: str
    open_file: Callable[[str, str], _EventFile]
    event: type
    session_log: type
    summary: type


def _tensorboardx() -> _Backend:
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.proto.summary_pb2 import Summary

    def open_file(logdir, filename_suffix):
        # EventsWriter writes synchronously (no queue or thread), so flush means "on disk".
        os.makedirs(logdir, exist_ok=True)
        writer = EventsWriter(os.path.join(logdir, "events"), filename_suffix)
        return writer.write_event, writer.flush, writer.close

    return _Backend("tensorboardX", open_file, Event, SessionLog, Summary)


def _tensorboard() -> _Backend:
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    def open_file(logdir, filename_suffix):
        # Its flush waits until the writer thread has written every queued event.
        writer = EventFileWriter(logdir, filename_suffix=filename_suffix)
        return writer.add_event, writer.flush, writer.close

    return _Backend("tensorboard", open_file, Event, SessionLog, Summary)


def _find_backend() -> _Backend | None:
    """The first importable writer package (tensorboardX, then tensorboard), or None."""
    for load in (_tensorboardx, _tensorboard):
        try:
            return load()
        except ImportError:
            continue
        except Exception as error:  # noqa: BLE001 -- a broken install must not stop training
            # E.g. a protobuf too old or too new for the package's generated code.
            logging.warning(
                "TensorBoard writer %s is unusable (%s); skipping it", load.__name__[1:], error
            )
    return None


def backend_name() -> str | None:
    """``'tensorboardX'`` or ``'tensorboard'``: the package `open_writer` would use; else None."""
    backend = _find_backend()
    return None if backend is None else backend.name


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The row's numeric values but ``step``, as floats; None (a non-finite value) is NaN."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if value is None:
            # metrics.jsonl writes NaN and inf as null; the row in memory still holds the float,
            # but a row read back from the file does not.
            out[key] = math.nan
        elif isinstance(value, numbers.Real):
            out[key] = float(value)
    return out


class ScalarWriter:
    """Appends metrics rows to a TensorBoard event file; does nothing when ``backend`` is None.

    Build it with `open_writer`. A context manager: leaving the ``with`` block closes it.
    """

    def __init__(self, backend: _Backend | None, logdir: str, *, start_step: int = 0):
        """Opens a new event file in ``logdir`` (see `open_writer`); nothing without a backend."""
        self._backend = backend
        self._functions = None
        if backend is None:
            return
        # A unique suffix: tensorboardX names files by the second, and a second writer in the
        # same second (a quick restart) would otherwise truncate the first one's file. Fixed
        # width, so file names still sort in time order, which is the order TensorBoard reads.
        add_event, flush, close = backend.open_file(logdir, f".{time.time_ns():020d}")
        self._functions = (add_event, flush, close)
        # TensorBoard drops the older files' events at steps >= this one (see the module doc).
        add_event(
            backend.event(
                wall_time=time.time(),
                step=start_step + 1,
                session_log=backend.session_log(status=backend.session_log.START),
            )
        )
        flush()

    @property
    def enabled(self) -> bool:
        """Whether rows reach an event file (a package was found and the writer is open)."""
        return self._functions is not None

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        """Writes every numeric value of ``record`` except ``step`` as a scalar at ``step``.

        Tags are the record's keys (``train_loss``, ``test_accuracy``, ``sparsity``, ...), so a
        TensorBoard curve and a ``metrics.jsonl`` column share a name. The event is flushed to
        disk before this returns: rows come once per evaluation, and a live TensorBoard (or a
        crash) sees every row written so far.

        Args:
          step: the optimizer step of the row (a Python int).
          record: a metrics row (``str`` keys; numbers are written, None as NaN, others skipped).
        """
        if self._functions is None:
            return
        add_event, flush, _ = self._functions
        summary = self._backend.summary
        values = [
            summary.Value(tag=tag, simple_value=value) for tag, value in _scalars(record).items()
        ]
        add_event(
            self._backend.event(
                wall_time=time.time(), step=int(step), summary=summary(value=values)
            )
        )
        flush()

    def close(self) -> None:
        """Flushes and closes the event file; later writes and closes do nothing."""
        if self._functions is None:
            return
        _, flush, close = self._functions
        self._functions = None
        flush()
        close()

    def __enter__(self) -> ScalarWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def open_writer(logdir: str, *, start_step: int = 0, enabled: bool = True) -> ScalarWriter:
    """A `ScalarWriter` appending to a new event file in ``logdir``, or a no-op one.

    Args:
      logdir: the event-file folder (training uses ``workdir/tensorboard``); created if missing,
        and only when a writer package is importable.
      start_step: the step the run starts or resumes from (0 for a new run). Older event files
        in ``logdir`` stay on disk; TensorBoard hides their scalars at steps ``> start_step``.
      enabled: False gives the no-op writer without looking for a package (e.g. on every
        process but the chief of a multi-process run).

    Returns:
      The writer; `ScalarWriter.enabled` says whether it writes.

    Raises:
      ValueError: if ``start_step`` is not an int >= 0.
    """
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
    if not enabled:
        return ScalarWriter(None, logdir)
    backend = _find_backend()
    if backend is None:
        logging.info(
            "Neither tensorboardX nor tensorboard is installed: no TensorBoard event files in %s "
            "(install the 'tensorboard' extra to get them); metrics.jsonl is written as always",
            logdir,
        )
    return ScalarWriter(backend, os.fspath(logdir), start_step=start_step)
