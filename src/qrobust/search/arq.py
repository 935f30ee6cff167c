"""ARQ's robustness-aware mixed-precision policy search, and the HAQ-style baseline reward.

Yang et al., "ARQ: A Mixed-Precision Quantization Framework for Accurate and Certifiably Robust DNNs"
(2025), Algorithm 1 and section 3.2. A DDPG agent walks the searched layers (all Conv2d/Linear layers
but the first and last, which stay at 8 bits), two steps per layer: one action in [0, 1] for the weight
bits and one for the activation bits, each from the state S_k of eq. (9). The actions become bits by
eq. (10), the policy is lowered into the BitOPs budget (back to front, ``enforce_budget``), the model is
quantized, calibrated and fine-tuned for one epoch on n1 Gaussian-noised training images, and scored:

- ``reward="arq"``: ACR_P - ACR_orig (eq. 13), the average certified radius of the quantized smoothed
  model, certified incrementally (IRS, Ugare et al., ICLR 2024) from the original smoothed model's
  certificates, which are computed once per search;
- ``reward="certified"``: the certified accuracy at ``reward_radius`` minus the original's (the
  "Certified Acc" reward of the paper's Table 3 ablation);
- ``reward="haq"``: the quantized base model's accuracy on one Gaussian draw per validation image
  (HAQ's accuracy reward with noisy inputs, the paper's baseline).

``certifier="rs"`` certifies each candidate by plain randomized smoothing with as many samples as IRS
replays instead (the paper's Table 4 ablation "ARQ-RS": the same certification budget without reuse).

Every transition of the episode gets that reward; the best policy (highest reward) is kept. The
validation images (certified, or classified under noise) and the fine-tuning images are disjoint
seeded draws from the training split, so the test split stays untouched for evaluation.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qrobust.data import LatticeDataset
from qrobust.devices import module_device, resolve_device
from qrobust.errors import QRobustError
from qrobust.models.checkpoint import Checkpoint, save_checkpoint
from qrobust.models.inference import freeze_for_inference
from qrobust.progress import progress_bar
from qrobust.quant.bitops import MAX_BITS, MIN_BITS, BitPolicy, LayerInfo, bitops_percent, enforce_budget, layer_infos
from qrobust.quant.mixed import MixedPrecisionModel, quantize
from qrobust.search.ddpg import DDPGAgent, DDPGConfig, Step
from qrobust.search.log import EpisodeRecord, SearchLog, best_record
from qrobust.smoothing import (
    Certificate,
    FloatRS,
    SmoothedClassifier,
    acr,
    certify_incremental,
    certify_original,
    example_generator,
    summarize_certificates,
)
from qrobust.train import TrainConfig, accuracy, train
from qrobust.train.loop import model_inputs

REWARDS = ("arq", "certified", "haq")
CERTIFIERS = ("irs", "rs")
DEFAULT_WARMUP = 10  # episodes of random actions (HAQ's 20 is a large share of a 40-episode search)
STATE_FEATURES = 10  # eq. (9): k, c_in, c_out, kernel, stride, feature size, params, depthwise, w/a, a_{k-1}


@dataclass(frozen=True)
class SearchConfig:
    """Settings of one policy search. The defaults search the Fashion-MNIST ``cnn`` (2 of its 4 layers)
    well within an hour on 2 CPU cores (torch 2.13). Measured: with the machine shared with other jobs
    (load about 3 on 2 cores), the original certification (0.4M forward passes) took 2 minutes and an
    episode about 60 s, 45 minutes in all; on the idle machine an episode with n = 2000, n_zeta = 200
    took 4 s (fine-tuning on 5000 images, IRS on 100), so expect a few minutes there.

    ``sigma`` is the smoothing noise std in [0, 1] pixel units; ``budget`` the BitOPs limit in percent of
    the fp32 model's, in (0, 100]. Fine-tuning follows the paper: SGD with momentum 0.9, weight decay
    1e-4, learning rate ``finetune_lr``, one epoch over ``finetune_images`` (n1) noisy images, after
    calibrating the clips on ``calibration_images`` of them with noise. ``validation_images`` (X) are
    certified for the ARQ reward: the original smoothed model once with ``n0`` selection and ``n``
    estimation samples at level ``alpha``, each quantized one by IRS with ``n_zeta`` samples at level
    ``alpha_zeta``, falling back to plain certification with ``n_zeta`` samples where the original
    top-class bound pA_lower is at least ``gamma`` (``certifier="rs"``: plain certification with n0 and
    ``n_zeta`` samples at level alpha + alpha_zeta for every candidate). ``reward_radius`` is the l2
    radius ([0, 1] pixel units) of the "certified" reward. ``agent.seed`` seeds the agent; ``seed`` the
    image draws, the fine-tuning and all noise.
    """

    sigma: float
    budget: float
    episodes: int = 40
    reward: str = "arq"
    certifier: str = "irs"
    reward_radius: float = 0.5
    finetune_images: int = 5000
    finetune_lr: float = 0.01
    batch_size: int = 256
    calibration_images: int = 512
    validation_images: int = 100
    n0: int = 100
    n: int = 4000
    n_zeta: int = 500
    alpha: float = 0.001
    alpha_zeta: float = 0.001
    gamma: float = 0.99
    seed: int = 0
    agent: DDPGConfig = field(default_factory=lambda: DDPGConfig(warmup_episodes=DEFAULT_WARMUP))

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be > 0, got {self.sigma!r}")
        if not (math.isfinite(self.budget) and 0 < self.budget <= 100):
            raise ValueError(f"budget must be a percentage in (0, 100], got {self.budget!r}")
        for name in (
            "episodes",
            "finetune_images",
            "batch_size",
            "calibration_images",
            "validation_images",
            "n0",
            "n",
            "n_zeta",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {', '.join(REWARDS)}, got {self.reward!r}")
        if self.certifier not in CERTIFIERS:
            raise ValueError(f"certifier must be one of {', '.join(CERTIFIERS)}, got {self.certifier!r}")
        if not (math.isfinite(self.reward_radius) and self.reward_radius >= 0):
            raise ValueError(f"reward_radius must be >= 0, got {self.reward_radius!r}")
        if not (math.isfinite(self.finetune_lr) and self.finetune_lr > 0):
            raise ValueError(f"finetune_lr must be > 0, got {self.finetune_lr!r}")
        for name in ("alpha", "alpha_zeta"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        if self.n_zeta > self.n:
            raise ValueError(
                f"n_zeta must be at most n={self.n} (IRS replays the original's samples), got {self.n_zeta}"
            )
        if not 0.5 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0.5, 1], got {self.gamma!r}")
        if isinstance(self.agent, dict):  # from a JSON header
            object.__setattr__(self, "agent", DDPGConfig(**self.agent))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SearchResult:
    """A finished search: every episode in order (resumed ones included) and the best of them.

    ``acr_original`` is the original smoothed model's ACR on the validation images (None for the HAQ
    reward, which does not certify); ``resumed`` counts the episodes read back from the log.
    """

    records: tuple[EpisodeRecord, ...]
    best: EpisodeRecord
    acr_original: float | None
    resumed: int


def searched_layers(layers: Sequence[LayerInfo]) -> list[LayerInfo]:
    """The layers the agent chooses bits for: all but the first and the last (fixed at 8 bits)."""
    if len(layers) < 3:
        raise ValueError(
            f"the model has {len(layers)} Conv2d/Linear layers; a search needs at least 3, since the first and "
            "last stay at 8 bits"
        )
    return list(layers[1:-1])


def state_features(layers: Sequence[LayerInfo]) -> np.ndarray:
    """The static part of eq. (9) for every step, min-max normalised per feature to [0, 1]: float32
    (2 * searched layers, 9), rows in step order (weights, then activations, of each searched layer).

    Columns: layer index k, c_in, c_out, kernel size, stride, input feature size, parameters,
    depthwise flag, weights (0) / activations (1). A feature constant over the steps becomes 0. The
    tenth feature of S_k, the previous action, is appended at each step (``step_state``).
    """
    rows = [
        [
            layer.index,
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.in_size,
            layer.params,
            float(layer.depthwise),
            float(is_activation),
        ]
        for layer in searched_layers(layers)
        for is_activation in (False, True)
    ]
    features = np.asarray(rows, dtype=np.float64)  # (steps, 9)
    low, span = features.min(axis=0), np.ptp(features, axis=0)
    return ((features - low) / np.where(span > 0, span, 1.0)).astype(np.float32)


def step_state(features: np.ndarray, step: int, previous_action: float) -> np.ndarray:
    """S_k of eq. (9): the normalised static features of ``step`` and the previous action (0 at step 0)."""
    return np.append(features[step], np.float32(previous_action))  # (STATE_FEATURES,)


def actions_to_policy(layers: Sequence[LayerInfo], actions: Sequence[float]) -> BitPolicy:
    """The policy of one action per step (eq. 10: a in [0, 1] -> b in [2, 8], a = 0 -> 2, a = 1 -> 8),
    before the budget; the first and last layers get 8 bits."""
    searched = searched_layers(layers)
    if len(actions) != 2 * len(searched):
        raise ValueError(
            f"expected {2 * len(searched)} actions (weights and activations of {len(searched)} layers), got {len(actions)}"
        )
    weight_actions = [1.0, *actions[0::2], 1.0]
    act_actions = [1.0, *actions[1::2], 1.0]
    return BitPolicy.from_actions(weight_actions, act_actions)


def fixed_precision_policy(layers: Sequence[LayerInfo], budget: float) -> BitPolicy:
    """The fixed-precision baseline: the most bits b in [2, 8], the same for the weights and activations
    of every searched layer, whose BitOPs fit ``budget`` percent (first and last layer at 8 bits)."""
    for bits in range(MAX_BITS, MIN_BITS - 1, -1):
        policy = BitPolicy.uniform(len(layers), bits)
        if bitops_percent(layers, policy) <= budget:
            return policy
    floor = bitops_percent(layers, BitPolicy.uniform(len(layers), MIN_BITS))
    raise ValueError(f"a budget of {budget:g}% BitOPs is out of reach: {MIN_BITS} bits already costs {floor:.4g}%")


EPISODE_STREAM, VALIDATION_STREAM, CERTIFICATION_STREAM, RS_STREAM = (
    0,
    1,
    2,
    3,
)  # independent random streams of a search


def derived_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed for ``keys`` (a stream above, then e.g. an episode) of a run seeded by ``seed``."""
    (state,) = np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)
    return int(state) >> 1


