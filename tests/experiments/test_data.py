"""Tests for experiments/data.py: offline loaders, caching and resumable batching."""

from __future__ import annotations

import itertools
import os
import pickle
import random

import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import data

# ---------------------------------------------------------------------------------------------
# MNIST-1D
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory):
    """Generates MNIST-1D once (about 3 s) into a fresh cache dir; returns (dir, dataset)."""
    cache_dir = tmp_path_factory.mktemp("mnist1d_cache")
    return cache_dir, data.load_mnist1d(str(cache_dir), seed=42)


def _assert_datasets_equal(a: data.Dataset, b: data.Dataset) -> None:
    assert a.num_classes == b.num_classes
    for left, right in zip(a[:4], b[:4]):
        assert left.dtype == right.dtype
        np.testing.assert_array_equal(left, right)


def _forbid_generation(monkeypatch):
    import mnist1d.data

    def fail(*args, **kwargs):
        raise AssertionError("MNIST-1D was regenerated instead of read from the cache")

    monkeypatch.setattr(mnist1d.data, "make_dataset", fail)


def test_mnist1d_shapes_dtypes_and_classes(mnist1d_cache):
    _, ds = mnist1d_cache
    assert ds.x_train.shape == (4000, 40, 1) and ds.x_train.dtype == np.float32
    assert ds.x_test.shape == (1000, 40, 1) and ds.x_test.dtype == np.float32
    assert ds.y_train.shape == (4000,) and ds.y_train.dtype == np.int32
    assert ds.y_test.shape == (1000,) and ds.y_test.dtype == np.int32
    assert ds.num_classes == 10
    assert set(np.unique(ds.y_train)) == set(range(10))
    assert set(np.unique(ds.y_test)) == set(range(10))
    # mnist1d standardizes globally; the train split should be close to zero-mean, unit-std.
    assert abs(float(ds.x_train.mean())) < 0.05
    assert abs(float(ds.x_train.std()) - 1.0) < 0.05


def test_mnist1d_same_seed_regenerates_identically(mnist1d_cache, tmp_path):
    cache_dir, first = mnist1d_cache
    second = data.load_mnist1d(str(tmp_path), seed=42)  # Fresh dir: generated again.
    _assert_datasets_equal(first, second)


def test_mnist1d_cache_round_trip_reads_the_file(mnist1d_cache, monkeypatch):
    cache_dir, generated = mnist1d_cache
    # Only the final cache file is left behind (no temp files), and its name carries the seed.
    (cache_file,) = os.listdir(cache_dir)
    assert "seed42" in cache_file and cache_file.endswith(".npz")
    _forbid_generation(monkeypatch)
    _assert_datasets_equal(generated, data.load_mnist1d(str(cache_dir), seed=42))


def test_mnist1d_default_cache_dir_comes_from_env(mnist1d_cache, tmp_path, monkeypatch):
    cache_dir, generated = mnist1d_cache
    (cache_file,) = os.listdir(cache_dir)
    (tmp_path / cache_file).write_bytes((cache_dir / cache_file).read_bytes())
    monkeypatch.setenv("SPARSEJAX_DATA_DIR", str(tmp_path))
    assert data.default_cache_dir() == str(tmp_path)
    _forbid_generation(monkeypatch)
    _assert_datasets_equal(generated, data.load_mnist1d())


def test_mnist1d_failed_write_leaves_no_cache(tmp_path, monkeypatch):
    small = data.Dataset(
        np.zeros((2, 40, 1), np.float32),
        np.zeros(2, np.int32),
        np.zeros((1, 40, 1), np.float32),
        np.zeros(1, np.int32),
        10,
    )
    monkeypatch.setattr(data, "_generate_mnist1d", lambda seed: small)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        data.load_mnist1d(str(tmp_path), seed=3)
    assert os.listdir(tmp_path) == []


