"""ONNX export of fp32 and int8 models, and an onnxruntime backend that runs them, for edge runtimes.

fp32 models go through ``torch.onnx.export`` (the torch.export-based exporter, which needs onnxscript):
[0, 1] images (N, C, H, W) in, float logits out, dynamic batch.

int8 models (``Int8Model``) are written in QOperator form from their own integer parameters, with no
recalibration and standard ONNX ops only, so any ONNX runtime can run them:

- the input is a float tensor of integer lattice values (uint8 images, or x + noise unclipped for
  IntRS), mapped to uint8 codes by ``QuantizeLinear`` with scale = the input step (in lattice units) and
  the input zero point; it saturates at 0 and 255, exactly as the engine's input quantizer clamps, and
  rounds identically, since the step is odd (v / step is never halfway between two codes);
- convolutions and hidden linear layers (as 1x1 convolutions) are ``QLinearConv``: int8 weights
  with per-channel scales, the int32 bias, uint8 in and out; ReLU, where its zero point is not 0,
  is a ``Clip`` at the output zero point; a first convolution with Normalize folded in, whose padding
  is per-channel rather than the zero point, is padded explicitly first (Split, Pad, Concat);
- max pooling is ``MaxPool`` on uint8; residual adds and global average pooling are
  ``DequantizeLinear`` -> float ``Add`` (+ ``Relu``) / ``GlobalAveragePool`` -> ``QuantizeLinear`` to
  the engine's output scale (onnxruntime fuses such groups into QLinearAdd / QLinearGlobalAveragePool);
- the logits layer is ``MatMulInteger`` plus the int32 bias, then ``DequantizeLinear`` to real logits
  (float; the engine's int32 logits q stand for (q - zero point) * ``logit_scale`` of the same values).

Each file carries string metadata: ``qrobust.input`` ("lattice" or "unit", which inputs it takes) and,
when exported from a file, ``qrobust.metadata`` (the model's qrobust metadata as JSON: dataset, classes).
Usage::

    save_onnx(to_onnx("model.int8.pt"), "model.onnx")        # or `qrobust export model.int8.pt --output model.onnx`
    runtime = onnx_runtime_model("model.onnx", threads=1)    # lattice values in, logits out
    smoothed = SmoothedClassifier(runtime, num_classes, IntRS(0.25))

Requantization in ONNX multiplies by a float scale ratio and rounds half to even, where the integer
engine uses a 31-bit fixed-point multiplier and rounds half up, so an activation can differ by one LSB
where a value falls next to a rounding boundary. Predictions therefore agree with the engine on all but
rare inputs (tests/quant/test_export.py checks >= 99.5% top-1 on noisy inputs); they are not equal,
and certificates computed with onnxruntime hold for the function onnxruntime computes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qrobust.errors import CheckpointError, QRobustError
from qrobust.quant.engine import (
    Int8Model,
    IntAdd,
    IntConv2d,
    IntFlatten,
    IntGlobalAvgPool,
    IntLinear,
    IntMaxPool2d,
    check_images,
)
from qrobust.quant.qat import QATModel
from qrobust.quant.serialization import load_int8
from qrobust.train import load_model

try:
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper
except ImportError as error:  # the optional extra
    raise ImportError(f"ONNX export needs onnx and onnxruntime: pip install 'qrobust[onnx]' ({error})") from None

OPSET = 18
INPUT_KIND = "qrobust.input"  # metadata key: "lattice" (integer lattice values) or "unit" ([0, 1] floats)
Source = str | Path | nn.Module | onnx.ModelProto


def to_onnx(source: str | Path | nn.Module, image_shape: tuple[int, int, int] | None = None) -> onnx.ModelProto:
    """An ONNX model of ``source``: an ``Int8Model``, an fp32 model, or a qrobust model file.

    Args:
        source: an ``Int8Model`` (exported in QOperator form, see the module docstring), an fp32
            ``nn.Module`` taking [0, 1] images, or the path of a `qrobust train` checkpoint or a
            `qrobust quantize` int8 file (their metadata gives the image shape).
        image_shape: (C, H, W) of the inputs; required for an fp32 module, optional for an ``Int8Model``
            (then only the rank is fixed).

    The batch dimension is dynamic. Raises CheckpointError for a file that is neither kind of model
    file, ValueError for a model that cannot be exported (e.g. a quantization-aware one: convert it first).
    """
    if isinstance(source, str | Path):
        return _file_to_onnx(Path(source))
    if isinstance(source, Int8Model):
        return _int8_to_onnx(source, image_shape)
    if isinstance(source, QATModel):
        raise ValueError("a quantization-aware model is exported after `convert` (qrobust quantize), as int8")
    if not isinstance(source, nn.Module):
        raise ValueError(f"to_onnx takes an Int8Model, an nn.Module or a model file path, got {type(source).__name__}")
    if image_shape is None:
        raise ValueError("exporting an fp32 model needs image_shape (C, H, W)")
    return _fp32_to_onnx(source, tuple(image_shape))


def save_onnx(model: onnx.ModelProto, path: str | Path) -> int:
    """Write ``model`` to ``path`` (checked by onnx.checker first); returns the file's size in bytes."""
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path)
    return path.stat().st_size


