"""Datasets and batching for the experiments: numpy arrays, offline, deterministic.

Every loader returns a `Dataset` of numpy arrays (inputs ``float32``, labels ``int32``,
channels-last so Flax ``nn.Conv`` applies directly). Nothing here downloads: MNIST-1D is
generated procedurally (and cached, written with `experiments.checkpoints.write_atomically`),
teacher-student data is synthetic, and CIFAR-10 is read from a folder the user provides.
`load_from_config` loads the dataset a run config names.

Batch order is a pure function of ``(seed, step)`` (see `batch_at`), so a run resumed at step
``k`` sees exactly the batches an uninterrupted run would have seen from step ``k`` on.
"""

from __future__ import annotations

import inspect
import os
import pickle
import random
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from experiments import checkpoints

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Dataset",
    "batch_at",
    "batches",
    "check_dataset_config",
    "default_cache_dir",
    "load_cifar10",
    "load_dataset",
    "load_from_config",
    "load_mnist1d",
    "load_teacher_student",
]

# Per-channel mean and standard deviation of the CIFAR-10 training pixels scaled to [0, 1].
# (The often-copied std (0.2023, 0.1994, 0.2010) is a per-image average, not the pixel std.)
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)

_CACHE_DIR_ENV = "SPARSEJAX_DATA_DIR"
_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST_FILE = "test_batch"
# Bump when the generation recipe changes so stale caches are never read.
_MNIST1D_CACHE_VERSION = 1


class Dataset(NamedTuple):
    """A train/test split held in numpy arrays.

    Attributes:
      x_train: ``float32[N_train, *input_shape]``.
      y_train: ``int32[N_train]`` with values in ``[0, num_classes)``.
      x_test: ``float32[N_test, *input_shape]``.
      y_test: ``int32[N_test]``.
      num_classes: number of classes (a Python int).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


# ---------------------------------------------------------------------------------------------
# MNIST-1D
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> str:
    """The cache directory: ``$SPARSEJAX_DATA_DIR`` if set, else ``~/.cache/sparsejax``."""
    return os.environ.get(_CACHE_DIR_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "sparsejax"
    )


def _mnist1d_cache_path(cache_dir: str, seed: int) -> str:
    return os.path.join(cache_dir, f"mnist1d_v{_MNIST1D_CACHE_VERSION}_seed{seed}.npz")


def _generate_mnist1d(seed: int) -> Dataset:
    """Runs mnist1d's procedural generator with the standard arguments and ``seed``."""
    import mnist1d.data  # Imported lazily: only this loader needs it.

    args = mnist1d.data.get_dataset_args()
    args.seed = seed
    # make_dataset seeds the global `random` and `np.random` generators; restore them so that
    # loading data has no hidden effect on the caller's randomness.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = mnist1d.data.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    # make_dataset already standardizes x with one scalar mean/std over all 5000 examples, so
    # the values are ~N(0, 1)-scaled; we keep them as published rather than re-normalizing.
    return Dataset(
        x_train=np.asarray(raw["x"], dtype=np.float32)[..., None],
        y_train=np.asarray(raw["y"], dtype=np.int32),
        x_test=np.asarray(raw["x_test"], dtype=np.float32)[..., None],
        y_test=np.asarray(raw["y_test"], dtype=np.int32),
        num_classes=10,
    )


