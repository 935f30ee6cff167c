"""Plain PyTorch classifiers that take [0, 1] images and normalise them in their first layer; your own
ones join by ``register_model``, the ``qrobust.models`` entry-point group or ``import_model``."""

from qrobust.models.cnn import CNN
from qrobust.models.enresnet import EnResNet, NoisyBasicBlock
from qrobust.models.layers import Normalize
from qrobust.models.mlp import MLP
from qrobust.models.mobilenet import InvertedResidual, MobileNetV2
from qrobust.models.registry import build_model, count_parameters, import_model, model_names, register_model
from qrobust.models.resnet import BasicBlock, CifarResNet

__all__ = [
    "CNN",
    "MLP",
    "BasicBlock",
    "CifarResNet",
    "EnResNet",
    "InvertedResidual",
    "MobileNetV2",
    "NoisyBasicBlock",
    "Normalize",
    "build_model",
    "count_parameters",
    "import_model",
    "model_names",
    "register_model",
]
