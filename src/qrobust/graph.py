"""The one reading of a user's network: layers in call order, their kinds, shapes and data flow.

Every technique (int8 QAT/convert, weight bounds, mixed precision and BitOPs, ADMM, pruning, export)
reads a model through ``trace`` and refuses what it cannot run through ``check_supported``, before
any training or calibration, with one message naming the operation and the line of ``forward``.

Why torch.fx symbolic tracing (and not torch.export): it keeps ``nn.Module`` calls as leaf nodes with
their qualified names, which is what every technique keys its layers by (state_dict names, bit
policies, ADMM codes, pruned modules), it needs no example input to find the layers (shapes are
added by ``ShapeProp`` when one is given), and it records each node's source line. torch.export
decomposes modules into aten ops and would have to be mapped back to module names.

Normalize (``qrobust.models.layers.Normalize`` or an inline ``(x - mean) / std`` on the input) and
BatchNorm are folded into the neighbouring affine layer here, once (``fold_normalize``,
``fold_batchnorm``).
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from qrobust.errors import QRobustError, UnsupportedModelError
from qrobust.models.layers import Normalize

KINDS = (
    "linear",
    "conv",
    "relu",
    "relu6",
    "maxpool",
    "avgpool",
    "adaptive_avgpool",
    "flatten",
    "add",
    "cat",
    "normalize",
    "batchnorm",
    "identity",
    "other",
)
AFFINE = ("conv", "linear")

# The kinds each technique runs: int8 QAT/convert and its ONNX export (the integer engine's ops), the
# weight-perturbation bounds (a chain of ReLU layers); None: any traceable model (mixed precision, ADMM
# and pruning only rewrite Conv2d/Linear weights, and pruning leaves what it cannot prune, with a reason).
_INT8 = frozenset(
    {"normalize", "conv", "linear", "batchnorm", "relu", "maxpool", "adaptive_avgpool", "flatten", "add", "identity"}
)
TECHNIQUES: dict[str, frozenset[str] | None] = {
    "int8": _INT8,
    "export": _INT8,
    "bounds": frozenset({"normalize", "conv", "linear", "batchnorm", "relu", "maxpool", "flatten", "identity"}),
    "mixed": None,
    "admm": None,
    "prune": None,
}
_VERBS = {
    "int8": "quantize (int8)",
    "export": "export",
    "bounds": "bound",
    "mixed": "quantize (mixed precision)",
    "admm": "quantize (ADMM)",
    "prune": "prune",
}


@dataclass(frozen=True, eq=False)
class Layer:
    """One operation of the forward pass.

    ``name`` is the module's qualified name (``layer1.0.conv1``) for a module's first call, else the
    fx node name (``add_1``, ``relu_2``); ``target`` the qualified module name or the function's name.
    ``module`` is the user's module, or for a functional op an equivalent one (``F.max_pool2d(x, 2)``
    -> ``nn.MaxPool2d(2)``, inline normalisation -> ``Normalize``); None for add and cat.
    ``inputs`` names the layers (or the model input, ``Graph.input``) whose tensors it reads, in
    argument order; ``users`` the layers reading its output ("output": the model returns it).
    Shapes include the batch dimension and are None without an example input.
    """

    name: str
    kind: str
    target: str
    module: nn.Module | None
    inputs: tuple[str, ...]
    users: tuple[str, ...]
    input_shapes: tuple[tuple[int, ...], ...] | None
    output_shape: tuple[int, ...] | None
    source: str

    def describe(self) -> str:
        """The operation and where ``forward`` calls it, for messages."""
        what = type(self.module).__name__ if self.module is not None else self.target
        return f"{what} ({self.name}) at {self.source}"


@dataclass(frozen=True, eq=False)
class Graph:
    """A traced network: ``layers`` in call order, reading the one input ``input``, returning ``output``."""

    model: str
    input: str
    layers: tuple[Layer, ...]
    output: str

    @functools.cached_property
    def _by_name(self) -> dict[str, Layer]:
        return {layer.name: layer for layer in self.layers}

    def __getitem__(self, name: str) -> Layer:
        return self._by_name[name]

    def affine(self) -> tuple[Layer, ...]:
        """The Conv2d and Linear layers in call order (the layers every technique quantizes or bounds)."""
        return tuple(layer for layer in self.layers if layer.kind in AFFINE)

    def readers(self, name: str) -> tuple[Layer, ...]:
        """The layers reading ``name``'s output (the model output is not a layer)."""
        return tuple(self[user] for user in self[name].users if user != "output")


