"""95% intervals of accuracies: Wilson's interval against hand-computed values, and every held-out accuracy
written (eval.json, the held-out lines of metrics.jsonl) with its interval and pair count."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tokenize_hh
from transformers import AutoModelForCausalLM

from smolalign.core.heldout import format_summary_table, preference_summary
from smolalign.core.logprobs import PairLogps, SequenceScorer
from smolalign.core.losses import OBJECTIVES, LossSettings
from smolalign.core.reference import model_reference
from smolalign.core.scoring import PairScoring, ScorerView
from smolalign.evaluation.judge import Verdict, win_rate_summary
from smolalign.stats import Z_95, Proportion, wilson_interval
from smolalign.training.bookkeeping import evaluate_objective
from smolalign.training.step import PairRunner


def test_wilson_interval_of_6_out_of_10_by_hand():
    # p = 0.6, z² = 3.8415: centre (0.6 + 0.19207) / 1.38415 = 0.57225,
    # half-width 1.95996 / 1.38415 · sqrt(0.024 + 0.0096036) = 0.25958
    low, high = wilson_interval(6, 10)
    assert low == pytest.approx(0.31267, abs=1e-5) and high == pytest.approx(0.83182, abs=1e-5)


@pytest.mark.parametrize("successes, n", [(0, 10), (10, 10), (1, 3), (52, 100), (268, 400), (7.5, 12)])
def test_wilson_bounds_solve_the_score_equation(successes, n):
    """Wilson's bounds are the proportions p whose score test just accepts p̂: (p̂ − p)² = z² p (1 − p) / n."""
    observed = successes / n
    for bound in wilson_interval(successes, n):
        assert (observed - bound) ** 2 == pytest.approx(Z_95**2 * bound * (1 - bound) / n, abs=1e-12)
    low, high = wilson_interval(successes, n)
    assert 0 <= low <= observed <= high <= 1


def test_wilson_interval_edges():
    assert wilson_interval(0, 10)[1] == pytest.approx(Z_95**2 / (10 + Z_95**2))  # 0.2775: 0/10 is not "never"
    assert wilson_interval(10, 10)[0] == pytest.approx(10 / (10 + Z_95**2))
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no pairs, no knowledge


def test_the_judge_uses_the_same_interval():
    verdicts = [Verdict("policy", 1.0, 0.0)] * 5 + [Verdict("tie", 0.5, 0.5)] * 2 + [Verdict("reference", 0.0, 1.0)] * 3
    summary = win_rate_summary(verdicts, "rm")
    assert summary["judge/win_rate"] == 0.6
    assert (summary["judge/ci_low"], summary["judge/ci_high"]) == pytest.approx((0.31267, 0.83182), abs=1e-5)


def test_a_proportion_reads_its_interval_or_computes_it_from_the_pair_count():
    stored = Proportion.read({"acc": 0.6, "acc_ci_low": 0.3, "acc_ci_high": 0.8, "pairs": 10}, "acc", n_key="pairs")
    assert str(stored) == "0.60 [0.30, 0.80], n=10"
    computed = Proportion.read({"acc": 0.6, "pairs": 10}, "acc", n_key="pairs")  # eval.json of older versions
    assert (computed.low, computed.high) == pytest.approx((0.31267, 0.83182), abs=1e-5)
    unknown = Proportion.read({"acc": 0.6}, "acc", n_key="pairs")  # metrics.jsonl of older versions
    assert not unknown.has_interval and str(unknown) == "0.60 (n not recorded)"
    assert Proportion.read({"pairs": 10}, "acc", n_key="pairs") is None
    assert str(Proportion(0.61, 0.534, 0.681, 1500)) == "0.61 [0.53, 0.68], n=1,500"


def logps(chosen: list[float], rejected: list[float], tokens: int = 4) -> PairLogps:
    count = torch.full((len(chosen),), float(tokens))
    return PairLogps(torch.tensor(chosen), torch.tensor(rejected), torch.zeros(len(chosen)), count, count,
                     torch.zeros(len(chosen)))


