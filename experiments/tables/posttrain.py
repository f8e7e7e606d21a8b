"""posttrain: one-shot pruning without retraining (magnitude, Wanda, SparseGPT, each +DSnoT).

Three trained models, pruned at 50/60/70% unstructured and at 2:4 and 4:8 from 128
calibration examples, layer by layer (`sparsejax.posttrain.prune_model`), then evaluated
with no retraining: the MNIST-1D transformer (`ViT1D`), the MNIST-1D CNN and an MLP on the
teacher-student task with heavy-tailed input feature scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs.base import get_base_config
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import stats, sweep
from experiments.tables import base
from sparsejax import posttrain

_CALIBRATION = 128
_METHODS = base.POSTTRAIN_METHODS
_PATTERNS = base.POSTTRAIN_PATTERNS
_MODELS = ("transformer", "CNN", "teacher-student MLP")
_ERRORS = "mean relative output error of the pruned layers on the calibration inputs, seed 0"


def _columns(quick: bool) -> list[str]:
    return ["50%", "2:4"] if quick else list(_PATTERNS)


def _models(quick: bool) -> tuple[str, ...]:
    return ("teacher-student MLP",) if quick else _MODELS


def _config(model: str, quick: bool) -> tuple[ml_collections.ConfigDict, tuple[str, ...]]:
    """A model's training config and the layers left dense (input embedding and classifier)."""
    if model == "transformer":
        return base.vit1d_config(quick), ("embed", "head")
    config = get_base_config()
    config.progress_bar = False
    config.total_steps = 300 if quick else 2000
    config.eval_every_steps = config.total_steps
    if model == "CNN":
        config.model.channels = 16 if quick else 32
        return config, ("conv1", "dense")
    config.dataset = ml_collections.ConfigDict(
        {"name": "teacher_student", "feature_scales": "heavy_tailed", "input_dim": 32}
    )
    config.model = ml_collections.ConfigDict(
        {"name": "mlp", "features": (32, 32) if quick else (128, 128)}
    )
    config.optimizer.learning_rate = 2e-3
    return config, ("output",)


def _row(model: str, method: str, refined: bool) -> str:
    return f"{model}: {method}" + (" + DSnoT" if refined else "")


def _run(quick, seeds, dataset, workdir, progress) -> base.TableRun:
    del workdir
    cols = _columns(quick)
    rows: list[str] = []
    results: dict = {}
    errors: dict = {}
    for model_name in _models(quick):
        config, skip = _config(model_name, quick)
        data = dataset if config.dataset.name == "mnist1d" else data_lib.load_from_config(config)
        trained = sweep.train_seeds(config, seeds, dataset=data, progress=progress, desc=model_name)
        model = models_lib.make_model(config, data.num_classes)
        x_cal = jnp.asarray(data.x_train[:_CALIBRATION])
        x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
        accuracy = jax.jit(
            lambda p, x, y, model=model: jnp.mean(
                jnp.argmax(model.apply({"params": p}, x), -1) == y
            )
        )
        dense_row = f"{model_name}: dense"
        rows.append(dense_row)
        dense = [float(a) for a in trained.test_accuracy[:, -1]]
        for col in cols:
            results[(dense_row, col)] = dense
        for label, method in _METHODS:
            for refined in (False, True):
                row = _row(model_name, label, refined)
                rows.append(row)
                for col in cols:
                    sparsity, n, m = _PATTERNS[col]
                    accs = []
                    for i in range(len(seeds)):
                        params = jax.tree.map(lambda a, i=i: a[i], trained.final_state.params)
                        out = posttrain.prune_model(
                            model.apply,
                            params,
                            x_cal,
                            method=method,
                            sparsity=sparsity,
                            n=n,
                            m=m,
                            dsnot=refined,
                            skip=skip,
                        )
                        accs.append(float(accuracy(out.params, x_test, y_test)))
                        if i == 0:
                            errors[(row, col)] = float(np.mean(list(out.errors.values())))
                    results[(row, col)] = accs
    return base.TableRun(rows, cols, results, {_ERRORS: errors})


