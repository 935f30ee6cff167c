"""Low-bit weights with one float scale per layer: projections and BinaryConnect / Binary-Relax training.

The m-bit weights of a layer with n weights form Q = R+ x L^n (a scale times integer codes):
L = {-1, +1} for m = 1 and L = {-M, ..., M} with M = 2^(m-1) - 1 for m >= 2 ({0, +-1} for ternary,
{-7, ..., 7} for 4 bits). Li, Wang and Xin, "An Integrated Approach to Produce Robust Deep Neural
Network Models with High Efficiency" (2021, section 2.1) write the levels as {0, +-1, ..., +-2^(m-1)},
which takes 2^m + 1 values (17 for 4 bits) and does not fit a signed m-bit code; we drop the top level
so that every code fits m bits (4-bit: 15 values in int4 [-8, 7]) and the levels stay symmetric about 0.

Training follows Yin et al., "BinaryRelax: A Relaxation Approach for Training Deep Neural Networks with
Quantized Weights" (SIAM J. Imaging Sci. 2018) as Algorithm 1 of Li et al. states it: float weights w
take the SGD steps, the forward and backward passes run at u = (lambda Proj(w) + w) / (lambda + 1),
lambda grows geometrically every epoch, and after a cut-off epoch u = Proj(w) (BinaryConnect,
Courbariaux et al., NeurIPS 2015).

Evaluation pitfall: the final model's weights are the projected ones; attacks and certificates must
read ``projected_state_dict()`` (or the model after ``finalize()``), not the float shadow weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from qrobust.graph import trace

METHODS = ("bc", "br")
MAX_BITS = 8  # codes are int8
STATE_VERSION = 1


class LowBitWeight(NamedTuple):
    """A projected weight tensor as integer codes and one scale: the weight is ``scale * codes``.

    ``codes`` is int8 with the weight's shape, ``scale`` a 0-dim float tensor (>= 0) of the weight's dtype.
    """

    codes: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The float weight ``scale * codes`` (the projection onto Q)."""
        return self.codes.to(self.scale.dtype) * self.scale


def max_code(bits: int) -> int:
    """The largest code M of ``bits``-bit weights: 1 for binary ({-1, 1}) and ternary, 2^(bits-1) - 1 above."""
    _check_bits(bits)
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


def lowbit_quantize(weight: torch.Tensor, bits: int, *, iterations: int = 10) -> LowBitWeight:
    """The (near-)closest point of Q = R+ x L^n to ``weight`` in the Euclidean norm, as codes and scale.

    - 1 bit: scale mean|w|, codes sign(w) with sign(0) = +1; exact (Rastegari et al., XNOR-Net, 2016).
    - 2 bits (ternary, codes {0, +-1}): exact. For codes with k non-zeros the best choice keeps the k
      largest |w| with scale their mean, leaving distance ||w||^2 - (sum of top-k |w|)^2 / k; we take
      the best k over all n.
    - m >= 3 bits: a local optimum. Start from the best of the 2M scales max|w| / j, j = 1..2M (j <= M
      puts the largest weight exactly on level j, so every point of Q is returned unchanged; j > M clips
      the tails, which pays off for bell-shaped weights), then alternate rounding the codes for the
      scale and the least-squares scale for the codes, at most ``iterations`` times, stopping when a
      round no longer lowers the distance. The distance never exceeds the start's (``iterations=0``):
      scales are rounded to ``weight``'s dtype before distances are compared, so this holds for the
      returned scale. The start costs 2M passes over the weights (14 for 4 bits).

    Computed in float64. Raises ValueError for ``bits`` outside 1..8 or non-finite weights.

    Shapes: weight (...) -> codes int8 (...), scale ().
    """
    _check_bits(bits)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
    if not weight.is_floating_point() or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty float tensor, got {weight.dtype} of shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight has non-finite values (did training diverge?)")
    w = weight.detach().double().flatten()  # (n,)
    if bits == 1:
        codes, scale = torch.where(w >= 0, 1.0, -1.0), w.abs().mean()
    elif bits == 2:
        codes, scale = _ternary(w)
    else:
        codes, scale = alternating_codes(w, max_code(bits), iterations, weight.dtype)
    return LowBitWeight(codes.to(torch.int8).view_as(weight), scale.to(weight.dtype))


def lowbit_project(weight: torch.Tensor, bits: int, *, iterations: int = 10) -> torch.Tensor:
    """Proj_Q(weight): ``lowbit_quantize(weight, bits).dequantize()``, same shape and dtype as ``weight``."""
    return lowbit_quantize(weight, bits, iterations=iterations).dequantize()


