import pytest
import torch

from qrobust.data import DatasetInfo
from qrobust.models import build_model
from qrobust.models.inference import freeze_for_inference

GRAY = DatasetInfo("gray", (1, 28, 28), tuple("abcdefghij"), (0.3,), (0.3,))
COLOR = DatasetInfo("color", (3, 32, 32), tuple("abcdefghij"), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


@pytest.mark.parametrize(("name", "info"), [("mlp", GRAY), ("cnn", GRAY), ("resnet20", COLOR)])
def test_frozen_model_matches_eager_for_any_batch_size(name, info):
    torch.manual_seed(0)
    model = build_model(name, info).eval()
    if name == "resnet20":  # give BatchNorm non-trivial statistics so folding is exercised
        model.train()
        with torch.no_grad():
            model(torch.rand(64, *info.shape))
        model.eval()
    frozen = freeze_for_inference(model, torch.rand(8, *info.shape))
    for batch in (1, 8, 33):
        x = torch.rand(batch, *info.shape)
        with torch.no_grad():
            expected = model(x)
        assert torch.allclose(frozen(x), expected, rtol=1e-4, atol=1e-4)
    assert model.training is False and isinstance(model.normalize, torch.nn.Module)
