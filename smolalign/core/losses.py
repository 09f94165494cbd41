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

from smolalign.config.algorithms import DEFAULT_LOSS_TYPES
from smolalign.config.choices import Algorithm, FDivergence
from smolalign.config.train import TrainConfig
from smolalign.core.dpo_losses import BATCH_LOSSES, DPO_LOSSES, PairTerms, f_divergence, smoothed_logistic
from smolalign.core.logprobs import PairLogps
from smolalign.data.formats import RowUse


@dataclass(frozen=True)
class LossSettings:
    """The hyperparameters objectives read: TrainConfig's keys (TRL's names), with its defaults."""

    beta: float = TrainConfig.beta
    loss_type: str | tuple[str, ...] | None = TrainConfig.loss_type  # None: the algorithm's default
    loss_weights: tuple[float, ...] | None = TrainConfig.loss_weights
    label_smoothing: float = TrainConfig.label_smoothing
    rpo_alpha: float | None = TrainConfig.rpo_alpha
    f_divergence_type: FDivergence = TrainConfig.f_divergence_type
    f_alpha_divergence_coef: float = TrainConfig.f_alpha_divergence_coef
    ld_alpha: float | None = TrainConfig.ld_alpha
    use_weighting: bool = TrainConfig.use_weighting
    discopop_tau: float = TrainConfig.discopop_tau
    simpo_gamma: float = TrainConfig.simpo_gamma
    cpo_alpha: float = TrainConfig.cpo_alpha
    center_rewards_coefficient: float | None = TrainConfig.center_rewards_coefficient
    desirable_weight: float = TrainConfig.desirable_weight
    undesirable_weight: float = TrainConfig.undesirable_weight

    @classmethod
    def from_config(cls, config: TrainConfig) -> LossSettings:
        values = {name: getattr(config, name) for name in cls.__dataclass_fields__}
        return cls(**{name: tuple(value) if isinstance(value, list) else value for name, value in values.items()})

    @property
    def loss_types(self) -> tuple[str, ...]:
        """DPO's loss types (its default unless set), in order."""
        if self.loss_type is None:
            return (DEFAULT_LOSS_TYPES["dpo"],)
        return (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)


@dataclass(frozen=True)
class BatchTotals:
    """What a slice of pairs needs to know of the whole batch it belongs to.

    Losses divide by these sizes rather than by the slice's own, so the losses (and gradients) of the
    slices of a batch add up exactly to those of the batch: a batch can then be run through the model
    in pieces that fit in memory. `kl` is KTO's reference point, estimated on the whole batch.
    """

    pairs: int
    chosen_tokens: float
    prompt_tokens: float
    kl: torch.Tensor | None = None

    @classmethod
    def of(cls, policy: PairLogps) -> BatchTotals:
        return cls(len(policy.chosen), float(policy.chosen_tokens.sum()), float(policy.prompt_tokens.sum()))


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, torch.Tensor]  # scalars, detached, TRL's names


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
    """DPO and its variants: the sum of each `loss_type`'s batch mean times its weight (several at once as MPO
    combines them), on log-ratios through `f_divergence_type`, with LD-DPO's `ld_alpha` and WPO's pair
    weights (`use_weighting`), plus RPO's NLL term when `rpo_alpha` is set (Pang et al. 2024, arXiv
    2404.19733, Eq. 2). Each term is logged as `loss/<type>` when there are several."""
    chosen_policy, rejected_policy = desensitized(policy, settings.ld_alpha)
    chosen_reference, rejected_reference = desensitized(reference, settings.ld_alpha)
    chosen_logratios, rejected_logratios = chosen_policy - chosen_reference, rejected_policy - rejected_reference
    divergence = settings.f_divergence_type, settings.f_alpha_divergence_coef
    terms = PairTerms(
        chosen=f_divergence(chosen_logratios, *divergence), rejected=f_divergence(rejected_logratios, *divergence),
        policy_margin=chosen_policy - rejected_policy, reference_margin=chosen_reference - rejected_reference,
        chosen_tokens=policy.chosen_tokens, rejected_tokens=policy.rejected_tokens,
        chosen_nll=-policy.chosen * (totals.pairs / max(totals.chosen_tokens, 1.0)),
    )
    pair_weights = wpo_weights(policy) if settings.use_weighting else 1.0
    types = settings.loss_types
    loss = torch.zeros((), device=policy.chosen.device)
    metrics = preference_metrics(
        settings.beta * chosen_logratios, settings.beta * rejected_logratios, chosen_policy, rejected_policy
    )
    for loss_type, weight in zip(types, settings.loss_weights or [1.0] * len(types), strict=True):
        term = (DPO_LOSSES[loss_type](terms, settings) * pair_weights).sum() / totals.pairs
        loss = loss + weight * term
        if len(types) > 1:
            metrics[f"loss/{loss_type}"] = term.detach()
    if settings.rpo_alpha is not None:
        nll = chosen_nll(policy, totals)
        loss = loss + settings.rpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return ObjectiveOutput(loss, metrics)


