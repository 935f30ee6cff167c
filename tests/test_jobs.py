"""Certify and predict jobs: validated settings, memory checked before allocating, and a clear message when Ray is missing."""

import pickle
import sys
from dataclasses import asdict

import pytest
import torch

from qrobust import jobs
from qrobust.data import LatticeDataset, dataset_info
from qrobust.errors import QRobustError
from qrobust.jobs import SmoothingJob, run_ray
from qrobust.models import build_model
from qrobust.models.checkpoint import Checkpoint, model_metadata, save_checkpoint
from qrobust.quant import QuantConfig, calibrate, convert, prepare_qat, save_int8
from qrobust.smoothing import LatticeRS


@pytest.mark.parametrize(
    "change, message",
    [
        ({"command": "attack"}, "command must be"),
        ({"method": "float"}, "method must be"),
        ({"sigma": 0.0}, "sigma"),
        ({"n": 0}, "n must be"),
        ({"alpha": 1.0}, "alpha must be"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"device": "gpu"}, "device must be one of auto, cpu, cuda, mps"),
    ],
)
def test_job_rejects_bad_settings(change, message):
    settings = {
        "command": "certify",
        "checkpoint": "model.pt",
        "method": "float-fp",
        "sigma": 0.25,
        "n": 100,
        "alpha": 0.01,
    }
    with pytest.raises((ValueError, QRobustError), match=message):
        SmoothingJob(**(settings | change))


def test_ray_backend_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    job = SmoothingJob("certify", "model.pt", "float-fp", 0.25, 100, 0.01)
    with pytest.raises(QRobustError, match=r"pip install 'qrobust\[ray\]'"):
        list(run_ray(job, [0, 1], workers=2))


class DataLoaded(Exception):
    """Raised in place of loading the dataset: the job got past every memory check."""


@pytest.fixture
def no_data(monkeypatch):
    """Opening a job stops where the dataset would load, past every memory check."""

    def load_dataset(*args, **kwargs):
        raise DataLoaded

    monkeypatch.setattr(jobs, "load_dataset", load_dataset)


@pytest.fixture
def fashion_cnn(tmp_path, no_data):
    """An untrained Fashion-MNIST-shaped CNN checkpoint."""
    info = dataset_info("fashion-mnist")
    path = tmp_path / "cnn.pt"
    save_checkpoint(path, Checkpoint(build_model("cnn", info).state_dict(), model_metadata("cnn", {}, info)))
    return str(path)


@pytest.fixture
def fashion_int8(tmp_path, no_data):
    """A small Fashion-MNIST-shaped int8 MLP, calibrated on random images."""
    info = dataset_info("fashion-mnist")
    torch.manual_seed(0)
    qat = prepare_qat(build_model("mlp", info, depth=2, width=16), QuantConfig())
    int8 = convert(calibrate(qat, torch.randint(0, 256, (16, *info.shape), dtype=torch.uint8)))
    path = tmp_path / "mlp.int8.pt"
    save_int8(path, int8, model_metadata("mlp", {"depth": 2, "width": 16}, info))
    return str(path)


@pytest.mark.parametrize("command", ["certify", "predict"])
def test_a_huge_n_is_refused_when_the_job_is_made(command):
    with pytest.raises(QRobustError) as error:
        SmoothingJob(command, "absent.pt", "float-fp", 0.25, 10**12, 0.01, memory_limit=100)
    assert str(error.value) == (
        "n = 1,000,000,000,000 noisy samples (an int64 prediction each) needs ~7,451 GiB, "
        "above the memory limit of 100 GiB; pass --memory-limit to raise it or lower --n"
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"n": 3 * 10**6, "noise_bank": True, "memory_limit": 4},
            "a noise bank of 3,000,100 noise images of 1x28x28 needs ~8.76 GiB, above the memory limit of 4 GiB",
        ),
        (
            {"batch_size": 10**6, "memory_limit": 64},
            "a batch of 1,000,000 noisy samples needs ~570 GiB, above the memory limit of 64 GiB",
        ),
    ],
)
def test_a_noise_bank_or_batch_above_the_limit_is_refused_before_it_or_the_data_is_allocated(
    fashion_cnn, change, message
):
    settings = {"n": 1000, "alpha": 0.01, "fast": False} | change
    job = SmoothingJob("certify", fashion_cnn, "float-fp", 0.25, **settings)
    with pytest.raises(QRobustError, match=message):
        job.open()


def test_an_int_noise_bank_counts_int16_noise(fashion_int8):
    """The issue's n = 10^7 bank of discrete noise for an int8 model: 2 bytes a value."""
    job = SmoothingJob("certify", fashion_int8, "int", 0.25, 10**7, 0.01, fast=False, noise_bank=True, memory_limit=8)
    with pytest.raises(
        QRobustError,
        match=r"a noise bank of 10,000,100 noise images of 1x28x28 needs ~14.6 GiB, above the memory limit of 8 GiB",
    ):
        job.open()
    with pytest.raises(DataLoaded):  # without the bank, its default batch is well within the limit
        SmoothingJob("certify", fashion_int8, "int", 0.25, 10**7, 0.01, fast=False, memory_limit=1).open()