def _ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ternary projection of a flat float64 ``w``: the best k non-zeros, which are the k largest |w|."""
    magnitudes, order = w.abs().sort(descending=True)  # (n,), (n,)
    sums = magnitudes.cumsum(0)  # (n,) sum of the top-k |w| for k = 1..n
    counts = torch.arange(1, len(w) + 1, dtype=w.dtype, device=w.device)
    k = int(torch.argmax(sums**2 / counts)) + 1  # first maximum: the fewest non-zeros among equals
    codes = torch.zeros_like(w)
    codes[order[:k]] = torch.sign(w[order[:k]])  # sign(0) = 0: an all-zero w stays all zero
    return codes, sums[k - 1] / k


def alternating_codes(
    w: torch.Tensor, top: int, iterations: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating minimisation of ||w - scale * codes||^2 over codes in {-top..top}^n and scale > 0."""
    largest = w.abs().max()
    if largest == 0:
        return torch.zeros_like(w), largest

    def evaluate(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = scale.to(dtype).double()  # the scale we will return, so distances are the returned ones
        codes = torch.clamp(torch.round(w / scale), -top, top)
        return ((w - scale * codes) ** 2).sum(), codes, scale

    best, codes, scale = min(
        (evaluate(largest / j) for j in range(1, 2 * top + 1)), key=lambda candidate: float(candidate[0])
    )
    for _ in range(iterations):
        distance, new_codes, new_scale = evaluate((w @ codes) / (codes @ codes))  # least squares given codes
        if not distance < best:
            break
        best, codes, scale = distance, new_codes, new_scale
    return codes, scale


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS} (codes are int8), got {bits!r}")


@dataclass(frozen=True)
class LowBitConfig:
    """How ``WeightQuantizer`` trains.

    Args:
        bits: weight precision m in 1..8 (1: binary, 2: ternary, 4: the paper's 4-bit).
        method: "bc" (BinaryConnect: always u = Proj(w)) or "br" (Binary-Relax: relaxed until
            ``cutoff_epoch``, BinaryConnect after).
        rho: growth factor of lambda per epoch, > 1 (default 1.05, as in Yin et al.'s code).
        cutoff_epoch: number of relaxed epochs M for "br", >= 0 (default 80, as in Yin et al.'s code);
            0 makes "br" identical to "bc".
    """

    bits: int
    method: str
    rho: float = 1.05
    cutoff_epoch: int = 80

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {self.method!r}")
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not (1 < self.rho < math.inf):
            raise ValueError(f"rho must be a finite number > 1, got {self.rho!r}")
        if isinstance(self.cutoff_epoch, bool) or not isinstance(self.cutoff_epoch, int) or self.cutoff_epoch < 0:
            raise ValueError(f"cutoff_epoch must be an integer >= 0, got {self.cutoff_epoch!r}")


