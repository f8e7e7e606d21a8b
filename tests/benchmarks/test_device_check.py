"""benchmarks/device_check.py: its checks pass on the CPU paths and fail on a wrong kernel."""

from __future__ import annotations

import importlib
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def device_check():
    sys.path.insert(0, str(BENCHMARKS))  # as `python benchmarks/device_check.py` sees it
    try:
        yield importlib.import_module("device_check")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_quick_run_passes_every_check_and_prints_the_timings(device_check, capsys):
    assert device_check.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "all checks passed" in out
    # Every kernel family is checked, forward and both gradients.
    names = [f"bsr {b} {i}" for b in ("32x32", "64x64") for i in ("xla", "pallas_interpret")]
    names += [f"nm 2:4 {k} {i}" for k in ("int8", "packed") for i in ("xla", "pallas_interpret")]
    for name in [*names, "fan-in 32x32", "COO 32x32"]:
        for part in ("fwd", "dx", "dvalues"):
            assert f"PASS  {name} {part} " in out, (name, part)
    assert "PASS  training mode: same blocks at every step" in out
    assert out.count("| bsr xla |") == 1


def test_a_wrong_kernel_fails_the_run(device_check, monkeypatch, capsys):
    right = pk.block_sparse_matmul
    # Off by 1% of the output: far above the CPU tolerance, the kind of bug a lowering makes.
    monkeypatch.setattr(pk, "block_sparse_matmul", lambda x, w, impl: 1.01 * right(x, w, impl=impl))
    assert device_check.main(["--quick"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  bsr 32x32 xla fwd" in out and "FAILED:" in out


def test_report_fails_on_shape_nan_and_error(device_check, capsys):
    report = device_check.Report(tol=1e-5)
    report.close("shape", np.zeros(3), np.zeros(4))
    report.close("nan", np.array([np.nan]), np.array([1.0]))
    report.guard("raises", lambda: jnp.zeros(2) @ jnp.zeros(3))
    report.close("fine", np.ones(3), np.ones(3))
    assert report.failed == ["shape", "nan", "raises"] and report.passed == 1
