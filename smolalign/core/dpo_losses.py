"""DPO's loss types (TRL 1.16's `loss_type`), each a pure function of per-pair log-ratios, and the
f-divergences that transform the log-ratios first.

Every function takes `PairTerms` (per-pair tensors) and the settings, and returns the per-pair loss
([pairs]); the DPO objective (core/losses.py) weights, sums and averages them. The paper and equation are
cited beside each formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from smolalign.config.choices import DpoLossType, FDivergence

if TYPE_CHECKING:
    from smolalign.core.losses import LossSettings


@dataclass(frozen=True)
class PairTerms:
    """What a DPO loss type reads, per pair ([pairs] tensors)."""

    chosen: torch.Tensor  # log pi(y_w|x) - log pi_ref(y_w|x), through the f-divergence's transform
    rejected: torch.Tensor  # the same for y_l
    policy_margin: torch.Tensor  # log pi(y_w|x) - log pi(y_l|x) (AOT)
    reference_margin: torch.Tensor  # log pi_ref(y_w|x) - log pi_ref(y_l|x) (AOT)
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    chosen_nll: torch.Tensor  # each pair's share of the batch's token-averaged NLL of the chosen answers (sft)


def dpo_sigmoid(t: PairTerms, s: LossSettings) -> torch.Tensor:
    """DPO, Rafailov et al. 2023 (arXiv 2305.18290), Eq. 7: -log sigmoid(beta * (r_w - r_l))."""
    return -F.logsigmoid(s.beta * (t.chosen - t.rejected))


def dpo_hinge(t: PairTerms, s: LossSettings) -> torch.Tensor:
    """SLiC-HF, Zhao et al. 2023 (arXiv 2305.10425), Eq. 3 with delta = 1/beta: relu(1 - beta * margin)."""
    return torch.relu(1 - s.beta * (t.chosen - t.rejected))


def dpo_ipo(t: PairTerms, s: LossSettings) -> torch.Tensor:
    """IPO, Azar et al. 2023 (arXiv 2310.12036), Eq. 17, on per-token log-ratios as TRL computes it
    (the normalisation its authors confirmed): (h - 1/(2 beta))^2 with beta as tau."""
    return (_per_token_margin(t) - 1 / (2 * s.beta)) ** 2


def dpo_sigmoid_norm(t: PairTerms, s: LossSettings) -> torch.Tensor:
    """Length-normalised DPO (TRL's sigmoid_norm; the normalisation of SimPO, Meng et al. 2024, arXiv
    2405.14734, Eq. 4, with the reference kept): -log sigmoid(beta * (r_w/|y_w| - r_l/|y_l|))."""
    return -F.logsigmoid(s.beta * _per_token_margin(t))


def dpo_robust(t: PairTerms, s: LossSettings) -> torch.Tensor:
    """Robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409), Eq. 8: unbiased under label-flip rate eps."""
    logits = s.beta * (t.chosen - t.rejected)
    clean = -(1 - s.label_smoothing) * F.logsigmoid(logits)
    flipped = -s.label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1 - 2 * s.label_smoothing)


def dpo_exo_pair(t: PairTerms, s: LossSettings) -> torch.Tensor:
    """EXO, Ji et al. 2024 (arXiv 2402.00856), Eq. 16: the reverse KL from the model's two-way preference
    (sigmoid(+-beta * margin)) to the target (1 - eps, eps), eps = label_smoothing > 0."""
    logits = s.beta * (t.chosen - t.rejected)
    return (torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-s.label_smoothing))
            + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(s.label_smoothing)))


def dpo_bco_pair(t: PairTerms, s: LossSettings) -> torch.Tensor:
    """BCO (paired), Jung et al. 2024 (arXiv 2404.04656): binary classification of each answer's reward."""
    return -F.logsigmoid(s.beta * t.chosen) - F.logsigmoid(-s.beta * t.rejected)


def dpo_sppo_hard(t: PairTerms, s: LossSettings) -> torch.Tensor:
    """SPPO, Wu et al. 2024 (arXiv 2405.00675), Eq. 4.7 with the hard win probability P = 1 / 0."""
    return (t.chosen - 0.5 / s.beta) ** 2 + (t.rejected + 0.5 / s.beta) ** 2


def dpo_nca_pair(t: PairTerms, s: LossSettings) -> torch.Tensor:
    """NCA, Chen et al. 2024 (arXiv 2402.05369), paired form: absolute rather than relative likelihood."""
    chosen_reward, rejected_reward = s.beta * t.chosen, s.beta * t.rejected
    return -F.logsigmoid(chosen_reward) - 0.5 * F.logsigmoid(-chosen_reward) - 0.5 * F.logsigmoid(-rejected_reward)


