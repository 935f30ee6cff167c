"""certify --runtime onnxruntime: the exported model certifies as the torch one does."""

import pytest

from qrobust.smoothing import read_certify_tsv

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SETTINGS = ("--sigma", "0.25", "--n0", "20", "--n", "300", "--alpha", "0.01", "--num-examples", "8", "--noise-bank")


@pytest.mark.parametrize("method", ["float-fp", "int"])
def test_onnxruntime_certifies_like_torch(run, checkpoint, tmp_path, method):
    model = checkpoint
    if method == "int":
        model = tmp_path / "model.int8.pt"
        assert run("quantize", checkpoint, "--output", model)[0] == 0
    results = {}
    for runtime in ("torch", "onnxruntime"):
        results[runtime] = tmp_path / f"{runtime}.tsv"
        code, out, _ = run(
            "certify", model, *SETTINGS, "--method", method, "--runtime", runtime, "--output", results[runtime]
        )
        assert code == 0, out
    torch_rows, onnx_rows = (read_certify_tsv(results[runtime]) for runtime in ("torch", "onnxruntime"))
    assert [row.predict for row in onnx_rows] == [row.predict for row in torch_rows]
    assert max(abs(a.radius - b.radius) for a, b in zip(onnx_rows, torch_rows, strict=True)) < 0.02
    assert sum(row.predict != -1 for row in torch_rows) >= 4


def test_unknown_runtime_is_one_error_line(run, checkpoint, tmp_path):
    code, _, err = run("certify", checkpoint, *SETTINGS, "--runtime", "tflite", "--output", tmp_path / "o.tsv")
    assert code == 2 and "runtime must be one of torch, onnxruntime" in err and err.count("\n") == 1
