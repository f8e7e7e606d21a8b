"""Flax Linen models for the experiments, chosen by name with `get_model`.

All models are channels-last, take only the input (``__call__(self, x)``: no dropout, no
BatchNorm, so no ``train`` flag and no mutable collections) and return logits
``float32[batch, num_classes]``. Parameters are a plain pytree with readable paths
(``params['conv1']['kernel']``) that sparsity masks can mirror.

``MLP``, ``ResidualMLP`` and ``CNN1D`` take ``factorize``: layers to build as
tensor-network layers (`tensornets.Factorized` around the same ``nn.Dense`` /
``nn.Conv``), e.g. from a config::

    config.model.factorize = {"hidden_1": {"format": "tt_matrix", "rank": 0.1}}

Each entry has ``format`` (see `FACTORIZE_FORMATS`), ``rank`` (int, tuple, or a
float fraction of the dense kernel's parameter count) and optionally the other
`tensornets.LAYER_KEYS` (``in_shape``, ``out_shape``: factorizations of the layer's
input / output dimension; ``contraction``, ...); `tensornets.check_factorize_spec`
validates it. The factors sit where the kernel was (``params['hidden_1']['core_0']``,
``['bias']``). ``"low_rank"`` is the matrix baseline W = U diag(w) V^T (a 2-factor CP
of the (in, out) kernel, r (in + out + 1) parameters); neither it nor ``"tubal"`` (a
t-product layer) applies to a Conv (`tensornets.LAYER_FORMATS`).

``MLP`` and ``CNN1D`` have Flax NNX twins (`experiments.nnx_models`), which a run selects
with ``config.model.api = "nnx"`` (`make_model`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import tensornets
from experiments import nnx_models
from experiments.sparse_ift import SparseIFTMLP

__all__ = [
    "CNN1D",
    "FACTORIZE_FORMATS",
    "MLP",
    "MODEL_APIS",
    "ResNet",
    "ResidualMLP",
    "ViT1D",
    "factorize_spec",
    "freeze_factorize",
    "get_model",
    "make_model",
    "narrow_to_params",
    "num_params",
]

FACTORIZE_FORMATS = tuple(sorted(tensornets.FORMATS))
# The values of config.model.api: which Flax API the model is written in (see `make_model`).
MODEL_APIS = ("linen", "nnx")

# ((layer name, ((key, value), ...)), ...), sorted: hashable, so a module attribute.
Factorize = tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_positive_ints(values: Any, name: str) -> None:
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise ValueError(f"{name} must be a sequence of positive ints, got {values!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a sequence of positive ints, got {values!r}")


def _frozen_value(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_frozen_value(v) for v in value)
    return value


def _as_mapping(value: Any, name: str) -> dict:
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping, got {value!r}")
    return dict(value)


def freeze_factorize(factorize: Any) -> Factorize:
    """Turns ``{layer: {"format": ..., "rank": ..., ...}}`` into the hashable module form.

    Args:
      factorize: a dict or ``ConfigDict`` of per-layer entries, or the frozen form
        itself (returned unchanged); lists become tuples.

    Returns:
      ``((layer, ((key, value), ...)), ...)`` sorted by layer and key.

    Raises:
      ValueError: naming the layer, for an entry without ``format`` / ``rank``, an
        unknown key or an unknown format (`tensornets.check_factorize_spec`).
    """
    if isinstance(factorize, tuple | list):
        try:
            factorize = {layer: dict(entry) for layer, entry in factorize}
        except (TypeError, ValueError):
            raise ValueError(
                "factorize must be a mapping {layer: {'format': ..., 'rank': ...}} or its "
                f"freeze_factorize form ((layer, ((key, value), ...)), ...), got {factorize!r}"
            ) from None
    entries = {
        layer: _as_mapping(entry, f"factorize[{layer!r}]")
        for layer, entry in _as_mapping(factorize, "factorize").items()
    }
    entries = tensornets.check_factorize_spec(entries, name="factorize", keys=tensornets.LAYER_KEYS)
    return tuple(
        (str(layer), tuple(sorted((k, _frozen_value(v)) for k, v in entry.items())))
        for layer, entry in sorted(entries.items())
    )


def factorize_spec(factorize: Any) -> dict[str, dict[str, Any]]:
    """The `tensornets.factorize_params` spec for a model's ``factorize`` attribute.

    Decomposing a trained dense model's params with this spec gives params for the
    same model built with ``factorize`` (Lebedev et al. 2015's decompose, then
    fine-tune).

    Args:
      factorize: as for `freeze_factorize`.

    Returns:
      ``{layer: {"format", "rank", "in_shape"?, "out_shape"?}}``.
    """
    spec = {}
    for layer, entry in freeze_factorize(factorize):
        entry = {k: v for k, v in entry if k != "contraction"}
        if entry["format"] == "low_rank":
            # The same params and the same fit (a 2-factor CP by ALS), under the name
            # factorize specs have always carried for it.
            entry["format"] = "cp"
        spec[layer] = entry
    return spec


def _freeze_attribute(module: nn.Module, layers: dict[str, str]) -> None:
    """Freezes ``module.factorize``, checking it names ``layers`` ({name: kind}) and suits them."""
    frozen = freeze_factorize(module.factorize)
    tensornets.check_factorize_spec(
        {layer: dict(entry) for layer, entry in frozen},
        name="factorize",
        keys=tensornets.LAYER_KEYS,
        kinds=layers,
    )
    object.__setattr__(module, "factorize", frozen)


def _layer(cls: type[nn.Module], name: str, factorize: Factorize, *args, **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)`` named ``name``, or `tensornets.Factorized` around it.

    Call inside a compact method (the new module binds to it). The wrapper keeps
    the factors directly under ``name`` and takes every hyperparameter (strides,
    padding, bias, initializer) from the dense layer.
    """
    entry = dict(factorize).get(name)
    if entry is None:
        return cls(*args, name=name, **kwargs)
    return tensornets.Factorized(cls(*args, parent=None, **kwargs), name=name, **dict(entry))