def finetune_policy(
    model: nn.Module,
    policy: BitPolicy,
    train_set: LatticeDataset,
    config: TrainConfig,
    *,
    calibration_images: int = 512,
    checkpoint_path: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> MixedPrecisionModel:
    """``model`` quantized by ``policy`` and fine-tuned: the clips calibrated (KL) on the first
    ``calibration_images`` of ``train_set`` with one draw of the training noise (seeded by
    ``config.seed``), then ``qrobust.train.train`` with ``config`` (Gaussian noise at ``config.sigma``).

    With ``checkpoint_path`` every epoch is saved there (``metadata`` plus "bit_policy"), and
    ``resume`` continues an interrupted run; ``model`` itself is left unchanged. Calibration runs on
    the CPU (the same clips on every device), fine-tuning on ``device`` (as ``train`` takes it; default:
    where ``model`` is), where the returned quantized model is, in eval mode.
    """
    device = module_device(model) if device is None else resolve_device(device)
    count = min(calibration_images, len(train_set))
    if count < 1:
        raise ValueError(f"calibration_images must be >= 1, got {calibration_images}")
    calibration = model_inputs(
        train_set.images[:count], config.noise_method(), torch.Generator().manual_seed(config.seed)
    )
    mixed = quantize(_on_cpu(model), policy, calibration, batch_size=config.batch_size)
    metadata = {**(metadata or {}), "bit_policy": policy.to_dict()}
    train(
        mixed,
        train_set,
        config,
        checkpoint_path=checkpoint_path,
        metadata=metadata,
        resume=resume,
        progress=progress,
        device=device,
    )
    return mixed.eval()


class PolicySearch:
    """One ARQ (or HAQ-style) search over ``model``'s bit-widths, resumable from its log.

    Args:
        model: the float base classifier (noise-trained at ``config.sigma``), [0, 1] images -> logits.
        train_set: the training split; the fine-tuning and validation images are drawn from it.
        config: the search settings.
        device: where each policy is fine-tuned and its noisy accuracy measured ("auto", "cpu", "cuda",
            ... or a ``torch.device``; default: where ``model`` is). Certification stays on the CPU: the
            incremental certifier replays the original run's CPU noise streams.

    Use ``run(log_path, ...)``; the pieces (``propose``, ``finetuned``, ``evaluate``) are public for
    tests and tools. The original model is certified (ARQ reward) when first needed, after ``run`` has
    checked the log.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: LatticeDataset,
        config: SearchConfig,
        *,
        device: torch.device | str | None = None,
    ):
        self.model, self.config = model.eval(), config
        self.device = module_device(model) if device is None else resolve_device(device)
        self.layers = layer_infos(model, train_set.info.shape)
        self.features = state_features(self.layers)  # (steps, 9)
        self.fixed_policy = fixed_precision_policy(self.layers, config.budget)  # raises if the budget is out of reach
        needed = config.finetune_images + config.validation_images
        if needed > len(train_set):
            raise ValueError(
                f"finetune_images + validation_images must be at most the {len(train_set)} training images, got {needed}"
            )
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed))
        self.finetune_set = train_set.select(order[: config.finetune_images].sort().values)
        self.validation_set = train_set.select(order[config.finetune_images : needed].sort().values)
        self.noise = FloatRS(config.sigma)
        self._diverged = False  # whether a replayed agent acted differently from the log (warned once)

    @functools.cached_property
    def certifier(self) -> _Certifier | None:
        """The original smoothed model certified on the validation images, on first use (None for "haq")."""
        return None if self.config.reward == "haq" else _Certifier(self.model, self.validation_set, self.config)

    def propose(
        self, agent: DDPGAgent, episode: int, logged: Sequence[float] | None = None
    ) -> tuple[list[Step], list[float]]:
        """Walk the steps with the agent: the transitions (without reward) and the actions.

        With ``logged`` actions (a resumed episode) the agent still draws its own, so its random state
        advances as in the original run, but the logged ones are taken; a difference (another torch
        build, say) is warned about once.
        """
        steps: list[Step] = []
        actions: list[float] = []
        for k in range(len(self.features)):
            state = step_state(self.features, k, actions[-1] if actions else 0.0)
            action = agent.act(state, episode)
            if logged is not None:
                if abs(action - logged[k]) > 1e-9 and not self._diverged:
                    warnings.warn(
                        f"episode {episode}: the replayed agent's action differs from the log; continuing with the logged actions",
                        stacklevel=2,
                    )
                    self._diverged = True
                action = logged[k]
            actions.append(action)
            if steps:
                previous = steps[-1]
                steps[-1] = Step(previous.state, previous.action, state, False)
            steps.append(Step(state, action, np.zeros_like(state), True))
        return steps, actions

    def finetuned(self, policy: BitPolicy, episode: int) -> MixedPrecisionModel:
        """Quantize(f, P) and FineTune(f_P, X, sigma, n1) of Algorithm 1: one noisy epoch on the n1 images.

        Deterministic given the search seed and ``episode``, whatever episodes ran before.
        """
        config = self.config
        fine_tuning = TrainConfig(
            epochs=1,
            batch_size=config.batch_size,
            lr=config.finetune_lr,
            sigma=config.sigma,
            seed=derived_seed(config.seed, EPISODE_STREAM, episode),
        )
        return finetune_policy(
            self.model,
            policy,
            self.finetune_set,
            fine_tuning,
            calibration_images=config.calibration_images,
            device=self.device,
        )

    def evaluate(self, mixed: nn.Module) -> tuple[float, float | None, float]:
        """(reward, ACR of the quantized smoothed model or None, noisy accuracy of the quantized base model)."""
        generator = torch.Generator().manual_seed(
            derived_seed(self.config.seed, VALIDATION_STREAM)
        )  # the same draws for every policy
        noisy_accuracy = accuracy(mixed, self.validation_set, noise=self.noise, generator=generator)
        if self.certifier is None:
            return noisy_accuracy, None, noisy_accuracy
        certificates = self.certifier.certify(mixed)
        acr_p = acr(certificates, self.validation_set.labels)
        if self.config.reward == "arq":
            return acr_p - self.certifier.acr_original, acr_p, noisy_accuracy
        original = self.certifier.certified_accuracy(self.certifier.cache.certificates)
        return self.certifier.certified_accuracy(certificates) - original, acr_p, noisy_accuracy

    def run(
        self,
        log_path: str | Path,
        *,
        best_checkpoint: str | Path | None = None,
        metadata: dict[str, Any] | None = None,
        progress: bool = False,
    ) -> SearchResult:
        """Search for ``config.episodes`` episodes, appending each to the log at ``log_path``.

        A log left by an earlier run of the same search (same config but for ``episodes``, same model
        layers) is resumed after its last complete episode: a fresh agent with the same seed replays
        the logged episodes (their actions and rewards, and the same gradient steps), which restores its
        networks, optimizers, replay buffer and random state exactly as the interrupted run had them,
        and the best policy is read from the log. Nothing is fine-tuned or certified again for them,
        except the original model's certificates, recomputed (deterministically) once per run.

        ``best_checkpoint``: where the fine-tuned quantized model of the best episode goes (``metadata``,
        as ``qrobust.models.checkpoint.model_metadata`` makes it, plus "bit_policy" and "search"); written whenever the best improves, and rebuilt
        at the end (the best episode fine-tuned again, deterministically) if the file is missing.
        """
        if best_checkpoint is not None and not {"model", "model_options", "dataset"} <= set(metadata or {}):
            raise ValueError("best_checkpoint needs metadata describing the model (model_metadata(...))")
        config = self.config
        header = {**config.to_dict(), "layers": [asdict(layer) for layer in self.layers]}
        log, records = SearchLog.open(log_path, header, ignore=("episodes",))
        if len(records) > config.episodes:
            raise QRobustError(
                f"{log_path} already has {len(records)} episodes, more than the {config.episodes} asked for"
            )
        acr_original = None if self.certifier is None else self.certifier.acr_original  # certified here, once
        agent = DDPGAgent(STATE_FEATURES, config.agent)
        for record in records:
            steps, _ = self.propose(agent, record.episode, record.actions)
            agent.finish_episode(steps, record.reward, record.episode)
        resumed, best = len(records), best_record(records)
        with progress_bar(progress) as bar:
            task = bar.add_task("search", total=config.episodes, completed=resumed, status=_status(best))
            for episode in range(resumed, config.episodes):
                started = time.perf_counter()
                steps, actions = self.propose(agent, episode)
                policy = enforce_budget(self.layers, actions_to_policy(self.layers, actions), config.budget)
                mixed = self.finetuned(policy, episode)
                reward, acr, noisy_accuracy = self.evaluate(mixed)
                record = EpisodeRecord(
                    episode,
                    tuple(actions),
                    policy,
                    bitops_percent(self.layers, policy),
                    reward,
                    acr,
                    noisy_accuracy,
                    time.perf_counter() - started,
                )
                if best is None or record.reward > best.reward:
                    best = record
                    if best_checkpoint is not None:
                        self._save(best_checkpoint, mixed, record, metadata)
                log.append(record)  # after the checkpoint: a crash in between re-runs this very episode
                agent.finish_episode(steps, reward, episode)
                records.append(record)
                if progress:
                    bar.console.log(describe(record))
                bar.update(task, advance=1, status=_status(best))
        if best is None:  # SearchConfig asks for at least one episode
            raise RuntimeError("the search ended without an episode")
        if best_checkpoint is not None and not Path(best_checkpoint).exists():
            self._save(best_checkpoint, self.finetuned(best.policy, best.episode), best, metadata)
        return SearchResult(tuple(records), best, acr_original, resumed)

    def _save(
        self, path: str | Path, mixed: MixedPrecisionModel, record: EpisodeRecord, metadata: dict[str, Any] | None
    ) -> None:
        search = {
            "episode": record.episode,
            "reward": record.reward,
            "acr": record.acr,
            "accuracy": record.accuracy,
            "bitops_percent": record.bitops_percent,
            "config": self.config.to_dict(),
        }
        extra = {"bit_policy": mixed.policy.to_dict(), "search": search, "sigma": self.config.sigma}
        state = {name: tensor.detach().clone() for name, tensor in mixed.state_dict().items()}
        save_checkpoint(path, Checkpoint(state, {**(metadata or {}), **extra}))


def describe(record: EpisodeRecord) -> str:
    """One line about an episode, for logs and the command line."""
    acr = "" if record.acr is None else f"  ACR {record.acr:.3f}"
    return (
        f"episode {record.episode}  weights {list(record.policy.weight_bits)}  activations {list(record.policy.act_bits)}"
        f"  {record.bitops_percent:.2f}% BitOPs  reward {record.reward:+.4f}{acr}  noisy acc {record.accuracy:.3f}"
        f"  ({record.seconds:.1f}s)"
    )


def _status(best: EpisodeRecord | None) -> str:
    if best is None:
        return ""
    acr = "" if best.acr is None else f" ACR {best.acr:.3f}"
    return f"best reward {best.reward:+.4f}{acr} at {best.bitops_percent:.2f}% BitOPs (episode {best.episode})"


class _Certifier:
    """Certificates of smoothed models on the validation images: the original's once
    (``certify_original``, n0 selection and n estimation samples), each quantized one incrementally from
    it (IRS) or afresh (``certifier="rs"``)."""

    def __init__(self, model: nn.Module, validation_set: LatticeDataset, config: SearchConfig):
        self.config, self.validation_set = config, validation_set
        self.seed = derived_seed(config.seed, CERTIFICATION_STREAM)
        smoothed = self._smoothed(model)
        self.cache = certify_original(
            smoothed, validation_set.images, n0=config.n0, n=config.n, alpha=config.alpha, seed=self.seed
        )
        self.acr_original = acr(self.cache.certificates, validation_set.labels)

    def certify(self, mixed: nn.Module) -> Sequence[Certificate]:
        """The quantized smoothed model's certificates, one per validation image; each holds with
        probability >= 1 - alpha - alpha_zeta (l2 radii in [0, 1] pixel units)."""
        config, smoothed = self.config, self._smoothed(mixed)
        if config.certifier == "irs":
            return certify_incremental(
                self.cache,
                smoothed,
                n_zeta=config.n_zeta,
                alpha_zeta=config.alpha_zeta,
                gamma=config.gamma,
                seed=self.seed,
            )
        seed = derived_seed(config.seed, RS_STREAM)
        return [
            smoothed.certify(
                x, config.n0, config.n_zeta, config.alpha + config.alpha_zeta, example_generator(seed, index)
            )
            for index, x in enumerate(self.validation_set.images)
        ]

    def certified_accuracy(self, certificates: Sequence[Certificate]) -> float:
        """The fraction of validation images certified with their label at radius ``reward_radius``."""
        summary = summarize_certificates(certificates, self.validation_set.labels, radii=(self.config.reward_radius,))
        return float(summary.certified_accuracy[0])

    def _smoothed(self, model: nn.Module) -> SmoothedClassifier:
        """``model`` (a CPU copy of it) frozen for inference (TorchScript folds the weight quantization once;
        about twice as fast as eager on a CPU), smoothed with Gaussian noise."""
        info = self.validation_set.info
        frozen = freeze_for_inference(_on_cpu(model), torch.rand(self.config.batch_size, *info.shape))
        return SmoothedClassifier(frozen, info.num_classes, FloatRS(self.config.sigma), self.config.batch_size)


def _on_cpu(model: nn.Module) -> nn.Module:
    """``model`` if it is on the CPU, else a copy of it there (``model`` is not moved)."""
    return model if module_device(model).type == "cpu" else copy.deepcopy(model).cpu()
