"""Objectives against numbers worked out by hand with `math`, on small hand-made batches of pairs.

Every expected value below is computed from the paper's formula in plain Python floats, never with the
torch code under test. The inputs are exactly representable in float32, so the only difference
between the two sides is float32 rounding inside the objectives.
"""

from __future__ import annotations

import math

import pytest
import torch

from smolalign.config.train import load_config
from smolalign.core.dpo_losses import DPO_LOSSES
from smolalign.core.logprobs import PairLogps
from smolalign.core.losses import OBJECTIVES, BatchTotals, LossSettings, log1mexp

BETA = 0.1

# Three pairs. Policy and reference summed log-probs, chosen by hand so that the DPO log-ratios are
# chosen: [3, -1, 0.5], rejected: [-9, 1, -1.5] -> margins [12, -2, 2]: the first pair is well
# separated (hinge is 0), the second is ranked the wrong way (accuracy 2/3).
POLICY = {
    "chosen": [-10.0, -25.0, -7.5],
    "rejected": [-30.0, -14.0, -12.0],
    "prompt": [-6.0, -3.5, -2.0],
    "chosen_tokens": [4.0, 10.0, 3.0],
    "rejected_tokens": [12.0, 7.0, 5.0],
    "prompt_tokens": [5.0, 2.0, 4.0],
}
REFERENCE = {
    "chosen": [-13.0, -24.0, -8.0],
    "rejected": [-21.0, -15.0, -10.5],
    "prompt": [0.0, 0.0, 0.0],
    "chosen_tokens": [4.0, 10.0, 3.0],
    "rejected_tokens": [12.0, 7.0, 5.0],
    "prompt_tokens": [5.0, 2.0, 4.0],
}
CHOSEN_LOGRATIOS = [p - r for p, r in zip(POLICY["chosen"], REFERENCE["chosen"], strict=True)]
REJECTED_LOGRATIOS = [p - r for p, r in zip(POLICY["rejected"], REFERENCE["rejected"], strict=True)]


def pair_logps(values: dict[str, list[float]], *, requires_grad: bool = False) -> PairLogps:
    tensors = {}
    for name, numbers in values.items():
        grad = requires_grad and not name.endswith("_tokens")
        tensors[name] = torch.tensor(numbers, dtype=torch.float32, requires_grad=grad)
    return PairLogps(**tensors)


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def approx(value: float):
    return pytest.approx(value, rel=1e-5, abs=1e-6)


