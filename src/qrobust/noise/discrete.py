"""Discrete Gaussian noise N_Z(0, sigma_int^2) on the integer lattice, for integer randomized smoothing.

IntRS (Lin et al., "Integer-arithmetic-only Certified Robustness for Quantized Neural Networks",
ICCV 2021) smooths uint8 inputs with discrete Gaussian noise. Two samplers live here: an exact one
after Canonne, Kamath & Steinke ("The Discrete Gaussian for Differential Privacy", NeurIPS 2020),
slow and used as ground truth, and a fast integer-only one that inverts a 64-bit CDF table
(``qrobust.noise.table``) with one guide-table lookup for almost every draw.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from typing import overload

import numpy as np
import torch

from qrobust.checks import check_sigma
from qrobust.noise.table import AMBIGUOUS, GUIDE_BITS, check_sigma_int, inverse_cdf_table

# Words per lookup pass on the CPU. Below ATen's parallel grain (32768 elements) every op runs on the
# calling thread: buffers stay in L2 and no OpenMP barrier stalls when other processes hold the cores.
# Accelerators take the whole tensor in one pass.
_CPU_CHUNK = 30_000
_SIGN = -(2**63)  # xor with it maps the bits of an unsigned word to int64 with the same order

_WIDENED = {
    torch.uint8: torch.int16,
    torch.int8: torch.int16,
    torch.int16: torch.int32,
    torch.int32: torch.int64,
    torch.int64: torch.int64,
}


def _bernoulli(rng: random.Random, p: Fraction) -> bool:
    return rng.randrange(p.denominator) < p.numerator


def _bernoulli_exp(rng: random.Random, gamma: Fraction) -> bool:
    """Bernoulli(exp(-gamma)) for rational gamma >= 0 (CKS 2020, Algorithm 1)."""
    while gamma > 1:  # exp(-gamma) = exp(-1)^floor(gamma) * exp(-frac(gamma))
        if not _bernoulli_exp(rng, Fraction(1)):
            return False
        gamma -= 1
    k = 1
    while _bernoulli(rng, gamma / k):
        k += 1
    return k % 2 == 1


def _discrete_laplace(rng: random.Random, t: int) -> int:
    """P[Y = y] proportional to exp(-|y| / t) for an integer t >= 1 (CKS 2020, Algorithm 2 with s = 1)."""
    while True:
        u = rng.randrange(t)
        if not _bernoulli_exp(rng, Fraction(u, t)):
            continue
        v = 0
        while _bernoulli_exp(rng, Fraction(1)):
            v += 1
        magnitude = u + t * v
        negative = rng.randrange(2) == 1
        if negative and magnitude == 0:
            continue  # otherwise 0 would be drawn twice as often
        return -magnitude if negative else magnitude


def exact_discrete_gaussian(sigma_int: float, size: int, rng: random.Random | np.random.Generator) -> np.ndarray:
    """``size`` exact draws from N_Z(0, sigma_int^2) as an int64 array.

    Canonne, Kamath & Steinke, "The Discrete Gaussian for Differential Privacy" (NeurIPS 2020),
    Algorithm 3: discrete Laplace proposals accepted with a Bernoulli(exp(-gamma)) coin, all in
    rational arithmetic, so nothing is rounded. Pure Python and slow (tens of microseconds a draw):
    it is the ground truth for the fast sampler. A numpy ``rng`` seeds a ``random.Random`` with one draw.
    """
    sigma_int = check_sigma_int(sigma_int)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be an int >= 0, got {size!r}")
    if isinstance(rng, np.random.Generator):
        rng = random.Random(int(rng.integers(2**63)))
    variance = Fraction(sigma_int) ** 2  # exact: a float is a dyadic rational
    t = math.floor(sigma_int) + 1
    draws = np.empty(size, dtype=np.int64)
    for i in range(size):
        while True:
            y = _discrete_laplace(rng, t)
            if _bernoulli_exp(rng, (abs(y) - variance / t) ** 2 / (2 * variance)):
                draws[i] = y
                break
    return draws


@cache
def _device_table(sigma_int: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The guide table and the thresholds shifted into signed order (T - 2^63), on ``device``."""
    table = inverse_cdf_table(sigma_int)
    guide = torch.from_numpy(table.guide.copy()).to(device)  # (2^GUIDE_BITS,) int16
    signed = (table.thresholds ^ np.uint64(2**63)).view(np.int64)
    return guide, torch.from_numpy(signed).to(device)  # (2K,) int64, sorted


def _fill(out: torch.Tensor, sigma_int: float, words: Callable[[int, int], torch.Tensor]) -> None:
    """Write into the flat int16 ``out`` the samples for the uniform 64-bit words ``words(start, n)``.

    Each word's top bits index the guide table; the few draws landing in an ambiguous bucket are
    resolved by a binary search over the thresholds.
    """
    guide, signed = _device_table(sigma_int, out.device)
    offset = inverse_cdf_table(sigma_int).offset
    size = _CPU_CHUNK if out.device.type == "cpu" else max(out.numel(), 1)
    bucket = torch.empty(min(size, out.numel()), dtype=torch.int64, device=out.device)
    for start in range(0, out.numel(), size):
        part = out[start : start + size]  # (n,)
        chunk = words(start, part.numel())  # (n,) int64 holding the words' bits
        top = torch.bitwise_right_shift(chunk, 64 - GUIDE_BITS, out=bucket[: part.numel()])
        top.bitwise_and_(2**GUIDE_BITS - 1)  # the shift is arithmetic; the mask keeps the top bits only
        torch.index_select(guide, 0, top, out=part)
        ambiguous = (part == AMBIGUOUS).nonzero().squeeze(1)  # (m,), m ~ ambiguous_fraction * n
        part[ambiguous] = (_search(signed, chunk[ambiguous] ^ _SIGN) - offset).to(part.dtype)