class MLP(nn.Module):
    """Multilayer perceptron: flatten, ``Dense + ReLU`` per hidden width, then a ``Dense`` head.

    The MNIST-1D baseline MLP is the default (two hidden layers of 100).

    Attributes:
      features: hidden widths, e.g. ``(100, 100)``; may be empty (a linear classifier).
      num_classes: output width.
      factorize: layers built as tensor-network layers (see the module docstring), a
        dict or the `freeze_factorize` form; empty for a dense MLP.

    Input ``x: float[batch, ...]`` (flattened), output logits ``float32[batch, num_classes]``.
    Submodules ``hidden_0, hidden_1, ...`` and ``output``.

    Reference: Greydanus, "Scaling down Deep Learning", 2020.
    """

    features: Sequence[int] = (100, 100)
    num_classes: int = 10
    factorize: Any = ()

    def __post_init__(self) -> None:
        _check_positive_ints(self.features, "features")
        _check_positive_int(self.num_classes, "num_classes")
        layers = {f"hidden_{i}": "dense" for i in range(len(self.features))}
        _freeze_attribute(self, {**layers, "output": "dense"})
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.features):
            x = nn.relu(_layer(nn.Dense, f"hidden_{i}", self.factorize, width)(x))
        return _layer(nn.Dense, "output", self.factorize, self.num_classes)(x)


