"""End-to-end properties of the training loop: metrics, checkpoints, resume, NaN stop."""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import quickstart
from experiments import train
from tests.experiments.conftest import poison_batches, runlocal_config


def _restore(workdir: str, step: int):
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
    try:
        return manager.restore(step, args=ocp.args.StandardRestore())
    finally:
        manager.close()


def _strict(constant):
    raise ValueError(f"metrics.jsonl holds {constant}, which is not JSON")


def _records(workdir):
    # Strict JSON: NaN, Infinity and -Infinity are refused.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=_strict) for line in f]


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


@pytest.mark.slow
def test_quickstart_reaches_80_percent_at_90_percent_sparsity(tmp_path):
    """The README's quickstart, in full (about a minute on 2 cores; run with -m slow)."""
    config = quickstart.get_config()
    config.progress_bar = False
    record = train.train_and_evaluate(config, str(tmp_path))
    assert record["test_accuracy"] >= 0.80
    assert abs(record["sparsity"] - 0.90) <= 1e-3


def test_resume_moves_damaged_metrics_lines_aside_with_a_warning(full_run, tmp_path):
    workdir, _ = full_run
    resumed = str(tmp_path / "damaged")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "20"))
    path = os.path.join(resumed, "metrics.jsonl")
    with open(path) as f:
        first, second = f.readlines()
    damaged = ["garbage\n", "\n", "[1, 2]\n", '{"step": 15, "train_lo']  # the last one torn
    with open(path, "w") as f:
        f.writelines([first, damaged[0], damaged[1], second, damaged[2], damaged[3]])
    with pytest.warns(RuntimeWarning, match="metrics.jsonl"):
        record = train.train_and_evaluate(runlocal_config(), resumed)
    assert record["step"] == 20
    assert [r["step"] for r in _records(resumed)] == [10, 20]
    aside = [name for name in os.listdir(resumed) if name.startswith("metrics.jsonl.damaged-")]
    assert len(aside) == 1
    with open(os.path.join(resumed, aside[0])) as f:
        assert f.read() == "".join(damaged) + "\n"


def test_metrics_are_strict_json_with_null_for_non_finite_values(tmp_path, monkeypatch):
    # Every step from 5 to 9 is skipped, so the mean train loss logged at step 10 is NaN.
    poison_batches(monkeypatch, lambda step: 5 <= step < 10)
    workdir = str(tmp_path / "null")
    record = train.train_and_evaluate(runlocal_config(on_nonfinite="skip"), workdir)
    records = _records(workdir)
    assert records[0]["step"] == 10 and records[0]["train_loss"] is None
    assert records[0]["train_accuracy"] is None and records[0]["skipped_steps"] == 5
    assert records[-1] == record and np.isfinite(record["train_loss"])


def test_finite_divergence_stops_before_saving_an_optimizer_state_with_inf(tmp_path):
    # At lr 1e8 the loss stays finite but Adam's second moments overflow to inf.
    workdir = str(tmp_path / "diverged")
    config = runlocal_config(**{"optimizer.learning_rate": 1e8})
    with pytest.raises(train.NonFiniteLossError, match="opt_state") as info:
        train.train_and_evaluate(config, workdir)
    message = str(info.value)
    assert "step None" not in message and "no checkpoint has been saved yet" in message
    assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]


def test_skip_mode_stops_after_too_many_consecutive_skipped_steps(tmp_path, monkeypatch):
    poison_batches(monkeypatch, lambda step: step >= 12)
    workdir = str(tmp_path / "skipping")
    config = runlocal_config(on_nonfinite="skip", max_consecutive_skipped_steps=4)
    with pytest.raises(train.NonFiniteLossError, match="max_consecutive_skipped_steps=4") as info:
        train.train_and_evaluate(config, workdir)
    assert "from step 12" in str(info.value) and "checkpoint (step 10)" in str(info.value)
    # Isolated skips under the bound do not stop the run.
    monkeypatch.undo()
    poison_batches(monkeypatch, lambda step: step % 4 == 1)
    record = train.train_and_evaluate(config, str(tmp_path / "isolated"))
    assert record["step"] == 20 and record["skipped_steps"] == 5


def test_an_empty_workdir_or_a_file_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for workdir in ("", "  "):
        with pytest.raises(ValueError, match="workdir"):
            train.train_and_evaluate(runlocal_config(), workdir)
    assert os.listdir(tmp_path) == []
    (tmp_path / "a_file").write_text("x")
    for workdir in ("a_file", "a_file/run"):
        with pytest.raises(ValueError, match=f"workdir={workdir!r}"):
            train.train_and_evaluate(runlocal_config(), workdir)
    assert os.listdir(tmp_path) == ["a_file"]


def test_a_bad_config_leaves_no_lock_file_or_new_folder_behind(tmp_path):
    workdir = tmp_path / "new"
    with pytest.raises(ValueError, match="mesh.data"):
        train.train_and_evaluate(runlocal_config(**{"mesh.data": 2}), str(workdir))
    # Found only once the data is loaded, after the workdir was locked: 7 does not divide
    # MNIST-1D's 40 positions.
    config = runlocal_config()
    config.model = ml_collections.ConfigDict({"name": "vit1d", "patch_size": 7})
    with pytest.raises(ValueError, match="patch_size=7"):
        train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()
