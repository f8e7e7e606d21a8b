"""Checkpoints and durable files: orbax save and restore, damaged checkpoints, atomic writes.

A run's checkpoints live in ``workdir/checkpoints`` (one orbax step directory per
saved step, the whole train state as one pytree). `restore_latest` resumes from
the newest one that restores, moving damaged ones to ``workdir/corrupt_checkpoints``
with a warning (nothing is deleted); `load_checkpoint` reads one back as numpy on
any machine. `write_atomically` is the one way the experiments write a file that
must never be seen half-written (configs, metrics, caches, results).
`lock_workdir` keeps a second run off a workdir that a live run uses.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import secrets
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from typing import IO, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from experiments import distributed

PyTree = Any

__all__ = [
    "WorkdirLockedError",
    "check_workdir",
    "checkpoint_dir",
    "load_checkpoint",
    "lock_workdir",
    "open_manager",
    "restore_latest",
    "save",
    "write_atomically",
]


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock (see `lock_workdir`)."""


def write_atomically(path: str, content: str | bytes | Callable[[IO[bytes]], Any]) -> None:
    """Writes ``path`` so that readers only ever see the old file or the whole new one.

    The content goes to a temporary file in the same folder, is flushed to disk
    and renamed over ``path`` (`os.replace` is atomic on POSIX). If writing fails
    the temporary file is removed and ``path`` is left as it was.

    Args:
      path: the file to write; its folder must exist.
      content: text (written as UTF-8), bytes, or ``write(f)`` that writes into
        the open binary file ``f`` (e.g. ``lambda f: np.savez(f, **arrays)``).

    Raises:
      ValueError: if ``content`` is none of these.
    """
    if not isinstance(content, str | bytes) and not callable(content):
        raise ValueError(
            f"content must be str, bytes or a function of a binary file, got {type(content)!r}"
        )
    # A unique name per call (not only per process), so concurrent writers never share it;
    # made with open(), not mkstemp, so the file keeps the usual permissions.
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "xb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_workdir(workdir: Any) -> str:
    """``workdir`` as a path string, refused when it cannot hold a run.

    Nothing is created or written.

    Args:
      workdir: a path (str or `os.PathLike`) to a folder, existing or not.

    Returns:
      ``os.fspath(workdir)``.

    Raises:
      ValueError: naming ``workdir`` if it is empty or blank (which would put a
        run's files into the current directory), not a path, or if it or one of
        its parents is an existing file.
    """
    if not isinstance(workdir, str | os.PathLike):
        raise ValueError(f"workdir must be a path, got workdir={workdir!r}")
    path = os.fspath(workdir)
    if not isinstance(path, str) or not path.strip():
        raise ValueError(
            f"workdir={path!r} is empty; name a folder (an empty workdir would put the run's "
            "files into the current directory; use '.' to mean it)"
        )
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"workdir={path!r} is not a directory: {parent!r} is a file")
    return path


_LOCK_PREFIX = ".lock-"


def _lock_holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote into the lock file."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode())
        return f"pid {holder['pid']} on host {holder['host']} (since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        # The holder took the lock but has not written its name yet.
        return "another process (it has not written its pid yet)"


@contextlib.contextmanager
def lock_workdir(workdir: str, *, process_index: int = 0) -> Iterator[str]:
    """Holds ``workdir``'s lock for process ``process_index`` of a run, or fails at once.

    Two runs on one workdir would interleave metric rows and delete each other's
    checkpoints in progress, so the trainer holds this lock for the whole run.
    It is an OS lock (``fcntl.flock``) on ``workdir/.lock-{process_index}``: the
    kernel releases it when the process exits, however it ends (a crash or
    SIGKILL included), so a stale lock file never blocks a later run. Each
    process of a multi-process run takes its own (one per process index): a
    second run on the workdir then fails in every process, none waits in a
    collective for a peer that has stopped. The file holds the holder's pid,
    host and start time, which the error names, and is removed on release. The
    workdir is created if missing. Locks on network file systems are only as
    reliable as that file system's ``flock``.

    Args:
      workdir: the run's folder.
      process_index: this process's index in the run (``jax.process_index()``).

    Yields:
      The lock file's path.

    Raises:
      WorkdirLockedError: if a live process holds the lock; names its pid and host.
      ValueError: on a bad ``workdir`` (see `check_workdir`) or a negative
        ``process_index``.
    """
    workdir = check_workdir(workdir)
    if not isinstance(process_index, int) or isinstance(process_index, bool) or process_index < 0:
        raise ValueError(f"process_index must be an integer >= 0, got {process_index!r}")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"{_LOCK_PREFIX}{process_index}")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise WorkdirLockedError(
                f"workdir={workdir!r} is in use by {holder}: its lock {path} is held. Wait "
                "for that run to end (or stop it), or use another workdir."
            ) from None
        # The previous holder removes the file on release: if it did so between our
        # open and flock, we hold a lock on a deleted file; take the new one instead.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        since = datetime.datetime.now().isoformat(timespec="seconds")
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        yield path
    finally:
        # Removed while still held, so no other process can lock this file and then
        # see it vanish (see the samestat check above).
        os.remove(path)
        os.close(fd)


