"""Sparse-IFT families: iso-FLOP (the FLOP check), shapes from the paper's formulas, masks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models, sparse_ift
from sparsejax import algorithms, flops, masks

X = sparse_ift.example_input()


def _masks(params, sparsity, key=1):
    algo = algorithms.get(
        "static", sparsity=sparsity, distribution="uniform", keep_dense=sparse_ift.KEEP_DENSE
    )
    return algo.init_masks(params, jax.random.key(key))


def _count_masks(shapes, sparsity):
    """Masks with the algorithm's per-leaf sparsities and exact counts, from shapes alone."""
    algo = algorithms.get(
        "static", sparsity=sparsity, distribution="uniform", keep_dense=sparse_ift.KEEP_DENSE
    )

    def one(s, p):
        if s is None:
            return None
        flat = np.zeros(math.prod(p.shape), bool)
        flat[: masks.num_kept(flat.size, s)] = True
        return flat.reshape(p.shape)

    return jax.tree.map(one, algo.layer_sparsities(shapes), shapes, is_leaf=masks.is_none)


def _flops(features, family, sparsity):
    model = sparse_ift.SparseIFTMLP(features=features, family=family, sparsity=sparsity)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), X))["params"]
    tree = None if family in ("dense", "sltrain") else _count_masks(shapes, sparsity)
    return sparse_ift.model_flops(model, shapes, X, tree)


_CASES = [((128, 128, 128), 0.98, s) for s in (0.5, 0.75, 0.9)] + [((48, 24), 0.9, 0.75)]


@pytest.mark.parametrize("features, low, sparsity", _CASES)
@pytest.mark.parametrize("family", ["wide", "parallel", "factorized", "doped", "sltrain"])
def test_every_family_costs_the_dense_flops(features, low, sparsity, family):
    """The FLOP check: at most the dense model's FLOPs, and within rounding of them.

    Each family takes the largest integer width / branch count / inner width / rank
    that fits, so it falls short by less than one unit: within 2% at the table's
    sizes, within 10% for tiny layers (one rank of a 32-wide layer is 6% of it).
    """
    dense = _flops(features, "dense", 0.0)
    # The dense count agrees with the plain formula sum 2 d_in d_out + d_out.
    dims = (40, *features, 10)
    want = sum(2 * a * b + b for a, b in zip(dims, dims[1:], strict=False))
    assert dense["total"] == want
    ratio = _flops(features, family, sparsity)["total"] / dense["total"]
    assert low <= ratio <= 1.0, (family, sparsity, ratio)


def test_shapes_follow_the_paper_formulas():
    s, w = 0.75, 64
    shapes = {f: sparse_ift.block_shapes((w, w, w), f, s, 40, 10) for f in sparse_ift.FAMILIES[1:]}
    # Parallel: K = 1/(1 - s) branches.
    assert all(b["branches"] == 4 for b in shapes["parallel"]["blocks"])
    # Factorized: d = d_in d_out / ((1 - s)(d_in + d_out)) = w / (2 (1 - s)).
    assert all(b["inner"] == int(w / (2 * (1 - s))) for b in shapes["factorized"]["blocks"])
    # Doped: r ~ s d_in d_out / (d_in + d_out) = s w / 2 (minus CP's diag weights).
    expected_rank = s * w / 2
    for family in ("doped", "sltrain"):
        for b in shapes[family]["blocks"]:
            assert expected_rank - 2 <= b["rank"] <= expected_rank
    # Wide: k solves the whole-model iso-FLOP equation a k + b k^2 + 10 = F_dense, where the
    # widened dense stem and head (and the biases) grow like k and the two sparse
    # hidden-to-hidden kernels like k^2; without stem and head it would be 1/sqrt(1 - s).
    dense = (2 * 40 * w + w) + 2 * (2 * w * w + w) + (2 * w * 10 + 10)
    a, b = (2 * 40 * w + w) + 2 * w + 2 * w * 10, 2 * 2 * (1 - s) * w * w
    k_star = (-a + math.sqrt(a * a + 4 * b * (dense - 10))) / (2 * b)
    k = shapes["wide"]["widths"][0] / w
    assert 1.0 < k <= 1.0 / math.sqrt(1 - s)
    assert abs(k - k_star) <= 2 / w, (k, k_star)


