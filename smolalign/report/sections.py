"""The report's sections, built from the runs: did it work, settings, sweep, curves, final metrics, held-out
evaluation, judge, answers side by side. Each is a list of blocks (render.py); a run lacking the data gets none."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from smolalign.metrics import last_values
from smolalign.report.plots import CURVES, logps_unit, plot_curves, plot_sweep, plot_win_rates, run_colors
from smolalign.report.render import Answer, Collapsible, Figures, Paragraph, Sample, Section, Table
from smolalign.report.runs import Run
from smolalign.report.verdicts import effect_verdict, held_out_key, outcomes, win_rate
from smolalign.run_folder import RunFolder
from smolalign.stats import ACCURACY_METRICS, Proportion, interval_keys

MAX_SAMPLES = 8  # prompts shown side by side: enough to get a feel for the answers, few enough to read
ABSENT = "–"
_MISSING = object()  # a config key a run does not have, unequal to every value (None included)

# Known metrics come first, in the order a reader asks about them; anything else follows as logged.
TRAIN_ORDER = (
    "step", "epoch", "loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
    "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen", "learning_rate",
    "grad_norm", "tokens_per_second", "num_tokens",
)
EVAL_ORDER = (
    "rewards/accuracies", "logps/mean_accuracy", "rewards/margins", "rewards/chosen", "rewards/rejected",
    "logps/chosen", "logps/rejected", "ref_logps/chosen", "ref_logps/rejected", "perplexity/chosen",
    "ref_perplexity/chosen", "kl/chosen_per_token", "kl/chosen_per_answer", "perplexity/generated",
    "kl/generated_per_token", "kl/generated_per_answer", "generation/policy_mean_tokens",
    "generation/reference_mean_tokens", "pairs", "beta", "reward",
)
HELD_OUT_ORDER = ("step", "epoch", *(f"eval_{name}" for name in ("loss", *EVAL_ORDER, "nll_loss")))
VERDICTS = {"policy": ("judge: policy wins", "win"), "reference": ("judge: reference wins", "loss"),
            "tie": ("judge: tie", "tie")}


def headline_section(runs: list[Run], sweep_keys: list[str]) -> Section:
    key = held_out_key(runs)
    header = ["run", *sweep_keys, "final train loss", "reward accuracy", "reward margin",
              "held-out accuracy before", "held-out accuracy after", "eval.json accuracy", "judge win rate"]
    rows = []
    for run in runs:
        done = outcomes(run, key)
        rows.append([
            run.name,
            *(_setting(run.config.get(k, _MISSING)) for k in sweep_keys),
            *(format_number(done.get(name)) for name in ("final train loss", "train reward accuracy", "train reward margin",
                                                   "held-out accuracy before", "held-out accuracy",
                                                   "eval.json reward accuracy", "judge win rate")),
        ])
    note = (
        "Training values are those of the last logged window. Reward accuracy is the share of pairs whose "
        "chosen answer gets the higher implicit reward (0.5 is chance). Held-out accuracy is "
        f"`{key}` on the evaluation pairs at step 0 and at the last evaluation during training; "
        "eval.json accuracy is `rewards/accuracies` of `smolalign eval`; the judge's win rate is the share "
        "of prompts where it preferred the policy's answer to the reference's (a tie counts half). "
        "Each held-out number is shown with its 95% interval (Wilson's) and the number of pairs or prompts it "
        "rests on: 0.61 [0.53, 0.68], n=150. A dash: not measured."
    )
    verdicts = [Paragraph(effect_verdict(run, key)) for run in runs]
    return Section("Did it work?", [Table(header, rows), *verdicts, Paragraph(note)])


def settings_section(runs: list[Run]) -> Section:
    keys = list(dict.fromkeys(key for run in runs for key in run.config))
    if not keys:
        return Section("Settings", [Paragraph("No run has a config.yaml.")])
    values = {key: [run.config.get(key, _MISSING) for run in runs] for key in keys}
    differing = [key for key in keys if any(v != values[key][0] for v in values[key])]
    same = [[key, _setting(values[key][0])] for key in keys if key not in differing]
    if len(runs) == 1:
        return Section("Settings", [Collapsible(f"All {len(same)} settings", [Table(["setting", "value"], same)],
                                                open=True)])
    blocks: list = [Paragraph(f"{len(differing)} settings differ between the runs (highlighted); "
                              f"{len(same)} are the same in all runs (listed after).")]
    if differing:
        rows = [[key, *(_setting(v) for v in values[key])] for key in differing]
        blocks.append(Table(["setting", *(run.name for run in runs)], rows, highlighted=set(range(len(rows)))))
    if same:
        blocks.append(Collapsible(f"{len(same)} settings identical in all runs", [Table(["setting", "value"], same)]))
    return Section("Settings", blocks)


def sweep_section(runs: list[Run], sweep_keys: list[str], out_dir: Path) -> Section:
    """Final metrics against the first swept key, one line per combination of the others."""
    key = held_out_key(runs)
    points = []
    for run in runs:
        line = ", ".join(f"{k}={_setting(run.config.get(k, _MISSING))}" for k in sweep_keys[1:])
        finals = {name: value for name, value in outcomes(run, key).items() if name != "held-out accuracy before"}
        points.append((run.config.get(sweep_keys[0]), line, finals))
    path = plot_sweep(points, sweep_keys[0], RunFolder(out_dir).plots / "sweep.png")
    if path is None:
        return Section("Sweep", [Paragraph("No run has final metrics to plot against the swept settings.")])
    return Section("Sweep", [Figures([(_relative(path, out_dir), f"final metrics against {sweep_keys[0]}")])])


def curves_section(runs: list[Run], out_dir: Path) -> Section:
    images = plot_curves({run.name: run.records for run in runs}, RunFolder(out_dir).plots,
                         {run.name: run.logps_scale for run in runs})
    if not images:
        return Section("Training curves", [Paragraph("No run has logged metrics yet.")])
    legend = Paragraph("Solid lines: training, one point per logging window; dashed: held-out evaluation, "
                       "shaded: its 95% interval; dotted in accuracy panels: chance (0.5).")
    figures = Figures([(_relative(p, out_dir), CURVES[p.stem][0]) for p in images])
    return Section("Training curves", [legend, *_logps_scale_note(runs), figures])


def _logps_scale_note(runs: list[Run]) -> list[Paragraph]:
    """A warning, when the runs' log-probs are on different scales (DPO sums, ORPO/SimPO means)."""
    groups: dict[str | None, list[str]] = {}
    for run in runs:
        groups.setdefault(run.logps_scale, []).append(run.name)
    if len(groups) < 2:
        return []
    scales = "; ".join(f"{', '.join(names)}: {logps_unit(scale)}" for scale, names in groups.items())
    return [Paragraph(f"The runs' `logps/…` values are on different scales and cannot be compared across them "
                      f"({scales}); the log-prob figure gives each scale panels of its own.")]


