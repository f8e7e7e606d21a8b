"""The command line: one step runs, and every bad flag, config file or key is one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.experiments.test_data import _write_fake_cifar10

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNLOCAL = f"--config={REPO}/configs/quickstart.py:runlocal"


def _main(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "experiments.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _error_line(proc) -> str:
    """The one ``error:`` line of a failed run; no traceback around it."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_main_runs_one_step(tmp_path):
    proc = _main(
        RUNLOCAL,
        f"--workdir={tmp_path}",
        "--config.total_steps=1",
        "--config.eval_every_steps=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _records(str(tmp_path))[-1]["step"] == 1


def test_main_refuses_an_unknown_config_key(tmp_path):
    line = _error_line(_main(RUNLOCAL, f"--workdir={tmp_path}", "--config.sparsity.no_such_key=1"))
    assert "--config.sparsity.no_such_key" in line and "no key 'no_such_key'" in line


# Arguments may name "{tmp}", a folder holding "a_file" and "no_get_config.py" (x = 1);
# --config and --workdir default to the runlocal quickstart and {tmp}/run.
BAD_COMMAND_LINES = {
    "unknown key": (["--config.nonexistent=1"], ["--config.nonexistent", "no key 'nonexistent'"]),
    "misspelt key": (
        ["--config.sparsity.targt=0.5"],
        ["--config.sparsity.targt", "did you mean 'target'"],
    ),
    "key below a value": (
        ["--config.sparsity.target.x=1"],
        ["--config.sparsity.target.x", "not a section"],
    ),
    "bad integer": (["--config.total_steps=abc"], ["--config.total_steps", "abc"]),
    "empty workdir": (["--workdir="], ["workdir", "''"]),
    "missing config file": (
        ["--config=configs/no_such_file.py"],
        ["configs/no_such_file.py", "no such file"],
    ),
    "unknown variant": (
        [f"--config={REPO}/configs/quickstart.py:bogus"],
        ["variant 'bogus'", "runlocal"],
    ),
    "no get_config": (["--config={tmp}/no_get_config.py"], ["no_get_config.py", "get_config"]),
    "workdir is a file": (["--workdir={tmp}/a_file"], ["workdir=", "not a directory"]),
    "workdir below a file": (["--workdir={tmp}/a_file/run"], ["workdir=", "not a directory"]),
    "cifar10 without data_dir": (
        ["--config.dataset.name=cifar10"],
        ["config.dataset.data_dir", "cifar10"],
    ),
    "cifar10 data_dir missing": (
        ["--config.dataset.name=cifar10", "--config.dataset.data_dir=/nonexistent/c10"],
        ["data_dir='/nonexistent/c10'"],
    ),
}


@pytest.mark.parametrize(
    ("args", "expected"), list(BAD_COMMAND_LINES.values()), ids=list(BAD_COMMAND_LINES)
)
def test_main_reports_bad_input_in_one_line(tmp_path, args, expected):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "no_get_config.py").write_text("x = 1\n")
    args = [arg.format(tmp=tmp_path) for arg in args]
    if not any(arg.startswith("--config=") for arg in args):
        args.insert(0, RUNLOCAL)
    if not any(arg.startswith("--workdir=") for arg in args):
        args.insert(1, f"--workdir={tmp_path / 'run'}")
    # Run in tmp_path: an empty workdir must not fill the current directory.
    line = _error_line(_main(*args, cwd=tmp_path))
    for text in expected:
        assert text in line, line
    # Nothing was written.
    assert sorted(os.listdir(tmp_path)) == ["a_file", "no_get_config.py"]
    assert (tmp_path / "a_file").read_text() == "x"


def test_main_trains_on_cifar10_from_the_data_dir_key(tmp_path):
    _write_fake_cifar10(tmp_path / "cifar" / "cifar-10-batches-py", images_per_batch=8)
    proc = _main(
        RUNLOCAL,
        f"--workdir={tmp_path / 'run'}",
        "--config.dataset.name=cifar10",
        f"--config.dataset.data_dir={tmp_path / 'cifar'}",
        "--config.batch_size=8",
        "--config.total_steps=2",
        "--config.eval_every_steps=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = _records(str(tmp_path / "run"))[-1]
    assert record["step"] == 2 and 0.0 <= record["test_accuracy"] <= 1.0
