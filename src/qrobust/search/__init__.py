"""Mixed-precision policy search (ARQ, Yang et al. 2025): a DDPG agent proposes per-layer weight and
activation bit-widths under a BitOPs budget, rewarded by the certified radius (or, HAQ-style, by noisy
accuracy) of the fine-tuned quantized model; the search is logged and resumable.

    search = PolicySearch(model, train_set, SearchConfig(sigma=0.25, budget=1.6))
    result = search.run("out/search.jsonl", best_checkpoint="out/best.pt")
    result.best.policy.save("out/policy.json")
"""

from qrobust.search.arq import (
    REWARDS,
    PolicySearch,
    SearchConfig,
    SearchResult,
    actions_to_policy,
    describe,
    finetune_policy,
    fixed_precision_policy,
    searched_layers,
    state_features,
    step_state,
)
from qrobust.search.ddpg import DDPGAgent, DDPGConfig, ReplayBuffer, Step
from qrobust.search.log import EpisodeRecord, SearchLog, best_record

__all__ = [
    "REWARDS",
    "DDPGAgent",
    "DDPGConfig",
    "EpisodeRecord",
    "PolicySearch",
    "ReplayBuffer",
    "SearchConfig",
    "SearchLog",
    "SearchResult",
    "Step",
    "actions_to_policy",
    "best_record",
    "describe",
    "finetune_policy",
    "fixed_precision_policy",
    "searched_layers",
    "state_features",
    "step_state",
]
