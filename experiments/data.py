"""Data sets: CIFAR-10 and Fashion-MNIST from a local folder (torchvision layout, md5-checked), and
data that needs no network: scikit-learn's digits and the default MNIST-1D (both embedded as .npz files here, so
the runner needs neither scikit-learn nor mnist1d for them), other MNIST-1D sizes (generated offline by the
mnist1d package) and synthetic.

Every loader returns a :class:`DataSplit` of float32 features and int64 labels, preprocessed the
paper's way: pixels divided by their maximum (255 for images, 16 for digits), then standardized per
feature with the *training* set's mean and std. No augmentation.

Expected local layout (``root`` defaults to ``$FASTHESS_DATA`` or ``./data``)::

    root/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch
    root/FashionMNIST/raw/train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
                          t10k-images-idx3-ubyte[.gz],  t10k-labels-idx1-ubyte[.gz]
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = [
    ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
    ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
    ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
    ("data_batch_4", "634d18415352ddfa80567beed471001a"),
    ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
]
CIFAR10_TEST = [("test_batch", "40351d587109b95175f43aff81a1287e")]
FMNIST_DIR = os.path.join("FashionMNIST", "raw")
# md5 of the official .gz files (as torchvision checks them). Uncompressed files are checked by
# content: IDX magic number, shapes and counts.
FMNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train_labels": ("train-labels-idx1-ubyte", "25c81989df183df01b3e8a0aad5dffbe"),
    "test_images": ("t10k-images-idx3-ubyte", "bef4ecab320f06d8554ea6380940ec79"),
    "test_labels": ("t10k-labels-idx1-ubyte", "bb300cfdad3c16e7a12a480ee83cd310"),
}

DATASETS = ("cifar10", "fashion_mnist", "digits", "mnist1d", "synthetic")


class DataError(FileNotFoundError):
    """A data set's files are missing or corrupt."""


@dataclass
class DataSplit:
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    num_classes: int
    input_shape: tuple[int, ...]  # one example's shape, e.g. (3, 32, 32) or (64,)
    meta: dict = field(default_factory=dict)

    @property
    def train(self):
        return self.X_train, self.y_train

    @property
    def test(self):
        return self.X_test, self.y_test

    def to(self, device) -> "DataSplit":
        return DataSplit(self.X_train.to(device), self.y_train.to(device), self.X_test.to(device),
                         self.y_test.to(device), self.name, self.num_classes, self.input_shape, dict(self.meta))


def default_root() -> Path:
    return Path(os.environ.get("FASTHESS_DATA", "data"))


