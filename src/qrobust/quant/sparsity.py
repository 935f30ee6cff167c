"""Weight and channel sparsity of a model, and channel pruning that removes all-zero channels exactly.

Ternary and 4-bit weights (``qrobust.quant.lowbit``) put many weights at exactly zero; Li, Wang and Xin,
"An Integrated Approach to Produce Robust Deep Neural Network Models with High Efficiency" (2021,
section 5, Table 5) report the fraction of zero conv weights and of conv output channels that are
entirely zero, and the model size once those channels are pruned. This module measures both and does
the pruning.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.graph import Graph, Layer, check_supported, trace


@dataclass(frozen=True)
class SparsityReport:
    """Counts of exactly-zero weights (biases excluded) and all-zero output channels.

    ``zero_weights``/``total_weights`` and the channels count nn.Conv2d layers only (shortcut 1x1 convs
    included), as the paper's Table 5 does; ``linear_zero_weights``/``linear_total_weights`` count
    nn.Linear layers separately. A channel is zero when all its weights are, whatever its bias.
    """

    zero_weights: int
    total_weights: int
    zero_channels: int
    total_channels: int
    linear_zero_weights: int
    linear_total_weights: int

    @property
    def weight_sparsity(self) -> float:
        """Fraction of conv weights that are zero (0.0 without convs)."""
        return self.zero_weights / self.total_weights if self.total_weights else 0.0

    @property
    def channel_sparsity(self) -> float:
        """Fraction of conv output channels whose weights are all zero (0.0 without convs)."""
        return self.zero_channels / self.total_channels if self.total_channels else 0.0

    @property
    def linear_sparsity(self) -> float:
        """Fraction of linear weights that are zero (0.0 without linear layers)."""
        return self.linear_zero_weights / self.linear_total_weights if self.linear_total_weights else 0.0


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Zero weights and zero output channels of every Conv2d, and zero weights of every Linear, in ``model``."""
    counts = dict.fromkeys((field.name for field in fields(SparsityReport)), 0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                zero = module.weight == 0  # (O, I, kh, kw)
                counts["zero_weights"] += int(zero.sum())
                counts["total_weights"] += zero.numel()
                counts["zero_channels"] += int(zero.flatten(1).all(1).sum())
                counts["total_channels"] += zero.shape[0]
            elif isinstance(module, nn.Linear):
                counts["linear_zero_weights"] += int((module.weight == 0).sum())
                counts["linear_total_weights"] += module.weight.numel()
    return SparsityReport(**counts)


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero conv weights in ``model`` (see ``sparsity_report`` for counts and linear layers)."""
    return sparsity_report(model).weight_sparsity


def channel_sparsity(model: nn.Module) -> float:
    """Fraction of conv output channels of ``model`` whose weights are all zero (see ``sparsity_report``)."""
    return sparsity_report(model).channel_sparsity


class ConstantInputConv2d(nn.Module):
    """A conv whose removed input channels were constant maps: adds their exact contribution back.

    A removed channel j that carried the constant c_j added conv(c_j * 1, W[:, j]) to the output, which
    with zero padding is not constant (border positions see fewer taps). Its sum over the removed
    channels is the conv of an all-ones image with ``kernel`` = sum_j c_j W[:, j], which we compute
    for the input's size on every call: one input channel, batch 1, so it costs little. ``kernel`` is a
    buffer, not a parameter: it is derived from the pruned model and is not trained.

    Shapes: (N, C, H, W) -> (N, O, OH, OW).
    """

    kernel: torch.Tensor

    def __init__(self, conv: nn.Conv2d, kernel: torch.Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("kernel", kernel)  # (O, 1, kh, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = x.new_ones(1, 1, *x.shape[-2:])  # (1, 1, H, W)
        constant = F.conv2d(ones, self.kernel, None, self.conv.stride, self.conv.padding, self.conv.dilation)
        return self.conv(x) + constant  # (N, O, OH, OW) + (1, O, OH, OW)


@dataclass(frozen=True)
class PruneDecision:
    """What ``prune_channels`` does with one Conv2d's output channels.

    ``removed`` counts the all-zero channels it removes (0 when none or when the layer is left as it
    is); ``reason`` says why the layer is left as it is (None when it can be pruned).
    """

    layer: str
    removed: int
    reason: str | None


@dataclass(frozen=True)
class _Chain:
    """Output channels of the conv ``producer`` reach only ``consumer`` (a conv, or a Linear after a
    flatten), through the per-channel layers ``between``, so they can be removed from both."""

    producer: str
    between: tuple[Layer, ...]
    consumer: str


# Layers that map each channel to itself and a constant channel to a constant one (in eval mode).
_PER_CHANNEL = ("batchnorm", "relu", "relu6", "maxpool", "adaptive_avgpool", "identity", "flatten")


def pruning_report(model: nn.Module) -> tuple[PruneDecision, ...]:
    """For every Conv2d of ``model`` in call order: how many all-zero channels ``prune_channels`` removes,
    or why it leaves the layer as it is (read from the data flow of ``qrobust.graph``)."""
    with torch.no_grad():
        return tuple(decision for decision, _ in _plan_all(model, trace(model)))


def prune_channels(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without its all-zero conv output channels, computing the same outputs in eval mode.

    A conv output channel whose weights are all zero outputs its bias b (0 without bias), so after the
    per-channel layers up to the next layer it is a constant c (e.g. relu(BN(b)) with BN's running
    statistics; the running mean is not assumed to be 0). It is removed from the conv (and the
    BatchNorm), together with the next layer's matching inputs; if c != 0 its contribution is kept
    exactly: folded into the bias of a next Linear (the channel's block of flattened, channel-major
    features), or added by ``ConstantInputConv2d`` around a next conv (where zero padding makes it
    position dependent).

    The data flow (``qrobust.graph``) decides: a channel is removed only when every reader of it can
    drop it, i.e. the conv's output reaches exactly one conv (groups=1, zero padding) or one Linear
    after a flatten, through layers that act per channel (BatchNorm2d, ReLU, ReLU6, max pooling,
    average pooling without padding, Identity/Dropout, flatten) and that nothing else reads. Otherwise (residual
    streams, tensors read twice, grouped convs, ...) the layer is left as it is, and
    ``pruning_report`` says why. At least one channel of each conv stays, since PyTorch has no
    zero-channel convs. Prune once: a folded conv is not pruned again.

    Measure the gain with ``qrobust.models.count_parameters`` (trainable parameters; the folded kernels
    are buffers of O x kh x kw values each) and ``sparsity_report``. ``model`` is left unchanged.
    """
    pruned = copy.deepcopy(model)
    graph = check_supported(pruned, None, "prune")
    with torch.no_grad():
        chains = [chain for decision, chain in _plan_all(pruned, graph) if decision.removed and chain is not None]
        # Plan on the unmodified copy: which channels go, and what constant each carried.
        plans = [(chain, *_plan(pruned, chain)) for chain in chains]
        # Remove output channels first, then inputs, so a conv that is both (CNN.conv2) has its rows
        # sliced before its removed inputs are folded into a kernel with the remaining rows.
        for chain, keep, _ in plans:
            _keep_outputs(cast(nn.Conv2d, pruned.get_submodule(chain.producer)), keep)
            for layer in chain.between:
                if layer.kind == "batchnorm":
                    _keep_batchnorm(cast(nn.BatchNorm2d, pruned.get_submodule(layer.target)), keep)
        for chain, keep, constants in plans:
            _drop_inputs(pruned, chain, keep, constants)
    return pruned


def _plan_all(model: nn.Module, graph: Graph) -> list[tuple[PruneDecision, _Chain | None]]:
    """Each conv's decision and, where it can be pruned, its chain."""
    result: list[tuple[PruneDecision, _Chain | None]] = []
    for layer in graph.layers:
        if layer.kind != "conv" or layer.name != layer.target:
            continue
        chain = _chain(graph, layer)
        if isinstance(chain, str):
            result.append((PruneDecision(layer.name, 0, chain), None))
            continue
        keep, _ = _plan(model, chain)
        result.append((PruneDecision(layer.name, int((~keep).sum()), None), chain))
    return result


def _chain(graph: Graph, producer: Layer) -> _Chain | str:
    """The chain from ``producer`` to the one layer that reads its channels, or why there is none."""
    producer_conv = cast(nn.Conv2d, producer.module)  # a layer of kind "conv"
    if producer_conv.groups != 1:
        return f"it has groups={producer_conv.groups}"
    if sum(layer.target == producer.target for layer in graph.layers) > 1:
        return "it is called more than once"
    between: list[Layer] = []
    current = producer
    while True:
        if "output" in current.users:
            return f"the model returns {current.name}'s output"
        readers = graph.readers(current.name)
        if len(readers) != 1:
            names = ", ".join(reader.name for reader in readers)
            return f"{current.name}'s output is read by {len(readers)} layers ({names}); each must drop the channel"
        reader = readers[0]
        if reader.inputs != (current.name,):
            return f"{reader.describe()} also reads other tensors, whose channels would have to go too"
        if reader.kind in _PER_CHANNEL or (
            reader.kind == "avgpool" and cast(nn.AvgPool2d, reader.module).padding in (0, (0, 0))
        ):
            bn = cast(nn.BatchNorm2d, reader.module) if reader.kind == "batchnorm" else None
            if bn is not None and (bn.running_mean is None or reader.name != reader.target):
                return f"{reader.describe()} has no running statistics or is called more than once"
            between.append(reader)
            current = reader
            continue
        flattened = any(layer.kind == "flatten" for layer in between)
        if reader.name != reader.target:
            return f"{reader.describe()} is called more than once"
        module = reader.module
        conv_ok = isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
        if reader.kind == "conv" and not flattened and conv_ok:
            return _Chain(producer.name, tuple(between), reader.name)
        linear_ok = isinstance(module, nn.Linear) and module.in_features % producer_conv.out_channels == 0
        if reader.kind == "linear" and flattened and linear_ok:
            return _Chain(producer.name, tuple(between), reader.name)
        return f"its channels reach {reader.describe()}, which cannot drop them"


def _plan(model: nn.Module, chain: _Chain) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, constants): the producer's channels to keep (C,) bool, and each channel's constant value
    after the in-between layers if its weights are all zero (C,)."""
    producer = cast(nn.Conv2d, model.get_submodule(chain.producer))
    keep = producer.weight.flatten(1).ne(0).any(1)  # (C,)
    if not keep.any():
        keep[0] = True
    value = producer.bias.detach().clone() if producer.bias is not None else producer.weight.new_zeros(len(keep))
    for layer in chain.between:
        module = layer.module
        if isinstance(module, nn.BatchNorm2d):  # layer.kind == "batchnorm"
            value = F.batch_norm(
                value[None], module.running_mean, module.running_var, module.weight, module.bias, False, 0.0, module.eps
            )[0]
        elif layer.kind in ("relu", "relu6") and module is not None:
            value = module(value)
        # Pooling, identity and flatten keep a constant channel constant.
    return keep, value


def _replaced(old: torch.Tensor, data: torch.Tensor) -> nn.Parameter:
    """A new parameter holding a copy of ``data``, trainable if ``old`` was."""
    return nn.Parameter(data.clone(), requires_grad=old.requires_grad)


def _keep_outputs(conv: nn.Conv2d, keep: torch.Tensor) -> None:
    conv.weight = _replaced(conv.weight, conv.weight[keep])  # (O', I, kh, kw)
    if conv.bias is not None:
        conv.bias = _replaced(conv.bias, conv.bias[keep])
    conv.out_channels = int(keep.sum())


def _keep_batchnorm(bn: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    if bn.affine:
        bn.weight = _replaced(bn.weight, bn.weight[keep])
        bn.bias = _replaced(bn.bias, bn.bias[keep])
    running_mean, running_var = bn.running_mean, bn.running_var
    assert running_mean is not None and running_var is not None  # _chain keeps only BatchNorms with statistics
    bn.running_mean = running_mean[keep].clone()
    bn.running_var = running_var[keep].clone()
    bn.num_features = int(keep.sum())


def _drop_inputs(model: nn.Module, chain: _Chain, keep: torch.Tensor, constants: torch.Tensor) -> None:
    """Remove the consumer's inputs from the dropped channels, keeping their constants' contribution."""
    consumer = model.get_submodule(chain.consumer)
    drop = ~keep
    constants = torch.where(drop, constants, 0.0)  # (C,) what the removed channels carried
    if isinstance(consumer, nn.Conv2d):
        kernel = torch.einsum("oihw,i->ohw", consumer.weight, constants)[:, None]  # (O, 1, kh, kw)
        consumer.weight = _replaced(consumer.weight, consumer.weight[:, keep])  # (O, C', kh, kw)
        consumer.in_channels = int(keep.sum())
        if constants.any():
            parent, _, child = chain.consumer.rpartition(".")
            setattr(model.get_submodule(parent), child, ConstantInputConv2d(consumer, kernel))
        return
    consumer = cast(nn.Linear, consumer)  # a chain ends at a conv or a Linear
    weight = consumer.weight.view(consumer.out_features, len(keep), -1)  # (O, C, H*W) channel-major
    if constants.any():
        if consumer.bias is None:
            consumer.bias = _replaced(consumer.weight, consumer.weight.new_zeros(consumer.out_features))
        consumer.bias.add_(weight.sum(2) @ constants)  # (O,)
    consumer.weight = _replaced(consumer.weight, weight[:, keep].flatten(1))  # (O, C' * H*W)
    consumer.in_features = consumer.weight.shape[1]
