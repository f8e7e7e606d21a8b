"""Factorizing a pretrained BERT's projections with tensornets, then healing it by distillation.

Two steps, as in Lebedev, Ganin, Rakhuba, Oseledets & Lempitsky, "Speeding-up Convolutional
Neural Networks Using Fine-tuned CP-Decomposition" (ICLR 2015): *decompose* each chosen dense
kernel of the trained model into the factors of a tensor-network layer at a fraction of its
parameters (`budget_factorization` picks the ranks, `factorize_projections` fits them with
`tensornets.factorize_params`: truncated SVD for a low-rank matrix, HOOI for Tucker, TT-SVD for
a TT-matrix), then *fine-tune* the factorized model briefly to recover what the truncation lost
(`distill`).

The fine-tuning has no labels: the dense model is the teacher and the factorized one the
student (knowledge distillation, Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
Network", 2015). The loss is the cosine embedding loss of DistilBERT (Sanh, Debut, Chaumond &
Wolf, "DistilBERT, a distilled version of BERT", 2019) applied to the sentence embeddings the
model exists to produce:

    L = mean_i [1 - cos(e_student(x_i), e_teacher(x_i))],

with e the mean-pooled, L2-normalized token states (`experiments.pretrained.mean_pool`) and x_i
windows of the corpus's *calibration* split (`experiments.pretrained.corpus.calibration_ids`);
the evaluation split stays held out for `experiments.pretrained.corpus.evaluate`.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import tensornets
from experiments import models as models_lib
from experiments.pretrained import corpus as corpus_lib
from experiments.pretrained.bert import BertConfig, BertModel, dense_layer_names, mean_pool

__all__ = [
    "DISTILL_FORMATS",
    "LAYER_GROUPS",
    "DistillData",
    "DistillResult",
    "budget_factorization",
    "distill",
    "distillation_data",
    "distillation_loss",
    "factorize_projections",
    "kernel_parameters",
    "make_distill_step",
    "projection_names",
]

# The formats sized to a budget: the matrix baseline and the two tensor networks of a dense
# kernel that tensornets fits by truncated SVDs. Left out: CP of the tensorized kernel (a CP of
# the matrix itself is "low_rank"), whose ALS took about 4.5 minutes per MiniLM MLP kernel on
# this project's 2 cores, and "tubal", which holds only the block-circulant part of a kernel
# (about 1/n3 of an unstructured kernel's energy, see experiments/tables/tensor.py).
DISTILL_FORMATS = ("low_rank", "tucker", "tt_matrix")
_ATTENTION = (
    "attention/self/query",
    "attention/self/key",
    "attention/self/value",
    "attention/output/dense",
)
_MLP = ("intermediate/dense", "output/dense")
# Projection groups of one encoder layer, relative to ``encoder/layer_{i}/``.
LAYER_GROUPS = {"mlp": _MLP, "attention": _ATTENTION, "all": _ATTENTION + _MLP}


def projection_names(
    config: BertConfig, layers: str | Sequence[str] = "mlp", *, blocks: Sequence[int] | None = None
) -> list[str]:
    """The projections a layer selection names, in call order.

    Args:
      config: the model's `BertConfig`.
      layers: ``"mlp"`` (both MLP kernels of each block: ``intermediate/dense`` 384 -> 1536 and
        ``output/dense`` 1536 -> 384 for MiniLM), ``"attention"`` (query, key, value and the
        attention output), ``"all"``, or a sequence of full paths from
        `experiments.pretrained.dense_layer_names`.
      blocks: encoder layer indices the group applies to (default all); only with a group name.

    Returns:
      Full paths such as ``"encoder/layer_0/intermediate/dense"``.

    Raises:
      ValueError: naming ``layers`` for an unknown group or path, or an empty selection;
        naming ``blocks`` for an index outside ``[0, num_hidden_layers)``.
    """
    known = dense_layer_names(config)
    if isinstance(layers, str):
        if layers not in LAYER_GROUPS:
            raise ValueError(
                f"layers must be one of {sorted(LAYER_GROUPS)} or a sequence of projection "
                f"paths, got {layers!r}"
            )
        n = config.num_hidden_layers
        chosen = range(n) if blocks is None else blocks
        for b in chosen:
            if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 0 <= b < n:
                raise ValueError(f"blocks must hold layer indices in [0, {n}), got {blocks!r}")
        wanted = {f"encoder/layer_{b}/{p}" for b in chosen for p in LAYER_GROUPS[layers]}
        names = [name for name in known if name in wanted]
    else:
        if blocks is not None:
            raise ValueError(f"blocks applies to a group name, not to explicit paths: {blocks!r}")
        names = list(layers)
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(
                f"layers names {unknown}, which are not projections of this model; e.g. {known[:2]}"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"layers names a projection twice: {names}")
    if not names:
        raise ValueError(f"layers={layers!r} (blocks={blocks!r}) selects no projection")
    return names


def _projection_shapes(config: BertConfig) -> dict[str, tuple[int, int]]:
    """``{path: (in, out)}`` of every projection's kernel."""
    h, m = config.hidden_size, config.intermediate_size
    shapes = {}
    for i in range(config.num_hidden_layers):
        for p in _ATTENTION:
            shapes[f"encoder/layer_{i}/{p}"] = (h, h)
        shapes[f"encoder/layer_{i}/intermediate/dense"] = (h, m)
        shapes[f"encoder/layer_{i}/output/dense"] = (m, h)
    return shapes