def assert_metrics(metrics: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    assert set(expected) <= set(metrics), f"missing metrics: {set(expected) - set(metrics)}"
    for name, value in expected.items():
        assert metrics[name].dim() == 0, name
        assert not metrics[name].requires_grad, f"metric {name} must be detached"
        assert metrics[name].item() == approx(value), name


# -- DPO family ------------------------------------------------------------------------------------


def _ipo(chosen, rejected, chosen_tokens, rejected_tokens, beta, eps):
    # IPO (Azar et al. 2023, Eq. 17) on per-token log-ratios, as TRL: (h/|y_w| - h/|y_l| - 1/(2 tau))^2
    return (chosen / chosen_tokens - rejected / rejected_tokens - 1 / (2 * beta)) ** 2


def _robust(chosen, rejected, chosen_tokens, rejected_tokens, beta, eps):
    # Robust DPO (Chowdhury et al. 2024, Eq. 8): ((1-e) l(z) - e l(-z)) / (1-2e), l = -log sigmoid
    z = beta * (chosen - rejected)
    return ((1 - eps) * -logsigmoid(z) - eps * -logsigmoid(-z)) / (1 - 2 * eps)


def _nca_pair(chosen, rejected, chosen_tokens, rejected_tokens, beta, eps):
    # NCA (Chen et al. 2024): -log s(r_w) - 1/2 log s(-r_w) - 1/2 log s(-r_l), r = beta * log-ratio
    return -logsigmoid(beta * chosen) - 0.5 * logsigmoid(-beta * chosen) - 0.5 * logsigmoid(-beta * rejected)


def _exo_pair(chosen, rejected, chosen_tokens, rejected_tokens, beta, eps):
    # EXO (Ji et al. 2024, Eq. 16): KL of (s(z), s(-z)) from (1 - eps, eps), z = beta * margin
    z = beta * (chosen - rejected)
    return sigmoid(z) * (logsigmoid(z) - math.log(1 - eps)) + sigmoid(-z) * (logsigmoid(-z) - math.log(eps))


def _discopop(chosen, rejected, chosen_tokens, rejected_tokens, beta, eps, tau=0.05):
    # DiscoPOP (Lu et al. 2024, Eq. 5): (1 - s(z/tau)) * -log s(z) + s(z/tau) * exp(-z)
    z = beta * (chosen - rejected)
    mix = sigmoid(z / tau)
    return (1 - mix) * -logsigmoid(z) + mix * math.exp(-z)


EXPECTED_PER_PAIR = {
    "exo_pair": _exo_pair,
    "discopop": _discopop,
    # length-normalised DPO: -log s(beta * (h_w/|y_w| - h_l/|y_l|))
    "sigmoid_norm": lambda c, r, ct, rt, beta, eps: -logsigmoid(beta * (c / ct - r / rt)),
    # DPO (Rafailov et al. 2023, Eq. 7): -log sigmoid(beta * (h_w - h_l))
    "sigmoid": lambda c, r, ct, rt, beta, eps: -logsigmoid(beta * (c - r)),
    # SLiC-HF hinge (Zhao et al. 2023, Eq. 3, delta = 1/beta): max(0, 1 - beta * (h_w - h_l))
    "hinge": lambda c, r, ct, rt, beta, eps: max(0.0, 1 - beta * (c - r)),
    "ipo": _ipo,
    "robust": _robust,
    # BCO paired (Jung et al. 2024): -log sigmoid(beta h_w) - log sigmoid(-beta h_l)
    "bco_pair": lambda c, r, ct, rt, beta, eps: -logsigmoid(beta * c) - logsigmoid(-beta * r),
    # SPPO hard (Wu et al. 2024, Eq. 4.7 with P = 1 / 0): (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2
    "sppo_hard": lambda c, r, ct, rt, beta, eps: (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2,
    "nca_pair": _nca_pair,
    # APO-zero (D'Oosterlinck et al. 2024, Eq. 7): (1 - sigmoid(beta h_w)) + sigmoid(beta h_l)
    "apo_zero": lambda c, r, ct, rt, beta, eps: (1 - sigmoid(beta * c)) + sigmoid(beta * r),
    # APO-down (same paper, Eq. 8): sigmoid(beta h_w) + (1 - sigmoid(beta (h_w - h_l)))
    "apo_down": lambda c, r, ct, rt, beta, eps: sigmoid(beta * c) + (1 - sigmoid(beta * (c - r))),
}


def reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, float]:
    # TRL's metric names; accuracy = mean(r_w > r_l), strict
    pairs = list(zip(chosen_rewards, rejected_rewards, strict=True))
    return {
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/accuracies": mean(1.0 if c > r else 0.0 for c, r in pairs),
        "rewards/margins": mean(c - r for c, r in pairs),
        "logps/chosen": mean(chosen_logps),
        "logps/rejected": mean(rejected_logps),
    }


def expected_dpo_metrics(beta: float = BETA) -> dict[str, float]:
    # TRL: rewards = beta * (policy - reference) summed log-probs
    return reward_metrics([beta * c for c in CHOSEN_LOGRATIOS], [beta * r for r in REJECTED_LOGRATIOS],
                          POLICY["chosen"], POLICY["rejected"])


def test_dpo_losses_registry_matches_config_choices():
    from smolalign.config.choices import DPO_LOSS_TYPES

    batch_level = {"aot", "aot_unpaired", "sft"}  # checked below: not a function of one pair
    assert set(DPO_LOSSES) == set(EXPECTED_PER_PAIR) | batch_level == set(DPO_LOSS_TYPES)


@pytest.mark.parametrize("loss_type", sorted(EXPECTED_PER_PAIR))
def test_dpo_loss_types_match_hand_computation(loss_type):
    label_smoothing = {"robust": 0.1, "exo_pair": 0.01}.get(loss_type, 0.0)
    settings = LossSettings(beta=BETA, loss_type=loss_type, label_smoothing=label_smoothing)
    out = OBJECTIVES["dpo"].compute(pair_logps(POLICY), pair_logps(REFERENCE), settings)

    per_pair = [
        EXPECTED_PER_PAIR[loss_type](c, r, ct, rt, BETA, label_smoothing)
        for c, r, ct, rt in zip(
            CHOSEN_LOGRATIOS, REJECTED_LOGRATIOS, POLICY["chosen_tokens"], POLICY["rejected_tokens"], strict=True
        )
    ]
    assert out.loss.dim() == 0
    assert out.loss.item() == approx(mean(per_pair))
    assert_metrics(out.metrics, expected_dpo_metrics())
    assert out.metrics["rewards/accuracies"].item() == approx(2 / 3)
    assert "nll_loss" not in out.metrics  # only with rpo_alpha


def test_aot_matches_its_rank_matched_hand_computation():
    # AOT (Melnyk et al. 2024): sort the batch's policy margins and reference margins (paired), or its chosen and
    # rejected log-ratios (unpaired), and apply the smoothed logistic loss rank by rank.
    eps = 0.1

    def smoothed(x):
        return -(1 - eps) * logsigmoid(BETA * x) - eps * logsigmoid(-BETA * x)

    policy_margins = sorted(c - r for c, r in zip(POLICY["chosen"], POLICY["rejected"], strict=True))
    reference_margins = sorted(c - r for c, r in zip(REFERENCE["chosen"], REFERENCE["rejected"], strict=True))
    paired = mean(smoothed(a - b) for a, b in zip(policy_margins, reference_margins, strict=True))
    unpaired = mean(smoothed(c - r) for c, r in zip(sorted(CHOSEN_LOGRATIOS), sorted(REJECTED_LOGRATIOS), strict=True))
    for loss_type, expected in (("aot", paired), ("aot_unpaired", unpaired)):
        settings = LossSettings(beta=BETA, loss_type=loss_type, label_smoothing=eps)
        out = OBJECTIVES["dpo"].compute(pair_logps(POLICY), pair_logps(REFERENCE), settings)
        assert out.loss.item() == approx(expected), loss_type


def test_several_loss_types_sum_their_weighted_means_and_log_each():
    # MPO (Wang et al. 2024): 0.8 sigmoid + 0.2 bco_pair + 1.0 sft, each a batch mean
    settings = LossSettings(beta=BETA, loss_type=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0))
    out = OBJECTIVES["dpo"].compute(pair_logps(POLICY), pair_logps(REFERENCE), settings)
    ratios = list(zip(CHOSEN_LOGRATIOS, REJECTED_LOGRATIOS, strict=True))
    sigmoid_term = mean(-logsigmoid(BETA * (c - r)) for c, r in ratios)
    bco_term = mean(-logsigmoid(BETA * c) - logsigmoid(-BETA * r) for c, r in ratios)
    sft_term = -sum(POLICY["chosen"]) / sum(POLICY["chosen_tokens"])  # token mean over the batch
    assert out.loss.item() == approx(0.8 * sigmoid_term + 0.2 * bco_term + sft_term)
    assert_metrics(out.metrics, {"loss/sigmoid": sigmoid_term, "loss/bco_pair": bco_term, "loss/sft": sft_term})


