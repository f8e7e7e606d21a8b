"""Activation capture for SAEs: values equal a direct forward pass, shards round-trip and are
written atomically, the shuffle buffer yields every row once an epoch, spliced-in fidelity."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import activations, models, pretrained
from experiments import data as data_lib
from experiments.pretrained import corpus as corpus_lib
from sparsejax import sae as sae_lib

WIDTHS = (32, 16)


@pytest.fixture(scope="module")
def mlp():
    """An MNIST-1D MLP trained briefly (full-batch Adam on 1000 examples) and 60 of them."""
    data = data_lib.load_mnist1d()
    model = models.MLP(features=WIDTHS, num_classes=data.num_classes)
    x_train, y_train = jnp.asarray(data.x_train[:1000]), jnp.asarray(data.y_train[:1000])
    params = model.init(jax.random.key(0), x_train[:1])["params"]
    tx = optax.adam(1e-2)

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt_state = carry
            grads = jax.grad(
                lambda p: optax.softmax_cross_entropy_with_integer_labels(
                    model.apply({"params": p}, x_train), y_train
                ).mean()
            )(params)
            updates, opt_state = tx.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), None

        return jax.lax.scan(step, (params, tx.init(params)), None, length=100)[0][0]

    return model, train(params), x_train[:60], np.asarray(y_train[:60])


def _direct(params, x):
    """The MLP's layers computed by hand: hidden_0's output, its ReLU, hidden_1's output."""
    h0 = x.reshape(x.shape[0], -1) @ params["hidden_0"]["kernel"] + params["hidden_0"]["bias"]
    h1 = jax.nn.relu(h0) @ params["hidden_1"]["kernel"] + params["hidden_1"]["bias"]
    return h0, jax.nn.relu(h0), h1


def test_capture_equals_the_direct_forward_of_the_mlp(mlp):
    model, params, x, _ = mlp
    h0, relu0, h1 = _direct(params, x)
    out = activations.capture(
        model.apply, {"params": params}, x, layers=["hidden_0", ("hidden_1",)]
    )
    assert list(out) == ["hidden_0", "hidden_1"]
    np.testing.assert_allclose(out["hidden_0"], h0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["hidden_1"], h1, rtol=1e-5, atol=1e-5)
    # The hidden layer after its ReLU is what the next Dense layer receives.
    inputs = activations.capture(
        model.apply, {"params": params}, x, layers="hidden_1", capture="input"
    )
    np.testing.assert_allclose(inputs["hidden_1"], relu0, rtol=1e-5, atol=1e-5)


def test_written_shards_hold_the_direct_forward_in_order(mlp, tmp_path):
    model, params, x, _ = mlp
    h0, relu0, _ = _direct(params, x)
    shards = activations.write_activations(
        str(tmp_path),
        model.apply,
        {"params": params},
        activations.array_batches(x, batch_size=22),  # 22, 22, 16: two batch shapes
        ["hidden_0", "hidden_1"],
        capture="input",
        source={"data": "mnist1d train[:60]"},
        shard_rows=25,
    )
    assert set(shards) == {"hidden_0", "hidden_1"}
    hidden = shards["hidden_1"]
    assert [s.shape for s in hidden.shards] == [(25, 32), (25, 32), (10, 32)]
    assert all(isinstance(s, np.memmap) for s in hidden.shards)
    np.testing.assert_allclose(hidden.array(), relu0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shards["hidden_0"].array(), x.reshape(60, -1), rtol=1e-6, atol=1e-6)
    with open(tmp_path / "hidden_1" / "index.json") as f:
        index = json.load(f)
    assert index["layer"] == "hidden_1" and index["capture"] == "input"
    assert index["shape"] == [60, 32] and index["dtype"] == "float32" and index["complete"]
    assert index["source"] == {"data": "mnist1d train[:60]"}
    assert [s["rows"] for s in index["shards"]] == [25, 25, 10]
    reopened = activations.open_activations(str(tmp_path))
    np.testing.assert_array_equal(reopened["hidden_1"].array(), hidden.array())
    # A second write to the same folder is refused unless asked, and leaves it untouched.
    with pytest.raises(ValueError, match="already holds activations.*overwrite=True"):
        activations.write_activations(
            str(tmp_path), model.apply, {"params": params}, [x[:5]], ["hidden_1"]
        )
    assert activations.open_activations(str(tmp_path))["hidden_1"].rows == 60
    again = activations.write_activations(
        str(tmp_path), model.apply, {"params": params}, [x[:5]], ["hidden_1"], overwrite=True
    )
    assert again["hidden_1"].rows == 5 and again["hidden_1"].capture == "output"
    assert sorted(os.listdir(tmp_path / "hidden_1")) == ["index.json", "shard_000000.npy"]


@pytest.fixture(scope="module")
def minilm():
    return pretrained.load("all-MiniLM-L6-v2")


