"""configs/resnet20_cifar10.py: the paper's ResNet-20, trained from a CIFAR-10 folder given
on the command line, and refused before anything is written when the folder is not there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import resnet20_cifar10
from experiments import models, train
from tests.experiments.test_data import _write_fake_cifar10

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "resnet20_cifar10.py")


def _main(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "experiments.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _kernels(config) -> dict[str, tuple[int, ...]]:
    """Path -> shape of every conv and dense kernel of the config's model (shapes only)."""
    model = models.make_model(config, 10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3))))
    return {
        "/".join(str(k.key) for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
        if path[-1].key == "kernel"
    }


def test_the_model_is_resnet20_of_he_et_al():
    config = resnet20_cifar10.get_config()
    kernels = _kernels(config)
    # 6n + 2 = 20 weighted layers: 19 convs and the dense head.
    convs = {p: s for p, s in kernels.items() if len(s) == 4}
    assert len(convs) == 19 and kernels["params/head/kernel"] == (64, 10)
    assert all(s[:2] == (3, 3) for s in convs.values())
    assert sorted({s[-1] for s in convs.values()}) == [16, 32, 64]
    for stage, width in ((1, 16), (2, 32), (3, 64)):
        blocks = [p for p in convs if f"stage{stage}_block" in p]
        assert len(blocks) == 6 and all(convs[p][-1] == width for p in blocks)
    # "0.27M" parameters (He et al., Table 6), the norm layers' scales and offsets included.
    weights = sum(int(np.prod(s)) for s in kernels.values())
    total = models.num_params(models.make_model(config, 10), np.zeros((1, 32, 32, 3)))
    assert 0.265e6 < weights < total < 0.275e6
    assert config.optimizer.name == "momentum" and config.optimizer.learning_rate == 0.1
    assert config.optimizer.momentum == 0.9 and config.optimizer.weight_decay == 1e-4
    assert config.batch_size == 128 and config.dataset.name == "cifar10"


def test_runlocal_trains_on_a_cifar_folder_from_the_command_line(tmp_path):
    # 8 images a batch file: 40 training images, enough for runlocal's batch of 32.
    _write_fake_cifar10(tmp_path / "cifar" / "cifar-10-batches-py", images_per_batch=8)
    workdir = tmp_path / "run"
    proc = _main(
        f"--config={CONFIG}:runlocal",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={tmp_path / 'cifar'}",
        "--config.total_steps=2",
        "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(workdir / "metrics.jsonl") as f:
        (record,) = [json.loads(line) for line in f]
    assert record["step"] == 2 and np.isfinite(record["train_loss"])
    assert 0.0 <= record["test_accuracy"] <= 1.0
    with open(workdir / "config.json") as f:
        saved = json.load(f)
    assert saved["dataset"] == {
        "name": "cifar10",
        "data_dir": str(tmp_path / "cifar"),
        "cache_dir": "",
    }
    assert saved["model"]["name"] == "resnet"


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("", "config.dataset.data_dir='' must name the folder"),
        ("{tmp}/nowhere", "config.dataset.data_dir='{tmp}/nowhere' does not hold CIFAR-10"),
        (
            "{tmp}/incomplete",
            "config.dataset.data_dir='{tmp}/incomplete': CIFAR-10 folder '{tmp}/incomplete' "
            "is missing ['test_batch']",
        ),
    ],
    ids=["no folder given", "missing folder", "missing file"],
)
def test_a_missing_folder_is_refused_before_the_workdir_has_a_file(tmp_path, folder, expected):
    _write_fake_cifar10(tmp_path / "incomplete")
    os.remove(tmp_path / "incomplete" / "test_batch")
    config = resnet20_cifar10.get_config("runlocal")
    config.dataset.data_dir = folder.format(tmp=tmp_path)
    workdir = tmp_path / "run"
    workdir.mkdir()  # an existing, empty workdir stays empty
    with pytest.raises(ValueError) as info:
        train.train_and_evaluate(config, str(workdir))
    assert expected.format(tmp=tmp_path) in str(info.value)
    assert os.listdir(workdir) == []
    new_workdir = tmp_path / "new"
    with pytest.raises(ValueError):
        train.train_and_evaluate(config, str(new_workdir))
    assert not new_workdir.exists()


def test_the_command_line_names_the_key_and_writes_nothing(tmp_path):
    proc = _main(
        f"--config={CONFIG}:runlocal",
        f"--workdir={tmp_path / 'run'}",
        f"--config.dataset.data_dir={tmp_path / 'nowhere'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"config.dataset.data_dir={str(tmp_path / 'nowhere')!r}" in errors[0]
    assert os.listdir(tmp_path) == []
