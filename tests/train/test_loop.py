import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from qrobust.data import load_dataset
from qrobust.errors import CheckpointError, QRobustError
from qrobust.models import build_model
from qrobust.models.checkpoint import load_checkpoint, model_metadata
from qrobust.outputs import exclusive_lock
from qrobust.quant import calibrate, convert, fast_backend, prepare_qat
from qrobust.smoothing import FloatRS, IntRS
from qrobust.train import TrainConfig, accuracy, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _model(info):
    torch.manual_seed(0)
    return build_model("mlp", info, depth=2, width=64)


def test_noise_training_learns_digits(digits):
    train_set, test_set = digits
    model = _model(train_set.info)
    config = TrainConfig(epochs=4, batch_size=32, lr=0.05, sigma=0.1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a run that learns is not warned about
        history = train(model, train_set, config, test_set=test_set, progress=False)
    assert [stats.epoch for stats in history] == [1, 2, 3, 4]
    assert history[-1].loss < history[0].loss
    assert history[-1].test_accuracy == pytest.approx(accuracy(model, test_set))
    assert accuracy(model, test_set) > 0.85


def test_a_run_that_learns_nothing_is_warned(digits):
    train_set, _ = digits
    config = TrainConfig(epochs=2, batch_size=32, lr=1e4, seed=0)  # diverges at once
    with pytest.warns(
        UserWarning, match=r"epochs 1-2: training accuracy 0\.\d+, 0\.\d+ is at chance level \(10 classes\)"
    ):
        train(_model(train_set.info), train_set, config, progress=False)


def test_learning_rate_steps(digits):
    train_set, _ = digits
    config = TrainConfig(epochs=3, batch_size=128, lr=0.1, lr_step=2, lr_gamma=0.5)
    history = train(_model(train_set.info), train_set, config, progress=False)
    assert [stats.lr for stats in history] == pytest.approx([0.1, 0.1, 0.05])


def test_resumed_run_equals_uninterrupted_run(digits, tmp_path):
    train_set, test_set = digits
    metadata = model_metadata("mlp", {"depth": 2, "width": 64}, train_set.info)
    config = TrainConfig(epochs=3, batch_size=64, lr=0.05, lr_step=2, sigma=0.25, seed=3)
    straight = _model(train_set.info)
    expected = train(
        straight,
        train_set,
        config,
        test_set=test_set,
        checkpoint_path=tmp_path / "a.pt",
        metadata=metadata,
        progress=False,
    )

    interrupted = _model(train_set.info)
    train(
        interrupted,
        train_set,
        TrainConfig(**{**config.__dict__, "epochs": 1}),
        checkpoint_path=tmp_path / "b.pt",
        test_set=test_set,
        metadata=metadata,
        progress=False,
    )
    resumed = _model(train_set.info)
    history = train(
        resumed,
        train_set,
        config,
        test_set=test_set,
        checkpoint_path=tmp_path / "b.pt",
        metadata=metadata,
        resume=True,
        progress=False,
    )

    assert [(s.epoch, s.loss, s.test_accuracy) for s in history] == [
        (s.epoch, s.loss, s.test_accuracy) for s in expected
    ]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert load_checkpoint(tmp_path / "b.pt").metadata["epochs_done"] == 3


def test_a_second_run_on_a_checkpoint_being_written_refuses(digits, tmp_path):
    train_set, _ = digits
    path = tmp_path / "model.pt"
    config = TrainConfig(epochs=1, batch_size=64, lr=0.05, seed=0)
    with exclusive_lock(path):  # as a first run holds it while it trains
        with pytest.raises(QRobustError, match="being written by another run"):
            train(_model(train_set.info), train_set, config, checkpoint_path=path, resume=True, progress=False)
    assert not path.exists()
    train(_model(train_set.info), train_set, config, checkpoint_path=path, progress=False)  # free again
    assert path.exists() and not path.with_name("model.pt.lock").exists()


def test_resume_refuses_a_different_config(digits, tmp_path):
    train_set, _ = digits
    metadata = model_metadata("mlp", {"depth": 2, "width": 64}, train_set.info)
    train(
        _model(train_set.info),
        train_set,
        TrainConfig(epochs=1, sigma=0.25),
        checkpoint_path=tmp_path / "c.pt",
        metadata=metadata,
        progress=False,
    )
    with pytest.raises(CheckpointError, match="different sigma"):
        train(
            _model(train_set.info),
            train_set,
            TrainConfig(epochs=2, sigma=0.5),
            checkpoint_path=tmp_path / "c.pt",
            resume=True,
            progress=False,
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", 0), ("batch_size", -1), ("lr", 0.0), ("sigma", -0.1), ("momentum", float("nan")), ("lr_step", 1.5)],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


# --- plain PyTorch data and every kind of model (issue #18) ----------------------------------------


def test_train_and_accuracy_take_plain_pytorch_datasets(digits):
    train_set, test_set = digits
    plain_train = TensorDataset(train_set.images, train_set.labels)  # uint8 lattice images
    plain_test = DataLoader(TensorDataset(test_set.floats(), test_set.labels), batch_size=100)  # [0, 1] floats
    config = TrainConfig(epochs=1, batch_size=64, lr=0.05, seed=0)
    expected = _model(train_set.info)
    expected_history = train(expected, train_set, config, test_set=test_set, progress=False)
    model = _model(train_set.info)
    history = train(model, plain_train, config, test_set=plain_test, progress=False)
    assert [(s.loss, s.test_accuracy) for s in history] == [(s.loss, s.test_accuracy) for s in expected_history]
    assert accuracy(model, plain_test) == accuracy(expected, test_set) > 0.5


@pytest.fixture(scope="module")
def quantized(digits):
    """A digits MLP trained one epoch, its calibrated fake-quant twin and the int8 model converted from it."""
    train_set, _ = digits
    model = _model(train_set.info)
    train(model, train_set, TrainConfig(epochs=1, batch_size=64, lr=0.05, seed=0), progress=False)
    qat = calibrate(prepare_qat(model).eval(), train_set.images[:256])
    return qat, convert(qat)


def _predict_accuracy(int8, images, labels) -> float:
    return (int8.predict(images) == labels).double().mean().item()


def test_accuracy_of_an_int8_model_is_its_own_prediction_accuracy(digits, quantized):
    _, test_set = digits
    qat, int8 = quantized
    expected = _predict_accuracy(int8, test_set.images, test_set.labels)
    assert expected > 0.5
    assert accuracy(int8, test_set) == pytest.approx(expected)
    assert accuracy(fast_backend(int8), test_set) == pytest.approx(expected)
    assert accuracy(qat, test_set) == pytest.approx(expected, abs=0.02)  # the fake-quant twin, on floats


def test_accuracy_of_int8_and_fp32_onnx_models(digits, quantized):
    pytest.importorskip("onnxruntime")
    from qrobust.quant.export import OnnxRuntimeModel, to_onnx

    _, test_set = digits
    _, int8 = quantized
    assert accuracy(OnnxRuntimeModel(to_onnx(int8), threads=1), test_set) == pytest.approx(
        _predict_accuracy(int8, test_set.images, test_set.labels)
    )
    model = _model(test_set.info)
    fp32 = OnnxRuntimeModel(to_onnx(model, test_set.info.shape), threads=1)
    assert accuracy(fp32, test_set) == pytest.approx(accuracy(model, test_set), abs=1 / len(test_set))


def test_accuracy_of_an_int8_model_under_noise_uses_lattice_noise(digits, quantized):
    _, test_set = digits
    _, int8 = quantized
    noisy = accuracy(int8, test_set, noise=IntRS(0.25), generator=torch.Generator().manual_seed(0))
    expected = IntRS(0.25).perturb(test_set.images, torch.Generator().manual_seed(0))
    assert noisy == pytest.approx(_predict_accuracy(int8, expected, test_set.labels))
    with pytest.raises(QRobustError, match=r"int8 model reads integer lattice values, but .* gives floats: use IntRS"):
        accuracy(int8, test_set, noise=FloatRS(0.25))


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_training_on_the_cpu_by_name_equals_the_default_run(digits, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    train_set, test_set = digits
    config = TrainConfig(epochs=1, batch_size=64, lr=0.05, sigma=0.25, seed=1)
    default, named = _model(train_set.info), _model(train_set.info)
    expected = train(default, train_set, config, test_set=test_set, progress=False)
    history = train(named, train_set, config, test_set=test_set, progress=False, device=device)
    assert [(s.loss, s.accuracy, s.test_accuracy) for s in history] == [
        (s.loss, s.accuracy, s.test_accuracy) for s in expected
    ]
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), named.state_dict().values()))

    def noisy(model, **kwargs):
        return accuracy(model, test_set, noise=FloatRS(0.25), generator=torch.Generator().manual_seed(0), **kwargs)

    assert noisy(named, device=device) == noisy(default)


def test_an_absent_device_is_one_error_line_and_int8_models_stay_on_the_cpu(digits, quantized, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    train_set, test_set = digits
    with pytest.raises(QRobustError, match="device 'cuda' is not available"):
        train(_model(train_set.info), train_set, TrainConfig(epochs=1), progress=False, device="cuda")
    with pytest.raises(QRobustError, match="device 'cuda' is not available"):
        accuracy(_model(train_set.info), test_set, device="cuda")
    with pytest.raises(QRobustError, match="an int8 model runs on the CPU only"):
        accuracy(quantized[1], test_set, device=torch.device("meta"))
