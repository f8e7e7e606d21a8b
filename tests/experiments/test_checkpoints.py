"""Checkpoints survive SIGKILL mid-save, keep the last k, skip corrupt steps; NaN handling.

The reference is one uninterrupted run; every damaged run must end with
bitwise the same parameters (CPU is deterministic).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import checkpoints, train
from tests.experiments.conftest import poison_batches, runlocal_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# RigL (mask updates every 5 steps) for 8 steps, a checkpoint every 2, keep 2.
OVERRIDES = {
    "total_steps": 8,
    "eval_every_steps": 4,
    "checkpoint_every_steps": 2,
    "keep_checkpoints": 2,
}


def _config(**extra):
    return runlocal_config(**{**OVERRIDES, **extra})


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _assert_same_state(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    train.train_and_evaluate(_config(), workdir)
    return workdir


def test_keeps_the_last_k_checkpoints(reference):
    assert _steps(reference) == [6, 8]
    assert not os.path.exists(os.path.join(reference, "corrupt_checkpoints"))


# Runs the config in a fresh process that SIGKILLs itself at the commit of the
# step-8 checkpoint: its files are written to a temporary directory, but the
# rename that publishes it never happens.
_KILL_AT_COMMIT = r"""
import os, signal, sys
from orbax.checkpoint._src.path import async_path
from configs import quickstart
from experiments import train

rename = async_path.rename

