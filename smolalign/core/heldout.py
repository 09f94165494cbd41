"""Held-out evaluation: objective metrics during training, and per-pair log-probs for `smolalign eval`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from smolalign.core.layouts import build_batch
from smolalign.core.logprobs import PairLogps, concat_pair_logps, score_batch
from smolalign.data.tokenize import TokenizedPair
from smolalign.metrics import MetricWindow
from smolalign.stats import ACCURACY_METRICS, Proportion, interval_fields, interval_keys
from smolalign.training.step import PairRunner

log = logging.getLogger("smolalign")


def mean_logps_wins(policy: PairLogps) -> torch.Tensor:
    """Per pair, whether the chosen answer has the higher mean token log-prob under the policy alone.

    Its share, `logps/mean_accuracy`, unlike `rewards/accuracies` of DPO (zero before training, when
    policy = reference), is meaningful before and after training and for every algorithm.
    """
    return policy.chosen_mean > policy.rejected_mean


@torch.no_grad()
def evaluate_objective(runner: PairRunner, pairs: list[TokenizedPair], *, batch_size: int) -> dict[str, float]:
    """The objective's loss and metrics on held-out pairs, averaged over batches as TRL's evaluate does;
    for each accuracy also its 95% interval (`eval_<name>_ci_low`, `eval_<name>_ci_high`), and the
    number of pairs (`eval_pairs`).

    The interval is Wilson's for the pairs the accuracy got right out of all pairs. The logged accuracy
    is TRL's mean of batch means, which is that same share when every batch is full; a smaller last
    batch weighs as much as a full one in TRL's number, so the two may then differ a little.
    """
    window = MetricWindow()
    wins: dict[str, int] = dict.fromkeys(ACCURACY_METRICS, 0)
    for start in tqdm(range(0, len(pairs), batch_size), desc="evaluating", leave=False, unit="batch"):
        batch = pairs[start : start + batch_size]
        result = runner.run(batch)
        metrics = {"loss": result.output.loss, **result.output.metrics}
        if runner.objective.needs_rejected and not runner.objective.reward_model:
            metrics["logps/mean_accuracy"] = mean_logps_wins(result.policy).float().mean()
        window.add(metrics)
        for name in wins.keys() & metrics.keys():  # an accuracy is a share of the batch: back to a count
            wins[name] += round(float(metrics[name]) * len(batch))
    summary = window.mean()
    for name in [name for name in ACCURACY_METRICS if name in summary]:
        summary |= interval_fields(name, wins[name], len(pairs))
    summary["pairs"] = len(pairs)
    return {f"eval_{name}": value for name, value in summary.items()}


@torch.no_grad()
def score_pairs(
    scorer, pairs: list[TokenizedPair], *, layout: str, batch_size: int, pad_token_id: int, device: torch.device,
    desc: str = "scoring",
) -> PairLogps:
    """Per-pair log-prob sums and token counts for every pair, in order (concatenated over batches)."""
    parts = []
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, unit="batch"):
        batch = build_batch(pairs[start : start + batch_size], layout, pad_token_id=pad_token_id).to(device)
        parts.append(score_batch(scorer, batch))
    return concat_pair_logps(parts).cpu()


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
