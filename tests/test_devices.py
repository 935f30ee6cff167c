"""Device resolution: auto, named devices, absent ones as one QRobustError line."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from qrobust.devices import check_device_name, generator_on, module_device, require_cpu, resolve_device
from qrobust.errors import QRobustError


def test_cpu_and_auto_resolve_to_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("cpu") == resolve_device("auto") == resolve_device(None) == torch.device("cpu")


def test_auto_takes_cuda_when_torch_sees_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "mps"])
def test_an_absent_accelerator_is_one_error_line(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(QRobustError, match=f"device '{name.split(':')[0]}' is not available") as error:
        resolve_device(name)
    assert "\n" not in str(error.value)


def test_a_missing_gpu_index_and_unknown_names_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(QRobustError, match="torch sees 1 CUDA GPU"):
        resolve_device("cuda:1")
    with pytest.raises(QRobustError, match="device must be one of auto, cpu, cuda, mps"):
        resolve_device("tpu")


def test_module_device_and_cpu_only_paths():
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(nn.ReLU()) == torch.device("cpu")
    require_cpu("cpu", "an int8 model")
    with pytest.raises(QRobustError, match="an int8 model runs on the CPU only"):
        require_cpu("meta", "an int8 model")


def test_a_generator_already_on_the_device_is_kept():
    generator = torch.Generator().manual_seed(0)
    assert generator_on(torch.device("cpu"), generator) is generator
    assert generator_on(torch.device("cpu"), None) is None


def test_device_names_are_checked_without_importing_torch():
    code = "import sys; from qrobust.devices import check_device_name as c; c('cuda:1'); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout == "False\n"
    for name in ("auto", "cpu", "cuda", "cuda:3", "mps"):
        assert check_device_name(name) == name
    for name in ("gpu", "cuda:", "cuda:x", "mps:0", "CPU"):
        with pytest.raises(QRobustError, match="device must be one of auto, cpu, cuda, mps"):
            check_device_name(name)
