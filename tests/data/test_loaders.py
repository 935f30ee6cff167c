"""Loaders: exact round-trips through every on-disk format, and the errors users see."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from qrobust.data import DATASET_NAMES, DatasetInfo, dataset_info, load_dataset, loaders
from qrobust.errors import DatasetNotFoundError, QRobustError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def assert_lattice(dataset, images: np.ndarray, labels: np.ndarray) -> None:
    """``dataset`` holds exactly ``images`` (N, C, H, W) and ``labels``, as contiguous uint8 / int64."""
    assert dataset.images.dtype == torch.uint8
    assert dataset.labels.dtype == torch.int64
    assert dataset.images.is_contiguous()
    np.testing.assert_array_equal(dataset.images.numpy(), images)
    np.testing.assert_array_equal(dataset.labels.numpy(), labels.astype(np.int64))


def assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- registry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_dataset_info_is_consistent(name):
    info = dataset_info(name)
    assert isinstance(info, DatasetInfo)
    assert info.name == name
    channels = info.shape[0]
    assert len(info.mean) == len(info.std) == channels
    assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)
    assert len(set(info.classes)) == info.num_classes


def test_dataset_info_class_names():
    assert DATASET_NAMES == ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "digits")
    assert dataset_info("fashion-mnist").classes[0] == "T-shirt/top"
    assert dataset_info("fashion-mnist").classes[9] == "Ankle boot"
    assert dataset_info("cifar10").classes[3] == "cat"
    cifar100 = dataset_info("cifar100").classes
    assert len(cifar100) == 100 and list(cifar100) == sorted(cifar100)  # meta file order is alphabetical
    assert (cifar100[0], cifar100[99]) == ("apple", "worm")
    assert dataset_info("digits").shape == (1, 8, 8)


def test_unknown_name_lists_valid_names(tmp_path):
    for call in (lambda: dataset_info("imagenet"), lambda: load_dataset("imagenet", data_root=tmp_path)):
        with pytest.raises(ValueError, match=r"'imagenet'.*fashion-mnist, mnist, cifar10, cifar100, svhn, digits"):
            call()


@pytest.mark.parametrize("split", ["val", "Train", ""])
def test_bad_split(split, tmp_path):
    with pytest.raises(ValueError, match=f"split must be 'train' or 'test', got '{split}'"):
        load_dataset("mnist", split, data_root=tmp_path)


# --- IDX: MNIST and Fashion-MNIST ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("in_subdir", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_round_trip(name, compress, in_subdir, split, tmp_path, write_idx_split):
    directory = tmp_path / name if in_subdir else tmp_path
    images, labels = write_idx_split(directory, split, compress=compress)
    dataset = load_dataset(name, split, data_root=str(tmp_path))
    assert dataset.info == dataset_info(name)
    assert_lattice(dataset, images[:, None], labels)


def test_idx_subdir_wins_over_root(tmp_path, write_idx_split):
    in_subdir, _ = write_idx_split(tmp_path / "mnist")
    write_idx_split(tmp_path)
    np.testing.assert_array_equal(load_dataset("mnist", data_root=tmp_path).images[:, 0].numpy(), in_subdir)


def test_mnist_default_root_is_cwd_data(tmp_path, monkeypatch, write_idx_split):
    images, labels = write_idx_split(tmp_path / "data" / "mnist", "test")
    monkeypatch.chdir(tmp_path)
    assert_lattice(load_dataset("mnist", "test"), images[:, None], labels)


def test_fashion_mnist_default_is_system_dir(tmp_path, monkeypatch, write_idx_split):
    images, labels = write_idx_split(tmp_path / "system")
    monkeypatch.setattr(loaders, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")
    assert_lattice(load_dataset("fashion-mnist"), images[:, None], labels)


def test_fashion_mnist_missing_from_system_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(loaders, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset("fashion-mnist", "test")
    message = assert_one_line(error)
    assert message.startswith("Fashion-MNIST not found: expected t10k-images-idx3-ubyte.gz and t10k-labels")
    assert str(tmp_path / "absent") in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-root DIR" in message


def test_mnist_missing_names_both_dirs(tmp_path, write_idx_split):
    write_idx_split(tmp_path / "mnist", "test")  # only the other split is present
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset("mnist", "train", data_root=tmp_path)
    message = assert_one_line(error)
    assert "train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz" in message
    assert f"{tmp_path / 'mnist'} or {tmp_path}" in message
    assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, QRobustError)


def test_idx_images_and_labels_must_be_in_one_dir(tmp_path, write_idx_split):
    write_idx_split(tmp_path / "mnist")
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").rename(tmp_path / "train-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetNotFoundError):
        load_dataset("mnist", data_root=tmp_path)


def _corrupt(path: Path, how: str) -> None:
    raw = gzip.decompress(path.read_bytes())
    if how == "truncated gzip":
        path.write_bytes(path.read_bytes()[:-30])
    elif how == "not gzip":
        path.write_bytes(raw)
    elif how == "short data":
        path.write_bytes(gzip.compress(raw[:-1]))
    elif how == "extra data":
        path.write_bytes(gzip.compress(raw + b"\0"))
    elif how == "bad magic":
        path.write_bytes(gzip.compress(b"\1" + raw[1:]))
    elif how == "int32 type":
        path.write_bytes(gzip.compress(raw[:2] + b"\x0c" + raw[3:]))
    elif how == "header only":
        path.write_bytes(gzip.compress(raw[:6]))


@pytest.mark.parametrize(
    "how", ["truncated gzip", "not gzip", "short data", "extra data", "bad magic", "int32 type", "header only"]
)
def test_corrupt_idx(how, tmp_path, write_idx_split):
    write_idx_split(tmp_path, n=50)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _corrupt(path, how)
    with pytest.raises(QRobustError, match=f"{path} is not a valid IDX file: "):
        load_dataset("fashion-mnist", data_root=tmp_path)


def test_truncated_raw_idx(tmp_path, write_idx_split):
    write_idx_split(tmp_path, compress=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(QRobustError, match="not a valid IDX file: dimensions \\(5,\\) need 13 bytes, found 11"):
        load_dataset("mnist", data_root=tmp_path)


def test_idx_label_count_and_range_are_checked(tmp_path, write_idx_split, idx_bytes):
    write_idx_split(tmp_path, n=4, compress=False)
    labels_path = tmp_path / "train-labels-idx1-ubyte"
    labels_path.write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(QRobustError, match="must hold 4 labels"):
        load_dataset("mnist", data_root=tmp_path)
    labels_path.write_bytes(idx_bytes(np.array([0, 1, 10, 2], dtype=np.uint8)))
    with pytest.raises(QRobustError, match=r"labels must be in 0..9, got 0..10"):
        load_dataset("mnist", data_root=tmp_path)


def test_idx_image_size_is_checked(tmp_path, write_idx_split, idx_bytes):
    write_idx_split(tmp_path, n=2, compress=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((2, 32, 32), dtype=np.uint8)))
    with pytest.raises(QRobustError, match="must hold 28x28 images, got shape \\(2, 32, 32\\)"):
        load_dataset("fashion-mnist", data_root=tmp_path)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason=f"{FASHION_MNIST_DIR} not installed")
def test_real_fashion_mnist():
    for split, n in (("train", 60000), ("test", 10000)):
        dataset = load_dataset("fashion-mnist", split)
        assert dataset.images.shape == (n, 1, 28, 28)
        assert dataset.images.dtype == torch.uint8 and dataset.labels.dtype == torch.int64
        assert torch.equal(dataset.labels.unique(), torch.arange(10))
    mean = dataset_info("fashion-mnist").mean[0]
    assert abs(load_dataset("fashion-mnist").images.double().mean().item() / 255 - mean) < 1e-3


# --- CIFAR-10 / CIFAR-100 -----------------------------------------------------------------------------

CIFAR = {
    "cifar10": dict(
        member_dir="cifar-10-batches-bin",
        tarball="cifar-10-binary.tar.gz",
        train=[f"data_batch_{i}.bin" for i in range(1, 6)],
        test="test_batch.bin",
        label_bytes=1,
        classes=10,
        pickle_dir="cifar-10-batches-py",
    ),
    "cifar100": dict(
        member_dir="cifar-100-binary",
        tarball="cifar-100-binary.tar.gz",
        train=["train.bin"],
        test="test.bin",
        label_bytes=2,
        classes=100,
        pickle_dir="cifar-100-python",
    ),
}


def _cifar_files(name, cifar_records) -> tuple[dict[str, bytes], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Random contents for every file of ``name``, and the expected (images, labels) per split."""
    spec = CIFAR[name]
    files, expected = {}, {}
    for split, names in (("train", spec["train"]), ("test", [spec["test"]])):
        parts = []
        for i, file_name in enumerate(names):
            raw, images, labels = cifar_records(2 + i, spec["label_bytes"], spec["classes"])
            files[file_name] = raw
            parts.append((images, labels))
        expected[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return files, expected


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("packed", [False, True])
def test_cifar_round_trip(name, packed, tmp_path, cifar_records, write_tar_gz):
    spec = CIFAR[name]
    files, expected = _cifar_files(name, cifar_records)
    if packed:
        write_tar_gz(tmp_path / spec["tarball"], {f"{spec['member_dir']}/{f}": d for f, d in files.items()})
    else:
        (tmp_path / spec["member_dir"]).mkdir()
        for file_name, data in files.items():
            (tmp_path / spec["member_dir"] / file_name).write_bytes(data)
    for split in ("train", "test"):
        dataset = load_dataset(name, split, data_root=tmp_path)
        assert dataset.info == dataset_info(name)
        assert_lattice(dataset, *expected[split])


def test_cifar100_uses_fine_label(tmp_path):
    (tmp_path / "cifar-100-binary").mkdir()
    record = bytes([3, 42]) + bytes(range(256)) * 12  # coarse 3, fine 42, then 3072 pixels
    (tmp_path / "cifar-100-binary" / "test.bin").write_bytes(record)
    dataset = load_dataset("cifar100", "test", data_root=tmp_path)
    assert dataset.labels.tolist() == [42]
    assert dataset.images[0, 0, 0, :4].tolist() == [0, 1, 2, 3]
    assert dataset.images[0, 2, 31, 31].item() == 255  # CHW order: the last byte is blue, bottom right


def test_cifar10_default_root_is_cwd_data(tmp_path, monkeypatch, cifar_records):
    raw, images, labels = cifar_records(3, 1, 10)
    (tmp_path / "data" / "cifar-10-batches-bin").mkdir(parents=True)
    (tmp_path / "data" / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(raw)
    monkeypatch.chdir(tmp_path)
    assert_lattice(load_dataset("cifar10", "test"), images, labels)


def test_cifar10_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset("cifar10", "test", data_root=tmp_path)
    message = assert_one_line(error)
    assert message.startswith("CIFAR-10 not found: expected test_batch.bin in ")
    assert str(tmp_path / "cifar-10-batches-bin") in message and str(tmp_path / "cifar-10-binary.tar.gz") in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in message and "--data-root" in message


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_python_version_is_refused(name, tmp_path):
    spec = CIFAR[name]
    (tmp_path / spec["pickle_dir"]).mkdir()
    (tmp_path / spec["pickle_dir"] / "data_batch_1").write_bytes(b"\x80\x04not read")
    with pytest.raises(DatasetNotFoundError, match="does not read because it would have to unpickle") as error:
        load_dataset(name, data_root=tmp_path)
    message = assert_one_line(error)
    assert f"https://www.cs.toronto.edu/~kriz/{spec['tarball']}" in message


def test_cifar_partial_dir_falls_back_to_missing(tmp_path, cifar_records):
    (tmp_path / "cifar-10-batches-bin").mkdir()
    (tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin").write_bytes(cifar_records(1, 1, 10)[0])
    with pytest.raises(DatasetNotFoundError, match=r"data_batch_1.bin, data_batch_2.bin"):
        load_dataset("cifar10", "train", data_root=tmp_path)


def test_cifar_bad_record_size(tmp_path, cifar_records):
    (tmp_path / "cifar-10-batches-bin").mkdir()
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(cifar_records(2, 1, 10)[0][:-1])
    with pytest.raises(QRobustError, match="not a valid CIFAR binary batch: 6145 bytes"):
        load_dataset("cifar10", "test", data_root=tmp_path)


def test_cifar_tarball_missing_member(tmp_path, cifar_records, write_tar_gz):
    write_tar_gz(tmp_path / "cifar-10-binary.tar.gz", {"cifar-10-batches-bin/test_batch.bin": b""})
    with pytest.raises(QRobustError, match=r"does not contain cifar-10-batches-bin/data_batch_1.bin"):
        load_dataset("cifar10", "train", data_root=tmp_path)


def test_cifar_corrupt_tarball(tmp_path):
    (tmp_path / "cifar-100-binary.tar.gz").write_bytes(gzip.compress(b"not a tar file")[:-5])
    with pytest.raises(QRobustError, match=r"is not a valid .tar.gz archive"):
        load_dataset("cifar100", data_root=tmp_path)


# --- SVHN ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_subdir", [True, False])
def test_svhn_round_trip(in_subdir, tmp_path, rng):
    x = rng.integers(0, 256, size=(32, 32, 3, 6), dtype=np.uint8)  # H, W, C, N as in the .mat files
    y = np.array([[1], [10], [5], [10], [9], [2]], dtype=np.uint8)
    directory = tmp_path / "svhn" if in_subdir else tmp_path
    directory.mkdir(exist_ok=True)
    scipy.io.savemat(directory / "test_32x32.mat", {"X": x, "y": y})
    dataset = load_dataset("svhn", "test", data_root=tmp_path)
    assert_lattice(dataset, x.transpose(3, 2, 0, 1), np.array([1, 0, 5, 0, 9, 2]))
    assert dataset.images[4, 1, 7, 20].item() == x[7, 20, 1, 4]


def test_svhn_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset("svhn", data_root=tmp_path)
    message = assert_one_line(error)
    assert "expected train_32x32.mat" in message and str(tmp_path / "svhn") in message
    assert "http://ufldl.stanford.edu/housenumbers/train_32x32.mat" in message


def test_svhn_corrupt(tmp_path):
    path = tmp_path / "train_32x32.mat"
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(QRobustError, match="is not a valid SVHN MATLAB file"):
        load_dataset("svhn", data_root=tmp_path)
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 4), dtype=np.uint8), "y": np.ones((4, 1))})
    complete = path.read_bytes()
    for cut in (100, len(complete) // 2):
        path.write_bytes(complete[:cut])
        with pytest.raises(QRobustError, match="is not a valid SVHN MATLAB file"):
            load_dataset("svhn", data_root=tmp_path)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((28, 28, 1, 2), dtype=np.uint8), "y": [[1], [2]]})
    with pytest.raises(QRobustError, match="expected uint8 X of shape \\(32, 32, 3, N\\)"):
        load_dataset("svhn", data_root=tmp_path)


