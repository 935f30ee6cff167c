"""qrobust.quant.export: ONNX graphs of fp32 and int8 models run by onnxruntime, against torch and the int8 engine."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from qrobust.errors import CheckpointError  # noqa: E402
from qrobust.models import build_model  # noqa: E402
from qrobust.quant import save_int8  # noqa: E402
from qrobust.quant.export import OnnxRuntimeModel, onnx_runtime_model, save_onnx, to_onnx  # noqa: E402
from qrobust.smoothing import IntRS, SmoothedClassifier  # noqa: E402

from .conftest import SHAPES, intrs_noisy, make_info  # noqa: E402


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the intermediate values ``names``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None) for name in names)
    return copy


@pytest.mark.parametrize("name", ["resnet8"])  # BatchNorm, residual, pooling; CNN: tests/cli
def test_fp32_onnx_logits_match_torch(name: str) -> None:
    pytest.importorskip("onnxscript")
    shape = SHAPES[name]
    torch.manual_seed(0)
    model = build_model(name, make_info(shape)).eval()
    runtime = OnnxRuntimeModel(to_onnx(model, shape), threads=1)
    images = torch.rand(7, *shape) + 0.25 * torch.randn(7, *shape)  # FloatRS inputs leave [0, 1]; batch 7: dynamic
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(runtime(images), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize(
    "name, margin, n, sigma",
    [("cnn", 0, 1000, 0.25), ("resnet8", 0, 2000, 0.25), ("resnet8", 0, 2000, 0.5), ("cnn", 383, 500, 0.5)],
)
def test_int8_onnx_agrees_with_engine_on_intrs_noise(name: str, margin: int, n: int, sigma: float, quantized) -> None:
    """IntRS feeds int16 x + n, outside [0, 255]: top-1 agreement >= 99.5% with the integer engine
    (margin 0 clips the input, margin 383 widens its range with step 3)."""
    q = quantized(name, n=n, margin=margin)
    noisy = intrs_noisy(q.images, sigma, seed=7)
    reference = q.int8.predict(noisy)
    assert len(reference.unique()) >= 5  # centred logits: agreement is not trivial
    assert float((onnx_runtime_model(q.int8, threads=1).predict(noisy) == reference).float().mean()) >= 0.995


@pytest.mark.parametrize("name, margin", [("cnn", 0), ("cnn", 383), ("resnet8", 0)])
def test_input_codes_exact_and_first_conv_within_one_step(name: str, margin: int, quantized) -> None:
    """QuantizeLinear reproduces the engine's input quantizer exactly; the first conv, whose per-channel
    padding (Normalize folded in) is built from Split/Pad/Concat, differs from the engine by at most one
    step, and rarely (requantization rounding)."""
    q = quantized(name, margin=margin)
    first = q.int8.ops[0]
    assert bool(torch.any(first.pad_value != first.in_zero_point))  # the explicit padding path is exercised
    noisy = intrs_noisy(q.images, 0.5, seed=9)
    runtime = OnnxRuntimeModel(with_outputs(to_onnx(q.int8), ["codes", "value1"]), threads=1)
    _, codes, value1 = runtime.session.run(None, {"lattice": noisy.float().numpy()})
    assert np.array_equal(codes, q.int8.input_codes(noisy).numpy())
    difference = np.abs(value1.astype(np.int32) - first(q.int8.input_codes(noisy)).numpy().astype(np.int32))
    assert difference.max() <= 1 and difference.mean() <= 1e-3


def test_int8_graph_is_portable_qoperator(quantized) -> None:
    """Standard ONNX ops only (no com.microsoft), integer weights in QLinearConv / MatMulInteger."""
    model = to_onnx(quantized("resnet8").int8, SHAPES["resnet8"])
    onnx.checker.check_model(model, full_check=True)
    ops = {node.op_type for node in model.graph.node}
    assert {node.domain for node in model.graph.node} == {""}
    assert {"QuantizeLinear", "QLinearConv", "MatMulInteger", "DequantizeLinear", "GlobalAveragePool"} <= ops
    assert not ops & {"Conv", "Gemm", "MatMul"}  # no float compute on weights
    weights = [t for t in model.graph.initializer if re.fullmatch(r"weight(_t)?_\d+", t.name)]
    assert weights and all(t.data_type == onnx.TensorProto.INT8 for t in weights)


def test_smoothed_classifier_runs_on_onnxruntime(quantized) -> None:
    """SmoothedClassifier takes the runtime unchanged; on a shared noise bank its votes follow the engine's."""
    q = quantized("resnet8")
    method = IntRS(0.5)
    runtime = onnx_runtime_model(q.int8, threads=1)
    image = q.images[0]
    noise = method.sample_noise((600, *image.shape), torch.Generator().manual_seed(0))
    votes = [
        SmoothedClassifier(base, 10, method, batch_size=200).sample_predictions(image, 600, noise=noise)
        for base in (q.int8, runtime)
    ]
    assert float(np.mean(votes[0] == votes[1])) >= 0.99


def test_files_round_trip(quantized, tmp_path) -> None:
    """An int8 file runs directly (exported in memory) and through a saved .onnx file, with the same logits;
    its metadata travels in the ONNX file."""
    q = quantized("cnn")
    int8_path = tmp_path / "model.int8.pt"
    save_int8(int8_path, q.int8, {"dataset": {"shape": list(SHAPES["cnn"])}, "sigma": 0.25})
    onnx_path = tmp_path / "model.onnx"
    assert save_onnx(to_onnx(int8_path), onnx_path) == onnx_path.stat().st_size
    direct, saved = onnx_runtime_model(int8_path, threads=1), onnx_runtime_model(onnx_path, threads=2)
    assert saved.session.get_session_options().intra_op_num_threads == 2
    torch.testing.assert_close(direct(q.images), saved(q.images), rtol=0, atol=0)
    written = onnx.load(onnx_path)
    props = {p.key: p.value for p in written.metadata_props}
    assert json.loads(props["qrobust.metadata"])["sigma"] == 0.25 and props["qrobust.input"] == "lattice"
    assert [d.dim_value for d in written.graph.input[0].type.tensor_type.shape.dim[1:]] == list(SHAPES["cnn"])


def test_errors(quantized, tmp_path) -> None:
    q = quantized("cnn")
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(CheckpointError, match="neither an int8 model nor a checkpoint"):
        to_onnx(text)
    with pytest.raises(CheckpointError, match="not found"):
        to_onnx(tmp_path / "missing.pt")
    foreign = to_onnx(q.int8)
    del foreign.metadata_props[:]
    with pytest.raises(CheckpointError, match="not an ONNX model written by qrobust"):
        OnnxRuntimeModel(foreign)
    with pytest.raises(ValueError, match="quantization-aware"):
        to_onnx(q.qat)
    with pytest.raises(ValueError, match="image_shape"):
        to_onnx(q.model)
    runtime = OnnxRuntimeModel(to_onnx(q.int8, SHAPES["cnn"]), threads=1)
    with pytest.raises(ValueError, match="integer lattice values"):
        runtime(q.images.float() / 255)
    with pytest.raises(ValueError, match="takes images of shape"):
        runtime(q.images[:, :, :14])
    with pytest.raises(ValueError, match="threads"):
        OnnxRuntimeModel(to_onnx(q.int8), threads=0)
