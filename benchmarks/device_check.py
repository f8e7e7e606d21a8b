"""On a GPU or TPU: every kernel path against its dense reference, then timed against dense.

    python benchmarks/device_check.py            # on the accelerator: a few minutes at most
    python benchmarks/device_check.py --quick    # small shapes (what the CPU test suite runs)

Checks, each printed as PASS or FAIL with its error relative to the reference's scale
(max |got - want| / max |want|):

  bsr fwd / dx / dvalues   `block_sparse_matmul` with every impl this backend has
                           ('xla', 'pallas', 'auto'; on CPU 'xla' and 'pallas_interpret')
                           against `block_sparse_matmul_reference` and its gradients
  nm  fwd / dx / dvalues   `nm_matmul` (2:4, int8 and bit-packed indices), the same way
  fan-in / COO fwd, grads  `fan_in_matmul`, `coo_matmul` (traced block indices; plain XLA on
                           every backend) against their references
  training mode            RigL on 32x32 blocks, `sparsejax.block_sparse` (COO) against
                           masked training from the same key: the same blocks after every
                           step (three mask updates happen) and the params within tolerance

Then the timings: each path's forward, and forward + backward, against dense ``jnp.dot`` at
the same shape (X 256x2048 · W 2048x2048, 10% of the blocks), printed as ``x dense``.

Tolerances: 1e-5 on CPU. GPUs run float32 matmuls in TF32 by default (XLA's dot and Triton's
``dot`` alike), about 3 decimal digits, so on GPU and TPU the references are computed at
``Precision.HIGHEST`` and the kernels are held to 2e-2 of the output's scale. The training
check runs at HIGHEST precision everywhere (a mask choice is a ranking, and TF32 noise would
reorder near ties). Exits 1 if any check fails or raises; the tracebacks are printed.

The GPU Pallas kernels use the Triton lowering (`jax.experimental.pallas.triton`), deprecated
after JAX 0.10: the README states the JAX range they support. Where it is gone, 'pallas'
fails here and 'auto' / 'xla' still pass: the XLA path is the fallback on GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from bench_timing import time_interleaved
from kernels import block_mask, nm_mask

import pallas_kernels as pk

HIGHEST = jax.lax.Precision.HIGHEST


class Report:
    """Collects PASS / FAIL lines; ``failed`` decides the exit status."""

    def __init__(self, tol: float):
        self.tol, self.failed, self.passed = tol, [], 0

    def close(self, name: str, got, want, tol: float | None = None) -> None:
        tol = self.tol if tol is None else tol
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        if got.shape != want.shape:
            self.fail(name, f"shape {got.shape} != reference {want.shape}")
            return
        err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))
        if not np.isfinite(err) or err > tol:
            self.fail(name, f"relative error {err:.2e} > {tol:.0e}")
        else:
            self.passed += 1
            print(f"PASS  {name:<46} rel err {err:.1e}")

    def close_grads(self, name: str, got, want) -> None:
        """`close` on each of ``(y, dX, dValues)`` (`_grads`), as ``name fwd|dx|dvalues``."""
        for part, g, r in zip(("fwd", "dx", "dvalues"), got, want):
            self.close(f"{name} {part}", g, r)

    def check(self, name: str, ok: bool, detail: str) -> None:
        if ok:
            self.passed += 1
            print(f"PASS  {name:<46} {detail}")
        else:
            self.fail(name, detail)

    def fail(self, name: str, detail: str) -> None:
        self.failed.append(name)
        print(f"FAIL  {name:<46} {detail}")

    def guard(self, name: str, fn) -> None:
        """Runs ``fn``; an exception is a failure of ``name`` with its traceback."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- any error is a failed check, reported
            self.fail(name, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            traceback.print_exc(file=sys.stdout)


def impls() -> list[str]:
    """The impls this backend has: the compiled kernels on GPU / TPU, the interpreter on CPU."""
    if jax.default_backend() == "cpu":
        return ["xla", "pallas_interpret"]
    return ["xla", "pallas", "auto"]


def fan_in_blocks(w, scores, fan):
    """Fan-in values and rows of ``w``: the ``fan`` highest ``scores`` blocks of every column."""
    rows = np.asarray(pk.fan_in_select(jnp.asarray(scores), fan))
    grid = np.zeros(scores.shape, bool)
    grid[rows, np.arange(scores.shape[1])[:, None]] = True
    return pk.fan_in_from_dense(w, grid)


def _grads(fn, x, values):
    """(y, dX, dValues) of ``sum(fn(x, values) * probe)`` with a fixed random probe."""
    y = fn(x, values)
    probe = jax.random.normal(jax.random.key(3), y.shape, y.dtype)
    dx, dv = jax.grad(lambda a, b: jnp.sum(fn(a, b) * probe), argnums=(0, 1))(x, values)
    return y, dx, dv


def check_bsr(report: Report, rng, size, block) -> None:
    k = n = size
    mask = block_mask(rng, (k, n), block, 0.25)
    w = rng.standard_normal((k, n)).astype(np.float32) * mask
    x = jnp.asarray(rng.standard_normal((48, k)), jnp.float32)
    bsr = pk.BSR.from_dense(w, mask, block_shape=block)
    layout = bsr.layout

    def ref(x, values):
        return pk.block_sparse_matmul_reference(x, pk.BSR(values, layout))

    want = _grads(ref, x, bsr.values)
    for impl in impls():

        def run(impl=impl):
            fn = jax.jit(lambda x, v: pk.block_sparse_matmul(x, pk.BSR(v, layout), impl=impl))
            report.close_grads(f"bsr {block[0]}x{block[1]} {impl}", _grads(fn, x, bsr.values), want)

        report.guard(f"bsr {block[0]}x{block[1]} {impl}", run)


def check_nm(report: Report, rng, size) -> None:
    mask = nm_mask(rng, (size, size), 2, 4)
    w = rng.standard_normal((size, size)).astype(np.float32) * mask
    x = jnp.asarray(rng.standard_normal((48, size)), jnp.float32)
    for packed in (False, True):
        nm = pk.NM.from_dense(w, mask, n=2, m=4, packed=packed)
        kind = "packed" if packed else "int8"

        def with_values(v, nm=nm):
            return pk.NM(v, nm.indices, shape=nm.shape, n=2, m=4, packed=nm.packed)

        want = _grads(lambda x, v: pk.nm_matmul_reference(x, with_values(v)), x, nm.values)
        for impl in impls():

            def run(impl=impl, want=want, with_values=with_values, nm=nm, kind=kind):
                fn = jax.jit(lambda x, v: pk.nm_matmul(x, with_values(v), impl=impl))
                report.close_grads(f"nm 2:4 {kind} {impl}", _grads(fn, x, nm.values), want)

            report.guard(f"nm 2:4 {kind} {impl}", run)


def check_dynamic(report: Report, rng, size, block=(32, 32)) -> None:
    kb, nbc = size // block[0], size // block[1]
    x = jnp.asarray(rng.standard_normal((48, size)), jnp.float32)
    w = rng.standard_normal((size, size)).astype(np.float32)
    values, rows = fan_in_blocks(w, rng.random((kb, nbc)), max(1, kb // 4))
    with jax.default_matmul_precision("highest"):
        want = _grads(lambda a, v: pk.fan_in_matmul_reference(a, v, rows), x, values)
    got = _grads(jax.jit(lambda a, v: pk.fan_in_matmul(a, v, rows)), x, values)
    report.close_grads(f"fan-in {block[0]}x{block[1]}", got, want)
    coo_grid = block_mask(rng, (size, size), block, 0.25)[:: block[0], :: block[1]]
    cvalues, crow, ccol = pk.coo_from_dense(w, coo_grid)

    def coo(a, v):
        return pk.coo_matmul(a, v, crow, ccol, n=size)

    with jax.default_matmul_precision("highest"):
        want = _grads(lambda a, v: pk.coo_matmul_reference(a, v, crow, ccol, n=size), x, cvalues)
    report.close_grads(f"COO {block[0]}x{block[1]}", _grads(jax.jit(coo), x, cvalues), want)


def check_training(report: Report, width: int, steps: int = 24) -> None:
    """Block-sparse (COO) RigL training against masked RigL from the same key."""
    import flax.linen as nn
    import optax

    from sparsejax import algorithms, transforms
    from sparsejax import block_sparse as bs

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            # tanh: ReLU's sign flips at rounding level would part the runs (chaos, not a bug).
            x = nn.tanh(nn.Dense(width)(x))
            x = nn.tanh(nn.Dense(width)(x))
            return nn.Dense(10)(x)

    algo = algorithms.get(
        "rigl",
        sparsity=0.9,
        structure="block",
        block_shape=(32, 32),
        keep_dense=("Dense_2",),
        update_every_steps=6,
        end_step=60,
    )
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, width)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 256))
    model = MLP()
    params = model.init(jax.random.key(1), x[:1])["params"]
    key = jax.random.key(7)

    def loss_fn(p, batch):
        logits = model.apply({"params": p}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    with jax.default_matmul_precision("highest"):
        values, layouts = bs.to_block_sparse(params, algo, key=key)
        tx = bs.sparse_blocks(optax.adam(1e-3), algo, layouts, key=key)
        state = tx.init(values)
        step = jax.jit(bs.make_train_step(loss_fn, tx))
        m_tx = transforms.masked(optax.adam(1e-3), algo, key=key)
        m_state = m_tx.init(params)
        m_params = transforms.sparsify(params, m_state)

        @jax.jit
        def m_step(p, s, batch):
            g = jax.grad(loss_fn)(p, batch)
            u, s = m_tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        moved, same = 0, True
        for t in range(steps):
            batch = (x[(t % 4) * 64 :][:64], y[(t % 4) * 64 :][:64])
            before = bs.masks_from_layouts(bs.get_layouts(state))
            values, state, _ = step(values, state, batch)
            m_params, m_state = m_step(m_params, m_state, batch)
            after = bs.masks_from_layouts(bs.get_layouts(state))
            leaves = zip(jax.tree.leaves(after), jax.tree.leaves(transforms.get_masks(m_state)))
            same &= all(bool(jnp.array_equal(a, b)) for a, b in leaves)
            moved += any(
                not bool(jnp.array_equal(a, b))
                for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
            )
        dense = bs.to_dense(values, bs.get_layouts(state))
    report.check(
        "training mode: same blocks at every step",
        same and moved > 0,
        f"{steps} steps, blocks moved on {moved} of them",
    )
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(dense)[0], jax.tree.leaves(m_params)
    ):
        report.close(f"training mode: params {jax.tree_util.keystr(path)}", a, b, tol=1e-4)


