"""Smoke test of benchmarks/sparse_training.py: --quick runs as a script and prints its table."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_quick_mode_prints_the_table():
    # As a user runs it (a script: benchmarks/ first on sys.path), in its own process.
    done = subprocess.run(
        [sys.executable, "benchmarks/sparse_training.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| sparsity | mode")
    # Two quick sparsities, four modes each.
    assert len(rows) == 1 + 2 * 4, done.stdout
    modes = [row.split("|")[2].strip() for row in rows[1:]]
    assert modes == ["dense", "masked", "fan-in", "COO"] * 2
