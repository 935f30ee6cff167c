"""Randomized smoothing: predict and certify with a noisy base classifier, and summarise the results."""

from qrobust.smoothing.core import Certificate, Prediction, SmoothedClassifier, clopper_pearson_lower
from qrobust.smoothing.metrics import DEFAULT_RADII, CertifiedSummary, certified_accuracy_curve, summarize
from qrobust.smoothing.records import ABSTAIN, HEADER, CertifyRow, read_certify_tsv, summarize_rows
from qrobust.smoothing.run import certify_examples, evenly_spaced, example_generator

__all__ = [
    "ABSTAIN",
    "DEFAULT_RADII",
    "HEADER",
    "Certificate",
    "CertifiedSummary",
    "CertifyRow",
    "Prediction",
    "SmoothedClassifier",
    "certified_accuracy_curve",
    "certify_examples",
    "clopper_pearson_lower",
    "evenly_spaced",
    "example_generator",
    "read_certify_tsv",
    "summarize",
    "summarize_rows",
]
