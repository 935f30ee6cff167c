"""The DDPG agent: exploration schedule, buffer, determinism, and learning a toy episodic problem."""

import numpy as np
import pytest

from qrobust.search.ddpg import DDPGAgent, DDPGConfig, ReplayBuffer, Step

TARGET = np.array([0.2, 0.8, 0.5])


def _state(k: int, previous: float) -> np.ndarray:
    return np.array([k / 2, previous], dtype=np.float32)


def _episode(agent: DDPGAgent, episode: int) -> tuple[list[float], float]:
    """Three steps, reward -sum (a_k - target_k)^2 for the whole episode (delayed, like a bit-width search)."""
    actions, steps = [], []
    for k in range(3):
        state = _state(k, actions[-1] if actions else 0.0)
        actions.append(agent.act(state, episode))
        steps.append(Step(state, actions[-1], _state(k + 1, actions[-1]), k == 2))
    reward = -float(((np.array(actions) - TARGET) ** 2).sum())
    agent.finish_episode(steps, reward, episode)
    return actions, reward


def _greedy_reward(agent: DDPGAgent) -> float:
    actions = []
    for k in range(3):
        actions.append(agent.greedy(_state(k, actions[-1] if actions else 0.0)))
    return -float(((np.array(actions) - TARGET) ** 2).sum())


def _train(seed: int, episodes: int = 60) -> tuple[DDPGAgent, list[list[float]]]:
    """An agent trained on the toy problem; small networks and faster learning rates keep it quick."""
    config = DDPGConfig(
        hidden=(64, 64), actor_lr=1e-3, critic_lr=3e-3, warmup_episodes=10, updates_per_step=4, seed=seed
    )
    agent = DDPGAgent(2, config)
    return agent, [_episode(agent, e)[0] for e in range(episodes)]


def test_learns_toy_problem_better_than_random():
    random_expected = -sum(1 / 3 - t + t**2 for t in TARGET)  # E[(U - t)^2] for U uniform on [0, 1]
    assert random_expected == pytest.approx(-0.43, abs=0.01)
    learned = [_greedy_reward(_train(seed)[0]) for seed in range(2)]
    assert min(learned) > random_expected / 2
    assert np.mean(learned) > random_expected / 4


def test_deterministic_under_seed():
    first, actions = _train(seed=3, episodes=15)
    second, again = _train(seed=3, episodes=15)
    assert actions == again
    assert _greedy_reward(first) == _greedy_reward(second)
    assert _train(seed=4, episodes=15)[1] != actions


def test_exploration_schedule():
    agent = DDPGAgent(2, DDPGConfig(warmup_episodes=3, noise_std=0.5, noise_decay=0.99))
    assert [agent.exploration_std(e) for e in range(3)] == [None] * 3
    assert agent.exploration_std(3) == 0.5
    assert agent.exploration_std(13) == pytest.approx(0.5 * 0.99**10)
    state = _state(0, 0.0)
    actions = np.array([agent.act(state, 3) for _ in range(400)])
    assert actions.min() >= 0 and actions.max() <= 1
    # truncated normal around mu(s) ~ 0.5 with std 0.5 on [0, 1]: spread near uniform, mean near mu
    assert abs(actions.mean() - agent.greedy(state)) < 0.05 and actions.std() > 0.2
    late = np.array([agent.act(state, 500) for _ in range(200)])  # std 0.5 * 0.99^497 ~ 0.003
    assert np.abs(late - agent.greedy(state)).max() < 0.03


def test_no_learning_during_warmup():
    agent = DDPGAgent(2, DDPGConfig(warmup_episodes=3))
    before = [p.clone() for p in agent.actor.parameters()]
    for episode in range(2):
        _episode(agent, episode)
    assert all((p == q).all() for p, q in zip(before, agent.actor.parameters()))
    assert len(agent.buffer) == 6
    _episode(agent, 2)  # the last warm-up episode: learning starts after it
    assert any((p != q).any() for p, q in zip(before, agent.actor.parameters()))


def test_replay_buffer_keeps_newest_and_episode_reward():
    buffer = ReplayBuffer(capacity=3, state_dim=1)
    for index in range(5):
        buffer.add(Step(np.array([index]), index / 10, np.array([index + 1]), False), reward=-index)
    assert len(buffer) == 3 and sorted(buffer.states[:, 0]) == [2, 3, 4]
    states, actions, rewards, _, dones = buffer.sample(10, np.random.default_rng(0))
    assert states.shape == (3, 1) and sorted(rewards[:, 0].tolist()) == [-4, -3, -2]
    assert (dones == 0).all() and actions.shape == (3, 1)


@pytest.mark.parametrize(
    "field, value",
    [("tau", 0.0), ("tau", 1.5), ("actor_lr", -1.0), ("batch_size", 0), ("warmup_episodes", -1), ("hidden", (5,))],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        DDPGConfig(**{field: value})