def final_metrics_section(
    title: str, runs: list[Run], records_of: Callable[[Run], list[dict]], order: tuple[str, ...],
    pairs_key: str | None = None,
) -> Section | None:
    """The last value of every metric per run, known metrics first; None when no run logged any.

    With `pairs_key` (held-out lines), accuracies show their interval and pair count in their cell.
    """
    finals = [last_values(records_of(run)) for run in runs]
    names = _ordered([name for final in finals for name in final], order)
    if not names:
        return None
    rows = _metric_rows(names, finals, pairs_key)
    notes = _logps_scale_note(runs) if any(name.removeprefix("eval_").startswith("logps/") for name in names) else []
    return Section(title, [Table(["metric", *(run.name for run in runs)], rows), *notes])


def _metric_rows(names: list[str], columns: list[dict], pairs_key: str | None) -> list[list[str]]:
    """One row per metric, one cell per column of values. With `pairs_key`, an accuracy's cell reads
    `0.61 [0.53, 0.68], n=150` and its `_ci_low` and `_ci_high` lines are not shown apart."""
    accuracies = set()
    if pairs_key is not None:
        accuracies = {name for name in names if name.removeprefix("eval_") in ACCURACY_METRICS}
    folded = {key for name in accuracies for key in interval_keys(name)}
    return [[name, *(format_number(Proportion.read(values, name, n_key=pairs_key) if name in accuracies else values.get(name))
                     for values in columns)]
            for name in names if name not in folded]


def evaluation_section(runs: list[Run]) -> Section:
    """eval.json side by side (judge results have their own section); says how to get it where missing."""
    blocks: list = []
    evaluated = [run for run in runs if run.evaluation]
    names = _ordered([k for run in evaluated for k in run.evaluation if not k.startswith("judge/")], EVAL_ORDER)
    if names:
        rows = _metric_rows(names, [run.evaluation for run in evaluated], "pairs")
        blocks.append(Table(["metric", *(run.name for run in evaluated)], rows))
    missing = [run.name for run in runs if not run.evaluation]
    if missing:
        blocks.append(Paragraph(
            f"No eval/eval.json in {', '.join(missing)}: `smolalign eval --model RUN/final --dataset PAIRS "
            "--generate 8` adds held-out accuracy, drift from the reference and answers side by side."))
    return Section("Held-out evaluation (smolalign eval)", blocks)


