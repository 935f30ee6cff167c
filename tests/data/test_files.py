"""Your own data: image folders and .npz files on the uint8 lattice, the specs, and the errors users see."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qrobust.data import dataset_info, load_dataset, load_image_folder, load_npz
from qrobust.errors import DatasetNotFoundError, QRobustError


def assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def _save(path: Path, pixels: np.ndarray) -> Path:
    """Write uint8 pixels (H, W) or (H, W, 3) as a PNG or JPEG (by suffix), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def pixels(rng) -> list[np.ndarray]:
    """Four random RGB images (6, 5, 3)."""
    return [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(4)]


@pytest.fixture
def folder(tmp_path, pixels) -> Path:
    """root/cat/{a,b}.png and root/dog/c.png, root/dog/d.PNG: PNG is lossless, so pixels are exact."""
    root = tmp_path / "train"
    for name, image in zip(["cat/a.png", "cat/b.png", "dog/c.png", "dog/d.PNG"], pixels):
        _save(root / name, image)
    (root / "dog" / "notes.txt").write_text("ignored")
    (root / ".hidden").mkdir()
    return root


# --- image folders -----------------------------------------------------------------------------------


def test_folder_images_are_exact_and_labelled_by_sorted_sub_folder(folder, pixels):
    data = load_image_folder(folder)
    assert data.images.dtype == torch.uint8 and data.images.shape == (4, 3, 6, 5)
    np.testing.assert_array_equal(data.images.numpy(), np.stack(pixels).transpose(0, 3, 1, 2))
    assert data.labels.tolist() == [0, 0, 1, 1]
    info = data.info
    assert (info.name, info.shape, info.classes) == (str(folder), (3, 6, 5), ("cat", "dog"))
    floats = np.stack(pixels).astype(np.float64) / 255
    assert info.mean == pytest.approx(floats.mean((0, 1, 2)).tolist())
    assert info.std == pytest.approx(floats.std((0, 1, 2)).tolist())


def test_grayscale_folders_have_one_channel_and_mixed_ones_three(tmp_path, rng):
    gray = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    _save(tmp_path / "g" / "a" / "x.png", gray)
    _save(tmp_path / "g" / "b" / "y.png", 255 - gray)
    data = load_image_folder(tmp_path / "g")
    assert data.images.shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(data.images[0, 0].numpy(), gray)
    color = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    _save(tmp_path / "g" / "c" / "z.png", color)
    mixed = load_image_folder(tmp_path / "g")
    assert mixed.images.shape == (3, 3, 4, 4)
    np.testing.assert_array_equal(mixed.images[0].numpy(), np.stack([gray] * 3))  # gray replicated
    as_gray = load_image_folder(tmp_path / "g", channels=1)
    assert as_gray.images.shape == (3, 1, 4, 4)
    np.testing.assert_array_equal(as_gray.images[2, 0].numpy(), np.asarray(Image.fromarray(color).convert("L")))


def test_jpeg_images_decode_close_to_their_source(tmp_path):
    smooth = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))
    _save(tmp_path / "j" / "a" / "x.jpg", np.stack([smooth] * 3, axis=2))
    _save(tmp_path / "j" / "b" / "y.jpeg", np.stack([smooth.T] * 3, axis=2))
    data = load_image_folder(tmp_path / "j")
    assert data.images.shape == (2, 3, 16, 16)  # JPEG is lossy: close, not equal
    assert np.abs(data.images[0, 0].numpy().astype(int) - smooth).max() <= 8