def md5(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_md5(path: Path, expected: str, verify: bool) -> None:
    if verify and md5(path) != expected:
        raise DataError(f"{path} is corrupt: md5 {md5(path)} != expected {expected}. Replace it with the "
                        "official file (or pass verify=False / --set verify=false for test files).")


# ---------------------------------------------------------------------------- CIFAR-10
def read_cifar10(root: str | Path | None = None, verify: bool = True):
    """Raw CIFAR-10 from the python pickle batches: (X_train uint8 (N,3,32,32), y_train, X_test, y_test)."""
    base = Path(root if root is not None else default_root()) / CIFAR10_DIR
    missing = [n for n, _ in CIFAR10_TRAIN + CIFAR10_TEST if not (base / n).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 not found: missing {', '.join(missing)} in {base.resolve()}. Downloads are impossible here: "
            f"copy the extracted 'cifar-10-python.tar.gz' (folder {CIFAR10_DIR}/ with data_batch_1..5 and test_batch) "
            f"into {Path(base.parent).resolve()}/ (or set FASTHESS_DATA / --set data_root=DIR).")

    def load(names):
        xs, ys = [], []
        for n, h in names:
            _check_md5(base / n, h, verify)
            with open(base / n, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            x = d["data"] if "data" in d else d[b"data"]
            y = d["labels"] if "labels" in d else d[b"labels"]
            xs.append(np.asarray(x, dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(y, dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    Xtr, ytr = load(CIFAR10_TRAIN)
    Xte, yte = load(CIFAR10_TEST)
    return Xtr, ytr, Xte, yte


# ---------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x00 0x00 dtype ndim, big-endian int32 dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DataError(f"{path}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = struct.unpack(">" + "i" * ndim, raw[4:4 + 4 * ndim])
    dt = np.dtype(dtypes[raw[2]])
    count = int(np.prod(dims)) if dims else 0
    off = 4 + 4 * ndim
    if len(raw) - off != count * dt.itemsize:
        raise DataError(f"{path}: IDX header says {dims} ({count * dt.itemsize} bytes) but holds {len(raw) - off}")
    return np.frombuffer(raw, dtype=dt, offset=off, count=count).reshape(dims)


def write_idx(path: str | Path, arr: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped if the name ends in .gz). For tests and tools."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "i" * arr.ndim, *arr.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + arr.tobytes())


def read_fashion_mnist(root: str | Path | None = None, verify: bool = True):
    """Raw Fashion-MNIST from torchvision's raw/ folder: (X_train uint8 (N,1,28,28), y_train, X_test, y_test)."""
    base = Path(root if root is not None else default_root()) / FMNIST_DIR
    out = {}
    for key, (name, gz_md5) in FMNIST_FILES.items():
        plain, gz = base / name, base / (name + ".gz")
        if plain.is_file():
            out[key] = read_idx(plain)
        elif gz.is_file():
            _check_md5(gz, gz_md5, verify)
            out[key] = read_idx(gz)
        else:
            raise DataError(
                f"Fashion-MNIST not found: neither {plain.name} nor {gz.name} in {base.resolve()}. Downloads are "
                f"impossible here: copy the four official files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) into {base.resolve()}/ "
                "(or set FASTHESS_DATA / --set data_root=DIR).")
    for split in ("train", "test"):
        X, y = out[f"{split}_images"], out[f"{split}_labels"]
        if X.ndim != 3 or y.ndim != 1 or len(X) != len(y):
            raise DataError(f"Fashion-MNIST {split}: images {X.shape} and labels {y.shape} do not match")
    return (out["train_images"][:, None].copy(), out["train_labels"].astype(np.int64),
            out["test_images"][:, None].copy(), out["test_labels"].astype(np.int64))


# ---------------------------------------------------------------------------- embedded
EMBEDDED = Path(__file__).parent  # digits.npz, mnist1d.npz
# The MNIST-1D arguments whose data set is embedded (the mnist1d package's defaults, used by the quick presets).
MNIST1D_EMBEDDED = {"num_samples": 5000, "seed": 42}


def _read_embedded(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and int64 labels of ``<name>.npz`` beside this module (written by tools/embed_data.py)."""
    with np.load(EMBEDDED / f"{name}.npz") as f:
        return f["x"], f["y"].astype(np.int64)


def read_digits():
    """scikit-learn's 8x8 digits (1797 examples, pixel values 0..16), embedded as uint8 (equal to
    ``sklearn.datasets.load_digits``, checked by tests/test_embedded_data.py): first 1297 train, last 500 test."""
    X, y = _read_embedded("digits")
    X = X.astype(np.float32)[:, None]  # (N,1,8,8)
    return X[:1297], y[:1297], X[1297:], y[1297:]


def generate_mnist1d(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-1D from the mnist1d package: float32 features (N,1,40) and int64 labels, its train split first.
    NumPy's global random state is restored afterwards (the package draws from it)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ModuleNotFoundError as exc:
        raise DataError(f"MNIST-1D with num_samples={num_samples}, seed={seed} is generated by the mnist1d package, "
                        f"which is not installed (only {MNIST1D_EMBEDDED} is embedded): pip install mnist1d") from exc
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    state = np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    X = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)[:, None]
    return X, np.concatenate([d["y"], d["y_test"]]).astype(np.int64)


def read_mnist1d(num_samples: int = 5000, seed: int = 42, num_train: int | None = None):
    """MNIST-1D (40 features): ``num_samples`` examples, the first ``num_train`` of them for training (default
    80 %, the package's split: 4000 train / 1000 test). The default set is embedded (equal to
    :func:`generate_mnist1d`, checked by tests/test_embedded_data.py); other sizes and seeds need mnist1d."""
    if {"num_samples": num_samples, "seed": seed} == MNIST1D_EMBEDDED:
        X, y = _read_embedded("mnist1d")
        X = X[:, None]
    else:
        X, y = generate_mnist1d(num_samples, seed)
    k = int(len(X) * 0.8) if num_train is None else num_train  # the package's split: int(len · train_split)
    if not 0 < k < len(X):
        raise ValueError(f"mnist1d num_train must be in [1, num_samples), got {num_train} of {num_samples}")
    return X[:k], y[:k], X[k:], y[k:]


def read_synthetic(n_train: int = 1000, n_test: int = 500, dim: int = 20, num_classes: int = 4, seed: int = 0,
                   noise: float = 1.0):
    """Gaussian clusters with a random class mean each (seeded, no files)."""
    g = np.random.default_rng(seed)
    means = g.standard_normal((num_classes, dim)) * 1.5

    def draw(n):
        y = g.integers(0, num_classes, n)
        return (means[y] + noise * g.standard_normal((n, dim))).astype(np.float32), y.astype(np.int64)

    X, y = draw(n_train)
    Xt, yt = draw(n_test)
    return X, y, Xt, yt


# ---------------------------------------------------------------------------- public entry
def subset_indices(n: int, first: int | None = None, stride: int | None = None) -> np.ndarray:
    """Indices of a subset: every ``stride``-th example (0, k, 2k, ...), then the first ``first`` of those."""
    idx = np.arange(n)
    if stride:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        idx = idx[::stride]
    if first is not None:
        if first < 1:
            raise ValueError(f"subset size must be >= 1, got {first}")
        idx = idx[:first]
    return idx


def load_dataset(name: str, *, root: str | Path | None = None, verify: bool = True, train_subset: int | None = None,
                 train_stride: int | None = None, test_subset: int | None = None, test_stride: int | None = None,
                 standardize: bool = True, flatten: bool = False, device="cpu", **kwargs) -> DataSplit:
    """Load ``name`` (one of :data:`DATASETS`), subset it, preprocess it the paper's way, move it to ``device``.

    Standardization statistics come from the (subsetted) training set; features with zero std are
    only centered.
    """
    name = name.lower().replace("-", "_")
    if name == "cifar10":
        Xtr, ytr, Xte, yte = read_cifar10(root, verify)
        scale = 255.0
    elif name in ("fashion_mnist", "fmnist", "fashionmnist"):
        name = "fashion_mnist"
        Xtr, ytr, Xte, yte = read_fashion_mnist(root, verify)
        scale = 255.0
    elif name == "digits":
        Xtr, ytr, Xte, yte = read_digits()
        scale = 16.0
    elif name == "mnist1d":
        Xtr, ytr, Xte, yte = read_mnist1d(**kwargs)
        scale = 1.0
    elif name == "synthetic":
        Xtr, ytr, Xte, yte = read_synthetic(**kwargs)
        scale = 1.0
    else:
        raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")
    i = subset_indices(len(Xtr), train_subset, train_stride)
    j = subset_indices(len(Xte), test_subset, test_stride)
    Xtr, ytr, Xte, yte = Xtr[i], ytr[i], Xte[j], yte[j]
    Xtr = torch.from_numpy(np.asarray(Xtr, dtype=np.float32) / np.float32(scale))
    Xte = torch.from_numpy(np.asarray(Xte, dtype=np.float32) / np.float32(scale))
    if standardize:
        flat = Xtr.reshape(len(Xtr), -1).double()
        mean = flat.mean(0)
        std = flat.std(0, unbiased=False)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        Xtr = ((flat - mean) / std).float().reshape(Xtr.shape)
        Xte = ((Xte.reshape(len(Xte), -1).double() - mean) / std).float().reshape(Xte.shape)
    shape = tuple(Xtr.shape[1:])
    if flatten:
        Xtr, Xte = Xtr.reshape(len(Xtr), -1), Xte.reshape(len(Xte), -1)
        shape = (int(np.prod(shape)),)
    ytr_t, yte_t = torch.from_numpy(np.asarray(ytr, dtype=np.int64)), torch.from_numpy(np.asarray(yte, dtype=np.int64))
    num_classes = int(max(int(ytr_t.max()), int(yte_t.max()) if len(yte_t) else 0) + 1)
    ds = DataSplit(Xtr.contiguous(), ytr_t, Xte.contiguous(), yte_t, name, num_classes, shape,
                   {"n_train": len(Xtr), "n_test": len(Xte)})
    return ds.to(device)