def test_eval_summary_gives_each_accuracy_its_interval_and_prints_it_on_one_line():
    policy = logps([-1.0] * 6 + [-3.0] * 4, [-2.0] * 10)  # the chosen answer wins 6 of 10 pairs
    reference = logps([-2.0] * 10, [-2.0] * 10)
    summary = preference_summary(policy, reference, beta=0.1)
    assert summary["pairs"] == 10
    for name in ("rewards/accuracies", "logps/mean_accuracy"):
        assert summary[name] == pytest.approx(0.6)
        assert summary[f"{name}_ci_low"] == pytest.approx(0.31267, abs=1e-5)
        assert summary[f"{name}_ci_high"] == pytest.approx(0.83182, abs=1e-5)
    lines = format_summary_table(summary).splitlines()
    assert "  rewards/accuracies   0.60 [0.31, 0.83], n=10" in lines
    assert "  logps/mean_accuracy  0.60 [0.31, 0.83], n=10" in lines
    assert not any("_ci_" in line for line in lines)


@pytest.mark.parametrize("algorithm", ["dpo", "simpo"])
def test_held_out_lines_carry_intervals_over_all_eval_pairs(tiny_model, tokenizer, hh_rows, algorithm):
    """Five pairs in batches of 2, 2 and 1: the accuracy and its interval count the pairs right over all
    batches (not a mean of batch means, which weighs the last pair as much as two)."""
    pairs = tokenize_hh(hh_rows[500:505], tokenizer)
    policy_model = AutoModelForCausalLM.from_pretrained(tiny_model(0))
    reference_model = AutoModelForCausalLM.from_pretrained(tiny_model(1))
    objective = OBJECTIVES[algorithm]
    reference = model_reference(reference_model, 16) if objective.needs_reference else None
    scoring = PairScoring("padded", tokenizer.pad_token_id, torch.device("cpu"), 10**6)
    runner = PairRunner(SequenceScorer(policy_model, 16), reference, objective, LossSettings(beta=0.3, simpo_gamma=0.0),
                        scoring)
    record = evaluate_objective(runner, pairs, batch_size=2)

    policy = scoring.logps(ScorerView(SequenceScorer(policy_model)), pairs)
    mean_wins = (policy.chosen_mean > policy.rejected_mean).tolist()
    if algorithm == "dpo":
        ref = scoring.logps(ScorerView(SequenceScorer(reference_model)), pairs)
        reward_wins = ((policy.chosen - ref.chosen) > (policy.rejected - ref.rejected)).tolist()
    else:  # SimPO's rewards are beta times the mean token log-probs
        reward_wins = mean_wins
    assert record["eval_pairs"] == 5
    for name, wins in (("rewards/accuracies", reward_wins), ("logps/mean_accuracy", mean_wins)):
        low, high = wilson_interval(sum(wins), 5)
        assert record[f"eval_{name}_ci_low"] == pytest.approx(low)
        assert record[f"eval_{name}_ci_high"] == pytest.approx(high)
        assert record[f"eval_{name}"] == pytest.approx(sum(wins) / 5)
    assert all(isinstance(value, (int, float)) and math.isfinite(value) for value in record.values())


@pytest.mark.parametrize("native_bf16", [False, True], ids=["float32", "cpu-bf16-training"])
def test_training_eval_lines_and_smolalign_eval_agree(tmp_path, tiny_model, hh_rows, native_bf16_cpu, native_bf16):
    """13 held-out pairs in batches of 4: the run's last eval line and `smolalign eval` of its final/ on the same
    pairs give the same accuracy, margin and interval (one evaluator, exact counts), also where the run trains
    under bf16 autocast (CPUs score held-out pairs in float32, in training as in `smolalign eval`)."""
    from conftest import write_jsonl

    from smolalign.api import evaluate, train

    native_bf16_cpu(native_bf16)

    held_out = write_jsonl(tmp_path / "test.jsonl", hh_rows[300:313])
    run = train(model=str(tiny_model(0)), dataset=str(write_jsonl(tmp_path / "train.jsonl", hh_rows[200:208])),
                eval_dataset=str(held_out), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                max_steps=2, learning_rate=5e-3, max_length=512, output_dir=str(tmp_path / "run"))
    line = [record for record in run.metrics if "eval_pairs" in record][-1]
    summary = evaluate(model=str(run.final_model), dataset=str(held_out)).summary
    assert line["eval_pairs"] == summary["pairs"] == 13
    for name in ("rewards/accuracies", "rewards/accuracies_ci_low", "rewards/accuracies_ci_high", "rewards/margins",
                 "logps/mean_accuracy"):
        assert line[f"eval_{name}"] == pytest.approx(summary[name], abs=1e-6), name
    wins = summary["rewards/accuracies"] * 13
    assert wins == pytest.approx(round(wins), abs=1e-5)  # an exact count of the 13 pairs
