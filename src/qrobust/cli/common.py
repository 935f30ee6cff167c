"""Small helpers of the commands: argument checks and parsers (light), and loading a float checkpoint."""

import json
from pathlib import Path
from typing import Any

from qrobust.checks import check_count
from qrobust.errors import QRobustError


def check_counts(counts: dict[str, int], seed: int = 0) -> None:
    """Refuse, naming the option, a count below 1 or a negative seed."""
    for option, value in counts.items():
        check_count(option, value)
    if seed < 0:
        raise QRobustError(f"--seed must be an integer >= 0, got {seed}")


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings to a dict; values are parsed as JSON when they can be (numbers, booleans)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise QRobustError(f"model option must look like KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def parse_radii(text: str) -> tuple[float, ...]:
    """Comma-separated radii >= 0."""
    try:
        radii = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise QRobustError(f"radii must be comma-separated numbers, got {text!r}") from None
    if any(not r >= 0 for r in radii):
        raise QRobustError(f"radii must be >= 0, got {text!r}")
    return radii


def import_model(spec: str | None) -> None:
    """Import and register the model factory the user named with ``--model`` (if any)."""
    if spec is not None:
        from qrobust.models import import_model as register

        register(spec)


def float_model(checkpoint: Path, command: str, factory: str | None):
    """The float model of a `qrobust train` checkpoint (of your own model ``factory``, from ``--model``)
    and the checkpoint; quantized ones are refused."""
    from qrobust.train import load_model

    import_model(factory)
    model, saved = load_model(checkpoint)
    for key, kind in (
        ("qat", "quantization-aware (int8)"),
        ("bit_policy", "mixed-precision quantized"),
        ("quantization", "quantized"),
    ):
        if saved.metadata.get(key) is not None:
            raise QRobustError(f"{checkpoint} is {kind}; `qrobust {command}` starts from a float checkpoint")
    return model, saved
