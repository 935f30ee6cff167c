"""``prepare_qat``: read a float model's dataflow with torch.fx and build its fake-quantized twin.

The model's structure, not its class or layer names, decides what happens: conv -> BatchNorm -> ReLU,
linear -> ReLU and add -> ReLU chains are fused into one quantized step each, the Normalize layer is
folded into the conv or linear that reads it (through a Flatten if need be), max pooling, global
average pooling and flattening pass quantized values through. Anything else raises ValueError naming
the node, so an unsupported model fails at preparation instead of converting wrongly.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

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


class _Tracer(fx.Tracer):
    """Keeps Normalize as one node; torch.nn layers are leaves as usual."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, Normalize) or super().is_leaf_module(module, qualified_name)


@dataclass(frozen=True)
class _Normalized:
    """A value that the model would normalise next: its consumer folds ``normalize`` into itself."""

    value: int
    normalize: Normalize


def _kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """What a graph node does, by module type or function: "conv", "bn", "relu", "add", ... or "other"."""
    if node.op == "call_module":
        module = modules[node.target]
        for kind, types in (
            ("normalize", Normalize),
            ("conv", nn.Conv2d),
            ("linear", nn.Linear),
            ("bn", nn.BatchNorm2d),
            ("relu", nn.ReLU),
            ("maxpool", nn.MaxPool2d),
            ("avgpool", nn.AdaptiveAvgPool2d),
            ("flatten", nn.Flatten),
            ("identity", (nn.Identity, nn.Dropout)),
        ):
            if isinstance(module, types):
                return kind
    if node.op == "call_function":
        if node.target in (operator.add, torch.add) and len(node.args) == 2 and not node.kwargs:
            return "add"
        if node.target in (F.relu, torch.relu) and not node.kwargs.get("inplace", False):
            return "relu"
        if node.target is torch.flatten and node.args[1:] in ((1,), (1, -1)) and not node.kwargs:
            return "flatten"
    if node.op == "call_method":
        if node.target == "relu" and len(node.args) == 1:
            return "relu"
        if node.target == "flatten" and node.args[1:] in ((1,), (1, -1)) and not node.kwargs:
            return "flatten"
    return "other"


def prepare_qat(
    model: nn.Module, config: QuantConfig | BitPolicy = QuantConfig()
) -> QATModel | MixedPrecisionModel:
    """A fake-quantized copy of ``model`` for quantization-aware training or calibration.

    With a ``BitPolicy`` instead of a ``QuantConfig``, the copy is ARQ's mixed-precision model (per-layer
    weight and activation bit-widths, see ``qrobust.quant.mixed``), not the int8 engine's twin below.

    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference" (CVPR 2018). ``model`` (any registered model: mlp, cnn, resnet*) is left unchanged;
    the copy starts from its weights and BatchNorm statistics and is in the same train/eval mode.
    Train it with ``qrobust.train.train`` or ``calibrate`` it, then ``convert`` it.

    Raises ValueError naming the first layer or function the integer engine cannot run.
    """
    if isinstance(config, BitPolicy):
        return prepare_mixed(model, config)
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig or a BitPolicy, got {type(config).__name__}")
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # fx raises many types; the user needs the model name and the reason
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx: {error}") from error
    qat = _Builder(model, config).build(graph)
    return qat.train(model.training)


