"""Speed and storage of real sparse matmuls against dense, measured in one interleaved run.

    python benchmarks/kernels.py                      # the headline case, about a minute
    python benchmarks/kernels.py --sweep              # + 2 sizes x 5 densities x 4 blocks
    python benchmarks/kernels.py --rounds=5 --iters=30

Headline: ``Y = X @ W`` with X 256x2048, W 2048x2048 at 10% block density (32x32 blocks,
then 16x16 and 64x64), float32, on whatever backend JAX picks. Printed, all from the same run:

  dense          jit(jnp.dot) on the densified W (what a masked model runs)
  ours           pallas_kernels.block_sparse_matmul, impl='auto' (the XLA path on CPU)
  jax BCOO       jax.experimental.sparse BCOO,  x @ W
  jax BCSR       jax.experimental.sparse BCSR,  (W^T @ x^T)^T (its fast path: sparse left)
  scipy CSR/BSR  scipy.sparse, (W^T @ x^T)^T with W^T precomputed (same trick)
  ideal          dense time x block density
  2:4            pallas_kernels.nm_matmul on a 2:4 W (CPU: rebuild W, dense GEMM)
  interpret      the Pallas TPU kernel in the interpreter, small case only (it is slow)
and the bytes each format stores relative to dense float32.

Timing: every callable is jitted (scipy is called directly), warmed up, then the variants
are called in turn ``iters`` times per round (interleaved, so machine noise hits all of
them alike) and each variant's median over the round is kept; the report is the median
round. Ratios are ``dense time / variant time`` (higher is faster).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from bench_timing import time_interleaved
from jax.experimental import sparse as jsparse

import pallas_kernels as pk


def block_mask(rng, shape, block_shape, density):
    """A random block mask with exactly round(density * blocks) blocks kept."""
    kb, nb = shape[0] // block_shape[0], shape[1] // block_shape[1]
    keep = max(0, round(density * kb * nb))
    flat = np.zeros(kb * nb, bool)
    flat[rng.choice(kb * nb, keep, replace=False)] = True
    return np.kron(flat.reshape(kb, nb), np.ones(block_shape, bool))


def nm_mask(rng, shape, n, m):
    scores = rng.random((shape[0] // m, m, shape[1]))
    rank = np.argsort(np.argsort(-scores, axis=1), axis=1)
    return (rank < n).reshape(shape)


def case(b, k, n, density, block, *, iters, rounds, baselines=True, seed=0):
    rng = np.random.default_rng(seed)
    mask = block_mask(rng, (k, n), (block, block), density)
    w = rng.standard_normal((k, n)).astype(np.float32) * mask
    x_np = rng.standard_normal((b, k)).astype(np.float32)
    x, wd = jnp.asarray(x_np), jnp.asarray(w)
    bsr = pk.BSR.from_dense(w, mask, block_shape=(block, block))
    dense = jax.jit(jnp.dot)
    ours = jax.jit(lambda x, w: pk.block_sparse_matmul(x, w))
    fns = {"dense": lambda: dense(x, wd), "ours": lambda: ours(x, bsr)}
    y_ref = np.asarray(x_np, np.float64) @ np.asarray(w, np.float64)
    err = float(np.max(np.abs(np.asarray(ours(x, bsr)) - y_ref)))
    stored = {"ours BSR": bsr.nbytes}
    if baselines:
        bcoo = jsparse.BCOO.fromdense(wd)
        bcsr_t = jsparse.BCSR.fromdense(wd.T)
        bcoo_mm = jax.jit(lambda x, w: x @ w)
        bcsr_mm = jax.jit(lambda x, wt: (wt @ x.T).T)
        csr_t = sp.csr_matrix(w.T)
        bsr_t = sp.bsr_matrix(w.T, blocksize=(block, block))
        xt = np.ascontiguousarray(x_np.T)
        fns.update(
            {
                "jax BCOO": lambda: bcoo_mm(x, bcoo),
                "jax BCSR": lambda: bcsr_mm(x, bcsr_t),
                "scipy CSR": lambda: csr_t @ xt,
                "scipy BSR": lambda: bsr_t @ xt,
            }
        )
        stored.update(
            {
                "jax BCOO": bcoo.data.nbytes + bcoo.indices.nbytes,
                "jax BCSR": bcsr_t.data.nbytes + bcsr_t.indices.nbytes + bcsr_t.indptr.nbytes,
                "scipy CSR": csr_t.data.nbytes + csr_t.indices.nbytes + csr_t.indptr.nbytes,
                "scipy BSR": bsr_t.data.nbytes + bsr_t.indices.nbytes + bsr_t.indptr.nbytes,
            }
        )
    times = time_interleaved(fns, iters, rounds)
    return times, stored, w.nbytes, bsr.density, err


def print_case(title, times, stored, dense_bytes, density, err):
    base = times["dense"]
    print(f"\n{title}  (max |ours - float64 reference| = {err:.2e})")
    print(f"  {'variant':<12} {'ms':>9} {'x dense':>9}")
    for name, t in times.items():
        print(f"  {name:<12} {t * 1e3:9.3f} {base / t:9.2f}")
    print(f"  {'ideal':<12} {base * density * 1e3:9.3f} {1 / density:9.2f}")
    print(f"  bytes stored / dense float32 ({dense_bytes} B):")
    for name, nbytes in stored.items():
        print(f"    {name:<12} {nbytes / dense_bytes:6.3f}")


def nm_case(b, k, n, *, iters, rounds, packed=False, seed=0):
    rng = np.random.default_rng(seed)
    mask = nm_mask(rng, (k, n), 2, 4)
    w = rng.standard_normal((k, n)).astype(np.float32) * mask
    x = jnp.asarray(rng.standard_normal((b, k)).astype(np.float32))
    wd = jnp.asarray(w)
    nm24 = pk.NM.from_dense(w, mask, n=2, m=4, packed=packed)
    dense = jax.jit(jnp.dot)
    ours = jax.jit(lambda x, w: pk.nm_matmul(x, w))
    times = time_interleaved(
        {"dense": lambda: dense(x, wd), "2:4": lambda: ours(x, nm24)}, iters, rounds
    )
    return times, nm24.nbytes / w.nbytes


def interpret_case(*, iters, rounds, seed=0):
    """The TPU kernel in the interpreter at a small size (each grid step is a loop trip)."""
    rng = np.random.default_rng(seed)
    b, k, n, block = 16, 256, 256, 128
    mask = block_mask(rng, (k, n), (block, block), 0.5)
    w = rng.standard_normal((k, n)).astype(np.float32) * mask
    x, wd = jnp.asarray(rng.standard_normal((b, k)).astype(np.float32)), jnp.asarray(w)
    bsr = pk.BSR.from_dense(w, mask, block_shape=(block, block))
    dense = jax.jit(jnp.dot)
    xla = jax.jit(lambda x, w: pk.block_sparse_matmul(x, w, impl="xla"))
    interp = jax.jit(lambda x, w: pk.block_sparse_matmul(x, w, impl="pallas_interpret"))
    return time_interleaved(
        {
            "dense": lambda: dense(x, wd),
            "ours (xla)": lambda: xla(x, bsr),
            "interpret": lambda: interp(x, bsr),
        },
        iters,
        rounds,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20, help="calls per variant per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--sweep", action="store_true", help="also sweep sizes/densities/blocks")
    parser.add_argument("--no-baselines", action="store_true", help="skip jax.sparse/scipy")
    parser.add_argument(
        "--blocks", type=int, nargs="+", default=[32, 16, 64], help="headline block sizes"
    )
    args = parser.parse_args()
    kw = dict(iters=args.iters, rounds=args.rounds)
    print(
        f"backend={jax.default_backend()} devices={jax.devices()} jax={jax.__version__} "
        f"cpus={os.cpu_count()} load average={os.getloadavg()[0]:.2f} (other jobs share the "
        "cores and change the ratios; measure on an idle machine)"
    )

    for block in args.blocks:
        times, stored, dense_bytes, density, err = case(
            256, 2048, 2048, 0.1, block, baselines=not args.no_baselines, **kw
        )
        title = f"X 256x2048 @ W 2048x2048, 10% of {block}x{block} blocks"
        print_case(title, times, stored, dense_bytes, density, err)

    for packed in (False, True):
        t, ratio = nm_case(256, 2048, 2048, packed=packed, **kw)
        kind = "bit-packed" if packed else "int8"
        print(
            f"\n2:4 ({kind} indices) X 256x2048 @ W 2048x2048: dense {t['dense'] * 1e3:.3f} ms, "
            f"2:4 {t['2:4'] * 1e3:.3f} ms (x{t['dense'] / t['2:4']:.2f} dense), "
            f"bytes {ratio:.3f} of dense float32"
        )

    t = interpret_case(**kw)
    print(
        "\nPallas TPU kernel, interpreter, X 16x256 @ W 256x256, 50% of 128x128 blocks: "
        + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in t.items())
    )

    if args.sweep:
        print("\nSweep (ours vs dense; ideal = 1/density):")
        print(f"  {'B':>5} {'K=N':>6} {'block':>5} {'density':>8} {'dense ms':>9} "
              f"{'ours ms':>8} {'x dense':>8} {'ideal':>6}")  # fmt: skip
        for b, size in ((256, 2048), (64, 1024)):
            for block in (16, 32, 64, 128):
                for density in (0.5, 0.2, 0.1, 0.05, 0.02):
                    times, _, _, dens, _ = case(
                        b, size, size, density, block, baselines=False, iters=5, rounds=3
                    )
                    print(
                        f"  {b:5d} {size:6d} {block:5d} {dens:8.3f} {times['dense'] * 1e3:9.3f} "
                        f"{times['ours'] * 1e3:8.3f} {times['dense'] / times['ours']:8.2f} "
                        f"{1 / max(dens, 1e-9):6.1f}"
                    )


if __name__ == "__main__":
    main()