class CNN1D(nn.Module):
    """The MNIST-1D 1D CNN: three strided ``Conv + ReLU`` layers, flatten, one ``Dense``.

    conv1: kernel 5, stride 2, padding 1, ``1 -> channels`` input channels as given;
    conv2 and conv3: kernel 3, stride 2, padding 1, ``channels -> channels``. A length-``L``
    sequence shrinks as ``L' = (L + 2 - k) // 2 + 1``: 40 -> 19 -> 10 -> 5, so for MNIST-1D
    the head ``dense`` sees ``5 * channels`` features (flattened length-major, channels-last).
    The paper uses 25 channels; the default here is wider.

    Attributes:
      channels: width of every conv layer.
      num_classes: output width.
      factorize: layers built as tensor-network layers (see the module docstring;
        convs: "cp" (Lebedev et al. 2015), "tucker" (Tucker-2, Kim et al. 2016),
        "tt" / "tt_matrix" (Garipov et al. 2016)); empty for the dense CNN.

    Input ``x: float[batch, length, in_channels]`` (MNIST-1D: ``[batch, 40, 1]``), output logits
    ``float32[batch, num_classes]``. Submodules ``conv1, conv2, conv3, dense``.

    Reference: Greydanus, "Scaling down Deep Learning", 2020.
    """

    channels: int = 64
    num_classes: int = 10
    factorize: Any = ()

    def __post_init__(self) -> None:
        _check_positive_int(self.channels, "channels")
        _check_positive_int(self.num_classes, "num_classes")
        layers = {"conv1": "conv", "conv2": "conv", "conv3": "conv", "dense": "dense"}
        _freeze_attribute(self, layers)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Explicit symmetric padding (not 'SAME') reproduces the paper's PyTorch lengths exactly.
        for name, k in (("conv1", 5), ("conv2", 3), ("conv3", 3)):
            conv = _layer(
                nn.Conv, name, self.factorize, self.channels, (k,), strides=(2,), padding=((1, 1),)
            )
            x = nn.relu(conv(x))
        x = x.reshape(x.shape[0], -1)
        return _layer(nn.Dense, "dense", self.factorize, self.num_classes)(x)


_NORMS = ("none", "group")
_he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class _BasicBlock(nn.Module):
    """``relu(shortcut(x) + scale * (conv-norm-relu-conv-norm)(x))``, 3x3 convs."""

    width: int
    stride: int
    norm: str
    num_groups: int
    residual_scale: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        use_bias = self.norm == "none"
        conv = lambda name, stride: nn.Conv(
            self.width,
            (3, 3),
            strides=(stride, stride),
            padding=((1, 1), (1, 1)),
            use_bias=use_bias,
            kernel_init=_he_normal,
            name=name,
        )
        branch = conv("conv1", self.stride)(x)
        branch = _normalize(branch, self.norm, self.num_groups, "norm1")
        branch = conv("conv2", 1)(nn.relu(branch))
        branch = _normalize(branch, self.norm, self.num_groups, "norm2")
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.width:
            # Option A of He et al.: parameter-free subsampling plus zero channels, as in their
            # CIFAR ResNets (ResNet-20 has 0.27M parameters).
            shortcut = x[:, :: self.stride, :: self.stride, :]
            extra = self.width - x.shape[-1]
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return nn.relu(shortcut + self.residual_scale * branch)


def _normalize(x: jax.Array, norm: str, num_groups: int, name: str) -> jax.Array:
    if norm == "group":
        return nn.GroupNorm(num_groups=num_groups, name=name)(x)
    return x


