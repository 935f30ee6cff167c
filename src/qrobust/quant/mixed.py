"""Mixed-precision fake quantization: per-layer weight and activation bit-widths from a ``BitPolicy``.

ARQ's quantizer (Yang et al., "ARQ: A Mixed-Precision Quantization Framework for Accurate and Certifiably
Robust DNNs", 2025, eq. 14, after HAQ, Wang et al., CVPR 2019): linear quantization
q = round(clip(v / s, lo, hi)) * s with one clip c per tensor, found by minimising the KL divergence
between the histograms of v and q (the TensorRT entropy calibration, Migacz, "8-bit Inference with
TensorRT", GTC 2017). The grids:

- weights: symmetric, s = c / (2^(b-1) - 1), codes in [-(2^(b-1) - 1), 2^(b-1) - 1] (2^b - 1 values);
- activations (the input of each Conv2d/Linear) that were never negative on the calibration data
  (after ReLU / ReLU6): unsigned, s = c / (2^b - 1), codes in [0, 2^b - 1] (2^b values);
- activations that were negative somewhere (the normalised image read by the first layer, MobileNetV2's
  linear bottleneck outputs, residual sums without a ReLU): symmetric like the weights.

Weights use KL calibration as well, as in HAQ and ARQ, rather than max-abs: at 2 to 4 bits a max-abs
clip spends most levels on a few outlying weights and rounds the bulk to zero (at 2 bits, codes
{-1, 0, 1}, every |w| < max|w| / 2). Clips are per tensor ("each layer utilizes two distinct c values").

``prepare_qat(model, policy)`` makes the quantized model: a copy of ``model`` whose Conv2d/Linear layers
(forward order, as in ``layer_infos``) are wrapped in ``QuantizedLayer``; everything else (Normalize,
BatchNorm, ReLU, pooling, residual adds) runs in float. A conv followed by BatchNorm has its own weight
quantized as it is (BatchNorm is not folded first), which is what the layer's BitOPs count.
``calibrate(model, images)`` sets every clip; rounding passes gradients straight through (STE,
Bengio et al., 2013), so the model can then be fine-tuned with ``qrobust.train.train`` (clips stay fixed;
calibrate again to refresh them). It is an ordinary float model in [0, 1] pixel space, so it smooths and
certifies like any other (``--method float-fp``), and saves through ``qrobust.models.checkpoint`` with
the policy in the metadata under "bit_policy".

Evaluation pitfall: rounding has zero gradient almost everywhere; gradient attacks on the quantized model
see only the straight-through surrogate.
"""

from __future__ import annotations

import copy
import math
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.graph import check_supported
from qrobust.quant.bitops import (
    MAX_BITS,
    MIN_BITS,
    BitPolicy,
    LayerInfo,
    bitops,
    bitops_percent,
    enforce_budget,
    layer_infos,
)
from qrobust.quant.engine import LATTICE_DTYPES
from qrobust.quant.numerics import UINT8_MAX

__all__ = [
    "BitPolicy",
    "LayerInfo",
    "MixedPrecisionModel",
    "QuantizedLayer",
    "bitops",
    "bitops_percent",
    "calibrate_mixed",
    "enforce_budget",
    "fake_quantize_linear",
    "kl_clip",
    "layer_infos",
    "prepare_mixed",
    "quantize",
]

HISTOGRAM_BINS = 2048  # TensorRT's default
MIN_CANDIDATE_BINS = 128  # TensorRT's first candidate (see kl_threshold)


def grid_levels(bits: int, signed: bool) -> int:
    """The largest code of a ``bits``-bit grid: 2^(b-1) - 1 if signed (symmetric), else 2^b - 1."""
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def fake_quantize_linear(x: torch.Tensor, clip: torch.Tensor, bits: int, signed: torch.Tensor | bool) -> torch.Tensor:
    """q = round(clamp(x / s, lo, L)) * s with s = clip / L (eq. 14), rounding passed straight through.

    L = ``grid_levels(bits, signed)``; lo = -L if ``signed`` else 0. Gradients flow to x inside the clip
    range and are zero outside it. ``clip`` is a 0-dim tensor > 0; ``signed`` a bool or 0-dim bool tensor
    (a tensor keeps the model traceable). Shapes: x any -> same.
    """
    if isinstance(signed, bool):
        levels = float(grid_levels(bits, signed))
        scale = clip / levels
        code = torch.clamp(x / scale, min=-levels if signed else 0.0, max=levels)
    else:  # a tensor flag keeps the choice of grid inside a traced graph
        tensor_levels = torch.where(signed, float(grid_levels(bits, True)), float(grid_levels(bits, False))).to(x.dtype)
        scale = clip / tensor_levels
        low = torch.where(signed, -tensor_levels, torch.zeros_like(tensor_levels))
        code = torch.clamp(x / scale, min=low, max=tensor_levels)
    return (code + (torch.round(code) - code).detach()) * scale