def desensitized(values: PairLogps, ld_alpha: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The answers' log-probs, with LD-DPO's weight `ld_alpha` on the tokens beyond the length both answers
    share (Liu et al. 2024, arXiv 2409.06411, Eq. 9), for policy and reference alike; the plain sums without."""
    if ld_alpha is None:
        return values.chosen, values.rejected
    return (values.chosen_shared + ld_alpha * (values.chosen - values.chosen_shared),
            values.rejected_shared + ld_alpha * (values.rejected - values.rejected_shared))


def wpo_weights(policy: PairLogps) -> torch.Tensor:
    """WPO, Zhou et al. 2024 (arXiv 2406.11827), Eq. 2: each pair weighted by the product of its answers'
    length-normalised probabilities, p(y_t) / sum_v p_v^2 per token (the policy's own sampling), without a
    gradient."""
    chosen = torch.exp(policy.chosen_wpo / policy.chosen_tokens.clamp(min=1))
    rejected = torch.exp(policy.rejected_wpo / policy.rejected_tokens.clamp(min=1))
    return (chosen * rejected).detach()


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
    per_pair = smoothed_logistic(logits, settings)
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


def kto(policy: PairLogps, reference: PairLogps, settings: LossSettings, totals: BatchTotals) -> ObjectiveOutput:
    """KTO, Ethayarajh et al. 2024 (arXiv 2402.01306), Eq. 7, on unpaired rows (the answer in `chosen`, its
    thumbs up or down in `labels`): a desirable answer's loss is 1 - sigmoid(beta (r - z)), an undesirable
    one's 1 - sigmoid(beta (z - r)), r = log pi/pi_ref of the answer and z the batch's KL reference point
    (`totals.kl`); weighted by `desirable_weight` / `undesirable_weight` and averaged over rows. loss_type
    apo_zero_unpaired is APO-zero's unpaired form (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7):
    1 - sigmoid(beta r) and sigmoid(beta r), without z."""
    logratios = policy.chosen - reference.chosen
    desirable = policy.labels
    if settings.loss_type == "apo_zero_unpaired":
        losses = torch.where(desirable, 1 - torch.sigmoid(settings.beta * logratios),
                             torch.sigmoid(settings.beta * logratios))
    else:
        losses = torch.where(desirable, 1 - torch.sigmoid(settings.beta * (logratios - totals.kl)),
                             1 - torch.sigmoid(settings.beta * (totals.kl - logratios)))
    weights = torch.where(desirable, settings.desirable_weight, settings.undesirable_weight)
    loss = (weights * losses).sum() / totals.pairs
    rewards = (settings.beta * logratios).detach()
    metrics = {"kl": totals.kl.detach() if totals.kl is not None else torch.zeros((), device=loss.device),
               "rewards/accuracies": torch.where(desirable, rewards > 0, rewards < 0).float().mean()}
    for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
        if rows.any():  # TRL logs a group's values only for batches that have it
            metrics[f"rewards/{name}"] = rewards[rows].mean()
            metrics[f"logps/{name}"] = policy.chosen[rows].detach().mean()
    if desirable.any() and not desirable.all():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return ObjectiveOutput(loss, metrics)


def kto_kl(policy: PairLogps, reference: PairLogps, settings: LossSettings) -> torch.Tensor | None:
    """KTO's KL estimate on a batch (before averaging over processes and clamping at zero): the mean of
    log pi/pi_ref of each prompt with another row's answer (held in `rejected`), without a gradient."""
    if settings.loss_type == "apo_zero_unpaired":
        return None
    return (policy.rejected - reference.rejected).detach().mean()


def _kto_couples_pairs(settings: LossSettings) -> bool:
    return settings.loss_type != "apo_zero_unpaired"


def _dpo_couples_pairs(settings: LossSettings) -> bool:
    return bool(BATCH_LOSSES & set(settings.loss_types))


@dataclass(frozen=True)
class Objective:
    name: str
    loss_fn: Callable[[PairLogps, PairLogps | None, LossSettings, BatchTotals], ObjectiveOutput]
    needs_reference: bool
    rows: RowUse = "pairs"  # what it trains on (data.formats.RowUse)
    needs_prompt_logps: bool = False
    reward_model: bool = False  # trains a sequence-classification head: one reward per answer, not log-probs
    # Whether a batch's pairs enter its loss together (KTO's KL estimate, AOT's sorting), so that a batch must be
    # scored in one forward pass rather than in chunks.
    couples_pairs: Callable[[LossSettings], bool] = lambda settings: False
    # KTO: the reference point `totals.kl` estimated on the whole batch (None where the settings use none).
    reference_point: Callable[[PairLogps, PairLogps, LossSettings], torch.Tensor | None] | None = None

    def compute(
        self, policy: PairLogps, reference: PairLogps | None, settings: LossSettings, totals: BatchTotals | None = None
    ) -> ObjectiveOutput:
        """Loss and metrics of a batch, or of a slice of it when `totals` describes the whole batch."""
        return self.loss_fn(policy, reference, settings, totals or BatchTotals.of(policy))


# One objective per name of config.choices.ALGORITHMS (the tests check they agree).
OBJECTIVES: dict[Algorithm, Objective] = {
    "dpo": Objective("dpo", dpo, needs_reference=True, couples_pairs=_dpo_couples_pairs),
    "orpo": Objective("orpo", orpo, needs_reference=False, needs_prompt_logps=True),
    "simpo": Objective("simpo", simpo, needs_reference=False),
    "kto": Objective("kto", kto, needs_reference=True, rows="labelled", couples_pairs=_kto_couples_pairs,
                     reference_point=kto_kl),
    "sft": Objective("sft", sft, needs_reference=False, rows="answers"),
    "reward": Objective("reward", reward, needs_reference=False, reward_model=True),
}