class WeightQuantizer:
    """BinaryConnect / Binary-Relax training of a model's conv and linear weights (Li et al., Alg. 1).

    The model's parameters hold the float weights w between steps, so the optimizer updates w as usual;
    ``applied()`` swaps the training weights u in for the forward, attack and backward passes of a step::

        quantizer = WeightQuantizer(model, bits=1, method="br", rho=1.05, cutoff_epoch=80)
        for epoch in range(epochs):
            for x, y in batches:
                with quantizer.applied():            # parameters = u; gradients are taken at u
                    loss = loss_fn(model(attack(model, x, y)), y)
                    optimizer.zero_grad()
                    loss.backward()
                optimizer.step()                     # parameters = w again: w -= lr * grad L(u)
            quantizer.end_epoch()                    # lambda *= rho
        checkpoint = quantizer.projected_state_dict()  # the low-bit model

    By default every nn.Conv2d and nn.Linear weight is quantized, first and last layers included, as in
    the paper's parameter counts; biases, BatchNorm and Normalize stay float (few parameters, and BatchNorm
    becomes a per-channel scale and bias at inference anyway). ``layers`` (qualified module names,
    as in ``model.named_modules()``) restricts the set, e.g. to keep the first and last layers float.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        bits: int,
        method: str,
        rho: float = 1.05,
        cutoff_epoch: int = 80,
        layers: Iterable[str] | None = None,
    ) -> None:
        self.config = LowBitConfig(bits, method, rho, cutoff_epoch)
        self.model = model
        self.layers = _select_layers(model, layers)  # name -> weight parameter
        self.lam = 1.0
        self.epoch = 0
        self._saved: dict[str, torch.Tensor] | None = None  # w while ``applied()`` is active

    def __repr__(self) -> str:
        c = self.config
        return (
            f"WeightQuantizer(bits={c.bits}, method={c.method!r}, rho={c.rho}, cutoff_epoch={c.cutoff_epoch}, "
            f"layers={len(self.layers)}, lambda={self.lam:.4g}, epoch={self.epoch})"
        )

    @property
    def relaxed(self) -> bool:
        """Whether the current epoch trains at the relaxed u (Binary-Relax before the cut-off)."""
        return self.config.method == "br" and self.epoch < self.config.cutoff_epoch

    def float_weights(self) -> dict[str, torch.Tensor]:
        """The float weights w by layer name (views of the parameters, or the saved copies inside ``applied()``)."""
        if self._saved is not None:
            return dict(self._saved)
        return {name: param.detach() for name, param in self.layers.items()}

    def _training_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """u for float weight w: (lambda Proj(w) + w) / (lambda + 1) while relaxed, else Proj(w)."""
        projected = lowbit_project(weight, self.config.bits)
        return (self.lam * projected + weight) / (self.lam + 1) if self.relaxed else projected

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the quantized layers compute with u; on exit their parameters hold w again.

        The gradients computed inside stay in ``.grad``, so a following ``optimizer.step()`` moves w by
        the gradient at u. Run backward inside the block: w is written back in place (under no_grad,
        which bumps the version counters), so a backward after exit fails instead of silently using w.
        """
        if self._saved is not None:
            raise RuntimeError("WeightQuantizer.applied() is already active; it does not nest")
        saved = {name: param.detach().clone() for name, param in self.layers.items()}
        self._saved = saved
        try:  # restores w even if a projection fails half-way (non-finite weights)
            with torch.no_grad():
                for name, param in self.layers.items():
                    param.copy_(self._training_weight(saved[name]))
            yield
        finally:
            with torch.no_grad():
                for name, param in self.layers.items():
                    param.copy_(saved[name])
            self._saved = None

    def end_epoch(self) -> None:
        """Call after every epoch: lambda *= rho and the epoch count advances (toward the cut-off)."""
        self.lam *= self.config.rho
        self.epoch += 1

    def export(self) -> dict[str, LowBitWeight]:
        """The final model's quantized weights by layer name: int8 codes and a scale, Proj(w) = scale * codes."""
        return {name: lowbit_quantize(weight, self.config.bits) for name, weight in self.float_weights().items()}

    def projected_state_dict(self) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with every quantized weight replaced by Proj(w): the low-bit model to save."""
        state = self.model.state_dict()
        for name, exported in self.export().items():
            key = f"{name}.weight" if name else "weight"
            state[key] = exported.dequantize()
        return state

    def finalize(self) -> nn.Module:
        """Write Proj(w) into the model's parameters for good (the float w are lost) and return the model."""
        if self._saved is not None:
            raise RuntimeError("cannot finalize inside WeightQuantizer.applied()")
        projected = {name: exported.dequantize() for name, exported in self.export().items()}
        with torch.no_grad():
            for name, param in self.layers.items():
                param.copy_(projected[name])
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: config, lambda, epoch and the float weights w (copies)."""
        return {
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "lambda": self.lam,
            "epoch": self.epoch,
            "weights": {name: weight.clone() for name, weight in self.float_weights().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore lambda, epoch and w (into the model's parameters) from ``state_dict()``.

        Raises ValueError if ``state`` was made with another config or other layers.
        """
        if self._saved is not None:
            raise RuntimeError("cannot load a state inside WeightQuantizer.applied()")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported WeightQuantizer state version {state.get('version')!r}")
        if state["config"] != asdict(self.config):
            raise ValueError(f"state was saved with config {state['config']}, this quantizer has {asdict(self.config)}")
        weights = state["weights"]
        if sorted(weights) != sorted(self.layers):
            raise ValueError(f"state holds layers {sorted(weights)}, this quantizer has {sorted(self.layers)}")
        with torch.no_grad():
            for name, param in self.layers.items():
                param.copy_(weights[name])
        self.lam = float(state["lambda"])
        self.epoch = int(state["epoch"])


def _select_layers(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Parameter]:
    """The weights to quantize by module name, in call order (``qrobust.graph``): every Conv2d and
    Linear the forward pass calls, or the named ones."""
    quantizable = {
        layer.name: cast(nn.Parameter, cast(nn.Conv2d | nn.Linear, layer.module).weight)
        for layer in trace(model).affine()
        if layer.name == layer.target
    }
    if layers is None:
        selected = quantizable
    else:
        if isinstance(layers, str):
            raise ValueError(f"layers must be a collection of module names, got the string {layers!r}")
        names = list(layers)
        wrong = [name for name in names if name not in quantizable]
        if wrong:
            raise ValueError(
                f"layers {wrong} are not Conv2d or Linear modules of the model; valid names: {', '.join(quantizable)}"
            )
        selected = {name: quantizable[name] for name in names}
    if not selected:
        raise ValueError(f"no layers to quantize: {type(model).__name__} has no selected Conv2d or Linear modules")
    return selected
