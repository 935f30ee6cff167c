"""Loaders for the datasets qrobust knows, from local files only (no downloads, never unpickling).

Every loader returns images on the uint8 lattice, shape (N, C, H, W), and int64 labels, wrapped in a
:class:`LatticeDataset`. Besides the names in ``DATASET_NAMES``, ``load_dataset`` and ``dataset_info`` take
your own data as "folder:DIR" or "npz:DIR" (``qrobust.data.files``). A missing dataset raises :class:`DatasetNotFoundError` whose one-line message
names the files expected, where they were looked for and where to get them.
"""

from __future__ import annotations

import gzip
import tarfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from qrobust.data.base import DatasetInfo, LatticeDataset
from qrobust.data.files import SPEC_KINDS, is_spec, load_spec
from qrobust.errors import DatasetNotFoundError, QRobustError

SPLITS = ("train", "test")

_DIGIT_NAMES = tuple(str(d) for d in range(10))

_FASHION_MNIST_NAMES = (
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
)

_CIFAR10_NAMES = (
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
)

# The fine label names of CIFAR-100 as listed in its ``meta`` file (alphabetical; index = label).
_CIFAR100_NAMES = (
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
)

_INFOS = {
    info.name: info
    for info in (
        DatasetInfo("fashion-mnist", (1, 28, 28), _FASHION_MNIST_NAMES, (0.2860,), (0.3530,)),
        DatasetInfo("mnist", (1, 28, 28), _DIGIT_NAMES, (0.1307,), (0.3081,)),
        DatasetInfo("cifar10", (3, 32, 32), _CIFAR10_NAMES, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        DatasetInfo("cifar100", (3, 32, 32), _CIFAR100_NAMES, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        DatasetInfo("svhn", (3, 32, 32), _DIGIT_NAMES, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
        # Computed once as load_dataset("digits", "train").floats().mean() / .std() (population std)
        # over the 1347 training images of the fixed split below.
        DatasetInfo("digits", (1, 8, 8), _DIGIT_NAMES, (0.3054,), (0.3757,)),
    )
}

DATASET_NAMES: tuple[str, ...] = tuple(_INFOS)

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DATA_ROOT = Path("data")


def dataset_info(name: str) -> DatasetInfo:
    """Shape, class names and training-set channel statistics of dataset ``name``.

    A named dataset's are built in (no files read); those of a spec "folder:DIR" or "npz:DIR" come
    from its train split, which is read for them.
    """
    if is_spec(name):
        return load_spec(name, "train").info
    if name not in _INFOS:
        specs = " or ".join(f"{kind}:DIR" for kind in SPEC_KINDS)
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}, or {specs}")
    return _INFOS[name]


def load_dataset(name: str, split: str = "train", data_root: str | Path | None = None) -> LatticeDataset:
    """Load the ``split`` ("train" or "test") of dataset ``name`` from local files under ``data_root``.

    ``data_root`` defaults to ``./data``, except for Fashion-MNIST, which then comes from
    /usr/share/datasets/fashion-mnist (Debian package ``dataset-fashion-mnist``); digits ships with
    scikit-learn and ignores it. Images are uint8 (N, C, H, W), labels int64 (N,).

    Your own data: ``name`` "folder:DIR" reads DIR/<split>/<class>/*.png|jpg (images of one size),
    "npz:DIR" reads DIR/<split>.npz; DIR is relative to the working directory, not ``data_root``. The
    test split is normalised with the train split's statistics and must share its classes and shape.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if is_spec(name):
        return load_spec(name, split, None if split == "train" else dataset_info(name))
    info = dataset_info(name)
    root = None if data_root is None else Path(data_root)
    images, labels = _LOADERS[name](split, root)
    if labels.size and not 0 <= labels.min() <= labels.max() < info.num_classes:
        raise QRobustError(
            f"{name} {split} labels must be in 0..{info.num_classes - 1}, got {labels.min()}..{labels.max()}"
        )
    # torch.tensor copies (writable, independent of read-only file buffers) but keeps the strides.
    return LatticeDataset(
        torch.tensor(np.ascontiguousarray(images), dtype=torch.uint8),
        torch.tensor(labels, dtype=torch.int64),
        info,
    )


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------------

_IDX_UNSIGNED_BYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed if its name ends in .gz) into an array.

    The format: two zero bytes, a type byte (0x08 for unsigned bytes), the number of dimensions,
    then each dimension as a big-endian uint32, then the data.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as file:
                raw = file.read()
        else:
            raw = path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise QRobustError(f"{path} is not a valid IDX file: {error}") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise QRobustError(f"{path} is not a valid IDX file: bad magic number {raw[:4].hex()}")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != _IDX_UNSIGNED_BYTE:
        raise QRobustError(
            f"{path} is not a valid IDX file: data type 0x{dtype_code:02x}, expected unsigned bytes (0x08)"
        )
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise QRobustError(f"{path} is not a valid IDX file: header truncated or 0 dimensions")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise QRobustError(f"{path} is not a valid IDX file: dimensions {dims} need {expected} bytes, found {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_file_names(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_idx_pair(split: str, dirs: Sequence[Path]) -> tuple[Path, Path] | None:
    """The first (images, labels) pair, each raw or .gz, found together in one of ``dirs``."""
    for directory in dirs:
        found = [
            next((p for p in (directory / f"{stem}.gz", directory / stem) if p.is_file()), None)
            for stem in _idx_file_names(split)
        ]
        images, labels = found
        if images is not None and labels is not None:
            return images, labels
    return None


def _load_idx_dataset(title: str, split: str, dirs: Sequence[Path], how_to_get: str) -> tuple[np.ndarray, np.ndarray]:
    pair = _find_idx_pair(split, dirs)
    if pair is None:
        images_name, labels_name = _idx_file_names(split)
        raise DatasetNotFoundError(
            f"{title} not found: expected {images_name}.gz and {labels_name}.gz (or uncompressed) "
            f"in {' or '.join(str(d) for d in dirs)}; {how_to_get}"
        )
    images, labels = read_idx(pair[0]), read_idx(pair[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise QRobustError(f"{pair[0]} must hold 28x28 images, got shape {images.shape}")
    if labels.shape != images.shape[:1]:
        raise QRobustError(f"{pair[1]} must hold {images.shape[0]} labels to match {pair[0]}, got shape {labels.shape}")
    return images[:, None], labels  # (N, 28, 28) -> (N, 1, 28, 28)


def _load_fashion_mnist(split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    if root is None:
        dirs = [FASHION_MNIST_SYSTEM_DIR]
        how = "install them with `apt-get install dataset-fashion-mnist` or pass --data-root DIR containing them"
    else:
        dirs = [root / "fashion-mnist", root]
        how = "put them in DIR/fashion-mnist and pass --data-root DIR"
    return _load_idx_dataset("Fashion-MNIST", split, dirs, how)


def _load_mnist(split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    root = DEFAULT_DATA_ROOT.absolute() if root is None else root
    how = "put the MNIST IDX files in DIR/mnist and pass --data-root DIR"
    return _load_idx_dataset("MNIST", split, [root / "mnist", root], how)


# --- CIFAR-10 / CIFAR-100 binary versions ----------------------------------------------------------

_CIFAR_IMAGE_BYTES = 3 * 32 * 32


def _parse_cifar_records(raw: bytes, label_bytes: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Split CIFAR binary records (label bytes, then 3072 image bytes in CHW order) into arrays."""
    record = label_bytes + _CIFAR_IMAGE_BYTES
    if len(raw) == 0 or len(raw) % record:
        raise QRobustError(
            f"{source} is not a valid CIFAR binary batch: {len(raw)} bytes is not a positive "
            f"multiple of the {record}-byte record size"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    # The last label byte is the one we want: CIFAR-10's only label, CIFAR-100's fine label.
    labels = records[:, label_bytes - 1]
    images = records[:, label_bytes:].reshape(-1, 3, 32, 32)
    return images, labels


def _read_cifar_tarball(tarball: Path, member_dir: str, files: Sequence[str]) -> dict[str, bytes]:
    """Read ``member_dir/<file>`` for each of ``files`` from a .tar.gz in one pass, without extracting."""
    contents: dict[str, bytes] = {}
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive:
                path = PurePosixPath(member.name)
                if member.isfile() and path.name in files and path.parent.name == member_dir:
                    extracted = archive.extractfile(member)
                    if extracted is not None:
                        contents[path.name] = extracted.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise QRobustError(f"{tarball} is not a valid .tar.gz archive: {error}") from error
    missing = [f for f in files if f not in contents]
    if missing:
        raise QRobustError(f"{tarball} does not contain {', '.join(f'{member_dir}/{f}' for f in missing)}")
    return contents


def _load_cifar(
    title: str,
    split: str,
    root: Path | None,
    *,
    member_dir: str,
    tarball_name: str,
    pickle_dir: str,
    train_files: Sequence[str],
    test_file: str,
    label_bytes: int,
) -> tuple[np.ndarray, np.ndarray]:
    root = DEFAULT_DATA_ROOT.absolute() if root is None else root
    files = list(train_files) if split == "train" else [test_file]
    directory, tarball = root / member_dir, root / tarball_name
    url = f"https://www.cs.toronto.edu/~kriz/{tarball_name}"
    if all((directory / f).is_file() for f in files):
        batches = [_parse_cifar_records((directory / f).read_bytes(), label_bytes, str(directory / f)) for f in files]
    elif tarball.is_file():
        contents = _read_cifar_tarball(tarball, member_dir, files)
        batches = [_parse_cifar_records(contents[f], label_bytes, f"{tarball}:{f}") for f in files]
    elif (root / pickle_dir).is_dir():
        raise DatasetNotFoundError(
            f"{title} binary version not found: {root / pickle_dir} is the python version, which qrobust "
            f"does not read because it would have to unpickle it; download the binary version {url} "
            f"and put it (or its extracted {member_dir}/) in {root}"
        )
    else:
        raise DatasetNotFoundError(
            f"{title} not found: expected {', '.join(files)} in {directory} or the tarball {tarball}; "
            f"download the binary version {url} into DIR and pass --data-root DIR"
        )
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return images, labels


def _load_cifar10(split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    return _load_cifar(
        "CIFAR-10",
        split,
        root,
        member_dir="cifar-10-batches-bin",
        tarball_name="cifar-10-binary.tar.gz",
        pickle_dir="cifar-10-batches-py",
        train_files=[f"data_batch_{i}.bin" for i in range(1, 6)],
        test_file="test_batch.bin",
        label_bytes=1,
    )


def _load_cifar100(split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    return _load_cifar(
        "CIFAR-100",
        split,
        root,
        member_dir="cifar-100-binary",
        tarball_name="cifar-100-binary.tar.gz",
        pickle_dir="cifar-100-python",
        train_files=["train.bin"],
        test_file="test.bin",
        label_bytes=2,  # coarse label, then fine label
    )


# --- SVHN (cropped digits, MATLAB files) -----------------------------------------------------------


def _load_svhn(split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat  # scipy is heavy; only SVHN needs it

    root = DEFAULT_DATA_ROOT.absolute() if root is None else root
    file_name = f"{split}_32x32.mat"
    candidates = [root / "svhn" / file_name, root / file_name]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DatasetNotFoundError(
            f"SVHN not found: expected {file_name} in {candidates[0].parent} or {root}; download "
            f"http://ufldl.stanford.edu/housenumbers/{file_name} into DIR/svhn and pass --data-root DIR"
        )
    try:
        mat = loadmat(path, variable_names=("X", "y"))
    except (ValueError, TypeError, IndexError, OSError, zlib.error, NotImplementedError) as error:
        # scipy's MatReadError is a ValueError, truncation gives OSError or IndexError,
        # and scipy refuses MATLAB v7.3 (HDF5) files with its "not implemented" error.
        raise QRobustError(f"{path} is not a valid SVHN MATLAB file: {error}") from error
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise QRobustError(f"{path} is not a valid SVHN file: expected uint8 X of shape (32, 32, 3, N) and y")
    labels = np.asarray(y).reshape(-1)
    if labels.shape != (x.shape[3],) or not np.all(labels == np.round(labels)):
        raise QRobustError(f"{path} is not a valid SVHN file: y must hold {x.shape[3]} integer labels")
    labels = labels.astype(np.int64)
    labels[labels == 10] = 0  # SVHN labels the digit 0 as 10
    return x.transpose(3, 2, 0, 1), labels  # (H, W, C, N) -> (N, C, H, W)


# --- scikit-learn digits ---------------------------------------------------------------------------

DIGITS_SPLIT_SEED = 0


def _load_digits(split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 digits bundled with scikit-learn, values 0..16 mapped to 0..255.

    The split is a fixed permutation from NumPy's legacy ``RandomState(0)``, whose stream is frozen
    across NumPy versions; its last 25% is the test set.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise QRobustError("the digits dataset needs scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    images = np.round(digits.data * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(images))
    cut = (3 * len(images)) // 4
    picked = order[:cut] if split == "train" else order[cut:]
    return images[picked], digits.target[picked]


_LOADERS: dict[str, Callable[[str, Path | None], tuple[np.ndarray, np.ndarray]]] = {
    "fashion-mnist": _load_fashion_mnist,
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "svhn": _load_svhn,
    "digits": _load_digits,
}
