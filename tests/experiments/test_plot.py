"""The curves figure: drawn from a real run's metrics.jsonl, several runs in one PNG, the CLI."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from configs import nm_mnist1d
from experiments import plot, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path) -> tuple[int, int]:
    """A PNG file: the signature, then an IHDR chunk; returns its (width, height)."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert os.path.getsize(path) > 1000
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sr_ste_run(tmp_path_factory):
    """A real tiny SR-STE run (it logs ``mask_flip_rate``): 20 steps, rows at 10 and 20."""
    workdir = str(tmp_path_factory.mktemp("runs") / "sr_ste")
    train.train_and_evaluate(nm_mnist1d.get_config("runlocal"), workdir)
    return workdir


def _write_dense_run(folder) -> str:
    """A hand-written metrics.jsonl in train.py's format: no flip rate, a null test loss."""
    os.makedirs(folder)
    rows = [
        {"step": 10, "train_loss": 2.1, "train_accuracy": 0.2, "test_loss": None,
         "test_accuracy": 0.25, "sparsity": 0.0, "steps_per_second": 50.0},
        {"step": 20, "train_loss": 1.7, "train_accuracy": 0.4, "test_loss": 1.8,
         "test_accuracy": 0.35, "sparsity": 0.0, "steps_per_second": 55.0},
    ]  # fmt: skip
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(folder)


def _lines(figure) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``{panel title: {line label: (steps, values)}}`` of a figure."""
    return {
        axes.get_title(): {
            line.get_label(): (np.asarray(line.get_xdata()), np.asarray(line.get_ydata()))
            for line in axes.get_lines()
        }
        for axes in figure.axes
    }


def test_a_real_run_is_drawn_from_its_metrics(sr_ste_run):
    records = _records(sr_ste_run)
    assert all("mask_flip_rate" in r for r in records)
    path = plot.plot_runs([sr_ste_run])
    assert path == os.path.join(sr_ste_run, "curves.png")
    width, height = _assert_png(path)
    assert width > 300 and height > 200

    lines = _lines(plot.make_figure({"sr_ste": records}))
    titles = {key: title for key, title, _ in plot.PANELS}
    assert set(lines) == set(titles.values())  # the flip-rate panel included
    for key, title in titles.items():
        steps, values = lines[title]["sr_ste"]
        np.testing.assert_array_equal(steps, [r["step"] for r in records])
        np.testing.assert_array_equal(values, [r[key] for r in records])


def test_two_runs_share_one_figure(sr_ste_run, tmp_path):
    dense = _write_dense_run(tmp_path / "dense")
    out = str(tmp_path / "both.png")
    assert plot.plot_runs([sr_ste_run, dense], out) == out
    _assert_png(out)

    runs = dict(zip(plot.run_labels([sr_ste_run, dense]), [_records(sr_ste_run), _records(dense)]))
    assert list(runs) == ["sr_ste", "dense"]
    lines = _lines(plot.make_figure(runs))
    for key, title, always in plot.PANELS:
        # Only the straight-through run carries a flip rate.
        expected = ["sr_ste", "dense"] if always else ["sr_ste"]
        assert list(lines[title]) == expected, key
    np.testing.assert_array_equal(lines["test accuracy"]["dense"][1], [0.25, 0.35])


def test_a_null_value_is_a_gap_and_panels_without_data_are_left_out(tmp_path):
    dense = _write_dense_run(tmp_path / "dense")
    rows = plot.read_metrics(dense)
    assert rows[0]["test_loss"] is None
    rows[0]["train_loss"] = None
    lines = _lines(plot.make_figure({"dense": rows}))
    assert "mask flip rate (EMA over ~100 steps)" not in lines
    steps, values = lines["training loss"]["dense"]
    assert list(steps) == [10, 20] and math.isnan(values[0]) and values[1] == 1.7


def test_clashing_workdir_names_are_labelled_by_path():
    assert plot.run_labels(["runs/rigl/", "runs/set"]) == ["rigl", "set"]
    assert plot.run_labels(["a/seed0", "b/seed0"]) == [os.path.join("a", "seed0"), "b/seed0"]


def test_a_workdir_without_metrics_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="has no metrics.jsonl") as info:
        plot.plot_runs([str(tmp_path)])
    assert os.path.join(str(tmp_path), "metrics.jsonl") in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"step": 10, "train_loss": 1.0}\n{"step": 20, "train_lo', "line 2: not a JSON"),
        ('{"step": 10}\n[1, 2]\n', "line 2: a metrics row is a JSON object"),
        ('{"train_loss": 1.0}\n', "line 1: a metrics row is a JSON object with an integer 'step'"),
        ('{"step": "10"}\n', "line 1: a metrics row"),
        ("", "holds no metrics row"),
    ],
    ids=["torn line", "not an object", "no step", "step not an int", "empty"],
)
def test_an_unreadable_row_names_the_file_and_line(tmp_path, content, expected):
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(ValueError, match=expected) as info:
        plot.plot_runs([str(tmp_path)])
    assert str(tmp_path / "metrics.jsonl") in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_several_runs_need_out_and_out_needs_its_folder(tmp_path):
    a, b = _write_dense_run(tmp_path / "a"), _write_dense_run(tmp_path / "b")
    with pytest.raises(ValueError, match=r"out is required with several workdirs \(2 given\)"):
        plot.plot_runs([a, b])
    with pytest.raises(ValueError, match="out=.*does not exist"):
        plot.plot_runs([a], str(tmp_path / "no" / "such" / "curves.png"))
    with pytest.raises(ValueError, match="workdirs is empty"):
        plot.plot_runs([])


def _cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "experiments.plot", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": REPO},
    )


def test_the_command_line_writes_the_png(sr_ste_run, tmp_path):
    dense = _write_dense_run(tmp_path / "dense")
    one = _cli(f"--workdir={dense}")
    assert one.returncode == 0, one.stderr[-3000:]
    _assert_png(os.path.join(dense, "curves.png"))
    assert one.stdout.strip() == os.path.join(dense, "curves.png")

    out = tmp_path / "both.png"
    both = _cli(f"--workdir={sr_ste_run}", f"--workdir={dense}", f"--out={out}")
    assert both.returncode == 0, both.stderr[-3000:]
    _assert_png(out)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--workdir={a}", "--workdir={b}"], "out is required with several workdirs"),
        (["--workdir={tmp}/nowhere"], "nowhere/metrics.jsonl"),
    ],
    ids=["two runs without --out", "no metrics.jsonl"],
)
def test_the_command_line_reports_bad_input_in_one_line(tmp_path, args, expected):
    a, b = _write_dense_run(tmp_path / "a"), _write_dense_run(tmp_path / "b")
    proc = _cli(*(arg.format(a=a, b=b, tmp=tmp_path) for arg in args))
    assert proc.returncode == plot.EXIT_BAD_INPUT
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "a" / "curves.png").exists()