@pytest.mark.parametrize(("kind", "score"), [
    ("forward_kl", lambda u: 1 - math.exp(-u)),
    ("js_divergence", lambda u: math.log(2) + logsigmoid(u)),
    ("alpha_divergence", lambda u: (math.exp(-0.7 * u) - 1) / -0.7),  # alpha 0.3
])
def test_f_divergences_reshape_the_log_ratios(kind, score):
    # Wang et al. 2023, Table 1: f'(pi/pi_ref) in place of the log-ratio; the rewards stay beta * log-ratio
    settings = LossSettings(beta=BETA, f_divergence_type=kind, f_alpha_divergence_coef=0.3)
    out = OBJECTIVES["dpo"].compute(pair_logps(POLICY), pair_logps(REFERENCE), settings)
    expected = mean(-logsigmoid(BETA * (score(c) - score(r)))
                    for c, r in zip(CHOSEN_LOGRATIOS, REJECTED_LOGRATIOS, strict=True))
    assert out.loss.item() == approx(expected)
    assert_metrics(out.metrics, expected_dpo_metrics())


def test_ld_dpo_weights_the_tokens_beyond_the_shared_length():
    # LD-DPO (Liu et al. 2024, Eq. 9): shared part + alpha * the rest, for policy and reference
    alpha = 0.25
    shared = {"chosen_shared": [-8.0, -20.0, -7.5], "rejected_shared": [-10.0, -14.0, -10.0]}
    reference_shared = {"chosen_shared": [-9.0, -21.0, -8.0], "rejected_shared": [-8.0, -15.0, -9.0]}
    policy, reference = pair_logps({**POLICY, **shared}), pair_logps({**REFERENCE, **reference_shared})

    def weighted(values, shared_values, part):
        return [s + alpha * (v - s) for v, s in zip(values[part], shared_values[f"{part}_shared"], strict=True)]

    chosen = [p - r for p, r in zip(weighted(POLICY, shared, "chosen"), weighted(REFERENCE, reference_shared, "chosen"),
                                    strict=True)]
    rejected = [p - r for p, r in zip(weighted(POLICY, shared, "rejected"),
                                      weighted(REFERENCE, reference_shared, "rejected"), strict=True)]
    out = OBJECTIVES["dpo"].compute(policy, reference, LossSettings(beta=BETA, ld_alpha=alpha))
    assert out.loss.item() == approx(mean(-logsigmoid(BETA * (c - r)) for c, r in zip(chosen, rejected, strict=True)))
    assert out.metrics["logps/chosen"].item() == approx(mean(weighted(POLICY, shared, "chosen")))


def test_wpo_weights_each_pair_by_its_answers_normalised_probability():
    # WPO (Zhou et al. 2024, Eq. 2): w(y) = exp(mean over tokens of log p - log sum p^2); pair weight w(y_w) w(y_l)
    wpo = {"chosen_wpo": [-2.0, -5.0, -1.5], "rejected_wpo": [-6.0, -3.5, -2.5]}
    policy = pair_logps({**POLICY, **wpo})
    out = OBJECTIVES["dpo"].compute(policy, pair_logps(REFERENCE), LossSettings(beta=BETA, use_weighting=True))
    weights = [math.exp(c / ct) * math.exp(r / rt) for c, r, ct, rt in zip(
        wpo["chosen_wpo"], wpo["rejected_wpo"], POLICY["chosen_tokens"], POLICY["rejected_tokens"], strict=True)]
    expected = mean(w * -logsigmoid(BETA * (c - r))
                    for w, c, r in zip(weights, CHOSEN_LOGRATIOS, REJECTED_LOGRATIOS, strict=True))
    assert out.loss.item() == approx(expected)


