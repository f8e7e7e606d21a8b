"""Trains a sparse autoencoder on a model's activations as a run: config, workdir, checkpoints.

    python -m experiments.sae --config=configs/sae_minilm.py --workdir=runs/sae_minilm
    python -m experiments.sae --config=configs/sae_minilm.py:runlocal --workdir=/tmp/sae \
        --config.sae.kind=batchtopk --config.sae.k=16

The config's keys are listed in ``configs/sae_minilm.py``. `train_sae`:

1. gets the activations: with ``source="minilm"`` it captures the pretrained transformer's
   token states at ``layer`` on the corpus's calibration windows (training) and on the
   evaluation passages (held out) into ``workdir/activations/`` (kept, so a resumed run reads
   them back instead of capturing again); with ``source="folder"`` it reads a folder written
   by `experiments.activations.write_activations` (``activations`` and optionally
   ``held_out``);
2. builds the SAE and its train step from `sparsejax.sae` (`make_spec`, `resolve_options`,
   `make_optimizer`, `make_train_step`) and streams shuffled batches through the shards'
   shuffle buffer (`ActivationShards.batches`, seeded by the config's seed);
3. trains, appending metrics to ``workdir/metrics.jsonl`` every ``log_every_steps`` and saving
   the whole train state (SAE, optimizer state, dead-latent counters, step) with orbax every
   ``checkpoint_every_steps`` (`experiments.checkpoints`: a save appears only when complete,
   an unreadable one is moved aside). A run started again in the same workdir resumes from
   its newest checkpoint, replays the batch stream up to it and computes exactly the
   uninterrupted run (a test checks this);
4. evaluates on the held-out activations (FVU, L0, dead fraction, shrinkage) and, for
   ``source="minilm"``, the spliced-in fidelity: the sentence embeddings of the evaluation
   passages with the SAE's reconstruction replacing the layer's output, against the
   model's, and retrieval with it; writes ``workdir/report.json``.

`load_sae(workdir)` returns the trained `sparsejax.sae.SAE` of a finished (or interrupted)
run. As in `experiments.main`, bad input ends the program with one ``error: ...`` line and
exit status 2 before anything is written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, logging
from tqdm import tqdm

import experiments.activations as acts
from experiments import checkpoints
from experiments.activations.shards import INDEX_FILE, layer_folder
from sparsejax import sae as sae_lib
from sparsejax.sae import training as training_lib

EXIT_BAD_INPUT = 2
SOURCES = ("minilm", "folder")
_SAE_KEYS = ("kind", "n_latents", "k", "steps", "batch_size", "options")


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"config.{key} must be a positive int, got {value!r}")
    return int(value)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses a config this command cannot run, naming the key and value.

    Checked before anything is written: the source and its folders, the SAE's kind, sizes
    and options (by building its spec and resolving its options), the cadences.
    """
    if config.get("source") not in SOURCES:
        raise ValueError(f"config.source must be one of {SOURCES}, got {config.get('source')!r}")
    if config.source == "folder":
        for key in ("activations", "held_out"):
            folder = config.get(key, "")
            if key == "held_out" and not folder:
                continue
            if not folder or not os.path.isfile(os.path.join(folder, INDEX_FILE)):
                raise ValueError(
                    f"config.{key}={folder!r} must be a folder written by "
                    f"experiments.activations.write_activations (with {INDEX_FILE})"
                )
    else:
        name = config.get("model", {}).get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"config.model.name must name a pretrained model, got {name!r}")
        if not isinstance(config.get("layer"), str) or not config.layer:
            raise ValueError(f"config.layer must name a module path, got {config.get('layer')!r}")
        for key in ("windows", "length", "passages"):
            _positive_int(key, config.get(key))
    for key in ("seed",):
        if isinstance(config.get(key), bool) or not isinstance(config.get(key), int):
            raise ValueError(f"config.{key} must be an int, got {config.get(key)!r}")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _positive_int(key, config.get(key))
    unknown = sorted(set(config.sae.keys()) - set(_SAE_KEYS))
    if unknown:
        raise ValueError(f"config.sae has unknown keys {unknown}; known: {list(_SAE_KEYS)}")
    _positive_int("sae.steps", config.sae.steps)
    _positive_int("sae.batch_size", config.sae.batch_size)
    _positive_int("sae.n_latents", config.sae.n_latents)
    options = dict(config.sae.get("options", {}))
    unknown = sorted(
        set(options) - set(training_lib.SPEC_OPTIONS) - set(training_lib.TRAIN_OPTIONS)
    )
    if unknown:
        raise ValueError(
            f"config.sae.options has unknown keys {unknown}; known: "
            f"{sorted(training_lib.SPEC_OPTIONS + training_lib.TRAIN_OPTIONS)}"
        )
    if "batch_size" in options:
        raise ValueError("config.sae.options.batch_size: set config.sae.batch_size instead")