def _file_to_onnx(path: Path) -> onnx.ModelProto:
    """Export a qrobust int8 file or fp32 checkpoint, its metadata kept as JSON in the ONNX metadata;
    one CheckpointError line for anything else."""
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        saved = load_int8(path)
    except CheckpointError:  # not an int8 file (or a damaged one): the checkpoint reader's message is kept
        saved = None
    if saved is not None:
        metadata = saved.metadata
        shape = metadata.get("dataset", {}).get("shape")  # absent: C, H, W stay free
        proto = _int8_to_onnx(saved.model, None if shape is None else tuple(shape))
    else:
        try:
            model, checkpoint = load_model(path)
        except CheckpointError as error:
            raise CheckpointError(f"cannot export {path}: neither an int8 model nor a checkpoint ({error})") from None
        metadata = checkpoint.metadata
        if metadata.get("qat") is not None:
            raise QRobustError(
                f"{path} is a quantization-aware checkpoint: run `qrobust quantize` on it, then export the int8 file"
            )
        proto = _fp32_to_onnx(model, checkpoint.dataset_info.shape)
    _add_props(proto, {"qrobust.metadata": json.dumps(metadata), "qrobust.source": path.name})
    return proto


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Inside the block, hide the exporter's log lines (e.g. about torchvision ops it skips) and a
    deprecation warning torch.export raises from its own internals; both are restored after it."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _fp32_to_onnx(model: nn.Module, image_shape: tuple[int, ...]) -> onnx.ModelProto:
    """``torch.onnx.export`` (torch.export-based) of ``model`` on [0, 1] images, dynamic batch."""
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
    example = torch.rand(2, *image_shape)  # batch 2: a batch of 1 would be specialised as a constant
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                model.eval(),
                (example,),
                dynamo=True,
                opset_version=OPSET,
                verbose=False,
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
    except ImportError as error:
        raise ImportError(f"fp32 ONNX export needs onnxscript: pip install 'qrobust[onnx]' ({error})") from None
    except Exception as error:  # torch.export and the exporter raise many types for unsupported code
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"torch.onnx.export failed on {type(model).__name__}: {reason}") from None
    if program is None:  # torch.onnx.export returns None only when it writes a file, which it is not asked to
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    _add_props(proto, {INPUT_KIND: "unit"})
    return proto


