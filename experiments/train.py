"""The training loop: ``train_and_evaluate(config, workdir)`` is the whole run.

It checks the config, builds the mesh, the data (`experiments.data`), the model
(`experiments.models`) and the train state (`experiments.state`, whose optimizer is
`experiments.optim`'s ``masked(optax_chain, algorithm)``: sparsity enters only
there, so the step is the same for dense, pruned and dynamic sparse training),
then steps, evaluates, logs metrics and saves checkpoints (`experiments.checkpoints`),
resuming from the workdir's latest checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

# Imported for its registrations too: `import tensornets` adds spectral_truncation and
# greedy_growth to `sparsejax.algorithms`, which `from_config` below resolves names in.
import tensornets  # noqa: F401
from experiments import checkpoints, distributed, optim
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import state as state_lib
from sparsejax import algorithms

__all__ = [
    "NonFiniteLossError",
    "make_mesh",
    "train_and_evaluate",
]

PyTree = Any


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The run's device mesh from ``config.mesh`` (``data``, ``model``; all devices by default)."""
    mesh_config = config.get("mesh", {})
    mesh = distributed.make_mesh(
        data=mesh_config.get("data", -1), model=mesh_config.get("model", 1)
    )
    data_size = mesh.shape[distributed.DATA_AXIS]
    if config.batch_size % data_size:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by the data axis "
            f"(config.mesh.data={data_size})"
        )
    return mesh


_NONFINITE_MODES = ("stop", "skip")


def _check_config(config: ml_collections.ConfigDict) -> None:
    """A ValueError naming the key for any bad value, before anything is loaded or written."""
    for key in ("total_steps", "batch_size", "eval_every_steps", "checkpoint_every_steps"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"config.{key} must be a positive integer, got {value!r}")
    log_every = config.get("log_every_steps", 100)
    if not isinstance(log_every, int) or isinstance(log_every, bool) or log_every <= 0:
        raise ValueError(f"config.log_every_steps must be a positive integer, got {log_every!r}")
    seed = config.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"config.seed must be an integer >= 0, got {seed!r}")
    keep = config.get("keep_checkpoints", 3)
    if not isinstance(keep, int) or isinstance(keep, bool) or keep <= 0:
        raise ValueError(f"config.keep_checkpoints must be a positive integer, got {keep!r}")
    mode = config.get("on_nonfinite", "stop")
    if mode not in _NONFINITE_MODES:
        raise ValueError(
            f"config.on_nonfinite={mode!r} is unknown; known: {list(_NONFINITE_MODES)}"
        )
    state_lib.fsdp_min_size(config)
    optim.packs_masks(config)
    # Build the cheap pieces now, so a bad optimizer, sparsity or model value fails
    # before any data is loaded or anything is compiled or written.
    optim.make_optimizer(config, config.total_steps)
    algorithms.from_config(config.sparsity, config.total_steps)
    models_lib.make_model(config, 10)


@jax.jit
def _tree_all_finite(tree: PyTree) -> jax.Array:
    return jax.tree.reduce(
        jnp.logical_and, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree), jnp.bool_(True)
    )


