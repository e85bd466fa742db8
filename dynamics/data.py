"""Host-side (NumPy) data sets for small training runs.

Every loader is a pure function of its arguments and an integer `seed`: the same call returns
the same arrays, and train/test splits are deterministic given `seed`. Inputs are float32;
class labels are int32 (n,), regression targets float32 (n, ...), and labels of a single-output
binary classifier (`digits(binary=True)`) float32 (n,) of -1/+1 with `num_classes == 2`.

Randomness comes from `np.random.SeedSequence(seed)`; a set that needs several independent
draws (a teacher network and its inputs, say) spawns one child stream per draw, so changing
the number of examples never changes the teacher.

Layouts: dense inputs (n, d); images channel-first (n, C, H, W); a signal to fit
(deep image prior / deep decoder) is one example, x (1, C_in, *spatial), y (1, C_out, *spatial).

No JAX here; scikit-learn is imported lazily (digits, sample images) and MNIST / CIFAR-10 are
read from the standard files on disk (nothing is downloaded).
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import numbers
import os
import pickle
import struct
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "cifar10",
    "digits",
    "gaussian_mixture",
    "load",
    "mnist",
    "sample_image",
    "signal_fitting",
    "step_signal",
    "teacher_classification",
    "teacher_regression",
]


class DataError(ValueError):
    """A data set could not be built: bad argument or missing / malformed files (one line)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test arrays of one data set (see the module docstring for dtypes and layouts).

    `num_classes` is 0 for regression / signal fitting, 2 for a +-1 binary task (float labels),
    else the number of classes of the int32 labels. `eq=False`: datasets compare by identity
    (element-wise array equality has no single truth value).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self):
        if self.x_train.shape[0] != self.y_train.shape[0]:
            raise DataError(
                f"Dataset {self.name!r}: x_train has {self.x_train.shape[0]} rows but y_train "
                f"has {self.y_train.shape[0]}"
            )
        if self.x_test.shape[0] != self.y_test.shape[0]:
            raise DataError(
                f"Dataset {self.name!r}: x_test has {self.x_test.shape[0]} rows but y_test "
                f"has {self.y_test.shape[0]}"
            )

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def binary(self) -> bool:
        """True for +-1 float labels of a single-output binary classifier."""
        return self.num_classes == 2 and np.issubdtype(self.y_train.dtype, np.floating)

    @property
    def output_size(self) -> int:
        """Width of the model output: num_classes, 1 for binary, prod(y.shape[1:]) otherwise."""
        if self.binary:
            return 1
        if self.num_classes > 0:
            return int(self.num_classes)
        return int(math.prod(self.y_train.shape[1:]))


# --------------------------------------------------------------------------- validation


def _int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise DataError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _opt_int(name: str, value, minimum: int = 0) -> int | None:
    return None if value is None else _int(name, value, minimum)


