"""experiments.compress: the runlocal config end to end, bad values refused, sparse execution."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import pallas_kernels
from configs import compress_minilm
from experiments import compress, pretrained
from experiments.pretrained import compression, corpus
from sparsejax import export, posttrain
from sparsejax import nn as snn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "compress_minilm.py")


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The command line, in its own process (its absl flags stay out of this one)."""
    return subprocess.run(
        [sys.executable, "-m", "experiments.compress", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def runlocal(tmp_path_factory):
    """The runlocal config run once through the command line: (workdir, report)."""
    workdir = tmp_path_factory.mktemp("compress") / "run"
    run = _cli(f"--config={CONFIG}:runlocal", f"--workdir={workdir}")
    assert run.returncode == 0, run.stderr
    with open(workdir / "report.json") as f:
        return workdir, json.load(f)


@pytest.fixture(scope="module")
def saved(runlocal):
    workdir, _ = runlocal
    return pretrained.load(workdir / "model")


def test_runlocal_writes_a_report_of_both_models(runlocal):
    workdir, report = runlocal
    assert sorted(os.listdir(workdir)) == ["embeddings.npz", "model", "report.json"]
    assert report["config"] == compress_minilm.get_config("runlocal").to_dict()
    for model in ("dense", "compressed"):
        assert {"recall@1", "recall@5", "mrr"} <= set(report[model])
        assert 0 <= report[model]["recall@1"] <= report[model]["recall@5"] <= 1
    assert 0.9 < report["compressed"]["fidelity"] <= 1 + 1e-6
    assert report["evaluation"]["passages"] == 8 and report["evaluation"]["retrieval_topics"] == 8
    assert report["corpus"] == corpus.corpus_info()
    assert set(report["prune_errors"]) == set(report["sparsity"]["pruned_layers"])
    assert report["sparsity"]["pruned_layers"] == [
        f"encoder/layer_0/attention/self/{p}" for p in ("query", "key", "value")
    ]
    phases = {"load", "calibration", "prune", "evaluate_dense", "evaluate_compressed", "save"}
    assert set(report["time_s"]) == phases | {"total"}
    assert report["time_s"]["total"] >= sum(report["time_s"][p] for p in phases)
    params = report["params"]
    assert params["dense"] == params["compressed"] > params["compressed_nonzero"]


def _kernel(tree, name: str):
    for key in name.split("/"):
        tree = tree[key]
    return tree["kernel"]


def test_saved_kernels_have_exactly_the_reported_zeros(runlocal, saved):
    _, report = runlocal
    model, params, _ = saved
    kernels = report["sparsity"]["kernels"]
    assert list(kernels) == pretrained.dense_layer_names(model.config)
    for name, counted in kernels.items():
        values = np.asarray(_kernel(params, name))
        zeros = int(values.size - np.count_nonzero(values))
        assert (zeros, values.size) == (counted["zeros"], counted["size"]), name
        if name in report["sparsity"]["pruned_layers"]:
            assert zeros == values.size // 2, name  # sparsegpt at 50% per layer, exactly
        else:
            assert zeros == 0, name
    assert report["sparsity"]["pruned_layers_sparsity"] == 0.5


def test_saved_model_reproduces_the_compressed_embeddings(runlocal, saved):
    workdir, report = runlocal
    model, params, tokenizer = saved
    recorded = np.load(workdir / "embeddings.npz")
    passages = corpus.evaluation_passages(n=report["evaluation"]["passages"])
    again = pretrained.embed(model, params, tokenizer, passages, batch_size=8)
    np.testing.assert_allclose(again, recorded["compressed"], atol=1e-6, rtol=0)
    fidelity = corpus.fidelity(recorded["dense"], recorded["compressed"])
    assert fidelity == pytest.approx(report["compressed"]["fidelity"], abs=1e-12)


def _config(**overrides) -> ml_collections.ConfigDict:
    config = compress_minilm.get_config("runlocal")
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


BAD_VALUES = {
    "unknown method": ({"prune__method": "obd"}, r"prune\.method='obd' is unknown"),
    "sparsity 1": ({"prune__sparsity": 1.0}, r"prune\.sparsity must be in \[0, 1\)"),
    "negative sparsity": ({"prune__sparsity": -0.1}, r"prune\.sparsity must be in"),
    "pattern not N:M": (
        {"prune__pattern": "2-4", "prune__sparsity": 0.0},
        r"prune\.pattern must be \"N:M\"",
    ),
    "pattern N > M": ({"prune__pattern": "5:4", "prune__sparsity": 0.0}, r"prune\.pattern"),
    "sparsity and pattern": ({"prune__pattern": "2:4"}, r"prune\.sparsity or prune\.pattern"),
    "unknown format": ({"factorize__format": "cp"}, r"factorize\.format='cp' is unknown"),
    "budget 0": ({"factorize__budget": 0.0}, r"factorize\.budget must be a fraction"),
    "block not RxC": ({"prune__block_structure": "32"}, r"prune\.block_structure must be"),
    "block with sparsegpt": (
        {"prune__block_structure": "32x32"},
        r"prune\.block_structure needs prune\.method",
    ),
    "heal without factorizing": ({"heal__steps": 5}, r"heal\.steps=5 needs factorize\.format"),
    "no calibration": ({"calibration__sequences": 0}, r"calibration\.sequences must be"),
    "empty selection": ({"prune__layers": " , "}, r"prune\.layers must be"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_config_value_is_a_value_error_naming_the_key(case, tmp_path):
    overrides, message = BAD_VALUES[case]
    with pytest.raises(ValueError, match=message):
        compress.compress(_config(**overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_missing_key_is_named():
    config = _config()
    del config.prune["dsnot"]
    with pytest.raises(ValueError, match=r"no key 'prune\.dsnot'"):
        compression.check_config(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"prune__layers": "encoder/layer_9/*"}, r"prune\.layers=.*matches no projection"),
        (
            {"prune__layers": "all", "factorize__format": "tt_matrix"},
            r"prune\.layers=.*factorize\.layers=.*pruned or factorized, not both",
        ),
        ({"prune__pattern": "2:5", "prune__sparsity": 0.0}, r"prune\.pattern=2:5: M=5"),
        ({"model__name": "/no/such/folder"}, r"model\.name='/no/such/folder'"),
    ],
)
def test_values_checked_against_the_model_write_nothing(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        compress.compress(_config(**overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_bad_value_in_one_line(tmp_path):
    run = _cli(
        f"--config={CONFIG}:runlocal", f"--workdir={tmp_path}/run", "--config.prune.method=x"
    )
    assert run.returncode == compress.EXIT_BAD_INPUT == 2
    lines = run.stderr.strip().splitlines()
    known = "['none', 'magnitude', 'wanda', 'sparsegpt']"
    assert lines == [f"error: prune.method='x' is unknown; known: {known}"]
    assert not (tmp_path / "run").exists()


def test_select_projections_groups_and_globs():
    names = [
        f"encoder/layer_{i}/{p}"
        for i in range(2)
        for p in (
            "attention/self/query",
            "attention/self/key",
            "attention/self/value",
            "attention/output/dense",
            "intermediate/dense",
            "output/dense",
        )
    ]
    assert compression.select_projections("all", names) == names
    mlp = compression.select_projections("mlp", names)
    assert mlp == [n for n in names if "/attention/" not in n] and len(mlp) == 4
    attention = compression.select_projections("attention", names)
    assert sorted(attention + mlp) == sorted(names)
    assert compression.select_projections("encoder/layer_1/*, mlp", names) == [
        n for n in names if "/layer_1/" in n or "/attention/" not in n
    ]
    with pytest.raises(ValueError, match=r"prune\.layers='nothing'"):
        compression.select_projections("nothing", names, "prune.layers")


def test_parse_pattern_and_block_structure():
    assert compression.parse_pattern("2:4") == (2, 4) and compression.parse_pattern("") is None
    assert compression.parse_block_structure("16x32") == (16, 32)
    assert compression.parse_block_structure("") is None
    for bad in ("0:4", "2:", 4, "2:4:8"):
        with pytest.raises(ValueError, match="key"):
            compression.parse_pattern(bad, "key")
    for bad in ("0x4", "32", (32, 32)):
        with pytest.raises(ValueError, match="key"):
            compression.parse_block_structure(bad, "key")


def test_runlocal_is_a_smaller_run_of_the_same_compression():
    full, small = compress_minilm.get_config(), compress_minilm.get_config("runlocal")
    assert small.prune.method == full.prune.method and small.model.name == full.model.name
    assert small.calibration.sequences < full.calibration.sequences
    assert small.calibration.length < full.calibration.length
    assert 0 < small.evaluation.passages and full.evaluation.passages == 0  # 0 = all


@pytest.fixture(scope="module")
def minilm():
    return pretrained.load("all-MiniLM-L6-v2")


def test_exported_nm_and_bsr_embed_like_the_masked_dense_model(minilm):
    """One projection pruned 2:4 (exported to NM) and one by 32x32 blocks (to BSR): run by the
    sparse kernels under sparse_dense_calls, the model embeds as the masked dense model does."""
    model, params, tokenizer = minilm
    ids = jnp.asarray(corpus.calibration_ids(tokenizer, n=4, length=16))
    sentences = ["The weather is lovely today.", "He drove to the stadium."]
    calls = [c.name for c in posttrain.layer_calls(model.apply, {"params": params}, ids)]
    nm_layer, bsr_layer = "encoder/layer_0/intermediate/dense", "encoder/layer_1/output/dense"
    skip = [c for c in calls if c != nm_layer]
    nm = posttrain.prune_model(model.apply, params, ids, method="magnitude", n=2, m=4, skip=skip)
    block = (32, 32)
    both = posttrain.prune_model(
        model.apply,
        nm.params,
        ids,
        method="wanda",
        sparsity=0.75,
        block_shape=block,
        skip=[c for c in calls if c != bsr_layer],
    )
    as_nm = export.export(both.params, nm.masks, format="nm", n=2, m=4)
    as_bsr = export.export(both.params, both.masks, format="bsr", block_shape=block)
    # Both formats in one model: the NM export with the BSR export's block-pruned layer.
    exported = as_nm
    exported["encoder"]["layer_1"]["output"] = as_bsr["encoder"]["layer_1"]["output"]
    assert isinstance(_kernel(exported, nm_layer), pallas_kernels.NM)
    assert isinstance(_kernel(exported, bsr_layer), pallas_kernels.BSR)
    dense = pretrained.embed(model, both.params, tokenizer, sentences)
    with snn.sparse_dense_calls():
        sparse = pretrained.embed(model, exported, tokenizer, sentences)
    np.testing.assert_allclose(sparse, dense, atol=1e-5, rtol=0)
    # The block mask keeps a quarter of the 32x32 blocks whole, and the kernel is zero elsewhere.
    mask = np.asarray(_kernel(both.masks, bsr_layer))
    blocks = mask.reshape(48, 32, 12, 32).transpose(0, 2, 1, 3).reshape(48, 12, -1)
    assert np.all(blocks.all(-1) | ~blocks.any(-1)) and blocks.all(-1).sum() == 48 * 12 // 4
    np.testing.assert_array_equal(np.asarray(_kernel(both.params, bsr_layer)) == 0, ~mask)
    np.testing.assert_array_equal(
        np.asarray(_kernel(both.params, nm_layer)), np.asarray(_kernel(nm.params, nm_layer))
    )