def test_a_job_within_the_limit_gets_past_the_checks(fashion_cnn):
    """Default settings on a Fashion-MNIST CNN need about 0.15 GiB; the bank of n = 10^5 0.3 GiB."""
    job = SmoothingJob(
        "certify", fashion_cnn, "float-fp", 0.25, 10**5, 0.01, fast=False, noise_bank=True, memory_limit=0.5
    )
    with pytest.raises(DataLoaded):
        job.open()


def test_the_memory_limit_is_not_a_setting_of_the_results():
    """It stays out of the run config (``asdict``) and equality, and travels with the job to Ray workers."""
    job = SmoothingJob("certify", "model.pt", "float-fp", 0.25, 100, 0.01, memory_limit=3.5)
    assert "memory_limit" not in asdict(job) and job == SmoothingJob("certify", "model.pt", "float-fp", 0.25, 100, 0.01)
    assert pickle.loads(pickle.dumps(job))._memory_limit == 3.5


def test_lattice_smooths_the_fp32_checkpoint_end_to_end(fashion_cnn, monkeypatch):
    """``method="lattice"`` loads the float checkpoint (model_kind "float"), feeds it float32 lattice
    points, and certifies with IntRS's radius; the fast (frozen) path gives the same rows as the eager one."""
    info = dataset_info("fashion-mnist")
    images = torch.randint(0, 256, (3, *info.shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(jobs, "load_dataset", lambda *a, **k: LatticeDataset(images, torch.tensor([0, 1, 2]), info))
    rows = {}
    for fast in (False, True):
        job = SmoothingJob("certify", fashion_cnn, "lattice", 0.25, 200, 0.01, 20, fast=fast)
        smoothed, data, _ = job.open()
        assert isinstance(smoothed.method, LatticeRS)
        rows[fast] = [(row.predict, row.radius) for row in job.rows(smoothed, data, [0, 1, 2])]
    assert rows[False] == rows[True]


def test_new_options_are_recorded_and_checked():
    job = SmoothingJob("certify", "model.pt", "int", 0.25, 100, 0.01, settle_radii=(0.0, 0.25), sequential="union")
    assert asdict(job)["sequential"] == "union" and asdict(job)["randomized_bound"] is False
    assert asdict(SmoothingJob("certify", "m.pt", "float-fp", 0.25, 100, 0.01, randomized_bound=True))[
        "randomized_bound"
    ]
    for settings, message in (
        ({"sequential": "peek"}, "sequential must be"),
        ({"settle_radii": (0.25,), "randomized_bound": True}, "randomized_bound applies"),
        ({"command": "predict", "randomized_bound": True}, "randomized_bound applies"),
        ({"settle_radii": (float("nan"),)}, "radii"),
    ):
        arguments = {
            "command": "certify",
            "checkpoint": "m.pt",
            "method": "float-fp",
            "sigma": 0.25,
            "n": 100,
            "alpha": 0.01,
        } | settings
        with pytest.raises(QRobustError, match=message):
            SmoothingJob(**arguments)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_a_cpu_job_by_name_gives_the_default_rows(fashion_cnn, monkeypatch, device):
    """``device`` defaults to "cpu" in the run config; "auto" without a GPU is the CPU, and both run the
    frozen fast path with the same noise as a job without the field."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    info = dataset_info("fashion-mnist")
    images = torch.randint(0, 256, (2, *info.shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(jobs, "load_dataset", lambda *a, **k: LatticeDataset(images, torch.tensor([0, 1]), info))
    rows = {}
    for settings in ({}, {"device": device}):
        job = SmoothingJob("certify", fashion_cnn, "float-fp", 0.25, 200, 0.01, 20, **settings)
        smoothed, data, _ = job.open()
        assert smoothed.device == torch.device("cpu") and isinstance(smoothed.base, torch.jit.ScriptModule)
        rows[job.device] = [(row.predict, row.radius) for row in job.rows(smoothed, data, [0, 1])]
    assert asdict(SmoothingJob("certify", "m.pt", "float-fp", 0.25, 100, 0.01))["device"] == "cpu"
    assert rows["cpu"] == rows[device]


def test_devices_are_resolved_when_the_job_is_opened_and_int8_stays_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    job = SmoothingJob("certify", "absent.pt", "float-fp", 0.25, 100, 0.01, device="cuda")  # made anywhere
    with pytest.raises(QRobustError, match="device 'cuda' is not available"):
        job.open()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert SmoothingJob("certify", "m.pt", "int", 0.25, 100, 0.01, device="auto").resolved_device().type == "cpu"
    assert SmoothingJob("certify", "m.pt", "float-fp", 0.25, 100, 0.01, device="auto").resolved_device().type == "cuda"
    with pytest.raises(QRobustError, match="int on an int8 model runs on the CPU only"):
        SmoothingJob("certify", "m.pt", "int", 0.25, 100, 0.01, device="cuda").resolved_device()
    with pytest.raises(QRobustError, match="the onnxruntime runtime runs on the CPU only"):
        SmoothingJob("predict", "m.pt", "float-fp", 0.25, 100, 0.01, runtime="onnxruntime", device="cuda").open()
