"""TopK SAE decoding: gather-based sparse decode vs the dense decoder matmul, in one run.

    python benchmarks/sae_decode.py [--tokens=2048] [--latents=16384] [--k=32] [--d=384]
                                    [--repeats=5] [--iters=10]

A TopK SAE's code has k nonzeros a token, so its decoder needs only k of the n_latents rows
per token: ``sparsejax.sae.sparse_decode`` gathers them one rank at a time and sums,
2 * tokens * k * d FLOPs instead of the dense matmul's 2 * tokens * n_latents * d (a ratio of
n_latents / k = 512 at the defaults). Its backward pass is a gather-dot for the codes and a
scatter-add of k rows a token for the decoder. Timed, each under ``jax.jit``:
  forward            dense ``z @ W_dec`` with z ``[tokens, n_latents]`` holding k nonzeros
                     a token, vs ``sparse_decode(values, indices, W_dec)``
  forward+backward   the gradients of ``sum(decode(.) * g)`` with respect to the codes
                     (dense z / the k values) and W_dec
Both paths get the same codes and give the same outputs (checked before timing). Ops are
timed in interleaved rounds and the median round is reported, so machine noise hits them
alike. Prints ms per call and the dense / sparse ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import sae as sae_lib


def make_inputs(tokens: int, latents: int, k: int, d: int, seed: int = 0):
    """TopK codes of random pre-activations, the dense codes, a unit-row decoder, a cotangent."""
    kp, kw, kg = jax.random.split(jax.random.key(seed), 3)
    pre = jax.random.normal(kp, (tokens, latents))
    values, indices = jax.lax.top_k(pre, k)
    values = jax.nn.relu(values)
    z = jnp.zeros((tokens, latents)).at[jnp.arange(tokens)[:, None], indices].set(values)
    w_dec = jax.random.normal(kw, (latents, d))
    w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
    g = jax.random.normal(kg, (tokens, d))
    return values, indices, z, w_dec, g


def build_ops(values, indices, z, w_dec, g):
    """name -> (jitted function, its arguments)."""

    def dense_forward(z, w):
        return z @ w

    def sparse_forward(v, w):
        return sae_lib.sparse_decode(v, indices, w)

    def dense_backward(z, w):
        return jax.grad(lambda z, w: jnp.sum(dense_forward(z, w) * g), argnums=(0, 1))(z, w)

    def sparse_backward(v, w):
        return jax.grad(lambda v, w: jnp.sum(sparse_forward(v, w) * g), argnums=(0, 1))(v, w)

    return {
        ("forward", "dense"): (jax.jit(dense_forward), (z, w_dec)),
        ("forward", "sparse"): (jax.jit(sparse_forward), (values, w_dec)),
        ("forward+backward", "dense"): (jax.jit(dense_backward), (z, w_dec)),
        ("forward+backward", "sparse"): (jax.jit(sparse_backward), (values, w_dec)),
    }


def check_equal(ops, indices) -> None:
    """Both paths agree: outputs, the decoder gradient, and the codes' gradient where kept."""
    dense_fn, dense_args = ops[("forward", "dense")]
    sparse_fn, sparse_args = ops[("forward", "sparse")]
    np.testing.assert_allclose(dense_fn(*dense_args), sparse_fn(*sparse_args), rtol=2e-3, atol=2e-3)
    (gz, gw_dense) = ops[("forward+backward", "dense")][0](*dense_args)
    (gv, gw_sparse) = ops[("forward+backward", "sparse")][0](*sparse_args)
    np.testing.assert_allclose(gw_dense, gw_sparse, rtol=2e-3, atol=2e-3)
    gz_kept = jnp.take_along_axis(gz, indices, axis=1)
    np.testing.assert_allclose(gz_kept, gv, rtol=2e-3, atol=2e-3)


def time_op(fn, args, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per batch")
    parser.add_argument("--latents", type=int, default=16384, help="SAE dictionary size")
    parser.add_argument("--k", type=int, default=32, help="active latents per token")
    parser.add_argument("--d", type=int, default=384, help="activation width")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--iters", type=int, default=10, help="calls per op per round")
    args = parser.parse_args()
    values, indices, z, w_dec, g = make_inputs(args.tokens, args.latents, args.k, args.d)
    ops = build_ops(values, indices, z, w_dec, g)
    check_equal(ops, indices)
    for fn, op_args in ops.values():  # compile and warm up
        time_op(fn, op_args, 2)
    times = {name: [] for name in ops}
    for _ in range(args.repeats):
        for name, (fn, op_args) in ops.items():
            times[name].append(time_op(fn, op_args, args.iters))
    print(
        f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"tokens={args.tokens} latents={args.latents} k={args.k} d={args.d} "
        f"rounds={args.repeats} calls/round={args.iters}"
    )
    print(f"FLOP ratio dense / sparse = latents / k = {args.latents / args.k:.0f}")
    print(f"{'op':17s} {'dense ms':>10s} {'sparse ms':>10s} {'dense / sparse':>15s}")
    for op in ("forward", "forward+backward"):
        dense = statistics.median(times[(op, "dense")])
        sparse = statistics.median(times[(op, "sparse")])
        print(f"{op:17s} {1e3 * dense:10.3f} {1e3 * sparse:10.3f} {dense / sparse:15.1f}")


if __name__ == "__main__":
    main()