def load_mnist1d(cache_dir: str | None = None, *, seed: int = 42) -> Dataset:
    """Loads MNIST-1D (4000 train / 1000 test, length 40, 10 classes), generated offline.

    The dataset is produced by ``mnist1d.data.make_dataset`` with the standard arguments
    (``get_dataset_args()``) and ``args.seed = seed``; seed 42 is the paper's dataset. Nothing is
    downloaded. The result is cached as ``mnist1d_v1_seed{seed}.npz`` in ``cache_dir`` (written
    atomically, so an interrupted run never leaves a partial cache) and read from there later.

    Inputs are left as generated: mnist1d standardizes all 5000 sequences with a single scalar
    mean and std (so train and test are ~zero-mean, unit-std, values within about +-6). That
    scalar touches the test split too, but it is part of the published dataset definition, so we
    keep it for comparability and apply no further normalization.

    Args:
      cache_dir: directory for the cache; defaults to `default_cache_dir()`
        (``$SPARSEJAX_DATA_DIR`` or ``~/.cache/sparsejax``).
      seed: generator seed (non-negative int).

    Returns:
      A `Dataset` with ``x_train: float32[4000, 40, 1]``, ``y_train: int32[4000]``,
      ``x_test: float32[1000, 40, 1]``, ``y_test: int32[1000]``, ``num_classes=10``.

    Raises:
      ValueError: if ``seed`` is not a non-negative int.

    Reference: Greydanus, "Scaling down Deep Learning", 2020 (the MNIST-1D benchmark).
    """
    _check_int(seed, "seed", minimum=0)
    cache_dir = default_cache_dir() if cache_dir is None else os.fspath(cache_dir)
    path = _mnist1d_cache_path(cache_dir, seed)
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as cached:
            return Dataset(
                x_train=cached["x_train"],
                y_train=cached["y_train"],
                x_test=cached["x_test"],
                y_test=cached["y_test"],
                num_classes=int(cached["num_classes"]),
            )
    dataset = _generate_mnist1d(seed)
    arrays = dataset._asdict()
    arrays["num_classes"] = np.asarray(dataset.num_classes)
    os.makedirs(cache_dir, exist_ok=True)
    checkpoints.write_atomically(path, lambda f: np.savez(f, **arrays))
    return dataset


# ---------------------------------------------------------------------------------------------
# Teacher-student
# ---------------------------------------------------------------------------------------------

_FEATURE_SCALES = ("uniform", "heavy_tailed")
# Independent random streams, so e.g. the test set does not depend on num_train.
_TEACHER_STREAM, _CALIBRATION_STREAM, _TRAIN_STREAM, _TEST_STREAM, _SCALES_STREAM = range(5)
_CALIBRATION_SIZE = 10_000


def _feature_scales(input_dim: int, kind: str, seed: int) -> np.ndarray:
    """Per-feature input scales: all ones, or a few log-uniform outliers in [10, 100]."""
    scales = np.ones(input_dim, dtype=np.float64)
    if kind == "heavy_tailed":
        rng = np.random.default_rng([seed, _SCALES_STREAM])
        num_outliers = max(1, round(input_dim / 16))
        outliers = rng.choice(input_dim, size=num_outliers, replace=False)
        scales[outliers] = 10.0 ** rng.uniform(1.0, 2.0, size=num_outliers)
    return scales


