"""Your own data from local files: a folder of class sub-folders of PNG/JPEG images, or ``.npz`` arrays.

Both give the same uint8 lattice view as the named datasets::

    train_set = load_image_folder("pets/train", resize=36, crop=32)        # pets/train/<class>/*.png|jpg
    test_set = load_image_folder("pets/test", resize=36, crop=32, info=train_set.info)
    train_set = load_npz("train.npz")  # images uint8 (N, H, W) or (N, H, W, C), labels (N,), classes optional
    test_set = load_npz("test.npz", info=train_set.info)

The mean and std that models normalise with are computed from the images loaded; compute them on
the training split and pass its ``info`` when loading the test split, which then also shares its class
names and image shape. ``load_dataset("folder:DIR")`` / ``load_dataset("npz:DIR")`` read the splits
DIR/train/ and DIR/test/ (or DIR/train.npz and DIR/test.npz) that way, without resizing. Images are
decoded with Pillow; ``.npz`` files are read with ``allow_pickle=False``, so nothing is ever unpickled.
Missing or malformed files raise :class:`QRobustError` with a one-line message naming the file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from qrobust.data.base import DatasetInfo, LatticeDataset, dataset_from_lattice
from qrobust.errors import DatasetNotFoundError, QRobustError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # compared case-insensitively; other files are ignored
_GRAY_MODES = ("1", "L", "LA")
_COLOR_MODES = ("P", "PA", "RGB", "RGBA", "CMYK", "YCbCr")
SPEC_KINDS = ("folder", "npz")

Size = int | tuple[int, int]


def load_image_folder(
    root: str | Path,
    *,
    resize: Size | None = None,
    crop: Size | None = None,
    channels: int | None = None,
    info: DatasetInfo | None = None,
    name: str | None = None,
) -> LatticeDataset:
    """Images in ``root/<class>/*.png|jpg|jpeg``, labelled by the index of their class sub-folder.

    Classes are the sub-folder names in sorted order (hidden ones skipped), images sorted by file name.
    Each image is decoded, converted to ``channels`` (1: luma, 3: RGB; default 1 if every image is
    grayscale, else 3; alpha is dropped), resized to ``resize`` (an int: the shorter side, keeping the
    aspect ratio, as torchvision's ``Resize``; (H, W): exactly), with bilinear antialiasing, then
    center-cropped to ``crop`` (int: square, or (H, W)). All images must end up the same size.

    With ``info`` (the training split's) its classes give the labels (every sub-folder must be one of
    them), its shape is required and its statistics are reused; otherwise they come from these images
    and the info is named ``name`` (default ``str(root)``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} not found: expected a directory of class sub-folders")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise QRobustError(f"{root} has no class sub-folders: put the images of class C in {root}/C/")
    classes = info.classes if info is not None else tuple(p.name for p in folders)
    unknown = [p.name for p in folders if p.name not in classes]
    if info is not None and unknown:
        raise QRobustError(f"{root}: sub-folders {unknown} are not classes of {info.name}")
    if channels not in (None, 1, 3):
        raise QRobustError(f"channels must be 1, 3 or None (from the images), got {channels!r}")

    arrays: list[np.ndarray] = []  # (H, W) grayscale or (H, W, 3) RGB, uint8
    labels: list[int] = []
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise QRobustError(f"class folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        for path in files:
            arrays.append(_read_image(path, channels, resize, crop))
            labels.append(classes.index(folder.name))
    if channels is None and any(a.ndim == 3 for a in arrays):  # some colour image: all to RGB (gray replicated)
        arrays = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise QRobustError(
            f"{root} holds images of different sizes {sorted(sizes)[:3]} (H, W): pass resize= and/or crop= "
            "to bring them to one size"
        )
    stacked = np.stack(arrays)  # (N, H, W) or (N, H, W, 3)
    images = torch.from_numpy(stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2))
    return dataset_from_lattice(
        images.contiguous(), torch.tensor(labels), source=name or str(root), classes=classes, info=info
    )


def _read_image(path: Path, channels: int | None, resize: Size | None, crop: Size | None) -> np.ndarray:
    """One image as uint8 (H, W) or (H, W, 3): decoded, converted to ``channels``, resized, center-cropped."""
    from PIL import Image  # Pillow is needed only here

    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in _GRAY_MODES + _COLOR_MODES:
                gray = channels == 1 or (channels is None and mode in _GRAY_MODES)
                picture: Image.Image = image.convert("L" if gray else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise QRobustError(f"{path} is not a readable PNG/JPEG image: {_first_line(error)}") from None
    if mode not in _GRAY_MODES + _COLOR_MODES:
        raise QRobustError(f"{path}: unsupported image mode {mode} (8-bit grayscale or colour expected)")
    if resize is not None:
        picture = picture.resize(_resized(picture.size, resize), Image.Resampling.BILINEAR)
    if crop is not None:
        height, width = _pair(crop, "crop")
        if height > picture.height or width > picture.width:
            raise QRobustError(
                f"{path}: cannot crop {height}x{width} from a {picture.height}x{picture.width} image; "
                "resize it first (resize=)"
            )
        top, left = (picture.height - height) // 2, (picture.width - width) // 2
        picture = picture.crop((left, top, left + width, top + height))
    return np.asarray(picture, dtype=np.uint8)


def _pair(size: Size, option: str) -> tuple[int, int]:
    """(H, W) of an int or pair ``size`` option, each >= 1."""
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in pair):
        raise QRobustError(f"{option} must be an int or an (H, W) pair of ints >= 1, got {size!r}")
    return pair[0], pair[1]


def _resized(size: tuple[int, int], resize: Size) -> tuple[int, int]:
    """PIL's (width, height) after ``resize``: an int scales the shorter side to it, (H, W) is exact."""
    width, height = size
    if not isinstance(resize, int):
        target_height, target_width = _pair(resize, "resize")
        return target_width, target_height
    short = _pair(resize, "resize")[0]
    if width <= height:
        return short, max(1, round(height * short / width))
    return max(1, round(width * short / height)), short


def load_npz(path: str | Path, *, info: DatasetInfo | None = None, name: str | None = None) -> LatticeDataset:
    """The ``images`` and ``labels`` arrays of an ``.npz`` file (``np.savez``), read without unpickling.

    ``images`` must be uint8 (N, H, W) or channels-last (N, H, W, C) with C 1 or 3; ``labels`` integer
    (N,). An optional ``classes`` array of strings names the labels (default "0".."K-1", K = max label
    + 1). With ``info`` (the training split's) its classes, shape and statistics are checked and reused;
    otherwise the info is named ``name`` (default ``str(path)``).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{path} not found: expected an .npz file with arrays images and labels")
    if not zipfile.is_zipfile(path):
        raise QRobustError(f"{path} is not an .npz archive (as np.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in ("images", "labels", "classes") if key in archive.files}
            files = archive.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # object arrays would need pickle
        raise QRobustError(f"{path} is not a valid .npz file: {_first_line(error)}") from None
    missing = [key for key in ("images", "labels") if key not in arrays]
    if missing:
        raise QRobustError(f"{path} lacks the array(s) {', '.join(missing)}; it holds {files}")
    images, labels, classes = arrays["images"], arrays["labels"], arrays.get("classes")
    if images.dtype != np.uint8:
        raise QRobustError(
            f"{path}: images must be uint8 lattice values, got {images.dtype}; "
            "convert [0, 1] floats with np.round(x * 255).astype(np.uint8)"
        )
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise QRobustError(
            f"{path}: images must have shape (N, H, W) or (N, H, W, C) with C 1 or 3, got {images.shape}; "
            "transpose (N, C, H, W) arrays with images.transpose(0, 2, 3, 1)"
        )
    if labels.dtype.kind not in "iu":
        raise QRobustError(f"{path}: labels must be integer class indices, got dtype {labels.dtype}")
    if classes is not None and (classes.dtype.kind != "U" or classes.ndim != 1):
        raise QRobustError(f"{path}: classes must be a 1-D array of strings, got {classes.dtype} {classes.shape}")
    chw = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)  # (N, C, H, W)
    return dataset_from_lattice(
        torch.from_numpy(np.ascontiguousarray(chw)),
        torch.from_numpy(labels.astype(np.int64)),
        source=name or str(path),
        classes=None if classes is None else classes.tolist(),
        info=info,
    )


def _first_line(error: Exception) -> str:
    """The first line of ``error``'s message, or its type when it has none."""
    return next(iter(str(error).splitlines()), "") or type(error).__name__


def is_spec(name: str) -> bool:
    """Whether dataset ``name`` is a file spec "folder:DIR" or "npz:DIR" rather than a named dataset."""
    return name.partition(":")[0] in SPEC_KINDS and ":" in name


def load_spec(spec: str, split: str, info: DatasetInfo | None = None) -> LatticeDataset:
    """Split ``split`` of the dataset spec "folder:DIR" (DIR/<split>/<class>/...) or "npz:DIR" (DIR/<split>.npz).

    The info, named ``spec``, comes from the images unless ``info`` is given (the train split's).
    """
    kind, _, directory = spec.partition(":")
    if kind == "folder":
        return load_image_folder(Path(directory) / split, info=info, name=spec)
    return load_npz(Path(directory) / f"{split}.npz", info=info, name=spec)
