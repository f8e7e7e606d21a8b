"""TensorBoard event files: the scalars a run writes are its metrics.jsonl rows, also on resume.

The event files are read back here without the writer's code: TFRecord framing checked with
its masked CRC-32C, each record parsed as a tensorboardX `Event`, and TensorBoard's rule for a
restart applied (a ``SessionLog.START`` at step s hides earlier events at steps >= s).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys

import numpy as np
import pytest

pytest.importorskip("tensorboardX")

from tensorboardX.proto.event_pb2 import Event, SessionLog  # noqa: E402
from tensorboardX.record_writer import masked_crc32c  # noqa: E402

from experiments import tensorboard as tensorboard_lib  # noqa: E402
from experiments import train  # noqa: E402
from tests.experiments.conftest import runlocal_config  # noqa: E402


def _events(path: str) -> list[Event]:
    """Every event of one file: ``u64 length, u32 crc(length), data, u32 crc(data)`` records."""
    with open(path, "rb") as f:
        raw = f.read()
    events, offset = [], 0
    while offset < len(raw):
        header = raw[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", raw[offset + 8 : offset + 12])
        data = raw[offset + 12 : offset + 12 + length]
        (data_crc,) = struct.unpack("<I", raw[offset + 12 + length : offset + 16 + length])
        assert header_crc == masked_crc32c(header) and data_crc == masked_crc32c(data), path
        events.append(Event.FromString(data))
        offset += 16 + length
    return events


def _event_files(logdir: str) -> list[str]:
    # TensorBoard reads a folder's event files in name order.
    return sorted(os.path.join(logdir, name) for name in os.listdir(logdir) if ".tfevents." in name)


def _scalars(logdir: str, *, purge: bool = True) -> dict[int, dict[str, float]]:
    """``{step: {tag: value}}`` as TensorBoard shows it (``purge``) or as the files hold it.

    Without ``purge`` a step written twice keeps its values from both files, as a list.
    """
    steps: dict[int, dict[str, list[float]]] = {}
    for path in _event_files(logdir):
        for event in _events(path):
            if purge and event.session_log.status == SessionLog.START:
                steps = {s: tags for s, tags in steps.items() if s < event.step}
            for value in event.summary.value:
                steps.setdefault(event.step, {}).setdefault(value.tag, []).append(
                    value.simple_value
                )
    if not purge:
        return steps
    for step, tags in steps.items():
        assert all(len(values) == 1 for values in tags.values()), (step, tags)
    return {step: {tag: values[0] for tag, values in tags.items()} for step, tags in steps.items()}


def _records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _assert_scalars_match_metrics(workdir: str) -> None:
    """Every row of metrics.jsonl, every key, is one scalar at its step (float32, null = NaN)."""
    scalars = _scalars(os.path.join(workdir, "tensorboard"))
    records = _records(workdir)
    assert sorted(scalars) == [r["step"] for r in records]
    for record in records:
        expected = {k: v for k, v in record.items() if k != "step"}
        got = scalars[record["step"]]
        assert set(got) == set(expected)
        for key, value in expected.items():
            if value is None:
                assert math.isnan(got[key]), key
            else:
                # Event files hold float32 scalars.
                assert got[key] == np.float32(value), (key, got[key], value)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tb_full"))
    train.train_and_evaluate(runlocal_config(), workdir)
    return workdir


def test_event_scalars_are_the_metrics_rows(full_run):
    assert tensorboard_lib.backend_name() == "tensorboardX"
    assert len(_event_files(os.path.join(full_run, "tensorboard"))) == 1
    _assert_scalars_match_metrics(full_run)
    # The keys the curves need are there, with the row's names.
    steps = _scalars(os.path.join(full_run, "tensorboard"))
    assert {"train_loss", "train_accuracy", "test_accuracy", "sparsity"} <= set(steps[20])


def test_a_resume_appends_a_file_and_hides_the_rewound_steps(full_run, tmp_path):
    resumed = str(tmp_path / "resumed")
    shutil.copytree(full_run, resumed)
    logdir = os.path.join(resumed, "tensorboard")
    (old_file,) = _event_files(logdir)
    with open(old_file, "rb") as f:
        old_bytes = f.read()
    # Forget the end of the run: the restart resumes from step 10 and writes step 20 again.
    shutil.rmtree(os.path.join(resumed, "checkpoints", "20"))
    train.train_and_evaluate(runlocal_config(), resumed)

    files = _event_files(logdir)
    assert len(files) == 2 and files[0] == old_file
    with open(old_file, "rb") as f:
        assert f.read() == old_bytes  # appended beside, not clobbered
    # Both runs wrote step 20; TensorBoard shows the resumed run's values only.
    assert len(_scalars(logdir, purge=False)[20]["train_loss"]) == 2
    _assert_scalars_match_metrics(resumed)


def test_tensorboard_reads_the_files_when_installed(full_run):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    accumulator = event_accumulator.EventAccumulator(os.path.join(full_run, "tensorboard"))
    accumulator.Reload()
    for record in _records(full_run):
        for key, value in record.items():
            if key == "step" or value is None:
                continue
            (point,) = [p for p in accumulator.Scalars(key) if p.step == record["step"]]
            assert point.value == np.float32(value)


def test_writer_writes_numbers_skips_other_values_and_closes_once(tmp_path):
    logdir = str(tmp_path / "tb")
    with tensorboard_lib.open_writer(logdir, start_step=3) as writer:
        assert writer.enabled
        writer.write(4, {"step": 4, "loss": 0.5, "count": 7, "bad": None, "name": "x"})
    assert not writer.enabled
    writer.write(5, {"loss": 1.0})  # after close: nothing, no error
    writer.close()
    (path,) = _event_files(logdir)
    events = _events(path)
    starts = [e for e in events if e.session_log.status == SessionLog.START]
    assert [e.step for e in starts] == [4]  # hides older files' steps > start_step
    scalars = _scalars(logdir)
    assert set(scalars) == {4} and set(scalars[4]) == {"loss", "count", "bad"}
    assert scalars[4]["loss"] == 0.5 and scalars[4]["count"] == 7.0
    assert math.isnan(scalars[4]["bad"])


def _hide(monkeypatch, *packages):
    """Makes ``import`` of ``packages`` raise ImportError, as if they were not installed."""
    # A None entry in sys.modules does that; submodules imported already are hidden too.
    for name in [*packages, *(m for m in sys.modules if m.split(".")[0] in packages)]:
        monkeypatch.setitem(sys.modules, name, None)


def test_tensorboard_writes_the_same_files_without_tensorboardx(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard.summary.writer.event_file_writer")
    _hide(monkeypatch, "tensorboardX")
    assert tensorboard_lib.backend_name() == "tensorboard"
    logdir = str(tmp_path / "tb")
    with tensorboard_lib.open_writer(logdir, start_step=2) as writer:
        writer.write(3, {"step": 3, "loss": 0.25, "bad": None})
    monkeypatch.undo()  # the reader below parses with tensorboardX's protos
    scalars = _scalars(logdir)
    assert set(scalars) == {3} and scalars[3]["loss"] == 0.25 and math.isnan(scalars[3]["bad"])


def test_without_a_writer_package_nothing_is_written(tmp_path, monkeypatch):
    _hide(monkeypatch, "tensorboardX", "tensorboard")
    assert tensorboard_lib.backend_name() is None
    logdir = tmp_path / "tb"
    writer = tensorboard_lib.open_writer(str(logdir))
    assert not writer.enabled
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not logdir.exists()


def test_a_disabled_writer_does_not_write(tmp_path):
    writer = tensorboard_lib.open_writer(str(tmp_path / "tb"), enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not writer.enabled and not (tmp_path / "tb").exists()


@pytest.mark.parametrize("start_step", [-1, 1.5, True])
def test_open_writer_rejects_a_bad_start_step(tmp_path, start_step):
    with pytest.raises(ValueError, match=f"start_step must be an int >= 0, got {start_step!r}"):
        tensorboard_lib.open_writer(str(tmp_path), start_step=start_step)