class _Tracer(fx.Tracer):
    """Keeps Normalize as one leaf node and records each node's source line."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, Normalize) or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module, example_input: torch.Tensor | None = None) -> Graph:
    """The graph of ``model``'s forward pass, with shapes if ``example_input`` (N, ...) is given.

    The model is traced in its current mode and left unchanged (shape propagation runs in eval mode,
    without gradients; the tensor constants fx attaches to the model while tracing are removed again).
    Raises QRobustError if torch.fx cannot trace it or it takes several inputs.
    """
    if not isinstance(model, nn.Module):
        raise QRobustError(f"model must be an nn.Module, got {type(model).__name__}")
    name = type(model).__name__
    attributes = set(vars(model))
    try:
        try:
            fx_graph = _Tracer().trace(model)
        except Exception as error:  # fx raises many types; the user needs the model name and the reason
            raise QRobustError(f"cannot trace {name} with torch.fx: {_first_line(error)}") from error
        placeholders = [node for node in fx_graph.nodes if node.op == "placeholder"]
        if len(placeholders) != 1:
            raise QRobustError(f"{name} must take one input tensor, its forward takes {len(placeholders)}")
        if example_input is not None:
            _propagate_shapes(model, fx_graph, example_input)
        return _Reader(model, fx_graph).read()
    finally:
        for attribute in set(vars(model)) - attributes:  # fx's _tensor_constant<i>
            delattr(model, attribute)


def _propagate_shapes(model: nn.Module, fx_graph: fx.Graph, example_input: torch.Tensor) -> None:
    was_training = model.training
    try:
        with torch.no_grad():
            ShapeProp(fx.GraphModule(model.eval(), fx_graph)).propagate(example_input)
    except Exception as error:  # any failure of the user's forward on the example input
        shape = tuple(example_input.shape)
        raise QRobustError(
            f"{type(model).__name__} fails on an input of shape {shape}: {_first_line(error)}"
        ) from error
    finally:
        model.train(was_training)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s+(.*)')


def _source(node: fx.Node) -> str:
    """``file:line (code)`` of the user's code that created ``node``: the last frame outside torch."""
    frames = [f for f in _FRAME.findall(node.meta.get("stack_trace") or "") if "/torch/" not in f[0]]
    if not frames:
        return "an unknown line"
    path, line, _, code = frames[-1]
    return f"{path}:{line} ({code.strip()})"


