"""int8 quantization: fake-quant training (QAT) or calibration (PTQ), integer-only inference, fast backend.

Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference" (CVPR 2018). The flow::

    qat = prepare_qat(model)                 # fake-quantized copy; train it with qrobust.train.train ...
    calibrate(qat, images)                   # ... or only calibrate its ranges (post-training quantization)
    int8 = convert(qat)                      # integer reference engine: uint8 images -> int32 logits
    fast = fast_backend(int8)                # the same integers on torch's oneDNN int8 kernels
    save_int8("model.int8.pt", int8, metadata)
    int8 = load_int8("model.int8.pt").model

Low-bit weights (binary, ternary, 4-bit) by BinaryConnect / Binary-Relax training, and the sparsity
they bring: ``WeightQuantizer`` hooks into ``qrobust.train``; ``prune_channels`` removes the channels
it zeroed, with identical outputs.

Low-bit weights of a trained model by ADMM, optionally within certified weight-perturbation radii
(Weng et al. 2020; the LB baseline of Leng et al. 2018): ``admm_quantize(model, train_set,
ADMMConfig(bits=4), epsilons=...)``; ``save_codes`` / ``load_codes`` keep the integer codes and scales.

Mixed precision (ARQ, Yang et al. 2025): a ``BitPolicy`` of per-layer weight/activation bits, priced by
``bitops_percent(layer_infos(model, shape), policy)`` and cut to a budget by ``enforce_budget``, goes
through the same verbs: ``calibrate(prepare_qat(model, policy), images)`` (or ``quantize``).
"""

from qrobust.quant.admm import (
    ADMMConfig,
    ADMMResult,
    admm_quantize,
    load_codes,
    save_codes,
)
from qrobust.quant.backend import Int8Backend, QuantizedBackend, fast_backend
from qrobust.quant.engine import Int8Model
from qrobust.quant.lowbit import (
    LowBitConfig,
    LowBitWeight,
    WeightQuantizer,
    lowbit_project,
    lowbit_quantize,
)
from qrobust.quant.mixed import (
    BitPolicy,
    LayerInfo,
    MixedPrecisionModel,
    QuantizedLayer,
    bitops,
    bitops_percent,
    enforce_budget,
    kl_clip,
    layer_infos,
    quantize,
)
from qrobust.quant.prepare import prepare_qat
from qrobust.quant.qat import QATModel, QuantConfig, calibrate, convert
from qrobust.quant.serialization import Int8Checkpoint, load_int8, save_int8
from qrobust.quant.sparsity import (
    PruneDecision,
    SparsityReport,
    prune_channels,
    pruning_report,
    sparsity_report,
)

__all__ = [
    "ADMMConfig",
    "ADMMResult",
    "BitPolicy",
    "Int8Backend",
    "Int8Checkpoint",
    "Int8Model",
    "LayerInfo",
    "LowBitConfig",
    "LowBitWeight",
    "MixedPrecisionModel",
    "PruneDecision",
    "QATModel",
    "QuantConfig",
    "QuantizedBackend",
    "QuantizedLayer",
    "SparsityReport",
    "WeightQuantizer",
    "admm_quantize",
    "bitops",
    "bitops_percent",
    "calibrate",
    "convert",
    "enforce_budget",
    "fast_backend",
    "kl_clip",
    "layer_infos",
    "load_codes",
    "load_int8",
    "lowbit_project",
    "lowbit_quantize",
    "prepare_qat",
    "prune_channels",
    "pruning_report",
    "quantize",
    "save_codes",
    "save_int8",
    "sparsity_report",
]