def _k(config) -> int | None:
    k = config.sae.get("k")
    return None if k in (None, 0) else int(k)


def _spec_and_options(config, d_in: int):
    options = dict(config.sae.get("options", {}))
    spec_options = {n: options[n] for n in training_lib.SPEC_OPTIONS if n in options}
    train_options = {n: options[n] for n in training_lib.TRAIN_OPTIONS if n in options}
    spec = sae_lib.make_spec(
        config.sae.kind, d_in=d_in, n_latents=config.sae.n_latents, k=_k(config), **spec_options
    )
    o = sae_lib.TrainOptions(batch_size=int(config.sae.batch_size), **train_options)
    return spec, sae_lib.resolve_options(o, spec, int(config.sae.steps))


def _activations(config, workdir: str):
    """(training shards, held-out activations or None) as the config asks."""
    if config.source == "folder":
        held_out = acts.ActivationShards(config.held_out).array() if config.held_out else None
        return acts.ActivationShards(config.activations), held_out
    folder = os.path.join(workdir, "activations")
    train_dir = os.path.join(folder, "train", layer_folder(config.layer))
    held_dir = os.path.join(folder, "held_out", layer_folder(config.layer))
    if all(os.path.isfile(os.path.join(d, INDEX_FILE)) for d in (train_dir, held_dir)):
        train, held = acts.ActivationShards(train_dir), acts.ActivationShards(held_dir)
        if train.complete and held.complete:  # captured before an interruption: reuse
            return train, held.array()
    from experiments import pretrained  # noqa: PLC0415 -- the tokenizer's packages
    from experiments.pretrained import corpus as corpus_lib  # noqa: PLC0415

    model, params, tokenizer = pretrained.load(config.model.name)
    train = acts.write_corpus_activations(
        os.path.join(folder, "train"),
        model,
        params,
        tokenizer,
        config.layer,
        n=config.windows,
        length=config.length,
        seed=config.seed,
        overwrite=True,
    )[config.layer]
    passages = corpus_lib.evaluation_passages(n=config.passages)
    held = acts.write_text_activations(
        os.path.join(folder, "held_out"), model, params, tokenizer, passages, config.layer,
        overwrite=True,
    )[config.layer]  # fmt: skip
    return train, held.array()


def _init(config, train):
    """(initial TrainState, train step) of the config, on the training shards."""
    spec, o = _spec_and_options(config, train.d)
    tx = sae_lib.make_optimizer(o, int(config.sae.steps))
    step_fn = sae_lib.make_train_step(spec, o, tx)
    data = train.array()
    rows = np.sort(
        np.random.default_rng(config.seed).permutation(len(train))[: min(o.init_tokens, len(train))]
    )
    sample = jnp.asarray(np.asarray(data[rows], np.float32))
    state = sae_lib.init_train_state(jax.random.key(config.seed), spec, sample, o, tx)
    return state, step_fn


def _spliced_scores(config, sae) -> dict[str, float]:
    """Embedding fidelity and retrieval of MiniLM with ``sae``'s reconstruction spliced in."""
    from experiments import pretrained  # noqa: PLC0415
    from experiments.pretrained import corpus as corpus_lib  # noqa: PLC0415

    model, params, tokenizer = pretrained.load(config.model.name)

    @jax.jit
    def spliced(p, replacement, ids, mask):
        apply = acts.splice(model.apply, config.layer, replacement)
        return pretrained.mean_pool(apply({"params": p}, ids, mask), mask)

    def evaluate(forward=None, reference=None):
        return corpus_lib.evaluate(
            lambda t: pretrained.embed(model, params, tokenizer, t, forward=forward),
            reference=reference,
            n_passages=config.passages,
        )

    dense = evaluate()
    out = evaluate(lambda p, i, m: spliced(p, sae, i, m), reference=dense)
    return {
        "spliced_fidelity": out["fidelity"],
        "spliced_recall@1": out["recall@1"],
        "spliced_mrr": out["mrr"],
        "recall@1": dense["recall@1"],
        "mrr": dense["mrr"],
    }