class _Reader:
    """Maps fx nodes to Layers: drops shape arithmetic, merges inline normalisation, names the kinds."""

    def __init__(self, model: nn.Module, fx_graph: fx.Graph) -> None:
        self.model = model
        self.fx_graph = fx_graph
        self.modules = dict(model.named_modules())
        self.names: dict[fx.Node, str] = {}  # tensor-valued node -> layer name
        self.kinds: dict[fx.Node, tuple[str, nn.Module | None]] = {}
        self.normalized: dict[fx.Node, Normalize] = {}  # the div of an inline (x - mean) / std
        self.subs: dict[fx.Node, fx.Node] = {}  # its sub -> the div

    def read(self) -> Graph:
        placeholder = next(node for node in self.fx_graph.nodes if node.op == "placeholder")
        self.names[placeholder] = placeholder.name
        for node in self.fx_graph.nodes:  # inline normalisations first: their sub is no layer of its own
            if node.op == "call_function" and node.target is operator.truediv:
                normalize = self._inline_normalize(node)
                if normalize is not None:
                    self.normalized[node] = normalize
        called: set[str] = set()
        nodes = []
        for node in self.fx_graph.nodes:
            calls = node.op in ("call_module", "call_function", "call_method")
            if not calls or node in self.subs or not self._is_tensor_op(node):
                continue
            self.kinds[node] = ("normalize", self.normalized[node]) if node in self.normalized else self._kind(node)
            first = node.op == "call_module" and node.target not in called
            if node.op == "call_module":
                called.add(node.target)
            self.names[node] = node.target if first else node.name
            nodes.append(node)
        layers = [self._layer(node) for node in nodes]
        (output,) = (node for node in self.fx_graph.nodes if node.op == "output")
        result = output.args[0]
        returned = self.names.get(result, "") if isinstance(result, fx.Node) else ""
        return Graph(type(self.model).__name__, placeholder.name, tuple(layers), returned)

    def _is_tensor_op(self, node: fx.Node) -> bool:
        """Whether ``node`` computes a tensor from tensors (not ``x.size(0)``, ``x.shape[0]``, constants)."""
        if node.op == "call_method" and node.target in ("size", "dim"):
            return False
        if node.op == "call_function" and node.target is getattr:
            return False
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] not in self.names:
            return False  # x.shape[0]
        return bool(self._tensor_inputs(node))

    def _tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        """The tensor-valued nodes ``node`` reads (an inline normalisation reads what its sub reads)."""
        if node in self.normalized:
            sub = node.args[0]
            assert isinstance(sub, fx.Node)  # _inline_normalize only records a div of a sub node
            node = sub
        return [arg for arg in dict.fromkeys(node.all_input_nodes) if arg in self.names]

    def _layer(self, node: fx.Node) -> Layer:
        kind, module = self.kinds[node]
        users = []
        for user in node.users:
            user = self.subs.get(user, user)
            name = "output" if user.op == "output" else self.names.get(user)
            if name is not None and name not in users:
                users.append(name)
        reads = self._tensor_inputs(node)
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        meta = [arg.meta.get("tensor_meta") for arg in reads]
        shapes = None if any(m is None for m in meta) else tuple(tuple(m.shape) for m in meta if m is not None)
        out = node.meta.get("tensor_meta")
        return Layer(
            self.names[node],
            kind,
            target,
            module,
            tuple(self.names[arg] for arg in reads),
            tuple(users),
            shapes,
            tuple(out.shape) if out is not None and hasattr(out, "shape") else None,
            _source(node),
        )

    def _kind(self, node: fx.Node) -> tuple[str, nn.Module | None]:
        """(kind, module or equivalent module) of a tensor-valued node."""
        if node.op == "call_module":
            module = self.modules[node.target]
            for kind, types in _MODULE_KINDS:
                if isinstance(module, types):
                    return kind, module
            return "other", module
        target, args, kwargs = node.target, node.args, node.kwargs
        pool_args: tuple[Any, ...] = args[1:]  # fx arguments: the pooling module checks its own parameters
        pool_kwargs: dict[str, Any] = dict(kwargs)
        if node.op == "call_function":
            if target in (operator.add, torch.add) and len(args) == 2 and not kwargs and _all_nodes(args):
                return "add", None
            if target in (F.relu, torch.relu) and len(args) == 1:
                return "relu", nn.ReLU()
            if target is F.relu6 and len(args) == 1:
                return "relu6", nn.ReLU6()
            if target is F.max_pool2d and not kwargs.get("return_indices") and len(args) < 7:
                return "maxpool", nn.MaxPool2d(*pool_args, **_without(pool_kwargs, "return_indices"))
            if target is F.avg_pool2d:
                return "avgpool", nn.AvgPool2d(*pool_args, **pool_kwargs)
            if target is F.adaptive_avg_pool2d:
                return "adaptive_avgpool", nn.AdaptiveAvgPool2d(*pool_args, **pool_kwargs)
            if target is torch.flatten and _flattens(args[1:], kwargs):
                return "flatten", nn.Flatten()
            if target is torch.cat and _cat_dim(args, kwargs) == 1:
                return "cat", None
        if node.op == "call_method":
            if target == "relu" and len(args) == 1:
                return "relu", nn.ReLU()
            if target == "flatten" and _flattens(args[1:], kwargs):
                return "flatten", nn.Flatten()
            if target in ("view", "reshape") and self._batch_flatten(args):
                return "flatten", nn.Flatten()
        return "other", None

    def _batch_flatten(self, args: tuple) -> bool:
        """``x.view(x.size(0), -1)`` or ``x.reshape(x.shape[0], -1)``: flattening to (N, features)."""
        if len(args) != 3 or args[2] != -1 or not isinstance(args[1], fx.Node):
            return False
        size, x = args[1], args[0]
        if size.op == "call_method" and size.target == "size":
            return size.args == (x, 0)
        if size.op == "call_function" and size.target is operator.getitem and size.args[1] == 0:
            shape = size.args[0]
            return isinstance(shape, fx.Node) and shape.target is getattr and shape.args == (x, "shape")
        return False

    def _inline_normalize(self, div: fx.Node) -> Normalize | None:
        """``(x - mean) / std`` on the model input, with per-channel or scalar constants, as a Normalize."""
        sub = div.args[0]
        if not (
            isinstance(sub, fx.Node)
            and sub.op == "call_function"
            and sub.target is operator.sub
            and len(sub.users) == 1
        ):
            return None
        if not isinstance(sub.args[0], fx.Node) or sub.args[0].op != "placeholder":
            return None
        mean, std = self._constant(sub.args[1]), self._constant(div.args[1])
        if mean is None or std is None:
            return None
        channels = max(mean.numel(), std.numel())
        if mean.numel() not in (1, channels) or std.numel() not in (1, channels):
            return None
        mean, std = mean.expand(channels), std.expand(channels)
        if not bool(torch.all(std > 0)):
            return None
        self.subs[sub] = div
        return Normalize(mean.tolist(), std.tolist())

    def _constant(self, value: object) -> torch.Tensor | None:
        """A number, or a tensor attribute of one element or of shape (C, 1, 1) or (1, C, 1, 1), as (C,)."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return torch.tensor([float(value)])
        if not (isinstance(value, fx.Node) and value.op == "get_attr"):
            return None
        if not isinstance(value.target, str):
            return None
        tensor: object = self.model
        for part in value.target.split("."):
            tensor = getattr(tensor, part, None)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() > 4:
            return None
        flat = tensor.detach().flatten()  # a (C,) vector would broadcast over the width, not the channels
        per_channel = flat.numel() == 1 or (tensor.dim() >= 3 and flat.numel() == tensor.shape[-3])
        return flat.to(torch.get_default_dtype()) if per_channel else None


_MODULE_KINDS: tuple[tuple[str, type[nn.Module] | tuple[type[nn.Module], ...]], ...] = (
    ("normalize", Normalize),
    ("conv", nn.Conv2d),
    ("linear", nn.Linear),
    ("batchnorm", nn.BatchNorm2d),
    ("relu", nn.ReLU),
    ("relu6", nn.ReLU6),
    ("maxpool", nn.MaxPool2d),
    ("avgpool", nn.AvgPool2d),
    ("adaptive_avgpool", nn.AdaptiveAvgPool2d),
    ("flatten", nn.Flatten),
    ("identity", (nn.Identity, nn.Dropout)),
)


def _all_nodes(args: Sequence[object]) -> bool:
    return all(isinstance(arg, fx.Node) for arg in args)


def _without(kwargs: dict, key: str) -> dict:
    return {k: v for k, v in kwargs.items() if k != key}


def _flattens(args: tuple, kwargs: dict) -> bool:
    """Whether flatten's (start_dim, end_dim) keep the batch and flatten the rest."""
    start = args[0] if args else kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _cat_dim(args: tuple, kwargs: dict) -> int | None:
    if not args or not isinstance(args[0], (list, tuple)) or not _all_nodes(args[0]):
        return None
    return args[1] if len(args) > 1 else kwargs.get("dim", 0)


