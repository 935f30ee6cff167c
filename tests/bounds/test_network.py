"""ReluNetwork.from_model: the chain computes the model exactly; unsupported models are refused clearly."""

import pytest
import torch
from torch import nn

from qrobust.bounds import ReluNetwork, WeightPerturbation, certify
from qrobust.data.base import DatasetInfo
from qrobust.models import Normalize, build_model

INFO = DatasetInfo("fake", (2, 8, 8), tuple(f"c{i}" for i in range(5)), (0.3, 0.6), (0.2, 0.4))


class ConvBn(nn.Module):
    """Normalize, padded conv + BatchNorm + ReLU + max pooling, then two Linear layers: every fold at once."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize(INFO.mean, INFO.std)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = self.flatten(self.pool(self.relu(self.bn(self.conv(self.normalize(x))))))
        return self.head(torch.relu(self.fc(x)))


def _with_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_()
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("name", ["mlp", "cnn", "convbn"])
def test_chain_matches_model(name):
    torch.manual_seed(0)
    model = _with_statistics(ConvBn()) if name == "convbn" else build_model(name, INFO).eval()
    network = ReluNetwork.from_model(model)
    x = torch.rand(6, *INFO.shape)
    torch.testing.assert_close(network(x.double()), model(x).double(), atol=1e-5, rtol=1e-5)
    expected = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    assert network.num_layers == expected and network.dtype == torch.float64
    # layer k is the k-th Linear/Conv2d in forward order: replacing its weight changes only that layer
    first = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    torch.testing.assert_close(network.layers[-1].weight, first.weight.double())


def test_uint8_images_are_divided_by_255():
    torch.manual_seed(0)
    network = ReluNetwork.from_model(build_model("mlp", INFO).eval())
    images = (torch.rand(3, *INFO.shape) * 255).round().to(torch.uint8)

    labels = network(images.double() / 255).argmax(1)
    assert bool(certify(network, images, labels, WeightPerturbation((0,), 0.0)).all())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        certify(network, images.double(), labels, WeightPerturbation((0,), 0.0))


@pytest.mark.parametrize(
    "model, message",
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), "not supported"),
        (nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU()), "end in a Linear"),
    ],
)
def test_unsupported_layers_are_refused(model, message):
    with pytest.raises(ValueError, match=message):
        ReluNetwork.from_model(model)


def test_residual_models_are_refused():
    with pytest.raises(ValueError, match="single chain"):
        ReluNetwork.from_model(
            build_model("resnet8", DatasetInfo("c", (3, 8, 8), tuple("abcdefghij"), (0.5,) * 3, (0.2,) * 3))
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=(), eps=0.1), "layers"),
        (dict(layers=(0, 0), eps=0.1), "distinct"),
        (dict(layers=(-1,), eps=0.1), "layers"),
        (dict(layers=(0,), eps=-0.1), "eps"),
        (dict(layers=(0, 1), eps=(0.1,)), "one per layer"),
        (dict(layers=(0,), eps=0.1, norm=0.5), "norm"),
        (dict(layers=(0,), eps=0.1, bias="yes"), "bias"),
    ],
)
def test_perturbation_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightPerturbation(**kwargs)


def test_perturbation_radii():
    perturbation = WeightPerturbation([1, 3], (0.1, 0.2))
    assert perturbation.layers == (1, 3) and perturbation.eps_of(3) == 0.2 and perturbation.eps_of(0) == 0.0
