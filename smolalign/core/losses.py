"""Objectives as pure functions of per-pair log-probs, with TRL 1.16's conventions and metric names.

Inputs are `PairLogps`: per pair, the summed log-probs and token counts of the chosen answer, the
rejected answer and (for ORPO) the prompt. DPO scores an answer by the **sum** of its token log-probs,
ORPO and SimPO by the **mean**. Each objective returns the scalar loss (mean over pairs) and its
metrics; the training loop only averages them. Accuracies use a strict `>`, as TRL does.

Each objective declares what it needs, so the loop skips work without special cases: a reference
forward pass only when `needs_reference`, prompt-token log-probs only when `needs_prompt_logps`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smolalign.config.choices import Algorithm, DpoLossType
from smolalign.config.train import TrainConfig
from smolalign.core.logprobs import PairLogps


@dataclass(frozen=True)
class LossSettings:
    """The hyperparameters objectives read: TrainConfig's keys (TRL's names), with its defaults."""

    beta: float = TrainConfig.beta
    loss_type: DpoLossType = TrainConfig.loss_type
    label_smoothing: float = TrainConfig.label_smoothing
    rpo_alpha: float | None = TrainConfig.rpo_alpha
    simpo_gamma: float = TrainConfig.simpo_gamma
    cpo_alpha: float = TrainConfig.cpo_alpha
    center_rewards_coefficient: float | None = TrainConfig.center_rewards_coefficient

    @classmethod
    def from_config(cls, config: TrainConfig) -> LossSettings:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class BatchTotals:
    """Sizes of the whole batch that a slice of pairs belongs to.

    Losses divide by these rather than by the slice's own sizes, so the losses (and gradients) of the
    slices of a batch add up exactly to those of the batch: a batch can then be run through the model
    in pieces that fit in memory.
    """

    pairs: int
    chosen_tokens: float
    prompt_tokens: float

    @classmethod
    def of(cls, policy: PairLogps) -> BatchTotals:
        return cls(len(policy.chosen), float(policy.chosen_tokens.sum()), float(policy.prompt_tokens.sum()))


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, torch.Tensor]  # scalars, detached, TRL's names


# -- DPO family: per-pair losses from the log-ratios log pi(y|x) - log pi_ref(y|x) ---------------------
# Signature: (chosen_logratios, rejected_logratios, *, beta, label_smoothing, chosen_tokens, rejected_tokens)


def dpo_sigmoid(chosen, rejected, *, beta, **_):
    """DPO, Rafailov et al. 2023 (arXiv 2305.18290), Eq. 7: -log sigmoid(beta * (r_w - r_l))."""
    return -F.logsigmoid(beta * (chosen - rejected))


def dpo_hinge(chosen, rejected, *, beta, **_):
    """SLiC-HF, Zhao et al. 2023 (arXiv 2305.10425), Eq. 3 with delta = 1/beta: relu(1 - beta * margin)."""
    return torch.relu(1 - beta * (chosen - rejected))


def dpo_ipo(chosen, rejected, *, beta, chosen_tokens, rejected_tokens, **_):
    """IPO, Azar et al. 2023 (arXiv 2310.12036), Eq. 17, on per-token log-ratios as TRL computes it
    (the normalisation its authors confirmed): (h - 1/(2 beta))^2 with beta as tau."""
    margin = chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)
    return (margin - 1 / (2 * beta)) ** 2


def dpo_robust(chosen, rejected, *, beta, label_smoothing, **_):
    """Robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409), Eq. 8: unbiased under label-flip rate eps."""
    logits = beta * (chosen - rejected)
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def dpo_bco_pair(chosen, rejected, *, beta, **_):
    """BCO (paired), Jung et al. 2024 (arXiv 2404.04656): binary classification of each answer's reward."""
    return -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)


def dpo_sppo_hard(chosen, rejected, *, beta, **_):
    """SPPO, Wu et al. 2024 (arXiv 2405.00675), Eq. 4.7 with the hard win probability P = 1 / 0."""
    return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2