def test_resize_and_crop_bring_mixed_sizes_to_one(tmp_path, rng):
    _save(tmp_path / "m" / "a" / "wide.png", rng.integers(0, 256, (8, 16, 3), dtype=np.uint8))
    _save(tmp_path / "m" / "b" / "tall.png", rng.integers(0, 256, (12, 6, 3), dtype=np.uint8))
    with pytest.raises(QRobustError, match=r"holds images of different sizes .* pass resize= and/or crop=") as error:
        load_image_folder(tmp_path / "m")
    assert_one_line(error)
    exact = load_image_folder(tmp_path / "m", resize=(5, 7))
    assert exact.images.shape == (2, 3, 5, 7)
    with pytest.raises(QRobustError, match="different sizes"):
        load_image_folder(tmp_path / "m", resize=4)  # shorter side 4: 4x8 and 8x4
    cropped = load_image_folder(tmp_path / "m", resize=4, crop=4)
    assert cropped.images.shape == (2, 3, 4, 4)
    shrunk = np.asarray(Image.open(tmp_path / "m" / "a" / "wide.png").resize((8, 4), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(cropped.images[0].numpy(), shrunk[:, 2:6].transpose(2, 0, 1))  # center crop
    with pytest.raises(QRobustError, match=r"tall.png: cannot crop 7x7 from a 12x6 image; resize it first"):
        load_image_folder(tmp_path / "m", crop=7)


def test_the_test_split_reuses_the_training_info(folder, pixels, tmp_path):
    train = load_image_folder(folder)
    _save(tmp_path / "test" / "dog" / "e.png", pixels[0])
    test = load_image_folder(tmp_path / "test", info=train.info)
    assert test.info is train.info and test.labels.tolist() == [1]  # "dog" is class 1 of the training set
    _save(tmp_path / "test" / "bird" / "f.png", pixels[0])
    with pytest.raises(QRobustError, match=r"test: sub-folders \['bird'\] are not classes of .*train$"):
        load_image_folder(tmp_path / "test", info=train.info)


@pytest.mark.parametrize(
    ("setup", "options", "error", "message"),
    [
        (
            lambda root: None,
            {},
            DatasetNotFoundError,
            r"^image folder .*data not found: expected a directory of class sub-folders$",
        ),
        (
            lambda root: root.mkdir(),
            {},
            QRobustError,
            r"data has no class sub-folders: put the images of class C in .*data/C/$",
        ),
        (
            lambda root: (root / "a").mkdir(parents=True),
            {},
            QRobustError,
            r"^class folder .*a holds no .png/.jpg/.jpeg images$",
        ),
        (
            lambda root: _save(root / "a" / "x.png", np.zeros((2, 2), np.uint8)).write_bytes(b"not a png"),
            {},
            QRobustError,
            r"x.png is not a readable PNG/JPEG image: cannot identify image file",
        ),
        (
            lambda root: _save(root / "a" / "x.png", np.zeros((64, 64, 3), np.uint8)).write_bytes(
                (root / "a" / "x.png").read_bytes()[:60]
            ),
            {},
            QRobustError,
            r"x.png is not a readable PNG/JPEG image: ",
        ),
        (
            lambda root: _save(root / "a" / "x.png", np.zeros((2, 2), np.uint16)),
            {},
            QRobustError,
            r"x.png: unsupported image mode I(;16)? \(8-bit grayscale or colour expected\)$",
        ),  # a 16-bit PNG
        (
            lambda root: _save(root / "a" / "x.png", np.zeros((2, 2), np.uint8)),
            {"channels": 2},
            QRobustError,
            r"^channels must be 1, 3 or None \(from the images\), got 2$",
        ),
        (
            lambda root: _save(root / "a" / "x.png", np.zeros((2, 2), np.uint8)),
            {"resize": (2, 0)},
            QRobustError,
            r"^resize must be an int or an \(H, W\) pair of ints >= 1, got \(2, 0\)$",
        ),
    ],
)
def test_folder_errors_are_one_line(tmp_path, setup, options, error, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(error, match=message) as raised:
        load_image_folder(root, **options)
    assert_one_line(raised)


# --- .npz arrays -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NHW", "NHW1", "NHW3"])
def test_npz_arrays_are_read_channels_last(tmp_path, rng, layout):
    shape = {"NHW": (5, 4, 3), "NHW1": (5, 4, 3, 1), "NHW3": (5, 4, 3, 3)}[layout]
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = np.array([0, 2, 1, 2, 0], dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    data = load_npz(tmp_path / "d.npz")
    chw = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(data.images.numpy(), chw)
    assert data.labels.tolist() == labels.tolist() and data.labels.dtype == torch.int64
    assert (data.info.name, data.info.shape, data.info.classes) == (
        str(tmp_path / "d.npz"),
        chw.shape[1:],
        ("0", "1", "2"),
    )
    assert data.info.mean == pytest.approx((chw / 255).mean((0, 2, 3)).tolist())


def test_npz_class_names_and_training_info(tmp_path, rng):
    images = rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)
    np.savez(
        tmp_path / "train.npz", images=images, labels=np.array([0, 1, 0, 1]), classes=np.array(["cat", "dog", "eel"])
    )
    train = load_npz(tmp_path / "train.npz", name="pets")
    assert (train.info.name, train.info.classes) == ("pets", ("cat", "dog", "eel"))
    np.savez(tmp_path / "test.npz", images=images[:2], labels=np.array([2, 2]))
    assert load_npz(tmp_path / "test.npz", info=train.info).info is train.info


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


IMAGES = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
LABELS = np.array([0, 1])


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: None, r"d.npz not found: expected an .npz file with arrays images and labels$"),
        (lambda p: p.write_bytes(b"junk"), r"d.npz is not an .npz archive \(as np.savez writes\)$"),
        (
            lambda p: np.save(p.with_suffix(".npy"), IMAGES) or p.with_suffix(".npy").rename(p),
            r"d.npz is not an .npz archive",
        ),
        (lambda p: _npz(p, images=IMAGES), r"d.npz lacks the array\(s\) labels; it holds \['images'\]$"),
        (
            lambda p: _npz(p, images=np.array([object()] * 2), labels=LABELS),
            r"d.npz is not a valid .npz file: Object arrays cannot be loaded when allow_pickle=False$",
        ),
        (
            lambda p: _npz(p, images=IMAGES / 255, labels=LABELS),
            r"images must be uint8 lattice values, got float64; convert \[0, 1\] floats with np.round\(x \* 255\)",
        ),
        (lambda p: _npz(p, images=IMAGES.reshape(2, 1, 3, 3, 1), labels=LABELS), r"images must have shape \(N, H, W\)"),
        (
            lambda p: _npz(p, images=np.zeros((2, 3, 8, 8), np.uint8), labels=LABELS),
            r"got \(2, 3, 8, 8\); transpose \(N, C, H, W\) arrays with images.transpose\(0, 2, 3, 1\)$",
        ),
        (
            lambda p: _npz(p, images=IMAGES, labels=LABELS.astype(float)),
            r"labels must be integer class indices, got dtype float64$",
        ),
        (
            lambda p: _npz(p, images=IMAGES, labels=np.array([0, 1, 1])),
            r"labels must have shape \(2,\) to match the images",
        ),
        (lambda p: _npz(p, images=IMAGES, labels=np.array([0, -1])), r"labels must be in 0..0, got -1..0$"),
        (
            lambda p: _npz(p, images=IMAGES, labels=LABELS, classes=np.array(["a"])),
            r"labels must be in 0..0, got 0..1$",
        ),
        (
            lambda p: _npz(p, images=IMAGES, labels=LABELS, classes=np.array([1, 2])),
            r"classes must be a 1-D array of strings",
        ),
    ],
)
def test_npz_errors_are_one_line(tmp_path, write, message):
    path = tmp_path / "d.npz"
    write(path)
    with pytest.raises(QRobustError, match=message) as error:
        load_npz(path)
    assert_one_line(error)