def _entry(fmt: str, n_in: int, n_out: int, budget: float, rank: Any) -> dict[str, Any]:
    """The factorize entry of one (n_in, n_out) kernel, its ranks resolved to explicit ints.

    tensornets resolves a float rank to the largest *uniform* rank whose factors fit that
    fraction of the dense kernel's entries (the formats' ``resolve_*`` through
    `tensornets.layers.layouts.dense_layout`); resolving here once makes the spec say which
    ranks were used.
    """
    layout = tensornets.layers.layouts.dense_layout(
        fmt, n_in, n_out, budget if rank is None else rank, None, None
    )
    if fmt == "low_rank":
        return {"format": fmt, "rank": int(layout.ranks[0])}
    entry = {"format": fmt, "rank": tuple(int(r) for r in layout.ranks)}
    if fmt == "tt_matrix":
        entry.update(in_shape=layout.in_shape, out_shape=layout.out_shape)
    return entry


def budget_factorization(
    config: BertConfig,
    *,
    layers: str | Sequence[str] = "mlp",
    format: str = "low_rank",  # noqa: A002 - the word tensornets' specs use
    budget: float = 0.5,
    rank: Any = None,
    blocks: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """The factorize spec that puts chosen projections at a fraction of their parameters.

    Each chosen kernel W (in, out) gets the largest uniform rank whose factors hold at most
    ``budget * in * out`` entries (biases are kept and not counted; `kernel_parameters` gives
    the realized counts):

    * ``"low_rank"``: W = U diag(w) V^T, r (in + out + 1) entries.
    * ``"tucker"``: Tucker-2 of the matrix, W = U G V^T with a dense core G (r1, r2),
      r1 r2 + in r1 + out r2 entries. For a matrix this is the low-rank function class with
      r^2 extra core entries, so it holds a lower rank than ``"low_rank"`` at equal
      parameters.
    * ``"tt_matrix"``: the TT-matrix of Novikov, Podoprikhin, Osokin & Vetrov, "Tensorizing
      Neural Networks" (2015), rows and columns each split into 3 balanced factors
      (`tensornets.balanced_factors`: 384 = 6*8*8, 1536 = 8*12*16), cores
      (r_{k-1}, m_k, n_k, r_k).

    Args:
      config: the model's `BertConfig`.
      layers: which projections, see `projection_names`.
      format: one of `DISTILL_FORMATS`.
      budget: fraction of each dense kernel's entries, in (0, 1].
      rank: an explicit rank for every chosen projection instead of the one ``budget`` buys
        (an int, or a tuple as the format's layer takes it; e.g. ``rank=384`` for an exact
        low-rank form of a 384 -> 1536 kernel); ``budget`` is then still validated but unused.
      blocks: encoder layer indices when ``layers`` is a group name (default all).

    Returns:
      ``{path: {"format", "rank", ("in_shape", "out_shape")}}`` with explicit ranks, in call
      order: the ``factorize`` of `BertModel` and `experiments.pretrained.save`.

    Raises:
      ValueError: naming the argument: ``format`` not in `DISTILL_FORMATS`, ``budget``
        outside (0, 1], an unknown ``layers`` / ``blocks`` selection, or a ``rank`` the
        format cannot take for some kernel (naming it).
    """
    if not isinstance(format, str) or format not in DISTILL_FORMATS:
        raise ValueError(f"format must be one of {DISTILL_FORMATS}, got {format!r}")
    if (
        isinstance(budget, bool)
        or not isinstance(budget, numbers.Real)
        or not math.isfinite(budget)
        or not 0 < budget <= 1
    ):
        raise ValueError(
            f"budget must be a fraction in (0, 1] of each kernel's parameters, got {budget!r}"
        )
    shapes = _projection_shapes(config)
    factorize = {}
    for name in projection_names(config, layers, blocks=blocks):
        n_in, n_out = shapes[name]
        try:
            factorize[name] = _entry(format, n_in, n_out, float(budget), rank)
        except ValueError as error:
            raise ValueError(f"rank={rank!r} for {name} ({n_in} -> {n_out}): {error}") from None
    return factorize


def factorize_projections(
    model: BertModel,
    params: Any,
    *,
    layers: str | Sequence[str] = "mlp",
    format: str = "low_rank",  # noqa: A002 - the word tensornets' specs use
    budget: float = 0.5,
    rank: Any = None,
    blocks: Sequence[int] | None = None,
) -> tuple[BertModel, Any, dict[str, dict[str, Any]]]:
    """Decomposes chosen projections of a dense BERT into tensor-network layers.

    The ranks come from `budget_factorization` (the largest uniform rank within ``budget`` of
    each kernel's entries); each trained kernel is then fitted by
    `tensornets.factorize_params`, Lebedev et al. 2015's decomposition step: a low-rank matrix
    by the truncated SVD (the Eckart-Young optimum, where tensornets' ALS starts and stays),
    Tucker-2 by HOOI (for a matrix, the SVD's singular subspaces), a TT-matrix by TT-SVD
    (Oseledets 2011).

    Args:
      model: a dense `BertModel` (``factorize`` empty).
      params: its params (``model.apply({"params": params}, ids)``).
      layers, format, budget, rank, blocks: see `budget_factorization`.

    Returns:
      ``(student_model, student_params, factorize)``: a `BertModel` built with
      ``factorize``, its params (the decomposed factors and the kept biases at the factorized
      paths, every other leaf the input's own array), and the factorize spec
      ``{path: {"format", "rank", ...}}`` (what `BertModel`, `experiments.pretrained.save`
      and `kernel_parameters` take).

    Raises:
      ValueError: naming the argument: a ``model`` that is not a dense `BertModel`, or any
        error of `budget_factorization`.
    """
    if not isinstance(model, BertModel):
        raise ValueError(f"model must be an experiments.pretrained.BertModel, got {model!r:.80}")
    if model.factorize:
        raise ValueError(
            f"model must be dense; it already factorizes {[n for n, _ in model.factorize]}"
        )
    factorize = budget_factorization(
        model.config, layers=layers, format=format, budget=budget, rank=rank, blocks=blocks
    )
    student = BertModel(model.config, factorize=factorize)
    student_params = tensornets.factorize_params(params, models_lib.factorize_spec(factorize))
    return student, student_params, factorize


def kernel_parameters(config: BertConfig, factorize: Any) -> dict[str, dict[str, int]]:
    """Entries of each factorized kernel and of the dense kernel it replaces (biases excluded).

    Counted with `tensornets.factorized_dense_cost` (its parameter count less the bias), so
    it is what the layer allocates, without building the model.

    Args:
      config: the model's `BertConfig`.
      factorize: a factorize spec (as `budget_factorization` returns).

    Returns:
      ``{path: {"dense": in * out, "factorized": factor entries}}``.

    Raises:
      ValueError: naming ``factorize`` for a path that is not a projection of ``config``.
    """
    shapes = _projection_shapes(config)
    counts = {}
    for path, entry in models_lib.freeze_factorize(factorize):
        if path not in shapes:
            raise ValueError(f"factorize names {path!r}, which is not a projection of the model")
        n_in, n_out = shapes[path]
        layer = tensornets.FactorizedDense(n_out, **dict(entry))
        cost = tensornets.factorized_dense_cost(layer, n_in)
        counts[path] = {"dense": n_in * n_out, "factorized": cost["params"] - n_out}
    return counts


# --- Distillation ------------------------------------------------------------------------


class DistillData(NamedTuple):
    """What the student is distilled on: calibration windows and the teacher's embeddings.

    Attributes:
      ids: int32 [n, length], ``[CLS] ... [SEP]`` windows of the calibration split, no padding.
      targets: float32 [n, hidden], the teacher's normalized embeddings of ``ids``.
    """

    ids: np.ndarray
    targets: np.ndarray


class DistillResult(NamedTuple):
    """What `distill` returns.

    Attributes:
      params: the healed student params (frozen leaves are the input's own arrays).
      losses: float32 [steps], the training loss of each step's batch (before its update).
      seconds: wall-clock time of the training loop (compilation included).
      traces: how many times the step function was traced by this call (1 unless the
        compiled step was already cached by an identical earlier call, then 0).
    """

    params: Any
    losses: np.ndarray
    seconds: float
    traces: int


def distillation_data(
    teacher_model: BertModel,
    teacher_params: Any,
    tokenizer: Any,
    *,
    n_windows: int = 512,
    length: int = 64,
    seed: int = 0,
    batch_size: int = 64,
) -> DistillData:
    """Calibration windows and the teacher's sentence embeddings of them, computed once.

    The windows come from `experiments.pretrained.corpus.calibration_ids` (the calibration
    split only; the evaluation split stays held out), so several students distilled from one
    teacher can share them.

    Args:
      teacher_model, teacher_params: the dense model.
      tokenizer: its tokenizer.
      n_windows: number of windows in the pool.
      length: tokens per window, ``[CLS]`` and ``[SEP]`` included.
      seed: seed of the window starts.
      batch_size: windows per teacher forward pass.

    Returns:
      A `DistillData`.
    """
    ids = corpus_lib.calibration_ids(tokenizer, n=n_windows, length=length, seed=seed)
    forward = jax.jit(
        lambda p, x: mean_pool(teacher_model.apply({"params": p}, x), jnp.ones_like(x))
    )
    targets = np.concatenate(
        [
            np.asarray(forward(teacher_params, jnp.asarray(ids[i : i + batch_size])))
            for i in range(0, len(ids), batch_size)
        ]
    )
    return DistillData(ids, targets.astype(np.float32))


def distillation_loss(model: BertModel, params: Any, ids: jax.Array, targets: jax.Array):
    """Mean cosine embedding loss ``1 - cos(e(ids), targets)`` over the batch.

    Args:
      model: the student.
      params: its params.
      ids: int [batch, tokens], unpadded windows.
      targets: float [batch, hidden], unit-norm teacher embeddings.

    Returns:
      A float32 scalar in [0, 2].
    """
    student = mean_pool(model.apply({"params": params}, ids), jnp.ones_like(ids))
    return jnp.mean(1.0 - jnp.sum(student * targets, axis=-1))


def _optimizer(learning_rate: float, steps: int, warmup_steps: int, weight_decay: float):
    """AdamW with a linear warmup and a cosine decay to 10% of the peak rate."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(steps, warmup_steps + 1), learning_rate / 10
    )
    return optax.adamw(schedule, weight_decay=weight_decay)


def make_distill_step(
    student_model: BertModel, optimizer: optax.GradientTransformation, batch_size: int
):
    """The (unjitted, pure) training step of `distill`.

    Args:
      student_model: the student.
      optimizer: an optax transformation over the trainable params.
      batch_size: windows per step, drawn without replacement from the pool.

    Returns:
      ``step(trainable, frozen, opt_state, ids, targets, key, step) -> (trainable, opt_state,
      loss)``: ``trainable`` and ``frozen`` are flat ``{"a/b/kernel": array}`` dicts whose
      union is the student's params; only ``trainable`` is differentiated, so the frozen
      weights' gradients are never computed; ``ids`` / ``targets`` are the whole pool
      (`DistillData`) and ``fold_in(key, step)`` picks the batch, so the data order is
      the key's.
    """

    def loss_fn(trainable, frozen, ids, targets):
        params = flax.traverse_util.unflatten_dict({**frozen, **trainable}, sep="/")
        return distillation_loss(student_model, params, ids, targets)

    def step(trainable, frozen, opt_state, ids, targets, key, step):
        chosen = jax.random.choice(
            jax.random.fold_in(key, step), ids.shape[0], (batch_size,), replace=False
        )
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids[chosen], targets[chosen])
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


class _Hyper(NamedTuple):
    batch_size: int
    learning_rate: float
    steps: int
    warmup_steps: int
    weight_decay: float


# One compiled step per (student, hyperparameters), kept for the process's life: the seeds of
# one table cell reuse it. The counter in the list records traces (the body runs only when jax
# traces it).
@functools.cache
def _compiled_step(student_model: BertModel, hyper: _Hyper):
    optimizer = _optimizer(hyper.learning_rate, hyper.steps, hyper.warmup_steps, hyper.weight_decay)
    inner = make_distill_step(student_model, optimizer, hyper.batch_size)
    traces = [0]

    def counted(*args):
        traces[0] += 1
        return inner(*args)

    return jax.jit(counted, donate_argnums=(0, 2)), optimizer, traces


def _trainable_paths(student_model: BertModel, trainable: Any) -> tuple[str, ...]:
    if trainable == "factorized":
        paths = tuple(name for name, _ in student_model.factorize)
        if not paths:
            raise ValueError(
                "trainable='factorized' needs a factorized student (model.factorize is empty); "
                "pass trainable='all' or module paths"
            )
        return paths
    if trainable == "all":
        return ("",)  # the prefix of every path
    if (
        isinstance(trainable, str)
        or not isinstance(trainable, Sequence)
        or not trainable
        or not all(isinstance(p, str) and p for p in trainable)
    ):
        raise ValueError(
            f"trainable must be 'factorized', 'all' or a non-empty sequence of module paths, "
            f"got {trainable!r}"
        )
    return tuple(trainable)


def _under(leaf: str, module: str) -> bool:
    """Whether the flat leaf path ``leaf`` ("a/b/kernel") belongs to the module path ``module``."""
    return module == "" or leaf.startswith(module + "/")


def _check_positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def distill(
    key: jax.Array,
    student_model: BertModel,
    student_params: Any,
    teacher_model: BertModel,
    teacher_params: Any,
    tokenizer: Any,
    *,
    steps: int = 300,
    batch_size: int = 16,
    length: int = 64,
    learning_rate: float = 3e-4,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    trainable: str | Sequence[str] = "factorized",
    data: DistillData | None = None,
    n_windows: int | None = None,
    progress: bool = False,
) -> DistillResult:
    """Heals a compressed student by distilling the dense teacher's sentence embeddings.

    Minimizes ``1 - cos(student embedding, teacher embedding)`` (`distillation_loss`; the
    cosine embedding loss of Sanh et al. 2019, DistilBERT, in the teacher-student setting of
    Hinton et al. 2015) on windows of the corpus's calibration split, with AdamW under a linear
    warmup and a cosine decay to a tenth of ``learning_rate``; the fine-tuning step of Lebedev
    et al. 2015's decompose-then-fine-tune.

    Only the ``trainable`` modules' params change. Freezing is done by differentiating only
    those leaves (the others are arguments of the jitted step that `jax.value_and_grad` does
    not differentiate), rather than by masking updates (``optax.multi_transform`` with
    ``set_to_zero``): the frozen weights' gradients are never computed (nor the backward pass
    below the lowest trainable layer), the optimizer state holds only the trainable leaves, and
    the frozen leaves come back as the very arrays passed in (bitwise unchanged).

    Cost on CPU: a step is one student forward and backward on ``batch_size * length`` tokens.
    Measured for MiniLM with its 12 MLP kernels factorized at 25%, on 2 cores shared with other
    jobs: 0.4 s a step of 8 x 64 tokens for a low-rank or Tucker-2 student and 0.85 s for a
    TT-matrix one; 0.55-0.7 s a step of 16 x 64 for low-rank. The defaults (300 steps of
    16 x 64) take 3-7 minutes there.

    Args:
      key: a `jax.random.key`; ``fold_in(key, step)`` draws each step's batch from the pool.
      student_model, student_params: the compressed model and its params (e.g. from
        `factorize_projections`).
      teacher_model, teacher_params: the dense model.
      tokenizer: the tokenizer (for the calibration windows).
      steps: optimizer steps.
      batch_size: windows per step (at most the pool size).
      length: tokens per window of the pool built when ``data`` is None.
      learning_rate: peak learning rate.
      warmup_steps: linear warmup length; default ``steps // 10``.
      weight_decay: AdamW's decoupled weight decay; 0 by default, since the decomposed
        factors, not zero, are the point to stay near.
      trainable: ``"factorized"`` (the student's factorized projections: factors and
        biases), ``"all"``, or a sequence of module paths (``"encoder/layer_0/output"``).
      data: the windows and teacher embeddings (`distillation_data`); computed from the
        teacher (``n_windows`` windows of ``length`` tokens, seed 0) when None.
      n_windows: pool size when ``data`` is None; default ``min(512, steps * batch_size)``,
        the windows the run can draw (512 windows of 64 tokens cover the calibration split).
      progress: show a progress bar.

    Returns:
      A `DistillResult` (healed params, per-step losses, seconds, traces).

    Raises:
      FloatingPointError: when the loss becomes NaN or inf (naming the first such step; a
        lower ``learning_rate`` is the usual cure).
      ValueError: naming the argument: a non-positive ``steps`` / ``batch_size`` /
        ``length``, a ``batch_size`` above the pool, a ``learning_rate`` that is not a
        positive finite number, a negative ``weight_decay``, or a ``trainable`` selection
        that matches no parameter.
    """
    steps = _check_positive(steps, "steps")
    batch_size = _check_positive(batch_size, "batch_size")
    length = _check_positive(length, "length")
    if (
        isinstance(learning_rate, bool)
        or not isinstance(learning_rate, numbers.Real)
        or not (math.isfinite(learning_rate) and learning_rate > 0)
    ):
        raise ValueError(f"learning_rate must be a positive finite number, got {learning_rate!r}")
    if not isinstance(weight_decay, numbers.Real) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    warmup_steps = steps // 10 if warmup_steps is None else int(warmup_steps)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
    paths = _trainable_paths(student_model, trainable)
    if data is None:
        if n_windows is None:
            n_windows = min(512, steps * batch_size)
        data = distillation_data(
            teacher_model, teacher_params, tokenizer, n_windows=n_windows, length=length
        )
    if batch_size > len(data.ids):
        raise ValueError(f"batch_size={batch_size} exceeds the {len(data.ids)} windows of data")

    flat = flax.traverse_util.flatten_dict(student_params, sep="/")
    trained = {k: v for k, v in flat.items() if any(_under(k, p) for p in paths)}
    if not trained:
        raise ValueError(f"trainable={trainable!r} matches no parameter of the student")
    frozen = {k: v for k, v in flat.items() if k not in trained}

    hyper = _Hyper(batch_size, float(learning_rate), steps, warmup_steps, float(weight_decay))
    step_fn, optimizer, traces = _compiled_step(student_model, hyper)
    traces_before = traces[0]
    # The step donates its trainable params and optimizer state: copy so the caller's
    # arrays stay valid.
    current = jax.tree.map(jnp.array, trained)
    opt_state = optimizer.init(current)
    ids, targets = jnp.asarray(data.ids), jnp.asarray(data.targets)
    losses = []
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="distill", disable=not progress):
        current, opt_state, loss = step_fn(current, frozen, opt_state, ids, targets, key, step)
        losses.append(loss)
    losses = np.asarray(jax.device_get(losses), np.float32)
    seconds = time.perf_counter() - start
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise FloatingPointError(
            f"the distillation loss is {losses[bad[0]]} at step {bad[0]} of {steps} "
            f"(learning_rate={learning_rate}); try a lower learning_rate"
        )
    params = flax.traverse_util.unflatten_dict({**frozen, **current}, sep="/")
    return DistillResult(params, losses, seconds, traces[0] - traces_before)
