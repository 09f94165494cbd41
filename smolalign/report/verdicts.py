"""What the runs achieved: the numbers that say whether alignment worked, and in words whether each effect
is measurable (larger than its 95% interval says chance or noise could make it)."""

from __future__ import annotations

from smolalign.metrics import last_values
from smolalign.report.runs import Run
from smolalign.stats import CHANCE, Proportion


def held_out_key(runs: list[Run]) -> str:
    """The held-out accuracy the headline compares: the mean log-prob one when logged, because it means
    something at step 0 and for every algorithm (DPO's reward accuracy is 0 while policy = reference);
    else the reward accuracy (a reward model's is `eval_accuracy`)."""
    logged = {key for run in runs for record in run.eval_records for key in record}
    candidates = [f"eval_{name}" for name in ("logps/mean_accuracy", "rewards/accuracies", "accuracy")]
    return next((key for key in candidates if key in logged), candidates[0])


def held_out_before_after(run: Run, key: str) -> tuple[Proportion | None, Proportion | None]:
    """`key` with its interval at the step-0 evaluation (before training) and at the last later one."""
    records = [record for record in run.eval_records if key in record]
    before = next((record for record in records if record.get("step") == 0), None)
    after = next((record for record in reversed(records) if record.get("step") != 0), None)
    return tuple(None if record is None else Proportion.read(record, key, n_key="eval_pairs")
                 for record in (before, after))


def outcomes(run: Run, held_out_key: str) -> dict[str, float | Proportion]:
    """The numbers that say whether a run worked, by name, accuracies and the win rate with their
    intervals; those the run cannot tell are left out."""
    train = last_values(run.train_records)
    before, after = held_out_before_after(run, held_out_key)
    values = {
        "final train loss": train.get("loss"),
        "train reward accuracy": train.get("rewards/accuracies"),
        "train reward margin": train.get("rewards/margins"),
        "held-out accuracy before": before,
        "held-out accuracy": after,
        "eval.json reward accuracy": Proportion.read(run.evaluation, "rewards/accuracies", n_key="pairs"),
        "judge win rate": win_rate(run.evaluation),
    }
    return {name: value for name, value in values.items() if value is not None}


def effect_verdict(run: Run, held_out_key: str) -> str:
    """In words, whether the run's effect on held-out accuracy is larger than its uncertainty.

    Held out during training, the effect is the change from step 0 to the last evaluation: measurable
    when the two 95% intervals do not overlap (a conservative test: they rest on the same pairs). The
    held-out reward accuracy at the last evaluation (DPO's implicit reward against the reference, which
    is 0 at step 0 and so has no "before"), and `smolalign eval`'s, are measured against chance:
    measurable when the interval excludes 0.5. The run's effect is measurable when any of these is.
    """
    done = outcomes(run, held_out_key)
    before, after = done.get("held-out accuracy before"), done.get("held-out accuracy")
    rewards_key = "eval_rewards/accuracies"
    held_out_rewards = held_out_before_after(run, rewards_key)[1] if held_out_key != rewards_key else None
    evaluation = done.get("eval.json reward accuracy")
    parts = []
    if after is not None:
        parts.append(_change_verdict(held_out_key, before, after))
    if held_out_rewards is not None and held_out_rewards.has_interval:
        parts.append(_chance_verdict(f"held-out `{rewards_key}` after training", held_out_rewards))
    if evaluation is not None:
        parts.append(_chance_verdict("`smolalign eval`'s `rewards/accuracies`", evaluation))
    if not parts:
        return (f"{run.name}: not measured: no held-out accuracy (give the run an eval_dataset or a "
                "test_split_size, or run `smolalign eval` on its final model).")
    labels = [label for label, _ in parts]
    label = next((wanted for wanted in ("measurable", "measurable, for the worse") if wanted in labels), labels[0])
    deciding = next(part for part in parts if part[0] == label)  # its reason comes first
    reasons = [deciding[1], *(reason for part in parts if part is not deciding for _, reason in [part])]
    return f"{run.name}: {label} — " + " ".join(f"{reason}." for reason in reasons)


def _change_verdict(key: str, before: Proportion | None, after: Proportion) -> tuple[str, str]:
    """(label, reason) for the held-out accuracy before and after training."""
    if not after.has_interval:
        return ("cannot tell whether the effect is measurable",
                f"held-out `{key}` is {after}: metrics.jsonl does not record how many pairs it rests on "
                "(an older smolalign wrote it)")
    if before is None or not before.has_interval:
        return _chance_verdict(f"held-out `{key}` after training", after)
    if after.overlaps(before):
        label, change = "not measurable", f"went from {before} to {after}, but the before/after 95% intervals overlap"
    else:
        label = "measurable" if after.value > before.value else "measurable, for the worse"
        direction = "rose" if after.value > before.value else "fell"
        change = f"{direction} from {before} to {after}, and the before/after 95% intervals do not overlap"
    return label, f"held-out `{key}` {change}; after training its interval {_against_chance(after)}"


def _chance_verdict(what: str, accuracy: Proportion) -> tuple[str, str]:
    """(label, reason) for one accuracy on its own: is it distinguishable from a coin flip?"""
    if not accuracy.has_interval:
        return "cannot tell whether the effect is measurable", f"{what} is {accuracy}"
    return chance_label(accuracy), f"{what} is {accuracy}, whose 95% interval {_against_chance(accuracy)}"


def chance_label(accuracy: Proportion) -> str:
    """Whether an accuracy with its interval beats a coin flip: 'measurable' (interval above chance),
    'measurable, for the worse' (below it) or 'not measurable'."""
    return ("measurable" if accuracy.low > CHANCE else "measurable, for the worse" if accuracy.high < CHANCE
            else "not measurable")


def _against_chance(accuracy: Proportion) -> str:
    if accuracy.low > CHANCE:
        return f"excludes chance ({CHANCE})"
    if accuracy.high < CHANCE:
        return f"lies below chance ({CHANCE})"
    return f"includes chance ({CHANCE})"


def win_rate(evaluation: dict) -> Proportion | None:
    """The judge's win rate with its interval (`judge/ci_low`, `judge/ci_high`) over `judge/n` prompts."""
    rate = evaluation.get("judge/win_rate")
    if rate is None:
        return None
    return Proportion(rate, evaluation.get("judge/ci_low"), evaluation.get("judge/ci_high"), evaluation.get("judge/n"))
