"""Tests for qrobust.models: shapes, normalisation, parameter counts, errors, init and gradients."""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.data.base import DatasetInfo
from qrobust.errors import CheckpointError, QRobustError
from qrobust.models import (
    CifarResNet,
    Normalize,
    build_model,
    count_parameters,
    import_model,
    model_names,
    register_model,
)
from qrobust.models import registry as registry_module
from qrobust.models.checkpoint import Checkpoint, load_checkpoint, model_metadata, save_checkpoint
from qrobust.models.registry import ENTRY_POINT_GROUP


def make_info(shape: tuple[int, int, int], num_classes: int = 10) -> DatasetInfo:
    channels = shape[0]
    return DatasetInfo(
        name=f"fake{channels}x{shape[1]}x{shape[2]}",
        shape=shape,
        classes=tuple(f"c{i}" for i in range(num_classes)),
        mean=tuple(0.4 + 0.05 * c for c in range(channels)),
        std=tuple(0.2 + 0.02 * c for c in range(channels)),
    )


GRAY28 = make_info((1, 28, 28), 10)
CIFAR10 = make_info((3, 32, 32), 10)
CIFAR100 = make_info((3, 32, 32), 100)
INFOS = [GRAY28, CIFAR10, CIFAR100]
NAMES = model_names()


def test_registered_names() -> None:
    assert NAMES == [
        "mlp",
        "cnn",
        "resnet8",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "enresnet8",
        "enresnet20",
        "enresnet56",
        "enresnet110",
        "mobilenetv2",
    ]


@pytest.mark.parametrize("info", INFOS, ids=lambda i: f"{i.shape}-{i.num_classes}")
@pytest.mark.parametrize("name", NAMES)
def test_output_shape(name: str, info: DatasetInfo) -> None:
    torch.manual_seed(0)
    model = build_model(name, info).eval()
    x = torch.rand(2, *info.shape)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, info.num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_first_layer_is_normalize_with_buffers(name: str) -> None:
    model = build_model(name, CIFAR10)
    for network in getattr(model, "members", [model]):  # an ensemble: every member normalises its input
        first = next(iter(network.children()))
        assert isinstance(first, Normalize)
        state = network.state_dict()
        assert torch.equal(state["normalize.mean"], torch.tensor(CIFAR10.mean))
        assert torch.equal(state["normalize.std"], torch.tensor(CIFAR10.std))
        assert "normalize.mean" not in dict(network.named_parameters())


def test_normalize_math() -> None:
    layer = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    x = torch.rand(4, 3, 5, 6)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 0.25, (x[:, 2] - 0.0) / 2.0], dim=1)
    torch.testing.assert_close(layer(x), expected)
    assert count_parameters(layer) == 0


def test_normalize_buffers_follow_to() -> None:
    layer = Normalize((0.5,), (0.25,)).to(torch.float64)
    assert layer.mean.dtype == torch.float64 and layer.std.dtype == torch.float64
    out = layer(torch.ones(1, 1, 2, 2, dtype=torch.float64))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.full((1, 1, 2, 2), 2.0, dtype=torch.float64))


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [
        ((0.5, 0.5), (0.5,), "equal length"),
        ((), (), "equal length"),
        ((0.5,), (0.0,), "std must be"),
        ((0.5,), (-1.0,), "std must be"),
    ],
)
def test_normalize_rejects_bad_statistics(mean: tuple, std: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Normalize(mean, std)


def test_statistics_must_match_channels() -> None:
    info = DatasetInfo("bad", (3, 32, 32), ("a", "b"), (0.5,), (0.5,))
    with pytest.raises(ValueError, match="3 channels"):
        build_model("resnet20", info)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet20", 272_474),
        ("resnet32", 466_906),
        ("resnet44", 661_338),
        ("resnet56", 855_770),
        ("resnet110", 1_730_714),
    ],
)
def test_resnet_parameter_counts(name: str, expected: int) -> None:
    # Option-A ResNet-20 has 269,722; the two 1x1 conv + BN projections add 576 + 2,176.
    assert count_parameters(build_model(name, CIFAR10)) == expected


def test_cnn_parameter_count() -> None:
    # conv 1->32 (288 + 32 bias) + conv 32->64 (18,432 + 64 bias) + fc 3136->128 + fc 128->10
    expected = 288 + 32 + 18_432 + 64 + (64 * 7 * 7 * 128 + 128) + (128 * 10 + 10)
    assert count_parameters(build_model("cnn", GRAY28)) == expected


@pytest.mark.parametrize(("depth", "width"), [(2, 1), (2, 64), (3, 256), (5, 32), (10, 16)])
@pytest.mark.parametrize("info", [GRAY28, CIFAR100], ids=["gray28", "cifar100"])
def test_mlp_parameter_count(depth: int, width: int, info: DatasetInfo) -> None:
    d_in = info.shape[0] * info.shape[1] * info.shape[2]
    k = info.num_classes
    expected = (d_in * width + width) + (depth - 2) * (width * width + width) + (width * k + k)
    model = build_model("mlp", info, depth=depth, width=width)
    assert count_parameters(model) == expected
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == depth