def test_masks_sparsify_only_the_transformed_kernels_at_the_exact_count():
    s = 0.9
    for family in ("parallel", "doped"):
        model = sparse_ift.SparseIFTMLP(features=(32, 32, 32), family=family, sparsity=s)
        params = jax.jit(model.init)(jax.random.key(0), X)["params"]
        tree = _masks(params, s)
        names = {
            "/".join(str(getattr(k, "key", k)) for k in path): m
            for path, m in jax.tree_util.tree_leaves_with_path(tree, is_leaf=masks.is_none)
        }
        for name, m in names.items():
            dense_part = any(k in name for k in sparse_ift.KEEP_DENSE) or name.endswith("bias")
            if dense_part:
                assert m is None, name
            else:
                assert m is not None and int(m.sum()) == masks.num_kept(m.size, s), name
        assert any(m is not None for m in names.values())


def test_flops_follow_the_masks_and_count_the_low_rank_part():
    model = sparse_ift.SparseIFTMLP(features=(32, 32), family="doped", sparsity=0.5)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), X))["params"]
    tree = _count_masks(params, 0.5)
    got = sparse_ift.model_flops(model, params, X, tree)
    rank = params["block_1"]["lowrank"]["factor_0"].shape[1]
    layers = flops.layer_flops(model.apply, {"params": params}, X)
    assert got["dense_layers"] == flops.inference_flops(layers, tree)["total"]
    # x A (2 * 32 r), the diagonal weights (r), then B^T (2 * r * 32).
    assert got["factorized_layers"] == 2 * 32 * rank + rank + 2 * rank * 32
    assert sparse_ift.model_flops(model, params, X)["dense_layers"] > got["dense_layers"]


def test_outputs_and_the_parallel_block_is_the_sum_of_its_branches():
    x = jax.random.normal(jax.random.key(3), (5, 40, 1))
    for family in sparse_ift.FAMILIES:
        s = 0.0 if family == "dense" else 0.75
        model = models.get_model("sparse_ift_mlp", features=[16, 16], family=family, sparsity=s)
        y = jax.eval_shape(lambda m=model: m.apply(m.init(jax.random.key(0), x), x))
        assert y.shape == (5, 10) and y.dtype == jnp.float32
    # Parallel: the block is the sum of its branches (one bias).
    model = sparse_ift.SparseIFTMLP(features=(16, 16), family="parallel", sparsity=0.5)
    params = model.init(jax.random.key(0), x)["params"]
    block = params["block_1"]
    assert set(block) == {"branch_0", "branch_1"} and "bias" not in block["branch_1"]
    summed = block["branch_0"]["kernel"] + block["branch_1"]["kernel"]
    h = jax.nn.relu(x.reshape(5, -1) @ params["stem"]["kernel"] + params["stem"]["bias"])
    want = jax.nn.relu(h @ summed + block["branch_0"]["bias"])
    want = want @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(
        np.asarray(model.apply({"params": params}, x)), np.asarray(want), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"family": "tall"}, "family='tall'"),
        ({"family": "wide", "sparsity": 1.0}, "sparsity"),
        ({"family": "wide", "sparsity": 0.0}, "sparsity"),
        ({"family": "dense", "sparsity": 0.5}, "sparsity"),
        ({"features": (32,)}, "features"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sparse_ift.SparseIFTMLP(**kwargs).init(jax.random.key(0), X)


def test_config_builds_the_model_and_the_algorithm():
    from configs import sparse_ift_mnist1d
    from experiments import models

    for arg in (None, "runlocal"):
        config = sparse_ift_mnist1d.get_config(arg)
        model = models.make_model(config, num_classes=10)
        assert isinstance(model, sparse_ift.SparseIFTMLP) and model.family == "wide"
        algo = algorithms.from_config(config.sparsity, config.total_steps)
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), X))["params"]
        sparsities = algo.layer_sparsities(shapes)
        assert sparsities["block_1"]["dense"]["kernel"] == 0.9
        assert sparsities["stem"]["kernel"] is None and sparsities["head"]["kernel"] is None
