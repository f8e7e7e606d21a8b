"""Every table runs end to end in quick mode and writes its Markdown, PNG and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import lottery, report, reproduce
from experiments.tables import base

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("table", sorted(reproduce.TABLES))
def test_quick_table_runs_end_to_end(tmp_path, table):
    out = reproduce.run_table(table, str(tmp_path), seeds=2, quick=True, progress=False)
    for ext in ("md", "png", "json"):
        assert os.path.getsize(tmp_path / f"{table}.{ext}") > 0
    markdown = out["markdown"]
    assert markdown.startswith(f"# {table}:")
    assert "mean ± 95% CI over 2 seeds" in markdown
    assert out["claims"], "every table checks at least one claim"
    for claim in out["claims"]:
        assert claim.line().startswith(("HOLDS: ", "DOES NOT HOLD: "))
        assert claim.line() in markdown
    with open(tmp_path / f"{table}.json") as f:
        saved = json.load(f)
    accuracies = reproduce.TABLES[table].scale == 100.0
    for entry in saved["results"]:
        assert len(entry["values"]) == 2
        assert all(np.isfinite(entry["values"]))
        if accuracies:
            assert all(0.0 <= v <= 1.0 for v in entry["values"])
    with open(tmp_path / f"{table}.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_register_refuses_a_second_table_with_a_taken_name():
    clash = base.TABLES["dst"]._replace(title="another")
    with pytest.raises(ValueError, match="name='dst' is already registered"):
        base.register(clash)
    assert base.register(base.TABLES["dst"]) is base.TABLES["dst"]
    with pytest.raises(ValueError, match="table must be a tables.base.Table"):
        base.register(("dst",))


def test_every_table_has_its_module_and_the_cli_sees_every_registered_table():
    assert reproduce.TABLES is base.TABLES
    assert len(base.TABLES) == 16
    for name, table in base.TABLES.items():
        assert table.name == name
        assert os.path.isfile(os.path.join(_ROOT, "experiments", "tables", f"{name}.py")), name


def test_table_modules_load_without_the_cli():
    # The table framework must not depend on the command line: importing base and every
    # table module leaves experiments.reproduce unimported (no import cycle to dodge).
    code = (
        "import sys\n"
        "from experiments.tables import base\n"
        "assert 'experiments.reproduce' not in sys.modules\n"
        "tables = base.load_tables()\n"
        "assert 'experiments.reproduce' not in sys.modules, 'a table module imports the CLI'\n"
        "print(' '.join(sorted(tables)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=_ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == sorted(reproduce.TABLES)


def test_compare_reads_both_rows_of_one_column_and_picks_the_ordering():
    results = {("A row", 1): [0.9, 0.91, 0.92], ("B row", 1): [0.5, 0.52, 0.51]}
    results[("B row", 2)] = results[("A row", 2)] = [0.0, 0.0, 0.0]
    claim = base.compare(results, 1, "A beats B", ("A", "A row"), ("B", "B row"), strict=True)
    assert claim.holds and claim.sentence == "A beats B"
    assert claim.evidence.startswith("A 91.0 ± ") and " vs B 51.0 ± " in claim.evidence
    assert not base.compare(results, 1, "B >= A", ("B", "B row"), ("A", "A row")).holds
    # Equal values: "at least as good" holds, "better" does not.
    assert base.compare(results, 2, "tie", ("A", "A row"), ("B", "B row")).holds
    assert not base.compare(results, 2, "tie", ("A", "A row"), ("B", "B row"), strict=True).holds


def test_percent_and_with_sparsity():
    assert [base.percent(x) for x in (0.9, 0.999, 0.5)] == ["90%", "99.9%", "50%"]
    config = base.mnist1d_base(True)
    before = config.to_json()
    sparse = base.with_sparsity(config, algorithm="rigl", target=0.9)
    assert config.to_json() == before
    assert sparse.sparsity.to_dict() == {"algorithm": "rigl", "target": 0.9}
    assert sparse.model.to_dict() == config.model.to_dict()


def test_unknown_table_and_bad_seeds_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="table='nope'.*known tables"):
        reproduce.run_table("nope", str(tmp_path))
    with pytest.raises(ValueError, match="seeds"):
        reproduce.run_table("dst", str(tmp_path), seeds=0)


def test_imp_masks_prune_a_fraction_of_the_survivors_and_never_revive():
    key = jax.random.key(0)
    params = {"a": jax.random.normal(key, (20, 10)), "b": jnp.ones(10)}
    current = {"a": jax.random.bernoulli(key, 0.6, (20, 10)), "b": None}
    new = lottery.imp_masks(params, current, 0.2)
    live = int(current["a"].sum())
    assert int(new["a"].sum()) == round(0.8 * live)
    assert not bool(jnp.any(new["a"] & ~current["a"]))
    kept = np.abs(np.asarray(params["a"]))[np.asarray(new["a"])]
    dropped = np.abs(np.asarray(params["a"]))[np.asarray(current["a"] & ~new["a"])]
    assert kept.min() >= dropped.max()
    assert new["b"] is None


def test_extra_tables_with_their_own_columns_are_written_in_key_order():
    table = base.TABLES["dst"]
    extra = {
        "per layer": {
            ("model A", "layer 1"): 1.5,
            ("model A", "layer 2"): 2.0,
            ("B", "layer 1"): 3.0,
        },
        "per cell": {("RigL", 0.9): 0.25},
    }
    page = report.markdown(
        table, ["RigL"], [0.9], {("RigL", 0.9): [0.5, 0.6]}, [], 2, True, 1.0, extra
    )
    own = page.split("per layer:")[1].split("per cell:")[0]
    assert "| | layer 1 | layer 2 |" in own
    assert "| model A | 1.500 | 2.000 |" in own and "| B | 3.000 |  |" in own
    shared = page.split("per cell:")[1]
    assert "| RigL | 0.250 |" in shared and "| method | 90% |" in shared


def test_cell_cache_resumes_matching_runs_and_skips_torn_lines(tmp_path):
    path = str(tmp_path / "cells.jsonl")
    cache = base.CellCache(path, {"quick": True, "sizes": (1, 2)})
    assert cache.get("Wanda", "50%", 0) is None
    cache.put("Wanda", "50%", 0, {"fidelity": 0.9})
    cache.put("Wanda", "2:4", 1, {"fidelity": 0.8})
    with open(path, "a") as f:
        f.write('{"signature": {"quick": true, "si')  # a line torn by a crash
    again = base.CellCache(path, {"quick": True, "sizes": (1, 2)})
    assert again.get("Wanda", "50%", 0) == {"fidelity": 0.9}
    assert again.get("Wanda", "2:4", 1) == {"fidelity": 0.8}
    again.put("SparseGPT", "50%", 0, {"fidelity": 0.7})  # after the torn line: a line of its own
    assert base.CellCache(path, {"quick": True, "sizes": [1, 2]}).get("SparseGPT", "50%", 0) == {
        "fidelity": 0.7
    }
    with open(path) as f:
        lines = f.read().split("\n")
    assert lines[-1] == "" and all(lines[:-1]), "one record a line, no blank lines"
    other = base.CellCache(path, {"quick": False, "sizes": (1, 2)})
    assert other.get("Wanda", "50%", 0) is None
    memory = base.CellCache(None, {})
    memory.put("a", 1, 0, {"x": 1})
    assert memory.get("a", 1, 0) == {"x": 1}


@pytest.mark.parametrize("power", [0.5, 1.0, 2.5])
def test_calibrate_penalty_finds_the_coefficient_of_a_target_l0(power):
    calls = []

    def l0_of(coeff):
        calls.append(coeff)
        return 300.0 / coeff**power

    found = base.calibrate_penalty(l0_of, 16, start=1.0, max_fits=8, tolerance=1.1)
    assert found["fits"] == len(calls) <= 8
    assert abs(np.log(found["l0"] / 16)) <= np.log(1.1)
    assert found["l0"] == pytest.approx(300.0 / found["coeff"] ** power)
    # Every step is limited to a factor of 8.
    assert all(1 / 8 - 1e-9 <= b / a <= 8 + 1e-9 for a, b in zip(calls, calls[1:]))


def test_sae_lm_reads_topk_frontier_in_log_l0():
    from experiments.tables import sae_lm

    results = {("TopK", 8): [0.4, 0.5], ("TopK", 16): [0.3, 0.3], ("TopK", 32): [0.2, 0.1]}
    # 1 - FVU at L0 = 8 * sqrt(2): half-way between k=8 and k=16 in log L0.
    at, how = sae_lm._topk_frontier(results, [8, 16, 32], 8 * 2**0.5)
    np.testing.assert_allclose(at, [0.65, 0.6])
    assert how == "TopK interpolated in log L0 between k=8 and k=16"
    at, how = sae_lm._topk_frontier(results, [8, 16, 32], 64.0)
    np.testing.assert_allclose(at, [0.9, 1.1])
    assert "extrapolated" in how and "k=16 and k=32" in how
    at, _ = sae_lm._topk_frontier(results, [8, 16, 32], 32.0)
    np.testing.assert_allclose(at, [0.8, 0.9])
    assert sae_lm._topk_frontier({("TopK", 8): [0.5]}, [8], 10.0) is None
