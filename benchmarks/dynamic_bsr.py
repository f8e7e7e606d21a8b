"""Traced-index block-sparse matmuls (fan-in and COO layouts) vs dense, in one interleaved run.

    python benchmarks/dynamic_bsr.py                  # the full table, a few minutes
    python benchmarks/dynamic_bsr.py --quick          # smoke test: tiny shapes, seconds
    python benchmarks/dynamic_bsr.py --rounds=5 --iters=5

``Y = X @ W`` with X 256x4096 and W 4096x4096 float32 in (b, b) blocks, at several block
sparsities: 32x32 blocks at 50/80/90/95%, 16x16 and 64x64 at 90%. Timed, each under
``jax.jit``, all from the same run:

  dense        ``x @ w`` (what a masked dense model runs)
  fan-in       ``pallas_kernels.fan_in_matmul``: f = round(density * K/b) blocks in every
               block column, at rows chosen at random
  COO          ``pallas_kernels.coo_matmul``: the same number of blocks placed at random
and for each the forward alone and forward+backward: the loss ``sum(Y * G)`` for a fixed
``G`` and its gradients with respect to x and the weights (dense: all of w; sparse: the
stored values), which is what a train step computes for one layer. Every variant is checked
against the dense product before timing. Variants are called in turn (interleaved, so
machine noise hits them alike), each round keeps every variant's median call, and the
report is the median round. Ratios are ``dense time / variant time`` (higher is faster).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from bench_timing import time_interleaved

import pallas_kernels as pk

FULL_CASES = ((32, 0.5), (32, 0.8), (32, 0.9), (32, 0.95), (16, 0.9), (64, 0.9))


def make_case(b: int, k: int, n: int, block: int, sparsity: float, seed: int = 0):
    """Inputs of one case: x, the cotangent G, and both layouts holding the same blocks count."""
    rng = np.random.default_rng(seed)
    kb, nbc = k // block, n // block
    fan_in = max(1, round((1 - sparsity) * kb))
    rows = pk.fan_in_select(rng.random((kb, nbc)), fan_in)
    values = jnp.asarray(rng.standard_normal((nbc, fan_in, block, block)), jnp.float32)
    c_rows, c_cols = pk.coo_select(rng.random((kb, nbc)), fan_in * nbc)
    c_values = jnp.asarray(rng.standard_normal((fan_in * nbc, block, block)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((b, k)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((b, n)), jnp.float32)
    return x, g, fan_in, (values, rows), (c_values, c_rows, c_cols)


def build_ops(x, g, n, fan_in_layout, coo_layout):
    """name -> (jitted function, its arguments); dense weights are the layouts densified."""
    values, rows = fan_in_layout
    c_values, c_rows, c_cols = coo_layout
    w_fan = pk.fan_in_to_dense(values, rows, x.shape[1])
    w_coo = pk.coo_to_dense(c_values, c_rows, c_cols, (x.shape[1], n))

    def dense(x, w):
        return x @ w

    def fan_in(x, v):
        return pk.fan_in_matmul(x, v, rows)

    def coo(x, v):
        return pk.coo_matmul(x, v, c_rows, c_cols, n=n)

    def train(fn):
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(fn(x, w) * g), argnums=(0, 1)))

    return {
        ("forward", "dense"): (jax.jit(dense), (x, w_fan)),
        ("forward", "fan-in"): (jax.jit(fan_in), (x, values)),
        ("forward", "COO"): (jax.jit(coo), (x, c_values)),
        ("forward+backward", "dense"): (train(dense), (x, w_fan)),
        ("forward+backward", "fan-in"): (train(fan_in), (x, values)),
        ("forward+backward", "COO"): (train(coo), (x, c_values)),
    }, (w_fan, w_coo)


def check_equal(ops, dense_weights) -> None:
    """Each sparse op equals the dense product with its densified weight (forward, dx)."""
    w_fan, w_coo = dense_weights
    tol = dict(rtol=2e-3, atol=2e-3)
    for name, w in (("fan-in", w_fan), ("COO", w_coo)):
        fn, (x, v) = ops[("forward", name)]
        np.testing.assert_allclose(fn(x, v), ops[("forward", "dense")][0](x, w), **tol)
        _, (dx, _) = ops[("forward+backward", name)][0](x, v)
        _, (dx_dense, _) = ops[("forward+backward", "dense")][0](x, w)
        np.testing.assert_allclose(dx, dx_dense, **tol)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--iters", type=int, default=5, help="calls per variant per round")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round (smoke)")
    args = parser.parse_args(argv)
    if args.quick:
        b, k, n, cases, rounds, iters = 16, 256, 256, ((32, 0.9), (16, 0.5)), 1, 1
    else:
        b, k, n, cases, rounds, iters = 256, 4096, 4096, FULL_CASES, args.rounds, args.iters
    print(
        f"backend={jax.default_backend()} jax={jax.__version__} cpus={os.cpu_count()} "
        f"load average={os.getloadavg()[0]:.2f} X {b}x{k} @ W {k}x{n} float32, "
        f"{rounds} rounds x {iters} calls (other jobs share the cores and move the ratios)"
    )
    print(
        "\n| block | sparsity | fan-in f | op | dense ms | fan-in ms | x dense | COO ms | x dense |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for block, sparsity in cases:
        x, g, fan_in, fan_layout, coo_layout = make_case(b, k, n, block, sparsity)
        ops, dense_weights = build_ops(x, g, n, fan_layout, coo_layout)
        check_equal(ops, dense_weights)
        fns = {key: (lambda fn=fn, a=a: fn(*a)) for key, (fn, a) in ops.items()}
        t = time_interleaved(fns, iters, rounds)
        for op in ("forward", "forward+backward"):
            d, f, c = (t[(op, name)] for name in ("dense", "fan-in", "COO"))
            print(
                f"| {block}x{block} | {sparsity:.0%} | {fan_in} | {op} | {1e3 * d:.1f} | "
                f"{1e3 * f:.1f} | {d / f:.2f} | {1e3 * c:.1f} | {d / c:.2f} |"
            )
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