def dpo_nca_pair(chosen, rejected, *, beta, **_):
    """NCA, Chen et al. 2024 (arXiv 2402.05369), paired form: absolute rather than relative likelihood."""
    chosen_reward, rejected_reward = beta * chosen, beta * rejected
    return -F.logsigmoid(chosen_reward) - 0.5 * F.logsigmoid(-chosen_reward) - 0.5 * F.logsigmoid(-rejected_reward)


def dpo_apo_zero(chosen, rejected, *, beta, **_):
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 7: raise chosen, lower rejected
    likelihood (for answers better than the model's own)."""
    return (1 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)


def dpo_apo_down(chosen, rejected, *, beta, **_):
    """APO-down, same paper, Eq. 8: lower both, rejected more (for answers worse than the model's own)."""
    return torch.sigmoid(beta * chosen) + (1 - torch.sigmoid(beta * (chosen - rejected)))


# One function per name of config.choices.DPO_LOSS_TYPES (the tests check they agree).
DPO_LOSSES: dict[DpoLossType, Callable[..., torch.Tensor]] = {
    "sigmoid": dpo_sigmoid,
    "hinge": dpo_hinge,
    "ipo": dpo_ipo,
    "robust": dpo_robust,
    "bco_pair": dpo_bco_pair,
    "sppo_hard": dpo_sppo_hard,
    "nca_pair": dpo_nca_pair,
    "apo_zero": dpo_apo_zero,
    "apo_down": dpo_apo_down,
}


def chosen_nll(policy: PairLogps, totals: BatchTotals, *, with_prompt: bool = False) -> torch.Tensor:
    """Token-averaged negative log-likelihood of the chosen answers over the whole batch (not per pair)."""
    total = policy.chosen + (policy.prompt if with_prompt else 0)
    count = totals.chosen_tokens + (totals.prompt_tokens if with_prompt else 0)
    return -total.sum() / max(count, 1.0)


def preference_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def dpo(policy: PairLogps, reference: PairLogps, settings: LossSettings, totals: BatchTotals) -> ObjectiveOutput:
    """DPO and its variants (`loss_type`), plus RPO's NLL term on the chosen answers when `rpo_alpha` is set
    (Pang et al. 2024, arXiv 2404.19733, Eq. 2)."""
    chosen_logratios = policy.chosen - reference.chosen
    rejected_logratios = policy.rejected - reference.rejected
    per_pair = DPO_LOSSES[settings.loss_type](
        chosen_logratios,
        rejected_logratios,
        beta=settings.beta,
        label_smoothing=settings.label_smoothing,
        chosen_tokens=policy.chosen_tokens,
        rejected_tokens=policy.rejected_tokens,
    )
    loss = per_pair.sum() / totals.pairs
    metrics = preference_metrics(
        settings.beta * chosen_logratios, settings.beta * rejected_logratios, policy.chosen, policy.rejected
    )
    if settings.rpo_alpha is not None:
        nll = chosen_nll(policy, totals)
        loss = loss + settings.rpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return ObjectiveOutput(loss, metrics)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(policy: PairLogps, reference: PairLogps | None, settings: LossSettings, totals: BatchTotals) -> ObjectiveOutput:
    """ORPO, Hong et al. 2024 (arXiv 2403.07691), Eqs. 6-7: L = NLL(chosen) - lambda * log sigmoid(log OR),
    with log OR = log odds(y_w) - log odds(y_l) on mean token log-probs and lambda = `beta`. As in TRL,
    the NLL covers the prompt and answer tokens of the chosen sequence."""
    chosen_mean, rejected_mean = policy.chosen_mean, policy.rejected_mean
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    log_sigmoid_odds = F.logsigmoid(log_odds)
    nll = chosen_nll(policy, totals, with_prompt=True)
    loss = nll - settings.beta * log_sigmoid_odds.sum() / totals.pairs
    metrics = preference_metrics(settings.beta * chosen_mean, settings.beta * rejected_mean, chosen_mean, rejected_mean)
    metrics.update(
        {
            "nll_loss": nll.detach(),
            "log_odds_ratio": log_sigmoid_odds.detach().mean(),
            "log_odds_chosen": log_odds.detach().mean(),
        }
    )
    return ObjectiveOutput(loss, metrics)


def simpo(policy: PairLogps, reference: PairLogps | None, settings: LossSettings, totals: BatchTotals) -> ObjectiveOutput:
    """SimPO, Meng et al. 2024 (arXiv 2405.14734), Eq. 6: -log sigmoid(beta * (mean_w - mean_l) - gamma),
    with label smoothing and, when `cpo_alpha` > 0, CPO's NLL term on the chosen answers (Xu et al.
    2024, arXiv 2401.08417), as TRL's CPOTrainer with loss_type="simpo"."""
    chosen_mean, rejected_mean = policy.chosen_mean, policy.rejected_mean
    logits = settings.beta * (chosen_mean - rejected_mean) - settings.simpo_gamma
    per_pair = -F.logsigmoid(logits) * (1 - settings.label_smoothing) - F.logsigmoid(-logits) * settings.label_smoothing
    nll = chosen_nll(policy, totals) if settings.cpo_alpha else torch.zeros((), device=per_pair.device)
    loss = per_pair.sum() / totals.pairs + settings.cpo_alpha * nll
    metrics = preference_metrics(settings.beta * chosen_mean, settings.beta * rejected_mean, chosen_mean, rejected_mean)
    metrics["nll_loss"] = nll.detach()
    return ObjectiveOutput(loss, metrics)


def sft(policy: PairLogps, reference: PairLogps | None, settings: LossSettings, totals: BatchTotals) -> ObjectiveOutput:
    """Supervised fine-tuning: token-averaged NLL of the chosen answers (prompt tokens are not trained)."""
    nll = chosen_nll(policy, totals)
    return ObjectiveOutput(nll, {"nll_loss": nll.detach(), "logps/chosen": policy.chosen.detach().mean()})


def reward(policy: PairLogps, reference: PairLogps | None, settings: LossSettings, totals: BatchTotals) -> ObjectiveOutput:
    """Bradley-Terry reward model (Ouyang et al. 2022, arXiv 2203.02155, Eq. 1): -log sigmoid(r_w - r_l) on
    the rewards of the chosen and rejected sequences, plus, with `center_rewards_coefficient`, the
    centring penalty of Eisenstein et al. 2023 (arXiv 2312.09244), as TRL's RewardTrainer."""
    chosen, rejected = policy.chosen, policy.rejected
    loss = -F.logsigmoid(chosen - rejected).sum() / totals.pairs
    if settings.center_rewards_coefficient:
        loss = loss + settings.center_rewards_coefficient * ((chosen + rejected) ** 2).sum() / totals.pairs
    rewards = torch.cat([chosen, rejected]).detach()
    metrics = {
        "accuracy": (chosen > rejected).float().mean().detach(),
        "margin": (chosen - rejected).mean().detach(),
        "min_reward": rewards.min(),
        "mean_reward": rewards.mean(),
        "max_reward": rewards.max(),
    }
    return ObjectiveOutput(loss, metrics)


@dataclass(frozen=True)
class Objective:
    name: str
    loss_fn: Callable[[PairLogps, PairLogps | None, LossSettings, BatchTotals], ObjectiveOutput]
    needs_reference: bool
    needs_rejected: bool = True
    needs_prompt_logps: bool = False
    reward_model: bool = False  # trains a sequence-classification head: one reward per answer, not log-probs

    def compute(
        self, policy: PairLogps, reference: PairLogps | None, settings: LossSettings, totals: BatchTotals | None = None
    ) -> ObjectiveOutput:
        """Loss and metrics of a batch, or of a slice of it when `totals` describes the whole batch."""
        return self.loss_fn(policy, reference, settings, totals or BatchTotals.of(policy))


# One objective per name of config.choices.ALGORITHMS (the tests check they agree).
OBJECTIVES: dict[Algorithm, Objective] = {
    "dpo": Objective("dpo", dpo, needs_reference=True),
    "orpo": Objective("orpo", orpo, needs_reference=False, needs_prompt_logps=True),
    "simpo": Objective("simpo", simpo, needs_reference=False),
    "sft": Objective("sft", sft, needs_reference=False, needs_rejected=False),
    "reward": Objective("reward", reward, needs_reference=False, reward_model=True),
}