class _GraphBuilder:
    """Collects the nodes and initializers of an ONNX graph; names are made unique by a counter."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def constant(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.array(value, order="C"), name))  # 0-dim stays 0-dim
        return name

    def node(self, op: str, inputs: list[str], **attributes) -> str:
        """Add one single-output node; returns its output's name."""
        output = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def rename_last(self, output: str, name: str) -> str:
        """Give ``output``, the output of the last node added, the name ``name``; returns ``name``."""
        node = self.nodes[-1]
        if list(node.output) != [output]:
            raise RuntimeError(f"{output} is not the output of the last node {node.name}")
        node.output[0] = name
        return name

    def qparams(self, scale: float, zero_point: int) -> list[str]:
        """Initializers (scale, zero point): float32 and uint8 scalars."""
        return [
            self.constant("scale", np.array(scale, np.float32)),
            self.constant("zero_point", np.array(zero_point, np.uint8)),
        ]

    def dequantize(self, x: str, scale: float, zero_point: int) -> str:
        return self.node("DequantizeLinear", [x, *self.qparams(scale, zero_point)])

    def quantize(self, x: str, scale: float, zero_point: int) -> str:
        return self.node("QuantizeLinear", [x, *self.qparams(scale, zero_point)])


def _relu_clip(graph: _GraphBuilder, x: str, op: IntConv2d | IntLinear) -> str:
    """ReLU on uint8 codes is a clamp at the output zero point; a no-op when that is 0."""
    if not op.relu or op.out_zero_point == 0:
        return x
    return graph.node("Clip", [x, graph.constant("relu_floor", np.array(op.out_zero_point, np.uint8))])


def _pad_per_channel(graph: _GraphBuilder, x: str, op: IntConv2d) -> str:
    """Pad each channel with its own uint8 value (a first conv with Normalize folded in).

    Shapes: (N, C, H, W) -> (N, C, H + 2ph, W + 2pw).
    """
    ph, pw = op.padding
    pads = graph.constant("pads", np.array([0, 0, ph, pw, 0, 0, ph, pw], np.int64))
    values = op.pad_value.tolist()
    parts = [graph.name("channel") for _ in values]  # (N, 1, H, W) each
    split = graph.constant("split", np.ones(len(values), np.int64))
    graph.nodes.append(helper.make_node("Split", [x, split], parts, axis=1))
    padded = [
        graph.node("Pad", [part, pads, graph.constant("pad_value", np.array(value, np.uint8))])
        for part, value in zip(parts, values)
    ]
    return graph.node("Concat", padded, axis=1)


def _qlinear_conv(graph: _GraphBuilder, x: str, op: IntConv2d | IntLinear, in_scale: float, out_scale: float) -> str:
    """``QLinearConv`` with the op's int8 weights (O, C, kh, kw), per-channel scales and int32 bias."""
    weight = op.weight.numpy()
    if weight.ndim == 2:  # a linear layer as a 1x1 convolution
        weight = weight[:, :, None, None]
    attributes = {}
    if isinstance(op, IntConv2d):
        ph, pw = op.padding
        if any(op.padding) and bool(torch.any(op.pad_value != op.in_zero_point)):
            x = _pad_per_channel(graph, x, op)
        else:  # QLinearConv pads with the input zero point, as the engine does here
            attributes["pads"] = [ph, pw, ph, pw]
        attributes["strides"] = list(op.stride)
    inputs = [
        x,
        *graph.qparams(in_scale, op.in_zero_point),
        graph.constant("weight", weight),
        graph.constant("weight_scale", op.weight_scale.numpy().astype(np.float32)),
        graph.constant("weight_zero_point", np.zeros(weight.shape[0], np.int8)),
        *graph.qparams(out_scale, op.out_zero_point),
        graph.constant("bias", op.bias.numpy()),
    ]
    return _relu_clip(graph, graph.node("QLinearConv", inputs, kernel_shape=list(weight.shape[2:]), **attributes), op)


def _logits(graph: _GraphBuilder, x: str, op: IntLinear, in_scale: float) -> str:
    """The logits layer: int32 accumulators of ``MatMulInteger`` plus the bias, then real values. (N, I) -> (N, O)."""
    weight_t = graph.constant("weight_t", op.weight.numpy().T.copy())  # (I, O) int8
    in_zero_point = graph.constant("zero_point", np.array(op.in_zero_point, np.uint8))
    acc = graph.node("MatMulInteger", [x, weight_t, in_zero_point])  # (N, O) int32
    acc = graph.node("Add", [acc, graph.constant("bias", op.bias.numpy())])
    scales = graph.constant("logit_scale", (in_scale * op.weight_scale.numpy()).astype(np.float32))  # (O,)
    zero_points = graph.constant("zero_point", np.zeros(len(op.bias), np.int32))
    logits = graph.node("DequantizeLinear", [acc, scales, zero_points], axis=1)
    return graph.node("Relu", [logits]) if op.relu else logits