def _float(name: str, value, minimum: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DataError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise DataError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise DataError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


def _choice(name: str, value, options: Sequence[str]) -> str:
    if value not in options:
        raise DataError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def _widths(widths) -> tuple[int, ...]:
    try:
        widths = tuple(widths)
    except TypeError:
        raise DataError(f"widths must be a sequence of positive integers, got {widths!r}") from None
    return tuple(_int("widths[]", w, 1) for w in widths)


def _streams(seed, n: int) -> list[np.random.Generator]:
    seed = _int("seed", seed, 0)
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def _truncate(name: str, value: int | None, available: int) -> int:
    if value is None:
        return available
    if value > available:
        raise DataError(f"{name}={value} is larger than the {available} examples available")
    return value


# --------------------------------------------------------------------------- synthetic


def _teacher(rng: np.random.Generator, d_in: int, widths: tuple[int, ...], d_out: int):
    sizes = (d_in, *widths, d_out)
    weights = []
    for k, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        gain2 = 1.0 if k == len(sizes) - 2 else 2.0
        weights.append(rng.standard_normal((fan_out, fan_in)) * math.sqrt(gain2 / fan_in))

    def apply(x: np.ndarray) -> np.ndarray:
        h = x.astype(np.float64)
        for k, w in enumerate(weights):
            h = h @ w.T
            if k < len(weights) - 1:
                h = np.maximum(h, 0.0)
        return h

    return apply


def _teacher_data(seed, n_train, n_test, d_in, d_out, widths):
    n_train = _int("n_train", n_train, 1)
    n_test = _int("n_test", n_test, 0)
    d_in = _int("d_in", d_in, 1)
    widths = _widths(widths)
    teacher_rng, x_rng, noise_rng = _streams(seed, 3)
    teacher = _teacher(teacher_rng, d_in, widths, d_out)
    x = x_rng.standard_normal((n_train + n_test, d_in))
    return x, teacher(x), noise_rng, n_train


def teacher_regression(
    seed: int = 0,
    n_train: int = 1024,
    n_test: int = 256,
    d_in: int = 32,
    d_out: int = 10,
    widths: Sequence[int] = (64, 64, 64),
    noise: float = 0.0,
) -> Dataset:
    """Regression on a fixed random ReLU teacher network.

    x ~ N(0, I_{d_in}), n_train + n_test rows (the first n_train are the train split);
    y = f(x) + noise * eps, eps ~ N(0, 1) per entry, with the bias-free teacher
    f(x) = W_L relu(W_{L-1} ... relu(W_1 x)), hidden widths `widths`, W_k (out, in) with entries
    N(0, 2 / fan_in) (He normal) and the last layer N(0, 1 / fan_in). Teacher, inputs and noise
    use separate streams of `seed`. Shapes: x (n, d_in) float32, y (n, d_out) float32;
    num_classes = 0.
    """
    d_out = _int("d_out", d_out, 1)
    noise = _float("noise", noise, 0.0)
    x, y, noise_rng, n_train = _teacher_data(seed, n_train, n_test, d_in, d_out, widths)
    if noise > 0:
        y = y + noise * noise_rng.standard_normal(y.shape)
    x, y = x.astype(np.float32), y.astype(np.float32)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], 0, "teacher_regression")


def teacher_classification(
    seed: int = 0,
    n_train: int = 1024,
    n_test: int = 256,
    d_in: int = 32,
    num_classes: int = 10,
    widths: Sequence[int] = (64, 64, 64),
) -> Dataset:
    """Classification by a fixed random ReLU teacher: labels y = argmax_c f(x)_c.

    The benchmark task: x ~ N(0, I_{d_in}) (1024 train rows of dimension 32 by default) and a
    bias-free teacher d_in -> widths -> num_classes built as in `teacher_regression`
    (32 -> 64 -> 64 -> 64 -> 10 by default). Shapes: x (n, d_in) float32, y (n,) int32 in
    [0, num_classes). Classes need not be balanced.
    """
    num_classes = _int("num_classes", num_classes, 2)
    x, logits, _, n_train = _teacher_data(seed, n_train, n_test, d_in, num_classes, widths)
    x, y = x.astype(np.float32), np.argmax(logits, axis=1).astype(np.int32)
    return Dataset(
        x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes, "teacher_classification"
    )


def gaussian_mixture(
    seed: int = 0,
    n_train: int = 1024,
    n_test: int = 256,
    d: int = 16,
    num_classes: int = 4,
    separation: float = 3.0,
    std: float = 1.0,
) -> Dataset:
    """Isotropic Gaussian clusters, one per class, with balanced classes.

    Means mu_c = separation * u_c, u_c uniform on the unit sphere of R^d; each split holds
    labels (0, 1, ..., K-1, 0, 1, ...) in a random order (class counts differ by at most one),
    and x = mu_y + std * eps, eps ~ N(0, I_d). Shapes: x (n, d) float32, y (n,) int32.
    """
    n_train = _int("n_train", n_train, 1)
    n_test = _int("n_test", n_test, 0)
    d = _int("d", d, 1)
    num_classes = _int("num_classes", num_classes, 2)
    separation = _float("separation", separation, 0.0)
    std = _float("std", std, 0.0)
    mean_rng, label_rng, x_rng = _streams(seed, 3)
    u = mean_rng.standard_normal((num_classes, d))
    means = separation * u / np.linalg.norm(u, axis=1, keepdims=True)

    def split(n):
        y = label_rng.permutation(np.arange(n) % num_classes).astype(np.int32)
        x = means[y] + std * x_rng.standard_normal((n, d))
        return x.astype(np.float32), y

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    return Dataset(x_train, y_train, x_test, y_test, num_classes, "gaussian_mixture")


