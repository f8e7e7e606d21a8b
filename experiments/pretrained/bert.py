"""A BERT encoder in Flax Linen whose every projection is a plain ``nn.Dense``.

The parameter tree follows the Hugging Face module names, so one rule maps it to a checkpoint's
keys (`experiments.pretrained.hub`): ``encoder/layer_0/attention/self/query`` is
``encoder.layer.0.attention.self.query``; a Dense ``kernel`` is the transposed ``weight``, a
LayerNorm ``scale`` its ``weight``, an Embed ``embedding`` its ``weight``.

Because Q, K, V, the attention output and both MLP projections are ``nn.Dense`` called once
each, everything that works on Dense layers works here unchanged: masks and
`sparsejax.transforms.masked`, `sparsejax.posttrain.prune_model` (calibrated through
`flax.linen.intercept_methods`), `sparsejax.export` with `sparsejax.nn.sparse_dense_calls`,
and `tensornets.Factorized` through the ``factorize`` attribute.

Reference: Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding" (2019); Reimers & Gurevych, "Sentence-BERT" (2019) for the mean pooling.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import tensornets
from experiments.models import freeze_factorize

__all__ = ["BertConfig", "BertModel", "dense_layer_names", "mean_pool"]

# Hidden activations by their Hugging Face name; "gelu" is the exact (erf) GELU.
_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}
_SUPPORTED_MODEL_TYPES = ("bert",)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture fields of a Hugging Face ``config.json`` for ``model_type="bert"``."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"config {name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"config hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"config hidden_act={self.hidden_act!r} is not supported; "
                f"supported: {sorted(_ACTIVATIONS)}"
            )
        if not isinstance(self.layer_norm_eps, numbers.Real) or not self.layer_norm_eps > 0:
            raise ValueError(f"config layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "config.json") -> BertConfig:
        """Reads a Hugging Face config, refusing model types and options it cannot run.

        Raises:
          ValueError: naming ``source`` and the key, for a model_type other than "bert", a
            position embedding other than "absolute", or a missing or invalid field.
        """
        model_type = config.get("model_type")
        if model_type not in _SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type={model_type!r} is not supported; "
                f"supported: {list(_SUPPORTED_MODEL_TYPES)}"
            )
        position = config.get("position_embedding_type", "absolute")
        if position != "absolute":
            raise ValueError(
                f"{source}: position_embedding_type={position!r} is not supported (only 'absolute')"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        required = fields - {"pad_token_id", "type_vocab_size", "hidden_act", "layer_norm_eps"}
        missing = sorted(required - set(config))
        if missing:
            raise ValueError(f"{source}: missing keys {missing}")
        try:
            return cls(**{k: config[k] for k in fields if k in config})
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "config.json") -> BertConfig:
        try:
            config = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{source} must hold a JSON object, got {type(config).__name__}")
        return cls.from_dict(config, source)


def _dense(module: nn.Module, features: int, name: str) -> nn.Module:
    """An ``nn.Dense`` named ``name``, or `tensornets.Factorized` around it if the model's
    ``factorize`` names its full path (e.g. ``encoder/layer_0/intermediate/dense``)."""
    path = "/".join((*module.path, name))
    entry = dict(module.factorize).get(path)
    if entry is None:
        return nn.Dense(features, name=name)
    return tensornets.Factorized(nn.Dense(features, parent=None), name=name, **dict(entry))


class _SelfAttention(nn.Module):
    config: BertConfig
    factorize: Any = ()

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        c = self.config
        heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads

        def split(y):  # [b, t, d] -> [b, heads, t, head_dim]
            return y.reshape(*y.shape[:2], heads, head_dim).transpose(0, 2, 1, 3)

        q = split(_dense(self, c.hidden_size, "query")(x))
        k = split(_dense(self, c.hidden_size, "key")(x))
        v = split(_dense(self, c.hidden_size, "value")(x))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(jnp.float32(head_dim))
        # Padding keys get the most negative float, as Hugging Face does: their softmax weight is
        # exactly zero unless every key is padding.
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores + bias, axis=-1)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
        return out.transpose(0, 2, 1, 3).reshape(x.shape)


class _Output(nn.Module):
    """Dense, residual, LayerNorm (BertSelfOutput and BertOutput)."""

    config: BertConfig
    factorize: Any = ()

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        x = _dense(self, self.config.hidden_size, "dense")(x)
        return nn.LayerNorm(epsilon=self.config.layer_norm_eps, name="LayerNorm")(x + residual)


class _Attention(nn.Module):
    config: BertConfig
    factorize: Any = ()

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        a = _SelfAttention(self.config, self.factorize, name="self")(x, attention_mask)
        return _Output(self.config, self.factorize, name="output")(a, x)


class _Intermediate(nn.Module):
    config: BertConfig
    factorize: Any = ()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _dense(self, self.config.intermediate_size, "dense")(x)
        return _ACTIVATIONS[self.config.hidden_act](x)


class _Layer(nn.Module):
    config: BertConfig
    factorize: Any = ()

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        x = _Attention(self.config, self.factorize, name="attention")(x, attention_mask)
        h = _Intermediate(self.config, self.factorize, name="intermediate")(x)
        return _Output(self.config, self.factorize, name="output")(h, x)


class _Encoder(nn.Module):
    config: BertConfig
    factorize: Any = ()

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = _Layer(self.config, self.factorize, name=f"layer_{i}")(x, attention_mask)
        return x


class _Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        c = self.config
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        x = (
            nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
            + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings")(
                positions
            )
            + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(
                token_type_ids
            )
        )
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(x)


class BertModel(nn.Module):
    """The BERT encoder (no pooler): token ids to contextual token states.

    ``model.apply({"params": params}, input_ids)`` works with a single int array, so the model
    plugs into tools that call ``apply_fn(variables, x)`` (e.g. `sparsejax.posttrain.prune_model`
    on unpadded calibration windows).

    Attributes:
      config: the architecture (`BertConfig`).
      factorize: ``{"encoder/layer_0/intermediate/dense": {"format": ..., "rank": ...}, ...}``:
        projections built as `tensornets.Factorized` layers (keys are full Dense paths;
        see `dense_layer_names`). Empty for the dense model.

    Dropout is omitted: the model is used for inference, calibration and distillation.
    """

    config: BertConfig
    factorize: Any = ()

    def __post_init__(self) -> None:
        if not isinstance(self.config, BertConfig):
            raise ValueError(f"config must be a BertConfig, got {type(self.config).__name__}")
        frozen = freeze_factorize(self.factorize)
        known = set(dense_layer_names(self.config))
        unknown = sorted(name for name, _ in frozen if name not in known)
        if unknown:
            raise ValueError(
                f"factorize names {unknown}, which are not projections of this model; "
                f"e.g. {sorted(known)[:3]}"
            )
        object.__setattr__(self, "factorize", frozen)
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Token states ``float32[batch, tokens, hidden]``.

        Args:
          input_ids: ``int[batch, tokens]``.
          attention_mask: ``int[batch, tokens]``, 1 for real tokens and 0 for padding;
            all ones by default.
          token_type_ids: ``int[batch, tokens]``; zeros by default.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        x = _Embeddings(self.config, name="embeddings")(input_ids, token_type_ids)
        return _Encoder(self.config, self.factorize, name="encoder")(x, attention_mask)


def mean_pool(states: jax.Array, attention_mask: jax.Array, normalize: bool = True) -> jax.Array:
    """Sentence embeddings: the mean of the real tokens' states, then L2-normalized.

    Args:
      states: ``float[batch, tokens, hidden]``.
      attention_mask: ``int[batch, tokens]`` (1 = real token).
      normalize: divide by the L2 norm (sentence-transformers' Normalize module).

    Returns:
      ``float32[batch, hidden]``; an all-padding row gives zeros.
    """
    mask = attention_mask.astype(states.dtype)[..., None]
    pooled = (states * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1e-9)
    if normalize:
        norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
        pooled = pooled / jnp.maximum(norm, 1e-12)
    return pooled.astype(jnp.float32)


def dense_layer_names(config: BertConfig) -> list[str]:
    """The paths of the model's projections, in call order (six per layer)."""
    names = []
    for i in range(config.num_hidden_layers):
        layer = f"encoder/layer_{i}"
        names += [f"{layer}/attention/self/{p}" for p in ("query", "key", "value")]
        names += [
            f"{layer}/attention/output/dense",
            f"{layer}/intermediate/dense",
            f"{layer}/output/dense",
        ]
    return names
