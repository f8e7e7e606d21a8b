"""Factorized layers vs dense, and our jitted decompositions vs tensorly, measured in one run.

    python benchmarks/factorized_layers.py [--repeats=7] [--part=all|layers|decompositions]

(a) layers: forward+backward (value_and_grad of a squared-output loss with respect to
    params and inputs, jitted) of a 1024 -> 1024 dense layer and of factorized layers
    with in/out tensorized as (8, 8, 16): CP rank 64, Tucker ranks (4, 4, 8, 4, 4, 8),
    TT rank 16, TT-matrix rank 16; batch 4 and 256; each factorized layer both ways
    (contract the factors with x along the opt_einsum path, or rebuild the kernel then
    one matmul). Prints parameters, forward FLOPs of both methods (opt_einsum count,
    multiply-add = 2) and the median step time over interleaved rounds, with its
    ratio to dense.
(b) decompositions: the same random low-rank tensors plus 5% noise decomposed by our
    jitted from_dense (float32) and by tensorly (numpy backend, float64), with each
    library's default stopping rules; prints relative reconstruction errors, their ratio,
    compile time, median run times and the time ratio.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

# Run as a script, this file's folder is first on sys.path and the file's own name would
# shadow the tensornets package.
if (
    sys.path
    and pathlib.Path(sys.path[0] or ".").resolve() == pathlib.Path(__file__).parent.resolve()
):
    sys.path.pop(0)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import tensornets as tn  # noqa: E402

SHAPE = (8, 8, 16)
LAYERS = {
    "dense": None,
    "cp r64": ("cp", 64),
    "tucker (4,4,8,4,4,8)": ("tucker", (4, 4, 8, 4, 4, 8)),
    "tt r16": ("tt", 16),
    "tt_matrix r16": ("tt_matrix", 16),
}


def _median_time(fn, repeats: int, inner: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def _layer_format(layer_params, fmt):
    p = {k: v for k, v in layer_params.items() if k != "bias"}
    return {
        "cp": tn.CP.from_params,
        "tucker": tn.Tucker.from_params,
        "tt": tn.TT.from_params,
        "tt_matrix": tn.TTMatrix.from_params,
    }[fmt](p)


def bench_layers(repeats: int):
    print("(a) 1024 -> 1024 layers, forward+backward, in/out tensorized as", SHAPE)
    key = jax.random.key(0)
    rows = []
    for batch in (4, 256):
        x = jax.random.normal(key, (batch, 1024))
        steps = {}
        info = {}
        for name, cfg in LAYERS.items():
            methods = ["-"] if cfg is None else ["factorized", "dense"]
            for method in methods:
                if cfg is None:
                    layer = nn.Dense(1024)
                else:
                    fmt, rank = cfg
                    layer = tn.FactorizedDense(
                        1024, fmt, rank, in_shape=SHAPE, out_shape=SHAPE, contraction=method
                    )
                params = layer.init(key, x)

                def loss(params, x, layer=layer):
                    return jnp.mean(layer.apply(params, x) ** 2)

                step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
                jax.block_until_ready(step(params, x))
                steps[(name, method)] = (step, params)
                n_params = sum(p.size for p in jax.tree.leaves(params))
                if cfg is None:
                    flops = {"factorized": 2 * batch * 1024 * 1024, "dense": 2 * batch * 1024**2}
                else:
                    f = _layer_format(params["params"], cfg[0])
                    costs = (
                        f.apply_costs(batch) if cfg[0] == "tt_matrix" else f.apply_costs(batch, 3)
                    )
                    flops = {"factorized": costs["factorized"], "dense": costs["dense"]}
                info[(name, method)] = (n_params, flops)
        # interleave: every variant once per round, so machine noise hits all alike
        inner = 20 if batch == 4 else 5
        times = {k: [] for k in steps}
        for _ in range(repeats):
            for k, (step, params) in steps.items():
                times[k].append(_median_time(lambda s=step, p=params, x=x: s(p, x), 1, inner))
        base = statistics.median(times[("dense", "-")])
        for k in steps:
            t = statistics.median(times[k])
            n_params, flops = info[k]
            rows.append((batch, *k, n_params, flops["factorized"], flops["dense"], t, t / base))
    header = (
        "| batch | layer | method | params | fwd GFLOP factorized | fwd GFLOP rebuild+matmul "
        "| fwd+bwd ms | vs dense |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    for batch, name, method, n, ff, fd, t, ratio in rows:
        print(
            f"| {batch} | {name} | {method} | {n:,} | {ff / 1e9:.4f} | {fd / 1e9:.4f} "
            f"| {t * 1e3:.3f} | {ratio:.2f}x |"
        )


def _low_rank(kind: str, seed: int):
    rng = np.random.default_rng(seed)
    if kind == "cp":
        f = [rng.standard_normal((32, 8)) for _ in range(3)]
        x = np.einsum("ar,br,cr->abc", *f)
    elif kind == "tucker":
        core = rng.standard_normal((8, 8, 8))
        f = [rng.standard_normal((32, 8)) for _ in range(3)]
        x = np.einsum("pqr,ap,bq,cr->abc", core, *f)
    elif kind == "tt":
        full = [1, 4, 4, 4, 4, 1]
        cores = [rng.standard_normal((full[k], 8, full[k + 1])) for k in range(5)]
        x = cores[0]
        for c in cores[1:]:
            x = np.tensordot(x, c, axes=(-1, 0))
        x = x.reshape((8,) * 5)
    else:  # tt_matrix: a 1024 x 1024 kernel of TT-matrix rank 16
        full = [1, 16, 16, 1]
        cores = [rng.standard_normal((full[k], m * m, full[k + 1])) for k, m in enumerate(SHAPE)]
        t = np.einsum("aib,bjc,ckd->ijk", *cores).reshape(8, 8, 8, 8, 16, 16)
        x = t.transpose(0, 2, 4, 1, 3, 5).reshape(1024, 1024)
    x = x + 0.05 * np.linalg.norm(x) / np.sqrt(x.size) * rng.standard_normal(x.shape)
    return x


def bench_decompositions(repeats: int):
    import tensorly as tl
    from tensorly.decomposition import parafac, tensor_train, tensor_train_matrix, tucker

    assert tl.get_backend() == "numpy"
    print("\n(b) decompositions, low-rank + 5% noise; ours jitted float32, tensorly numpy float64")
    cases = {
        "CP ALS 32^3 r8": (
            "cp",
            lambda x: tn.CP.from_dense(x, 8),
            lambda x: tl.cp_to_tensor(parafac(x, 8, init="svd")),
        ),
        "Tucker HOOI 32^3 r(8,8,8)": (
            "tucker",
            lambda x: tn.Tucker.from_dense(x, (8, 8, 8)),
            lambda x: tl.tucker_to_tensor(tucker(x, rank=[8, 8, 8])),
        ),
        "TT-SVD 8^5 r4": (
            "tt",
            lambda x: tn.TT.from_dense(x, 4),
            lambda x: tl.tt_to_tensor(tensor_train(x, rank=[1, 4, 4, 4, 4, 1])),
        ),
        "TT-matrix 1024x1024 (8,8,16)^2 r16": (
            "ttm",
            lambda x: tn.TTMatrix.from_dense(x, SHAPE, SHAPE, 16),
            lambda x: tl.tt_matrix_to_tensor(
                tensor_train_matrix(x.reshape(*SHAPE, *SHAPE), rank=[1, 16, 16, 1])
            ).reshape(1024, 1024),
        ),
    }
    print(
        "| decomposition | rel. error ours | rel. error tensorly | ratio | ours compile s "
        "| ours run ms | tensorly run ms | tensorly / ours time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (kind, ours, theirs) in cases.items():
        x64 = _low_rank(kind, seed=0)
        x32 = jnp.asarray(x64, jnp.float32)
        norm = np.linalg.norm(x64)
        start = time.perf_counter()
        result = jax.block_until_ready(ours(x32))
        compile_s = time.perf_counter() - start
        t_ours = _median_time(lambda f=ours, x=x32: f(x), repeats, 1)
        err_ours = np.linalg.norm(np.asarray(result.to_dense(), np.float64) - x64) / norm
        rec = theirs(x64)
        err_tl = np.linalg.norm(rec - x64) / norm
        t_tl = _median_time(lambda f=theirs, x=x64: f(x), max(3, repeats // 2), 1)
        print(
            f"| {name} | {err_ours:.5f} | {err_tl:.5f} | {err_ours / err_tl:.3f} "
            f"| {compile_s:.2f} | {t_ours * 1e3:.1f} | {t_tl * 1e3:.1f} | {t_tl / t_ours:.2f}x |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--part", choices=("all", "layers", "decompositions"), default="all")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    if args.part in ("all", "layers"):
        bench_layers(args.repeats)
    if args.part in ("all", "decompositions"):
        bench_decompositions(args.repeats)


if __name__ == "__main__":
    main()
