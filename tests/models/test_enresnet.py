"""Tests for qrobust.models.enresnet: noise injection, ensembling, options and registry names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qrobust.data.base import DatasetInfo
from qrobust.models import (
    CifarResNet,
    EnResNet,
    NoisyBasicBlock,
    build_model,
    count_parameters,
    model_names,
)

from .test_models import make_info

GRAY28 = make_info((1, 28, 28))
SMALL = make_info((3, 8, 8), num_classes=5)  # ResNets pool globally, so 8x8 keeps the tests fast
CIFAR10 = make_info((3, 32, 32))


def images(info: DatasetInfo, n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *info.shape, generator=torch.Generator().manual_seed(seed))


def noisy_blocks(model: torch.nn.Module) -> list[NoisyBasicBlock]:
    return [m for m in model.modules() if isinstance(m, NoisyBasicBlock)]


@pytest.mark.parametrize(
    ("info", "members"),
    [(GRAY28, 1), (GRAY28, 2), (CIFAR10, 2), (SMALL, 3)],
    ids=["gray28-1", "gray28-2", "cifar10-2", "small-3"],
)
def test_output_shape(info: DatasetInfo, members: int) -> None:
    torch.manual_seed(0)
    model = EnResNet(info, depth=8, members=members).eval()
    with torch.no_grad():
        logits = model(images(info, n=3))
    assert logits.shape == (3, info.num_classes)
    assert torch.isfinite(logits).all()
    assert len(model.members) == members
    assert len(noisy_blocks(model)) == 3 * members  # depth 8: one block per stage


@pytest.mark.parametrize("switch_off", ["coef0", "set_noise"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_one_member_without_noise_is_the_plain_resnet(switch_off: str, train: bool) -> None:
    torch.manual_seed(0)
    plain = CifarResNet(SMALL, depth=14)  # two blocks per stage
    with torch.no_grad():
        plain.train()(images(SMALL, n=8, seed=1))  # non-trivial BatchNorm running statistics
    if switch_off == "coef0":
        model = EnResNet(SMALL, depth=14, members=1, noise_coef=0)
    else:
        model = EnResNet(SMALL, depth=14, members=1).set_noise(False)
    model.members[0].load_state_dict(plain.state_dict())  # strict: same keys, the noise adds none
    assert list(model.state_dict()) == [f"members.0.{key}" for key in plain.state_dict()]
    model.train(train)
    plain.train(train)
    x = images(SMALL)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_noise_is_on_in_eval_mode_and_differs_between_forwards() -> None:
    torch.manual_seed(0)
    model = EnResNet(SMALL, depth=8, members=2).eval()
    assert all(block.noise_enabled and block.noise_coef == 0.1 for block in noisy_blocks(model))
    x = images(SMALL)
    with torch.no_grad():
        first, second = model(x), model(x)
        clean = model.set_noise(False)(x)
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, clean)


@pytest.mark.parametrize("noise_coef", [0, 0.0])
def test_no_noise_and_no_random_draws_when_coef_is_zero(noise_coef: float) -> None:
    torch.manual_seed(0)
    model = EnResNet(SMALL, depth=8, members=2, noise_coef=noise_coef).eval()
    x = images(SMALL)
    state = torch.get_rng_state()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)


def test_set_noise_toggles_every_block() -> None:
    model = EnResNet(SMALL, depth=8, members=2)
    assert model.set_noise(False) is model
    assert not any(block.noise_enabled for block in noisy_blocks(model))
    model.set_noise(True)
    assert all(block.noise_enabled for block in noisy_blocks(model))
    with pytest.raises(ValueError, match="enabled must be True or False, got 'off'"):
        model.set_noise("off")  # type: ignore[arg-type]


def test_seeded_forwards_are_identical() -> None:
    torch.manual_seed(0)
    model = EnResNet(SMALL, depth=8, members=2).eval()
    x = images(SMALL)
    with torch.no_grad():
        torch.manual_seed(7)
        first = model(x)
        torch.manual_seed(7)
        second = model(x)
        torch.manual_seed(8)
        other = model(x)
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_ensemble_is_the_mean_of_member_logits_with_independent_noise() -> None:
    torch.manual_seed(0)
    model = EnResNet(SMALL, depth=8, members=3).eval()
    for member in model.members[1:]:  # identical weights: only the noise tells members apart
        member.load_state_dict(model.members[0].state_dict())
    x = images(SMALL)
    with torch.no_grad():
        torch.manual_seed(3)
        ensemble = model(x)
        torch.manual_seed(3)
        logits = [member(x) for member in model.members]
    torch.testing.assert_close(ensemble, torch.stack(logits).mean(0))
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("scale", [0.5, 5.0])
@pytest.mark.parametrize("noise_coef", [0.1, 0.3])
def test_noise_std_is_coef_times_the_std_of_the_residual_sum(scale: float, noise_coef: float) -> None:
    torch.manual_seed(0)
    block = NoisyBasicBlock(16, 16, noise_coef=noise_coef)
    residual_sum = scale * torch.randn(16, 16, 8, 8) + 1.0  # 16,384 values
    noise = block.perturb(residual_sum) - residual_sum
    # the std estimate over 16,384 Gaussian draws has relative error ~0.6%
    assert noise.std().item() == pytest.approx(noise_coef * residual_sum.std().item(), rel=0.03)
    assert abs(noise.mean().item()) < 4 * noise_coef * residual_sum.std().item() / 128


def test_two_member_resnet20_has_twice_the_parameters() -> None:
    single = count_parameters(build_model("resnet20", CIFAR10))
    ensemble = count_parameters(build_model("enresnet20", CIFAR10, members=2))
    assert single == 272_474
    assert ensemble == 2 * single  # the paper's 0.54M; the noise has no parameters


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"members": 0}, "members must be an integer >= 1, got 0"),
        ({"members": -1}, "members must be an integer >= 1, got -1"),
        ({"members": 1.5}, "members must be an integer >= 1, got 1.5"),
        ({"members": True}, "members must be"),
        ({"members": "2"}, "members must be"),
        ({"noise_coef": -0.1}, "noise_coef must be a finite number >= 0, got -0.1"),
        ({"noise_coef": float("nan")}, "noise_coef must be a finite number >= 0, got nan"),
        ({"noise_coef": float("inf")}, "noise_coef must be"),
        ({"noise_coef": True}, "noise_coef must be"),
        ({"noise_coef": "0.1"}, "noise_coef must be"),
        ({"depth": 21}, "6n\\+2.*got 21"),
        ({"depth": 2}, "6n\\+2.*got 2"),
    ],
)
def test_rejects_bad_options(options: dict, match: str) -> None:
    arguments = {"depth": 8, **options}
    with pytest.raises(ValueError, match=match):
        EnResNet(SMALL, **arguments)


def test_noisy_block_rejects_negative_coef() -> None:
    with pytest.raises(ValueError, match="noise_coef must be a finite number >= 0, got -1"):
        NoisyBasicBlock(16, 16, noise_coef=-1)


def test_registry_names_in_order() -> None:
    names = model_names()
    resnets = ["resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
    enresnets = ["enresnet8", "enresnet20", "enresnet56", "enresnet110"]
    assert names[:2] == ["mlp", "cnn"]
    assert [n for n in names if n in resnets + enresnets] == resnets + enresnets


@pytest.mark.parametrize(("name", "depth"), [("enresnet8", 8), ("enresnet20", 20), ("enresnet56", 56)])
def test_build_model_passes_options(name: str, depth: int) -> None:
    model = build_model(name, SMALL, members=2, noise_coef=0.05)
    assert isinstance(model, EnResNet)
    assert model.depth == depth and len(model.members) == 2 and model.noise_coef == 0.05
    assert len(noisy_blocks(model)) == 2 * 3 * ((depth - 2) // 6)  # members x stages x blocks
    assert all(block.noise_coef == 0.05 for block in noisy_blocks(model))
    default = build_model(name, SMALL)
    assert len(default.members) == 1 and default.noise_coef == 0.1


def test_build_model_rejects_unknown_enresnet_option() -> None:
    with pytest.raises(ValueError, match=r"'member'.*members, noise_coef"):
        build_model("enresnet20", SMALL, member=2)


def test_resnet8_has_one_block_per_stage_and_reads_gray_images() -> None:
    model = build_model("resnet8", GRAY28).eval()
    assert isinstance(model, CifarResNet) and not noisy_blocks(model)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [1, 1, 1]
    with torch.no_grad():
        assert model(images(GRAY28, n=2)).shape == (2, 10)


def test_cli_option_strings_give_ints_and_floats() -> None:
    from qrobust.cli.common import parse_options

    model = build_model("enresnet8", SMALL, **parse_options(["members=2", "noise_coef=0.05"]))
    assert len(model.members) == 2 and model.noise_coef == 0.05
    model = build_model("enresnet8", SMALL, **parse_options(["noise_coef=0"]))  # JSON int 0
    assert model.noise_coef == 0.0
    with pytest.raises(ValueError, match=r"members must be an integer >= 1, got 2\.0"):
        build_model("enresnet8", SMALL, **parse_options(["members=2.0"]))


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = build_model("enresnet8", SMALL, members=2).train()
    loss = F.cross_entropy(model(images(SMALL, n=2)), torch.tensor([1, 4]))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_init_is_deterministic_under_seed() -> None:
    torch.manual_seed(5)
    first = build_model("enresnet8", SMALL, members=2).state_dict()
    torch.manual_seed(5)
    second = build_model("enresnet8", SMALL, members=2).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # members are initialised independently, not copies of one another
    assert not torch.equal(first["members.0.conv1.weight"], first["members.1.conv1.weight"])