def _int8_to_onnx(model: Int8Model, image_shape: tuple[int, ...] | None) -> onnx.ModelProto:
    """The QOperator graph of ``model`` (see the module docstring): lattice values in, real logits out.

    Value i of the engine's program is the graph value "value{i}" ("codes" for 0, "logits" for the last).
    """
    graph = _GraphBuilder()
    scales = [scale for scale, _ in model.value_qparams]
    codes = graph.node("QuantizeLinear", ["lattice", *graph.qparams(float(model.input_step), model.input_zero_point)])
    values = [graph.rename_last(codes, "codes")]  # (N, C, H, W) uint8
    for index, (op, args) in enumerate(zip(model.ops, model.inputs)):
        x, in_scale, out_scale = values[args[0]], scales[args[0]], scales[index + 1]
        if isinstance(op, IntConv2d):
            x = _qlinear_conv(graph, x, op, in_scale, out_scale)
        elif isinstance(op, IntLinear) and op.logits:
            x = _logits(graph, x, op, in_scale)
        elif isinstance(op, IntLinear):  # (N, I) -> (N, I, 1, 1) -> (N, O, 1, 1) -> (N, O)
            axes = graph.constant("axes", np.array([2, 3], np.int64))
            x = _qlinear_conv(graph, graph.node("Unsqueeze", [x, axes]), op, in_scale, out_scale)
            x = graph.node("Squeeze", [x, axes])
        elif isinstance(op, IntAdd):
            a = graph.dequantize(x, in_scale, op.zero_points[0])
            b = graph.dequantize(values[args[1]], scales[args[1]], op.zero_points[1])
            total = graph.node("Add", [a, b])
            x = graph.quantize(graph.node("Relu", [total]) if op.relu else total, out_scale, op.out_zero_point)
        elif isinstance(op, IntMaxPool2d):
            ph, pw = op.padding  # ONNX ignores padded cells, the engine pads with 0 <= every uint8: the same max
            pool = {"kernel_shape": list(op.kernel_size), "strides": list(op.stride), "pads": [ph, pw, ph, pw]}
            x = graph.node("MaxPool", [x], **pool)
        elif isinstance(op, IntGlobalAvgPool):  # (N, C, H, W) -> (N, C, 1, 1)
            mean = graph.node("GlobalAveragePool", [graph.dequantize(x, in_scale, op.in_zero_point)])
            x = graph.quantize(mean, out_scale, op.out_zero_point)
        elif isinstance(op, IntFlatten):
            x = graph.node("Flatten", [x], axis=1)
        else:
            raise ValueError(f"no ONNX export for integer op {type(op).__name__}")
        values.append(graph.rename_last(x, "logits" if index == len(model.ops) - 1 else f"value{index + 1}"))
    shape = ["batch", *(image_shape or ("channels", "height", "width"))]
    onnx_graph = helper.make_graph(
        graph.nodes,
        "qrobust_int8",
        [helper.make_tensor_value_info("lattice", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", None])],
        graph.initializers,
    )
    opsets = [helper.make_opsetid("", OPSET)]
    # the oldest IR version with these opsets, so that runtimes older than this onnx package load the file
    ir_version = helper.find_min_ir_version_for(opsets)
    proto = helper.make_model(onnx_graph, opset_imports=opsets, ir_version=ir_version, producer_name="qrobust")
    _add_props(proto, {INPUT_KIND: "lattice", "qrobust.input_margin": str(model.input_margin)})
    return proto


def _add_props(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    """Add (or replace) string metadata entries of an ONNX model."""
    helper.set_model_props(proto, {entry.key: entry.value for entry in proto.metadata_props} | props)


class OnnxRuntimeModel(nn.Module):
    """An ONNX model written by qrobust, run by onnxruntime on the CPU, behind the interface of the torch models.

    It maps the inputs the source model takes to logits, so ``SmoothedClassifier`` and the int8
    backends' callers use it unchanged: integer lattice values (uint8 images, or int16 x + noise) for
    an int8 model, floats in [0, 1] (noise allowed) for an fp32 one. Logits are float32 real values
    (an int8 engine's int32 logits times its ``logit_scale``, up to rounding); only their argmax matters
    to randomized smoothing.

    Args:
        model: an ``onnx.ModelProto`` from ``to_onnx``, or the path of a file ``save_onnx`` wrote.
        threads: onnxruntime intra-op threads (>= 1); default ``torch.get_num_threads()``.

    Shapes: (N, C, H, W) -> (N, num_classes) float32.
    """

    def __init__(self, model: onnx.ModelProto | str | Path, threads: int | None = None) -> None:
        super().__init__()
        threads = torch.get_num_threads() if threads is None else threads
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else _read_onnx_file(Path(model))
        try:
            self.session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own types for malformed graphs
            reason = str(error).strip().splitlines()[0]
            raise CheckpointError(f"onnxruntime cannot load the model: {reason}") from None
        kind = self.session.get_modelmeta().custom_metadata_map.get(INPUT_KIND)
        if kind not in ("lattice", "unit"):
            raise CheckpointError(f"not an ONNX model written by qrobust (no {INPUT_KIND!r} metadata)")
        self.lattice = kind == "lattice"
        self.threads = threads
        self._input = self.session.get_inputs()[0].name
        self._shape = tuple(d if isinstance(d, int) else None for d in self.session.get_inputs()[0].shape[1:])

    def __repr__(self) -> str:
        return f"OnnxRuntimeModel(input={'lattice' if self.lattice else 'unit'}, threads={self.threads})"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.lattice:
            check_images(images)
        elif not images.is_floating_point() or images.dim() != 4:
            raise ValueError(
                f"fp32 models take float images (N, C, H, W) in [0, 1], "
                f"got {images.dtype} of shape {tuple(images.shape)}"
            )
        if any(want is not None and want != got for want, got in zip(self._shape, images.shape[1:])):
            raise ValueError(f"this model takes images of shape {self._shape} (C, H, W), got {tuple(images.shape[1:])}")
        x = images.detach().cpu().to(torch.float32).contiguous().numpy()  # lattice values are exact in float32
        (logits,) = self.session.run(None, {self._input: x})
        return torch.from_numpy(logits).to(images.device)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """float32 logits (N, num_classes) of a batch (N, C, H, W)."""
        return self(images)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Top-1 labels (N,) int64; ties go to the lowest class index."""
        return self(images).argmax(1)


def _read_onnx_file(path: Path) -> bytes:
    if not path.is_file():
        raise CheckpointError(f"ONNX model not found: {path}")
    return path.read_bytes()


def onnx_runtime_model(source: Source, threads: int | None = None) -> OnnxRuntimeModel:
    """An ``OnnxRuntimeModel`` of ``source`` in one call (e.g. for ``certify --runtime onnxruntime``).

    Args:
        source: a file written by ``save_onnx`` (``qrobust export``); a `qrobust quantize` int8 file or
            a `qrobust train` checkpoint (both are zip archives; exported in memory); an ``Int8Model``;
            or an ``onnx.ModelProto``. An in-memory fp32 module needs its image shape: pass
            ``to_onnx(module, image_shape)``.
        threads: onnxruntime intra-op threads; default ``torch.get_num_threads()``.
    """
    if isinstance(source, str | Path) and not zipfile.is_zipfile(source) and Path(source).is_file():
        return OnnxRuntimeModel(source, threads)
    return OnnxRuntimeModel(source if isinstance(source, onnx.ModelProto) else to_onnx(source), threads)
