"""Held-out numbers from per-pair log-probs, one definition each, for training's `eval_*` lines and for
`smolalign eval`'s eval.json alike: preference accuracies and margins of pairs, the sign accuracy of
labelled rows (KTO), a reward model's accuracy; each accuracy an exact count of the pairs it rests on,
with its 95% interval. Also eval.json's per-pair rows (eval_pairs.jsonl) and its table."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from smolalign.core.logprobs import PairLogps
from smolalign.data.tokenize import TokenizedPair
from smolalign.stats import ACCURACY_METRICS, Proportion, interval_fields, interval_keys


def mean_logps_wins(policy: PairLogps) -> torch.Tensor:
    """Per pair, whether the chosen answer has the higher mean token log-prob under the policy alone.

    Its share, `logps/mean_accuracy`, unlike `rewards/accuracies` of DPO (zero before training, when
    policy = reference), is meaningful before and after training and for every algorithm.
    """
    return policy.chosen_mean > policy.rejected_mean


def preference_summary(policy: PairLogps, reference: PairLogps | None, *, beta: float) -> dict[str, float]:
    """eval.json: DPO implicit rewards beta * (policy - reference) when a reference is given, otherwise
    length-normalised rewards beta * mean token log-prob (as ORPO and SimPO define them). Each accuracy
    comes with its 95% Wilson interval (`<name>_ci_low`, `<name>_ci_high`) over the `pairs` pairs."""
    if reference is not None:
        chosen_rewards = beta * (policy.chosen - reference.chosen)
        rejected_rewards = beta * (policy.rejected - reference.rejected)
        reward_kind = "beta * (logps - ref_logps), summed over answer tokens"
    else:
        chosen_rewards, rejected_rewards = beta * policy.chosen_mean, beta * policy.rejected_mean
        reward_kind = "beta * mean answer-token logps (no reference)"
    reward_wins = chosen_rewards > rejected_rewards
    logps_wins = mean_logps_wins(policy)
    pairs = len(policy.chosen)
    summary = {
        "rewards/accuracies": reward_wins.float().mean().item(),
        **interval_fields("rewards/accuracies", int(reward_wins.sum()), pairs),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "logps/chosen": policy.chosen.mean().item(),
        "logps/rejected": policy.rejected.mean().item(),
        "logps/mean_accuracy": logps_wins.float().mean().item(),
        **interval_fields("logps/mean_accuracy", int(logps_wins.sum()), pairs),
        "pairs": pairs,
        "beta": beta,
        "reward": reward_kind,
    }
    if reference is not None:
        summary["ref_logps/chosen"] = reference.chosen.mean().item()
        summary["ref_logps/rejected"] = reference.rejected.mean().item()
    return summary


def labelled_summary(policy: PairLogps, reference: PairLogps, *, beta: float) -> dict[str, float]:
    """Unpaired rows (KTO): implicit rewards beta * (policy - reference) of each answer, and the share of rows
    whose reward has the sign of its label (positive for desirable, negative for undesirable), with its
    interval over the `pairs` rows."""
    rewards = beta * (policy.chosen - reference.chosen)
    desirable = policy.labels
    right = torch.where(desirable, rewards > 0, rewards < 0)
    rows = len(rewards)
    summary = {"rewards/accuracies": right.float().mean().item(), **interval_fields("rewards/accuracies",
                                                                                      int(right.sum()), rows)}
    for name, group in (("chosen", desirable), ("rejected", ~desirable)):
        if group.any():
            summary[f"rewards/{name}"] = rewards[group].mean().item()
            summary[f"logps/{name}"] = policy.chosen[group].mean().item()
    if desirable.any() and not desirable.all():
        summary["rewards/margins"] = summary["rewards/chosen"] - summary["rewards/rejected"]
    return {**summary, "pairs": rows, "beta": beta, "reward": "beta * (logps - ref_logps) of each labelled answer"}


def reward_model_summary(policy: PairLogps) -> dict[str, float]:
    """A reward model's held-out pairs: the share whose chosen answer gets the higher reward, and the margin."""
    wins = policy.chosen > policy.rejected
    pairs = len(wins)
    return {"accuracy": wins.float().mean().item(), **interval_fields("accuracy", int(wins.sum()), pairs),
            "margin": (policy.chosen - policy.rejected).mean().item(), "pairs": pairs}


def write_pair_rows(path: Path, pairs: list[TokenizedPair], policy: PairLogps, reference: PairLogps | None) -> None:
    """eval_pairs.jsonl: one row per pair in dataset order, sums of answer-token log-probs (TRL's convention)."""
    with path.open("w") as handle:
        for i, pair in enumerate(pairs):
            row = {
                "index": pair.index,
                "logps_chosen": policy.chosen[i].item(),
                "logps_rejected": policy.rejected[i].item(),
                "n_tokens_chosen": int(policy.chosen_tokens[i].item()),
                "n_tokens_rejected": int(policy.rejected_tokens[i].item()),
            }
            if reference is not None:
                row["ref_logps_chosen"] = reference.chosen[i].item()
                row["ref_logps_rejected"] = reference.rejected[i].item()
            handle.write(json.dumps(row) + "\n")


def format_summary_table(summary: dict) -> str:
    """The summary as aligned `name  value` lines; an accuracy shows its interval and pair count on its own
    line (`0.61 [0.53, 0.68], n=150`) rather than as separate `_ci_low` and `_ci_high` lines."""
    folded = {key for name in ACCURACY_METRICS for key in interval_keys(name) if name in summary}
    rows = []
    for key, value in summary.items():
        if key in folded:
            continue
        if key in ACCURACY_METRICS:
            rows.append((key, str(Proportion.read(summary, key, n_key="pairs"))))
        else:
            rows.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {key:<{width}}  {value}" for key, value in rows)