def dpo_aot(t: PairTerms, s: LossSettings) -> torch.Tensor:
    """AOT, Melnyk et al. 2024 (arXiv 2406.05882), paired: the batch's policy margins and reference margins,
    each sorted, matched rank by rank through DPO's smoothed logistic loss (a distributional dominance of the
    policy over the reference)."""
    return smoothed_logistic(s.beta * (t.policy_margin.sort().values - t.reference_margin.sort().values), s)


def dpo_aot_unpaired(t: PairTerms, s: LossSettings) -> torch.Tensor:
    """AOT, same paper, unpaired: the batch's chosen and rejected log-ratios, each sorted, matched rank by rank."""
    return smoothed_logistic(s.beta * (t.chosen.sort().values - t.rejected.sort().values), s)


def dpo_apo_zero(t: PairTerms, s: LossSettings) -> torch.Tensor:
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 7: raise chosen, lower rejected
    likelihood (for answers better than the model's own)."""
    return (1 - torch.sigmoid(s.beta * t.chosen)) + torch.sigmoid(s.beta * t.rejected)


def dpo_apo_down(t: PairTerms, s: LossSettings) -> torch.Tensor:
    """APO-down, same paper, Eq. 8: lower both, rejected more (for answers worse than the model's own)."""
    return torch.sigmoid(s.beta * t.chosen) + (1 - torch.sigmoid(s.beta * (t.chosen - t.rejected)))


def dpo_discopop(t: PairTerms, s: LossSettings) -> torch.Tensor:
    """DiscoPOP, Lu et al. 2024 (arXiv 2406.08414), Eq. 5 (log-ratio modulated loss): a mix of the
    logistic and exponential losses, weighted by sigmoid(z / tau), z = beta * margin."""
    logits = s.beta * (t.chosen - t.rejected)
    mix = torch.sigmoid(logits / s.discopop_tau)
    return (1 - mix) * -F.logsigmoid(logits) + mix * torch.exp(-logits)


def dpo_sft(t: PairTerms, s: LossSettings) -> torch.Tensor:
    """The chosen answers' NLL, token-averaged over the batch (TRL's sft term; with sigmoid, RPO, Pang et al.
    2024, arXiv 2404.19733, Eq. 2; with sigmoid and bco_pair, MPO, Wang et al. 2024, arXiv 2411.10442)."""
    return t.chosen_nll


def _per_token_margin(t: PairTerms) -> torch.Tensor:
    return t.chosen / t.chosen_tokens.clamp(min=1) - t.rejected / t.rejected_tokens.clamp(min=1)


def smoothed_logistic(logits: torch.Tensor, s: LossSettings) -> torch.Tensor:
    """-log sigmoid(logits) with conservative label smoothing (cDPO, Mitchell 2023): AOT's and SimPO's loss."""
    return -(1 - s.label_smoothing) * F.logsigmoid(logits) - s.label_smoothing * F.logsigmoid(-logits)


# One function per name of config.choices.DPO_LOSS_TYPES (the tests check they agree).
DPO_LOSSES: dict[DpoLossType, Callable[[PairTerms, LossSettings], torch.Tensor]] = {
    "sigmoid": dpo_sigmoid,
    "hinge": dpo_hinge,
    "ipo": dpo_ipo,
    "exo_pair": dpo_exo_pair,
    "nca_pair": dpo_nca_pair,
    "robust": dpo_robust,
    "bco_pair": dpo_bco_pair,
    "sppo_hard": dpo_sppo_hard,
    "aot": dpo_aot,
    "aot_unpaired": dpo_aot_unpaired,
    "apo_zero": dpo_apo_zero,
    "apo_down": dpo_apo_down,
    "discopop": dpo_discopop,
    "sft": dpo_sft,
    "sigmoid_norm": dpo_sigmoid_norm,
}
# Loss types that sort the batch: a micro-batch must be scored whole, and WPO's weights do not apply.
BATCH_LOSSES = frozenset({"aot", "aot_unpaired"})


def f_divergence(logratios: torch.Tensor, kind: FDivergence, alpha: float) -> torch.Tensor:
    """f'(pi/pi_ref) of an f-divergence, from log-ratios u (Wang et al. 2023, "Beyond Reverse KL", arXiv
    2309.16240, Table 1): reverse KL u; forward KL 1 - e^-u; Jensen-Shannon log 2 + log sigmoid(u);
    alpha-divergence (e^((alpha-1) u) - 1) / (alpha - 1), its exponent capped at 80 in float32."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1) < 1e-6):
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    exponent = ((alpha - 1) * logratios.float()).clamp(max=80)
    return ((torch.exp(exponent) - 1) / (alpha - 1)).to(logratios.dtype)