def test_bert_layer_token_states_equal_a_truncated_forward_without_padding(minilm, tmp_path):
    model, params, tokenizer = minilm
    texts = ["The weather is lovely today.", "He drove to the stadium in the rain at night."]
    shards = activations.write_text_activations(
        str(tmp_path), model, params, tokenizer, texts, "encoder/layer_1", batch_size=2
    )["encoder/layer_1"]
    enc = pretrained.tokenize(tokenizer, texts)
    mask = enc["attention_mask"].astype(bool)
    assert not mask.all(), "the shorter sentence is padded"
    assert shards.rows == mask.sum() and shards.d == model.config.hidden_size
    # Direct forward: the same weights in a model that stops after encoder layer 1.
    short = pretrained.BertModel(dataclasses.replace(model.config, num_hidden_layers=2))
    kept = {"embeddings": params["embeddings"]}
    kept["encoder"] = {f"layer_{i}": params["encoder"][f"layer_{i}"] for i in range(2)}
    states = short.apply({"params": kept}, enc["input_ids"], enc["attention_mask"])
    np.testing.assert_allclose(shards.array(), np.asarray(states)[mask], rtol=1e-4, atol=1e-4)


def test_corpus_windows_give_one_row_a_token_and_record_the_corpus(minilm, tmp_path):
    model, params, tokenizer = minilm
    layers = ["encoder/layer_0/intermediate", "encoder/layer_0/output/dense"]
    out = activations.write_corpus_activations(
        str(tmp_path), model, params, tokenizer, layers[:1], n=2, length=16, batch_size=2
    )
    mlp_hidden = out["encoder/layer_0/intermediate"]
    assert (mlp_hidden.rows, mlp_hidden.d) == (2 * 16, model.config.intermediate_size)
    assert (
        mlp_hidden.source["split"] == "calibration" and len(mlp_hidden.source["text_sha256"]) == 64
    )
    # The MLP's hidden layer (its activation's output) is the down projection's input.
    ids = corpus_lib.calibration_ids(tokenizer, n=2, length=16)
    down = activations.capture(
        model.apply, {"params": params}, ids, layers=layers[1], capture="input"
    )[layers[1]]
    np.testing.assert_allclose(mlp_hidden.array(), np.asarray(down).reshape(32, -1), atol=1e-5)


def _numbered_shards(folder, rows=53, d=3, shard_rows=20, dtype="float32"):
    """Shards whose row i is (i, i, ...), appended in uneven pieces."""
    data = np.repeat(np.arange(rows, dtype=np.float32)[:, None], d, axis=1)
    with activations.ShardWriter(
        str(folder), "layer", d=d, source="numbers", dtype=dtype, shard_rows=shard_rows
    ) as writer:
        for piece in np.split(data, [7, 8, 30, 50]):
            writer.append(piece)
    return data, activations.ActivationShards(str(folder))


def test_shards_round_trip_in_both_dtypes(tmp_path):
    data, shards = _numbered_shards(tmp_path / "a")
    assert [s.shape[0] for s in shards.shards] == [20, 20, 13]
    np.testing.assert_array_equal(shards.array(), data)
    assert shards.complete and shards.source == "numbers" and len(shards) == 53
    rng = np.random.default_rng(0)
    values = rng.standard_normal((30, 5)).astype(np.float32)
    with activations.ShardWriter(str(tmp_path / "b"), "x", d=5, dtype="float16") as writer:
        writer.append(values)
    half = activations.ActivationShards(str(tmp_path / "b"))
    assert half.dtype == np.float16 and half.array().dtype == np.float32
    np.testing.assert_array_equal(half.array(), values.astype(np.float16).astype(np.float32))


