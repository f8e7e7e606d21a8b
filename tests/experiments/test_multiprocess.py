"""Two processes with two CPU devices each train to the same params as one process.

The processes are real: `experiments.launch` starts them on loopback, they meet
through `jax.distributed` (gloo collectives on CPU) and run `experiments.main`.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import pytest

from experiments import checkpoints, distributed, launch, train
from tests.experiments.conftest import runlocal_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A few steps of the 8-channel CNN with static 90% ERK masks, bit-packed, every
# leaf of at least 128 entries sharded: every piece of the sharded state is used.
OVERRIDES = {
    "sparsity.algorithm": "static",
    "total_steps": 8,
    "eval_every_steps": 4,
    "checkpoint_every_steps": 4,
    "pack_masks": True,
    "mesh.fsdp_min_size": 128,
}


def _config():
    return runlocal_config(**OVERRIDES)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_process_env_sets_the_coordinator_and_device_count():
    env = launch.process_env(
        1, 3, 4321, 2, base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"}
    )
    assert env[distributed.ENV_COORDINATOR] == "127.0.0.1:4321"
    assert env[distributed.ENV_NUM_PROCESSES] == "3"
    assert env[distributed.ENV_PROCESS_ID] == "1"
    assert env["XLA_FLAGS"].split() == ["--foo", "--xla_force_host_platform_device_count=2"]
    with pytest.raises(ValueError, match="process_id"):
        launch.process_env(3, 3, 4321)
    with pytest.raises(ValueError, match="num_processes"):
        launch.process_env(0, 0, 4321)


def test_a_failing_process_stops_the_others(tmp_path):
    # Process 1 fails at once; process 0 would sleep for a minute.
    code = (
        "import os, sys, time\n"
        "if os.environ['SPARSEJAX_PROCESS_ID'] == '1': sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    rc = launch.launch([sys.executable, "-c", code], 2, log_dir=str(tmp_path), timeout=30)
    assert rc == 3


def test_two_processes_of_two_devices_match_one_process(tmp_path):
    multi = str(tmp_path / "multi")
    rc = launch.launch(
        [
            sys.executable,
            "-m",
            "experiments.main",
            "--config=configs/quickstart.py:runlocal",
            f"--workdir={multi}",
            *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
        ],
        2,
        devices_per_process=2,
        log_dir=str(tmp_path / "logs"),
        timeout=600,
        cwd=REPO,
    )
    logs = "".join(
        open(os.path.join(tmp_path, "logs", f)).read()[-3000:]
        for f in sorted(os.listdir(tmp_path / "logs"))
    )
    assert rc == 0, logs

    single = str(tmp_path / "single")
    record = train.train_and_evaluate(_config(), single)

    # Only process 0 writes metrics; both runs log the same steps.
    assert [r["step"] for r in _records(multi)] == [r["step"] for r in _records(single)] == [4, 8]
    assert _records(multi)[-1]["sparsity"] == pytest.approx(record["sparsity"], abs=1e-6)
    for step in (4, 8):
        a, b = checkpoints.load_checkpoint(single, step), checkpoints.load_checkpoint(multi, step)
        assert int(a["step"]) == int(b["step"]) == step
        # Masks are bits: exactly equal. Floats differ only by reduction order.
        for x, y in zip(
            jax.tree.leaves(a["opt_state"]["masks"]),
            jax.tree.leaves(b["opt_state"]["masks"]),
            strict=True,
        ):
            np.testing.assert_array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
