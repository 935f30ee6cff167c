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

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.models.cnn import CNN


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

    def __init__(self, conv: nn.Conv2d, kernel: torch.Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("kernel", kernel)  # (O, 1, kh, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = x.new_ones(1, 1, *x.shape[-2:])  # (1, 1, H, W)
        constant = F.conv2d(ones, self.kernel, None, self.conv.stride, self.conv.padding, self.conv.dilation)
        return self.conv(x) + constant  # (N, O, OH, OW) + (1, O, OH, OW)


@dataclass(frozen=True)
class _Chain:
    """Output channels of ``parent.<producer>`` reach only ``parent.<consumer>``, through the per-channel
    modules ``between`` (BatchNorm2d, ReLU, MaxPool2d, Flatten), so they can be removed from both."""

    parent: nn.Module
    producer: str
    between: tuple[str, ...]
    consumer: str


# Residual blocks (BasicBlock and look-alikes, e.g. in EnResNet members): conv1 -> bn1 -> relu1 -> conv2.
_BLOCK = ("conv1", ("bn1", "relu1"), "conv2")
# The CNN: conv1 -> relu1 -> pool1 -> conv2, and conv2 -> relu2 -> pool2 -> flatten -> fc1.
_CNN = (("conv1", ("relu1", "pool1"), "conv2"), ("conv2", ("relu2", "pool2", "flatten"), "fc1"))


def prune_channels(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without its all-zero conv output channels, computing the same outputs in eval mode.

    A conv output channel whose weights are all zero outputs its bias b (0 without bias), so after the
    modules up to the next layer it is a constant c = relu(BN(b)) (BN with its running statistics; the
    running mean is not assumed to be 0). It is removed from the conv (and the BatchNorm), together with
    the next layer's matching inputs; if c != 0 its contribution is kept exactly: folded into the bias of
    a next Linear (the channel's block of flattened, channel-major features), or added by
    ``ConstantInputConv2d`` around a next conv (where zero padding makes it position dependent).

    Pruned, where the structure guarantees that the channel feeds nothing else:
    - in every module with ``conv1`` (Conv2d) -> ``bn1`` (BatchNorm2d, running stats) -> ``relu1`` (ReLU)
      -> ``conv2`` (Conv2d) attributes, i.e. ``BasicBlock``: whose forward must compute
      conv2(relu1(bn1(conv1(x)))) with nothing else reading or changing that path;
    - in ``CNN``: conv1 -> conv2 inputs, and conv2 -> fc1 inputs.
    Next convs must have groups=1 and zero padding. Not pruned: channels of the residual stream (the
    stem conv, conv2 of blocks, shortcuts), which are added to other blocks' outputs, so removing one
    needs the whole stream's channel set to agree; and Linear layers. At least one channel of each conv
    stays, since PyTorch has no zero-channel convs. Prune once: a folded conv is not pruned again.

    Measure the gain with ``qrobust.models.count_parameters`` (trainable parameters; the folded kernels
    are buffers of O x kh x kw values each) and ``sparsity_report``. ``model`` is left unchanged.
    """
    pruned = copy.deepcopy(model)
    chains = [chain for module in pruned.modules() for chain in _chains(module)]
    with torch.no_grad():
        # Plan on the unmodified copy: which channels go, and what constant each carried.
        plans = []
        for chain in chains:
            keep, constants = _plan(chain)
            if not keep.all():
                plans.append((chain, keep, constants))
        # Remove output channels first, then inputs, so a conv that is both (CNN.conv2) has its rows
        # sliced before its removed inputs are folded into a kernel with the remaining rows.
        for chain, keep, _ in plans:
            _keep_outputs(getattr(chain.parent, chain.producer), keep)
            for name in chain.between:
                if isinstance(getattr(chain.parent, name), nn.BatchNorm2d):
                    _keep_batchnorm(getattr(chain.parent, name), keep)
        for chain, keep, constants in plans:
            _drop_inputs(chain, keep, constants)
    return pruned


def _chains(module: nn.Module) -> list[_Chain]:
    """The prunable chains whose modules are attributes of ``module``."""
    specs = _CNN if isinstance(module, CNN) else (_BLOCK,)
    chains = [_Chain(module, producer, between, consumer) for producer, between, consumer in specs]
    return [chain for chain in chains if _prunable(chain)]


def _prunable(chain: _Chain) -> bool:
    """Whether the chain's modules have the types and settings that make channel removal exact."""
    producer = getattr(chain.parent, chain.producer, None)
    consumer = getattr(chain.parent, chain.consumer, None)
    between = [getattr(chain.parent, name, None) for name in chain.between]
    if not (isinstance(producer, nn.Conv2d) and producer.groups == 1):
        return False
    for module in between:
        if isinstance(module, nn.BatchNorm2d):
            if module.running_mean is None:  # batch statistics even in eval mode: not a per-channel constant
                return False
        elif not isinstance(module, (nn.ReLU, nn.MaxPool2d, nn.Flatten)):
            return False
    if isinstance(consumer, nn.Conv2d):
        return consumer.groups == 1 and consumer.padding_mode == "zeros"
    return isinstance(consumer, nn.Linear) and consumer.in_features % producer.out_channels == 0


def _plan(chain: _Chain) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, constants): the producer's channels to keep (C,) bool, and each channel's constant value
    after the in-between modules if its weights are all zero (C,)."""
    producer: nn.Conv2d = getattr(chain.parent, chain.producer)
    keep = producer.weight.flatten(1).ne(0).any(1)  # (C,)
    if not keep.any():
        keep[0] = True
    value = producer.bias.detach().clone() if producer.bias is not None else producer.weight.new_zeros(len(keep))
    for name in chain.between:
        module = getattr(chain.parent, name)
        if isinstance(module, nn.BatchNorm2d):
            value = F.batch_norm(
                value[None], module.running_mean, module.running_var, module.weight, module.bias, False, 0.0, module.eps
            )[0]
        elif isinstance(module, nn.ReLU):
            value = F.relu(value)
        # MaxPool2d and Flatten keep a constant channel constant.
    return keep, value


def _replaced(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
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
    bn.running_mean = bn.running_mean[keep].clone()
    bn.running_var = bn.running_var[keep].clone()
    bn.num_features = int(keep.sum())


def _drop_inputs(chain: _Chain, keep: torch.Tensor, constants: torch.Tensor) -> None:
    """Remove the consumer's inputs from the dropped channels, keeping their constants' contribution."""
    consumer = getattr(chain.parent, chain.consumer)
    drop = ~keep
    constants = torch.where(drop, constants, 0.0)  # (C,) what the removed channels carried
    if isinstance(consumer, nn.Conv2d):
        kernel = torch.einsum("oihw,i->ohw", consumer.weight, constants)[:, None]  # (O, 1, kh, kw)
        consumer.weight = _replaced(consumer.weight, consumer.weight[:, keep])  # (O, C', kh, kw)
        consumer.in_channels = int(keep.sum())
        if constants.any():
            setattr(chain.parent, chain.consumer, ConstantInputConv2d(consumer, kernel))
        return
    weight = consumer.weight.view(consumer.out_features, len(keep), -1)  # (O, C, H*W) channel-major
    if constants.any():
        if consumer.bias is None:
            consumer.bias = _replaced(consumer.weight, consumer.weight.new_zeros(consumer.out_features))
        consumer.bias += weight.sum(2) @ constants  # (O,)
    consumer.weight = _replaced(consumer.weight, weight[:, keep].flatten(1))  # (O, C' * H*W)
    consumer.in_features = consumer.weight.shape[1]