def kl_clip(values: torch.Tensor, bits: int, *, signed: bool, bins: int = HISTOGRAM_BINS) -> float:
    """The clip c for quantizing ``values`` at ``bits`` bits that minimises KL(P || Q) (ARQ eq. 14).

    P is the histogram of |v| (signed grid) or v (unsigned grid; ``values`` must then be >= 0) in
    ``bins`` bins over [0, max]; see ``kl_threshold`` for Q. Returns 1.0 for all-zero values (any clip
    represents them exactly).
    """
    _check_bits(bits)
    if not signed and bool((values < 0).any()):
        raise ValueError("an unsigned grid needs values >= 0; pass signed=True for values of both signs")
    magnitudes = values.detach().abs().flatten().double()
    top = float(magnitudes.max()) if magnitudes.numel() else 0.0
    if top == 0.0:
        return 1.0
    histogram = torch.histc(magnitudes, bins, 0.0, top).numpy()
    return kl_threshold(histogram, top, grid_levels(bits, signed))


def kl_threshold(histogram: np.ndarray, top: float, levels: int) -> float:
    """TensorRT's entropy calibration with the grid's own rounding: the clip c = i * top / bins minimising
    KL(P_i || Q_i) over the equal-width ``histogram`` (``bins`` >= 256 bins) of magnitudes on [0, top].

    P_i is the histogram cut at bin i with the clipped mass added to its last bin. Q_i quantizes the cut
    histogram (without that mass) to the ``levels`` + 1 magnitudes of step c / levels: each bin goes to the
    level nearest its centre (half up), and each level's mass is spread evenly over the non-empty bins of
    P_i that go to it. A small clip is penalised by the spike of clipped mass in P_i, a wide one by its
    coarse step. Candidates start at i = 128 bins (TensorRT's first), since a P_i of a few bins loses the
    shape the divergence compares (i = 1 always scores 0). The first bin's count is replaced by the second's
    (as in NVIDIA's pytorch-quantization): otherwise the mass of exact zeros after a ReLU, spread by Q_i
    over the lowest level's bins, dominates the divergence and forces tiny clips. Ties go to the smallest clip.

    Q_i is constant on each level's bins, so the divergence needs only per-level sums: all candidates are
    scored at once from prefix sums, in O(candidates x levels).
    """
    h = np.array(histogram, dtype=np.float64)  # (bins,)
    h[0] = h[1]  # the spike of exact zeros (ReLU outputs) would drive the choice: dropped, as NVIDIA's calibrator does
    bins, total = len(h), float(h.sum())
    if bins < 2**MAX_BITS or not total > 0:
        raise ValueError(
            f"histogram must have >= {2**MAX_BITS} bins and positive mass, got {bins} bins of mass {total}"
        )
    cut = np.arange(max(levels, MIN_CANDIDATE_BINS), bins + 1)  # (M,) candidates i; bin i-1 is in the top level
    mass_before = np.concatenate([[0.0], np.cumsum(h)])  # (bins + 1,) prefix sums
    filled_before = np.concatenate([[0.0], np.cumsum(h > 0)])
    plogp_before = np.concatenate([[0.0], np.cumsum(_xlogx(h))])
    tail = total - mass_before[cut]  # (M,) clipped mass
    last = h[cut - 1] + tail  # (M,) P_i of its last bin
    # level l holds bins j with (j + 1/2) levels / i + 1/2 in [l, l + 1): j >= ((2l - 1) i - levels) / (2 levels)
    level = np.arange(levels + 2)
    edges = np.clip(-((levels - (2 * level - 1) * cut[:, None]) // (2 * levels)), 0, cut[:, None])  # (M, levels + 2)
    q_mass = mass_before[edges[:, 1:]] - mass_before[edges[:, :-1]]  # (M, levels + 1) Q_i's mass per level
    count = filled_before[edges[:, 1:]] - filled_before[edges[:, :-1]]  # non-empty bins per level
    count[:, -1] += (last > 0).astype(float) - (h[cut - 1] > 0)  # the last bin holds the clipped mass too
    p_mass = q_mass.copy()
    p_mass[:, -1] += tail
    with np.errstate(divide="ignore", invalid="ignore"):  # Q_i = 0 where P_i > 0: infinite divergence
        cross = np.where(p_mass > 0, p_mass * np.log(q_mass / np.maximum(count, 1)), 0.0).sum(1)  # sum P log Q
        plogp = plogp_before[cut - 1] + _xlogx(last)  # sum P log P
        kl = (plogp - cross) / total - math.log(total) + np.log(mass_before[cut])  # normalised P and Q
    kl = np.where(np.isnan(kl), np.inf, kl)
    return float(cut[np.argmin(kl)] * top / bins)


def _xlogx(x: np.ndarray) -> np.ndarray:
    """x log x, with 0 log 0 = 0."""
    return x * np.log(np.where(x > 0, x, 1.0))


def _check_bits(bits: object) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


class _Observer:
    """Collects what calibration needs of one layer's float input: the range, then the histogram of |x|."""

    def __init__(self, index: int, calls: list[int], bins: int) -> None:
        self.index, self.calls, self.bins = index, calls, bins
        self.low, self.top = math.inf, 0.0
        self.histogram: torch.Tensor | None = None  # set by start_histogram

    def __call__(self, x: torch.Tensor) -> None:
        if self.histogram is None:
            self.calls.append(self.index)
            self.low = min(self.low, float(x.min()))
            self.top = max(self.top, float(x.abs().max()))
        elif self.top > 0:
            self.histogram += torch.histc(x.detach().abs().double(), self.bins, 0.0, self.top)

    def start_histogram(self) -> None:
        self.histogram = torch.zeros(self.bins, dtype=torch.float64)


class QuantizedLayer(nn.Module):
    """A Conv2d or Linear whose input is fake-quantized at ``act_bits`` and weight at ``weight_bits``.

    Buffers (saved in the state dict): ``weight_clip`` and ``act_clip`` (NaN until calibrated) and
    ``act_signed`` (whether the input uses the symmetric grid). The bias stays float. ``layer`` keeps the
    float weights, which training updates. Shapes: those of ``layer``.
    """

    weight_clip: torch.Tensor
    act_clip: torch.Tensor
    act_signed: torch.Tensor

    def __init__(self, layer: nn.Conv2d | nn.Linear, weight_bits: int, act_bits: int) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"QuantizedLayer wraps a Conv2d or Linear, got {type(layer).__name__}")
        _check_bits(weight_bits)
        _check_bits(act_bits)
        self.layer = layer
        self.weight_bits, self.act_bits = weight_bits, act_bits
        self.register_buffer("weight_clip", torch.tensor(math.nan))
        self.register_buffer("act_clip", torch.tensor(math.nan))
        self.register_buffer("act_signed", torch.tensor(False))
        self.observer: _Observer | None = None  # set only while calibrating

    @property
    def calibrated(self) -> bool:
        return not bool(torch.isnan(self.weight_clip) or torch.isnan(self.act_clip))

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize_linear(self.layer.weight, self.weight_clip, self.weight_bits, True)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_linear(x, self.act_clip, self.act_bits, self.act_signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:  # calibration reads the float model's activations
            self.observer(x)
            return self.layer(x)
        if not torch.jit.is_tracing() and not self.calibrated:
            raise RuntimeError("the mixed-precision model is not calibrated: call calibrate(model, images) first")
        x, weight = self.quantize_input(x), self.quantized_weight()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, weight, self.layer.bias)  # honours padding_mode and groups
        return F.linear(x, weight, self.layer.bias)

    def extra_repr(self) -> str:
        return f"weight_bits={self.weight_bits}, act_bits={self.act_bits}"


def _layer_order(model: nn.Module) -> list[str]:
    """Names of the Conv2d/Linear modules in the order the forward pass calls them (``qrobust.graph``)."""
    layers = check_supported(model, None, "mixed").affine()
    repeated = sorted({layer.target for layer in layers if layer.name != layer.target})
    if repeated:
        raise ValueError(
            f"layer {repeated[0]!r} runs more than once per forward pass; a bit policy needs each layer once"
        )
    return [layer.name for layer in layers]


class MixedPrecisionModel(nn.Module):
    """A float model with every Conv2d/Linear fake-quantized by ``policy``; made by ``prepare_qat(model, policy)``.

    ``model`` is the wrapped copy, ``layer_names[k]`` the layer that ``policy`` entry k quantizes.
    Takes [0, 1] images like the model it copies. Shapes: (N, C, H, W) -> (N, num_classes).
    """

    def __init__(self, model: nn.Module, policy: BitPolicy) -> None:
        super().__init__()
        if not isinstance(policy, BitPolicy):
            raise ValueError(f"policy must be a BitPolicy, got {type(policy).__name__}")
        names = _layer_order(model)
        if len(names) != policy.num_layers:
            raise ValueError(
                f"the policy has {policy.num_layers} layers but {type(model).__name__} has {len(names)} "
                "Conv2d/Linear layers"
            )
        self.model = copy.deepcopy(model)
        for name, weight_bits, act_bits in zip(names, policy.weight_bits, policy.act_bits):
            parent, _, child = name.rpartition(".")
            owner = self.model.get_submodule(parent)
            setattr(owner, child, QuantizedLayer(getattr(owner, child), weight_bits, act_bits))
        self.policy = policy
        self.layer_names = tuple(names)

    def quantized_layers(self) -> list[QuantizedLayer]:
        """The wrapped layers, in policy order."""
        return [cast(QuantizedLayer, self.model.get_submodule(name)) for name in self.layer_names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def extra_repr(self) -> str:
        return f"weight_bits={list(self.policy.weight_bits)}, act_bits={list(self.policy.act_bits)}"


def prepare_mixed(model: nn.Module, policy: BitPolicy) -> MixedPrecisionModel:
    """``model`` (unchanged) copied with the bit-widths of ``policy``, in ``model``'s train/eval mode.

    Reached through ``prepare_qat(model, policy)``. Raises ValueError if the policy's length is not the
    model's number of Conv2d/Linear layers. The copy must be calibrated before use.
    """
    return MixedPrecisionModel(model, policy).train(model.training)


def calibrate_mixed(
    model: MixedPrecisionModel, images: torch.Tensor, *, batch_size: int = 256, bins: int = HISTOGRAM_BINS
) -> MixedPrecisionModel:
    """Set every weight and activation clip of ``model`` by KL calibration (post-training quantization).

    Weight clips come from the weights themselves; activation clips from the float model's activations on
    ``images`` (integer (N, C, H, W) lattice values, divided by 255, or floats such as noisy [0, 1] images),
    in two passes: ranges (and whether each input is ever negative, which selects its grid), then
    histograms. Runs in eval mode (BatchNorm uses its running statistics). Reached through
    ``calibrate(model, images)``; returns ``model``, calibrated in place.
    """
    if not isinstance(model, MixedPrecisionModel):
        raise ValueError(
            f"calibrate_mixed takes a model made by prepare_qat(model, policy), got {type(model).__name__}"
        )
    if images.dim() != 4 or len(images) == 0 or not (images.dtype in LATTICE_DTYPES or images.is_floating_point()):
        raise ValueError(
            f"images must be non-empty integer lattice values or floats of shape (N, C, H, W), got {images.dtype} "
            f"of shape {tuple(images.shape)}"
        )
    for name, value, minimum in (("batch_size", batch_size, 1), ("bins", bins, 2**MAX_BITS)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    layers = model.quantized_layers()
    calls: list[int] = []
    observers = [_Observer(index, calls, bins) for index in range(len(layers))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for layer, observer in zip(layers, observers):
                layer.weight_clip.fill_(kl_clip(layer.layer.weight, layer.weight_bits, signed=True, bins=bins))
                layer.observer = observer
            _run(model, images, batch_size)
            if calls[: len(layers)] != list(range(len(layers))):
                order = [model.layer_names[i] for i in calls[: len(layers)]]
                raise ValueError(f"the layers ran in the order {order}, not the traced order {list(model.layer_names)}")
            for observer in observers:
                observer.start_histogram()
            _run(model, images, batch_size)
            for layer, observer in zip(layers, observers):
                signed, top, histogram = observer.low < 0, observer.top, observer.histogram
                assert histogram is not None  # start_histogram ran
                levels = grid_levels(layer.act_bits, signed)
                layer.act_clip.fill_(kl_threshold(histogram.numpy(), top, levels) if top else 1.0)
                layer.act_signed.fill_(signed)
    finally:
        for layer in layers:
            layer.observer = None
        model.train(was_training)
    return model


def _run(model: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        model(batch if batch.is_floating_point() else batch.float() / UINT8_MAX)


def quantize(
    model: nn.Module, policy: BitPolicy, calibration_images: torch.Tensor, *, batch_size: int = 256
) -> MixedPrecisionModel:
    """``prepare_qat(model, policy)`` calibrated on ``calibration_images``: ARQ's Quantize(f, P) in one call."""
    return calibrate_mixed(prepare_mixed(model, policy), calibration_images, batch_size=batch_size)
