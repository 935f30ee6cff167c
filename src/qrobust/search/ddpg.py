"""A DDPG agent for episodic searches with one delayed reward per episode (bit-width search).

Deep Deterministic Policy Gradient, Lillicrap et al., "Continuous control with deep reinforcement
learning" (ICLR 2016), in the form HAQ (Wang et al., CVPR 2019) and ARQ (Yang et al., appendix A.1)
use: an actor mu(s) in [0, 1], a critic Q(s, a), target copies of both that follow by Polyak averaging
with rate ``tau``, a replay buffer, truncated-normal exploration around mu(s) inside [0, 1] whose std
starts at 0.5 and decays by 0.99 per episode, and warm-up episodes of uniformly random actions. An
episode is a sequence of states; its single reward arrives after the last action and is stored with
every transition of the episode; the agent then takes one gradient step per transition.

Written by hand rather than on stable-baselines3 + gymnasium (SB3 2.9 installs cheaply next to our
torch: gymnasium and cloudpickle only), because its off-policy loop stores each step's reward as the
step happens, so giving the episode's final reward to all its transitions means rewriting buffer rows
behind its back; its warm-up (``learning_starts``) counts steps, not episodes; its action noise is a
clipped Gaussian without per-episode decay; and it saves replay buffers by pickling, which qrobust
never loads, so resuming a search from its JSON log would drive SB3's internals anyway. The agent
below is the whole algorithm in about as many lines as that glue would take.

Every random choice (network initialisation, exploration noise, warm-up actions, minibatches) comes
from the agent's own seeded generators, so two agents with the same seed fed the same episodes act
identically; that is what lets a search resume by replaying its log.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import truncnorm
from torch import nn


@dataclass(frozen=True)
class DDPGConfig:
    """Hyperparameters of the agent; the defaults are ARQ's / HAQ's.

    ``discount`` is gamma of the Bellman target; with the episode's reward on every transition and
    gamma 1 (HAQ), Q(s_k, a) estimates the reward times the steps left. ``buffer_size`` counts
    transitions; ``updates_per_step`` gradient steps are taken per transition of each finished
    episode once warm-up is over.
    """

    hidden: tuple[int, int] = (400, 300)
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    tau: float = 0.01
    discount: float = 1.0
    batch_size: int = 64
    buffer_size: int = 2000
    updates_per_step: int = 1
    warmup_episodes: int = 20
    noise_std: float = 0.5
    noise_decay: float = 0.99
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))  # JSON round trips give lists
        if len(self.hidden) != 2 or any(int(h) != h or h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be two layer widths >= 1, got {self.hidden!r}")
        for name in ("batch_size", "buffer_size", "updates_per_step"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if int(self.warmup_episodes) != self.warmup_episodes or self.warmup_episodes < 0:
            raise ValueError(f"warmup_episodes must be an integer >= 0, got {self.warmup_episodes!r}")
        for name in ("actor_lr", "critic_lr", "noise_std"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("tau", "discount", "noise_decay"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Step:
    """One transition without its reward: the state, the action taken, the next state, the done flag."""

    state: np.ndarray  # (state_dim,)
    action: float
    next_state: np.ndarray  # (state_dim,); ignored when done
    done: bool


class ReplayBuffer:
    """A ring buffer of (state, action, reward, next_state, done) rows; the oldest go first when full."""

    def __init__(self, capacity: int, state_dim: int):
        self.states = np.zeros((capacity, state_dim), dtype=np.float32)
        self.actions = np.zeros((capacity, 1), dtype=np.float32)
        self.rewards = np.zeros((capacity, 1), dtype=np.float32)
        self.next_states = np.zeros((capacity, state_dim), dtype=np.float32)
        self.dones = np.zeros((capacity, 1), dtype=np.float32)
        self.capacity, self.size, self._next = capacity, 0, 0

    def __len__(self) -> int:
        return self.size

    def add(self, step: Step, reward: float) -> None:
        row = self._next
        self.states[row], self.actions[row], self.rewards[row] = step.state, step.action, reward
        self.next_states[row], self.dones[row] = step.next_state, float(step.done)
        self._next = (row + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """``min(batch_size, len(self))`` distinct rows as float tensors (states, actions, rewards, next_states, dones)."""
        rows = rng.choice(self.size, size=min(batch_size, self.size), replace=False)
        columns = (self.states, self.actions, self.rewards, self.next_states, self.dones)
        return tuple(torch.from_numpy(column[rows]) for column in columns)  # each (B, width)


def _mlp(sizes: Sequence[int], generator: torch.Generator, output: nn.Module | None) -> nn.Sequential:
    """Linear-ReLU layers of ``sizes``; Lillicrap et al.'s init: U(+-1/sqrt(fan_in)), last layer U(+-3e-3)."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        linear = nn.Linear(fan_in, fan_out)
        bound = 3e-3 if index == len(sizes) - 2 else 1 / math.sqrt(fan_in)
        with torch.no_grad():
            linear.weight.uniform_(-bound, bound, generator=generator)
            linear.bias.uniform_(-bound, bound, generator=generator)
        layers += [linear, nn.ReLU()]
    layers.pop()  # no ReLU after the last layer
    if output is not None:
        layers.append(output)
    return nn.Sequential(*layers)