# --- digits -------------------------------------------------------------------------------------------


def test_digits_split_and_statistics():
    pytest.importorskip("sklearn")
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1347, 450)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert train.images.max().item() == 255 and torch.equal(train.labels.unique(), torch.arange(10))
    assert torch.equal(load_dataset("digits", "train").images, train.images)  # deterministic split
    # No test image is a training image (the 1797 digits contain a few duplicates; allow those).
    train_rows = {bytes(row) for row in train.images.reshape(len(train), -1).numpy()}
    overlap = sum(bytes(row) in train_rows for row in test.images.reshape(len(test), -1).numpy())
    assert overlap <= 5
    floats = train.floats()
    info = dataset_info("digits")
    assert abs(floats.mean().item() - info.mean[0]) < 1e-4
    assert abs(floats.std(unbiased=False).item() - info.std[0]) < 1e-4


def test_digits_pixels_match_sklearn():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    digits = sklearn_datasets.load_digits()
    everything = np.round(digits.data * 255 / 16).reshape(-1, 1, 8, 8)
    test = load_dataset("digits", "test", data_root="/nonexistent")  # data_root is ignored
    order = np.random.RandomState(0).permutation(len(everything))[1347:]
    assert_lattice(test, everything[order], digits.target[order])


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(QRobustError, match="pip install scikit-learn"):
        load_dataset("digits")