def test_mnist1d_generation_restores_global_rng(tmp_path, monkeypatch):
    import mnist1d.data

    def fake_make_dataset(args):  # Same global seeding side effect as the real generator.
        random.seed(args.seed)
        np.random.seed(args.seed)
        x = np.random.standard_normal((5, 40))
        return {"x": x[:4], "y": np.arange(4), "x_test": x[4:], "y_test": np.arange(1)}

    monkeypatch.setattr(mnist1d.data, "make_dataset", fake_make_dataset)
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    data.load_mnist1d(str(tmp_path), seed=7)
    assert (np.random.random(), random.random()) == expected


def test_mnist1d_rejects_bad_seed(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        data.load_mnist1d(str(tmp_path), seed=-1)


# ---------------------------------------------------------------------------------------------
# Teacher-student
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("feature_scales", ["uniform", "heavy_tailed"])
def test_teacher_student_deterministic_balanced_and_typed(feature_scales):
    kwargs = dict(num_train=2000, num_test=500, seed=3, feature_scales=feature_scales)
    first = data.load_teacher_student(**kwargs)
    _assert_datasets_equal(first, data.load_teacher_student(**kwargs))
    assert first.x_train.shape == (2000, 32) and first.x_train.dtype == np.float32
    assert first.x_test.shape == (500, 32) and first.y_test.dtype == np.int32
    assert first.num_classes == 10
    counts = np.bincount(first.y_train, minlength=10)
    assert counts.shape == (10,) and counts.min() > 0
    # Calibrated teacher: no class is vanishingly rare (uniform would be 10% each).
    assert counts.min() / counts.sum() > 0.02


def test_teacher_student_seeds_differ():
    a = data.load_teacher_student(num_train=100, num_test=10, seed=0)
    b = data.load_teacher_student(num_train=100, num_test=10, seed=1)
    assert not np.array_equal(a.x_train, b.x_train)


def test_teacher_student_heavy_tailed_only_rescales_features():
    uniform = data.load_teacher_student(seed=5, feature_scales="uniform")
    heavy = data.load_teacher_student(seed=5, feature_scales="heavy_tailed")
    np.testing.assert_array_equal(uniform.y_train, heavy.y_train)
    np.testing.assert_array_equal(uniform.y_test, heavy.y_test)
    ratio = heavy.x_train / uniform.x_train
    scales = ratio[0]
    np.testing.assert_allclose(ratio, np.broadcast_to(scales, ratio.shape), rtol=1e-5)
    outliers = scales > 1.5
    assert outliers.sum() == round(32 / 16)
    assert np.all(
        (scales[outliers] >= 10.0 * (1 - 1e-5)) & (scales[outliers] <= 100.0 * (1 + 1e-5))
    )
    np.testing.assert_allclose(scales[~outliers], 1.0, rtol=1e-6)


def test_teacher_student_test_set_independent_of_num_train():
    small = data.load_teacher_student(num_train=50, num_test=20, seed=2)
    large = data.load_teacher_student(num_train=300, num_test=20, seed=2)
    np.testing.assert_array_equal(small.x_test, large.x_test)
    np.testing.assert_array_equal(small.y_test, large.y_test)
    np.testing.assert_array_equal(small.x_train, large.x_train[:50])
    np.testing.assert_array_equal(small.y_train, large.y_train[:50])


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(num_train=0), "num_train"),
        (dict(num_classes=1), "num_classes"),
        (dict(input_dim=2.5), "input_dim"),
        (dict(feature_scales="gaussian"), "feature_scales"),
    ],
)
def test_teacher_student_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        data.load_teacher_student(**kwargs)


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------