def test_count_parameters_counts_only_trainable() -> None:
    model = build_model("mlp", GRAY28, depth=2, width=8)
    model.head.requires_grad_(False)
    assert count_parameters(model) == 28 * 28 * 8 + 8


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="'vgg16'") as excinfo:
        build_model("vgg16", CIFAR10)
    for name in NAMES:
        assert name in str(excinfo.value)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("mlp", {"dept": 3}, "'dept'.*depth, width"),
        ("cnn", {"width": 8}, "'width'.*none"),
        ("resnet20", {"depth": 32}, "'depth'"),
        ("mlp", {"depth": 1}, "depth must be an integer >= 2, got 1"),
        ("mlp", {"depth": 2.5}, "depth must be an integer >= 2, got 2.5"),
        ("mlp", {"depth": True}, "depth must be"),
        ("mlp", {"width": 0}, "width must be an integer >= 1, got 0"),
    ],
)
def test_bad_options(name: str, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(name, CIFAR10, **options)


@pytest.mark.parametrize("depth", [7, 21, 2, 0])
def test_resnet_rejects_bad_depth(depth: int) -> None:
    with pytest.raises(ValueError, match=f"6n\\+2.*got {depth}"):
        CifarResNet(CIFAR10, depth=depth)


def test_cnn_rejects_tiny_images() -> None:
    with pytest.raises(ValueError, match="at least 4x4, got 3x8"):
        build_model("cnn", make_info((1, 3, 8), 10))


@pytest.mark.parametrize("name", NAMES)
def test_init_is_deterministic_under_seed(name: str) -> None:
    torch.manual_seed(123)
    first = build_model(name, GRAY28).state_dict()
    torch.manual_seed(123)
    second = build_model(name, GRAY28).state_dict()
    torch.manual_seed(124)
    other = build_model(name, GRAY28).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_convs_use_he_init() -> None:
    torch.manual_seed(0)
    model = build_model("resnet56", CIFAR10)
    # layer3 convs are 64 -> 64, 3x3: fan-in 576, He std sqrt(2 / 576).
    weights = torch.cat([model.layer3[i].conv2.weight.flatten() for i in range(9)])
    assert weights.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, GRAY28).train()
    x = torch.rand(2, *GRAY28.shape)
    loss = F.cross_entropy(model(x), torch.tensor([1, 7]))
    loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name


def tiny_linear(info: DatasetInfo, hidden: int = 4) -> nn.Module:
    """A model of a user's own, outside qrobust."""
    return nn.Sequential(
        Normalize(info.mean, info.std),
        nn.Flatten(),
        nn.Linear(info.shape[0] * info.shape[1] * info.shape[2], hidden),
        nn.ReLU(),
        nn.Linear(hidden, info.num_classes),
    )


@pytest.fixture
def registry(monkeypatch):
    """An empty set of registered models and no installed entry points, restored after the test."""
    monkeypatch.setattr(registry_module, "_REGISTERED", {})
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [])
    return registry_module


def test_a_registered_model_builds_and_round_trips_through_a_checkpoint(registry, tmp_path) -> None:
    register_model("tiny", tiny_linear)
    register_model("tiny", tiny_linear)  # the same factory again: a no-op
    assert "tiny" in model_names()
    torch.manual_seed(0)
    model = build_model("tiny", GRAY28, hidden=3)
    metadata = model_metadata("tiny", {"hidden": 3}, GRAY28)
    assert metadata["factory"] == f"{__name__}:tiny_linear" and "factory" not in model_metadata("cnn", {}, GRAY28)
    save_checkpoint(tmp_path / "tiny.pt", Checkpoint(model.state_dict(), metadata))
    rebuilt = load_checkpoint(tmp_path / "tiny.pt").build()
    x = torch.rand(2, *GRAY28.shape)
    assert torch.equal(rebuilt(x), model.eval()(x))


def test_register_model_refuses_taken_names_and_non_factories(registry) -> None:
    with pytest.raises(QRobustError, match=r"'cnn' is taken by qrobust\.models\.cnn:CNN"):
        register_model("cnn", tiny_linear)
    with pytest.raises(QRobustError, match="must be callable"):
        register_model("tiny", "not a function")


def test_installed_entry_points_are_models(registry, monkeypatch) -> None:
    point = EntryPoint("tiny-ep", f"{__name__}:tiny_linear", ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [point] if group == ENTRY_POINT_GROUP else [])
    assert model_names()[-1] == "tiny-ep"
    assert isinstance(build_model("tiny-ep", GRAY28, hidden=2)[2], nn.Linear)


def test_import_model_registers_a_named_factory(registry) -> None:
    assert import_model(f"{__name__}:tiny_linear") == f"{__name__}:tiny_linear"
    assert build_model(f"{__name__}:tiny_linear", GRAY28)[2].out_features == 4
    for spec, match in (
        ("no_such_module_q:f", "cannot import 'no_such_module_q'"),
        ("os:nothing_here", "has no 'nothing_here'"),
        ("os", "package.module:function"),
    ):
        with pytest.raises(QRobustError, match=match):
            import_model(spec)


def test_a_checkpoint_naming_an_unregistered_factory_imports_nothing(registry, tmp_path) -> None:
    metadata = model_metadata("cnn", {}, GRAY28) | {"model": "qrobust_crafted_module:run", "model_options": {}}
    save_checkpoint(tmp_path / "crafted.pt", Checkpoint(build_model("cnn", GRAY28).state_dict(), metadata))
    with pytest.raises(CheckpointError, match=r"not registered: pass --model qrobust_crafted_module:run") as excinfo:
        load_checkpoint(tmp_path / "crafted.pt").build()
    assert "\n" not in str(excinfo.value) and "qrobust_crafted_module" not in sys.modules
    named = Checkpoint({}, model_metadata("cnn", {}, GRAY28) | {"model": "gone", "factory": "their_pkg:gone"})
    with pytest.raises(
        CheckpointError, match=r"'gone' is not registered: install or import .* \(made by their_pkg:gone\)"
    ):
        named.build()
    with pytest.raises(CheckpointError, match="model name is 5, not a string"):
        Checkpoint({}, model_metadata("cnn", {}, GRAY28) | {"model": 5}).build()
