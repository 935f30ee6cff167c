"""Plain PyTorch classifiers that take [0, 1] images and normalise them in their first layer."""

from qrobust.models.cnn import CNN
from qrobust.models.enresnet import EnResNet, NoisyBasicBlock
from qrobust.models.layers import Normalize
from qrobust.models.mlp import MLP
from qrobust.models.mobilenet import InvertedResidual, MobileNetV2
from qrobust.models.registry import build_model, count_parameters, model_names
from qrobust.models.resnet import BasicBlock, CifarResNet

__all__ = [
    "CNN",
    "MLP",
    "BasicBlock",
    "InvertedResidual",
    "MobileNetV2",
    "CifarResNet",
    "EnResNet",
    "NoisyBasicBlock",
    "Normalize",
    "build_model",
    "count_parameters",
    "model_names",
]
