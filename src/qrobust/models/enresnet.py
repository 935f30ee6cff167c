"""EnResNet: ensembles of noise-injected CIFAR ResNets (Wang, Shi and Osher, NeurIPS 2019)."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from qrobust.data.base import DatasetInfo
from qrobust.models.resnet import BasicBlock, CifarResNet

# The authors' training scripts default to --noise-coef 0.1 (BaoWangMath/EnResNet).
DEFAULT_NOISE_COEF = 0.1


class NoisyBasicBlock(BasicBlock):
    """A ``BasicBlock`` that adds Gaussian noise to its residual sum, in training and evaluation alike.

    The noise is ``noise_coef * std(s) * N(0, I)``, where ``s`` is the residual sum (before the last
    ReLU) and ``std(s)`` is taken over the whole batch tensor, with gradients flowing through it, as
    in the authors' code (so an image's noise scale depends slightly on the rest of its batch).
    This is the discretised diffusion term of the Feynman-Kac view of ResNets.
    The reference blocks are pre-activation ones whose output is the sum itself; here the noise goes
    where the sum is formed, before the ReLU that post-activation blocks apply to it.

    Noise comes from torch's global RNG, so ``torch.manual_seed`` makes it reproducible. Set
    ``noise_enabled = False`` (or ``EnResNet.set_noise(False)``) to compare with the noise-free net.

    Args:
        in_planes, planes, stride: as for ``BasicBlock``.
        noise_coef: noise std relative to the std of the residual sum, >= 0 (default 0.1); 0 adds none.

    Shapes: input (N, in_planes, H, W) -> output (N, planes, H/stride, W/stride).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, noise_coef: float = DEFAULT_NOISE_COEF) -> None:
        super().__init__(in_planes, planes, stride)
        _check_noise_coef(noise_coef)
        self.noise_coef = float(noise_coef)
        self.noise_enabled = True

    def perturb(self, out: torch.Tensor) -> torch.Tensor:
        if not self.noise_enabled or self.noise_coef == 0:
            return out
        return out + self.noise_coef * out.std() * torch.randn_like(out)

    def extra_repr(self) -> str:
        return f"noise_coef={self.noise_coef}, noise_enabled={self.noise_enabled}"


class EnResNet(nn.Module):
    """En_n ResNet-d: the mean logits of n jointly trained CIFAR ResNets with noise-injected blocks.

    Wang, Shi and Osher, "ResNets Ensemble via the Feynman-Kac Formalism to Improve Natural and
    Robust Accuracies" (NeurIPS 2019). Each member is a ``CifarResNet`` (with its own Normalize, so
    ``members[i]`` is a classifier on [0, 1] images by itself) whose blocks are ``NoisyBasicBlock``s.
    The ensemble averages the members' logits, not their softmax probabilities, as the reference
    code does. En_1 is a single noise-injected ResNet; En_2 ResNet-20 has twice ResNet-20's weights.

    The noise stays on in ``eval()`` mode, as in the paper's evaluation, so the model is randomised:
    gradient attacks on it need expectation over transformation (averaging gradients over draws),
    and repeated forwards differ unless seeded or ``set_noise(False)``.

    Args:
        info: the dataset the model reads (input shape, statistics, number of classes).
        depth: depth of every member, 6n+2 for some n >= 1, e.g. 8, 20, 56, 110.
        members: number of ensemble members n, >= 1 (default 1).
        noise_coef: noise std relative to the std of each residual sum, >= 0 (default 0.1).

    Shapes: input (N, C, H, W) in [0, 1] -> logits (N, num_classes).
    """

    def __init__(
        self,
        info: DatasetInfo,
        depth: int,
        members: int = 1,
        noise_coef: float = DEFAULT_NOISE_COEF,
    ) -> None:
        super().__init__()
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise ValueError(f"members must be an integer >= 1, got {members!r}")
        _check_noise_coef(noise_coef)
        self.depth = depth
        self.noise_coef = float(noise_coef)
        block = functools.partial(NoisyBasicBlock, noise_coef=noise_coef)
        self.members = nn.ModuleList(CifarResNet(info, depth, block=block) for _ in range(members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([member(x) for member in self.members])  # (members, N, num_classes)
        return logits.mean(dim=0)  # (N, num_classes)

    def set_noise(self, enabled: bool) -> EnResNet:
        """Turn the noise of every block on or off (it is on after construction); returns ``self``."""
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be True or False, got {enabled!r}")
        for module in self.modules():
            if isinstance(module, NoisyBasicBlock):
                module.noise_enabled = enabled
        return self

    def extra_repr(self) -> str:
        return f"depth={self.depth}, members={len(self.members)}, noise_coef={self.noise_coef}"


def _check_noise_coef(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"noise_coef must be a finite number >= 0, got {value!r}")