class DDPGAgent:
    """DDPG with a scalar action in [0, 1] per step and one reward per episode.

    Use: ``act(state, episode)`` at each step, then ``finish_episode(steps, reward, episode)`` with the
    episode's transitions; ``greedy(state)`` is the actor's action without exploration.

    Args:
        state_dim: length of the state vectors (best normalised to [0, 1] per feature).
        config: hyperparameters and seed.
    """

    def __init__(self, state_dim: int, config: DDPGConfig = DDPGConfig()):
        if state_dim < 1:
            raise ValueError(f"state_dim must be >= 1, got {state_dim}")
        self.config = config
        generator = torch.Generator().manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.actor = _mlp((state_dim, *config.hidden, 1), generator, nn.Sigmoid())  # s (B, S) -> a (B, 1)
        self.critic = _mlp((state_dim + 1, *config.hidden, 1), generator, None)  # [s, a] (B, S + 1) -> Q (B, 1)
        self.actor_target, self.critic_target = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.buffer = ReplayBuffer(config.buffer_size, state_dim)

    def exploration_std(self, episode: int) -> float | None:
        """Std of the truncated-normal noise in ``episode`` (0-based); None during warm-up (uniform actions)."""
        if episode < self.config.warmup_episodes:
            return None
        return self.config.noise_std * self.config.noise_decay ** (episode - self.config.warmup_episodes)

    def act(self, state: np.ndarray, episode: int) -> float:
        """The exploring action in [0, 1]: uniform during warm-up, then mu(s) plus truncated-normal noise."""
        std = self.exploration_std(episode)
        if std is None:
            return float(self.rng.uniform(0.0, 1.0))
        mean = self.greedy(state)
        low, high = (0.0 - mean) / std, (1.0 - mean) / std  # the truncation bounds in units of std
        return float(np.clip(truncnorm.rvs(low, high, loc=mean, scale=std, random_state=self.rng), 0.0, 1.0))

    @torch.no_grad()
    def greedy(self, state: np.ndarray) -> float:
        """mu(s), the actor's action in [0, 1] without exploration."""
        return float(self.actor(torch.as_tensor(state, dtype=torch.float32).unsqueeze(0)))

    def finish_episode(self, steps: Sequence[Step], reward: float, episode: int) -> None:
        """Store the episode's transitions, all with its final ``reward``, then learn unless in warm-up.

        Learning starts after the last warm-up episode, so the first exploring episode already uses a
        trained actor.
        """
        for step in steps:
            self.buffer.add(step, reward)
        if episode + 1 >= self.config.warmup_episodes:
            for _ in range(len(steps) * self.config.updates_per_step):
                self.update()

    def update(self) -> tuple[float, float]:
        """One gradient step of critic and actor on a minibatch, then the soft target update; returns
        the critic's mean squared Bellman error and the actor's loss -mean Q(s, mu(s))."""
        states, actions, rewards, next_states, dones = self.buffer.sample(self.config.batch_size, self.rng)
        with torch.no_grad():
            next_q = self.critic_target(torch.cat([next_states, self.actor_target(next_states)], dim=1))  # (B, 1)
            target = rewards + self.config.discount * (1.0 - dones) * next_q
        critic_loss = nn.functional.mse_loss(self.critic(torch.cat([states, actions], dim=1)), target)
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optimizer.step()

        actor_loss = -self.critic(torch.cat([states, self.actor(states)], dim=1)).mean()
        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()  # the critic's gradients from here are cleared before its next step
        self.actor_optimizer.step()

        with torch.no_grad():
            for network, target_network in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                for parameter, target_parameter in zip(network.parameters(), target_network.parameters()):
                    target_parameter.lerp_(parameter, self.config.tau)  # theta' <- tau theta + (1 - tau) theta'
        return critic_loss.item(), actor_loss.item()
