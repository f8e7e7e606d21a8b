"""Factorizing a pretrained BERT at a parameter budget and healing it by distillation."""

from __future__ import annotations

import math

import chex
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import pretrained
from experiments.pretrained import distill

MODEL = "all-MiniLM-L6-v2"
# A 2-layer BERT with MiniLM's vocabulary (so the real tokenizer drives it), random weights:
# small enough that decomposing and running it costs milliseconds.
TINY = pretrained.BertConfig(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
)
SENTENCES = ["The weather is lovely today.", "He drove to the stadium.", "a b c"]


@pytest.fixture(scope="module")
def minilm():
    return pretrained.load(MODEL)


@pytest.fixture(scope="module")
def tiny():
    model = pretrained.BertModel(TINY)

    @jax.jit
    def init(key):
        params = model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
        # Biases and LayerNorms away from their init values, so a dropped or swapped leaf
        # shows.
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        noise = [0.1 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)]
        return jax.tree.unflatten(tree, [a + n for a, n in zip(leaves, noise)])

    return model, init(jax.random.key(0))


def _flat(params):
    return flax.traverse_util.flatten_dict(params, sep="/")


@pytest.mark.parametrize("fmt", distill.DISTILL_FORMATS)
@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_minilm_kernels_get_the_largest_uniform_rank_within_the_budget(fmt, budget):
    config = pretrained.BertConfig()  # MiniLM's dimensions: 6 layers, 384 -> 1536 -> 384
    factorize = distill.budget_factorization(config, format=fmt, budget=budget)
    assert list(factorize) == distill.projection_names(config, "mlp")
    assert len(factorize) == 12
    for path, count in distill.kernel_parameters(config, factorize).items():
        # Within the budget, and close to it: one rank step more would not fit, and for
        # these shapes that step is under 3% of the kernel.
        assert count["factorized"] <= budget * count["dense"], path
        assert count["factorized"] >= 0.97 * budget * count["dense"], (path, count)


@pytest.mark.parametrize("fmt", distill.DISTILL_FORMATS)
def test_factorized_params_are_what_the_count_says_and_the_rest_is_untouched(tiny, fmt):
    model, params = tiny
    # One projection of each shape, named explicitly: (48, 48), (48, 96) and (96, 48).
    layers = [
        "encoder/layer_0/attention/self/value",
        "encoder/layer_1/intermediate/dense",
        "encoder/layer_1/output/dense",
    ]
    student, student_params, factorize = distill.factorize_projections(
        model, params, layers=layers, format=fmt, budget=0.5
    )
    assert list(factorize) == layers
    counts = distill.kernel_parameters(TINY, factorize)
    flat, dense_flat = _flat(student_params), _flat(params)
    for path, count in counts.items():
        factors = {k: v for k, v in flat.items() if k.startswith(path + "/")}
        assert "kernel" not in {k.rsplit("/", 1)[1] for k in factors}
        entries = sum(v.size for k, v in factors.items() if not k.endswith("/bias"))
        assert entries == count["factorized"] <= 0.5 * count["dense"]
        np.testing.assert_array_equal(factors[path + "/bias"], dense_flat[path + "/bias"])
    for key, value in flat.items():
        if not any(key.startswith(p + "/") for p in factorize):
            assert value is dense_flat[key], key
    ids = jnp.ones((2, 8), jnp.int32)
    out = jax.jit(student.apply)({"params": student_params}, ids)
    assert out.shape == (2, 8, 48) and bool(jnp.all(jnp.isfinite(out)))


def test_full_rank_low_rank_reproduces_the_dense_embeddings(minilm, tiny):
    _, _, tokenizer = minilm
    model, params = tiny
    # min(in, out) = 48 for every projection of the tiny model: exact up to float32 rounding.
    student, student_params, factorize = distill.factorize_projections(
        model, params, layers="all", format="low_rank", rank=48
    )
    assert {e["rank"] for e in factorize.values()} == {48}
    dense = pretrained.embed(model, params, tokenizer, SENTENCES)
    factorized = pretrained.embed(student, student_params, tokenizer, SENTENCES)
    np.testing.assert_allclose(factorized, dense, atol=1e-4)


