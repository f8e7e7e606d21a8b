"""Capturing and replacing a Flax model's activations: `capture`, the `write_*` functions that
stream them into shards, `splice` and `spliced_fidelity`. See `experiments.activations`."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.activations.shards import (
    FORMAT,
    INDEX_FILE,
    ActivationShards,
    ShardWriter,
    array_batches,
    check_capture,
    check_json,
    layer_folder,
    write_json,
)

__all__ = [
    "capture",
    "module_calls",
    "splice",
    "spliced_fidelity",
    "write_activations",
    "write_corpus_activations",
    "write_text_activations",
]

Layer = str | Sequence[str]


def _layer_name(layer: Any) -> str:
    """``"a/b"`` from ``"a/b"`` or ``("a", "b")``."""
    if isinstance(layer, str):
        return layer.strip("/")
    if isinstance(layer, Sequence) and all(isinstance(p, str) for p in layer):
        return "/".join(layer)
    raise ValueError(f"a layer must be a module path like 'encoder/layer_0', got {layer!r}")


def _layer_names(layers: Any) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    names = [_layer_name(layer) for layer in layers]
    if not names or any(not n for n in names):
        raise ValueError(f"layers must name at least one module path, got {layers!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"layers names {repeated} more than once")
    return names


def _as_args(batch: Any) -> tuple:
    """A batch as the positional arguments of ``apply_fn`` after the variables."""
    return tuple(batch) if isinstance(batch, tuple | list) else (batch,)


def module_calls(apply_fn: Callable[..., Any], variables: Any, *args: Any) -> dict[str, int]:
    """How many times each Linen module is called in ``apply_fn(variables, *args)``.

    Shapes only (`jax.eval_shape`): nothing is computed.

    Args:
      apply_fn: e.g. ``model.apply``.
      variables: e.g. ``{"params": params}`` (arrays or `jax.ShapeDtypeStruct`).
      *args: the model's inputs (arrays or `jax.ShapeDtypeStruct`).

    Returns:
      ``{"module/path": calls}`` in first-call order; the root module (path ``""``) is left
      out.
    """
    calls: dict[str, int] = {}

    def interceptor(next_fun, fargs, kwargs, context):
        if context.method_name == "__call__":
            name = "/".join(context.module.path)
            if name:
                calls[name] = calls.get(name, 0) + 1
        return next_fun(*fargs, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(apply_fn, variables, *args)
    return calls


def _check_layers(apply_fn, variables, args, names: list[str]) -> None:
    calls = module_calls(apply_fn, variables, *args)
    unknown = [n for n in names if n not in calls]
    if unknown:
        known = list(calls)
        shown = known if len(known) <= 40 else known[:40] + ["..."]
        raise ValueError(
            f"layers {unknown} are not modules the model calls; module paths it calls: {shown}"
        )
    repeated = [n for n in names if calls[n] > 1]
    if repeated:
        raise ValueError(
            f"layers {repeated} are called more than once in a forward pass; their "
            "activations would be ambiguous"
        )


def _recording_interceptor(names: Sequence[str], capture: str, seen: dict[str, Any]):
    wanted = set(names)

    def interceptor(next_fun, args, kwargs, context):
        name = "/".join(context.module.path)
        if context.method_name != "__call__" or name not in wanted:
            return next_fun(*args, **kwargs)
        if capture == "input":
            if not args:
                raise ValueError(f"layer {name!r} got no positional input to capture")
            seen[name] = args[0]
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        seen[name] = out
        return out

    return interceptor


def _capture_fn(apply_fn, names: list[str], capture: str):
    """``f(variables, *args) -> {layer: array}``, jitted: the forward pass with recording."""

    def run(variables, *args):
        seen: dict[str, Any] = {}
        with nn.intercept_methods(_recording_interceptor(names, capture, seen)):
            apply_fn(variables, *args)
        for name in names:
            if not isinstance(seen.get(name), jax.Array):
                raise ValueError(
                    f"layer {name!r}'s {capture} is a {type(seen.get(name)).__name__}, not an "
                    "array; capture a module whose output is one array"
                )
        return {name: seen[name] for name in names}

    return jax.jit(run)


def capture(
    apply_fn: Callable[..., Any],
    variables: Any,
    *args: Any,
    layers: Layer | Sequence[Layer],
    capture: str = "output",
) -> dict[str, jax.Array]:
    """The outputs (or inputs) of several modules in one forward pass of ``apply_fn``.

    Args:
      apply_fn: e.g. ``model.apply``.
      variables: e.g. ``{"params": params}``.
      *args: the model's inputs, e.g. ``x`` or ``(input_ids, attention_mask)``.
      layers: module paths, ``"encoder/layer_3"`` or ``("encoder", "layer_3")``, or one path.
      capture: ``"output"`` (what the module returns) or ``"input"`` (its first positional
        argument, e.g. an MLP's hidden activations as the next Dense layer receives them).

    Returns:
      ``{"module/path": array}``, each as the module produced or received it (e.g.
      ``[batch, tokens, d]``).

    Raises:
      ValueError: naming the layers the model does not call (listing those it does), layers
        called more than once, a non-array output, or an unknown ``capture``.
    """
    names = _layer_names(layers)
    capture = check_capture(capture)
    _check_layers(apply_fn, variables, args, names)
    return _capture_fn(apply_fn, names, capture)(variables, *args)


def _rows(name: str, value: jax.Array, mask: np.ndarray | None) -> np.ndarray:
    """Flattens ``[..., d]`` to rows ``[n, d]``, keeping those where ``mask [...]`` is set."""
    value = np.asarray(value)
    if value.ndim < 2:
        raise ValueError(
            f"layer {name!r} gave shape {value.shape}; need [..., d] with a batch axis"
        )
    if mask is None:
        return value.reshape(-1, value.shape[-1])
    if mask.shape != value.shape[:-1]:
        raise ValueError(
            f"the mask's shape {mask.shape} does not match layer {name!r}'s leading axes "
            f"{value.shape[:-1]}"
        )
    return value[mask]


def write_activations(
    folder: str,
    apply_fn: Callable[..., Any],
    variables: Any,
    batches: Iterable[Any],
    layers: Layer | Sequence[Layer],
    *,
    capture: str = "output",
    mask_arg: int | None = None,
    source: Any = "",
    dtype: str = "float32",
    shard_rows: int = 65536,
    overwrite: bool = False,
) -> dict[str, ActivationShards]:
    """Captures layers' activations over a data set into on-disk shards, one folder per layer.

    One jitted forward pass per batch records every layer at once (`capture`); each layer's
    activations ``[..., d]`` become rows ``[n, d]`` (leading axes flattened) appended to its
    `ShardWriter`.

    Args:
      folder: output folder; layer ``"encoder/layer_3"`` goes to ``folder/encoder.layer_3``.
      apply_fn: e.g. ``model.apply``.
      variables: e.g. ``{"params": params}``.
      batches: the model's inputs batch by batch: an array, or a tuple of positional
        arguments (e.g. ``(input_ids, attention_mask)``); see `array_batches`.
      layers: module paths (or one).
      capture: ``"output"`` or ``"input"`` of each module.
      mask_arg: index of the batch argument that marks the rows to keep (nonzero = keep),
        shaped like the activations' leading axes: ``1`` for a BERT's attention mask, so
        padding tokens are left out. None keeps every row.
      source: what the data is, JSON-serializable, recorded in every index.
      dtype: ``"float32"`` or ``"float16"`` on disk.
      shard_rows: rows per shard.
      overwrite: replace activations already in the layer folders.

    Returns:
      ``{"module/path": ActivationShards}``.

    Raises:
      ValueError: naming the bad argument: unknown or repeated layers (listing the module
        paths the model calls), a bad ``capture``, ``mask_arg`` or dtype, existing
        activations without ``overwrite``, no batches.
    """
    names = _layer_names(layers)
    capture = check_capture(capture)
    source = check_json("source", source)
    iterator = iter(batches)
    try:
        first = _as_args(next(iterator))
    except StopIteration:
        raise ValueError("batches must yield at least one batch, got none") from None
    if mask_arg is not None and not (
        isinstance(mask_arg, int) and not isinstance(mask_arg, bool) and 0 <= mask_arg < len(first)
    ):
        raise ValueError(
            f"mask_arg must index one of the batch's {len(first)} arguments, got {mask_arg!r}"
        )
    _check_layers(apply_fn, variables, first, names)
    run = _capture_fn(apply_fn, names, capture)
    dirs = {name: layer_folder(name) for name in names}
    clashes = sorted(n for n in names if list(dirs.values()).count(dirs[n]) > 1)
    if clashes:
        raise ValueError(f"layers {clashes} map to the same folder name")
    # Refused before anything is written, so a refusal leaves the folder as it was.
    existing = [n for n in names if os.path.exists(os.path.join(folder, dirs[n], INDEX_FILE))]
    if existing and not overwrite:
        raise ValueError(
            f"folder={folder!r} already holds activations of layers {existing}; pass "
            "overwrite=True to replace them"
        )
    os.makedirs(folder, exist_ok=True)
    write_json(
        os.path.join(folder, INDEX_FILE),
        {"format": FORMAT, "capture": capture, "source": source, "layers": dirs},
    )
    writers: dict[str, ShardWriter] = {}

    def consume(args: tuple) -> None:
        out = run(variables, *args)
        mask = None if mask_arg is None else np.asarray(args[mask_arg]) != 0
        for name in names:
            rows = _rows(name, out[name], mask)
            if name not in writers:
                writers[name] = ShardWriter(
                    os.path.join(folder, dirs[name]),
                    name,
                    d=rows.shape[1],
                    capture=capture,
                    source=source,
                    dtype=dtype,
                    shard_rows=shard_rows,
                    overwrite=overwrite,
                )
            writers[name].append(rows)

    consume(first)
    for batch in iterator:
        consume(_as_args(batch))
    return {name: writers[name].close() for name in names}


def write_text_activations(
    folder: str,
    model: nn.Module,
    params: Any,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Layer | Sequence[Layer],
    *,
    batch_size: int = 32,
    capture: str = "output",
    source: Any = None,
    **options: Any,
) -> dict[str, ActivationShards]:
    """Token activations of a pretrained BERT-family model on ``texts``, padding excluded.

    Each batch of texts is tokenized (`experiments.pretrained.tokenize`, padded to its
    longest text) and run as ``model.apply({"params": params}, input_ids, attention_mask)``;
    only real tokens' rows (``[CLS]`` and ``[SEP]`` included) are kept.

    Args:
      folder, layers, capture: as for `write_activations`; e.g. ``"encoder/layer_3"`` for
        the token states after encoder layer 3.
      model, params, tokenizer: from `experiments.pretrained.load`.
      texts: the sentences or passages.
      batch_size: texts per forward pass.
      source: recorded in the index (default: the number of texts).
      **options: more `write_activations` options (``dtype``, ``shard_rows``,
        ``overwrite``).

    Returns:
      ``{"module/path": ActivationShards}``, one row per real token.
    """
    from experiments import pretrained  # only this helper needs the tokenizer's packages

    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty sequence of strings")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    def batches():
        for start in range(0, len(texts), batch_size):
            enc = pretrained.tokenize(tokenizer, texts[start : start + batch_size])
            yield enc["input_ids"], enc["attention_mask"]

    return write_activations(
        folder,
        model.apply,
        {"params": params},
        batches(),
        layers,
        capture=capture,
        mask_arg=1,
        source={"texts": len(texts)} if source is None else source,
        **options,
    )


def write_corpus_activations(
    folder: str,
    model: nn.Module,
    params: Any,
    tokenizer: Any,
    layers: Layer | Sequence[Layer],
    *,
    n: int = 128,
    length: int = 64,
    seed: int = 0,
    batch_size: int = 32,
    capture: str = "output",
    **options: Any,
) -> dict[str, ActivationShards]:
    """Token activations of a pretrained model on its corpus's calibration split.

    The windows are `experiments.pretrained.corpus.calibration_ids` (``n`` windows of
    ``length`` tokens, ``[CLS] ... [SEP]``, no padding), so every token is a row; the
    corpus's identity (`corpus_info`) and the window settings are recorded as the source.

    Args:
      folder, layers, capture: as for `write_activations`.
      model, params, tokenizer: from `experiments.pretrained.load`.
      n, length, seed: the calibration windows.
      batch_size: windows per forward pass.
      **options: more `write_activations` options.

    Returns:
      ``{"module/path": ActivationShards}`` with ``n * length`` rows each.
    """
    from experiments.pretrained import corpus as corpus_lib

    corpus = corpus_lib.load_corpus()
    ids = corpus_lib.calibration_ids(tokenizer, n=n, length=length, seed=seed, corpus=corpus)
    info = corpus_lib.corpus_info(corpus)
    source = {
        "split": "calibration",
        "windows": n,
        "length": length,
        "seed": seed,
        **{k: v for k, v in info.items() if isinstance(v, str | int | float)},
    }
    return write_activations(
        folder,
        model.apply,
        {"params": params},
        array_batches(ids, batch_size=batch_size),
        layers,
        capture=capture,
        source=source,
        **options,
    )


def splice(
    apply_fn: Callable[..., Any],
    layer: Layer,
    replace: Callable[[jax.Array], jax.Array],
    *,
    capture: str = "output",
) -> Callable[..., Any]:
    """``apply_fn`` with one module's output (or input) replaced by ``replace`` of it.

    Args:
      apply_fn: e.g. ``model.apply``.
      layer: the module path.
      replace: ``[..., d] -> [..., d]``, e.g. a trained `sparsejax.sae.SAE` (calling one
        is ``decode(encode(x))``) or ``jnp.zeros_like`` for zero ablation.
      capture: replace what the module returns (``"output"``) or the first argument it
        receives (``"input"``).

    Returns:
      ``f(variables, *args)``, the model's output with the replacement spliced in (jit-able;
      the model is used as written, through `flax.linen.intercept_methods`). The layer is
      checked when ``f`` first runs: `spliced_fidelity` checks it up front.
    """
    name = _layer_name(layer)
    capture = check_capture(capture)

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or "/".join(context.module.path) != name:
            return next_fun(*args, **kwargs)
        if capture == "input":
            return next_fun(replace(args[0]), *args[1:], **kwargs)
        return replace(next_fun(*args, **kwargs))

    def spliced(variables, *args):
        with nn.intercept_methods(interceptor):
            return apply_fn(variables, *args)

    return spliced


def spliced_fidelity(
    apply_fn: Callable[..., Any],
    variables: Any,
    x: Any,
    y: Any,
    layer: Layer,
    reconstruct: Callable[[jax.Array], jax.Array],
    *,
    capture: str = "output",
    batch_size: int = 1000,
) -> dict[str, float]:
    """A classifier's accuracy and loss with a layer's activations replaced by a reconstruction.

    Args:
      apply_fn, variables: the classifier (e.g. an `experiments.models` MNIST-1D model),
        returning logits ``[batch, classes]``.
      x: inputs ``[n, ...]``; y: integer labels ``[n]``.
      layer: the module path whose activations are replaced.
      reconstruct: ``[..., d] -> [..., d]``, e.g. a trained `sparsejax.sae.SAE`.
      capture: replace the module's ``"output"`` or its ``"input"``.
      batch_size: examples per forward pass.

    Returns:
      ``{"accuracy", "loss"}`` of the model as is, ``{"spliced_accuracy", "spliced_loss"}``
      with the reconstruction spliced in, ``{"ablated_accuracy", "ablated_loss"}`` with the
      activations zeroed, and ``"loss_recovered"`` = (ablated loss - spliced loss) /
      (ablated loss - loss): 1 when the reconstruction is as good as the activations, 0
      when it is no better than zeros (nan when zeroing costs nothing). Losses are mean
      softmax cross-entropies.

    Raises:
      ValueError: naming the layer if the model does not call it once, or for mismatched
        ``x`` and ``y``.

    Reference: the spliced-in (downstream) loss of Bricken et al. 2023, "Towards
    Monosemanticity", and the "loss recovered" of Gao et al. 2024 relative to zero ablation.
    """
    name = _layer_name(layer)
    capture = check_capture(capture)
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[0] != y.shape[0] or y.ndim != 1:
        raise ValueError(f"x and y must be [n, ...] and [n], got shapes {x.shape} and {y.shape}")
    _check_layers(apply_fn, variables, (jnp.asarray(x[:1]),), [name])
    # A reconstruction that is a pytree of arrays (an SAE) is a jit argument, not constants
    # folded into the program.
    leaves = jax.tree.leaves(reconstruct)
    traced = bool(leaves) and all(isinstance(a, jax.Array | np.ndarray) for a in leaves)

    @jax.jit
    def scores(variables, replacement, xb, yb):
        replace = replacement if traced else reconstruct
        models = {
            "": apply_fn,
            "spliced_": splice(apply_fn, name, replace, capture=capture),
            "ablated_": splice(apply_fn, name, jnp.zeros_like, capture=capture),
        }
        out = {}
        for prefix, fn in models.items():
            logits = fn(variables, xb)
            out[f"{prefix}correct"] = jnp.sum(jnp.argmax(logits, -1) == yb)
            out[f"{prefix}loss"] = jnp.sum(
                optax.softmax_cross_entropy_with_integer_labels(logits, yb)
            )
        return out

    totals: dict[str, float] = {}
    for xb, yb in array_batches(x, y, batch_size=batch_size):
        batch_scores = scores(
            variables, reconstruct if traced else None, jnp.asarray(xb), jnp.asarray(yb)
        )
        for key, value in batch_scores.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    n = x.shape[0]
    result = {}
    for prefix in ("", "spliced_", "ablated_"):
        result[f"{prefix}accuracy"] = totals[f"{prefix}correct"] / n
        result[f"{prefix}loss"] = totals[f"{prefix}loss"] / n
    gap = result["ablated_loss"] - result["loss"]
    result["loss_recovered"] = (
        (result["ablated_loss"] - result["spliced_loss"]) / gap if gap > 0 else math.nan
    )
    return result
