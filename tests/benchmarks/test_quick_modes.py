"""Smoke tests of the benchmarks' quick modes: each runs as a script and prints its table."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _table(script: str) -> list[str]:
    # As a user runs it (a script: benchmarks/ first on sys.path), in its own process.
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [line for line in done.stdout.splitlines() if line.startswith("| ")]


@pytest.mark.parametrize(
    "script, header, rows",
    [
        # Two quick cases, forward and forward+backward each.
        ("dynamic_bsr.py", "| block | sparsity", 2 * 2),
        # Two quick sparsities, four modes each.
        ("sparse_training.py", "| sparsity | mode", 2 * 4),
    ],
)
def test_quick_mode_prints_the_table(script, header, rows):
    table = _table(script)
    assert table[0].startswith(header)
    assert len(table) == 1 + rows, table
    if script == "sparse_training.py":
        modes = [row.split("|")[2].strip() for row in table[1:]]
        assert modes == ["dense", "masked", "fan-in", "COO"] * 2