def _write_fake_cifar10(folder, images_per_batch: int = 3):
    """Writes the real pickle layout with tiny batches; returns the raw uint8 rows and labels."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    raw = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, size=(images_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=images_per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": rows}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        raw[name] = (rows, labels)
    return raw


@pytest.mark.parametrize("point_at_folder_itself", [False, True])
def test_cifar10_reads_fake_python_format(tmp_path, point_at_folder_itself):
    folder = tmp_path / "cifar-10-batches-py"
    raw = _write_fake_cifar10(folder)
    ds = data.load_cifar10(str(folder if point_at_folder_itself else tmp_path))
    assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_train.dtype == np.float32
    assert ds.x_test.shape == (3, 32, 32, 3) and ds.y_test.dtype == np.int32
    assert ds.num_classes == 10
    train_rows = np.concatenate([raw[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((raw[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    np.testing.assert_array_equal(ds.y_train, train_labels)
    np.testing.assert_array_equal(ds.y_test, raw["test_batch"][1])
    # Row layout is channel-major: value (c, h, w) sits at c * 1024 + h * 32 + w.
    for i, h, w, c in [(0, 0, 0, 0), (4, 5, 17, 1), (14, 31, 31, 2), (7, 0, 31, 2)]:
        pixel = train_rows[i, c * 1024 + h * 32 + w] / 255.0
        expected = (pixel - data.CIFAR10_MEAN[c]) / data.CIFAR10_STD[c]
        np.testing.assert_allclose(ds.x_train[i, h, w, c], expected, rtol=1e-5, atol=1e-6)


def test_cifar10_missing_folder_names_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="data_dir") as info:
        data.load_cifar10(str(missing))
    assert str(missing) in str(info.value)
    assert "cifar-10-batches-py" in str(info.value) and "data_batch_1" in str(info.value)


def test_cifar10_incomplete_folder_lists_missing_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_fake_cifar10(folder)
    os.remove(folder / "test_batch")
    with pytest.raises(ValueError, match="test_batch"):
        data.load_cifar10(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_load_dataset_dispatches_by_name():
    kwargs = dict(num_train=20, num_test=5, seed=4)
    _assert_datasets_equal(
        data.load_dataset("teacher_student", **kwargs), data.load_teacher_student(**kwargs)
    )


def test_load_from_config_passes_the_other_keys_and_skips_empty_strings():
    config = ml_collections.ConfigDict(
        {
            "dataset": {
                "name": "teacher_student",
                "num_train": 20,
                "num_test": 5,
                "seed": 4,
                # "" means the loader's default (a ConfigDict cannot hold None for a str).
                "feature_scales": "",
            }
        }
    )
    _assert_datasets_equal(
        data.load_from_config(config),
        data.load_teacher_student(num_train=20, num_test=5, seed=4),
    )


def _dataset_config(**dataset):
    """The base config's dataset keys (name, cache_dir, data_dir) with ``dataset`` changed."""
    keys = {"name": "mnist1d", "cache_dir": "", "data_dir": "", **dataset}
    return ml_collections.ConfigDict({"dataset": keys})


def test_cifar10_is_loaded_from_the_data_dir_key(tmp_path):
    _write_fake_cifar10(tmp_path / "cifar-10-batches-py")
    config = _dataset_config(name="cifar10", data_dir=str(tmp_path))
    data.check_dataset_config(config)
    _assert_datasets_equal(data.load_from_config(config), data.load_cifar10(str(tmp_path)))


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ({"name": "cifar10"}, "config.dataset.data_dir='' must name the folder"),
        ({"name": "cifar10", "data_dir": "/nonexistent/c10"}, "data_dir='/nonexistent/c10'"),
        ({"name": "cifar10", "data_dir": "EMPTY"}, "does not hold CIFAR-10"),
        ({"name": "cifar10", "data_dir": "FAKE", "cache_dir": "/x"}, "config.dataset.cache_dir"),
        ({"data_dir": "FAKE"}, "config.dataset.data_dir="),
        ({"name": "mnist2d"}, "mnist2d"),
    ],
    ids=["no data_dir", "missing", "empty folder", "cache_dir", "mnist1d data_dir", "name"],
)
def test_check_dataset_config_names_the_key_before_reading_anything(tmp_path, dataset, expected):
    _write_fake_cifar10(tmp_path / "fake" / "cifar-10-batches-py")
    (tmp_path / "empty").mkdir()
    paths = {"FAKE": str(tmp_path / "fake"), "EMPTY": str(tmp_path / "empty")}
    dataset = {k: paths.get(v, v) for k, v in dataset.items()}
    config = _dataset_config(**dataset)
    for check in (data.check_dataset_config, data.load_from_config):
        with pytest.raises(ValueError) as info:
            check(config)
        assert expected in str(info.value)