async def rename_or_die(src, dst, *args, **kwargs):
    if os.path.basename(str(dst)) == "8":
        print("killing at commit of", dst, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return await rename(src, dst, *args, **kwargs)

async_path.rename = rename_or_die
config = quickstart.get_config("runlocal")
for key, value in OVERRIDES.items():
    config[key] = value
train.train_and_evaluate(config, sys.argv[1])
"""


def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(reference, tmp_path):
    workdir = str(tmp_path / "killed")
    script = f"OVERRIDES = {OVERRIDES!r}\n{_KILL_AT_COMMIT}"
    proc = subprocess.run(
        [sys.executable, "-c", script, workdir],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "killing at commit" in proc.stdout
    entries = os.listdir(os.path.join(workdir, "checkpoints"))
    # The half-made step 8 exists only as a temporary directory.
    assert _steps(workdir) == [4, 6]
    assert any(e.startswith("8") and not e.isdigit() for e in entries), entries

    record = train.train_and_evaluate(_config(), workdir)
    assert record["step"] == 8
    assert _steps(workdir) == [6, 8]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6", "8"]
    _assert_same_state(
        checkpoints.load_checkpoint(reference, 8), checkpoints.load_checkpoint(workdir, 8)
    )
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [4, 8]


def _truncate_arrays(step_dir):
    # Every data file of the array store: a partial copy or a disk that lost writes.
    for root, _, files in os.walk(step_dir):
        if os.path.basename(root) == "d":
            for name in files:
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(3)


def _drop_metadata(step_dir):
    os.remove(os.path.join(step_dir, "default", "_METADATA"))


@pytest.mark.parametrize(
    "damage", [_truncate_arrays, pytest.param(_drop_metadata, marks=pytest.mark.slow)]
)
def test_a_corrupt_checkpoint_is_skipped_with_a_warning(reference, tmp_path, damage):
    workdir = str(tmp_path / "corrupt")
    shutil.copytree(reference, workdir)
    damage(os.path.join(workdir, "checkpoints", "8"))
    with pytest.warns(RuntimeWarning, match="checkpoint 8 .* cannot be restored"):
        record = train.train_and_evaluate(_config(), workdir)
    assert record["step"] == 8
    # Resumed from 6, redid steps 7-8, and set the damaged copy aside (not deleted).
    assert _steps(workdir) == [6, 8]
    (moved,) = os.listdir(os.path.join(workdir, "corrupt_checkpoints"))
    assert moved.startswith("8-")
    _assert_same_state(
        checkpoints.load_checkpoint(reference, 8), checkpoints.load_checkpoint(workdir, 8)
    )


def test_skip_mode_drops_non_finite_steps_and_finishes(tmp_path, monkeypatch):
    poison_batches(monkeypatch, lambda step: step in (2, 5))
    workdir = str(tmp_path / "skip")
    record = train.train_and_evaluate(_config(on_nonfinite="skip"), workdir)
    assert record["step"] == 8 and record["skipped_steps"] == 2
    assert np.isfinite(record["train_loss"]) and np.isfinite(record["test_loss"])
    saved = checkpoints.load_checkpoint(workdir, 8)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(saved["params"]))
    # Stop mode (the default) on the same data: tests/experiments/test_train.py.


def test_a_different_model_refuses_the_workdir_and_changes_nothing(reference, tmp_path):
    workdir = str(tmp_path / "other")
    shutil.copytree(reference, workdir)
    before = {
        os.path.join(root, name): open(os.path.join(root, name), "rb").read()
        for root, _, files in os.walk(workdir)
        for name in files
    }
    config = _config()
    config.model.channels = 16
    with pytest.raises(ValueError, match="workdir=.* holds checkpoint 8 of a different model"):
        train.train_and_evaluate(config, workdir)
    after = {
        os.path.join(root, name): open(os.path.join(root, name), "rb").read()
        for root, _, files in os.walk(workdir)
        for name in files
    }
    assert after == before


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("text ü\n", "text ü\n".encode()),
        (b"\x00\xffbytes", b"\x00\xffbytes"),
        (lambda f: f.write(b"from a function"), b"from a function"),
    ],
    ids=["str", "bytes", "function"],
)
def test_write_atomically_replaces_the_file_and_leaves_nothing_else(tmp_path, content, expected):
    path = tmp_path / "file"
    path.write_bytes(b"old")
    checkpoints.write_atomically(str(path), content)
    assert path.read_bytes() == expected
    assert os.listdir(tmp_path) == ["file"]


def test_write_atomically_failing_midway_keeps_the_old_file_and_no_partial_one(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"old")

    def crash(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoints.write_atomically(str(path), crash)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file"]
    with pytest.raises(OSError, match="disk full"):
        checkpoints.write_atomically(str(tmp_path / "new"), crash)
    assert os.listdir(tmp_path) == ["file"]


def test_write_atomically_refuses_other_content(tmp_path):
    with pytest.raises(ValueError, match="content must be str, bytes or a function"):
        checkpoints.write_atomically(str(tmp_path / "file"), 3)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# The workdir lock
# ---------------------------------------------------------------------------------------------

_HOLD_LOCK = """
import sys, time
from experiments import checkpoints
with checkpoints.lock_workdir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _hold_lock(workdir):
    """A process holding ``workdir``'s lock (until it is killed)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, workdir], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_locked_workdir_refuses_a_second_run_naming_the_holder(tmp_path):
    workdir = str(tmp_path / "run")
    holder = _hold_lock(workdir)
    try:
        with pytest.raises(checkpoints.WorkdirLockedError) as info:
            train.train_and_evaluate(_config(), workdir)
        message = str(info.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message
        assert workdir in message
        # The refused run wrote nothing.
        assert sorted(os.listdir(workdir)) == [".lock-0"]
    finally:
        # A crash: the kernel releases the lock of a killed process.
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    record = train.train_and_evaluate(_config(), workdir)
    assert record["step"] == 8
    # Released (and its file removed) when the run ends.
    assert ".lock-0" not in os.listdir(workdir)


def test_the_lock_is_exclusive_within_one_process_and_per_process_index(tmp_path):
    workdir = str(tmp_path / "run")
    with checkpoints.lock_workdir(workdir) as path:
        assert os.path.basename(path) == ".lock-0"
        with open(path) as f:
            holder = json.load(f)
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(checkpoints.WorkdirLockedError, match=f"pid {os.getpid()}"):
            with checkpoints.lock_workdir(workdir):
                pass
        # Process 1 of a multi-process run takes its own lock.
        with checkpoints.lock_workdir(workdir, process_index=1) as other:
            assert os.path.basename(other) == ".lock-1"
    assert os.listdir(workdir) == []
    with checkpoints.lock_workdir(workdir):
        pass
    # An exception inside releases the lock too.
    with pytest.raises(KeyError):
        with checkpoints.lock_workdir(workdir):
            raise KeyError("boom")
    with checkpoints.lock_workdir(workdir):
        pass


def test_lock_workdir_refuses_a_bad_workdir(tmp_path):
    (tmp_path / "a_file").write_text("x")
    for workdir in ("", str(tmp_path / "a_file"), str(tmp_path / "a_file" / "run")):
        with pytest.raises(ValueError, match="workdir="):
            with checkpoints.lock_workdir(workdir):
                pass
    with pytest.raises(ValueError, match="process_index"):
        with checkpoints.lock_workdir(str(tmp_path / "run"), process_index=-1):
            pass