def _all_finite(tree: PyTree) -> bool:
    return bool(distributed.to_host(_tree_all_finite(tree)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Mapping[str, Any]:
    """Trains the model described by ``config``, resuming from ``workdir`` if it holds checkpoints.

    Writes ``workdir/config.json``, ``workdir/metrics.jsonl`` (one JSON object a
    line with ``step``, ``train_loss``, ``train_accuracy``, ``test_loss``,
    ``test_accuracy``, ``sparsity``, ``steps_per_second``) and orbax checkpoints
    in ``workdir/checkpoints`` every ``checkpoint_every_steps`` and at the end.

    Args:
      config: the experiment config (see configs/).
      workdir: output directory; created if missing.

    Returns:
      The last metrics record (a dict).

    Raises:
      NonFiniteLossError: on a NaN or infinite loss, naming the step; the
        checkpoints on disk all hold finite parameters.
      ValueError: on bad config values.
    """
    _check_config(config)
    mesh = make_mesh(config)
    is_chief = jax.process_index() == 0

    dataset = data_lib.load_from_config(config)
    model = models_lib.make_model(config, dataset.num_classes)
    state, tx, algorithm = state_lib.create_train_state(config, model, dataset, mesh=mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    skip_nonfinite = config.get("on_nonfinite", "stop") == "skip"
    train_step, eval_step, sparsity_fn = state_lib.make_step_functions(
        model,
        tx,
        algorithm,
        mesh=mesh,
        state_sharding=state_sharding,
        skip_nonfinite=skip_nonfinite,
    )
    batch_sharding = distributed.batch_sharding(mesh)
    data_size = mesh.shape[distributed.DATA_AXIS]

    def put_eval(x, y):
        # A last partial eval batch the data axis does not divide is replicated instead.
        sharding = batch_sharding if len(x) % data_size == 0 else distributed.replicated(mesh)
        return distributed.host_to_global((x, y), sharding)

    ckpt_dir = checkpoints.checkpoint_dir(workdir)
    manager = checkpoints.open_manager(workdir, max_to_keep=config.get("keep_checkpoints", 3))
    state, latest = checkpoints.restore_latest(
        manager,
        state,
        quarantine_dir=os.path.join(os.path.abspath(workdir), "corrupt_checkpoints"),
    )
    if latest is not None:
        logging.info("Resumed from %s at step %d", ckpt_dir, latest)
    # Written only now that the config has built a model, data, optimizer and a state
    # matching the checkpoints: a bad config leaves an existing workdir as it was.
    if is_chief:
        config_json = config.to_json_best_effort(indent=2)
        checkpoints.write_atomically(os.path.join(workdir, "config.json"), config_json)
    start_step = int(distributed.to_host(state.step))

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if is_chief and start_step == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    elif is_chief and os.path.exists(metrics_path):
        # Drop records written after the checkpoint we resumed from.
        with open(metrics_path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= start_step]
        checkpoints.write_atomically(metrics_path, "".join(kept))

    batches = data_lib.batches(
        dataset.x_train,
        dataset.y_train,
        batch_size=config.batch_size,
        seed=config.seed,
        start_step=start_step,
    )
    pending: list[tuple[int, dict]] = []
    record: dict[str, Any] = {}
    bar = tqdm(
        total=config.total_steps,
        initial=start_step,
        disable=not (config.get("progress_bar", True) and is_chief),
        dynamic_ncols=True,
        desc=os.path.basename(os.path.normpath(workdir)),
    )
    last_good = latest
    skipped_total = 0
    tick = time.perf_counter()
    tick_step = start_step

    def check_pending():
        """Mean loss and accuracy since the last check; raises on a non-finite loss."""
        nonlocal skipped_total
        losses, accs, skipped = distributed.to_host(
            (
                jnp.stack([m["loss"] for _, m in pending]),
                jnp.stack([m["accuracy"] for _, m in pending]),
                jnp.stack([m.get("skipped", jnp.int32(0)) for _, m in pending]),
            )
        )
        finite = np.isfinite(losses)
        if skip_nonfinite:
            for i in np.flatnonzero(skipped):
                logging.warning("non-finite loss or gradients at step %d; skipped", pending[i][0])
            skipped_total += int(skipped.sum())
            if not finite.any():
                return float("nan"), float("nan")
            return float(np.mean(losses[finite])), float(np.mean(accs[finite]))
        bad = np.flatnonzero(~finite)
        if bad.size:
            step = pending[bad[0]][0]
            raise NonFiniteLossError(
                f"non-finite loss {losses[bad[0]]} at step {step}; stopping. The last good "
                f"checkpoint (step {last_good}) in {ckpt_dir} is kept."
            )
        return float(np.mean(losses)), float(np.mean(accs))

    try:
        for step in range(start_step, config.total_steps):
            x, y = distributed.host_to_global(next(batches), batch_sharding)
            state, step_metrics = train_step(state, x, y)
            pending.append((step, step_metrics))
            done = step + 1
            is_eval = done % config.eval_every_steps == 0 or done == config.total_steps
            is_ckpt = done % config.checkpoint_every_steps == 0 or done == config.total_steps
            if not (is_eval or is_ckpt or done % config.get("log_every_steps", 100) == 0):
                continue
            train_loss, train_acc = check_pending()
            sparsity = float(distributed.to_host(sparsity_fn(state)))
            bar.set_postfix(
                loss=f"{train_loss:.3f}",
                acc=f"{train_acc:.3f}",
                sparsity=f"{sparsity:.4f}",
                refresh=False,
            )
            bar.update(done - bar.n)
            if is_eval:
                now = time.perf_counter()
                record = {
                    "step": done,
                    "train_loss": train_loss,
                    "train_accuracy": train_acc,
                    **state_lib.evaluate(
                        eval_step, state, dataset.x_test, dataset.y_test, put=put_eval
                    ),
                    "sparsity": sparsity,
                    "steps_per_second": (done - tick_step) / max(now - tick, 1e-9),
                    **{
                        k: float(distributed.to_host(v))
                        for k, v in algorithm.metrics(
                            state_lib.algo_state_of(state.opt_state)
                        ).items()
                    },
                }
                if skip_nonfinite:
                    record["skipped_steps"] = skipped_total
                if is_chief:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                tick, tick_step = time.perf_counter(), done
            pending.clear()
            if is_ckpt:
                if not _all_finite(state.params):
                    raise NonFiniteLossError(
                        f"non-finite parameters after step {done}; stopping. The last good "
                        f"checkpoint (step {last_good}) in {ckpt_dir} is kept."
                    )
                checkpoints.save(manager, done, state)
                last_good = done
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
    return record
