"""`qrobust export`: fp32 checkpoints and int8 files to ONNX, run by onnxruntime; its error paths."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from qrobust.data import dataset_info
from qrobust.models import build_model
from qrobust.models.checkpoint import Checkpoint, model_metadata, save_checkpoint
from qrobust.quant import QuantConfig, calibrate, convert, prepare_qat, save_int8
from qrobust.quant.export import OnnxRuntimeModel


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random CNN for digits (1x8x8) as an fp32 checkpoint, a QAT checkpoint and an int8 file, and its test images."""
    directory = tmp_path_factory.mktemp("models")
    info = dataset_info("digits")
    torch.manual_seed(0)
    model = build_model("cnn", info).eval()
    images = torch.randint(0, 256, (300, *info.shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    qat = calibrate(prepare_qat(model), images[:200])
    paths = {"fp32": directory / "cnn.pt", "qat": directory / "cnn-qat.pt", "int8": directory / "cnn.int8.pt"}
    save_checkpoint(paths["fp32"], Checkpoint(model.state_dict(), model_metadata("cnn", {}, info)))
    qat_metadata = model_metadata("cnn", {}, info, qat=asdict(QuantConfig()))
    save_checkpoint(paths["qat"], Checkpoint(qat.state_dict(), qat_metadata))
    int8 = convert(qat)
    save_int8(paths["int8"], int8, model_metadata("cnn", {}, info))
    return paths, model, int8, images[200:]


def test_export_fp32_checkpoint(run, files, tmp_path) -> None:
    pytest.importorskip("onnxscript")
    paths, model, _, images = files
    output = tmp_path / "cnn.onnx"
    code, out, err = run("export", paths["fp32"], "--output", output)
    assert code == 0, err
    assert "fp32 ONNX model" in out and f"{output.stat().st_size:,} bytes" in out
    floats = images.float() / 255
    with torch.no_grad():
        expected = model(floats)
    atol = 1e-4 * float(expected.abs().max())
    torch.testing.assert_close(OnnxRuntimeModel(output, threads=1)(floats), expected, rtol=1e-4, atol=atol)


def test_export_int8_file(run, files, tmp_path) -> None:
    paths, _, int8, images = files
    output = tmp_path / "cnn-int8.onnx"
    code, out, err = run("export", paths["int8"], "--output", output)
    assert code == 0, err
    assert "int8 (QOperator, uint8 activations) ONNX model" in out and f"{output.stat().st_size:,} bytes" in out
    runtime = OnnxRuntimeModel(output, threads=1)
    assert float((runtime.predict(images) == int8.predict(images)).float().mean()) >= 0.99  # 100 images: <= 1 differs
    code, _, err = run("export", paths["int8"], "--output", output)
    assert code == 2 and "exists" in err  # no silent overwrite
    assert run("export", paths["int8"], "--output", output, "--overwrite")[0] == 0


@pytest.mark.parametrize(
    "kind, message",
    [("text", "neither an int8 model nor a checkpoint"), ("missing", "not found"), ("qat", "run `qrobust quantize`")],
)
def test_export_errors_are_one_line(run, files, tmp_path, kind: str, message: str) -> None:
    paths, *_ = files
    source = {"text": tmp_path / "notes.txt", "missing": tmp_path / "missing.pt", "qat": paths["qat"]}[kind]
    if kind == "text":
        source.write_text("not a model\n")
    output = tmp_path / "out.onnx"
    code, out, err = run("export", source, "--output", output)
    assert code == 2 and out == ""
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert not output.exists()
