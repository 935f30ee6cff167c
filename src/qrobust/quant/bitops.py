"""Mixed-precision bit policies and their BitOPs cost, the constraint of ARQ's policy search.

Yang et al., "ARQ: A Mixed-Precision Quantization Framework for Accurate and Certifiably Robust DNNs"
(2025), after HAQ (Wang et al., "HAQ: Hardware-Aware Automated Quantization with Mixed Precision",
CVPR 2019) and HAWQ-V3 (Yao et al., 2021). A policy gives every Conv2d/Linear layer, in forward order,
a weight and an activation bit-width in [2, 8]; the first and the last layer stay at 8 bits.

BitOPs of a layer (paper, "Metrics"): b_w * b_a * |k| * w_k * h_k / s_k^2, summed over its filters k.
We read w_k * h_k / s_k^2 as the number of output positions, out_size^2, so a layer costs
b_w * b_a * MACs with MACs = (weights per filter) * out_channels * out_size^2, exactly the multiply-
accumulates it performs. For "same" padding (every registered model) out_size = in_size / stride and the
two readings agree; for other paddings out_size^2 is the exact count. Biases cost nothing. The fp32
reference prices every MAC at 32 x 32 bits, so ``bitops_percent`` of a uniform 4-bit policy is close
to 100 * 16 / 1024 = 1.6% (ARQ's "4-bit equivalent" budget on ResNet-20 is 0.354 / 42.04 GBitOPs).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from qrobust.graph import check_supported

MIN_BITS, MAX_BITS = 2, 8
FP32_BITS = 32
POLICY_VERSION = 1


@dataclass(frozen=True)
class LayerInfo:
    """One Conv2d or Linear layer as ARQ's agent observes it (state S_k, eq. 9), in forward order.

    ``kind`` is "conv" or "linear"; a linear layer has kernel_size = stride = in_size = out_size = 1 and
    its features as channels. ``in_size`` / ``out_size`` are the sides of the (square) input and output
    feature maps, ``params`` counts weights and biases, ``depthwise`` marks convs with one group per input
    channel (groups == in_channels > 1).
    """

    index: int
    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    in_size: int
    out_size: int
    params: int
    depthwise: bool

    @property
    def macs(self) -> int:
        """Multiply-accumulates per input image: weights per filter * filters * output positions."""
        per_filter = (1 if self.depthwise else self.in_channels) * self.kernel_size**2
        return per_filter * self.out_channels * self.out_size**2


def layer_infos(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerInfo]:
    """Every Conv2d and Linear layer of ``model`` in the order a forward pass runs them.

    Read by ``qrobust.graph`` with shapes from one dummy image of ``input_shape`` = (C, H, W) with
    H == W, in [0, 1] (filled with 0.5); ``model`` is left in its train/eval mode. Raises ValueError
    for a layer that runs twice per pass (one bit-width per layer would be ambiguous), a grouped conv
    that is not depthwise, a non-square kernel, stride or feature map, or a model with no such layer.
    """
    if len(input_shape) != 3 or any(not isinstance(side, int) or side < 1 for side in input_shape):
        raise ValueError(f"input_shape must be (C, H, W) of positive integers, got {input_shape!r}")
    graph = check_supported(model, torch.full((1, *input_shape), 0.5), "mixed")
    infos: list[LayerInfo] = []
    for layer in graph.affine():
        if layer.name != layer.target:
            raise ValueError(
                f"layer {layer.target!r} runs more than once per forward pass; a bit policy needs each layer once"
            )
        module = cast(nn.Conv2d | nn.Linear, layer.module)  # graph.affine(): the conv and linear layers
        shapes, output_shape = layer.input_shapes, layer.output_shape
        assert shapes is not None and output_shape is not None  # traced with an example input
        infos.append(_info(len(infos), layer.name, module, shapes[0], output_shape))
    if not infos:
        raise ValueError(f"{graph.model} runs no Conv2d or Linear layer")
    return infos


def _info(index: int, name: str, module: nn.Conv2d | nn.Linear, x: tuple[int, ...], y: tuple[int, ...]) -> LayerInfo:
    """The LayerInfo of ``module`` reading shape ``x`` and writing shape ``y`` (with the batch)."""
    params = sum(p.numel() for p in module.parameters(recurse=False))
    if isinstance(module, nn.Linear):
        return LayerInfo(index, name, "linear", module.in_features, module.out_features, 1, 1, 1, 1, params, False)
    square = module.kernel_size[0] == module.kernel_size[1] and module.stride[0] == module.stride[1]
    if not square or x[-1] != x[-2] or y[-1] != y[-2]:
        raise ValueError(f"conv {name!r} has a non-square kernel, stride or feature map; BitOPs assume squares")
    depthwise = module.groups == module.in_channels > 1
    if module.groups != 1 and not depthwise:
        raise ValueError(f"conv {name!r} has {module.groups} groups; only plain and depthwise convs are supported")
    return LayerInfo(
        index,
        name,
        "conv",
        module.in_channels,
        module.out_channels,
        module.kernel_size[0],
        module.stride[0],
        x[-1],
        y[-1],
        params,
        depthwise,
    )


@dataclass(frozen=True)
class BitPolicy:
    """Weight and activation bit-widths per layer (forward order of ``layer_infos``), each in [2, 8].

    The first and the last layer must be at 8 bits for both, as in ARQ (section 3.2.1) and HAQ.
    ``act_bits[k]`` quantizes the input of layer k. Apply it with ``prepare_qat(model, policy)``.
    """

    weight_bits: tuple[int, ...]
    act_bits: tuple[int, ...]

    def __post_init__(self) -> None:
        for field in ("weight_bits", "act_bits"):
            bits = getattr(self, field)
            if not isinstance(bits, tuple) or not bits:
                raise ValueError(f"{field} must be a non-empty tuple of integers, got {bits!r}")
            bad = [b for b in bits if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS]
            if bad:
                raise ValueError(f"{field} must be integers in [{MIN_BITS}, {MAX_BITS}], got {bad[0]!r}")
            if bits[0] != MAX_BITS or bits[-1] != MAX_BITS:
                raise ValueError(
                    f"{field} of the first and last layer must be {MAX_BITS}, got {bits[0]} and {bits[-1]}"
                )
        if len(self.weight_bits) != len(self.act_bits):
            raise ValueError(
                f"weight_bits and act_bits must have one entry per layer, got {len(self.weight_bits)} and "
                f"{len(self.act_bits)}"
            )

    @property
    def num_layers(self) -> int:
        return len(self.weight_bits)

    @classmethod
    def uniform(cls, num_layers: int, bits: int) -> BitPolicy:
        """``bits`` for the weights and activations of every layer but the first and last (8 bits)."""
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
        middle = (bits,) * max(num_layers - 2, 0)
        edges = (MAX_BITS,) * min(num_layers, 2)
        row = edges[:1] + middle + edges[1:]
        return cls(row, row)

    @classmethod
    def from_actions(cls, weight_actions: Sequence[float], act_actions: Sequence[float]) -> BitPolicy:
        """The policy of continuous actions a in [0, 1] (eq. 10): b = round(b_min - 0.5 + a (b_max - b_min + 1)),
        clipped to [2, 8]; the first and last layer are set to 8 whatever their action."""

        def bits(actions: Sequence[float]) -> tuple[int, ...]:
            if not all(isinstance(a, (int, float)) and 0.0 <= a <= 1.0 for a in actions):
                raise ValueError(f"actions must be numbers in [0, 1], got {list(actions)!r}")
            span = MAX_BITS - MIN_BITS + 1
            row = [min(max(math.floor(MIN_BITS - 0.5 + a * span + 0.5), MIN_BITS), MAX_BITS) for a in actions]
            if row:
                row[0] = row[-1] = MAX_BITS
            return tuple(row)

        return cls(bits(weight_actions), bits(act_actions))

    def to_dict(self) -> dict[str, Any]:
        return {"version": POLICY_VERSION, "weight_bits": list(self.weight_bits), "act_bits": list(self.act_bits)}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> BitPolicy:
        """The inverse of ``to_dict``; raises ValueError for another version or missing/unknown keys."""
        if not isinstance(fields, dict):
            raise ValueError(f"a bit policy must be a dict, got {type(fields).__name__}")
        if fields.get("version") != POLICY_VERSION:
            raise ValueError(f"bit policy version must be {POLICY_VERSION}, got {fields.get('version')!r}")
        keys = {"version", "weight_bits", "act_bits"}
        if set(fields) != keys:
            raise ValueError(f"a bit policy has exactly the keys {sorted(keys)}, got {sorted(fields)}")
        return cls(tuple(fields["weight_bits"]), tuple(fields["act_bits"]))

    def save(self, path: str | Path) -> None:
        """Write the policy as JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> BitPolicy:
        """Read a policy written by ``save``; ValueError if the file is not one."""
        try:
            fields = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:  # a binary file's decode error would not name it
            raise ValueError(f"{path} is not a JSON bit policy: {error}") from None
        return cls.from_dict(fields)