def load_teacher_student(
    *,
    num_train: int = 4000,
    num_test: int = 1000,
    input_dim: int = 32,
    hidden: int = 64,
    num_classes: int = 10,
    seed: int = 0,
    feature_scales: str = "uniform",
) -> Dataset:
    """Synthetic classification labelled by a random two-layer tanh teacher.

    Latent inputs ``z ~ N(0, I_d)`` are labelled ``y = argmax(tanh(z W1) W2 + b2)`` with
    ``W1 ~ N(0, 1/d)``, ``W2 ~ N(0, 1/hidden)``. The teacher's output layer is then calibrated on
    a separate sample of 10,000 latents so that every class logit has zero mean and unit
    variance, which keeps the classes roughly balanced. The student sees ``x = z * s`` with
    per-feature scales ``s``:

    * ``'uniform'``: ``s = 1``.
    * ``'heavy_tailed'``: outlier features. ``max(1, round(d / 16))`` randomly chosen features
      get a scale drawn log-uniformly from [10, 100]; the rest keep scale 1. (Like the outlier
      feature dimensions of large transformers, Dettmers et al., "LLM.int8()", 2022.)

    The labels depend only on ``z``, so for a given seed both settings have identical labels and
    differ only in input conditioning. Everything is a deterministic function of the arguments;
    train, test, teacher and scales use independent streams of ``seed``, so the test set does
    not change with ``num_train`` and a smaller training set is a prefix of a larger one.

    Args:
      num_train: number of training examples (positive).
      num_test: number of test examples (positive).
      input_dim: input dimension ``d`` (positive).
      hidden: teacher hidden width (positive).
      num_classes: number of classes (>= 2).
      seed: non-negative int.
      feature_scales: ``'uniform'`` or ``'heavy_tailed'``.

    Returns:
      A `Dataset` with ``x_train: float32[num_train, d]``, ``y_train: int32[num_train]``,
      ``x_test: float32[num_test, d]``, ``y_test: int32[num_test]``.

    Raises:
      ValueError: naming the argument, for a non-positive size, ``num_classes < 2``, a negative
        seed or an unknown ``feature_scales``.
    """
    _check_int(num_train, "num_train", minimum=1)
    _check_int(num_test, "num_test", minimum=1)
    _check_int(input_dim, "input_dim", minimum=1)
    _check_int(hidden, "hidden", minimum=1)
    _check_int(num_classes, "num_classes", minimum=2)
    _check_int(seed, "seed", minimum=0)
    if feature_scales not in _FEATURE_SCALES:
        raise ValueError(f"feature_scales must be one of {_FEATURE_SCALES}, got {feature_scales!r}")

    teacher_rng = np.random.default_rng([seed, _TEACHER_STREAM])
    w1 = teacher_rng.standard_normal((input_dim, hidden)) / np.sqrt(input_dim)
    w2 = teacher_rng.standard_normal((hidden, num_classes)) / np.sqrt(hidden)

    calibration = np.random.default_rng([seed, _CALIBRATION_STREAM]).standard_normal(
        (_CALIBRATION_SIZE, input_dim)
    )
    calibration_logits = np.tanh(calibration @ w1) @ w2
    logit_mean = calibration_logits.mean(axis=0)
    logit_std = calibration_logits.std(axis=0)

    def label(z: np.ndarray) -> np.ndarray:
        logits = (np.tanh(z @ w1) @ w2 - logit_mean) / logit_std
        return np.argmax(logits, axis=1).astype(np.int32)

    z_train = np.random.default_rng([seed, _TRAIN_STREAM]).standard_normal((num_train, input_dim))
    z_test = np.random.default_rng([seed, _TEST_STREAM]).standard_normal((num_test, input_dim))
    scales = _feature_scales(input_dim, feature_scales, seed)
    return Dataset(
        x_train=(z_train * scales).astype(np.float32),
        y_train=label(z_train),
        x_test=(z_test * scales).astype(np.float32),
        y_test=label(z_test),
        num_classes=num_classes,
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------


def _find_cifar10_folder(data_dir: str) -> str:
    candidates = (os.path.join(data_dir, _CIFAR10_FOLDER), data_dir)
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, _CIFAR10_TRAIN_FILES[0])):
            missing = [
                name
                for name in (*_CIFAR10_TRAIN_FILES, _CIFAR10_TEST_FILE)
                if not os.path.isfile(os.path.join(folder, name))
            ]
            if missing:
                raise ValueError(
                    f"data_dir={data_dir!r}: CIFAR-10 folder {folder!r} is missing {missing}"
                )
            return folder
    raise ValueError(
        f"data_dir={data_dir!r} does not hold CIFAR-10 in the python format: expected "
        f"'{_CIFAR10_FOLDER}/' (or data_dir itself being it) with pickled files "
        f"{', '.join(_CIFAR10_TRAIN_FILES)} and {_CIFAR10_TEST_FILE} (from "
        "cifar-10-python.tar.gz). Nothing is downloaded; fetch and extract it yourself."
    )


def _read_cifar10_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one pickled batch: uint8 ``[n, 32, 32, 3]`` images and int32 ``[n]`` labels."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int32)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise ValueError(
            f"{path}: expected data uint8[n, 3072] and n labels, got data {data.shape} and "
            f"labels {labels.shape}"
        )
    # Rows are channel-major (1024 red, 1024 green, 1024 blue values); go to channels-last.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def _normalize_cifar10(images: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float32) / 255.0 - CIFAR10_MEAN) / CIFAR10_STD).astype(np.float32)