def _why_not(layer: Layer, technique: str) -> str | None:
    """Why ``technique`` cannot run ``layer``, or None if it can."""
    kinds = TECHNIQUES[technique]
    if kinds is None:
        return None
    if layer.kind in ("add", "cat") and technique == "bounds":
        return "joins two branches; the bounds need a single chain of layers"
    if layer.kind not in kinds:
        return "is not supported"
    module = layer.module
    if layer.kind == "conv" and isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"has groups={module.groups} (depthwise/grouped convs are not supported)"
        if module.dilation != (1, 1) or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "has dilation, string padding or a non-zero padding mode"
    if (
        layer.kind == "maxpool"
        and isinstance(module, nn.MaxPool2d)
        and (module.dilation not in (1, (1, 1)) or module.ceil_mode)
    ):
        return "has dilation or ceil_mode"
    if (
        layer.kind == "adaptive_avgpool"
        and isinstance(module, nn.AdaptiveAvgPool2d)
        and module.output_size not in (1, (1, 1))
    ):
        return f"has output size {module.output_size} (only global pooling, output size 1)"
    if (
        layer.kind == "batchnorm"
        and isinstance(module, nn.BatchNorm2d)
        and (not module.affine or not module.track_running_stats)
    ):
        return "has no affine parameters or running statistics to fold"
    return None