def test_load_dataset_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="mnist2d") as info:
        data.load_dataset("mnist2d")
    for name in ("cifar10", "mnist1d", "teacher_student"):
        assert name in str(info.value)


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def _indexed_data(n: int):
    """x encodes each example's index so batches reveal which examples they hold."""
    x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    y = np.arange(n, dtype=np.int32)
    return x, y


def _labels_at(x, y, batch_size, seed, step):
    return data.batch_at(x, y, batch_size=batch_size, seed=seed, step=step)[1]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    batch_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
    start_step=st.integers(0, 50),
)
def test_batches_resume_equals_tail_of_uninterrupted_run(n, batch_fraction, seed, start_step):
    batch_size = max(1, int(batch_fraction * n))
    x, y = _indexed_data(n)
    num_after = 7
    full = list(
        itertools.islice(
            data.batches(x, y, batch_size=batch_size, seed=seed), start_step + num_after
        )
    )
    resumed = list(
        itertools.islice(
            data.batches(x, y, batch_size=batch_size, seed=seed, start_step=start_step), num_after
        )
    )
    for step, ((xf, yf), (xr, yr)) in enumerate(zip(full[start_step:], resumed), start_step):
        np.testing.assert_array_equal(xf, xr)
        np.testing.assert_array_equal(yf, yr)
        xa, ya = data.batch_at(x, y, batch_size=batch_size, seed=seed, step=step)
        np.testing.assert_array_equal(xa, xr)
        np.testing.assert_array_equal(ya, yr)
        assert xr.shape == (batch_size, 3) and xr.dtype == np.float32 and yr.dtype == np.int32
        np.testing.assert_array_equal(xr[:, 0], yr)  # Inputs and labels stay paired.


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    batch_size=st.integers(1, 60),
    seed=st.integers(0, 1000),
    epoch=st.integers(0, 5),
)
def test_each_epoch_visits_every_example_at_most_once(n, batch_size, seed, epoch):
    batch_size = min(batch_size, n)
    x, y = _indexed_data(n)
    steps_per_epoch = n // batch_size
    first_step = epoch * steps_per_epoch
    steps = range(first_step, first_step + steps_per_epoch)
    seen = np.concatenate([_labels_at(x, y, batch_size, seed, step) for step in steps])
    assert len(np.unique(seen)) == len(seen) == steps_per_epoch * batch_size
    expected = np.random.default_rng([seed, epoch]).permutation(n)[: steps_per_epoch * batch_size]
    np.testing.assert_array_equal(seen, expected)


def test_epoch_covers_every_example_exactly_once_when_divisible():
    x, y = _indexed_data(24)
    epoch_two = list(itertools.islice(data.batches(x, y, batch_size=6, seed=9, start_step=8), 4))
    seen = np.concatenate([yb for _, yb in epoch_two])
    np.testing.assert_array_equal(np.sort(seen), np.arange(24))
    epoch_one = np.concatenate([_labels_at(x, y, 6, 9, step) for step in range(4, 8)])
    assert not np.array_equal(seen, epoch_one)  # Reshuffled every epoch.


@pytest.mark.parametrize("batch_size", [0, -3, 11, 2.0, True, "4"])
def test_bad_batch_size_raises_naming_it(batch_size):
    x, y = _indexed_data(10)
    with pytest.raises(ValueError, match="batch_size"):
        data.batches(x, y, batch_size=batch_size, seed=0)  # Validated eagerly, not at next().
    with pytest.raises(ValueError, match="batch_size"):
        data.batch_at(x, y, batch_size=batch_size, seed=0, step=0)


def test_bad_seed_step_and_lengths_raise():
    x, y = _indexed_data(10)
    with pytest.raises(ValueError, match="seed"):
        data.batches(x, y, batch_size=2, seed=-1)
    with pytest.raises(ValueError, match="start_step"):
        data.batches(x, y, batch_size=2, seed=0, start_step=-1)
    with pytest.raises(ValueError, match="step"):
        data.batch_at(x, y, batch_size=2, seed=0, step=-1)
    with pytest.raises(ValueError, match="same length"):
        data.batch_at(x, y[:5], batch_size=2, seed=0, step=0)