def test_hinge_is_zero_for_a_well_separated_pair():
    # margin 12 * beta 0.1 = 1.2 > 1: SLiC's hinge has no loss left on the first pair
    only_first = {name: values[:1] for name, values in POLICY.items()}
    reference = {name: values[:1] for name, values in REFERENCE.items()}
    out = OBJECTIVES["dpo"].compute(pair_logps(only_first), pair_logps(reference), LossSettings(loss_type="hinge"))
    assert out.loss.item() == 0.0


def test_robust_with_no_label_noise_is_sigmoid():
    settings = {"beta": BETA, "label_smoothing": 0.0}
    robust = OBJECTIVES["dpo"].compute(
        pair_logps(POLICY), pair_logps(REFERENCE), LossSettings(loss_type="robust", **settings)
    )
    sigmoid_ = OBJECTIVES["dpo"].compute(
        pair_logps(POLICY), pair_logps(REFERENCE), LossSettings(loss_type="sigmoid", **settings)
    )
    assert robust.loss.item() == approx(sigmoid_.loss.item())


def test_dpo_policy_equal_to_reference_gives_log_two_and_zero_rewards():
    out = OBJECTIVES["dpo"].compute(pair_logps(POLICY), pair_logps(POLICY), LossSettings(beta=0.5))
    assert out.loss.item() == approx(math.log(2))
    assert out.metrics["rewards/chosen"].item() == 0.0
    assert out.metrics["rewards/margins"].item() == 0.0


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_rewards_scale_with_beta(beta):
    out = OBJECTIVES["dpo"].compute(pair_logps(POLICY), pair_logps(REFERENCE), LossSettings(beta=beta))
    assert_metrics(out.metrics, expected_dpo_metrics(beta))


def test_accuracy_is_strict_on_a_tie():
    # pair 0: equal log-ratios (tie, NOT accurate); pair 1: chosen ahead (accurate) -> 0.5, as TRL's `>`
    policy = dict(POLICY, chosen=[-10.0, -5.0], rejected=[-12.0, -9.0], prompt=[-1.0, -1.0],
                  chosen_tokens=[2.0, 2.0], rejected_tokens=[2.0, 2.0], prompt_tokens=[1.0, 1.0])
    reference = dict(policy, chosen=[-11.0, -6.0], rejected=[-13.0, -9.0])
    out = OBJECTIVES["dpo"].compute(pair_logps(policy), pair_logps(reference), LossSettings())
    assert out.metrics["rewards/accuracies"].item() == 0.5

    # reference-free objectives compare mean log-probs: -4/2 vs -6/3 is a tie
    tie = dict(chosen=[-4.0], rejected=[-6.0], prompt=[-1.0], chosen_tokens=[2.0], rejected_tokens=[3.0],
               prompt_tokens=[1.0])
    for name in ("orpo", "simpo"):
        out = OBJECTIVES[name].compute(pair_logps(tie), None, LossSettings())
        assert out.metrics["rewards/accuracies"].item() == 0.0, name
        assert out.metrics["rewards/margins"].item() == 0.0, name


def test_dpo_with_rpo_alpha_adds_token_averaged_chosen_nll():
    # RPO (Pang et al. 2024, Eq. 2): L_DPO + alpha * NLL(y_w), the NLL averaged over all chosen answer
    # tokens of the batch (TRL's "sft" loss term), prompt tokens not included.
    alpha = 0.7
    policy = dict(POLICY, chosen_tokens=[2.0, 10.0, 5.0])
    settings = LossSettings(beta=BETA, rpo_alpha=alpha)
    out = OBJECTIVES["dpo"].compute(pair_logps(policy), pair_logps(REFERENCE), settings)
    dpo_loss = mean(-logsigmoid(BETA * (c - r)) for c, r in zip(CHOSEN_LOGRATIOS, REJECTED_LOGRATIOS, strict=True))
    nll = -sum(policy["chosen"]) / sum(policy["chosen_tokens"])  # 42.5 / 17 = 2.5
    per_pair_mean = mean(-c / t for c, t in zip(policy["chosen"], policy["chosen_tokens"], strict=True))  # 3.0
    assert nll != approx(per_pair_mean)
    assert out.loss.item() == approx(dpo_loss + alpha * nll)
    assert_metrics(out.metrics, {**expected_dpo_metrics(), "nll_loss": nll})


