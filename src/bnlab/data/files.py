"""Readers for the standard dataset files, and fetching them with a SHA-256 check.

* IDX (MNIST, Fashion-MNIST): big-endian magic ``0x0000 <type> <ndim>``, ``ndim`` uint32
  sizes, then the data; read from ``.gz`` or raw files.
* CIFAR-10 "python version" tarball: ``cifar-10-batches-py/data_batch_{1..5}`` and
  ``test_batch``, each a pickled dict with ``data`` (10000, 3072) uint8 and ``labels``.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np

from ..extras import need


class DatasetError(RuntimeError):
    """A dataset file is missing, damaged or not what it claims to be."""


_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        raise DatasetError(
            f"{path} is damaged or truncated ({e}); delete it and fetch it again"
        ) from e


def read_idx(path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array of its declared shape and type."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated: header of {header} bytes, file has {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(
            f"{path} is truncated or padded: shape {shape} needs {expected} bytes, "
            f"file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_cifar10_tarball(
    path,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Read CIFAR-10's python tarball -> ((train_x, train_y), (test_x, test_y)), x uint8 NCHW."""
    path = Path(path)

    def batch(tar, name):
        try:
            member = tar.extractfile(f"cifar-10-batches-py/{name}")
        except KeyError:
            raise DatasetError(f"{path} has no cifar-10-batches-py/{name}") from None
        d = pickle.load(member, encoding="bytes")  # the tarball's format; hash-checked before
        x = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32)
        return x, np.asarray(d[b"labels"], np.int64)

    try:
        with tarfile.open(path, "r:gz") as tar:
            train = [batch(tar, f"data_batch_{i}") for i in range(1, 6)]
            test = batch(tar, "test_batch")
    except (tarfile.TarError, EOFError, OSError, pickle.UnpicklingError, KeyError) as e:
        raise DatasetError(
            f"{path} is damaged or truncated ({e}); delete it and fetch it again"
        ) from e
    return (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])), test


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(
    root: Path,
    filename: str,
    expected_sha256: str,
    urls: list[str],
    *,
    download: bool = True,
    dataset: str = "",
) -> Path:
    """Return ``root/filename`` after checking its SHA-256, downloading it first if absent.

    Downloads go through pooch (which also checks the hash). A present file with the wrong
    hash is an error, never silently replaced; no network gives an error that says where
    to put the file.
    """
    root = Path(root)
    path = root / filename
    if path.exists():
        got = sha256(path)
        if got != expected_sha256:
            raise DatasetError(
                f"{path} has SHA-256 {got}, expected {expected_sha256} for "
                f"{dataset or filename}: the file is damaged or a different "
                f"version; delete it to download it again"
            )
        return path
    where = f"put {filename} (SHA-256 {expected_sha256}) in {root}, from {urls[0]}"
    if not download:
        raise DatasetError(f"{dataset or filename}: {path} not found; {where}")
    pooch = need("pooch", "downloading datasets")

    root.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        try:
            return Path(
                pooch.retrieve(
                    url,
                    known_hash=f"sha256:{expected_sha256}",
                    fname=filename,
                    path=root,
                    progressbar=False,
                )
            )
        except Exception as e:  # network errors and hash mismatches alike: try the next mirror
            errors.append(f"{url}: {type(e).__name__}: {str(e)[:120]}")
    raise DatasetError(
        f"{dataset or filename}: could not download {filename} "
        f"({'; '.join(errors)}). Offline? Then {where}"
    )
