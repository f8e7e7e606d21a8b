"""The SAE training command: checkpoints, exact resume, loading, refusals, the MiniLM config."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import experiments.activations as acts
from configs import sae_minilm
from experiments import sae as sae_run
from sparsejax import sae as sae_lib


def _folder(path, rows):
    with acts.ShardWriter(str(path), "layer", d=rows.shape[1], shard_rows=700) as writer:
        writer.append(rows)
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sae_acts")
    data = sae_lib.synthetic.generate(
        jax.random.key(0), n_tokens=2048 + 512, d=16, n_features=32, mean_active=3
    )
    x = np.asarray(data.x)
    return _folder(root / "train", x[:2048]), _folder(root / "held", x[2048:])


def _config(folders, **changes):
    config = sae_minilm.get_config("runlocal")
    config.source = "folder"
    config.activations, config.held_out = folders
    config.sae.n_latents = 64
    config.sae.steps = 12
    config.sae.batch_size = 128
    config.log_every_steps = 2
    config.checkpoint_every_steps = 5
    for key, value in changes.items():
        config[key] = value
    return config


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_run(
    folders, tmp_path, monkeypatch
):
    whole = sae_run.train_sae(_config(folders), str(tmp_path / "whole"))
    assert whole["steps"] == 12 and whole["resumed_from"] is None
    assert whole["l0"] == pytest.approx(8.0) and 0 < whole["fvu"] < 1

    make_step = sae_lib.make_train_step

    def crashing(*args, **kwargs):
        step = make_step(*args, **kwargs)

        def run(state, x):
            if int(state.step) == 7:
                raise KeyboardInterrupt("killed at step 7")
            return step(state, x)

        return run

    workdir = str(tmp_path / "cut")
    monkeypatch.setattr(sae_lib, "make_train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        sae_run.train_sae(_config(folders), workdir)
    monkeypatch.undo()
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["5"]
    resumed = sae_run.train_sae(_config(folders), workdir)
    assert resumed["resumed_from"] == 5 and resumed["steps"] == 12
    a, b = sae_run.load_sae(str(tmp_path / "whole")), sae_run.load_sae(workdir)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert _records(workdir) == _records(str(tmp_path / "whole"))
    assert [r["step"] for r in _records(workdir)] == [2, 4, 6, 8, 10, 12]
    for key in ("fvu", "l0", "dead_fraction", "shrinkage"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6)


def test_load_sae_gives_the_trained_sae(folders, tmp_path):
    report = sae_run.train_sae(_config(folders), str(tmp_path))
    sae = sae_run.load_sae(str(tmp_path))
    held = acts.ActivationShards(folders[1]).array()
    z = np.asarray(sae.encode(held))
    assert z.shape == (512, 64) and np.all(np.sum(z != 0, axis=1) <= 8)
    assert sae.decoder.shape == (64, 16)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(sae.decoder), axis=1), 1.0, atol=1e-5)
    assert sae_lib.evaluate(sae, held)["fvu"] == pytest.approx(report["fvu"], abs=1e-6)
    with pytest.raises(ValueError, match="no config.json"):
        sae_run.load_sae(str(tmp_path / "nothing"))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"source": "web"}, "config.source"),
        ({"activations": "/no/such/folder"}, "config.activations"),
        ({"log_every_steps": 0}, "config.log_every_steps"),
    ],
)
def test_bad_configs_are_refused_before_anything_is_written(folders, tmp_path, change, match):
    workdir = tmp_path / "w"
    with pytest.raises(ValueError, match=match):
        sae_run.train_sae(_config(folders, **change), str(workdir))
    assert not workdir.exists() or not os.listdir(workdir)


def test_bad_sae_options_name_the_key(folders, tmp_path):
    config = _config(folders)
    config.sae.options.not_an_option = 1
    with pytest.raises(ValueError, match="config.sae.options has unknown keys"):
        sae_run.check_config(config)
    config = _config(folders)
    config.sae.kind = "nope"
    with pytest.raises(ValueError, match="kind"):
        sae_run.train_sae(config, str(tmp_path))


def test_minilm_runlocal_captures_trains_and_splices(tmp_path):
    config = sae_minilm.get_config("runlocal")
    report = sae_run.train_sae(config, str(tmp_path))
    assert report["steps"] == config.sae.steps and report["l0"] == pytest.approx(config.sae.k)
    assert 0 < report["fvu"] < 1 and -1 <= report["spliced_fidelity"] <= 1
    assert report["held_out_tokens"] > 0
    # A second start finds the run finished: nothing retrained, the activations reused.
    config.spliced_fidelity = False
    again = sae_run.train_sae(config, str(tmp_path))
    assert again["resumed_from"] == config.sae.steps
    assert again["fvu"] == pytest.approx(report["fvu"], abs=1e-6)