def test_a_crash_leaves_only_whole_shards_indexed(tmp_path, monkeypatch):
    writer = activations.ShardWriter(str(tmp_path), "layer", d=2, shard_rows=10)
    writer.append(np.ones((25, 2), np.float32))  # two shards written, 5 rows pending

    def crash(f, array):  # the process dies halfway through writing the third shard
        f.write(b"\x93NUMPY half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        writer.append(np.ones((5, 2), np.float32))
    monkeypatch.undo()
    partial = activations.ActivationShards(str(tmp_path))
    assert not partial.complete and partial.rows == 20 and len(partial.shards) == 2
    np.testing.assert_array_equal(partial.array(), np.ones((20, 2), np.float32))
    assert sorted(os.listdir(tmp_path)) == [
        ".shard_000002.npy.tmp",  # never renamed, never indexed
        "index.json",
        "shard_000000.npy",
        "shard_000001.npy",
    ]
    with pytest.raises(RuntimeError):
        with activations.ShardWriter(str(tmp_path / "c"), "layer", d=2) as w:
            w.append(np.ones((3, 2), np.float32))
            raise RuntimeError("the forward pass failed")
    assert not activations.ActivationShards(str(tmp_path / "c")).complete


def test_the_shuffle_buffer_yields_every_row_once_an_epoch_and_follows_its_seed(tmp_path):
    data, shards = _numbered_shards(tmp_path)
    n = len(data)

    def stream(seed, batches=30):
        it = shards.batches(7, seed=seed, buffer_rows=16, chunk_rows=5)
        out = [next(it) for _ in range(batches)]
        assert all(b.shape == (7, 3) and b.dtype == np.float32 for b in out)
        return np.concatenate(out)[:, 0].astype(int)

    rows = stream(1)
    for epoch in range(3):  # 210 rows: three whole epochs of 53
        assert sorted(rows[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert not np.array_equal(rows[:n], np.arange(n)), "shuffled"
    assert not np.array_equal(rows[:n], rows[n : 2 * n]), "each epoch reshuffled"
    np.testing.assert_array_equal(stream(1), rows)
    assert not np.array_equal(stream(2), rows)
    one = list(shards.batches(10, seed=0, epochs=1, drop_last=False))
    assert [len(b) for b in one] == [10] * 5 + [3]
    assert sorted(np.concatenate(one)[:, 0].astype(int)) == list(range(n))
    assert [len(b) for b in shards.batches(10, seed=0, epochs=2)] == [10] * 10


def test_sae_fit_trains_on_the_shuffled_stream(tmp_path):
    rng = np.random.default_rng(0)
    with activations.ShardWriter(str(tmp_path), "layer", d=8, shard_rows=100) as writer:
        writer.append(rng.standard_normal((256, 8)).astype(np.float32))
    shards = activations.ActivationShards(str(tmp_path))
    sae = sae_lib.fit(
        jax.random.key(0), shards.batches(64, seed=0), kind="topk", n_latents=16, k=2, steps=5
    )
    assert sae.decoder.shape == (16, 8)


def test_bad_layers_and_arguments_are_value_errors_naming_them(mlp, tmp_path):
    model, params, x, _ = mlp
    with pytest.raises(
        ValueError, match=r"\['hidden_9'\] are not modules the model calls.*hidden_0"
    ):
        activations.capture(model.apply, {"params": params}, x, layers=["hidden_0", "hidden_9"])
    with pytest.raises(ValueError, match="hidden_9"):
        activations.write_activations(
            str(tmp_path), model.apply, {"params": params}, [x], ["hidden_9"]
        )
    assert not os.listdir(tmp_path), "nothing written for a refused layer"
    with pytest.raises(ValueError, match="capture must be one of"):
        activations.capture(model.apply, {"params": params}, x, layers="hidden_0", capture="out")
    with pytest.raises(ValueError, match="mask_arg"):
        activations.write_activations(
            str(tmp_path), model.apply, {"params": params}, [x], ["hidden_0"], mask_arg=1
        )
    with pytest.raises(ValueError, match="holds no activations index"):
        activations.ActivationShards(str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        activations.ShardWriter(str(tmp_path / "w"), "l", d=2, dtype="int8")
    with pytest.raises(ValueError, match="rows must be"):
        activations.ShardWriter(str(tmp_path / "v"), "l", d=2).append(np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"\[.hidden_7.\] are not modules"):
        activations.spliced_fidelity(
            model.apply, {"params": params}, x, np.zeros(60, np.int32), "hidden_7", lambda h: h
        )


def test_spliced_fidelity_of_identity_zeros_and_an_sae(mlp):
    model, params, x, y = mlp
    variables = {"params": params}
    same = activations.spliced_fidelity(
        model.apply, variables, x, y, "output", lambda h: h, capture="input", batch_size=25
    )
    assert same["spliced_accuracy"] == same["accuracy"]
    assert same["spliced_loss"] == pytest.approx(same["loss"], rel=1e-6)
    assert same["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    logits = model.apply(variables, x)
    assert same["accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == y)))
    # Zeroing the head's input leaves its bias as the logits.
    zeroed = activations.spliced_fidelity(
        model.apply, variables, x, y, "output", jnp.zeros_like, capture="input"
    )
    bias_class = int(np.argmax(params["output"]["bias"]))
    assert zeroed["spliced_accuracy"] == pytest.approx(float(np.mean(y == bias_class)))
    assert zeroed["spliced_accuracy"] == zeroed["ablated_accuracy"]
    # An SAE (a pytree, passed to the compiled function as an argument) spliced in.
    hidden = activations.capture(model.apply, variables, x, layers="output", capture="input")
    sae = sae_lib.fit(
        jax.random.key(0),
        hidden["output"],
        kind="topk",
        n_latents=32,
        k=4,
        steps=5,
        batch_size=60,
    )
    spliced = activations.spliced_fidelity(
        model.apply, variables, x, y, "output", sae, capture="input"
    )
    head = params["output"]
    manual = np.asarray(sae(hidden["output"]) @ head["kernel"] + head["bias"])
    assert spliced["spliced_accuracy"] == pytest.approx(float(np.mean(manual.argmax(-1) == y)))
    assert spliced["accuracy"] == same["accuracy"] and np.isfinite(spliced["loss_recovered"])
