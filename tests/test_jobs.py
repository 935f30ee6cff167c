"""Certify and predict jobs: validated settings, and a clear message when Ray is missing."""

import sys

import pytest

from qrobust.errors import QRobustError
from qrobust.jobs import SmoothingJob, run_ray


@pytest.mark.parametrize(
    "change, message",
    [
        ({"command": "attack"}, "command must be"),
        ({"method": "float"}, "method must be"),
        ({"sigma": 0.0}, "sigma"),
        ({"n": 0}, "n must be"),
        ({"alpha": 1.0}, "alpha must be"),
        ({"batch_size": 0}, "batch_size must be"),
    ],
)
def test_job_rejects_bad_settings(change, message):
    settings = {"command": "certify", "checkpoint": "model.pt", "method": "float-fp", "sigma": 0.25, "n": 100, "alpha": 0.01}
    with pytest.raises((ValueError, QRobustError), match=message):
        SmoothingJob(**(settings | change))


def test_ray_backend_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    job = SmoothingJob("certify", "model.pt", "float-fp", 0.25, 100, 0.01)
    with pytest.raises(QRobustError, match=r"pip install 'qrobust\[ray\]'"):
        list(run_ray(job, [0, 1], workers=2))