def _claims(results: dict, cols: list) -> list[stats.Claim]:
    claims = []
    models = sorted({row.split(": ")[0] for row, *_ in results}, key=_MODELS.index)
    r = lambda model, method, col: results[(f"{model}: {method}", col)]  # noqa: E731
    for model in models:
        for col in cols:
            if col not in ("50%", "2:4"):
                continue
            for method in ("Wanda", "SparseGPT"):
                claims.append(
                    stats.better(
                        f"{model}, {col}: {method} beats magnitude pruning (Sun et al. 2024; "
                        "Frantar & Alistarh 2023)",
                        method,
                        r(model, method, col),
                        "magnitude",
                        r(model, "magnitude", col),
                    )
                )
            claims.append(
                stats.at_least(
                    f"{model}, {col}: SparseGPT is at least as accurate as Wanda (Sun et al. "
                    "2024 find them close)",
                    "SparseGPT",
                    r(model, "SparseGPT", col),
                    "Wanda",
                    r(model, "Wanda", col),
                )
            )
        if "2:4" in cols and "50%" in cols:
            gap = lambda col, model=model: (
                np.asarray(r(model, "Wanda", col))
                - np.asarray(  # noqa: E731
                    r(model, "magnitude", col)
                )
            )
            claims.append(
                stats.better(
                    f"{model}: the Wanda-over-magnitude gain is wider at 2:4 than at 50% "
                    "unstructured (Sun et al. 2024, LLaMA-2: +43.6 vs +8.5 perplexity)",
                    "gain at 2:4",
                    gap("2:4").tolist(),
                    "gain at 50%",
                    gap("50%").tolist(),
                )
            )
        high = "70%" if "70%" in cols else cols[0]
        for method in ("magnitude", "Wanda"):
            claims.append(
                stats.better(
                    f"{model}, {high}: DSnoT improves {method} without training "
                    "(Zhang et al. 2024)",
                    f"{method} + DSnoT",
                    r(model, f"{method} + DSnoT", high),
                    method,
                    r(model, method, high),
                )
            )
    return claims


def _notes(quick: bool) -> str:
    vit, _ = _config("transformer", quick)
    cnn, _ = _config("CNN", quick)
    mlp, _ = _config("teacher-student MLP", quick)
    return (
        f"Each model is trained dense ({vit.total_steps} steps of Adam, cosine decay, batch "
        f"{vit.batch_size}), then pruned once from the first {_CALIBRATION} training examples "
        "and evaluated without any retraining. Models: the MNIST-1D transformer `ViT1D` "
        f"(patch 4, i.e. 10 tokens of 4 positions; width {vit.model.width}, depth "
        f"{vit.model.depth}, {vit.model.num_heads} heads, MLP {vit.model.mlp_dim}); the "
        f"MNIST-1D CNN ({cnn.model.channels} channels); and an MLP "
        f"{tuple(mlp.model.features)} on the teacher-student task with heavy-tailed feature "
        "scales (2 of 32 inputs scaled by 10-100). The input embedding / first layer and the "
        "classifier stay dense, as the papers keep embeddings and the LM head dense (the "
        "CNN's first conv has 5 inputs per output and cannot hold 2:4): the transformer's "
        "query/key/value/out and MLP layers, the CNN's conv2 and conv3 and the MLP's two "
        "hidden layers are pruned, each at the column's sparsity. Layers are pruned in call "
        "order, each calibrated on the outputs of the already pruned layers before it. "
        "Magnitude compares |W| over the layer; Wanda |W|·||X|| per output; SparseGPT uses "
        "1% dampening and blocks of 128 inputs. + DSnoT refines each layer's mask (50 "
        "cycles, threshold 0.1, variance power 1) and, as in its paper, keeps the dense "
        "values of the kept weights, so on SparseGPT it drops the OBS weight update."
    )


base.register(
    base.Table(
        "posttrain",
        "Post-training pruning without retraining: magnitude vs Wanda vs SparseGPT (+DSnoT)",
        "sparsity pattern (per pruned layer)",
        str,
        lambda quick: [],
        _claims,
        _notes,
        run_all=_run,
    )
)
