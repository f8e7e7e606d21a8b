"""Train-step time and state memory: dense, masked and block-sparse execution, in one run.

    python benchmarks/sparse_training.py                  # the full table, ~10-20 minutes
    python benchmarks/sparse_training.py --quick          # smoke test: tiny shapes, seconds
    python benchmarks/sparse_training.py --rounds=5 --iters=3

Model: an MLP 4096 -> 4096 -> 4096 -> 10 (ReLU; Dense_0 and Dense_1 are the two 4096x4096
hidden kernels, sparsified; the 4096x10 output layer stays dense), float32, batch 256 of
random inputs and labels, softmax cross-entropy, Adam. One train step is forward, backward
and the Adam update, jitted. Modes, all from the same params and key:

  dense     plain ``optax.adam``
  masked    ``sparsejax.transforms.masked(adam, rigl)``: dense weights times a mask (today)
  fan-in    ``sparsejax.block_sparse`` with the fan-in layout (f blocks in every column)
  COO       ``sparsejax.block_sparse`` with the COO layout (the masked mode's blocks)

RigL with 32x32 blocks, uniform sparsity per hidden kernel (50/80/90/95%), a mask update
every 100 steps. The ordinary step and the update step (the step counter set to 101 and
100) are timed separately and the average over a period is reported, ``(99 * ordinary +
update) / 100``: updates included, amortized. Variants are called in turn (interleaved, so
machine noise hits them alike); each round keeps a variant's median call and the report is
the median round. Before timing, COO's first loss is checked against the masked mode's.
State memory is the bytes of the params and optimizer-state pytrees (values, Adam moments,
masks or block indices); activations and transients are not counted.
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_timing import time_interleaved

from sparsejax import algorithms, transforms
from sparsejax import block_sparse as bs

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
EVERY = 100
MODES = ("dense", "masked", "fan-in", "COO")


class MLP(nn.Module):
    hidden: int
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.classes)(x)


def tree_bytes(*trees) -> int:
    """Bytes of every array leaf (typed keys count their key data)."""
    total = 0
    for leaf in jax.tree.leaves(trees):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        total += leaf.size * leaf.dtype.itemsize
    return total


def build_modes(model, params, batch, sparsity: float, block: int):
    """mode -> (step, params, {kind: opt_state}, state bytes); kinds 'ordinary', 'update'."""

    def loss_fn(p, b):
        logits = model.apply({"params": p}, b[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

    algo = algorithms.get(
        "rigl",
        sparsity=sparsity,
        distribution="uniform",
        structure="block",
        block_shape=(block, block),
        keep_dense=("Dense_2",),
        update_every_steps=EVERY,
        end_step=10**6,
    )
    key = jax.random.key(0)
    adam = optax.adam(1e-3)

    def plain_step(tx):
        def step(p, s, b):
            loss, g = jax.value_and_grad(loss_fn)(p, b)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        return jax.jit(step)

    def at(state):  # the step counter on an ordinary step and on an update step
        return {
            "ordinary": state._replace(count=jnp.int32(EVERY + 1)),
            "update": state._replace(count=jnp.int32(EVERY)),
        }

    modes = {}
    dense_state = adam.init(params)
    modes["dense"] = (
        plain_step(adam),
        params,
        {"ordinary": dense_state},
        tree_bytes(params, dense_state),
    )
    masked = transforms.masked(adam, algo, key=key)
    m_state = masked.init(params)
    m_params = transforms.sparsify(params, m_state)
    modes["masked"] = (plain_step(masked), m_params, at(m_state), tree_bytes(m_params, m_state))
    for mode, layout in (("fan-in", "fan_in"), ("COO", "coo")):
        values, layouts = bs.to_block_sparse(params, algo, key=key, layout=layout)
        tx = bs.sparse_blocks(adam, algo, layouts, key=key)
        state = tx.init(values)
        step = jax.jit(bs.make_train_step(loss_fn, tx))
        modes[mode] = (step, values, at(state), tree_bytes(values, state))
    # COO holds the masked mode's blocks: the same first loss.
    want = modes["masked"][0](m_params, m_state, batch)[2]
    got = modes["COO"][0](modes["COO"][1], modes["COO"][2]["ordinary"], batch)[2]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    return modes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--iters", type=int, default=3, help="calls per variant per round")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round (smoke)")
    args = parser.parse_args(argv)
    if args.quick:
        b, width, block, sparsities, rounds, iters = 16, 256, 32, (0.5, 0.9), 1, 1
    else:
        b, width, block, sparsities = 256, 4096, 32, SPARSITIES
        rounds, iters = args.rounds, args.iters
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, width)), jnp.float32)
    batch = (x, jnp.asarray(rng.integers(0, 10, b)))
    model = MLP(hidden=width)
    params = model.init(jax.random.key(1), x[:1])["params"]
    print(
        f"backend={jax.default_backend()} jax={jax.__version__} cpus={os.cpu_count()} "
        f"load average={os.getloadavg()[0]:.2f}; MLP {width}->{width}->{width}->10, batch {b}, "
        f"float32, Adam, RigL {block}x{block} blocks, update every {EVERY} steps; "
        f"{rounds} rounds x {iters} calls (other jobs share the cores and move the ratios)"
    )
    print(
        "\n| sparsity | mode | step ms | update step ms | amortized ms | x dense "
        "| state MiB | / dense |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for sparsity in sparsities:
        modes = build_modes(model, params, batch, sparsity, block)
        fns = {
            (mode, kind): (lambda f=step, p=p, s=s: f(p, s, batch))
            for mode, (step, p, states, _) in modes.items()
            for kind, s in states.items()
        }
        t = time_interleaved(fns, iters, rounds)
        dense_ms = 1e3 * t[("dense", "ordinary")]
        dense_bytes = modes["dense"][3]
        for mode in MODES:
            ordinary = 1e3 * t[(mode, "ordinary")]
            update = 1e3 * t.get((mode, "update"), t[(mode, "ordinary")])
            amortized = ((EVERY - 1) * ordinary + update) / EVERY
            nbytes = modes[mode][3]
            upd = "-" if mode == "dense" else f"{update:.1f}"
            print(
                f"| {sparsity:.0%} | {mode} | {ordinary:.1f} | {upd} | {amortized:.1f} | "
                f"{dense_ms / amortized:.2f} | {nbytes / 2**20:.1f} | "
                f"{nbytes / dense_bytes:.3f} |"
            )
        del modes, fns
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