def test_rpo_alpha_zero_keeps_the_dpo_loss():
    plain = OBJECTIVES["dpo"].compute(pair_logps(POLICY), pair_logps(REFERENCE), LossSettings())
    zero = OBJECTIVES["dpo"].compute(pair_logps(POLICY), pair_logps(REFERENCE), LossSettings(rpo_alpha=0.0))
    assert zero.loss.item() == approx(plain.loss.item())


# -- ORPO -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("x", [-1e-6, -1e-3, -0.5, -0.69, -0.7, -1.0, -5.0, -50.0])
def test_log1mexp_matches_math_on_both_sides_of_minus_log_two(x):
    expected = math.log(1 - math.exp(x))
    # the same value without cancellation: 1 - e^x = -expm1(x) near 0, log1p(-e^x) far from 0
    exact = math.log(-math.expm1(x)) if x > -1 else math.log1p(-math.exp(x))
    got64 = log1mexp(torch.tensor([x], dtype=torch.float64)).item()
    assert got64 == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert got64 == pytest.approx(exact, rel=1e-12, abs=1e-300)
    # in float32, the naive formula loses everything near 0 (1 - exp(-1e-6) cancels); the stable one does not
    got32 = log1mexp(torch.tensor([x], dtype=torch.float32)).item()
    assert got32 == pytest.approx(exact, rel=1e-5, abs=1e-30)


def test_log1mexp_is_finite_with_finite_gradient():
    x = torch.tensor([-1e-6, -0.5, -0.7, -5.0, -50.0], dtype=torch.float32, requires_grad=True)
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    # d/dx log(1 - e^x) = -e^x / (1 - e^x) = -1 / expm1(-x)
    for value, grad in zip(x.tolist(), x.grad.tolist(), strict=True):
        assert grad == pytest.approx(-1 / math.expm1(-value), rel=1e-4)


def mean_logp_reward_metrics(chosen_mean: list[float], rejected_mean: list[float], beta: float) -> dict[str, float]:
    # ORPO and SimPO (TRL's ORPO/CPO trainers): rewards = beta * mean answer log-prob
    return reward_metrics([beta * c for c in chosen_mean], [beta * r for r in rejected_mean], chosen_mean, rejected_mean)


def expected_orpo(values: dict[str, list[float]], beta: float) -> tuple[float, dict[str, float]]:
    # ORPO (Hong et al. 2024, Eqs. 4, 6-7): odds(y) = P / (1 - P) with log P the mean token log-prob;
    # L = NLL(y_w | x) - lambda * mean(log sigmoid(log odds(y_w) - log odds(y_l))), lambda = beta.
    chosen_mean = [c / t for c, t in zip(values["chosen"], values["chosen_tokens"], strict=True)]
    rejected_mean = [r / t for r, t in zip(values["rejected"], values["rejected_tokens"], strict=True)]
    log_odds = [
        (c - math.log(1 - math.exp(c))) - (r - math.log(1 - math.exp(r)))
        for c, r in zip(chosen_mean, rejected_mean, strict=True)
    ]
    ratio = [logsigmoid(v) for v in log_odds]
    # TRL: the NLL is cross-entropy over prompt + chosen tokens, averaged over the batch's tokens
    nll = -(sum(values["prompt"]) + sum(values["chosen"])) / (
        sum(values["prompt_tokens"]) + sum(values["chosen_tokens"])
    )
    metrics = {
        **mean_logp_reward_metrics(chosen_mean, rejected_mean, beta),
        "nll_loss": nll,
        "log_odds_ratio": mean(ratio),
        "log_odds_chosen": mean(log_odds),
    }
    return nll - beta * mean(ratio), metrics


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_hand_computation(beta):
    out = OBJECTIVES["orpo"].compute(pair_logps(POLICY), None, LossSettings(beta=beta))
    loss, metrics = expected_orpo(POLICY, beta)
    assert out.loss.item() == approx(loss)
    assert_metrics(out.metrics, metrics)
    # mean log-probs [-2.5, -2.5, -2.5] vs [-2.5, -2, -2.4]: a tie, then behind twice -> accuracy 0
    assert out.metrics["rewards/accuracies"].item() == 0.0


def test_orpo_mean_logps_on_both_sides_of_minus_log_two():
    # chosen mean log-probs -0.125 (P = 0.88: the expm1 branch) and -3 (the log1p branch)
    values = dict(chosen=[-0.25, -9.0], rejected=[-1.5, -0.5], prompt=[-2.0, -4.0],
                  chosen_tokens=[2.0, 3.0], rejected_tokens=[1.0, 5.0], prompt_tokens=[2.0, 4.0])
    out = OBJECTIVES["orpo"].compute(pair_logps(values), None, LossSettings(beta=0.25))
    loss, metrics = expected_orpo(values, 0.25)
    assert out.loss.item() == approx(loss)
    assert_metrics(out.metrics, metrics)
    assert out.metrics["rewards/accuracies"].item() == 0.5


