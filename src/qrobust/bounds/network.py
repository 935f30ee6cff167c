"""A feed-forward ReLU network as a plain chain of ops, read from a qrobust model, for bounding.

Normalize is folded into the first affine layer and BatchNorm into the conv before it, so the chain
reads [0, 1] images and holds exactly the weights whose perturbation is certified (``qrobust.graph``'s
folding, the same that ``qrobust.quant`` quantizes). The model is read through ``qrobust.graph``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import UnsupportedModelError
from qrobust.graph import check_supported, fold_batchnorm, fold_normalize
from qrobust.models.layers import Normalize


@dataclass(frozen=True, eq=False)
class Affine:
    """A Linear (weight (O, I)) or Conv2d (weight (O, C, kh, kw)) layer with its bias (O,).

    ``pad_value`` (C,) is what a conv pads its input with (None: zeros); a first conv with Normalize
    folded in pads the raw image with the channel means, which is zero padding after normalisation.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    pad_value: torch.Tensor | None = None

    @property
    def is_conv(self) -> bool:
        return self.weight.dim() == 4

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The layer on ``x`` with its own weight and bias, or the given ones."""
        return self.core(self.pad(x), weight, bias)

    def core(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The layer on an already padded input (see ``pad``)."""
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        if not self.is_conv:
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, self.stride)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """A conv's input padded explicitly (N, C, H + 2ph, W + 2pw); a Linear's input unchanged."""
        if not self.is_conv or not any(self.padding):
            return x
        (ph, pw), (n, c, h, _) = self.padding, x.shape
        value = (x.new_zeros(c) if self.pad_value is None else self.pad_value.to(x.dtype)).view(1, c, 1, 1)
        rows = value.expand(n, c, ph, x.shape[3])
        x = torch.cat([rows, x, rows], 2)  # out of place, so it also works under torch.func.vmap
        columns = value.expand(n, c, h + 2 * ph, pw)
        return torch.cat([columns, x, columns], 3)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The inputs each output position reads, of an already padded input: (N, C*kh*kw, P) for a conv,
        (N, I, 1) for a Linear."""
        if not self.is_conv:
            return x.unsqueeze(-1)
        return F.unfold(x, self.weight.shape[2:], stride=self.stride)

    def to(self, dtype: torch.dtype) -> Affine:
        pad_value = None if self.pad_value is None else self.pad_value.to(dtype)
        return replace(self, weight=self.weight.to(dtype), bias=self.bias.to(dtype), pad_value=pad_value)

    def describe(self) -> str:
        if self.is_conv:
            return (
                f"Conv2d {self.weight.shape[1]}->{self.weight.shape[0]} {self.weight.shape[2]}x{self.weight.shape[3]}"
            )
        return f"Linear {self.weight.shape[1]}->{self.weight.shape[0]}"


@dataclass(frozen=True)
class MaxPool:
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)


class ReLU:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)

    def __repr__(self) -> str:
        return "ReLU()"


class Flatten:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def __repr__(self) -> str:
        return "Flatten()"


Op = Affine | MaxPool | ReLU | Flatten


class ReluNetwork:
    """A chain of ops (Affine, ReLU, MaxPool, Flatten) ending in a Linear layer that gives the logits.

    ``layers[k]`` is the k-th affine layer (the k-th Linear/Conv2d of the model in forward order) and
    ``names[k]`` its qualified module name (``layer0``, ``layer1``, ... when built from bare ops).
    Shapes: (N, C, H, W) floats in [0, 1] -> logits (N, num_classes).
    """

    def __init__(self, ops: Sequence[Op], names: Sequence[str] | None = None) -> None:
        self.ops = tuple(ops)
        if not self.ops or not isinstance(self.ops[-1], Affine) or self.ops[-1].is_conv:
            raise ValueError(f"a ReluNetwork must end in a Linear layer (the logits), got ops {self.ops!r}")
        self.positions = tuple(i for i, op in enumerate(self.ops) if isinstance(op, Affine))  # op index of layer k
        self.layers: tuple[Affine, ...] = tuple(op for op in self.ops if isinstance(op, Affine))
        self.names = tuple(names) if names is not None else tuple(f"layer{k}" for k in range(len(self.layers)))
        if len(self.names) != len(self.layers):
            raise ValueError(f"names has {len(self.names)} entries for {len(self.layers)} affine layers")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].weight.dtype

    def to(self, dtype: torch.dtype) -> ReluNetwork:
        """A copy with every tensor in ``dtype`` (bounds are usually computed in float64)."""
        return ReluNetwork([op.to(dtype) if isinstance(op, Affine) else op for op in self.ops], self.names)

    def replace_layer(self, k: int, layer: Affine) -> ReluNetwork:
        ops = list(self.ops)
        ops[self.positions[k]] = layer
        return ReluNetwork(ops, self.names)

    def check_layer(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_layers:
            raise ValueError(f"layer must be an integer in [0, {self.num_layers - 1}], got {k!r}")

    def forward(
        self,
        images: torch.Tensor,
        weights: Mapping[int, torch.Tensor] | None = None,
        biases: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits (N, classes) of [0, 1] images, with layer k's weight replaced by ``weights[k]`` if given.

        Works under ``torch.func.vmap`` over batched replacement weights (soundness tests, attacks).
        """
        weights, biases = weights or {}, biases or {}
        x = images
        layer = 0
        for op in self.ops:
            if isinstance(op, Affine):
                x = op(x, weights.get(layer), biases.get(layer))
                layer += 1
            else:
                x = op(x)
        return x

    __call__ = forward

    @torch.no_grad()
    def layer_input(self, images: torch.Tensor, k: int) -> torch.Tensor:
        """The exact value layer k reads (nothing before it perturbed). Shapes: (N, C, H, W) -> layer k's input."""
        x = images
        for op in self.ops[: self.positions[k]]:
            x = op(x)
        return x

    @classmethod
    def from_model(cls, model: nn.Module, dtype: torch.dtype = torch.float64) -> ReluNetwork:
        """The chain of ``model`` (``mlp``, ``cnn`` or any model made of the supported layers, in order).

        Normalize (which must read the model input) is folded into the first affine layer, W / std and
        b - W mean / std, and BatchNorm2d (running statistics) into the conv it follows. Tensors are
        copied in ``dtype`` (default float64, so rounding in the bounds is negligible).
        Read through ``qrobust.graph``; raises UnsupportedModelError (a ValueError) naming the first
        operation that is not supported and its line in ``forward``, or a model that is not a chain.
        """
        graph = check_supported(model, None, "bounds")
        ops: list[Op] = []
        names: list[str] = []
        normalize: Normalize | None = None
        current = graph.input
        for layer in graph.layers:
            if layer.inputs != (current,):
                raise UnsupportedModelError(
                    f"cannot bound {graph.model}: {layer.describe()} is not part of a single chain of layers"
                )
            if normalize is not None and layer.kind not in ("flatten", "identity", "conv", "linear"):
                raise UnsupportedModelError(
                    f"cannot bound {graph.model}: Normalize must be read by the first Linear/Conv2d, not {layer.describe()}"
                )
            module = layer.module  # of the class its kind names (graph's _MODULE_KINDS)
            if layer.kind == "normalize":
                if ops:
                    raise UnsupportedModelError(
                        f"cannot bound {graph.model}: Normalize must be the first layer, not {layer.describe()}"
                    )
                normalize = cast(Normalize, module)
            elif layer.kind in ("conv", "linear"):
                ops.append(_affine(cast(nn.Conv2d | nn.Linear, module), normalize))
                names.append(layer.name)
                normalize = None
            elif layer.kind == "batchnorm":
                if not ops or not isinstance(ops[-1], Affine) or not ops[-1].is_conv:
                    raise UnsupportedModelError(
                        f"cannot bound {graph.model}: {layer.describe()} does not follow a Conv2d"
                    )
                weight, bias = fold_batchnorm(ops[-1].weight, ops[-1].bias, cast(nn.BatchNorm2d, module))
                ops[-1] = replace(ops[-1], weight=weight.detach(), bias=bias.detach())
            elif layer.kind == "relu":
                ops.append(ReLU())
            elif layer.kind == "flatten":
                ops.append(Flatten())
            elif layer.kind == "maxpool":
                pool = cast(nn.MaxPool2d, module)
                ops.append(
                    MaxPool(_pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding))
                )
            current = layer.name
        if graph.output != current:
            raise UnsupportedModelError(f"cannot bound {graph.model}: it does not return its last layer's output")
        return cls([op.to(dtype) if isinstance(op, Affine) else op for op in ops], names)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _affine(module: nn.Conv2d | nn.Linear, normalize: Normalize | None) -> Affine:
    """The Affine of a Linear/Conv2d module, with ``normalize`` folded in if it reads the normalised image."""
    weight = module.weight.detach().clone()
    bias = module.bias.detach().clone() if module.bias is not None else weight.new_zeros(weight.shape[0])
    if normalize is not None:
        weight, bias = fold_normalize(weight, bias, normalize.mean.detach(), normalize.std.detach())
    if not isinstance(module, nn.Conv2d):
        return Affine(weight, bias)
    pad_value = None if normalize is None else normalize.mean.detach().clone()  # zero padding after normalising
    padding = cast(tuple[int, int], module.padding)  # check_supported refuses string padding
    return Affine(weight, bias, _pair(module.stride), _pair(padding), pad_value)


def as_unit_images(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[0, 1] floats (N, C, H, W) in ``dtype``: uint8 lattice images are divided by 255; floats must lie in [0, 1]."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a tensor (N, C, H, W), got {getattr(images, 'shape', type(images))}")
    if images.dtype == torch.uint8:
        return images.to(dtype) / 255
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 lattice values or floats in [0, 1], got {images.dtype}")
    if images.numel() and not (images.min() >= 0 and images.max() <= 1):
        raise ValueError(
            f"float images must lie in [0, 1], got values in [{float(images.min()):.4g}, {float(images.max()):.4g}]"
        )
    return images.to(dtype)