def _search(signed: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Index of the first threshold above each key; on the CPU numpy's search, which never forks
    threads (torch's does from 200 keys on, and then stalls whenever other processes hold the cores)."""
    if keys.device.type == "cpu":
        return torch.from_numpy(np.searchsorted(signed.numpy(), keys.numpy(), side="right"))
    return torch.searchsorted(signed, keys, right=True)


@overload
def discrete_gaussian_from_uniform(words: np.ndarray, sigma_int: float) -> np.ndarray: ...
@overload
def discrete_gaussian_from_uniform(words: torch.Tensor, sigma_int: float) -> torch.Tensor: ...
def discrete_gaussian_from_uniform(words: torch.Tensor | np.ndarray, sigma_int: float) -> torch.Tensor | np.ndarray:
    """The fast sampler's int16 output for given uniform 64-bit words, shaped and typed like them.

    ``words`` is a numpy uint64 array (the result is numpy) or a torch int64/uint64 tensor holding
    the words' bits (the result is torch, on the same device). Equals
    ``np.searchsorted(inverse_cdf_table(sigma_int).thresholds, words, side="right") - offset``
    exactly; feeding ``rng.integers(0, 2**64, size, dtype=np.uint64)`` samples with numpy.
    """
    sigma_int = check_sigma_int(sigma_int)
    if isinstance(words, np.ndarray):
        if words.dtype != np.uint64:
            raise ValueError(f"numpy words must have dtype uint64, got {words.dtype}")
        bits = np.require(words.reshape(-1), requirements=["C", "W"]).view(np.int64)
        return discrete_gaussian_from_uniform(torch.from_numpy(bits), sigma_int).numpy().reshape(words.shape)
    if words.dtype not in (torch.int64, torch.uint64):
        raise ValueError(f"torch words must have dtype int64 or uint64, got {words.dtype}")
    flat = words.reshape(-1).view(torch.int64)
    out = torch.empty(flat.shape, dtype=torch.int16, device=flat.device)
    _fill(out, sigma_int, lambda start, n: flat[start : start + n])
    return out.view(words.shape)


def sample_discrete_gaussian(
    sigma_int: float,
    shape: int | tuple[int, ...] | torch.Size,
    generator: torch.Generator | np.random.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """An int16 tensor of N_Z(0, sigma_int^2) draws from the fast table sampler.

    The uniform words come from ``generator``: a torch.Generator (on ``device``, which defaults to
    the generator's) or a numpy Generator (words drawn on the CPU, samples moved to ``device``).
    Its distribution is the table's: within ``inverse_cdf_table(sigma_int).tv_distance`` of exact.
    """
    sigma_int = check_sigma_int(sigma_int)
    if device is None:
        device = generator.device if isinstance(generator, torch.Generator) else torch.device("cpu")
    if isinstance(generator, np.random.Generator):
        words = generator.integers(0, 2**64, size=shape, dtype=np.uint64)
        return torch.from_numpy(discrete_gaussian_from_uniform(words, sigma_int)).to(device)

    def draw(_: int, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.int64, device=device).random_(_SIGN, None, generator=generator)

    out = torch.empty(shape, dtype=torch.int16, device=device)
    _fill(out.view(-1), sigma_int, draw)
    return out


@dataclass(frozen=True)
class DiscreteGaussianNoise:
    """N_Z(0, sigma_int^2 I) on the integer lattice with sigma_int = sigma * scale (IntRS, ICCV 2021).

    ``sigma`` is in [0, 1] pixel units as for GaussianNoise; ``scale`` maps it onto the lattice (255
    for uint8 images). Draws come from the fast table sampler, within total variation ~2^-56 (sigma
    0.25) to ~2^-54 (sigma 1) of exact per coordinate (docs/discrete-gaussian.md). ``perturb`` does
    not clip, because the IntRS guarantee holds for the unclipped sum.
    """

    sigma: float
    scale: int = 255

    def __post_init__(self) -> None:
        check_sigma(self.sigma)
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"scale must be an int >= 1, got {self.scale!r}")
        check_sigma_int(self.sigma_int)

    @property
    def sigma_int(self) -> float:
        """Standard deviation parameter on the integer lattice."""
        return self.sigma * self.scale

    def sample(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise with the shape and device of the integer tensor ``like``, in a dtype wide enough for
        ``like + noise`` (int16 for uint8/int8, then int32, int64)."""
        if like.dtype not in _WIDENED:
            raise ValueError(f"like must be a tensor of dtype uint8, int8, int16, int32 or int64, got {like.dtype}")
        noise = sample_discrete_gaussian(self.sigma_int, like.shape, generator, device=like.device)
        return noise.to(_WIDENED[like.dtype])

    def perturb(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x`` plus fresh noise in the widened dtype of ``sample`` (a new tensor; ``x`` is not modified)."""
        return self.sample(x, generator).add_(x)