class ResNet(nn.Module):
    """Small CIFAR ResNet (ResNet-20 by default): stem, three stages of basic blocks, pool, head.

    A 3x3 conv stem of width ``stage_widths[0]``, then ``num_blocks_per_stage`` basic blocks per
    stage (the first block of stages 2 and 3 has stride 2), global average pooling and a
    ``Dense`` head; depth is ``6 * num_blocks_per_stage + 2``. Shortcuts that change shape are
    parameter-free (subsample and zero-pad channels, option A of the paper).

    There is no BatchNorm (so no mutable ``batch_stats``). ``norm='group'`` puts a GroupNorm
    after every conv. With ``norm='none'`` the convs get biases and each residual branch is
    scaled by ``1 / sqrt(total_blocks)`` so activations stay O(1) with depth at initialization
    (Hayou et al., "Stable ResNet", 2021): the output variance grows like
    ``(1 + 1/B)^B <= e`` instead of ``2^B``.

    Attributes:
      num_classes: output width.
      num_blocks_per_stage: basic blocks in each stage (3 gives ResNet-20).
      stage_widths: channels of the three stages.
      norm: ``'none'`` or ``'group'``.
      num_groups: GroupNorm groups; must divide every stage width (8 divides 16/32/64).

    Input ``x: float[batch, height, width, 3]`` (CIFAR-10: ``[batch, 32, 32, 3]``), output
    logits ``float32[batch, num_classes]``. Submodules ``stem`` (and ``stem_norm``),
    ``stage{s}_block{b}`` with ``conv1, conv2`` (and ``norm1, norm2``), and ``head``.

    Reference: He et al., "Deep Residual Learning for Image Recognition", 2016.
    """

    num_classes: int = 10
    num_blocks_per_stage: int = 3
    stage_widths: Sequence[int] = (16, 32, 64)
    norm: str = "none"
    num_groups: int = 8

    def __post_init__(self) -> None:
        _check_positive_int(self.num_classes, "num_classes")
        _check_positive_int(self.num_blocks_per_stage, "num_blocks_per_stage")
        _check_positive_ints(self.stage_widths, "stage_widths")
        if self.norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {self.norm!r}")
        _check_positive_int(self.num_groups, "num_groups")
        if self.norm == "group" and any(w % self.num_groups for w in self.stage_widths):
            raise ValueError(
                f"num_groups must divide every stage width {tuple(self.stage_widths)}, "
                f"got {self.num_groups}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        total_blocks = self.num_blocks_per_stage * len(self.stage_widths)
        residual_scale = 1.0 / math.sqrt(total_blocks) if self.norm == "none" else 1.0
        x = nn.Conv(
            self.stage_widths[0],
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=self.norm == "none",
            kernel_init=_he_normal,
            name="stem",
        )(x)
        x = nn.relu(_normalize(x, self.norm, self.num_groups, "stem_norm"))
        for stage, width in enumerate(self.stage_widths):
            for block in range(self.num_blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                x = _BasicBlock(
                    width=width,
                    stride=stride,
                    norm=self.norm,
                    num_groups=self.num_groups,
                    residual_scale=residual_scale,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


class ResidualMLP(nn.Module):
    """The residual MLP of MNIST-1D's lottery-ticket experiment (40-500-500-10 by default).

    h_1 = relu(W_1 x), h_{i+1} = relu(W_{i+1} h_i) + h_i for the later hidden
    layers (same width), logits = W_out h_L.

    Attributes:
      features: hidden width.
      num_layers: number of hidden layers (>= 1).
      num_classes: output width.
      factorize: layers built as tensor-network layers (see the module docstring).

    Input ``float[batch, ...]`` (flattened), output ``float32[batch, num_classes]``.
    Submodules ``hidden_0 ...`` and ``output``.

    Reference: Greydanus, "Scaling down Deep Learning", 2020 (its lottery-ticket
    notebook); Frankle & Carbin 2019, "The Lottery Ticket Hypothesis".
    """

    features: int = 500
    num_layers: int = 2
    num_classes: int = 10
    factorize: Any = ()

    def __post_init__(self) -> None:
        _check_positive_int(self.features, "features")
        _check_positive_int(self.num_layers, "num_layers")
        _check_positive_int(self.num_classes, "num_classes")
        layers = {f"hidden_{i}": "dense" for i in range(self.num_layers)}
        _freeze_attribute(self, {**layers, "output": "dense"})
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.reshape(x.shape[0], -1)
        for i in range(self.num_layers):
            out = nn.relu(_layer(nn.Dense, f"hidden_{i}", self.factorize, self.features)(h))
            h = out if i == 0 else out + h
        return _layer(nn.Dense, "output", self.factorize, self.num_classes)(h)


class _SelfAttention(nn.Module):
    """Multi-head self-attention whose four projections are plain ``nn.Dense`` layers.

    (Not ``nn.MultiHeadDotProductAttention``, whose ``DenseGeneral`` projections are not
    the Dense/Conv layers that pruning and FLOP counting see.)
    """

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, width = x.shape
        head = width // self.num_heads
        split = lambda t: t.reshape(batch, tokens, self.num_heads, head)  # noqa: E731
        q = split(nn.Dense(width, name="query")(x))
        k = split(nn.Dense(width, name="key")(x))
        v = split(nn.Dense(width, name="value")(x))
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, width)
        return nn.Dense(width, name="out")(out)


# ViT1D's MLP activations. "gelu" is flax's default `nn.gelu` (the tanh approximation), as
# the model has always used, so results measured before the attribute existed are unchanged.
_VIT_ACTIVATIONS: dict[str, Any] = {"gelu": nn.gelu, "relu": nn.relu}


class _EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) (GELU or ReLU MLP)."""

    num_heads: int
    mlp_dim: int
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + _SelfAttention(self.num_heads, name="attention")(nn.LayerNorm(name="norm1")(x))
        act = _VIT_ACTIVATIONS[self.activation]
        h = act(nn.Dense(self.mlp_dim, name="mlp_in")(nn.LayerNorm(name="norm2")(x)))
        return x + nn.Dense(x.shape[-1], name="mlp_out")(h)


class ViT1D(nn.Module):
    """A small vision transformer over a 1D signal: tokens are positions (or patches of them).

    The input ``[batch, length, channels]`` is cut into ``length / patch_size`` tokens of
    ``patch_size * channels`` values, embedded by a ``Dense`` plus a learned position
    embedding, passed through ``depth`` pre-norm encoder blocks (self-attention with Dense
    query/key/value/out projections and a GELU or ReLU MLP), layer-normalized, averaged over
    tokens and classified by a ``Dense`` head. For MNIST-1D with ``patch_size=1`` the 40 positions
    are the 40 tokens. Every weight matrix is an ``nn.Dense``, so the attention and MLP
    blocks can be pruned like the linear layers of a language model.

    Attributes:
      patch_size: positions per token; must divide the input length.
      width: embedding width; ``num_heads`` must divide it.
      depth: number of encoder blocks.
      num_heads: attention heads.
      mlp_dim: hidden width of each block's MLP.
      num_classes: output width.
      activation: the MLPs' activation, ``"gelu"`` (``nn.gelu``, its tanh approximation;
        the default) or ``"relu"`` (exact zeros, for measuring activation sparsity).

    Input ``float[batch, length, channels]``, output logits ``float32[batch, num_classes]``.
    Submodules ``embed``, ``block_{i}`` (``attention/{query,key,value,out}``, ``mlp_in``,
    ``mlp_out``, ``norm1``, ``norm2``), ``norm`` and ``head``; parameter ``position``.

    Reference: Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for
    Image Recognition at Scale" (patch tokens, learned positions, pre-norm encoder), on
    MNIST-1D (Greydanus, "Scaling down Deep Learning", 2020).
    """

    patch_size: int = 1
    width: int = 32
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 64
    num_classes: int = 10
    activation: str = "gelu"

    def __post_init__(self) -> None:
        for name in ("patch_size", "width", "depth", "num_heads", "mlp_dim", "num_classes"):
            _check_positive_int(getattr(self, name), name)
        if not isinstance(self.activation, str) or self.activation not in _VIT_ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_VIT_ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.width % self.num_heads:
            raise ValueError(
                f"num_heads must divide width, got num_heads={self.num_heads}, width={self.width}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 2:
            x = x[..., None]
        batch, length, channels = x.shape
        if length % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide the input length {length}")
        tokens = length // self.patch_size
        x = x.reshape(batch, tokens, self.patch_size * channels)
        x = nn.Dense(self.width, name="embed")(x)
        position = self.param(
            "position", nn.initializers.normal(0.02), (tokens, self.width), jnp.float32
        )
        x = x + position[None]
        for i in range(self.depth):
            x = _EncoderBlock(self.num_heads, self.mlp_dim, self.activation, name=f"block_{i}")(x)
        x = jnp.mean(nn.LayerNorm(name="norm")(x), axis=1)
        return nn.Dense(self.num_classes, name="head")(x)


_MODELS: dict[str, type[nn.Module]] = {
    "cnn1d": CNN1D,
    "mlp": MLP,
    "resmlp": ResidualMLP,
    "resnet": ResNet,
    "sparse_ift_mlp": SparseIFTMLP,
    "vit1d": ViT1D,
}

# The attribute that sets each model's width, for `narrow_to_params`.
_WIDTH_ATTRIBUTE = {"cnn1d": "channels", "resmlp": "features"}


def num_params(model: nn.Module, example_x: Any) -> int:
    """Number of parameters of ``model`` for inputs like ``example_x`` (shapes only)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), example_x))
    return sum(math.prod(p.shape) for p in jax.tree.leaves(shapes))