def check_supported(model: nn.Module, example_input: torch.Tensor | None, technique: str) -> Graph:
    """The graph of ``model`` if ``technique`` can run every one of its operations.

    ``technique`` is one of ``TECHNIQUES`` ("int8", "export", "bounds", "mixed", "admm", "prune").
    Called by each technique on entry, before any training or calibration. Raises QRobustError with
    one line (an UnsupportedModelError, also a ValueError) naming the first unsupported operation, why, and the line of ``forward`` that calls it.
    """
    if technique not in TECHNIQUES:
        raise QRobustError(f"technique must be one of {', '.join(TECHNIQUES)}, got {technique!r}")
    graph = trace(model, example_input)
    for layer in graph.layers:
        why = _why_not(layer, technique)
        if why is not None:
            kinds = TECHNIQUES[technique]
            raise UnsupportedModelError(
                f"cannot {_VERBS[technique]} {graph.model}: {layer.describe()} {why}; supported: {', '.join(sorted(kinds or ()))}"
            )
    return graph


def fold_normalize(
    weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the affine layer w((x - mean) / std) + b as one layer on raw x.

    W' = W / std and b' = b - W' mean per input channel; ``mean`` and ``std`` (C,) are per channel, and
    for a Linear reading flattened (C, H, W) features each statistic repeats over H*W. A conv with
    padding must then pad x with the means (the zero padding of the normalised input). Differentiable
    in ``weight`` and ``bias`` (QAT trains through it). Raises QRobustError if a Linear's features are
    not a multiple of the channels.
    """
    mean, std = mean.to(weight.dtype), std.to(weight.dtype)
    if weight.dim() == 2:  # Flatten put the channel outermost: each statistic repeats over H*W features
        if weight.shape[1] % mean.numel():
            raise QRobustError(
                f"a Linear reading {weight.shape[1]} normalised features: not a multiple of {mean.numel()} channels"
            )
        repeats = weight.shape[1] // mean.numel()
        mean, std = mean.repeat_interleave(repeats), std.repeat_interleave(repeats)
    view = (1, -1) + (1,) * (weight.dim() - 2)
    weight = weight / std.view(view)
    return weight, bias - (weight * mean.view(view)).flatten(1).sum(1)


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv -> BatchNorm2d (running statistics, eval mode) as one conv.

    scale = gamma / sqrt(var + eps); W' = W scale per output channel, b' = beta + (b - mean) scale.
    Differentiable in the weights and in gamma and beta (QAT trains through it).
    """
    running_mean, running_var = bn.running_mean, bn.running_var
    if not bn.track_running_stats or running_var is None or running_mean is None:
        raise QRobustError("cannot fold a BatchNorm2d without running statistics")
    # affine=True is what gives a BatchNorm its weight and bias
    gamma = bn.weight if bn.affine and bn.weight is not None else torch.ones_like(running_var)
    beta = bn.bias if bn.affine and bn.bias is not None else torch.zeros_like(running_var)
    scale = (gamma / torch.sqrt(running_var + bn.eps)).to(weight.dtype)  # (O,)
    bias = beta.to(bias.dtype) + (bias - running_mean.to(bias.dtype)) * scale
    return weight * scale.view(-1, *(1,) * (weight.dim() - 1)), bias
