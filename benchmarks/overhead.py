"""Step-time overhead of masked training relative to dense training, measured in one run.

    python benchmarks/overhead.py [--steps=1000] [--repeats=5]

Same model (the quickstart 1D CNN, 64 channels), batch (100 MNIST-1D examples)
and optimizer (Adam) for every variant; only ``config.sparsity`` differs:
  dense   masked(adam, Dense())  -- identical to plain adam
  static  a fixed random 90% ERK mask
  rigl    RigL at 90% ERK with a mask update every 100 steps (amortized: the
          timed window contains its update steps in proportion)
Variants are timed in interleaved rounds and the median round is reported, so
machine noise hits all of them alike. Prints each step time and the ratio to dense.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from configs import quickstart
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import state as state_lib

VARIANTS = ("dense", "static", "rigl")


def build(variant: str, total_steps: int):
    config = quickstart.get_config()
    config.sparsity.algorithm = variant
    config.total_steps = total_steps
    dataset = data_lib.load_mnist1d()
    model = models_lib.get_model("cnn1d", channels=config.model.channels, num_classes=10)
    state, tx, algorithm = state_lib.create_train_state(config, model, dataset)
    train_step, _, _ = state_lib.make_step_functions(model, tx, algorithm)
    batches = [
        data_lib.batch_at(
            dataset.x_train, dataset.y_train, batch_size=config.batch_size, seed=0, step=s
        )
        for s in range(40)
    ]
    return state, train_step, batches


def time_steps(state, train_step, batches, steps: int):
    start = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        state, metrics = train_step(state, x, y)
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    args = parser.parse_args()
    # RigL's schedule must keep updating through every timed round.
    total = (args.repeats + 2) * args.steps * 4
    runs = {v: list(build(v, total)) for v in VARIANTS}
    for v in VARIANTS:  # Compile and warm up (the first rounds include RigL updates too).
        runs[v][0], _ = time_steps(*runs[v], steps=200)
    times = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:
            runs[v][0], t = time_steps(*runs[v], steps=args.steps)
            times[v].append(t)
    dense = statistics.median(times["dense"])
    print(
        f"backend={jax.default_backend()} devices={jax.device_count()} "
        f"steps/round={args.steps} rounds={args.repeats}"
    )
    print(f"{'variant':8s} {'ms/step':>9s} {'ratio to dense':>15s}")
    for v in VARIANTS:
        t = statistics.median(times[v])
        print(f"{v:8s} {1e3 * t:9.3f} {t / dense:15.3f}")


if __name__ == "__main__":
    main()
