"""Tests for qrobust.quant.sparsity: exact sparsity counts, and channel pruning that keeps outputs identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qrobust.models import BasicBlock, CifarResNet, build_model, count_parameters
from qrobust.quant.lowbit import WeightQuantizer
from qrobust.quant.sparsity import (
    ConstantInputConv2d,
    SparsityReport,
    channel_sparsity,
    prune_channels,
    pruning_report,
    sparsity_report,
    weight_sparsity,
)

from .conftest import fit_batchnorm, lattice_images, make_info


def inputs(shape: tuple[int, int, int], seed: int = 5, n: int = 8) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def assert_same_outputs(model: nn.Module, pruned: nn.Module, x: torch.Tensor) -> None:
    model.eval(), pruned.eval()
    with torch.no_grad():
        expected, got = model(x), pruned(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# --- sparsity counts -----------------------------------------------------------------------------


def test_sparsity_report_counts_hand_built_weights_exactly() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        for module in model:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.fill_(0.5)
                module.bias.fill_(1.0)  # biases neither count as weights nor keep a channel alive
        model[0].weight[1] = 0  # a zero channel: 18 zero weights
        model[0].weight[0, 0, :2, 2] = 0  # 2 scattered zeros (+ 1 that is -0.0)
        model[0].weight[2, 1, 1, 1] = -0.0
        model[1].weight[2] = 0  # a zero channel: 3 zero weights
        model[1].weight[0, 1] = 0  # 1 scattered zero
        model[3].weight[0, :3] = 0  # 3 zero linear weights
    report = sparsity_report(model)
    assert report == SparsityReport(
        zero_weights=18 + 3 + 3 + 1,
        total_weights=54 + 12,
        zero_channels=2,
        total_channels=7,
        linear_zero_weights=3,
        linear_total_weights=8,
    )
    assert report.weight_sparsity == weight_sparsity(model) == 25 / 66
    assert report.channel_sparsity == channel_sparsity(model) == 2 / 7
    assert report.linear_sparsity == 3 / 8


def test_sparsity_of_a_model_without_convs_is_zero_not_an_error() -> None:
    report = sparsity_report(build_model("mlp", make_info((1, 4, 4))))
    assert report.total_channels == 0 and report.weight_sparsity == report.channel_sparsity == 0.0


# --- pruning: CNN --------------------------------------------------------------------------------


def cnn_with_zero_channels(constant: bool) -> nn.Module:
    """CNN with zero channels 0, 3, 5 of conv1 and 1, 2 of conv2; ``constant``: some carry relu(bias) > 0."""
    torch.manual_seed(0)
    model = build_model("cnn", make_info((1, 12, 12))).eval()
    with torch.no_grad():
        model.conv1.weight[[0, 3, 5]] = 0
        model.conv1.bias[[0, 3, 5]] = torch.tensor([0.3 if constant else -0.1, -0.2, 0.0])
        model.conv2.weight[[1, 2]] = 0
        model.conv2.bias[[1, 2]] = torch.tensor([0.5 if constant else 0.0, -1.0])
    return model


@pytest.mark.parametrize("constant", [True, False])
def test_pruning_the_cnn_keeps_outputs_and_removes_exactly_the_zero_channels(constant: bool) -> None:
    model = cnn_with_zero_channels(constant)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    pruned = prune_channels(model)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())  # a copy
    assert_same_outputs(model, pruned, inputs((1, 12, 12)))

    conv2 = pruned.conv2.conv if constant else pruned.conv2
    assert isinstance(pruned.conv2, ConstantInputConv2d) == constant  # only a non-zero constant needs folding
    assert (pruned.conv1.out_channels, conv2.in_channels, conv2.out_channels) == (29, 29, 62)
    assert pruned.fc1.in_features == 62 * 3 * 3
    spatial = 3 * 3  # fc1 reads 64 blocks of 3x3 features
    removed = (
        3 * (1 * 9 + 1)  # conv1 rows and biases
        + 3 * 64 * 9  # conv2 columns of the removed conv1 channels
        + 2 * (29 * 9 + 1)  # conv2 rows (of the remaining columns) and biases
        + 2 * spatial * 128  # fc1 columns
    )
    assert count_parameters(model) - count_parameters(pruned) == removed
    assert sparsity_report(pruned).zero_channels == 0


# --- pruning: ResNets ----------------------------------------------------------------------------


def resnet(depth: int, seed: int) -> CifarResNet:
    """A ResNet with BatchNorm statistics measured on images, so running means are far from 0."""
    torch.manual_seed(seed)
    model = CifarResNet(make_info((3, 8, 8)), depth=depth)
    fit_batchnorm(model, lattice_images(64, (3, 8, 8), seed=seed), seed=seed)
    return model


def zero_channel(block: BasicBlock, channel: int, alive: bool) -> float:
    """Zero conv1's output channel and set its BN bias so that relu(BN(0)) is > 0 (alive) or 0; return it."""
    bn = block.bn1
    with torch.no_grad():
        block.conv1.weight[channel] = 0
        shift = bn.weight[channel] * bn.running_mean[channel] / torch.sqrt(bn.running_var[channel] + bn.eps)
        bn.bias[channel] = shift + (0.7 if alive else -0.7)
        return float(torch.relu(bn.bias[channel] - shift))


