"""``prepare_qat``: read a float model's dataflow through ``qrobust.graph`` and build its fake-quantized twin.

The model's structure, not its class or layer names, decides what happens: conv -> BatchNorm -> ReLU,
linear -> ReLU and add -> ReLU chains are fused into one quantized step each, the Normalize layer is
folded into the conv or linear that reads it (through a Flatten if need be), max pooling, global
average pooling and flattening pass quantized values through. Anything else raises ValueError naming
the operation and its line in ``forward``, so an unsupported model fails at preparation instead of
converting wrongly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

from torch import nn

from qrobust.graph import Graph, Layer, check_supported
from qrobust.models.layers import Normalize
from qrobust.quant.mixed import BitPolicy, MixedPrecisionModel, prepare_mixed
from qrobust.quant.qat import (
    ActQuant,
    InputQuant,
    QAdd,
    QATModel,
    QConv2d,
    QFlatten,
    QGlobalAvgPool,
    QLinear,
    QMaxPool2d,
    QuantConfig,
)

SUPPORTED = (
    "Normalize (first), Conv2d (zero padding, groups=1, dilation=1) [+ BatchNorm2d] [+ ReLU], "
    "Linear [+ ReLU], add [+ ReLU], MaxPool2d, AdaptiveAvgPool2d(1), Flatten(1), Identity, Dropout"
)


@dataclass(frozen=True)
class _Normalized:
    """A value that the model would normalise next: its consumer folds ``normalize`` into itself."""

    value: int
    normalize: Normalize


def prepare_qat(
    model: nn.Module,
    config: QuantConfig | BitPolicy = QuantConfig(),  # noqa: B008 (frozen, immutable)
) -> QATModel | MixedPrecisionModel:
    """A fake-quantized copy of ``model`` for quantization-aware training or calibration.

    With a ``BitPolicy`` instead of a ``QuantConfig``, the copy is ARQ's mixed-precision model (per-layer
    weight and activation bit-widths, see ``qrobust.quant.mixed``), not the int8 engine's twin below.

    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference" (CVPR 2018). ``model`` (any model ``qrobust.graph.check_supported(model, x, "int8")``
    accepts, e.g. the registry's mlp, cnn, resnet*) is left unchanged;
    the copy starts from its weights and BatchNorm statistics and is in the same train/eval mode.
    Train it with ``qrobust.train.train`` or ``calibrate`` it, then ``convert`` it.

    Raises ValueError (``UnsupportedModelError`` from ``check_supported``, before any calibration)
    naming the first layer or function the integer engine cannot run and its line in ``forward``.
    """
    if isinstance(config, BitPolicy):
        return prepare_mixed(model, config)
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig or a BitPolicy, got {type(config).__name__}")
    graph = check_supported(model, None, "int8")
    qat = _Builder(graph, config).build()
    return qat.train(model.training)


class _Builder:
    """Walks the graph in call order, emitting fused QAT steps and the value each layer maps to."""

    def __init__(self, graph: Graph, config: QuantConfig) -> None:
        self.graph = graph
        self.name = graph.model
        self.config = config
        self.input_quant = InputQuant(config.input_margin)
        self.steps: list[nn.Module] = []
        self.inputs: list[tuple[int, ...]] = []
        # per value: the quantizer that sets its qparams (None for the logits, which nothing reads)
        self.quants: list[InputQuant | ActQuant | None] = [self.input_quant]
        self.env: dict[str, int | _Normalized] = {graph.input: 0}

    def build(self) -> QATModel:
        for layer in self.graph.layers:
            if layer.name not in self.env:  # else fused into an earlier step
                self._visit(layer)
        output = self.env.get(self.graph.output)
        last = self.steps[-1] if self.steps else None
        if output != len(self.steps) or not (isinstance(last, QLinear) and last.out_quant is None):
            raise ValueError(f"cannot quantize {self.name}: its output must be the logits of a final Linear layer")
        return QATModel(self.input_quant, self.steps, self.inputs)

    def _fail(self, layer: Layer, why: str = "is not supported") -> ValueError:
        return ValueError(f"cannot quantize {self.name}: {layer.describe()} {why}; supported: {SUPPORTED}")

    def _value(self, layer: Layer, name: str) -> int:
        ref = self.env.get(name)
        if not isinstance(ref, int):
            raise self._fail(layer, "reads a normalised image; only Conv2d/Linear may read Normalize")
        return ref

    def _emit(self, step: nn.Module, inputs: tuple[int, ...], quant: InputQuant | ActQuant | None) -> int:
        self.steps.append(step)
        self.inputs.append(inputs)
        self.quants.append(quant)
        return len(self.steps)

    def _fuse(self, layer: Layer, kind: str) -> Layer | None:
        """``layer``'s only reader if it is of ``kind`` (and so can be fused into ``layer``'s step)."""
        users = layer.users
        if len(users) != 1 or users[0] == "output":
            return None
        user = self.graph[users[0]]
        return user if user.kind == kind else None

    def _tail(self, layer: Layer, *kinds: str) -> tuple[Layer, dict[str, Layer]]:
        """Follow a fusable chain of ``kinds`` after ``layer``: (last layer, fused layers by kind)."""
        fused, tail = {}, layer
        for kind in kinds:
            nxt = self._fuse(tail, kind)
            if nxt is not None:
                fused[kind] = tail = nxt
        return tail, fused

    def _out_quant(self, tail: Layer) -> ActQuant | None:
        """None for the layer the model returns (its outputs are the logits), else a new quantizer."""
        return None if "output" in tail.users else ActQuant(self.config.ema_decay)

    def _visit(self, layer: Layer) -> None:
        kind, module = layer.kind, layer.module
        arg = layer.inputs[0]
        if kind == "normalize":
            if self._value(layer, arg) != 0:  # folding pads on, and is checked against, the input grid
                raise self._fail(layer, "normalises an intermediate value; Normalize must read the model input")
            self.env[layer.name] = _Normalized(0, cast(Normalize, module))  # a "normalize" layer's module
        elif kind == "identity":
            self.env[layer.name] = self.env[arg]
        elif kind in ("conv", "linear"):
            self._affine(layer)
        elif kind == "add":
            if len(layer.inputs) != 2:
                raise self._fail(layer, "adds a tensor to itself")
            tail, fused = self._tail(layer, "relu")
            quant = ActQuant(self.config.ema_decay)
            if "output" in tail.users:
                raise self._fail(layer, "returns a residual sum; the model must end in a Linear layer")
            inputs = (self._value(layer, layer.inputs[0]), self._value(layer, layer.inputs[1]))
            index = self._emit(QAdd("relu" in fused, quant), inputs, quant)
            self.env.update(dict.fromkeys([layer.name, *(f.name for f in fused.values())], index))
        elif kind == "flatten":
            ref = self.env.get(arg)
            source = ref.value if isinstance(ref, _Normalized) else self._value(layer, arg)
            index = self._emit(QFlatten(), (source,), self.quants[source])
            self.env[layer.name] = _Normalized(index, ref.normalize) if isinstance(ref, _Normalized) else index
        elif kind == "maxpool":
            source = self._value(layer, arg)
            maxpool = cast(nn.MaxPool2d, module)  # a "maxpool" layer's module
            pool = QMaxPool2d(maxpool.kernel_size, maxpool.stride, maxpool.padding)
            self.env[layer.name] = self._emit(pool, (source,), self.quants[source])
        elif kind == "adaptive_avgpool":
            quant = ActQuant(self.config.ema_decay)
            self.env[layer.name] = self._emit(QGlobalAvgPool(quant), (self._value(layer, arg),), quant)
        else:  # batchnorm and relu that do not follow a conv, linear or add
            raise self._fail(layer, "cannot be fused into a preceding conv, linear or add")

    def _affine(self, layer: Layer) -> None:
        kind, module = layer.kind, layer.module
        ref = self.env.get(layer.inputs[0])
        source = ref.value if isinstance(ref, _Normalized) else self._value(layer, layer.inputs[0])
        tail, fused = self._tail(layer, "batchnorm", "relu") if kind == "conv" else self._tail(layer, "relu")
        normalize = None
        if isinstance(ref, _Normalized):
            mean, std = ref.normalize.mean, ref.normalize.std
            if isinstance(module, nn.Linear):  # Flatten put the channel outermost: repeat each statistic over H*W
                if module.in_features % mean.numel():
                    why = f"reads {module.in_features} features, not a multiple of {mean.numel()} channels"
                    raise self._fail(layer, why)
                repeats = module.in_features // mean.numel()
                mean, std = mean.repeat_interleave(repeats), std.repeat_interleave(repeats)
            normalize = (mean, std)
        out_quant = self._out_quant(tail)
        if out_quant is None and kind == "conv":
            raise self._fail(layer, "returns a feature map; the model must end in a Linear layer")
        relu = "relu" in fused
        # None only for a value the model returns; build() refuses a model whose returned value is read again
        in_quant = cast(InputQuant | ActQuant, self.quants[source])
        step: QConv2d | QLinear
        if isinstance(module, nn.Conv2d):  # kind "conv"
            bn = copy.deepcopy(cast(nn.BatchNorm2d, fused["batchnorm"].module)) if "batchnorm" in fused else None
            step = QConv2d(copy.deepcopy(module), bn, relu, normalize, in_quant, out_quant)
        else:
            step = QLinear(copy.deepcopy(cast(nn.Linear, module)), relu, normalize, in_quant, out_quant)
        self.env.update(
            dict.fromkeys([layer.name, *(f.name for f in fused.values())], self._emit(step, (source,), out_quant))
        )
