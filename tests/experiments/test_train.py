"""End-to-end properties of the training loop: metrics, checkpoints, resume, NaN stop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import quickstart
from experiments import train
from tests.experiments.conftest import poison_batches, runlocal_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _restore(workdir: str, step: int):
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
    try:
        return manager.restore(step, args=ocp.args.StandardRestore())
    finally:
        manager.close()


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    record = train.train_and_evaluate(runlocal_config(), workdir)
    return workdir, record


def test_writes_config_metrics_and_checkpoints(full_run):
    workdir, record = full_run
    config = runlocal_config()
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["sparsity"]["algorithm"] == "rigl"
    records = _records(workdir)
    assert [r["step"] for r in records] == list(
        range(config.eval_every_steps, config.total_steps + 1, config.eval_every_steps)
    )
    for r in records:
        assert {"step", "train_loss", "test_accuracy", "sparsity"} <= set(r)
        assert np.isfinite(r["train_loss"]) and 0.0 <= r["test_accuracy"] <= 1.0
        assert abs(r["sparsity"] - config.sparsity.target) < 1e-3
    assert records[-1] == record
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps == [10, 20]


def test_resume_gives_the_same_params_as_an_uninterrupted_run(full_run, tmp_path):
    workdir, _ = full_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    # Forget the end of the run: the restart must resume from step 10.
    shutil.rmtree(os.path.join(resumed, "checkpoints", "20"))
    record = train.train_and_evaluate(runlocal_config(), resumed)
    assert record["step"] == 20
    assert [r["step"] for r in _records(resumed)] == [10, 20]
    expected, got = _restore(workdir, 20), _restore(resumed, 20)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_batches(monkeypatch, lambda step: step >= 13)
    workdir = str(tmp_path / "nan")
    with pytest.raises(train.NonFiniteLossError, match="step 13"):
        train.train_and_evaluate(runlocal_config(), workdir)
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps == [10]
    restored = _restore(workdir, 10)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored["params"]))


def test_bad_config_values_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="total_steps"):
        train.train_and_evaluate(runlocal_config(total_steps=0), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="bogus"):
        train.train_and_evaluate(
            runlocal_config(**{"sparsity.algorithm": "bogus"}), str(tmp_path / "b")
        )
    with pytest.raises(ValueError, match="learning_rate"):
        train.train_and_evaluate(
            runlocal_config(**{"optimizer.learning_rate": -1.0}), str(tmp_path / "c")
        )


def _main(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "experiments.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_main_runs_one_step(tmp_path):
    proc = _main(
        "--config=configs/quickstart.py:runlocal",
        f"--workdir={tmp_path}",
        "--config.total_steps=1",
        "--config.eval_every_steps=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _records(str(tmp_path))[-1]["step"] == 1


def test_main_refuses_an_unknown_config_key(tmp_path):
    proc = _main(
        "--config=configs/quickstart.py:runlocal",
        f"--workdir={tmp_path}",
        "--config.sparsity.no_such_key=1",
    )
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr


@pytest.mark.slow
def test_quickstart_reaches_80_percent_at_90_percent_sparsity(tmp_path):
    """The README's quickstart, in full (about a minute on 2 cores; run with -m slow)."""
    config = quickstart.get_config()
    config.progress_bar = False
    record = train.train_and_evaluate(config, str(tmp_path))
    assert record["test_accuracy"] >= 0.80
    assert abs(record["sparsity"] - 0.90) <= 1e-3