def test_pruning_a_resnet_folds_live_constant_channels_and_drops_dead_ones() -> None:
    model = resnet(20, seed=0)
    plan = [  # (block, zeroed channels, whether relu(BN(0)) > 0): a block of each stage
        (model.layer1[0], [0, 5], [True, False]),
        (model.layer2[1], [3], [False]),
        (model.layer3[2], [1, 2, 63], [True, True, False]),
    ]
    for block, channels, alive in plan:
        constants = [zero_channel(block, c, a) for c, a in zip(channels, alive)]
        assert [c > 0 for c in constants] == alive
        assert float(block.bn1.running_mean[channels].abs().min()) > 1e-3  # not assumed to be 0
    pruned = prune_channels(model)
    assert_same_outputs(model, pruned, inputs((3, 8, 8)))

    expected = 0
    for (block, channels, alive), name in zip(plan, ["layer1.0", "layer2.1", "layer3.2"]):
        new = pruned.get_submodule(name)
        assert isinstance(new.conv2, ConstantInputConv2d) == any(alive)
        assert new.conv1.out_channels == new.bn1.num_features == block.conv1.out_channels - len(channels)
        expected += len(channels) * (block.conv1.in_channels * 9 + 2 + block.conv2.out_channels * 9)
    assert count_parameters(model) - count_parameters(pruned) == expected
    assert sparsity_report(model).zero_channels - sparsity_report(pruned).zero_channels == 6


def test_residual_stream_channels_are_left_alone_and_one_channel_always_stays() -> None:
    model = resnet(8, seed=1)
    block = model.layer2[0]
    with torch.no_grad():
        model.conv1.weight[2] = 0  # stem: feeds the residual stream
        block.conv2.weight[4] = 0  # block output: added to the shortcut
        block.shortcut[0].weight[4] = 0
        block.conv1.weight.zero_()  # every channel of a prunable conv
    pruned = prune_channels(model)
    assert_same_outputs(model, pruned, inputs((3, 8, 8)))
    assert pruned.conv1.out_channels == 16 and pruned.layer2[0].conv2.conv.out_channels == 32
    assert pruned.layer2[0].conv1.out_channels == 1


class Ensemble(nn.Module):
    """EnResNet-like: the mean of its members' logits."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)


def test_pruning_reaches_the_blocks_of_every_ensemble_member() -> None:
    model = Ensemble([resnet(8, seed=2), resnet(8, seed=3)])
    zero_channel(model.members[0].layer1[0], 3, alive=True)
    zero_channel(model.members[1].layer3[0], 7, alive=False)
    pruned = prune_channels(model)
    assert_same_outputs(model, pruned, inputs((3, 8, 8)))
    assert pruned.members[0].layer1[0].conv1.out_channels == 15 and pruned.members[1].layer3[0].conv1.out_channels == 63


def test_ternary_training_then_pruning_keeps_the_low_bit_model_s_outputs() -> None:
    """The intended flow: finalize a ternary model, measure its sparsity, prune what is all zero."""
    model = resnet(8, seed=4)
    with torch.no_grad():
        model.layer2[0].conv1.weight[:5].mul_(1e-3)  # small filters, which the ternary projection zeroes
    WeightQuantizer(model, bits=2, method="bc").finalize()
    report = sparsity_report(model)
    assert report.zero_channels >= 5 and report.weight_sparsity > 0.2
    pruned = prune_channels(model)
    assert_same_outputs(model, pruned, inputs((3, 8, 8)))
    assert count_parameters(pruned) < count_parameters(model)


class ReadTwiceBlock(nn.Module):
    """conv1 -> bn1 -> relu1 -> conv2 attributes like a BasicBlock, but relu1's output is also read by
    the sum: its channels cannot be removed from conv2 alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))  # (N, 6, H, W)
        return self.conv2(h) + h.mean(1, keepdim=True)  # (N, 4, H, W)


def read_twice_block() -> ReadTwiceBlock:
    """Two all-zero conv1 channels that carry a constant > 0 after bn1 and relu1."""
    torch.manual_seed(3)
    model = ReadTwiceBlock().eval()
    with torch.no_grad():
        model.conv1.weight[[1, 4]] = 0
        model.conv1.bias[[1, 4]] = 1.0
        model.bn1.running_mean.fill_(0.1)
    return model


def test_pruning_keeps_outputs_when_an_activation_is_read_twice() -> None:
    model = read_twice_block()
    assert_same_outputs(model, prune_channels(model), inputs((3, 5, 5)))


def test_pruning_report_says_why_a_layer_is_left_alone() -> None:
    model = read_twice_block()
    pruned = prune_channels(model)
    assert pruned.conv1.out_channels == 6 and pruned.conv2.in_channels == 6  # untouched
    report = {decision.layer: decision for decision in pruning_report(model)}
    assert report["conv1"].removed == 0
    assert "relu1's output is read by 2 layers (conv2, mean)" in report["conv1"].reason
    assert report["conv2"].reason == "the model returns conv2's output" or "add" in report["conv2"].reason