def test_orpo_nll_covers_prompt_tokens_over_the_whole_batch():
    # pair 0: prompt + chosen = (-2 - 2) over (1 + 1) tokens; pair 1: (-30 - 30) over (10 + 10) tokens.
    # Batch-level token average: 64 / 22. Not per pair (mean(2, 3) = 2.5) and not without the prompt.
    values = dict(chosen=[-2.0, -30.0], rejected=[-3.0, -40.0], prompt=[-2.0, -30.0],
                  chosen_tokens=[1.0, 10.0], rejected_tokens=[1.0, 10.0], prompt_tokens=[1.0, 10.0])
    out = OBJECTIVES["orpo"].compute(pair_logps(values), None, LossSettings())
    assert out.metrics["nll_loss"].item() == approx(64 / 22)
    assert out.metrics["nll_loss"].item() != approx(2.5)

    no_prompt = dict(values, prompt=[0.0, 0.0], prompt_tokens=[0.0, 0.0])
    without = OBJECTIVES["orpo"].compute(pair_logps(no_prompt), None, LossSettings())
    assert without.metrics["nll_loss"].item() == approx(32 / 11)


# -- SimPO ----------------------------------------------------------------------------------------


def expected_simpo(values, *, beta, gamma, label_smoothing, cpo_alpha):
    # SimPO (Meng et al. 2024, Eq. 6): -log sigmoid(beta * (mean_w - mean_l) - gamma), with conservative
    # label smoothing e: -(1-e) log s(z) - e log s(-z); CPO (Xu et al. 2024) adds alpha * NLL(y_w).
    chosen_mean = [c / t for c, t in zip(values["chosen"], values["chosen_tokens"], strict=True)]
    rejected_mean = [r / t for r, t in zip(values["rejected"], values["rejected_tokens"], strict=True)]
    per_pair = []
    for c, r in zip(chosen_mean, rejected_mean, strict=True):
        z = beta * (c - r) - gamma
        per_pair.append(-(1 - label_smoothing) * logsigmoid(z) - label_smoothing * logsigmoid(-z))
    nll = -sum(values["chosen"]) / sum(values["chosen_tokens"]) if cpo_alpha else 0.0  # answer tokens only
    metrics = {
        **mean_logp_reward_metrics(chosen_mean, rejected_mean, beta),
        "nll_loss": nll,
    }
    return mean(per_pair) + cpo_alpha * nll, metrics


SIMPO_VALUES = dict(chosen=[-4.0, -9.0, -1.5], rejected=[-12.0, -4.0, -6.0], prompt=[-3.0, -3.0, -3.0],
                    chosen_tokens=[4.0, 6.0, 3.0], rejected_tokens=[6.0, 8.0, 4.0], prompt_tokens=[2.0, 2.0, 2.0])


@pytest.mark.parametrize(
    ("beta", "gamma", "label_smoothing", "cpo_alpha"),
    [(2.0, 0.5, 0.0, 0.0), (2.5, 1.0, 0.2, 0.0), (2.0, 0.5, 0.0, 1.0), (2.0, 0.25, 0.1, 0.5)],
)
def test_simpo_matches_hand_computation(beta, gamma, label_smoothing, cpo_alpha):
    settings = LossSettings(beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha)
    out = OBJECTIVES["simpo"].compute(pair_logps(SIMPO_VALUES), None, settings)
    loss, metrics = expected_simpo(
        SIMPO_VALUES, beta=beta, gamma=gamma, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha
    )
    assert out.loss.item() == approx(loss)
    assert_metrics(out.metrics, metrics)
    # mean log-probs: -1 > -2 yes, -1.5 > -0.5 no, -0.5 > -1.5 yes
    assert out.metrics["rewards/accuracies"].item() == approx(2 / 3)


def test_simpo_ignores_the_prompt_and_a_reference():
    settings = LossSettings(beta=2.0, cpo_alpha=1.0)
    base = OBJECTIVES["simpo"].compute(pair_logps(SIMPO_VALUES), None, settings)
    other_prompt = dict(SIMPO_VALUES, prompt=[-100.0, 0.0, -7.0], prompt_tokens=[9.0, 9.0, 9.0])
    moved = OBJECTIVES["simpo"].compute(pair_logps(other_prompt), pair_logps(POLICY), settings)
    assert moved.loss.item() == approx(base.loss.item())


# -- SFT ------------------------------------------------------------------------------------------


def test_sft_is_token_averaged_chosen_nll():
    # SFT: -sum log p(y_w tokens) / number of y_w tokens over the batch; rejected and prompt not used
    out = OBJECTIVES["sft"].compute(pair_logps(POLICY), None, LossSettings())
    nll = -sum(POLICY["chosen"]) / sum(POLICY["chosen_tokens"])
    assert out.loss.item() == approx(nll)
    assert_metrics(out.metrics, {"nll_loss": nll, "logps/chosen": mean(POLICY["chosen"])})

    no_rejected = dict(POLICY, rejected=[0.0, 0.0, 0.0], rejected_tokens=[0.0, 0.0, 0.0])
    assert OBJECTIVES["sft"].compute(pair_logps(no_rejected), None, LossSettings()).loss.item() == approx(nll)


