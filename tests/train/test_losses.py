import pytest
import torch
import torch.nn.functional as F

from qrobust.attacks import PGD, robust_accuracy
from qrobust.data import load_dataset
from qrobust.models import build_model
from qrobust.models.checkpoint import model_metadata
from qrobust.train import TrainConfig, train
from qrobust.train.losses import AttackConfig, TradeoffLoss, TradesLoss, kl_from, make_objective, natural_loss


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _mlp(info, seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", info, depth=2, width=64)


def _batch(data, size=64):
    return data.floats()[:size], data.labels[:size]


ATTACK = AttackConfig(eps=0.1, step_size=0.025, steps=5)


def test_pgd_training_is_the_tradeoff_loss_without_natural_term(digits):
    model = _mlp(digits[0].info).eval()
    inputs, labels = _batch(digits[0])
    loss, logits = make_objective("pgd", alpha=1.0, beta=1.0, attack=ATTACK)(
        model, inputs, labels, torch.Generator().manual_seed(1)
    )
    adversarial = ATTACK.pgd(model, torch.Generator().manual_seed(1))(inputs, labels)
    assert torch.allclose(logits, model(adversarial))
    assert loss.item() == pytest.approx(F.cross_entropy(model(adversarial), labels).item(), rel=1e-6)
    assert loss.item() > natural_loss(model, inputs, labels)[0].item()  # the adversary found a worse point


def test_tradeoff_loss_weights_its_terms(digits):
    model = _mlp(digits[0].info).eval()
    inputs, labels = _batch(digits[0])
    robust = TradeoffLoss(0.0, 1.0, ATTACK)(model, inputs, labels, torch.Generator().manual_seed(2))[0]
    natural = natural_loss(model, inputs, labels)[0]
    combined, logits = TradeoffLoss(2.0, 3.0, ATTACK)(model, inputs, labels, torch.Generator().manual_seed(2))
    assert combined.item() == pytest.approx(2 * natural.item() + 3 * robust.item(), rel=1e-5)
    assert torch.allclose(logits, model(inputs))  # accuracy is reported on the clean inputs


def test_trades_is_natural_loss_plus_beta_kl(digits):
    model = _mlp(digits[0].info).eval()
    inputs, labels = _batch(digits[0])
    zero, _ = TradesLoss(0.0, ATTACK)(model, inputs, labels, torch.Generator().manual_seed(3))
    assert zero.item() == pytest.approx(natural_loss(model, inputs, labels)[0].item(), rel=1e-6)
    with_kl, _ = TradesLoss(4.0, ATTACK)(model, inputs, labels, torch.Generator().manual_seed(3))
    assert with_kl.item() > zero.item()  # the adversary found a point where the prediction moves


def test_kl_from_is_zero_on_itself_and_positive_elsewhere():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    assert kl_from(logits, F.softmax(logits, dim=1)).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_from(logits.flip(1), F.softmax(logits, dim=1)).item() > 0


def test_losses_leave_the_model_mode_unchanged(digits):
    model = _mlp(digits[0].info).train()
    inputs, labels = _batch(digits[0])
    for loss in ("pgd", "trades", "tradeoff"):
        make_objective(loss, alpha=1.0, beta=1.0, attack=ATTACK)(model, inputs, labels, None)
        assert model.training


def test_adversarial_training_beats_natural_training_under_pgd(digits):
    """The issue's acceptance in miniature (Fashion-MNIST in results/robust): PGD training buys robustness."""
    train_set, test_set = digits
    accuracies = {}
    for loss in ("natural", "pgd"):
        model = _mlp(train_set.info)
        config = TrainConfig(epochs=15, batch_size=64, lr=0.05, loss=loss, eps=0.2, step_size=0.05, attack_steps=5)
        train(model, train_set, config, progress=False)
        attack = PGD(model, norm="inf", eps=0.2, step_size=0.02, steps=20, generator=torch.Generator().manual_seed(0))
        accuracies[loss] = robust_accuracy(model, attack, test_set.floats(), test_set.labels)
    assert accuracies["pgd"] > accuracies["natural"] + 0.3, accuracies


def test_binary_relax_training_ends_with_two_values_per_layer_and_resumes_exactly(digits, tmp_path):
    train_set, test_set = digits
    metadata = model_metadata("mlp", {"depth": 2, "width": 64}, train_set.info)
    config = TrainConfig(epochs=3, batch_size=64, lr=0.05, quant="br", bits=1, rho=2.0, cutoff_epoch=2)
    straight = _mlp(train_set.info)
    expected = train(straight, train_set, config, test_set=test_set, progress=False)
    for name, parameter in straight.named_parameters():
        if name.endswith("weight") and parameter.dim() > 1:
            assert parameter.unique().numel() == 2, name
    assert expected[-1].test_accuracy > 0.8

    interrupted = _mlp(train_set.info)
    path = tmp_path / "br.pt"
    train(
        interrupted,
        train_set,
        TrainConfig(**{**config.__dict__, "epochs": 2}),
        checkpoint_path=path,
        test_set=test_set,
        metadata=metadata,
        progress=False,
    )
    resumed = _mlp(train_set.info, seed=1)
    history = train(
        resumed,
        train_set,
        config,
        checkpoint_path=path,
        test_set=test_set,
        metadata=metadata,
        resume=True,
        progress=False,
    )
    assert [(s.loss, s.test_accuracy) for s in history] == [(s.loss, s.test_accuracy) for s in expected]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"loss": "madry"}, "loss must be one of"),
        ({"loss": "natural", "sigma": 0.25}, "use loss 'gaussian'"),
        ({"loss": "gaussian"}, "sigma > 0"),
        ({"eps": 0.0}, "eps"),
        ({"attack_steps": 0}, "attack_steps"),
        ({"beta": -1.0}, "beta"),
        ({"quant": "xnor"}, "quant must be one of"),
        ({"quant": "br", "rho": 1.0}, "rho"),
        ({"quant": "bc", "bits": 0}, "bits"),
    ],
)
def test_config_validation_of_losses_and_quantization(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)
