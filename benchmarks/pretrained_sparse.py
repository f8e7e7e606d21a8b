"""Sparse execution of a pruned all-MiniLM-L6-v2: N:M and BSR kernels against dense, one run.

    python benchmarks/pretrained_sparse.py                        # 5-10 minutes on 2 CPU cores
    python benchmarks/pretrained_sparse.py --sentences=32 --batch-size=16 --rounds=3
    python benchmarks/pretrained_sparse.py --method=wanda --blocks 32x32@0.5 16x16@0.9

Prunes every encoder projection (36 Dense kernels) of all-MiniLM-L6-v2 twice:

  2:4        `sparsejax.posttrain.prune_model` (``--method``: magnitude, or wanda calibrated on
             ``--calibration`` windows of the corpus, a block of projections at a time),
             exported with `sparsejax.export` to `pallas_kernels.NM` (values and positions
             along each kernel's input axis);
  RxC@s      whole R x C blocks dropped by block score (`sparsejax.posttrain.prune_model`
             with ``block_shape``, a fraction s of the blocks), exported to `pallas_kernels.BSR`;

then embeds ``--sentences`` held-out passages of the corpus with `experiments.pretrained.embed`:
the dense model, each masked dense model (zeros stored densely: what a pruned checkpoint
runs), and each exported model under `sparsejax.nn.sparse_dense_calls` (``--impl``: 'auto'
is the XLA path on CPU and the Pallas kernels on TPU/GPU). The exported embeddings must equal
the masked dense ones within ``--atol`` (float32 summation order differs), else the script
exits with status 1.

Timing: each variant is warmed up (compiled) once, then the variants are called in turn
``--rounds`` times (interleaved, so machine noise hits all alike) and each one's median is
kept. ``vs dense`` is sentences per second over the dense model's (above 1 is faster).
On CPU an N:M kernel is rebuilt into a dense matrix before a dense GEMM, so 2:4 is expected
to be *slower* than dense there; block sparsity pays only at high block sparsity.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import pretrained
from experiments.pretrained import compression, corpus
from sparsejax import export, posttrain
from sparsejax import nn as snn


def _block_variant(text: str) -> tuple[tuple[int, int], float]:
    """``"32x32@0.7"`` -> ((32, 32), 0.7)."""
    block, _, sparsity = text.partition("@")
    try:
        return compression.parse_block_structure(block, "--blocks"), float(sparsity)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: want RxC@sparsity, {error}") from None


def _kernel(tree, name: str):
    for key in name.split("/"):
        tree = tree[key]
    return tree["kernel"]


def _kept_fraction(mask_tree, layers) -> float:
    leaves = [np.asarray(_kernel(mask_tree, n)) for n in layers]
    return float(sum(m.sum() for m in leaves) / sum(m.size for m in leaves))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=64, help="held-out passages embedded")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--method", choices=("magnitude", "wanda"), default="magnitude")
    parser.add_argument("--calibration", type=int, default=32, help="windows of 64 tokens")
    parser.add_argument(
        "--blocks",
        nargs="*",
        type=_block_variant,
        default=[((32, 32), 0.7), ((16, 16), 0.9)],
        help="block variants RxC@sparsity (fraction of blocks dropped)",
    )
    parser.add_argument("--no-nm", action="store_true", help="skip the 2:4 variant")
    parser.add_argument("--impl", default="auto", help="auto | xla | pallas | pallas_interpret")
    parser.add_argument("--atol", type=float, default=1e-5)
    args = parser.parse_args()

    model, params, tokenizer = pretrained.load("all-MiniLM-L6-v2")
    layers = pretrained.dense_layer_names(model.config)
    sentences = corpus.evaluation_passages(n=args.sentences)
    ids = jnp.asarray(corpus.calibration_ids(tokenizer, n=args.calibration, length=64))
    print(
        f"backend {jax.default_backend()}, impl {args.impl}, {len(sentences)} passages, "
        f"batch {args.batch_size}, {len(layers)} pruned projections, method {args.method}"
    )

    # name -> (masked dense params, exported params, mask tree, format)
    variants = {}
    if not args.no_nm:
        start = time.perf_counter()
        result = posttrain.prune_model(
            model.apply, params, ids, method=args.method, n=2, m=4, block_depth=2
        )
        exported = export.export(result.params, result.masks, format="nm", n=2, m=4)
        variants["2:4"] = (result.params, exported, result.masks, "nm")
        print(f"2:4 pruned and exported in {time.perf_counter() - start:.1f} s")
    for block, sparsity in args.blocks:
        start = time.perf_counter()
        result = posttrain.prune_model(
            model.apply,
            params,
            ids,
            method=args.method,
            sparsity=sparsity,
            block_shape=block,
            block_depth=2,
        )
        exported = export.export(result.params, result.masks, format="bsr", block_shape=block)
        name = f"{block[0]}x{block[1]}@{sparsity:g}"
        variants[name] = (result.params, exported, result.masks, "bsr")
        print(f"{name} pruned and exported in {time.perf_counter() - start:.1f} s")

    def embed_dense(p):
        return lambda: pretrained.embed(model, p, tokenizer, sentences, batch_size=args.batch_size)

    def embed_sparse(p):
        def run():
            with snn.sparse_dense_calls(impl=args.impl):
                return pretrained.embed(model, p, tokenizer, sentences, batch_size=args.batch_size)

        return run

    calls = {"dense": embed_dense(params)}
    for name, (masked, exported, _, _) in variants.items():
        calls[f"{name} masked dense"] = embed_dense(masked)
        calls[f"{name} sparse"] = embed_sparse(exported)

    # Warm-up (compilation), which also gives the embeddings to compare.
    outputs = {key: np.asarray(fn()) for key, fn in calls.items()}
    times = {key: [] for key in calls}
    for _ in range(args.rounds):
        for key, fn in calls.items():
            began = time.perf_counter()
            jax.block_until_ready(fn())
            times[key].append(time.perf_counter() - began)
    rate = {key: len(sentences) / statistics.median(v) for key, v in times.items()}

    header = (
        f"{'variant':<22} {'format':<6} {'kept':>6} {'bytes':>6} {'sent/s':>8} "
        f"{'vs dense':>8} {'max |diff|':>10} {'fidelity':>8}"
    )
    print()
    print(header)
    print("-" * len(header))
    print(f"{'dense':<22} {'dense':<6} {1:>6.3f} {1:>6.3f} {rate['dense']:>8.1f} {1:>8.2f}")
    failed = []
    for name, (_, exported, mask_tree, fmt) in variants.items():
        stored = export.storage_summary(exported)
        bytes_ratio = sum(s["bytes"] for s in stored.values()) / sum(
            s["dense_bytes"] for s in stored.values()
        )
        kept = _kept_fraction(mask_tree, layers)
        dense_out = outputs[f"{name} masked dense"]
        diff = float(np.max(np.abs(outputs[f"{name} sparse"] - dense_out)))
        fidelity = corpus.fidelity(outputs["dense"], dense_out)
        for label, key in (("masked dense", f"{name} masked dense"), (fmt, f"{name} sparse")):
            r = rate[key]
            shown = f"{name} {'masked' if label == 'masked dense' else 'sparse'}"
            print(
                f"{shown:<22} {('dense' if label == 'masked dense' else fmt):<6} {kept:>6.3f} "
                f"{(1.0 if label == 'masked dense' else bytes_ratio):>6.3f} {r:>8.1f} "
                f"{r / rate['dense']:>8.2f}"
                + (f" {diff:>10.1e} {fidelity:>8.4f}" if label != "masked dense" else "")
            )
        if not diff <= args.atol:
            failed.append(f"{name}: max |sparse - masked dense| = {diff:.2e} > {args.atol}")
    print(
        "\nkept: fraction of projection weights kept; bytes: stored bytes of the projections over "
        "dense float32; fidelity: mean cosine to the unpruned model's embeddings."
    )
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