def load_cifar10(data_dir: str) -> Dataset:
    """Reads CIFAR-10 from the standard python-format folder, normalized per channel.

    Pixels are scaled to [0, 1], then each channel is normalized with the training-set
    statistics `CIFAR10_MEAN` and `CIFAR10_STD`. The files are Python pickles: only read data
    you trust. Nothing is downloaded.

    Args:
      data_dir: either the ``cifar-10-batches-py`` folder itself or a directory containing it.
        It must hold ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``, each a pickled
        dict with ``b'data'`` (``uint8[10000, 3072]``, channel-major rows) and ``b'labels'``.

    Returns:
      A `Dataset` with ``x_train: float32[50000, 32, 32, 3]``, ``y_train: int32[50000]``,
      ``x_test: float32[10000, 32, 32, 3]``, ``y_test: int32[10000]``, ``num_classes=10``
      (sizes are whatever the files hold).

    Raises:
      ValueError: naming ``data_dir`` and the expected layout if the files are not there, or if
        a batch has the wrong shape.

    Reference: Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009.
    """
    data_dir = os.fspath(data_dir)
    folder = _find_cifar10_folder(data_dir)
    train = [_read_cifar10_batch(os.path.join(folder, name)) for name in _CIFAR10_TRAIN_FILES]
    x_test, y_test = _read_cifar10_batch(os.path.join(folder, _CIFAR10_TEST_FILE))
    return Dataset(
        x_train=_normalize_cifar10(np.concatenate([images for images, _ in train])),
        y_train=np.concatenate([labels for _, labels in train]),
        x_test=_normalize_cifar10(x_test),
        y_test=y_test,
        num_classes=10,
    )


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_LOADERS: dict[str, Callable[..., Dataset]] = {
    "cifar10": load_cifar10,
    "mnist1d": load_mnist1d,
    "teacher_student": load_teacher_student,
}


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """Loads a dataset by name: ``'cifar10'``, ``'mnist1d'`` or ``'teacher_student'``.

    Args:
      name: registry name.
      **kwargs: passed to the loader (`load_cifar10`, `load_mnist1d`, `load_teacher_student`).

    Returns:
      The loader's `Dataset`.

    Raises:
      ValueError: if ``name`` is unknown (the message lists the known names).
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset name={name!r}; known names: {sorted(_LOADERS)}")
    return _LOADERS[name](**kwargs)


def _config_kwargs(config: Any) -> tuple[str, dict[str, Any]]:
    """``config.dataset``'s name and the loader arguments its other non-empty keys give."""
    name = config.dataset.name
    if name not in _LOADERS:
        raise ValueError(
            f"unknown dataset name={name!r} (config.dataset.name); known names: {sorted(_LOADERS)}"
        )
    accepted = inspect.signature(_LOADERS[name]).parameters
    kwargs = {}
    for key, value in config.dataset.items():
        if key == "name" or value == "":
            continue
        if key not in accepted:
            raise ValueError(
                f"config.dataset.{key}={value!r} is not read by dataset {name!r} (it reads "
                f"{sorted(accepted)}); leave it empty or set config.dataset.name"
            )
        kwargs[key] = value
    return name, kwargs


def check_dataset_config(config: Any) -> None:
    """Checks ``config.dataset`` without loading any data: a ValueError naming the key, or None.

    Checks that the name is known, that every other non-empty key is an argument
    of that dataset's loader, and for ``cifar10`` that ``config.dataset.data_dir``
    names a folder holding the CIFAR-10 python batches (the file names, not their
    contents). Empty strings mean "the loader's default", except that CIFAR-10
    has no default folder.

    Args:
      config: a run config (only ``config.dataset`` is read).

    Raises:
      ValueError: naming the ``config.dataset`` key and its value.
    """
    name, kwargs = _config_kwargs(config)
    if name == "cifar10":
        if "data_dir" not in kwargs:
            raise ValueError(
                "config.dataset.data_dir='' must name the folder holding CIFAR-10 "
                f"('{_CIFAR10_FOLDER}/' or a folder containing it) for "
                "config.dataset.name='cifar10'"
            )
        try:
            _find_cifar10_folder(os.fspath(kwargs["data_dir"]))
        except ValueError as error:
            # The loader's message starts "data_dir=...": name the config key it came from.
            raise ValueError(f"config.dataset.{error}") from None