def test_distill_lowers_the_loss_and_leaves_frozen_params_bitwise_unchanged(minilm, tiny):
    _, _, tokenizer = minilm
    model, params = tiny
    student, student_params, _ = distill.factorize_projections(
        model, params, format="tt_matrix", budget=0.25, blocks=[1]
    )
    data = distill.distillation_data(model, params, tokenizer, n_windows=16, length=16)
    assert data.ids.shape == (16, 16) and data.targets.shape == (16, 48)
    np.testing.assert_allclose(np.linalg.norm(data.targets, axis=1), 1.0, atol=1e-5)
    ids, targets = jnp.asarray(data.ids), jnp.asarray(data.targets)
    loss = jax.jit(lambda p: distill.distillation_loss(student, p, ids, targets))
    before = float(loss(student_params))
    kwargs = dict(steps=8, batch_size=8, length=16, learning_rate=1e-2, warmup_steps=0, data=data)
    result = distill.distill(
        jax.random.key(0), student, student_params, model, params, tokenizer, **kwargs
    )
    after = float(loss(result.params))
    assert 0 < after < before
    assert result.losses.shape == (8,) and np.isfinite(result.losses).all()
    assert result.traces == 1
    trained = ("encoder/layer_1/intermediate/dense/", "encoder/layer_1/output/dense/")
    new, old = _flat(result.params), _flat(student_params)
    assert new.keys() == old.keys()
    for key, value in new.items():
        if key.startswith(trained):
            assert not np.array_equal(value, old[key]), key
        else:
            assert value is old[key], key  # the very array: bitwise unchanged
    # The input params are still usable (the step donates only its own copies).
    assert float(loss(student_params)) == before

    # Another seed reuses the compiled step (no new trace) and draws other batches.
    again = distill.distill(
        jax.random.key(1), student, student_params, model, params, tokenizer, **kwargs
    )
    assert again.traces == 0
    assert not np.array_equal(again.losses, result.losses)


def test_the_step_traces_once(tiny):
    model, params = tiny
    student, student_params, factorize = distill.factorize_projections(
        model, params, format="low_rank", budget=0.5
    )
    flat = _flat(student_params)
    trainable = {k: v for k, v in flat.items() if k.startswith(tuple(factorize))}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    optimizer = optax.adamw(1e-3)
    step = jax.jit(chex.assert_max_traces(distill.make_distill_step(student, optimizer, 2), n=1))
    ids = jnp.ones((4, 8), jnp.int32)
    targets = jnp.ones((4, 48)) / math.sqrt(48)
    opt_state = optimizer.init(trainable)
    for i in range(3):
        trainable, opt_state, loss = step(
            trainable, frozen, opt_state, ids, targets, jax.random.key(0), i
        )
        assert np.isfinite(float(loss))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"format": "cp"}, "format must be one of"),
        ({"format": "TT"}, "format must be one of"),
        ({"budget": 0.0}, r"budget must be a fraction in \(0, 1\]"),
        ({"budget": 1.5}, "budget"),
        ({"budget": float("nan")}, "budget"),
        ({"budget": True}, "budget"),
        ({"layers": "mlpx"}, "layers must be one of"),
        ({"layers": ["encoder/layer_9/intermediate/dense"]}, "layers names"),
        ({"layers": "mlp", "blocks": [2]}, "blocks must hold layer indices"),
        ({"format": "low_rank", "rank": 49}, "rank=49 for encoder/layer_0"),
    ],
)
def test_bad_factorization_arguments_are_value_errors_naming_them(tiny, kwargs, match):
    model, params = tiny
    with pytest.raises(ValueError, match=match):
        distill.factorize_projections(model, params, **kwargs)


def test_bad_distillation_arguments_are_value_errors_naming_them(minilm, tiny):
    _, _, tokenizer = minilm
    model, params = tiny
    student, student_params, _ = distill.factorize_projections(model, params, blocks=[1])
    with pytest.raises(ValueError, match="model must be dense"):
        distill.factorize_projections(student, student_params)
    data = distill.DistillData(np.ones((4, 8), np.int32), np.ones((4, 48), np.float32))
    args = (jax.random.key(0), student, student_params, model, params, tokenizer)
    for kwargs, match in [
        ({"steps": 0}, "steps must be a positive int"),
        ({"batch_size": 5}, "batch_size=5 exceeds the 4 windows"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"trainable": []}, "trainable must be"),
        ({"trainable": ["encoder/layer_7"]}, "trainable=.* matches no parameter"),
    ]:
        with pytest.raises(ValueError, match=match):
            distill.distill(*args, data=data, **{"batch_size": 2, **kwargs})
    with pytest.raises(ValueError, match="trainable='factorized' needs a factorized student"):
        distill.distill(jax.random.key(0), model, params, model, params, tokenizer, data=data)
