"""Certified robustness to weight perturbations, and certificates that quantization keeps predictions.

Weng et al., "Towards Certificated Model Robustness Against Weight Perturbations" (AAAI 2020)::

    network = ReluNetwork.from_model(model)                       # Linear/Conv2d chain, Normalize folded in
    ok = certify(network, images, labels, WeightPerturbation(layers=(2,), eps=1e-3))
    eps = certified_eps(network, images, labels, layers=(2,))      # (N,) largest certified radius
    result = verify_quantization(model, int8_model, images)       # int8 prediction == float prediction?
"""

from qrobust.bounds.certify import (
    LayerCertificate,
    certified_eps,
    certified_eps_table,
    certify,
    margin_bounds,
)
from qrobust.bounds.interval import LayerBall, interval_logits, interval_margins
from qrobust.bounds.linear import SingleLayerBound
from qrobust.bounds.network import Affine, ReluNetwork
from qrobust.bounds.perturbation import AffineNoise, WeightPerturbation
from qrobust.bounds.quantization import (
    QuantizationCertificate,
    QuantizationNoise,
    quantization_noise,
    verify_quantization,
)

__all__ = [
    "Affine",
    "AffineNoise",
    "LayerBall",
    "LayerCertificate",
    "QuantizationCertificate",
    "QuantizationNoise",
    "ReluNetwork",
    "SingleLayerBound",
    "WeightPerturbation",
    "certified_eps",
    "certified_eps_table",
    "certify",
    "interval_logits",
    "interval_margins",
    "margin_bounds",
    "quantization_noise",
    "verify_quantization",
]
