"""Properties of `factorize_params` / `densify_params`: a trained dense model's kernels become
the params of the factorized model (exact at full rank), cross-checked against tensorly."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorly as tl
from tensorly.decomposition import parafac, tensor_train, tucker

from tensornets import (
    LAYER_KEYS,
    SPEC_KEYS,
    Factorized,
    check_factorize_spec,
    densify_params,
    factorize_params,
)

KEY = jax.random.key(0, impl="rbg")  # fast-compiling PRNG for the many small inits


class Net(nn.Module):
    """Embedding -> conv (anisotropic stride, 2 groups) -> dense; optionally factorized."""

    factorize: dict | None = None

    def _maybe(self, make, name):
        f = (self.factorize or {}).get(name)
        if f is None:
            return make(name=name)
        # the wrapped module is detached (parent=None) so the wrapper can take its name
        return Factorized(make(parent=None), **f, name=name)

    @nn.compact
    def __call__(self, ids):
        h = self._maybe(functools.partial(nn.Embed, 24, 8), "emb")(ids)  # (B, L, 8)
        h = h.reshape(h.shape[0], 4, 3, 8)
        h = self._maybe(
            functools.partial(
                nn.Conv, 6, (3, 2), strides=(2, 1), padding="SAME", feature_group_count=2
            ),
            "conv",
        )(h)
        h = jax.nn.relu(h).reshape(h.shape[0], -1)
        return self._maybe(functools.partial(nn.Dense, 10), "fc")(h)


IDS = jnp.arange(24).reshape(2, 12) % 24


def _spec(full: bool, fc_format: str, conv_format: str):
    # full ranks: fc kernel tensor (6, 6, 2, 5): CP 360 / 6, Tucker (6, 6, 2, 5), TT bonds
    # (6, 10, 5); as TT-matrix (6, 6) x (2, 5): bond 12. Conv group kernel (3, 2, 4, 3):
    # CP 72 / 4, Tucker-2 (4, 3), TT-matrix (6, 4) x (1, 3): bond 6.
    fc_rank = {"cp": 60, "tucker": 6, "tt": 10, "tt_matrix": 12}[fc_format] if full else 2
    conv_rank = {"cp": 18, "tucker": 4, "tt": 6}[conv_format] if full else 1
    fc_shapes = dict(in_shape=(6, 6), out_shape=(2, 5))
    layers = {
        "emb": dict(format="tt_matrix", rank=8 if full else 2, in_shape=(4, 6), out_shape=(2, 4)),
        "conv": dict(format=conv_format, rank=conv_rank),
        "fc": dict(format=fc_format, rank=fc_rank, **fc_shapes),
    }
    spec = {k: dict(v) for k, v in layers.items()}
    spec["conv"]["feature_group_count"] = 2
    return layers, spec


@pytest.mark.parametrize(
    "fc_format, conv_format",
    [("cp", "cp"), ("tucker", "tucker"), ("tt", "tt"), ("tt_matrix", "cp")],
)
def test_full_rank_factorized_model_reproduces_the_dense_model(fc_format, conv_format):
    dense_params = jax.jit(Net().init)(KEY, IDS)["params"]
    layers, spec = _spec(True, fc_format, conv_format)
    model = Net(factorize=layers)
    params = factorize_params(dense_params, spec)
    expected_shapes = jax.tree.map(jnp.shape, jax.eval_shape(model.init, KEY, IDS)["params"])
    assert jax.tree.map(jnp.shape, params) == expected_shapes
    y_dense = jax.jit(Net().apply)({"params": dense_params}, IDS)
    y = jax.jit(model.apply)({"params": params}, IDS)
    np.testing.assert_allclose(y, y_dense, atol=2e-4, rtol=1e-3)
    # and back: densify recovers the dense kernels
    back = densify_params(
        params,
        {
            **spec,
            "emb": {**spec["emb"], "kind": "embed"},
            "conv": {**spec["conv"], "kernel_size": (3, 2)},
        },
    )
    for path in ("emb", "conv", "fc"):
        for name, leaf in dense_params[path].items():
            np.testing.assert_allclose(back[path][name], leaf, atol=1e-4)


def test_low_rank_params_load_and_fine_tune():
    dense_params = jax.jit(Net().init)(KEY, IDS)["params"]
    layers, spec = _spec(False, "tt_matrix", "tucker")
    model = Net(factorize=layers)
    params = factorize_params({"params": dense_params}, spec)["params"]
    loss = lambda p: jnp.mean(model.apply({"params": p}, IDS) ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_kernel_errors_match_tensorly():
    rng = np.random.default_rng(0)
    # a trained-like kernel: low-rank structure plus noise
    kernel = (
        rng.standard_normal((36, 4)) @ rng.standard_normal((4, 10))
        + 0.3 * rng.standard_normal((36, 10))
    ).astype(np.float32)
    params = {"fc": {"kernel": kernel, "bias": np.zeros(10, np.float32)}}
    tensor = kernel.reshape(6, 6, 2, 5).astype(np.float64)
    assert tl.get_backend() == "numpy"
    refs = {
        "cp": tl.cp_to_tensor(parafac(tensor, 6, init="svd")),
        "tucker": tl.tucker_to_tensor(tucker(tensor, rank=[3, 3, 2, 3])),
        "tt": tl.tt_to_tensor(tensor_train(tensor, rank=[1, 3, 4, 2, 1])),
    }
    ranks = {"cp": 6, "tucker": (3, 3, 2, 3), "tt": (3, 4, 2)}
    for fmt, ref in refs.items():
        spec = {"fc": dict(format=fmt, rank=ranks[fmt], in_shape=(6, 6), out_shape=(2, 5))}
        ours = densify_params(factorize_params(params, spec), spec)["fc"]["kernel"]
        ref_err, our_err = _rel(ref.reshape(36, 10), kernel), _rel(ours, kernel)
        assert our_err <= 1.05 * ref_err, (fmt, our_err, ref_err)
    # the input tree is untouched (pure)
    assert set(params["fc"]) == {"kernel", "bias"}


def test_rename_and_errors():
    params = {"Dense_0": {"kernel": np.ones((6, 4), np.float32), "bias": np.zeros(4, np.float32)}}
    out = factorize_params(params, {"Dense_0": {"format": "cp", "rank": 1, "to": "Factorized_0"}})
    assert set(out) == {"Factorized_0"} and set(out["Factorized_0"]) == {
        "weights",
        "factor_0",
        "factor_1",
        "bias",
    }
    with pytest.raises(ValueError, match=r"no module at parameter path 'Dense_1'.*Dense_0"):
        factorize_params(params, {"Dense_1": {"format": "cp", "rank": 1}})
    with pytest.raises(ValueError, match="unknown keys"):
        factorize_params(params, {"Dense_0": {"format": "cp", "rank": 1, "ranks": 2}})
    with pytest.raises(ValueError, match="needs 'rank'"):
        factorize_params(params, {"Dense_0": {"format": "cp"}})
    with pytest.raises(ValueError, match=r"in_shape=\(4, 2\) multiplies to 8"):
        factorize_params(params, {"Dense_0": {"format": "tt", "rank": 1, "in_shape": (4, 2)}})
    with pytest.raises(ValueError, match="rank=7 is larger"):
        factorize_params(params, {"Dense_0": {"format": "cp", "rank": 7}})


# (entry of spec["fc"], the key the message must name, the offending value as it shows it)
BAD_ENTRIES = [
    ({"format": "cp", "rank": 1, "ranks": 2}, "ranks", "['ranks']"),
    ({"format": "cp"}, "rank", "needs 'rank'"),
    ({"rank": 1}, "format", "needs 'format'"),
    ({"format": "svd", "rank": 1}, "format", "'svd'"),
    ({"format": "cp", "rank": 1, "kind": "lstm"}, "kind", "'lstm'"),
    ({"format": "tubal", "rank": 1, "kind": "conv"}, "format", "'tubal'"),
    ({"format": "cp", "rank": 1, "kind": "embed"}, "format", "'cp'"),
    ({"format": "low_rank", "rank": 1, "in_shape": (2, 3)}, "in_shape", "(2, 3)"),
    ({"format": "low_rank", "rank": 1, "out_shape": [4]}, "out_shape", "[4]"),
    (("cp", 1), "spec['fc']", "('cp', 1)"),
    ({"format": "cp", "rank": 1, "contraction": "fast"}, "contraction", "'fast'"),
    ({"format": "cp", "rank": 1, "rank_dropout": 1.5}, "rank_dropout", "1.5"),
]


@pytest.mark.parametrize("entry, key, shown", BAD_ENTRIES)
def test_spec_validator_refuses_bad_entries_naming_the_key(entry, key, shown):
    for check in (
        lambda: check_factorize_spec({"fc": entry}),
        lambda: factorize_params({"fc": {"kernel": np.ones((6, 4), np.float32)}}, {"fc": entry}),
    ):
        with pytest.raises(ValueError) as info:
            check()
        message = str(info.value)
        assert "spec['fc']" in message and key in message and shown in message, message


def test_spec_validator_checks_the_keys_and_layers_it_is_given():
    good = {"fc": {"format": "low_rank", "rank": 2, "contraction": "dense"}}
    assert check_factorize_spec(good) == good
    assert set(LAYER_KEYS) < set(SPEC_KEYS)
    with pytest.raises(ValueError, match=r"model\['fc'\] has unknown keys \['to'\]"):
        check_factorize_spec(
            {"fc": {"format": "cp", "rank": 1, "to": "g"}}, name="model", keys=LAYER_KEYS
        )
    with pytest.raises(
        ValueError, match=r"spec names 'fc2', which is not one of the layers \['fc'\]"
    ):
        check_factorize_spec({"fc2": {"format": "cp", "rank": 1}}, kinds={"fc": "dense"})
    with pytest.raises(
        ValueError, match=r"spec\['c'\]: .*nn.Conv, got 'low_rank'.*nn.Dense, nn.Embed"
    ):
        check_factorize_spec({"c": {"format": "low_rank", "rank": 1}}, kinds={"c": "conv"})
    with pytest.raises(ValueError, match=r"spec must be a mapping"):
        check_factorize_spec([("fc", {"format": "cp", "rank": 1})])
    # densify needs only the format, and checks the keys as factorize does
    assert check_factorize_spec({"fc": {"format": "cp"}}, required=("format",))
    with pytest.raises(ValueError, match="unknown keys"):
        densify_params({"fc": {"kernel": np.ones((6, 4))}}, {"fc": {"format": "cp", "rnk": 1}})
