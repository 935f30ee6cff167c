"""The command line's workflows called from Python: train a checkpoint, then convert it to int8."""

from qrobust.models.checkpoint import load_checkpoint
from qrobust.quant import load_int8
from qrobust.recipes import quantize_int8, train_checkpoint
from qrobust.train import TrainConfig


def test_train_then_post_training_int8_from_python(tmp_path):
    checkpoint, int8 = tmp_path / "mlp.pt", tmp_path / "mlp.int8.pt"
    lines = []
    config = TrainConfig(epochs=1, batch_size=64, lr=0.05, sigma=0.25, seed=0)
    result = train_checkpoint(
        checkpoint,
        config,
        model="mlp",
        model_options={"depth": 2, "width": 32},
        dataset="digits",
        train_subset=400,
        test_subset=200,
        log=lines.append,
    )
    assert lines[0].startswith("mlp (") and "400 training images" in lines[0]
    assert (
        result.test_images == 200 and 0.3 < result.clean <= 1 and result.noisy is not None and result.sparsity is None
    )
    saved = load_checkpoint(checkpoint).metadata
    assert saved["model_options"] == {"depth": 2, "width": 32} and saved["accuracy"]["clean"] == result.clean

    converted = quantize_int8(checkpoint, int8, calibration_images=64)
    assert converted.quantization == "ptq" and converted.size == int8.stat().st_size < converted.fp32_size
    assert 0.8 <= converted.agreement <= 1 and load_int8(int8).metadata["dataset"]["name"] == "digits"