# --------------------------------------------------------------------------- digits


def _classes(classes) -> tuple[int, ...]:
    if classes is None:
        return tuple(range(10))
    try:
        classes = tuple(classes)
    except TypeError:
        raise DataError(f"classes must be a sequence of digits 0..9, got {classes!r}") from None
    out = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= c <= 9:
            raise DataError(f"classes must be digits 0..9, got {classes!r}")
        out.append(int(c))
    if len(set(out)) != len(out) or len(out) < 1:
        raise DataError(f"classes must be distinct and non-empty, got {classes!r}")
    return tuple(out)


def _standardize(x_train: np.ndarray, x_test: np.ndarray, axes: tuple[int, ...]):
    """(x - mean) / std with train statistics over `axes`; constant features only centred."""
    mean = x_train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x_train.std(axis=axes, keepdims=True, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def digits(
    seed: int = 0,
    test_fraction: float = 0.2,
    classes: Sequence[int] | None = None,
    n_train: int | None = None,
    normalize: str = "unit",
    binary: bool = False,
    image: bool = False,
) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes, pixels 0..16).

    Recipe: keep the images of `classes` (default all ten) and relabel classes[i] -> i; split
    stratified: within each class a seeded permutation sends round(test_fraction * count) images
    to test and the rest to train; each split is then shuffled (seeded); `n_train` keeps the
    first n_train train rows. Then `normalize`:
      "unit":     x / ||x||_2 per image (rows of unit L2 norm);
      "standard": x / 16, then per-pixel (x - mean) / std with the train split's statistics
                  (pixels constant on train are only centred);
      "scale":    x / 16, in [0, 1];
      "none":     raw 0..16.
    `binary=True` needs exactly two classes: y float32, -1 for classes[0] and +1 for classes[1],
    num_classes = 2. Shapes: x (n, 64) float32, or (n, 1, 8, 8) with `image=True`; y (n,) int32.
    """
    test_fraction = _float("test_fraction", test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    classes = _classes(classes)
    n_train = _opt_int("n_train", n_train, 1)
    normalize = _choice("normalize", normalize, ("unit", "standard", "scale", "none"))
    if binary and len(classes) != 2:
        raise DataError(f"binary=True needs exactly two classes, got classes={classes!r}")
    split_rng, order_rng = _streams(seed, 2)

    from sklearn.datasets import load_digits

    bunch = load_digits()
    x_all = np.asarray(bunch.data, dtype=np.float64)
    y_all = np.asarray(bunch.target)
    train_idx, test_idx, labels = [], [], np.full(y_all.shape, -1, dtype=np.int32)
    for new, c in enumerate(classes):
        idx = np.flatnonzero(y_all == c)
        labels[idx] = new
        idx = split_rng.permutation(idx)
        k = int(round(test_fraction * idx.size))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    train_idx = order_rng.permutation(np.concatenate(train_idx))
    test_idx = order_rng.permutation(np.concatenate(test_idx))
    if train_idx.size == 0:
        raise DataError(f"test_fraction={test_fraction} leaves no training examples")
    train_idx = train_idx[: _truncate("n_train", n_train, train_idx.size)]

    x_train, x_test = x_all[train_idx], x_all[test_idx]
    if normalize == "unit":
        x_train = x_train / np.maximum(np.linalg.norm(x_train, axis=1, keepdims=True), 1e-12)
        x_test = x_test / np.maximum(np.linalg.norm(x_test, axis=1, keepdims=True), 1e-12)
    elif normalize in ("scale", "standard"):
        x_train, x_test = x_train / 16.0, x_test / 16.0
        if normalize == "standard":
            x_train, x_test = _standardize(x_train, x_test, (0,))
    x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
    if image:
        x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)

    y_train, y_test = labels[train_idx], labels[test_idx]
    if binary:
        y_train = np.where(y_train == 0, -1.0, 1.0).astype(np.float32)
        y_test = np.where(y_test == 0, -1.0, 1.0).astype(np.float32)
    name = "digits" if classes == tuple(range(10)) else "digits" + "".join(map(str, classes))
    return Dataset(x_train, y_train, x_test, y_test, len(classes), name)


# --------------------------------------------------------------------------- signals


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) row-stochastic matrix of area-averaging resampling along one axis."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    j = np.arange(n_in)
    lo = np.maximum(j[None, :], edges[:-1, None])
    hi = np.minimum(j[None, :] + 1, edges[1:, None])
    return np.clip(hi - lo, 0.0, None) / (n_in / n_out)


def sample_image(name: str = "china", size: int = 64, grayscale: bool = True) -> np.ndarray:
    """One of scikit-learn's two sample photographs, square, resized, in [0, 1].

    Recipe: load "china.jpg" or "flower.jpg" (427 x 640 RGB uint8), crop the central
    min(H, W) square, resize to (size, size) by area averaging (each output pixel is the mean
    of the input area it covers), divide by 255; grayscale is 0.299 R + 0.587 G + 0.114 B.
    Returns float32 (size, size) if `grayscale`, else (3, size, size) channel-first.
    """
    if not isinstance(name, str):
        raise DataError(f"name must be 'china' or 'flower', got {name!r}")
    stem = name[:-4] if name.endswith(".jpg") else name
    _choice("name", stem, ("china", "flower"))
    size = _int("size", size, 1)
    from sklearn.datasets import load_sample_image

    img = np.asarray(load_sample_image(stem + ".jpg"), dtype=np.float64) / 255.0
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = img[top : top + s, left : left + s]
    a = _area_matrix(s, size)
    out = np.einsum("ih,hwc,jw->cij", a, img, a)
    if grayscale:
        out = np.tensordot(np.array([0.299, 0.587, 0.114]), out, axes=1)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def step_signal(
    n: int = 1024, low: float = 0.0, high: float = 1.0, position: float = 0.5
) -> np.ndarray:
    """A 1-D step: s[i] = low for i < int(position * n), high otherwise; float32 (n,)."""
    n = _int("n", n, 1)
    low, high = _float("low", low), _float("high", high)
    position = _float("position", position)
    if not 0.0 <= position <= 1.0:
        raise DataError(f"position must be in [0, 1], got {position}")
    s = np.full(n, high, dtype=np.float32)
    s[: int(position * n)] = low
    return s


def signal_fitting(
    signal,
    in_channels: int = 4,
    in_shape: Sequence[int] | None = None,
    seed: int = 0,
    noise_std: float = 1.0,
    name: str = "signal",
) -> Dataset:
    """Fit one signal from a fixed noise input (deep image prior / deep decoder).

    `signal` is (n,) (1-D), (H, W) (grayscale image) or (C, H, W) (channel-first image); its
    spatial shape is (n,) or (H, W) and C_out is 1, 1 or C. Returns one training example:
    x_train ~ N(0, noise_std^2) of shape (1, in_channels, *in_shape) (in_shape defaults to the
    spatial shape), drawn from `seed`; y_train = signal as (1, C_out, *spatial) float32. The test
    split has 0 rows with the same trailing shapes; num_classes = 0.
    """
    y = np.asarray(signal)
    if y.ndim not in (1, 2, 3) or y.size == 0:
        raise DataError(
            f"signal must be a non-empty (n,), (H, W) or (C, H, W) array, got shape {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.number):
        raise DataError(f"signal must be numeric, got dtype {y.dtype}")
    y = y.astype(np.float32)
    y = y[None] if y.ndim < 3 else y
    spatial = y.shape[1:]
    in_channels = _int("in_channels", in_channels, 1)
    if in_shape is None:
        in_shape = spatial
    else:
        try:
            in_shape = tuple(in_shape)
        except TypeError:
            in_shape = (in_shape,)
        in_shape = tuple(_int("in_shape[]", s, 1) for s in in_shape)
    noise_std = _float("noise_std", noise_std, 0.0)
    (rng,) = _streams(seed, 1)
    x = (noise_std * rng.standard_normal((1, in_channels, *in_shape))).astype(np.float32)
    return Dataset(
        x,
        y[None],
        np.zeros((0, *x.shape[1:]), np.float32),
        np.zeros((0, *y.shape), np.float32),
        0,
        str(name),
    )


# --------------------------------------------------------------------------- files on disk

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000TTDD big-endian, DD dims of >u4."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4:
        raise DataError(f"{path} is not an IDX file (too short)")
    zero, code, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES or dims != ndim:
        magic = struct.unpack(">I", raw[:4])[0]
        raise DataError(f"{path}: bad IDX magic {magic} (expected a {ndim}-dimensional IDX file)")
    header = 4 + 4 * dims
    shape = struct.unpack(f">{dims}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = math.prod(shape)
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(
            f"{path}: IDX header says {shape} but the file holds {len(raw) - header} data bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(root: str, names: Sequence[str], suffixes: Sequence[str]) -> dict[str, str | None]:
    found = {}
    for n in names:
        found[n] = next(
            (p for s in suffixes if os.path.isfile(p := os.path.join(root, n + s))), None
        )
    return found


def _shuffle_truncate(rng: np.random.Generator, x, y, n, arg: str):
    n = _truncate(arg, n, x.shape[0])
    perm = rng.permutation(x.shape[0])[:n]
    return x[perm], y[perm]


def _normalize_uint8(x_train, x_test, normalize: str):
    """uint8 (n, C, H, W) -> float32 with "scale" (/255), "standard" (per channel), "none"."""
    x_train, x_test = x_train.astype(np.float32), x_test.astype(np.float32)
    if normalize == "none":
        return x_train, x_test
    x_train, x_test = x_train / np.float32(255.0), x_test / np.float32(255.0)
    if normalize == "standard":
        x_train, x_test = _standardize(x_train, x_test, (0, 2, 3))
    return x_train, x_test


def mnist(
    root,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
    normalize: str = "scale",
    flatten: bool = True,
) -> Dataset:
    """MNIST from the four standard IDX files in directory `root` (each may end in .gz).

    Files: train-images-idx3-ubyte (magic 2051, dims n, 28, 28), train-labels-idx1-ubyte (magic
    2049, dims n), t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; the official 60000 / 10000
    split. Each split is shuffled by a seeded permutation and truncated to n_train / n_test.
    `normalize`: "scale" x / 255; "standard" (x / 255 - mean) / std with the returned train
    split's statistics (one channel); "none" raw 0..255. Shapes: x (n, 784) float32, or
    (n, 1, 28, 28) with flatten=False; y (n,) int32 in 0..9.
    """
    root = os.fspath(root)
    n_train = _opt_int("n_train", n_train, 1)
    n_test = _opt_int("n_test", n_test, 0)
    normalize = _choice("normalize", normalize, ("scale", "standard", "none"))
    found = _find(root, list(_MNIST_FILES.values()), ("", ".gz"))
    missing = [n for n, p in found.items() if p is None]
    if missing:
        raise DataError(
            f"MNIST files missing in {root!r}: {', '.join(missing)}; expected "
            f"{', '.join(_MNIST_FILES.values())} (each optionally with .gz)"
        )
    arrays = {}
    for key, fname in _MNIST_FILES.items():
        arrays[key] = _read_idx(found[fname], 3 if key.startswith("x") else 1)
    for split in ("train", "test"):
        if arrays[f"x_{split}"].shape[0] != arrays[f"y_{split}"].shape[0]:
            raise DataError(
                f"MNIST {split} images ({arrays[f'x_{split}'].shape[0]}) and labels "
                f"({arrays[f'y_{split}'].shape[0]}) disagree in {root!r}"
            )
    train_rng, test_rng = _streams(seed, 2)
    x_train, y_train = _shuffle_truncate(
        train_rng, arrays["x_train"], arrays["y_train"], n_train, "n_train"
    )
    x_test, y_test = _shuffle_truncate(
        test_rng, arrays["x_test"], arrays["y_test"], n_test, "n_test"
    )
    x_train, x_test = _normalize_uint8(x_train[:, None], x_test[:, None], normalize)
    if flatten:
        x_train = x_train.reshape(x_train.shape[0], -1)
        x_test = x_test.reshape(x_test.shape[0], -1)
    return Dataset(x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32), 10, "mnist")


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    # The batches are pickles: only load files from a source you trust.
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # any unpickling failure means a bad file
        raise DataError(f"cannot read CIFAR-10 batch {path}: {e}") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: batch dict lacks b'data' or b'labels'")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DataError(
            f"{path}: expected data (N, 3072) and labels (N,), got {data.shape} and {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def cifar10(
    root,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
    normalize: str = "scale",
) -> Dataset:
    """CIFAR-10, "python version": root/data_batch_1..5 and root/test_batch.

    Also found under root/cifar-10-batches-py/. Each batch is a pickled dict with b"data"
    (N, 3072) uint8, a row being the 1024 red, then green, then blue pixels of a 32x32 image in
    row-major order, and b"labels" (N,). Rows become x (n, 3, 32, 32) float32 (channel-first);
    the train batches are concatenated in order. Each split is shuffled by a seeded permutation
    and truncated to n_train / n_test. `normalize`: "scale" x / 255; "standard" per-channel
    (x / 255 - mean_c) / std_c with the returned train split's statistics; "none" raw 0..255.
    y (n,) int32 in 0..9.
    """
    root = os.fspath(root)
    n_train = _opt_int("n_train", n_train, 1)
    n_test = _opt_int("n_test", n_test, 0)
    normalize = _choice("normalize", normalize, ("scale", "standard", "none"))
    names = _CIFAR_TRAIN + _CIFAR_TEST
    base = None
    for cand in (root, os.path.join(root, "cifar-10-batches-py")):
        if all(os.path.isfile(os.path.join(cand, n)) for n in names):
            base = cand
            break
    if base is None:
        raise DataError(
            f"CIFAR-10 batches missing in {root!r} (or its cifar-10-batches-py/): expected "
            f"{', '.join(names)}"
        )
    train = [_read_cifar_batch(os.path.join(base, n)) for n in _CIFAR_TRAIN]
    x_train = np.concatenate([b[0] for b in train])
    y_train = np.concatenate([b[1] for b in train])
    x_test, y_test = _read_cifar_batch(os.path.join(base, _CIFAR_TEST[0]))
    train_rng, test_rng = _streams(seed, 2)
    x_train, y_train = _shuffle_truncate(train_rng, x_train, y_train, n_train, "n_train")
    x_test, y_test = _shuffle_truncate(test_rng, x_test, y_test, n_test, "n_test")
    x_train, x_test = _normalize_uint8(x_train, x_test, normalize)
    return Dataset(
        x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32), 10, "cifar10"
    )


# --------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable[..., Dataset]] = {
    "teacher_regression": teacher_regression,
    "teacher_classification": teacher_classification,
    "gaussian_mixture": gaussian_mixture,
    "digits": digits,
    "mnist": mnist,
    "cifar10": cifar10,
}


def load(name: str, **kwargs) -> Dataset:
    """`DATASETS[name](**kwargs)`; an unknown name raises DataError listing the known ones."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](**kwargs)
