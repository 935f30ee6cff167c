"""The top-level namespace: ``import qrobust`` is light, and every exported name resolves."""

import inspect
import subprocess
import sys

import pytest
import torch

import qrobust


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_import_does_not_import_torch():
    assert _run("import sys, qrobust; print('torch' in sys.modules)") == "False"


def test_every_exported_name_resolves():
    for name in qrobust.__all__:
        assert getattr(qrobust, name) is not None, name
    assert set(qrobust.__all__) <= set(dir(qrobust))
    assert qrobust.prepare is qrobust.prepare_qat
    assert issubclass(qrobust.QRobustError, ValueError)


def test_train_is_the_training_package_callable_as_its_function():
    import qrobust.train.loop as loop  # the package stays importable as usual

    assert qrobust.train is sys.modules["qrobust.train"]
    assert "device" in inspect.signature(qrobust.train).parameters
    data = qrobust.load_dataset("digits", "test")
    config = qrobust.TrainConfig(epochs=1, batch_size=128, lr=0.05, seed=0)
    histories = []
    for run in (qrobust.train, loop.train):
        torch.manual_seed(0)
        model = qrobust.build_model("mlp", data.info, depth=2, width=16)
        histories.append([(s.loss, s.accuracy) for s in run(model, data, config, progress=False, device="cpu")])
    assert histories[0] == histories[1]


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        qrobust.nonexistent  # noqa: B018