def timings(rng, size, batch, iters, rounds) -> None:
    """Forward and forward+backward time of every path against dense ``jnp.dot``."""
    block = (32, 32)
    mask = block_mask(rng, (size, size), block, 0.1)
    w = rng.standard_normal((size, size)).astype(np.float32) * mask
    x = jnp.asarray(rng.standard_normal((batch, size)), jnp.float32)
    wd = jnp.asarray(w)
    bsr = pk.BSR.from_dense(w, mask, block_shape=block)
    nm_keep = nm_mask(rng, (size, size), 2, 4)
    nm = pk.NM.from_dense(rng.standard_normal(w.shape).astype(np.float32) * nm_keep, nm_keep)
    grid = mask[:: block[0], :: block[1]]
    cvalues, crow, ccol = pk.coo_from_dense(w, grid)
    fan = max(1, round(grid.sum() / grid.shape[1]))
    fvalues, frows = fan_in_blocks(w, grid + 0.5 * rng.random(grid.shape), fan)

    def fwd_bwd(fn):
        return jax.jit(jax.grad(lambda x, *a: jnp.sum(fn(x, *a) ** 2), argnums=(0, 1)))

    paths = {"dense jnp.dot": (lambda x, w: x @ w, wd)}
    for impl in impls():
        paths[f"bsr {impl}"] = (
            lambda x, v, impl=impl: pk.block_sparse_matmul(x, pk.BSR(v, bsr.layout), impl=impl),
            bsr.values,
        )
    paths["nm 2:4 auto"] = (
        lambda x, v: pk.nm_matmul(x, pk.NM(v, nm.indices, shape=nm.shape, n=2, m=4)),  # auto
        nm.values,
    )
    paths["fan-in"] = (lambda x, v: pk.fan_in_matmul(x, v, frows), fvalues)
    paths["COO"] = (lambda x, v: pk.coo_matmul(x, v, crow, ccol, n=size), cvalues)
    fns = {}
    for name, (fn, v) in paths.items():
        try:
            f, g = jax.jit(fn), fwd_bwd(fn)
            jax.block_until_ready((f(x, v), g(x, v)))  # a path that cannot compile is skipped
        except Exception as e:  # noqa: BLE001 -- its check above already failed and said why
            print(f"(timing skips {name}: {type(e).__name__})")
            continue
        fns[(name, "fwd")] = lambda f=f, v=v: f(x, v)
        fns[(name, "fwd+bwd")] = lambda g=g, v=v: g(x, v)
    t = time_interleaved(fns, iters, rounds)
    print(
        f"\nX {batch}x{size} · W {size}x{size}, 10% of 32x32 blocks (2:4 for nm), float32, "
        f"median of {rounds} rounds x {iters} calls"
    )
    print("| path | fwd ms | x dense | fwd+bwd ms | x dense |")
    print("|---|---|---|---|---|")
    dense_f, dense_b = t[("dense jnp.dot", "fwd")], t[("dense jnp.dot", "fwd+bwd")]
    for name in paths:
        if (name, "fwd") not in t:
            continue
        f, b = t[(name, "fwd")], t[(name, "fwd+bwd")]
        print(f"| {name} | {1e3 * f:.3f} | {dense_f / f:.2f} | {1e3 * b:.3f} | {dense_b / b:.2f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, short timing")
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    accel = backend != "cpu"
    print(f"backend={backend} devices={jax.devices()} jax={jax.__version__} cpus={os.cpu_count()}")
    report = Report(tol=2e-2 if accel else 1e-5)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    # Block shapes each backend's kernel takes: TPU tiles are multiples of 128, Triton
    # tiles powers of two >= 16; 'xla' and the interpreter take any.
    blocks = [(128, 128)] if backend == "tpu" else [(32, 32), (64, 64)]
    size = 256 if (args.quick or not accel) else 1024
    for block in blocks:
        check_bsr(report, rng, size, block)
    check_nm(report, rng, size)
    report.guard("dynamic kernels", lambda: check_dynamic(report, rng, size))
    report.guard("training mode", lambda: check_training(report, width=256))
    print(f"\nchecks: {report.passed} passed, {len(report.failed)} failed "
          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    if args.quick:
        timings(rng, 256, 32, iters=2, rounds=1)
    else:
        timings(rng, 2048 if accel else 1024, 256, iters=10, rounds=3)
    if report.failed:
        print("FAILED: " + ", ".join(report.failed))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