# -- gradients and the registry ------------------------------------------------------------------


CASES = [("dpo", LossSettings(loss_type=t, label_smoothing=0.2 if t in ("robust", "exo_pair") else 0.0))
         for t in DPO_LOSSES]
CASES += [
    ("dpo", LossSettings(rpo_alpha=1.0)),
    ("orpo", LossSettings()),
    ("simpo", LossSettings(beta=2.0)),
    ("simpo", LossSettings(beta=2.0, cpo_alpha=1.0, label_smoothing=0.1)),
    ("sft", LossSettings()),
]


CASE_IDS = [f"dpo-{t}" for t in DPO_LOSSES] + ["dpo-rpo", "orpo", "simpo", "simpo-cpo", "sft"]


@pytest.mark.parametrize(("name", "settings"), CASES, ids=CASE_IDS)
def test_objectives_are_differentiable(name, settings):
    policy = pair_logps(POLICY, requires_grad=True)
    reference = pair_logps(REFERENCE)
    out = OBJECTIVES[name].compute(policy, reference, settings)
    assert out.loss.requires_grad
    out.loss.backward()
    grads = [policy.chosen.grad] + ([] if name == "sft" or settings.loss_type == "sft" else [policy.rejected.grad])
    for grad in grads:
        assert grad is not None and torch.isfinite(grad).all()
    assert policy.chosen.grad.abs().sum() > 0
    for metric in out.metrics.values():
        assert torch.isfinite(metric) and not metric.requires_grad


def test_orpo_gradient_reaches_the_prompt_logps():
    policy = pair_logps(POLICY, requires_grad=True)
    OBJECTIVES["orpo"].compute(policy, None, LossSettings()).loss.backward()
    # d NLL / d prompt_i = -1 / total prompt + chosen tokens
    expected = -1 / (sum(POLICY["prompt_tokens"]) + sum(POLICY["chosen_tokens"]))
    assert policy.prompt.grad.tolist() == [approx(expected)] * 3


def test_objectives_registry_declares_what_each_needs():
    from smolalign.config.choices import ALGORITHMS

    assert set(OBJECTIVES) == set(ALGORITHMS)
    rows = {"sft": "answers", "kto": "labelled"}
    for name, objective in OBJECTIVES.items():
        assert objective.name == name
        assert objective.needs_reference == (name in ("dpo", "kto")), name
        assert objective.needs_prompt_logps == (name == "orpo"), name
        assert objective.rows == rows.get(name, "pairs"), name
        assert objective.reward_model == (name == "reward"), name
        assert (objective.reference_point is not None) == (name == "kto"), name
    assert OBJECTIVES["dpo"].couples_pairs(LossSettings(loss_type=("sigmoid", "aot")))
    assert not OBJECTIVES["dpo"].couples_pairs(LossSettings(loss_type="sigmoid"))
    assert OBJECTIVES["kto"].couples_pairs(LossSettings(loss_type="kto"))
    assert not OBJECTIVES["kto"].couples_pairs(LossSettings(loss_type="apo_zero_unpaired"))


# -- KTO --------------------------------------------------------------------------------------------

# Four unpaired rows: answer log-probs under policy and reference, the KL rows' (another row's answer), labels.
KTO_POLICY = {"chosen": [-10.0, -12.0, -8.0, -20.0], "rejected": [-15.0, -14.0, -9.0, -30.0],
              "prompt": [0.0] * 4, "chosen_tokens": [4.0, 5.0, 3.0, 8.0], "rejected_tokens": [6.0, 5.0, 3.0, 9.0],
              "prompt_tokens": [0.0] * 4}
KTO_REFERENCE = dict(KTO_POLICY, chosen=[-11.0, -11.0, -8.5, -19.0], rejected=[-16.0, -13.5, -9.5, -30.5])
LABELS = [True, False, True, False]


def kto_logps(values: dict) -> PairLogps:
    logps = pair_logps(values)
    logps.labels = torch.tensor(LABELS)
    return logps


@pytest.mark.parametrize(("weights", "loss_type"), [((1.0, 1.0), "kto"), ((1.3, 0.7), "kto"),
                                                    ((1.0, 1.0), "apo_zero_unpaired")])