def checkpoint_dir(workdir: str) -> str:
    """The absolute path of ``workdir``'s checkpoint folder (``workdir/checkpoints``)."""
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def open_manager(workdir: str, *, max_to_keep: int) -> ocp.CheckpointManager:
    """An orbax manager of ``workdir/checkpoints`` (created if missing) keeping the last k.

    Close it (``manager.close()``) when done; ``save`` returns before the write ends.
    """
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            # Temporary directories of saves killed midway are never restored; drop them.
            cleanup_tmp_directories=True,
        ),
    )


def save(manager: ocp.CheckpointManager, step: int, state: PyTree) -> None:
    """Starts saving ``state`` (any pytree of arrays, sharded or not) as checkpoint ``step``."""
    manager.save(step, args=ocp.args.StandardSave(state))


def restore_latest(
    manager: ocp.CheckpointManager, state: PyTree, *, quarantine_dir: str
) -> tuple[PyTree, int | None]:
    """The newest checkpoint that restores; unreadable ones are moved aside with a warning.

    A checkpoint directory only appears once its save is complete (orbax writes
    into a temporary directory and renames it), so a run killed mid-save never
    leaves a step directory behind. A step that still fails to restore (files
    truncated or deleted afterwards, a disk error) is moved to
    ``quarantine_dir`` (nothing is deleted) and the next older one is tried.

    Args:
      manager: from `open_manager`.
      state: the run's initial state: the structure, shapes, dtypes and shardings
        to restore into.
      quarantine_dir: where damaged step directories go (created if needed).

    Returns:
      ``(restored state, its step)``, or ``(state, None)`` if nothing restores.

    Raises:
      ValueError: if a readable checkpoint holds another model or optimizer
        (other shapes or dtypes) than ``state``: it is not touched.
    """
    ckpt_dir = os.fspath(manager.directory)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    expected = _signature(state)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            saved = _saved_signature(os.path.join(ckpt_dir, str(step), "default"))
        except Exception:  # noqa: BLE001 -- unreadable metadata: handled as corrupt below
            saved = None
        # Damaged array files can make the metadata read back as an empty tree.
        saved = saved or None
        if saved is not None and saved != expected:
            # A readable checkpoint of another model or optimizer is not corrupt: refuse
            # to touch it rather than set a valid run aside.
            raise ValueError(
                f"workdir={os.path.dirname(ckpt_dir)!r} holds checkpoint {step} of a different "
                "model or optimizer than this config builds; use a new workdir"
            )
        try:
            if saved is None:
                raise ValueError("its metadata cannot be read")
            restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
            if int(distributed.to_host(restored.step)) != step:
                raise ValueError(f"holds step {int(restored.step)}")
            return restored, step
        except Exception as error:  # noqa: BLE001 -- any unreadable checkpoint is skipped
            message = (
                f"checkpoint {step} in {ckpt_dir} cannot be restored ({type(error).__name__}: "
                f"{str(error)[:200]}); moving it to {quarantine_dir} and trying an older one"
            )
            logging.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            if jax.process_index() == 0:
                os.makedirs(quarantine_dir, exist_ok=True)
                target = os.path.join(quarantine_dir, f"{step}-{time.time_ns()}")
                shutil.move(os.path.join(ckpt_dir, str(step)), target)
            _sync("quarantine")
            manager.reload()
    return state, None


def _signature(tree: PyTree) -> list[tuple[tuple[int, ...], str]]:
    # Sorted (shape, dtype) of every leaf: independent of how the tree's nodes
    # are stored (a checkpoint's metadata turns NamedTuples into dicts).
    return sorted((tuple(x.shape), np.dtype(x.dtype).str) for x in jax.tree.leaves(tree))


def _saved_signature(path: str) -> list[tuple[tuple[int, ...], str]]:
    with ocp.StandardCheckpointer() as checkpointer:
        return _signature(checkpointer.metadata(path).item_metadata)


def load_checkpoint(workdir: str, step: int | None = None) -> dict[str, Any]:
    """A checkpoint of ``workdir`` as numpy arrays, whatever mesh or processes saved it.

    Args:
      workdir: a run's workdir (checkpoints in ``workdir/checkpoints``).
      step: which step; None: the latest.

    Returns:
      The saved `experiments.state.TrainState` as a nested dict (``step``,
      ``params``, ``opt_state``, ``rng``) of numpy arrays.

    Raises:
      ValueError: if ``workdir`` holds no checkpoint or not that step.
    """
    ckpt_dir = checkpoint_dir(workdir)
    steps = []
    if os.path.isdir(ckpt_dir):
        with ocp.CheckpointManager(ckpt_dir) as manager:
            steps = list(manager.all_steps())
    if not steps or (step is not None and step not in steps):
        raise ValueError(
            f"step={step!r} is not among the checkpoints {sorted(steps)} in {ckpt_dir}"
        )
    path = os.path.join(ckpt_dir, str(max(steps) if step is None else step), "default")
    checkpointer = ocp.StandardCheckpointer()
    # The saved shardings may name devices this process does not have: restore
    # every leaf onto the first local device instead.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        checkpointer.metadata(path).item_metadata,
    )
    try:
        return jax.device_get(checkpointer.restore(path, target))
    finally:
        checkpointer.close()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
