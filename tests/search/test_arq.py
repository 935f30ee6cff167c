"""ARQ's search on a tiny digits CNN: states, eq. (10), the budget, rewards, the log and resuming."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from scipy.stats import norm

from qrobust.data import load_dataset
from qrobust.errors import QRobustError
from qrobust.models import build_model
from qrobust.models.checkpoint import load_checkpoint, model_metadata
from qrobust.quant.bitops import BitPolicy, bitops_percent, enforce_budget, layer_infos
from qrobust.search.arq import (
    PolicySearch,
    SearchConfig,
    actions_to_policy,
    fixed_precision_policy,
    state_features,
    step_state,
)
from qrobust.search.ddpg import DDPGConfig
from qrobust.train import TrainConfig, train

BUDGET = 3.0  # percent of fp32 BitOPs; 2 bits in the middle layers of the digits cnn cost about 0.9%


@pytest.fixture(scope="module")
def digits_cnn():
    """A cnn (conv1, conv2, fc1, fc2) noise-trained on digits at sigma 0.25 for a few seconds."""
    data = load_dataset("digits", "train")
    torch.manual_seed(0)
    model = build_model("cnn", data.info)
    train(model, data, TrainConfig(epochs=4, batch_size=32, lr=0.05, sigma=0.25), progress=False)
    return model.eval(), data


def _config(**changes) -> SearchConfig:
    tiny = dict(
        sigma=0.25,
        budget=BUDGET,
        episodes=5,
        finetune_images=200,
        calibration_images=64,
        validation_images=12,
        n0=20,
        n=100,
        n_zeta=50,
        batch_size=64,
        agent=DDPGConfig(hidden=(32, 32), warmup_episodes=2),
    )
    return SearchConfig(**(tiny | changes))


def _metadata(data):
    return model_metadata("cnn", {}, data.info, sigma=0.25)


def _cnn_layers():
    info = load_dataset("digits", "test").info
    return layer_infos(build_model("cnn", info), info.shape)


def test_state_features_are_normalised_per_feature():
    layers = _cnn_layers()
    assert [layer.name for layer in layers] == ["conv1", "conv2", "fc1", "fc2"]
    features = state_features(layers)
    assert features.shape == (4, 9) and features.dtype == np.float32  # conv2 (w, a), fc1 (w, a)
    assert features.min() >= 0 and features.max() <= 1
    assert features[:, 0].tolist() == [0, 0, 1, 1]  # layer index: conv2 then fc1
    assert features[:, 8].tolist() == [0, 1, 0, 1]  # weights, then activations
    assert features[:, 1].tolist() == [0, 0, 1, 1]  # c_in 32 (conv2) < 256 (fc1)
    assert features[:, 7].tolist() == [0, 0, 0, 0]  # depthwise: constant, hence 0
    for column in range(9):  # every varying feature spans exactly [0, 1]
        if np.ptp(features[:, column]) > 0:
            assert features[:, column].min() == 0 and features[:, column].max() == 1
    state = step_state(features, 2, 0.7)
    assert state.shape == (10,) and state[-1] == np.float32(0.7) and (state[:9] == features[2]).all()


def test_eq10_maps_action_ends_to_bit_range():
    layers = _cnn_layers()
    assert actions_to_policy(layers, [0.0] * 4) == BitPolicy((8, 2, 2, 8), (8, 2, 2, 8))
    assert actions_to_policy(layers, [1.0] * 4) == BitPolicy((8, 8, 8, 8), (8, 8, 8, 8))
    # seven equal bins: a in [i / 7, (i + 1) / 7) -> 2 + i, weights and activations interleaved
    grid = [(i + 0.5) / 7 for i in range(7)]
    assert [actions_to_policy(layers, [a, 1.0, a, 0.0]).weight_bits[1] for a in grid] == list(range(2, 9))
    assert actions_to_policy(layers, [0.3, 0.6, 0.9, 0.1]) == BitPolicy((8, 4, 8, 8), (8, 6, 2, 8))
    with pytest.raises(ValueError, match="expected 4 actions"):
        actions_to_policy(layers, [0.5] * 3)


def test_budget_always_respected_and_fixed_precision_fits():
    layers = _cnn_layers()
    rng = np.random.default_rng(0)
    for budget in (1.0, 2.0, 5.0, 20.0):
        for _ in range(50):
            policy = enforce_budget(layers, actions_to_policy(layers, rng.uniform(size=4).tolist()), budget)
            assert bitops_percent(layers, policy) <= budget
        fixed = fixed_precision_policy(layers, budget)
        bits = fixed.weight_bits[1]
        assert fixed == BitPolicy.uniform(4, bits) and bitops_percent(layers, fixed) <= budget
        assert bits == 8 or bitops_percent(layers, BitPolicy.uniform(4, bits + 1)) > budget
    with pytest.raises(ValueError, match="out of reach"):
        fixed_precision_policy(layers, 0.1)


def test_search_resumes_exactly_after_interruption(digits_cnn, tmp_path):
    model, data = digits_cnn
    whole = PolicySearch(model, data, _config()).run(
        tmp_path / "whole.jsonl", best_checkpoint=tmp_path / "whole.pt", metadata=_metadata(data)
    )
    assert [r.episode for r in whole.records] == list(range(5)) and whole.resumed == 0
    assert whole.best.reward == max(r.reward for r in whole.records)
    assert all(r.bitops_percent <= BUDGET and r.acr is not None for r in whole.records)
    assert all(r.reward == pytest.approx(r.acr - whole.acr_original) for r in whole.records)
    assert len({r.actions for r in whole.records}) == 5

    log = tmp_path / "split.jsonl"
    first = PolicySearch(model, data, _config(episodes=3)).run(log)
    with log.open("a") as file:
        file.write('{"episode": 3, "actions": [0.1')  # a crash in the middle of writing episode 3
    resumed = PolicySearch(model, data, _config()).run(
        log, best_checkpoint=tmp_path / "resumed.pt", metadata=_metadata(data)
    )
    assert resumed.resumed == 3 and first.records == resumed.records[:3]
    # the best model is rebuilt (or found again) exactly, whichever episode it came from
    best, again = load_checkpoint(tmp_path / "whole.pt"), load_checkpoint(tmp_path / "resumed.pt")
    assert best.metadata["bit_policy"] == whole.best.policy.to_dict() == again.metadata["bit_policy"]
    assert all(torch.equal(best.state_dict[name], again.state_dict[name]) for name in best.state_dict)

    def essentials(records):
        return [dataclasses.replace(r, seconds=0.0) for r in records]

    assert essentials(resumed.records) == essentials(whole.records)  # the agent and models continue as if never stopped
    lines = log.read_text().splitlines()
    assert len(lines) == 6 and "header" in json.loads(lines[0])
    assert [json.loads(line)["episode"] for line in lines[1:]] == list(range(5))


def test_resume_refuses_another_search(digits_cnn, tmp_path):
    model, data = digits_cnn
    log = tmp_path / "search.jsonl"
    PolicySearch(model, data, _config(episodes=2)).run(log)
    with pytest.raises(QRobustError, match="different sigma"):
        PolicySearch(model, data, _config(episodes=3, sigma=0.5)).run(log)
    with pytest.raises(QRobustError, match="already has 2 episodes"):
        PolicySearch(model, data, _config(episodes=1)).run(log)
    log.write_text("not json\n")
    with pytest.raises(QRobustError, match="not a qrobust search log"):
        PolicySearch(model, data, _config()).run(log)


def test_haq_reward_is_noisy_accuracy(digits_cnn, tmp_path):
    model, data = digits_cnn
    result = PolicySearch(model, data, _config(episodes=2, reward="haq")).run(tmp_path / "haq.jsonl")
    assert result.acr_original is None
    for record in result.records:
        assert record.acr is None and record.reward == record.accuracy and 0 <= record.accuracy <= 1
        assert record.accuracy in {k / 12 for k in range(13)}  # one noisy draw per validation image


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_a_search_on_the_cpu_by_name_equals_the_default_one(digits_cnn, tmp_path, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    model, data = digits_cnn
    config = _config(episodes=2)
    default = PolicySearch(model, data, config).run(tmp_path / "default.jsonl")
    named = PolicySearch(model, data, config, device=device).run(tmp_path / f"{device}.jsonl")
    assert [(r.policy, r.reward, r.acr, r.accuracy) for r in named.records] == [
        (r.policy, r.reward, r.acr, r.accuracy) for r in default.records
    ]


def test_a_search_on_an_absent_device_is_one_error_line(digits_cnn, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, data = digits_cnn
    with pytest.raises(QRobustError, match="device 'cuda' is not available"):
        PolicySearch(model, data, _config(), device="cuda")


def test_certified_reward_is_certified_accuracy_gain(digits_cnn, tmp_path):
    model, data = digits_cnn
    result = PolicySearch(model, data, _config(episodes=2, reward="certified", reward_radius=0.1)).run(
        tmp_path / "c.jsonl"
    )
    for record in result.records:
        assert record.acr is not None and -1 <= record.reward <= 1
        assert record.reward * 12 == pytest.approx(round(record.reward * 12), abs=1e-9)  # a difference of k / 12
    assert len({r.reward for r in result.records} | {r.acr for r in result.records}) > 1


def test_rs_certifier_certifies_afresh_with_n_zeta_samples(digits_cnn, tmp_path):
    """Plain smoothing with n_zeta = 50 samples at level alpha + alpha_zeta caps every radius at
    sigma * Phi^-1(0.002^(1/50)); the reward stays ACR_P - ACR_orig."""
    model, data = digits_cnn
    search = PolicySearch(model, data, _config(episodes=2, certifier="rs"))
    result = search.run(tmp_path / "rs.jsonl")
    cap = 0.25 * float(norm.ppf(0.002 ** (1 / 50)))
    for record in result.records:
        assert 0 < record.acr <= cap
        assert record.reward == pytest.approx(record.acr - result.acr_original)
    assert max(c.radius for c in search.certifier.cache.certificates) > cap  # the original's n = 100 exceeds it


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"budget": 0.0}, "budget"),
        ({"budget": 100.5}, "budget"),
        ({"reward": "acc"}, "reward"),
        ({"n_zeta": 200}, "n_zeta"),
        ({"sigma": -0.1}, "sigma"),
        ({"episodes": 0}, "episodes"),
        ({"certifier": "exact"}, "certifier"),
        ({"reward_radius": -0.5}, "reward_radius"),
    ],
)
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        _config(**changes)


def test_unreachable_budget_and_too_many_images(digits_cnn):
    model, data = digits_cnn
    with pytest.raises(ValueError, match="out of reach"):
        PolicySearch(model, data, _config(budget=0.2))
    with pytest.raises(ValueError, match="at most the 1347 training images"):
        PolicySearch(model, data, _config(finetune_images=1340))
