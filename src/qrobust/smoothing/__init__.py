"""Randomized smoothing: predict and certify with a noisy base classifier, and summarise the results."""

from qrobust.smoothing.confidence import clopper_pearson_lower
from qrobust.smoothing.core import Certificate, Prediction, SmoothedClassifier
from qrobust.smoothing.incremental import (
    CertificationCache,
    IncrementalCertificate,
    acr,
    certify_incremental,
    certify_original,
    summarize_certificates,
)
from qrobust.smoothing.methods import FloatRS, FloatRSQuant, IntRS, LatticeRS, SmoothingMethod
from qrobust.smoothing.metrics import DEFAULT_RADII, CertifiedSummary, certified_accuracy_curve, summarize
from qrobust.smoothing.records import (
    ABSTAIN,
    CERTIFY_HEADER,
    CERTIFY_SAMPLES_HEADER,
    PREDICT_HEADER,
    CertifyRow,
    PredictRow,
    read_certify_tsv,
    read_predict_tsv,
    summarize_rows,
)
from qrobust.smoothing.run import certify_examples, evenly_spaced, example_generator, predict_examples

__all__ = [
    "ABSTAIN",
    "CERTIFY_HEADER",
    "CERTIFY_SAMPLES_HEADER",
    "DEFAULT_RADII",
    "PREDICT_HEADER",
    "Certificate",
    "CertificationCache",
    "CertifiedSummary",
    "CertifyRow",
    "FloatRS",
    "FloatRSQuant",
    "IncrementalCertificate",
    "IntRS",
    "LatticeRS",
    "PredictRow",
    "Prediction",
    "SmoothedClassifier",
    "SmoothingMethod",
    "acr",
    "certified_accuracy_curve",
    "certify_examples",
    "certify_incremental",
    "certify_original",
    "clopper_pearson_lower",
    "evenly_spaced",
    "example_generator",
    "predict_examples",
    "read_certify_tsv",
    "read_predict_tsv",
    "summarize",
    "summarize_certificates",
    "summarize_rows",
]
