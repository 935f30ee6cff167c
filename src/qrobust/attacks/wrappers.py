"""Models seen the way an attack should see them: smoothed by Gaussian noise, or an int8 model behind floats."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.attacks.base import check_integer, check_real
from qrobust.quant.engine import Int8Model
from qrobust.quant.numerics import UINT8_MAX, round_half_up
from qrobust.quant.qat import InputQuant


class ExpectationOverNoise(nn.Module):
    """log E_e[softmax(model(x + sigma e))], e ~ N(0, I), estimated by the mean over ``samples`` draws.

    These are the log-probabilities of the Gaussian-smoothed soft classifier. A gradient attack on the
    randomized classifier itself follows the noise of one draw; on this average it follows the expected
    gradient (expectation over transformation, Athalye et al., "Synthesizing Robust Adversarial
    Examples", ICML 2018), which is how Salman et al. attack smoothed classifiers ("Provably Robust Deep
    Learning via Adversarially Trained Smoothed Classifiers", NeurIPS 2019). The noise is not clipped,
    as in ``FloatRS``. Differentiable; every call draws fresh noise from ``generator``.

    Args:
        model: the base classifier, float images (B, C, H, W) -> logits (B, K).
        sigma: noise std in [0, 1] pixel units, > 0.
        samples: noise draws per image, >= 1; the base model sees batches ``samples`` times larger.
        generator: the noise source (a seeded generator makes the output reproducible).

    Shapes: (N, C, H, W) -> log-probabilities (N, K).
    """

    def __init__(
        self, model: nn.Module, sigma: float, samples: int, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.sigma = check_real("sigma", sigma, positive=True)
        self.samples = check_integer("samples", samples, 1)
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device if self.generator is None else self.generator.device
        noise = torch.randn((self.samples, *x.shape), generator=self.generator, device=device, dtype=x.dtype)
        noisy = (x.unsqueeze(0) + self.sigma * noise.to(x.device)).flatten(0, 1)  # (S * N, C, H, W)
        log_probs = F.log_softmax(self.model(noisy), dim=1).unflatten(0, (self.samples, x.shape[0]))  # (S, N, K)
        return torch.logsumexp(log_probs, dim=0) - math.log(self.samples)  # (N, K)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, samples={self.samples}"


class LatticeInputs(nn.Module):
    """An ``Int8Model`` with the float interface: [0, 1] images in, real-valued float logits out.

    The image is clipped and rounded to the uint8 lattice exactly as a QAT model's input quantizer does,
    so the int8 model sees what its fake-quantized twin sees; logits are the int32 ones times
    ``logit_scale``. There is no gradient (an attack on it warns and finds nothing): craft adversarials on
    the QAT twin, whose straight-through gradients exist, and evaluate them here (a transfer attack).

    Shapes: (N, C, H, W) float -> (N, K) float32.
    """

    def __init__(self, model: Int8Model) -> None:
        super().__init__()
        if not isinstance(model, Int8Model):
            raise ValueError(f"LatticeInputs takes an Int8Model (from quant.convert), got {type(model).__name__}")
        self.model = model
        self.input_quant = InputQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            images = round_half_up(self.input_quant(x) * UINT8_MAX).to(torch.uint8)  # (N, C, H, W) lattice
            return self.model(images).to(torch.float32) * self.model.logit_scale