class _Builder:
    """Walks the graph in order, emitting fused QAT steps and the value each graph node maps to."""

    def __init__(self, model: nn.Module, config: QuantConfig) -> None:
        self.name = type(model).__name__
        self.modules = dict(model.named_modules())
        self.config = config
        self.input_quant = InputQuant(config.input_margin)
        self.steps: list[nn.Module] = []
        self.inputs: list[tuple[int, ...]] = []
        # per value: the quantizer that sets its qparams (None for the logits, which nothing reads)
        self.quants: list[InputQuant | ActQuant | None] = [self.input_quant]
        self.env: dict[fx.Node, int | _Normalized] = {}

    def build(self, graph: fx.Graph) -> QATModel:
        output = None
        for node in graph.nodes:
            if node in self.env:
                continue  # fused into an earlier step
            if node.op == "placeholder":
                if self.env:
                    raise ValueError(f"cannot quantize {self.name}: it takes more than one input")
                self.env[node] = 0
            elif node.op == "output":
                output = self.env.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            else:
                self._visit(node)
        last = self.steps[-1] if self.steps else None
        if output != len(self.steps) or not (isinstance(last, QLinear) and last.out_quant is None):
            raise ValueError(f"cannot quantize {self.name}: its output must be the logits of a final Linear layer")
        return QATModel(self.input_quant, self.steps, self.inputs)

    def _fail(self, node: fx.Node, why: str = "is not supported") -> ValueError:
        return ValueError(f"cannot quantize {self.name}: {node.format_node()} {why}; supported: {SUPPORTED}")

    def _value(self, node: fx.Node, arg: object) -> int:
        ref = self.env.get(arg) if isinstance(arg, fx.Node) else None
        if not isinstance(ref, int):
            raise self._fail(node, "reads a normalised image or a non-tensor; only Conv2d/Linear may read Normalize")
        return ref

    def _emit(self, step: nn.Module, inputs: tuple[int, ...], quant: InputQuant | ActQuant | None) -> int:
        self.steps.append(step)
        self.inputs.append(inputs)
        self.quants.append(quant)
        return len(self.steps)

    def _fuse(self, node: fx.Node, kind: str) -> fx.Node | None:
        """``node``'s only user if it is of ``kind`` (and so can be fused into ``node``'s step)."""
        users = list(node.users)
        return users[0] if len(users) == 1 and _kind(users[0], self.modules) == kind else None

    def _tail(self, node: fx.Node, *kinds: str) -> tuple[fx.Node, dict[str, fx.Node]]:
        """Follow a fusable chain of ``kinds`` after ``node``: (last node, fused nodes by kind)."""
        fused, tail = {}, node
        for kind in kinds:
            nxt = self._fuse(tail, kind)
            if nxt is not None:
                fused[kind] = tail = nxt
        return tail, fused

    def _out_quant(self, tail: fx.Node) -> ActQuant | None:
        """None for the node the model returns (its outputs are the logits), else a new quantizer."""
        return None if any(user.op == "output" for user in tail.users) else ActQuant(self.config.ema_decay)

    def _visit(self, node: fx.Node) -> None:
        kind = _kind(node, self.modules)
        module = self.modules.get(node.target) if node.op == "call_module" else None
        arg = node.args[0] if node.args else None
        if kind == "normalize":
            if self._value(node, arg) != 0:  # folding pads on, and is checked against, the input grid
                raise self._fail(node, "normalises an intermediate value; Normalize must read the model input")
            self.env[node] = _Normalized(0, module)
        elif kind == "identity":
            self.env[node] = self.env[arg]
        elif kind in ("conv", "linear"):
            self._affine(node, kind, module)
        elif kind == "add":
            tail, fused = self._tail(node, "relu")
            quant = ActQuant(self.config.ema_decay)
            if any(user.op == "output" for user in tail.users):
                raise self._fail(node, "returns a residual sum; the model must end in a Linear layer")
            inputs = (self._value(node, node.args[0]), self._value(node, node.args[1]))
            index = self._emit(QAdd("relu" in fused, quant), inputs, quant)
            self.env.update(dict.fromkeys([node, *fused.values()], index))
        elif kind == "flatten":
            ref = self.env.get(arg)
            source = ref.value if isinstance(ref, _Normalized) else self._value(node, arg)
            index = self._emit(QFlatten(), (source,), self.quants[source])
            self.env[node] = _Normalized(index, ref.normalize) if isinstance(ref, _Normalized) else index
        elif kind == "maxpool" and module.dilation in (1, (1, 1)) and not module.ceil_mode:
            source = self._value(node, arg)
            pool = QMaxPool2d(module.kernel_size, module.stride, module.padding)
            self.env[node] = self._emit(pool, (source,), self.quants[source])
        elif kind == "avgpool" and module.output_size in (1, (1, 1)):
            quant = ActQuant(self.config.ema_decay)
            self.env[node] = self._emit(QGlobalAvgPool(quant), (self._value(node, arg),), quant)
        else:
            if kind in ("bn", "relu"):
                raise self._fail(node, "cannot be fused into a preceding conv, linear or add")
            raise self._fail(node)

    def _affine(self, node: fx.Node, kind: str, module: nn.Conv2d | nn.Linear) -> None:
        ref = self.env.get(node.args[0])
        source = ref.value if isinstance(ref, _Normalized) else self._value(node, node.args[0])
        if kind == "conv":
            plain = module.groups == 1 and module.dilation == (1, 1) and module.padding_mode == "zeros"
            if not plain or isinstance(module.padding, str):
                raise self._fail(node, "has groups, dilation, string padding or non-zero padding mode")
            tail, fused = self._tail(node, "bn", "relu")
            bn = self.modules[fused["bn"].target] if "bn" in fused else None
            if bn is not None and (not bn.affine or not bn.track_running_stats):
                raise self._fail(fused["bn"], "has no affine parameters or running statistics to fold")
        else:
            tail, fused = self._tail(node, "relu")
        normalize = None
        if isinstance(ref, _Normalized):
            mean, std = ref.normalize.mean, ref.normalize.std
            if kind == "linear":  # Flatten put the channel outermost: repeat each statistic over H*W
                if module.in_features % mean.numel():
                    why = f"reads {module.in_features} features, not a multiple of {mean.numel()} channels"
                    raise self._fail(node, why)
                repeats = module.in_features // mean.numel()
                mean, std = mean.repeat_interleave(repeats), std.repeat_interleave(repeats)
            normalize = (mean, std)
        out_quant = self._out_quant(tail)
        if out_quant is None and kind == "conv":
            raise self._fail(node, "returns a feature map; the model must end in a Linear layer")
        relu = "relu" in fused
        if kind == "conv":
            bn = copy.deepcopy(self.modules[fused["bn"].target]) if "bn" in fused else None
            step = QConv2d(copy.deepcopy(module), bn, relu, normalize, self.quants[source], out_quant)
        else:
            step = QLinear(copy.deepcopy(module), relu, normalize, self.quants[source], out_quant)
        self.env.update(dict.fromkeys([node, *fused.values()], self._emit(step, (source,), out_quant)))