def narrow_to_params(name: str, target_params: int, example_x: Any, **kwargs: Any) -> nn.Module:
    """The model ``name`` narrowed to the widest width with at most ``target_params`` parameters.

    The small-dense baseline of sparse-training papers: a dense model with as
    many parameters as the sparse model has nonzeros.

    Args:
      name: 'cnn1d' or 'resmlp' (models with a single width attribute).
      target_params: parameter budget, >= the model's size at width 1.
      example_x: an input batch (shapes only).
      **kwargs: other attributes; the width attribute given here is ignored.

    Returns:
      The narrowed module.
    """
    if name not in _WIDTH_ATTRIBUTE:
        raise ValueError(
            f"name={name!r} has no single width; narrowable: {sorted(_WIDTH_ATTRIBUTE)}"
        )
    attr = _WIDTH_ATTRIBUTE[name]
    kwargs = {k: v for k, v in kwargs.items() if k != attr}

    def size(width: int) -> int:
        return num_params(get_model(name, **{attr: width}, **kwargs), example_x)

    if size(1) > target_params:
        raise ValueError(
            f"target_params={target_params} is below the size of {name!r} at width 1 ({size(1)})"
        )
    lo, hi = 1, 2
    while size(hi) <= target_params:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # size is increasing in width: bisect for the last width that fits.
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= target_params else (lo, mid)
    return get_model(name, **{attr: lo}, **kwargs)


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds a model by name: ``'cnn1d'``, ``'mlp'``, ``'resmlp'``, ``'resnet'`` or ``'vit1d'``.

    Args:
      name: registry name.
      **kwargs: module attributes (e.g. from a config dict); lists become tuples and a
        ``factorize`` dict / ConfigDict becomes its `freeze_factorize` form, so the module
        stays hashable.

    Returns:
      The (unbound) Flax module.

    Raises:
      ValueError: if ``name`` is unknown (the message lists the known names) or an attribute is
        invalid (the message names it).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model name={name!r}; known names: {sorted(_MODELS)}")
    attributes = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if "factorize" in attributes:
        attributes["factorize"] = freeze_factorize(attributes["factorize"])
    return _MODELS[name](**attributes)


