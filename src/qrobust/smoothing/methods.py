"""Smoothing methods: how a clean image becomes the noisy inputs of the base model, and which radius a
vote count certifies.

Each method defines its base classifier's view of x + noise (float for an fp32 model, integer lattice
values for an int8 model) and the certified l2 radius, in [0, 1] pixel units, for ``count`` votes of the
top class out of ``n`` at confidence 1 - alpha. Nothing is clipped here: x + noise leaves the pixel
range, and the model decides how to read it (an int8 model's input quantizer clips to its input range,
``QuantConfig.input_margin``). Whatever it does is part of the base classifier, so no radius changes.
"""

from __future__ import annotations

import abc
import functools
import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from scipy.special import ndtr, ndtri

from qrobust.data import to_unit_interval
from qrobust.errors import QRobustError
from qrobust.noise import DiscreteGaussianNoise, GaussianNoise, sample_discrete_gaussian
from qrobust.smoothing.confidence import check_image, check_unit_image, clopper_pearson_lower
from qrobust.smoothing.lattice import LatticeRadiusTable, sound_squared_radius

_BISECTIONS = 64  # halvings of [0, 1]: below the spacing of doubles


class SmoothingMethod(Protocol):
    """What ``SmoothedClassifier`` needs from a method."""

    @property
    def name(self) -> str: ...

    @property
    def sigma(self) -> float:
        """The noise std in [0, 1] pixel units."""
        ...

    @property
    def model_kind(self) -> str:
        """The base model it smooths: "float" (an fp32 checkpoint) or "int8" (an int8 one)."""
        ...

    def sample_noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | None = None
    ) -> torch.Tensor:
        """Fresh noise of ``shape`` (float for Gaussian, int16 lattice steps for discrete noise), drawn on
        the generator's device, or on ``device`` (the CPU by default) without one."""
        ...

    def apply(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Clean images (B, C, H, W) with ``noise`` of the same shape added, as the base model takes them."""
        ...

    def perturb(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``apply`` with fresh noise, drawn where ``generator`` lives (on the images' device without one) and
        added on the images' device."""
        ...

    def radius(self, count: int, n: int, alpha: float) -> float | None:
        """The certified radius for ``count`` of ``n`` votes at level ``alpha``; None to abstain."""
        ...

    def check_image(self, x: torch.Tensor) -> None:
        """Raise QRobustError unless ``x`` is a clean (C, H, W) image this method can add its noise to."""
        ...


class _Additive(abc.ABC):
    """``perturb`` for methods that add independent noise: sample it, then apply it."""

    @abc.abstractmethod
    def sample_noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | None = None
    ) -> torch.Tensor: ...

    @abc.abstractmethod
    def apply(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    def perturb(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.apply(images, self.sample_noise(tuple(images.shape), generator, images.device).to(images.device))


@dataclass(frozen=True)
class FloatRS(_Additive):
    """FloatRS-fp: Gaussian noise on the float [0, 1] image of an fp32 model (Cohen et al., ICML 2019).

    Radius sigma * Phi^-1(pA) with pA the one-sided (1 - alpha) Clopper-Pearson lower bound; with
    probability >= 1 - alpha the smoothed classifier is constant within that l2 ball.
    """

    sigma: float
    name = "float-fp"
    model_kind: ClassVar[str] = "float"

    def __post_init__(self) -> None:
        GaussianNoise(self.sigma)  # validates sigma

    def sample_noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | None = None
    ) -> torch.Tensor:
        return GaussianNoise(self.sigma).sample(torch.empty(shape, device=_device(generator, device)), generator)

    def apply(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return _unit_interval(images) + noise

    def radius(self, count: int, n: int, alpha: float) -> float | None:
        p_lower = clopper_pearson_lower(count, n, alpha)
        return self.sigma * float(ndtri(p_lower)) if p_lower > 0.5 else None

    def check_image(self, x: torch.Tensor) -> None:
        """uint8 lattice images, or float images in [0, 1] of the noise's dtype (the default, float32)."""
        check_image(x, torch.get_default_dtype(), self.name)


@dataclass(frozen=True)
class FloatRSQuant(FloatRS):
    """FloatRS-quant: Gaussian noise added in float, the noisy image rounded to the nearest integer lattice
    value, unclipped (int16), and classified by an int8 model, whose input quantizer clips.

    Rounding and the model's clipping are part of the base classifier, so Cohen et al.'s radius stays
    sound. The int16 range (|255 (x + n)| < 2^15, i.e. draws within ~128 / sigma std) is saturated only to
    keep the conversion defined.
    """

    name = "float-quant"
    model_kind: ClassVar[str] = "int8"

    def apply(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        lattice = super().apply(images, noise).mul_(255).round_()
        return lattice.clamp_(torch.iinfo(torch.int16).min, torch.iinfo(torch.int16).max).to(torch.int16)


@dataclass(frozen=True)
class IntRS(_Additive):
    """IntRS-quant: discrete Gaussian noise N_Z(0, (sigma * 255)^2 I) added to the uint8 lattice image, the
    unclipped int16 sum classified by an int8 model (Lin et al., ICCV 2021).

    Noise, inference and certification are integer-only: the radius is one lookup by the vote count in a
    table precomputed per (sigma, n, alpha). The table is the sound radius of ``qrobust.smoothing.lattice``
    (the paper's own radius over-certifies; docs/intrs-radius.md): with probability >= 1 - alpha, g is
    constant on every lattice point x + delta with ||delta||_2^2 <= the table's squared radius (lattice
    units); ``radius`` reports its square root / 255, in [0, 1] pixel units. The base classifier may be
    any deterministic function of the lattice point x + n (the int8 model's input quantizer clips and
    rounds it), so how the model reads values outside [0, 255] does not affect soundness.
    """

    sigma: float
    scale: int = 255
    name = "int"
    model_kind: ClassVar[str] = "int8"

    def __post_init__(self) -> None:
        DiscreteGaussianNoise(self.sigma, self.scale)  # validates sigma and scale

    def sample_noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | None = None
    ) -> torch.Tensor:
        device = _device(generator, device)
        return sample_discrete_gaussian(self.sigma * self.scale, shape, generator, device=device)  # int16

    def apply(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"IntRS takes uint8 lattice images, got dtype {images.dtype}")
        return noise + images  # int16, unclipped

    def radius(self, count: int, n: int, alpha: float) -> float | None:
        return self.table(n, alpha).radius(count)

    def check_image(self, x: torch.Tensor) -> None:
        """uint8 lattice images only: the noise and the certificate live on the integer lattice."""
        check_image(x, None, self.name)

    def table(self, n: int, alpha: float) -> LatticeRadiusTable:
        """The count -> certified squared radius table for ``n`` samples at level ``alpha`` (cached)."""
        return _radius_table(self.sigma * self.scale, n, alpha, self.scale)


@dataclass(frozen=True)
class LatticeRS(IntRS):
    """Lattice smoothing of an fp32 model: IntRS's noise and radius, the model reading floats.

    Discrete Gaussian noise N_Z(0, (sigma * 255)^2 I) is added to the uint8 image exactly, in integers
    (as IntRS), and the lattice point z = x + n (int16, unclipped) reaches the model as float32(z) / 255 (``scale``):
    z is exact in float32 and the division is correctly rounded, so the base classifier is a
    deterministic function of z. IntRS's sound lattice radius therefore holds as computed, with no
    floating-point arithmetic between the noise and the certificate (the attack of Voracek & Hein, ICLR
    2023, on Gaussian smoothing in floating point has nothing to exploit): with probability >= 1 - alpha,
    g is constant on the lattice points x + delta of the certified ball. Unlike FloatRS-fp it certifies
    lattice perturbations (uint8 images), the inputs a deployed model sees.
    """

    name = "lattice"
    model_kind: ClassVar[str] = "float"

    def apply(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return super().apply(images, noise).to(torch.float32).div_(self.scale)


class RadiusMap(Protocol):
    """A smoothing method's certified radius as a monotone function of a lower bound p on pA."""

    def radius(self, p: float) -> float | None:
        """The radius certified when pA >= p (non-decreasing in p); None to abstain."""
        ...

    def p_needed(self, r: float) -> float:
        """A value p* with radius(p) >= r for every p > p*: inf {p : radius(p) >= r}, or just above it."""
        ...


@dataclass(frozen=True)
class GaussianRadius:
    """Cohen et al.'s radius sigma * Phi^-1(p) (FloatRS-fp, FloatRS-quant; sound for IntRS as well)."""

    sigma: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise QRobustError(f"sigma must be a finite number > 0, got {self.sigma!r}")

    def radius(self, p: float) -> float | None:
        return self.sigma * float(ndtri(p)) if p > 0.5 else None

    def p_needed(self, r: float) -> float:
        _check_radius(r)
        return float(ndtr(r / self.sigma))


@dataclass(frozen=True)
class LatticeRadius:
    """IntRS's sound lattice radius as a function of p (``lattice.sound_squared_radius``), in [0, 1] units.

    ``LatticeRadiusTable`` maps counts at a fixed (n, alpha) to radii; a confidence sequence needs the
    map from the bound p itself, which is ``sqrt(sound_squared_radius(p, sigma * scale)) / scale``.
    """

    sigma: float
    scale: float = 255.0

    def radius(self, p: float) -> float | None:
        if p >= 1.0:
            return math.inf
        squared = sound_squared_radius(p, self.sigma * self.scale)
        return None if squared is None else math.sqrt(squared) / self.scale

    def p_needed(self, r: float) -> float:
        """Bisection on the step function radius(p): returns p* with radius(p*) >= r (so every p > p* works)."""
        _check_radius(r)
        return _lattice_p_needed(self, r)


@functools.lru_cache(maxsize=256)
def _lattice_p_needed(radius_map: LatticeRadius, r: float) -> float:
    lo, hi = 0.5, 1.0
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        certified = radius_map.radius(mid)
        if certified is not None and certified >= r:
            hi = mid
        else:
            lo = mid
    return hi


def radius_map_for(method: SmoothingMethod) -> RadiusMap:
    """The radius-from-p map of a smoothing method (the rule its ``radius(count, n, alpha)`` applies to
    the Clopper-Pearson bound): Gaussian for FloatRS and FloatRSQuant, the sound lattice radius for IntRS."""
    if isinstance(method, FloatRS):
        return GaussianRadius(method.sigma)
    if isinstance(method, IntRS):
        return LatticeRadius(method.sigma, float(method.scale))
    raise QRobustError(f"no radius map for smoothing method {getattr(method, 'name', method)!r}")


def _check_radius(r: float) -> None:
    if not (math.isfinite(r) and r >= 0):
        raise QRobustError(f"radii must be finite and >= 0, got {r!r}")


@functools.lru_cache(maxsize=16)
def _radius_table(sigma_int: float, n: int, alpha: float, scale: int) -> LatticeRadiusTable:
    return LatticeRadiusTable(sigma_int, n, alpha, scale=float(scale))


def _device(generator: torch.Generator | None, device: torch.device | None) -> torch.device:
    """Noise is drawn where its generator lives (on ``device``, by default the CPU, without one)."""
    if generator is not None:
        return generator.device
    return torch.device("cpu") if device is None else device


def _unit_interval(x: torch.Tensor) -> torch.Tensor:
    """Clean images as float in [0, 1]: uint8 lattice images are divided by 255, floats are checked."""
    if x.dtype == torch.uint8:
        return to_unit_interval(x)
    check_unit_image(x)
    return x
