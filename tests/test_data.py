"""Dataset loaders on small IDX files and tarballs the tests write themselves."""

import gzip
import io
import pickle
import tarfile

import numpy as np
import pytest

from bnlab import data
from bnlab.data import datasets as ds_module
from bnlab.data import files


def write_idx(path, array: np.ndarray, gz=True):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += np.array(array.shape, ">u4").tobytes()
    raw = header + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_mnist_folder(root, name="mnist", n_train=30, n_test=10):
    rng = np.random.default_rng(0)
    folder = root / name
    folder.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return {p.name: files.sha256(p) for p in folder.iterdir()}


def test_read_idx_gz_and_raw(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(files.read_idx(write_idx(tmp_path / "a.gz", a)), a)
    np.testing.assert_array_equal(files.read_idx(write_idx(tmp_path / "a.idx", a, gz=False)), a)


def test_truncated_and_bad_idx_files_are_clear_errors(tmp_path):
    a = np.arange(100, dtype=np.uint8).reshape(4, 25)
    raw = write_idx(tmp_path / "a.idx", a, gz=False).read_bytes()
    (tmp_path / "short.idx").write_bytes(raw[:-7])
    with pytest.raises(data.DatasetError, match="truncated or padded: shape \\(4, 25\\) needs 112 bytes, file has 105"):
        files.read_idx(tmp_path / "short.idx")
    gz = write_idx(tmp_path / "a.gz", a).read_bytes()
    (tmp_path / "short.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(data.DatasetError, match="damaged or truncated"):
        files.read_idx(tmp_path / "short.gz")
    (tmp_path / "junk.idx").write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(data.DatasetError, match="not an IDX file"):
        files.read_idx(tmp_path / "junk.idx")


def test_load_mnist_from_a_folder_checks_hashes(tmp_path, monkeypatch):
    hashes = make_mnist_folder(tmp_path)
    monkeypatch.setattr(ds_module, "MNIST_FILES", hashes)
    d = data.load("mnist", root=tmp_path, download=False)
    assert d.train[0].shape == (30, 1, 28, 28) and d.train[0].dtype == np.float32
    assert d.test[1].dtype == np.int64 and len(d.test[1]) == 10
    assert 0.0 <= d.train[0].min() and d.train[0].max() <= 1.0


def test_wrong_hash_is_an_error_not_a_silent_replacement(tmp_path, monkeypatch):
    hashes = make_mnist_folder(tmp_path)
    bad = dict(hashes, **{"t10k-labels-idx1-ubyte.gz": "0" * 64})
    monkeypatch.setattr(ds_module, "MNIST_FILES", bad)
    with pytest.raises(data.DatasetError, match="t10k-labels-idx1-ubyte.gz has SHA-256 [0-9a-f]{64}, expected 0{64}"):
        data.load("mnist", root=tmp_path, download=False)


def test_truncated_dataset_file_with_right_hash_is_reported(tmp_path, monkeypatch):
    hashes = make_mnist_folder(tmp_path)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    monkeypatch.setattr(ds_module, "MNIST_FILES", dict(hashes, **{path.name: files.sha256(path)}))
    with pytest.raises(data.DatasetError, match="damaged or truncated"):
        data.load("mnist", root=tmp_path, download=False)


def test_missing_files_offline_say_where_to_put_them(tmp_path, monkeypatch):
    with pytest.raises(data.DatasetError, match=r"not found; put train-images-idx3-ubyte.gz \(SHA-256 440fcabf"):
        data.load("mnist", root=tmp_path, download=False)
    import pooch

    def no_network(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(pooch, "retrieve", no_network)
    with pytest.raises(data.DatasetError, match=r"could not download .*Offline\? Then put"):
        data.load("fashion-mnist", root=tmp_path)


def make_cifar_tarball(path, n=4):
    rng = np.random.default_rng(0)

    def add(tar, name, k):
        payload = pickle.dumps({b"data": rng.integers(0, 256, (k, 3072), dtype=np.uint8),
                                b"labels": list(range(k))})
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    with tarfile.open(path, "w:gz") as tar:
        for i in range(1, 6):
            add(tar, f"data_batch_{i}", n)
        add(tar, "test_batch", n)
    return path


def test_cifar10_tarball(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    tar = make_cifar_tarball(folder / "cifar-10-python.tar.gz")
    monkeypatch.setattr(ds_module, "CIFAR10_FILES", {tar.name: files.sha256(tar)})
    d = data.load("cifar10", root=tmp_path, download=False)
    assert d.train[0].shape == (20, 3, 32, 32) and d.test[0].shape == (4, 3, 32, 32)
    assert d.classes[0] == "airplane"
    tar.write_bytes(tar.read_bytes()[:300])
    monkeypatch.setattr(ds_module, "CIFAR10_FILES", {tar.name: files.sha256(tar)})
    with pytest.raises(data.DatasetError, match="damaged or truncated"):
        data.load("cifar10", root=tmp_path, download=False)


def test_embedded_mnist_sample_has_a_fixed_stratified_split():
    d = data.load("mnist-5k")
    assert d.train[0].shape == (4000, 1, 28, 28) and d.test[0].shape == (1000, 1, 28, 28)
    assert np.bincount(d.test[1]).tolist() == [100] * 10
    again = data.load("mnist-5k")
    np.testing.assert_array_equal(d.test[1], again.test[1])
    np.testing.assert_array_equal(d.train[0][:5], again.train[0][:5])
    # train and test are disjoint images
    tr = {x.tobytes() for x in d.train[0]}
    assert not any(x.tobytes() in tr for x in d.test[0])


def test_digits_and_unknown_names():
    d = data.load("digits")
    assert d.image_shape == (1, 8, 8) and len(d.train[1]) + len(d.test[1]) == 1797
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        data.load("imagenet")


def test_iterate_batches_seeded_and_drop_last():
    x, y = np.arange(10)[:, None], np.arange(10)
    a = [b[1].tolist() for b in data.iterate_batches(x, y, 4, rng=3)]
    b = [b[1].tolist() for b in data.iterate_batches(x, y, 4, rng=3)]
    assert a == b and [len(v) for v in a] == [4, 4, 2]
    assert sorted(sum(a, [])) == list(range(10))
    assert [len(v[1]) for v in data.iterate_batches(x, y, 4, drop_last=True)] == [4, 4]
    assert [v[1].tolist() for v in data.iterate_batches(x, y, 5, shuffle=False)][0] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="differ in length"):
        next(data.iterate_batches(x, y[:3], 2))
