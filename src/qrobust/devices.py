"""Where tensors live: ``--device auto|cpu|cuda|mps`` as a ``torch.device``, a model's device, generators on it.

Seeded runs are reproducible per device: the CPU, CUDA and MPS random streams differ, so a seed gives
the same numbers on every run on the same kind of device, not across kinds. Importing this module does
not import torch, so a command line can check ``--device`` (``DEVICES``, ``check_device_name``) fast.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from qrobust.errors import QRobustError

if TYPE_CHECKING:
    import torch
    from torch import nn

DEVICES = ("auto", "cpu", "cuda", "mps")
_NAME = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``device`` as a ``torch.device`` that torch can use here.

    "auto" (or None) is the first of CUDA, MPS and the CPU that torch sees; "cpu", "cuda", "cuda:N" and
    "mps" are taken as named, and a ``torch.device`` of any other type (xpu, ...) as it is. Raises
    QRobustError, one line, for an unknown name or an absent CUDA or MPS device.
    """
    import torch

    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    resolved = device if isinstance(device, torch.device) else torch.device(check_device_name(device))
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise QRobustError("device 'cuda' is not available (torch sees no CUDA GPU): choose cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise QRobustError(
                f"device '{resolved}' is not available: torch sees {torch.cuda.device_count()} CUDA GPU(s)"
            )
    if resolved.type == "mps" and not _mps_available():
        raise QRobustError("device 'mps' is not available (torch has no usable MPS backend): choose cpu or auto")
    return resolved


def check_device_name(name: str) -> str:
    """``name`` if it names a device ``resolve_device`` takes (auto, cpu, cuda, cuda:N, mps), whether or
    not it is present here; else QRobustError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise QRobustError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
    return name


def module_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer; the CPU for a model that holds none."""
    import torch

    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def generator_on(device: torch.device, generator: torch.Generator | None) -> torch.Generator | None:
    """A generator that draws on ``device``: ``generator`` itself when it already lives there (or is None),
    else a new one on ``device`` seeded by one 63-bit draw from ``generator`` (so a seeded run stays
    reproducible on each device, and the derived stream depends only on the seed)."""
    import torch

    if generator is None or same_device(generator.device, device):
        return generator
    seed = int(torch.randint(2**63 - 1, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether ``a`` and ``b`` are one device ("cuda" and "cuda:0" are, for the default GPU 0)."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def require_cpu(device: torch.device | str, what: str) -> None:
    """Raise QRobustError unless ``device`` is the CPU: ``what`` (an int8 model) runs only there."""
    import torch

    if torch.device(device).type != "cpu":
        raise QRobustError(f"{what} runs on the CPU only, not on {device}: choose the cpu")


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()