# --- specs: load_dataset("folder:DIR") and load_dataset("npz:DIR") ------------------------------------


def test_folder_spec_reads_both_splits_with_the_training_info(folder, pixels, tmp_path):
    _save(tmp_path / "test" / "cat" / "e.png", pixels[3])
    spec = f"folder:{tmp_path}"
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    assert train.info == test.info == dataset_info(spec)
    assert (train.info.name, len(train), len(test), test.labels.tolist()) == (spec, 4, 1, [0])
    assert torch.equal(train.images, load_image_folder(folder).images)


def test_npz_spec_reads_both_splits_with_the_training_info(tmp_path, rng):
    images = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", images=images[:4], labels=np.array([0, 1, 2, 0]))
    np.savez(tmp_path / "test.npz", images=images[4:], labels=np.array([1, 1]))
    spec = f"npz:{tmp_path}"
    train, test = load_dataset(spec), load_dataset(spec, "test")
    assert train.info == test.info == dataset_info(spec)
    assert train.info.name == spec and train.info.classes == ("0", "1", "2")  # the test split alone has only "1"
    (tmp_path / "test.npz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"test.npz not found"):
        load_dataset(spec, "test")


def test_unknown_names_mention_the_specs():
    with pytest.raises(
        ValueError, match=r"unknown dataset 'imagenet'; valid names: .*digits, or folder:DIR or npz:DIR$"
    ):
        dataset_info("imagenet")