def _check_fits(layers: Sequence[LayerInfo], policy: BitPolicy) -> None:
    if len(layers) != policy.num_layers:
        raise ValueError(f"the policy has {policy.num_layers} layers but the model has {len(layers)}")


def bitops(layers: Sequence[LayerInfo], policy: BitPolicy) -> list[int]:
    """BitOPs per input image of each layer: b_w * b_a * MACs (see the module docstring)."""
    _check_fits(layers, policy)
    return [w * a * layer.macs for layer, w, a in zip(layers, policy.weight_bits, policy.act_bits)]


def bitops_percent(layers: Sequence[LayerInfo], policy: BitPolicy) -> float:
    """Total BitOPs of ``policy`` as a percentage of the fp32 model's (32 x 32 bits per MAC)."""
    return _percent(sum(bitops(layers, policy)), layers)


def _percent(total: int, layers: Sequence[LayerInfo]) -> float:
    return 100.0 * total / (FP32_BITS**2 * sum(layer.macs for layer in layers))


def enforce_budget(layers: Sequence[LayerInfo], policy: BitPolicy, budget_percent: float) -> BitPolicy:
    """``policy`` lowered until its BitOPs are at most ``budget_percent`` of fp32 (ARQ, section 3.2.1).

    The paper's rule, "decrease the bit-width sequentially from back to front", read as HAQ's budget wall:
    sweep the layers from the last searchable one (the one before the last layer) to the second one,
    lowering the activation bits by one and then the weight bits by one (never below 2), and stop as soon
    as the budget holds; repeat the sweep while it does not. The first and last layer keep 8 bits. A
    policy within budget comes back unchanged. Raises ValueError if even 2 bits everywhere in between
    exceeds the budget.
    """
    if isinstance(budget_percent, bool) or not isinstance(budget_percent, (int, float)) or not budget_percent > 0:
        raise ValueError(f"budget_percent must be a number > 0, got {budget_percent!r}")
    _check_fits(layers, policy)
    floor = BitPolicy.uniform(policy.num_layers, MIN_BITS)
    if bitops_percent(layers, floor) > budget_percent:
        raise ValueError(
            f"a budget of {budget_percent:g}% BitOPs is out of reach: 2 bits in every layer but the first and "
            f"last (8 bits) already costs {bitops_percent(layers, floor):.4g}%"
        )
    macs = [layer.macs for layer in layers]
    weight, act = list(policy.weight_bits), list(policy.act_bits)
    total = sum(w * a * m for w, a, m in zip(weight, act, macs))
    while _percent(total, layers) > budget_percent:
        for k in range(policy.num_layers - 2, 0, -1):
            for bits in (act, weight):
                if bits[k] > MIN_BITS and _percent(total, layers) > budget_percent:
                    total -= macs[k] * weight[k] * act[k]
                    bits[k] -= 1
                    total += macs[k] * weight[k] * act[k]
    return BitPolicy(tuple(weight), tuple(act))