def train_sae(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the SAE run of ``config`` in ``workdir``; returns the report.

    Returns:
      The ``report.json`` content: held-out ``fvu``, ``l0``, ``dead_fraction``,
      ``shrinkage`` (and the spliced-in scores for ``source="minilm"``), ``steps``,
      ``resumed_from`` (the checkpoint step or None), ``seconds`` and the config.

    Raises:
      ValueError: naming the config key, before anything is written.
    """
    check_config(config)
    workdir = checkpoints.check_workdir(workdir)
    start = time.perf_counter()
    with checkpoints.lock_workdir(workdir):
        config_json = config.to_json(indent=2)
        checkpoints.write_atomically(os.path.join(workdir, "config.json"), config_json)
        train, held_out = _activations(config, workdir)
        state, step_fn = _init(config, train)
        manager = checkpoints.open_manager(workdir, max_to_keep=config.keep_checkpoints)
        try:
            state, resumed = checkpoints.restore_latest(
                manager, state, quarantine_dir=os.path.join(workdir, "damaged_checkpoints")
            )
            done = resumed or 0
            metrics_path = os.path.join(workdir, "metrics.jsonl")
            _rewind(metrics_path, done)
            batches = train.batches(int(config.sae.batch_size), seed=config.seed)
            for _ in range(done):  # the same stream as an uninterrupted run
                next(batches)
            steps = int(config.sae.steps)
            bar = tqdm(total=steps, initial=done, disable=not config.progress_bar, desc="sae")
            while done < steps:
                state, metrics = step_fn(state, jnp.asarray(next(batches)))
                done += 1
                bar.update(1)
                if done % config.log_every_steps == 0 or done == steps:
                    record = {"step": done, **{k: float(v) for k, v in metrics.items()}}
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                if done % config.checkpoint_every_steps == 0 or done == steps:
                    checkpoints.save(manager, done, state)
                    # The train step donates its state: the save must have read it first.
                    manager.wait_until_finished()
            bar.close()
        finally:
            manager.wait_until_finished()
            manager.close()
        sae = state.sae
        report: dict[str, Any] = {"steps": done, "resumed_from": resumed}
        if held_out is not None:
            report.update(sae_lib.evaluate(sae, held_out))
            report["held_out_tokens"] = int(held_out.shape[0])
        if config.source == "minilm" and config.get("spliced_fidelity", True):
            report.update(_spliced_scores(config, sae))
        report["seconds"] = time.perf_counter() - start
        report["config"] = json.loads(config_json)
        checkpoints.write_atomically(
            os.path.join(workdir, "report.json"), json.dumps(report, indent=2)
        )
    return report


def _rewind(path: str, step: int) -> None:
    """Keeps the metric records up to ``step`` (the resumed run writes the later ones again)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by the crash
            if isinstance(record, dict) and record.get("step", step + 1) <= step:
                kept.append(json.dumps(record) + "\n")
    checkpoints.write_atomically(path, "".join(kept))


def load_sae(workdir: str) -> sae_lib.SAE:
    """The SAE of the newest checkpoint of an `experiments.sae` run in ``workdir``.

    Raises:
      ValueError: if ``workdir`` holds no run's ``config.json`` or no checkpoint.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"workdir={workdir!r} holds no config.json of an experiments.sae run")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    train, _ = _activations(config, workdir)
    state, _ = _init(config, train)
    manager = checkpoints.open_manager(workdir, max_to_keep=config.keep_checkpoints)
    try:
        state, step = checkpoints.restore_latest(
            manager, state, quarantine_dir=os.path.join(workdir, "damaged_checkpoints")
        )
    finally:
        manager.close()
    if step is None:
        raise ValueError(f"workdir={workdir!r} holds no checkpoint to load")
    return state.sae


def _fail(message: str, status: int = EXIT_BAD_INPUT) -> NoReturn:
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"error: {one_line}", file=sys.stderr)
    sys.exit(status)


def main(argv: Sequence[str]) -> None:
    """The command line (after `experiments.main.parse_flags`): runs `train_sae` and prints
    the held-out scores; a bad value ends the program with one ``error:`` line, status 2."""
    # Imported here, as in `experiments.compress`: importing experiments.main defines flags.
    from experiments import main as main_lib  # noqa: PLC0415

    FLAGS = main_lib.FLAGS
    if len(argv) > 1:
        _fail(f"unexpected arguments: {list(argv[1:])}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        report = train_sae(FLAGS.config, FLAGS.workdir)
    except ValueError as error:
        logging.info("Refused", exc_info=True)
        _fail(str(error))
    shown = ("fvu", "l0", "dead_fraction", "spliced_fidelity", "steps", "resumed_from", "seconds")
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items() if k in shown})


if __name__ == "__main__":
    from experiments import main as main_lib

    app.run(main, flags_parser=main_lib.parse_flags)
