"""Checkpoints and durable files: orbax save and restore, damaged checkpoints, atomic writes.

A run's checkpoints live in ``workdir/checkpoints`` (one orbax step directory per
saved step, the whole train state as one pytree). `restore_latest` resumes from
the newest one that restores, moving damaged ones to ``workdir/corrupt_checkpoints``
with a warning (nothing is deleted); `load_checkpoint` reads one back as numpy on
any machine. `write_atomically` is the one way the experiments write a file that
must never be seen half-written (configs, metrics, caches, results).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
import warnings
from collections.abc import Callable
from typing import IO, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from experiments import distributed

PyTree = Any

__all__ = [
    "checkpoint_dir",
    "load_checkpoint",
    "open_manager",
    "restore_latest",
    "save",
    "write_atomically",
]


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