def load_from_config(config: Any) -> Dataset:
    """The dataset a run config names: ``load_dataset(config.dataset.name, **other keys)``.

    Empty strings in ``config.dataset`` mean "the loader's default" (a ConfigDict
    cannot override a None), so those keys are not passed. ``cifar10`` reads
    ``config.dataset.data_dir``, ``mnist1d`` ``config.dataset.cache_dir``.

    Args:
      config: a run config (an ``ml_collections.ConfigDict``; only ``config.dataset`` is read).

    Returns:
      The `Dataset`.

    Raises:
      ValueError: as `check_dataset_config` (unknown name, a key the dataset does not
        read, a missing data folder) and the loaders.
    """
    check_dataset_config(config)
    name, kwargs = _config_kwargs(config)
    return load_dataset(name, **kwargs)


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def _check_int(value: Any, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_batching(x: np.ndarray, y: np.ndarray, batch_size: Any, seed: Any) -> int:
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y must have the same length, got {n} and {len(y)}")
    _check_int(batch_size, "batch_size", minimum=1)
    if batch_size > n:
        raise ValueError(f"batch_size must be <= the number of examples {n}, got {batch_size}")
    _check_int(seed, "seed", minimum=0)
    return n


def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_at(
    x: np.ndarray, y: np.ndarray, *, batch_size: int, seed: int, step: int
) -> tuple[np.ndarray, np.ndarray]:
    """The batch for training step ``step``, a pure function of ``(seed, step)``.

    With ``steps_per_epoch = n // batch_size`` (the last ``n % batch_size`` examples of each
    shuffled epoch are dropped), step ``t`` lies in epoch ``e = t // steps_per_epoch`` and takes
    positions ``[(t % steps_per_epoch) * batch_size, ... + batch_size)`` of the permutation
    ``np.random.default_rng([seed, e]).permutation(n)``.

    Args:
      x: ``[n, ...]`` inputs.
      y: ``[n, ...]`` labels.
      batch_size: positive int, at most ``n``.
      seed: non-negative int.
      step: non-negative int.

    Returns:
      ``(x_batch, y_batch)`` of shapes ``[batch_size, ...]``, dtypes as ``x`` and ``y``.

    Raises:
      ValueError: naming the argument, for a bad ``batch_size``, ``seed`` or ``step``, or if
        ``x`` and ``y`` differ in length.
    """
    n = _check_batching(x, y, batch_size, seed)
    _check_int(step, "step", minimum=0)
    epoch, position = divmod(step, n // batch_size)
    indices = _epoch_permutation(n, seed, epoch)[
        position * batch_size : (position + 1) * batch_size
    ]
    return x[indices], y[indices]


def batch_indices(
    n: int, *, batch_size: int, seed: int, num_steps: int, start_step: int = 0
) -> np.ndarray:
    """Example indices of steps ``start_step .. start_step + num_steps - 1``, as in `batch_at`.

    Args:
      n: number of examples.
      batch_size: positive int, at most ``n``.
      seed: non-negative int.
      num_steps: number of steps.
      start_step: first step.

    Returns:
      int32 array ``[num_steps, batch_size]``; row t holds the indices of the
      batch that `batch_at` gives for step ``start_step + t``, so jitted loops
      that gather on device see exactly the batches of a single run.
    """
    _check_int(batch_size, "batch_size", minimum=1)
    if batch_size > n:
        raise ValueError(f"batch_size must be <= the number of examples {n}, got {batch_size}")
    _check_int(seed, "seed", minimum=0)
    _check_int(num_steps, "num_steps", minimum=0)
    _check_int(start_step, "start_step", minimum=0)
    steps_per_epoch = n // batch_size
    out = np.empty((num_steps, batch_size), np.int32)
    permutations: dict[int, np.ndarray] = {}
    for t in range(num_steps):
        epoch, position = divmod(start_step + t, steps_per_epoch)
        if epoch not in permutations:
            permutations[epoch] = _epoch_permutation(n, seed, epoch)
        out[t] = permutations[epoch][position * batch_size : (position + 1) * batch_size]
    return out


def batches(
    x: np.ndarray, y: np.ndarray, *, batch_size: int, seed: int, start_step: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Infinite iterator over the batches of steps ``start_step, start_step + 1, ...``.

    Yields exactly ``batch_at(x, y, batch_size=batch_size, seed=seed, step=t)`` for each step
    ``t``, so resuming at ``start_step`` reproduces an uninterrupted run. Arguments are validated
    when this is called, not at the first ``next``.

    Args:
      x: ``[n, ...]`` inputs.
      y: ``[n, ...]`` labels.
      batch_size: positive int, at most ``n``.
      seed: non-negative int.
      start_step: non-negative int, the step of the first batch.

    Returns:
      An iterator of ``(x_batch, y_batch)`` with leading dimension ``batch_size``.

    Raises:
      ValueError: naming the argument, as in `batch_at`.
    """
    n = _check_batching(x, y, batch_size, seed)
    _check_int(start_step, "start_step", minimum=0)
    steps_per_epoch = n // batch_size

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        step = start_step
        epoch, permutation = -1, None
        while True:
            step_epoch, position = divmod(step, steps_per_epoch)
            if step_epoch != epoch:  # One permutation per epoch, not per step.
                epoch, permutation = step_epoch, _epoch_permutation(n, seed, step_epoch)
            indices = permutation[position * batch_size : (position + 1) * batch_size]
            yield x[indices], y[indices]
            step += 1

    return generate()
