"""Loaders read the real formats (files written here), check md5s, explain missing files; subsets; preprocessing."""
from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from experiments import data as D


def _write_cifar(root, n=6):
    base = root / D.CIFAR10_DIR
    base.mkdir(parents=True)
    g = np.random.default_rng(0)
    arrays = {}
    for name, _ in D.CIFAR10_TRAIN + D.CIFAR10_TEST:
        x = g.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = list(g.integers(0, 10, n))
        with open(base / name, "wb") as f:  # the official files are protocol-2 pickles with bytes keys
            pickle.dump({b"batch_label": name.encode(), b"labels": y, b"data": x, b"filenames": [b"x"] * n}, f, protocol=2)
        arrays[name] = (x, np.array(y))
    return arrays


def test_cifar10_reads_pickle_batches(tmp_path):
    arrays = _write_cifar(tmp_path)
    Xtr, ytr, Xte, yte = D.read_cifar10(tmp_path, verify=False)
    assert Xtr.shape == (30, 3, 32, 32) and Xte.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(Xtr[:6].reshape(6, -1), arrays["data_batch_1"][0])
    np.testing.assert_array_equal(ytr[6:12], arrays["data_batch_2"][1])
    ds = D.load_dataset("cifar10", root=tmp_path, verify=False)
    assert ds.input_shape == (3, 32, 32) and ds.X_train.dtype == torch.float32
    # standardized per feature with the training statistics
    torch.testing.assert_close(ds.X_train.reshape(30, -1).mean(0), torch.zeros(3072), atol=1e-5, rtol=0)
    with pytest.raises(D.DataError, match="corrupt"):
        D.read_cifar10(tmp_path, verify=True)


def test_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(D.DataError, match="cifar-10-batches-py"):
        D.load_dataset("cifar10", root=tmp_path)
    with pytest.raises(D.DataError, match="FashionMNIST"):
        D.load_dataset("fashion_mnist", root=tmp_path)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx(tmp_path, gz):
    base = tmp_path / "FashionMNIST" / "raw"
    base.mkdir(parents=True)
    g = np.random.default_rng(1)
    imgs = {"train": g.integers(0, 256, (12, 28, 28), dtype=np.uint8), "t10k": g.integers(0, 256, (5, 28, 28), dtype=np.uint8)}
    labs = {"train": g.integers(0, 10, 12).astype(np.uint8), "t10k": g.integers(0, 10, 5).astype(np.uint8)}
    suf = ".gz" if gz else ""
    for s in ("train", "t10k"):
        D.write_idx(base / f"{s}-images-idx3-ubyte{suf}", imgs[s])
        D.write_idx(base / f"{s}-labels-idx1-ubyte{suf}", labs[s])
    Xtr, ytr, Xte, yte = D.read_fashion_mnist(tmp_path, verify=False)
    np.testing.assert_array_equal(Xtr[:, 0], imgs["train"])
    np.testing.assert_array_equal(yte, labs["t10k"])
    # the header is the real format: magic 0x00000803, big-endian dims
    raw = (gzip.open if gz else open)(base / f"train-images-idx3-ubyte{suf}", "rb").read()
    assert raw[:4] == b"\x00\x00\x08\x03" and int.from_bytes(raw[4:8], "big") == 12
    ds = D.load_dataset("fashion_mnist", root=tmp_path, verify=False, train_stride=2)
    assert len(ds.X_train) == 6 and ds.input_shape == (1, 28, 28)
    if gz:
        with pytest.raises(D.DataError, match="corrupt"):
            D.read_fashion_mnist(tmp_path, verify=True)


def test_idx_rejects_truncated_files(tmp_path):
    D.write_idx(tmp_path / "a", np.zeros((3, 4), np.uint8))
    (tmp_path / "b").write_bytes((tmp_path / "a").read_bytes()[:-2])
    with pytest.raises(D.DataError):
        D.read_idx(tmp_path / "b")


def test_subsets_first_n_and_strided():
    np.testing.assert_array_equal(D.subset_indices(10, first=3), [0, 1, 2])
    np.testing.assert_array_equal(D.subset_indices(10, stride=4), [0, 4, 8])
    np.testing.assert_array_equal(D.subset_indices(10, first=2, stride=3), [0, 3])
    full = D.load_dataset("digits", standardize=False)
    sub = D.load_dataset("digits", train_stride=10, standardize=False)
    assert len(sub.X_train) == 130
    torch.testing.assert_close(sub.X_train, full.X_train[::10])


def test_embedded_data_sets():
    dg = D.load_dataset("digits")
    assert dg.X_train.shape == (1297, 1, 8, 8) and dg.num_classes == 10 and len(dg.X_test) == 500
    sy = D.load_dataset("synthetic", n_train=50, n_test=20, dim=4, num_classes=3)
    assert sy.X_train.shape == (50, 4) and sy.num_classes == 3
    a = D.load_dataset("synthetic", n_train=50, n_test=20)
    b = D.load_dataset("synthetic", n_train=50, n_test=20)
    assert torch.equal(a.X_train, b.X_train)
    pytest.importorskip("mnist1d")
    state = np.random.get_state()
    m = D.load_dataset("mnist1d", train_subset=100)
    assert m.X_train.shape == (100, 1, 40) and len(m.X_test) == 1000
    assert np.array_equal(np.random.get_state()[1], state[1])  # global numpy RNG untouched
