"""Properties of `tensornets.rank`: rank masks inside the layers, and compact().

compact() must give the masked model's outputs (float32, up to summation order:
atol 1e-5 on outputs of order 1) with strictly fewer parameters."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensornets import Factorized, FactorizedConv, FactorizedDense, FactorizedEmbedding
from tensornets import rank as R

KEY = jax.random.key(0, impl="rbg")
ATOL = 1e-5

DENSE_CASES = [
    ("cp", 6, None, None),
    ("cp", 5, (4, 3), (2, 5)),
    ("tucker", (4, 4), None, None),
    ("tucker", 3, (4, 3), (2, 5)),
    ("tt", 4, (4, 3), (2, 5)),
    ("tt_matrix", 4, (4, 3), (2, 5)),
    ("tubal", 3, (6, 2), (5, 2)),
]


def _drop_every_other(rm):
    """Kills components 1, 3, 5, ... of every axis (component 0 stays live)."""
    return {k: jnp.arange(v.size) % 2 == 0 for k, v in rm.items()}


def _size(tree):
    return sum(int(np.size(v)) for v in jax.tree.leaves(tree))


@pytest.mark.parametrize("fmt,rank,in_shape,out_shape", DENSE_CASES)
def test_compact_dense_matches_masked_model(fmt, rank, in_shape, out_shape):
    x = jax.random.normal(KEY, (7, 12))
    layer = FactorizedDense(10, fmt, rank, in_shape=in_shape, out_shape=out_shape)
    params = {"l": layer.init(KEY, x)["params"]}
    rm = {"l": _drop_every_other(R.init_rank_masks(params)["l"])}
    masked_out = layer.apply({"params": params["l"], "rank_masks": rm["l"]}, x)
    # The collection inside the layer == zeroing the params beforehand (full or gate only).
    for gate_only in (False, True):
        pre = R.apply_rank_masks(params, rm, gate_only=gate_only)["l"]
        np.testing.assert_array_equal(layer.apply({"params": pre}, x), masked_out)

    small = FactorizedDense(
        10, fmt, R.compact_ranks(rm)["l"], in_shape=in_shape, out_shape=out_shape
    )
    compacted = R.compact(params, rm)
    shapes = jax.tree.map(jnp.shape, small.init(KEY, x)["params"])
    assert jax.tree.map(jnp.shape, compacted["l"]) == shapes
    np.testing.assert_allclose(small.apply({"params": compacted["l"]}, x), masked_out, atol=ATOL)
    assert _size(compacted) < _size(params)
    assert _size(compacted) == int(R.num_live_params(params, rm))


@pytest.mark.parametrize("fmt,rank", [("cp", 5), ("tucker", (3, 4)), ("tt", 3)])
def test_compact_grouped_conv_matches_masked_model(fmt, rank):
    x = jax.random.normal(KEY, (2, 9, 6))
    layer = FactorizedConv(8, (3,), fmt, rank, feature_group_count=2, padding=((1, 1),))
    params = {"c": layer.init(KEY, x)["params"]}
    rm = {"c": _drop_every_other(R.init_rank_masks(params)["c"])}
    masked_out = layer.apply({"params": params["c"], "rank_masks": rm["c"]}, x)
    small = FactorizedConv(
        8, (3,), fmt, R.compact_ranks(rm)["c"], feature_group_count=2, padding=((1, 1),)
    )
    compacted = R.compact(params, rm)
    np.testing.assert_allclose(small.apply({"params": compacted["c"]}, x), masked_out, atol=ATOL)
    assert _size(compacted) < _size(params)
    assert _size(compacted) == int(R.num_live_params(params, rm))


def test_embedding_reads_rank_masks():
    emb = FactorizedEmbedding(24, 12, rank=4, in_shape=(2, 3, 4), out_shape=(2, 3, 2))
    ids = jnp.arange(24)
    params = emb.init(KEY, ids)["params"]
    rm = _drop_every_other(R.init_rank_masks({"e": params})["e"])
    out = emb.apply({"params": params, "rank_masks": rm}, ids)
    pre = R.apply_rank_masks({"e": params}, {"e": rm})["e"]
    np.testing.assert_array_equal(out, emb.apply({"params": pre}, ids))
    assert not np.allclose(out, emb.apply({"params": params}, ids))


def test_all_dead_axis_keeps_one_zero_component():
    x = jax.random.normal(KEY, (5, 12))
    layer = FactorizedDense(10, "cp", 4)
    params = {"l": layer.init(KEY, x)["params"]}
    rm = {"l": {"rank": jnp.zeros(4, bool)}}
    compacted = R.compact(params, rm)
    assert compacted["l"]["weights"].shape == (1,)
    np.testing.assert_array_equal(compacted["l"]["weights"], 0.0)
    out = FactorizedDense(10, "cp", 1).apply({"params": compacted["l"]}, x)
    np.testing.assert_array_equal(out, jnp.broadcast_to(params["l"]["bias"], out.shape))


@settings(max_examples=8, deadline=None)
@given(
    rank=st.integers(2, 8),
    bits=st.lists(st.booleans(), min_size=8, max_size=8),
    gate_only=st.booleans(),
)
def test_param_masks_roundtrip_and_live_count(rank, bits, gate_only):
    x = jnp.ones((1, 12))
    params = {"l": FactorizedDense(10, "cp", rank).init(KEY, x)["params"]}
    live = jnp.asarray(bits[:rank]).at[0].set(True)
    rm = {"l": {"rank": live}}
    pm = R.param_masks(params, rm, gate_only=gate_only)
    assert pm["l"]["bias"] is None
    assert pm["l"]["weights"].shape == (rank,)
    assert (pm["l"]["factor_0"] is None) == gate_only
    back = R.rank_masks_from_param_masks(pm, params)
    np.testing.assert_array_equal(back["l"]["rank"], live)
    count = jax.jit(R.num_live_params)(params, rm)
    assert int(count) == int(live.sum()) * (12 + 10 + 1) + 10


def test_rank_masks_of_a_model_skip_dense_layers():
    params = {
        "dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
        "tt": {"core_0": jnp.ones((1, 4, 3)), "core_1": jnp.ones((3, 5, 1))},
    }
    rm = R.init_rank_masks(params, live=2)
    assert set(rm) == {"tt"}
    np.testing.assert_array_equal(rm["tt"]["bond_0"], [True, True, False])
    pm = R.param_masks(params, rm)
    assert pm["dense"] == {"kernel": None, "bias": None}
    np.testing.assert_array_equal(pm["tt"]["core_0"][0, 0], [True, True, False])
    np.testing.assert_array_equal(pm["tt"]["core_1"][:, 0, 0], [True, True, False])


def test_bad_rank_masks_raise():
    x = jnp.ones((1, 12))
    params = {"l": FactorizedDense(10, "cp", 4).init(KEY, x)["params"]}
    with pytest.raises(ValueError, match="shape"):
        R.param_masks(params, {"l": {"rank": jnp.ones(3, bool)}})
    with pytest.raises(ValueError, match="axes"):
        R.compact(params, {"l": {"bond_0": jnp.ones(4, bool)}})
    with pytest.raises(ValueError, match="live"):
        R.init_rank_masks(params, live=0)
    layer = FactorizedDense(10, "tucker", 3)
    p = layer.init(KEY, x)["params"]
    with pytest.raises(ValueError, match="rank_masks"):
        layer.apply({"params": p, "rank_masks": {"rank_0": jnp.ones(3, bool)}}, x)


def test_rank_masks_collection_reaches_layers_inside_a_model():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = Factorized(
                nn.Dense(16),
                format="tt_matrix",
                rank=3,
                in_shape=(3, 4),
                out_shape=(4, 4),
                name="a",
            )(x)
            return Factorized(nn.Dense(5), format="cp", rank=4, name="b")(nn.relu(x))

    net, x = Net(), jax.random.normal(KEY, (2, 12))
    params = net.init(KEY, x)["params"]
    rm = {k: _drop_every_other(v) for k, v in R.init_rank_masks(params).items()}
    assert set(rm) == {"a", "b"}
    out = net.apply({"params": params, "rank_masks": rm}, x)
    np.testing.assert_array_equal(out, net.apply({"params": R.apply_rank_masks(params, rm)}, x))
    assert not np.allclose(out, net.apply({"params": params}, x))
