"""Tests for dynamics.data: determinism, shapes/dtypes, file formats, validation."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest

from dynamics import data
from dynamics.data import DataError, Dataset

# --------------------------------------------------------------------------- helpers


def _same(a: Dataset, b: Dataset) -> bool:
    return all(
        np.array_equal(getattr(a, f), getattr(b, f))
        for f in ("x_train", "y_train", "x_test", "y_test")
    )


# --------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize(
    "fn,kwargs",
    [
        (data.teacher_regression, dict(n_train=64, n_test=16, noise=0.1)),
        (data.teacher_classification, dict(n_train=64, n_test=16)),
        (data.gaussian_mixture, dict(n_train=64, n_test=16)),
    ],
)
def test_synthetic_determinism(fn, kwargs):
    a, b, c = fn(seed=3, **kwargs), fn(seed=3, **kwargs), fn(seed=4, **kwargs)
    assert _same(a, b)
    assert not np.array_equal(a.x_train, c.x_train)
    assert not np.array_equal(a.x_test, c.x_test)


def test_teacher_regression_shapes_and_noise():
    ds = data.teacher_regression(n_train=50, n_test=7, d_in=5, d_out=3, widths=(8, 8))
    assert ds.x_train.shape == (50, 5) and ds.x_train.dtype == np.float32
    assert ds.y_train.shape == (50, 3) and ds.y_train.dtype == np.float32
    assert ds.x_test.shape == (7, 5) and ds.y_test.shape == (7, 3)
    assert ds.num_classes == 0 and ds.output_size == 3 and ds.input_shape == (5,)
    assert ds.n_train == 50 and ds.n_test == 7
    assert np.std(ds.y_train) > 0
    # noise=0 is reproducible; the teacher depends on the seed (the same inputs would map
    # differently), and noise changes only the targets.
    again = data.teacher_regression(n_train=50, n_test=7, d_in=5, d_out=3, widths=(8, 8))
    assert _same(ds, again)
    other = data.teacher_regression(seed=1, n_train=50, n_test=7, d_in=5, d_out=3, widths=(8, 8))
    assert not np.allclose(ds.y_train, other.y_train)
    noisy = data.teacher_regression(n_train=50, n_test=7, d_in=5, d_out=3, widths=(8, 8), noise=0.5)
    np.testing.assert_array_equal(noisy.x_train, ds.x_train)
    resid = noisy.y_train - ds.y_train
    assert 0.3 < resid.std() < 0.7


def test_teacher_is_the_documented_relu_mlp():
    # Reconstruct the teacher from the documented recipe and streams.
    seed, d_in, widths, d_out = 5, 4, (6, 7), 2
    ds = data.teacher_regression(
        seed=seed, n_train=9, n_test=0, d_in=d_in, d_out=d_out, widths=widths
    )
    t_rng, x_rng, _ = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]
    sizes = (d_in, *widths, d_out)
    ws = [
        t_rng.standard_normal((o, i)) * np.sqrt((1.0 if k == 2 else 2.0) / i)
        for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    ]
    x = x_rng.standard_normal((9, d_in))
    h = np.maximum(x @ ws[0].T, 0)
    h = np.maximum(h @ ws[1].T, 0)
    np.testing.assert_allclose(ds.x_train, x.astype(np.float32))
    np.testing.assert_allclose(ds.y_train, h @ ws[2].T, rtol=1e-5, atol=1e-6)
    assert ds.n_test == 0 and ds.x_test.shape == (0, d_in) and ds.y_test.shape == (0, d_out)


def test_teacher_classification_benchmark():
    ds = data.teacher_classification()
    assert ds.x_train.shape == (1024, 32) and ds.x_test.shape == (256, 32)
    assert ds.y_train.shape == (1024,) and ds.y_train.dtype == np.int32
    assert ds.num_classes == 10 and ds.output_size == 10
    assert ds.y_train.min() >= 0 and ds.y_train.max() < 10
    assert len(np.unique(ds.y_train)) > 1
    # Labels are the argmax of the regression teacher with the same seed.
    reg = data.teacher_regression(n_train=1024, n_test=256)
    np.testing.assert_array_equal(ds.y_train, np.argmax(reg.y_train, axis=1))


def test_gaussian_mixture_balanced_and_separated():
    ds = data.gaussian_mixture(n_train=100, n_test=40, d=8, num_classes=4, separation=10.0)
    assert ds.x_train.shape == (100, 8) and ds.x_train.dtype == np.float32
    assert ds.y_train.dtype == np.int32 and ds.num_classes == 4
    np.testing.assert_array_equal(np.bincount(ds.y_train), [25, 25, 25, 25])
    np.testing.assert_array_equal(np.bincount(ds.y_test), [10, 10, 10, 10])
    means = np.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(4)])
    np.testing.assert_allclose(np.linalg.norm(means, axis=1), 10.0, rtol=0.15)
    # nearest-mean classification of the test split is (almost) perfect at this separation
    pred = np.argmin(((ds.x_test[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == ds.y_test).mean() > 0.95


# --------------------------------------------------------------------------- digits


def test_digits_split_and_determinism():
    ds = data.digits(seed=0)
    assert ds.n_train + ds.n_test == 1797
    assert abs(ds.n_test - 0.2 * 1797) <= 10
    assert ds.x_train.shape[1:] == (64,) and ds.x_train.dtype == np.float32
    assert ds.y_train.dtype == np.int32 and ds.num_classes == 10
    assert set(np.unique(ds.y_test)) == set(range(10))  # stratified
    assert _same(ds, data.digits(seed=0))
    other = data.digits(seed=1)
    assert not np.array_equal(ds.x_test, other.x_test)
    # the split partitions the data set: train and test together are exactly the 1797 images
    from sklearn.datasets import load_digits

    raw = load_digits()
    none = data.digits(seed=0, normalize="none")
    got = np.concatenate([none.x_train, none.x_test])
    want = raw.data.astype(np.float32)
    np.testing.assert_array_equal(got[np.lexsort(got.T)], want[np.lexsort(want.T)])


def test_digits_classes_relabel_and_truncate():
    from sklearn.datasets import load_digits

    raw = load_digits()
    ds = data.digits(classes=(7, 2), normalize="none", n_train=50)
    assert ds.num_classes == 2 and ds.n_train == 50
    assert set(np.unique(np.concatenate([ds.y_train, ds.y_test]))) == {0, 1}
    # label 0 means digit 7, label 1 means digit 2: look each image up in the raw data
    lookup = {
        row.tobytes(): t for row, t in zip(raw.data.astype(np.float32), raw.target, strict=True)
    }
    for x, y in zip(ds.x_train, ds.y_train, strict=True):
        assert lookup[x.tobytes()] == (7, 2)[y]
    full = data.digits(classes=(7, 2))
    assert full.n_train + full.n_test == int(np.isin(raw.target, (7, 2)).sum())


def test_digits_normalizations():
    unit = data.digits(normalize="unit")
    np.testing.assert_allclose(np.linalg.norm(unit.x_train, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(unit.x_test, axis=1), 1.0, rtol=1e-5)
    std = data.digits(normalize="standard")
    varying = std.x_train.std(0) > 0
    assert varying.sum() > 50
    np.testing.assert_allclose(std.x_train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(std.x_train.std(0)[varying], 1.0, rtol=1e-4)
    scale = data.digits(normalize="scale")
    assert scale.x_train.min() == 0.0 and scale.x_train.max() == 1.0
    none = data.digits(normalize="none")
    assert none.x_train.max() == 16.0
    np.testing.assert_allclose(scale.x_train * 16, none.x_train, rtol=1e-6)


def test_digits_binary_and_image():
    ds = data.digits(classes=(3, 8), binary=True)
    assert ds.y_train.dtype == np.float32 and ds.num_classes == 2 and ds.output_size == 1
    assert set(np.unique(ds.y_train)) == {-1.0, 1.0}
    labels = data.digits(classes=(3, 8))
    np.testing.assert_array_equal(ds.y_train, np.where(labels.y_train == 0, -1.0, 1.0))
    img = data.digits(image=True)
    assert img.x_train.shape[1:] == (1, 8, 8) and img.input_shape == (1, 8, 8)
    np.testing.assert_array_equal(img.x_train.reshape(-1, 64), data.digits().x_train)


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(test_fraction=0.0), "test_fraction"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(classes=(1, 10)), "classes"),
        (dict(classes=(1, 1)), "classes"),
        (dict(binary=True), "binary"),
        (dict(classes=(1, 2, 3), binary=True), "binary"),
        (dict(n_train=5000), "n_train"),
        (dict(normalize="zscore"), "normalize"),
        (dict(seed=-1), "seed"),
    ],
)
def test_digits_validation(kwargs, word):
    with pytest.raises(DataError, match=word) as info:
        data.digits(**kwargs)
    assert "\n" not in str(info.value)


def test_synthetic_validation():
    with pytest.raises(DataError, match="n_train"):
        data.teacher_regression(n_train=0)
    with pytest.raises(DataError, match="widths"):
        data.teacher_classification(widths=(8, 0))
    with pytest.raises(DataError, match="num_classes"):
        data.gaussian_mixture(num_classes=1)
    with pytest.raises(DataError, match="noise"):
        data.teacher_regression(noise=-1.0)
    with pytest.raises(DataError, match="unknown dataset"):
        data.load("imagenet")


# --------------------------------------------------------------------------- MNIST


def _idx_bytes(arr: np.ndarray) -> bytes:
    magic = 0x0800 | arr.ndim  # unsigned byte, ndim dims: 2051 for images, 2049 for labels
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_mnist(root, n_train=12, n_test=5, side=28):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        x[:, 0, 0] = np.arange(n)  # pixel (0, 0) identifies the example after shuffling
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        arrays[split] = (x, y)
    assert struct.unpack(">I", _idx_bytes(arrays["train"][0])[:4])[0] == 2051
    assert struct.unpack(">I", _idx_bytes(arrays["train"][1])[:4])[0] == 2049
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(arrays["train"][0])))
    (root / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(arrays["train"][1]))
    (root / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(arrays["t10k"][0]))
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(arrays["t10k"][1])))
    return arrays


def test_mnist_reads_idx(tmp_path):
    arrays = _write_mnist(tmp_path)
    ds = data.mnist(tmp_path, normalize="none", flatten=False)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_train.dtype == np.float32
    assert ds.y_train.dtype == np.int32 and ds.num_classes == 10 and ds.n_test == 5
    for split, x, y in (("train", ds.x_train, ds.y_train), ("t10k", ds.x_test, ds.y_test)):
        xw, yw = arrays[split]
        idx = x[:, 0, 0, 0].astype(int)
        assert sorted(idx) == list(range(len(xw)))  # a permutation of the written examples
        np.testing.assert_array_equal(x[:, 0], xw[idx].astype(np.float32))
        np.testing.assert_array_equal(y, yw[idx])
    flat = data.mnist(tmp_path)  # flatten + scale, same seed -> same order
    assert flat.x_train.shape == (12, 784)
    np.testing.assert_allclose(flat.x_train * 255, ds.x_train.reshape(12, -1), rtol=1e-6)
    np.testing.assert_array_equal(flat.y_train, ds.y_train)


def test_mnist_truncate_seed_and_standard(tmp_path):
    _write_mnist(tmp_path, n_train=40, n_test=20)
    a = data.mnist(tmp_path, seed=0, n_train=10, n_test=3)
    assert a.n_train == 10 and a.n_test == 3
    assert _same(a, data.mnist(tmp_path, seed=0, n_train=10, n_test=3))
    b = data.mnist(tmp_path, seed=1, n_train=10, n_test=3)
    assert not np.array_equal(a.x_train, b.x_train)
    s = data.mnist(tmp_path, normalize="standard")
    assert abs(s.x_train.mean()) < 1e-5 and abs(s.x_train.std() - 1) < 1e-4
    with pytest.raises(DataError, match="n_train"):
        data.mnist(tmp_path, n_train=41)


def test_mnist_missing_and_bad(tmp_path):
    with pytest.raises(DataError) as info:
        data.mnist(tmp_path / "nowhere")
    msg = str(info.value)
    assert "nowhere" in msg and "\n" not in msg
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        assert name in msg
    _write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2051, 3) + b"abc")
    with pytest.raises(DataError, match="magic"):
        data.mnist(tmp_path)


# --------------------------------------------------------------------------- CIFAR-10


def _write_cifar(root, n=3):
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        batches[name] = (d, labels)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": d, b"labels": labels, b"batch_label": name.encode()}, f)
    return batches


def test_cifar10_layout(tmp_path):
    sub = tmp_path / "cifar-10-batches-py"
    sub.mkdir()
    batches = _write_cifar(sub)
    ds = data.cifar10(tmp_path, normalize="none")
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.num_classes == 10 and ds.output_size == 10
    rows = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    for x, y in zip(ds.x_train, ds.y_train, strict=True):
        # find the written row: channel-first, red plane = first 1024 entries, row-major
        match = np.flatnonzero((rows[:, :1024] == x[0].reshape(-1)).all(1))
        assert len(match) == 1
        r = rows[match[0]]
        np.testing.assert_array_equal(x[1].reshape(-1), r[1024:2048])
        np.testing.assert_array_equal(x[2], r[2048:].reshape(32, 32))
        assert y == labels[match[0]]
    test_rows = batches["test_batch"][0].reshape(-1, 3, 32, 32)
    assert {t.tobytes() for t in test_rows} == {t.astype(np.uint8).tobytes() for t in ds.x_test}
    # direct root also works; scale and standard
    scaled = data.cifar10(sub, n_train=6, n_test=2)
    assert scaled.n_train == 6 and scaled.n_test == 2
    assert 0.0 <= scaled.x_train.min() and scaled.x_train.max() <= 1.0
    std = data.cifar10(sub, normalize="standard")
    np.testing.assert_allclose(std.x_train.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(std.x_train.std(axis=(0, 2, 3)), 1.0, rtol=1e-4)
    assert _same(data.cifar10(sub, seed=2), data.cifar10(sub, seed=2))
    assert not np.array_equal(data.cifar10(sub, seed=2).x_train, data.cifar10(sub).x_train)


def test_cifar10_missing(tmp_path):
    with pytest.raises(DataError) as info:
        data.cifar10(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    for name in ["data_batch_1", "data_batch_5", "test_batch"]:
        assert name in msg
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        data.load("cifar10", root=tmp_path)


# --------------------------------------------------------------------------- signals


def test_sample_image():
    g = data.sample_image("china", size=32)
    assert g.shape == (32, 32) and g.dtype == np.float32
    assert 0.0 <= g.min() < g.max() <= 1.0
    c = data.sample_image("flower.jpg", size=16, grayscale=False)
    assert c.shape == (3, 16, 16) and 0.0 <= c.min() and c.max() <= 1.0
    gc = data.sample_image("flower", size=16)
    lum = np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), c, axes=1)
    np.testing.assert_allclose(gc, lum, atol=1e-5)
    # area averaging preserves the mean of the centre crop
    from sklearn.datasets import load_sample_image

    raw = load_sample_image("china.jpg").astype(np.float64) / 255
    h, w = raw.shape[:2]
    s = min(h, w)
    crop = raw[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    gray = crop @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(g.mean(), gray.mean(), rtol=1e-4)
    with pytest.raises(DataError, match="name"):
        data.sample_image("lena")


def test_step_signal():
    s = data.step_signal(n=10, low=-1.0, high=2.0, position=0.35)
    assert s.dtype == np.float32 and s.shape == (10,)
    np.testing.assert_array_equal(s, [-1, -1, -1, 2, 2, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(data.step_signal(n=4, position=0.0), [1, 1, 1, 1])
    with pytest.raises(DataError, match="position"):
        data.step_signal(position=1.5)


def test_signal_fitting_shapes():
    one = data.signal_fitting(data.step_signal(n=64), in_channels=3, seed=1)
    assert one.x_train.shape == (1, 3, 64) and one.y_train.shape == (1, 1, 64)
    assert one.x_test.shape == (0, 3, 64) and one.y_test.shape == (0, 1, 64)
    assert one.num_classes == 0 and one.output_size == 64 and one.x_train.dtype == np.float32
    np.testing.assert_array_equal(one.y_train[0, 0], data.step_signal(n=64))
    img = np.random.default_rng(0).random((8, 12))
    two = data.signal_fitting(img, in_channels=2, noise_std=0.1, name="img")
    assert two.x_train.shape == (1, 2, 8, 12) and two.y_train.shape == (1, 1, 8, 12)
    assert two.name == "img" and two.y_train.dtype == np.float32
    assert 0.05 < two.x_train.std() < 0.2
    three = data.signal_fitting(np.zeros((3, 8, 8)), in_shape=(4, 4))
    assert three.x_train.shape == (1, 4, 4, 4) and three.y_train.shape == (1, 3, 8, 8)
    assert three.y_test.shape == (0, 3, 8, 8) and three.output_size == 192
    again = data.signal_fitting(img, in_channels=2, noise_std=0.1)
    np.testing.assert_array_equal(again.x_train, two.x_train)
    other = data.signal_fitting(img, in_channels=2, noise_std=0.1, seed=1)
    assert not np.array_equal(other.x_train, two.x_train)
    with pytest.raises(DataError, match="signal"):
        data.signal_fitting(np.zeros((1, 2, 3, 4)))


def test_load_dispatch():
    assert set(data.DATASETS) == {
        "teacher_regression",
        "teacher_classification",
        "gaussian_mixture",
        "digits",
        "mnist",
        "cifar10",
    }
    a = data.load("gaussian_mixture", seed=2, n_train=20, n_test=4)
    assert _same(a, data.gaussian_mixture(seed=2, n_train=20, n_test=4))
    assert a.name == "gaussian_mixture"