def make_model(config: Any, num_classes: int) -> nn.Module | nnx_models.NNXAdapter:
    """The model a run config names: ``get_model(config.model.name, num_classes=, **others)``.

    With ``config.model.api = "nnx"`` the model is the Flax NNX twin of that Linen model
    behind Linen's ``init`` / ``apply`` (`experiments.nnx_models.NNXAdapter`: same params
    tree, and the Linen init for the same key), so the trainer runs it unchanged.

    Args:
      config: a run config (an ``ml_collections.ConfigDict``; only ``config.model`` is read:
        ``name``, ``api`` (``"linen"``, the default when absent, or ``"nnx"``) and the
        module's attributes).
      num_classes: the size of the output layer (the dataset's ``num_classes``).

    Returns:
      The (unbound) Flax module, or its `experiments.nnx_models.NNXAdapter`.

    Raises:
      ValueError: as `get_model` (unknown name, invalid attribute); for an unknown
        ``config.model.api``, and with ``"nnx"`` for a model without an NNX version or a
        factorized one (`experiments.nnx_models.adapt`).
    """
    api = config.model.get("api", "linen")
    if api not in MODEL_APIS:
        raise ValueError(f"config.model.api={api!r} is unknown; known: {list(MODEL_APIS)}")
    kwargs = {k: v for k, v in config.model.items() if k not in ("name", "api")}
    model = get_model(config.model.name, num_classes=num_classes, **kwargs)
    if api == "nnx":
        return nnx_models.adapt(config.model.name, model)
    return model