def test_kto_matches_hand_computation(weights, loss_type):
    # KTO (Ethayarajh et al. 2024, Eq. 7): z = max(0, mean KL-row log-ratio); desirable 1 - s(beta (r - z)),
    # undesirable 1 - s(beta (z - r)); weighted, then averaged over rows. APO-zero unpaired: no z.
    beta = 0.4
    ratios = [p - r for p, r in zip(KTO_POLICY["chosen"], KTO_REFERENCE["chosen"], strict=True)]
    z = max(0.0, mean(p - r for p, r in zip(KTO_POLICY["rejected"], KTO_REFERENCE["rejected"], strict=True)))
    if loss_type == "kto":
        losses = [1 - sigmoid(beta * (u - z)) if good else 1 - sigmoid(beta * (z - u)) for u, good in zip(ratios, LABELS,
                                                                                                          strict=True)]
    else:
        losses = [1 - sigmoid(beta * u) if good else sigmoid(beta * u) for u, good in zip(ratios, LABELS, strict=True)]
    weighted = [(weights[0] if good else weights[1]) * loss for loss, good in zip(losses, LABELS, strict=True)]
    settings = LossSettings(beta=beta, loss_type=loss_type, desirable_weight=weights[0], undesirable_weight=weights[1])
    policy, reference = kto_logps(KTO_POLICY), kto_logps(KTO_REFERENCE)
    estimate = OBJECTIVES["kto"].reference_point(policy, reference, settings)
    totals = BatchTotals(4, 20.0, 0.0, kl=None if estimate is None else estimate.clamp(min=0))
    out = OBJECTIVES["kto"].compute(policy, reference, settings, totals)
    assert out.loss.item() == approx(mean(weighted))
    assert_metrics(out.metrics, {
        "kl": z if loss_type == "kto" else 0.0,
        "rewards/chosen": mean(beta * u for u, good in zip(ratios, LABELS, strict=True) if good),
        "rewards/rejected": mean(beta * u for u, good in zip(ratios, LABELS, strict=True) if not good),
        "logps/chosen": mean(p for p, good in zip(KTO_POLICY["chosen"], LABELS, strict=True) if good),
        "rewards/accuracies": mean(1.0 if (u > 0 if good else u < 0) else 0.0
                                   for u, good in zip(ratios, LABELS, strict=True)),
    })


def test_kto_logs_a_group_only_where_the_batch_has_it():
    policy, reference = kto_logps(KTO_POLICY), kto_logps(KTO_REFERENCE)
    policy.labels = torch.tensor([True] * 4)
    out = OBJECTIVES["kto"].compute(policy, reference, LossSettings(loss_type="kto"),
                                    BatchTotals(4, 20.0, 0.0, kl=torch.tensor(0.0)))
    assert "rewards/chosen" in out.metrics and "rewards/rejected" not in out.metrics
    assert "rewards/margins" not in out.metrics


@pytest.mark.parametrize("algorithm", ["dpo", "orpo", "simpo", "sft"])
def test_logps_metrics_scale_is_the_one_config_choices_names(algorithm):
    """The report reads MEAN_LOGPS_ALGORITHMS to keep summed and averaged log-probs off one axis: it must say
    what each objective logs."""
    from smolalign.config.choices import MEAN_LOGPS_ALGORITHMS

    policy = pair_logps(POLICY)
    out = OBJECTIVES[algorithm].compute(policy, pair_logps(REFERENCE), LossSettings(beta=BETA))
    means = algorithm in MEAN_LOGPS_ALGORITHMS
    assert out.metrics["logps/chosen"].item() == pytest.approx(
        (policy.chosen_mean if means else policy.chosen).mean().item(), rel=1e-6)


def test_bradley_terry_reward_loss_by_hand():
    # Ouyang et al. 2022, Eq. 1: -log sigmoid(r_w - r_l); centring adds c * mean((r_w + r_l)^2)
    chosen, rejected = [1.5, -0.2, 0.3], [0.5, 0.1, 0.3]
    policy = PairLogps(torch.tensor(chosen), torch.tensor(rejected), *(torch.zeros(3) for _ in range(4)))
    out = OBJECTIVES["reward"].compute(policy, None, LossSettings(center_rewards_coefficient=0.1))
    bt = sum(math.log1p(math.exp(-(c - r))) for c, r in zip(chosen, rejected, strict=True)) / 3
    centring = 0.1 * sum((c + r) ** 2 for c, r in zip(chosen, rejected, strict=True)) / 3
    assert out.loss.item() == pytest.approx(bt + centring, rel=1e-6)
    assert out.metrics["accuracy"].item() == pytest.approx(1 / 3)  # the tie (0.3, 0.3) is not accurate
    assert out.metrics["margin"].item() == pytest.approx((1.0 - 0.3 + 0.0) / 3)
    assert out.metrics["min_reward"].item() == pytest.approx(-0.2)
    assert out.metrics["max_reward"].item() == pytest.approx(1.5)
    assert out.metrics["mean_reward"].item() == pytest.approx(sum(chosen + rejected) / 6)


def test_loss_settings_from_config_reads_trl_names():
    config = load_config(None, {"algorithm": "simpo", "beta": 2.5, "simpo_gamma": 0.3, "cpo_alpha": 1.0,
                                "label_smoothing": 0.1})
    assert LossSettings.from_config(config) == LossSettings(
        beta=2.5, loss_type=None, label_smoothing=0.1, rpo_alpha=None, simpo_gamma=0.3, cpo_alpha=1.0
    )
    mpo = load_config(None, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]})
    assert LossSettings.from_config(mpo).loss_types == ("sigmoid", "sft")
