"""Every table runs end to end in quick mode and writes its Markdown, PNG and JSON."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import lottery, reproduce


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
    clash = reproduce.TABLES["dst"]._replace(title="another")
    with pytest.raises(ValueError, match="name='dst' is already registered"):
        reproduce.register(clash)
    assert reproduce.register(reproduce.TABLES["dst"]) is reproduce.TABLES["dst"]


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