def judge_section(runs: list[Run], out_dir: Path) -> Section | None:
    judged = [run for run in runs if "judge/win_rate" in run.evaluation]
    if not judged:
        return None
    header = ["run", "judge", "prompts", "wins", "ties", "losses", "win rate [95% interval]"]
    rows = [[run.name, *(format_number(run.evaluation.get(f"judge/{k}")) for k in ("name", "n", "wins", "ties", "losses")),
             format_number(win_rate(run.evaluation))] for run in judged]
    rates = {run.name: (run.evaluation["judge/win_rate"], run.evaluation.get("judge/ci_low"),
                        run.evaluation.get("judge/ci_high")) for run in judged}
    chart = plot_win_rates(rates, RunFolder(out_dir).plots / "win_rates.png", run_colors([run.name for run in runs]))
    return Section("Judge", [Table(header, rows), Figures([(_relative(chart, out_dir), "judge win rates")])])


def samples_section(runs: list[Run]) -> Section | None:
    """The first prompts of eval/generations.jsonl, each shown once with every run's answer under it."""
    by_prompt: dict[str, list[tuple[str, dict]]] = {}
    for run in runs:
        for row in run.generations:
            by_prompt.setdefault(prompt_text(row.get("prompt")), []).append((run.name, row))
    if not by_prompt:
        return None
    shown = list(by_prompt.items())[:MAX_SAMPLES]
    intro = Paragraph(f"{len(shown)} of the {len(by_prompt)} prompts answered in eval/generations.jsonl: "
                      "each run's policy answer, then the reference model's.")
    samples = [Sample(f"Prompt {i}" + _pair_index(rows), prompt, _answers(rows))
               for i, (prompt, rows) in enumerate(shown, start=1)]
    return Section("Generations side by side", [intro, *samples])


def _pair_index(rows: list[tuple[str, dict]]) -> str:
    """Where the prompt sits in the evaluation data (as in eval_pairs.jsonl), when the rows say so."""
    index = rows[0][1].get("index")
    return "" if index is None else f" (pair {index})"


def _answers(rows: list[tuple[str, dict]]) -> list[Answer]:
    """Each run's policy answer, then the reference answers, each distinct text once (runs usually share it)."""
    references: dict[str, list[str]] = {}
    for name, row in rows:
        if "reference" in row:
            references.setdefault(row["reference"], []).append(name)
    tokens = {row["reference"]: row.get("reference_tokens") for _, row in rows if "reference" in row}
    return [_policy_answer(name, row) for name, row in rows] + [
        Answer("reference" if len(references) == 1 else f"reference of {', '.join(names)}", _tokens(tokens[text]),
               text or "(empty)", "reference")
        for text, names in references.items()
    ]


def _policy_answer(name: str, row: dict) -> Answer:
    """A run's answer with its length and, when judged, the verdict (which also colors the HTML card)."""
    verdict, outcome = VERDICTS.get(row.get("verdict"), ("", ""))
    scores = (row.get("policy_score"), row.get("reference_score"))
    scored = all(isinstance(score, (int, float)) for score in scores)
    detail = [_tokens(row.get("policy_tokens")), verdict, f"scores {scores[0]:.2f} vs {scores[1]:.2f}" if scored else ""]
    return Answer(name, " · ".join(part for part in detail if part), row.get("policy") or "(empty)", f"policy {outcome}")


# ---------------------------------------------------------------- formatting values


def format_number(value) -> str:
    """Metric values: four decimals, small ones (learning rates) in e-notation, large ones whole; a
    proportion with its interval and count (`0.61 [0.53, 0.68], n=150`)."""
    if value is None:
        return ABSENT
    if isinstance(value, Proportion):
        return str(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isfinite(value) and abs(value) >= 1e4:
        return f"{value:,.0f}"
    if 0 < abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:.4f}"


def _setting(value) -> str:
    """A config value as YAML writes it, so it reads like config.yaml; exact, never rounded."""
    if value is _MISSING:
        return ABSENT
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value)
    return str(value)


def _tokens(count) -> str:
    return "" if count is None else f"{count} tokens"


def prompt_text(prompt) -> str:
    """A prompt as the dataset gave it: a string, or chat messages as `role: content` paragraphs."""
    if isinstance(prompt, list):
        return "\n\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return "" if prompt is None else str(prompt)


def _ordered(names: list[str], order: tuple[str, ...]) -> list[str]:
    present = list(dict.fromkeys(names))
    return [name for name in order if name in present] + [name for name in present if name not in order]


def _relative(path: Path, out_dir: Path) -> str:
    return path.relative_to(out_dir).as_posix()
