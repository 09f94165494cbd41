"""`report.md` and `report.html` of one or more runs: did the alignment work, and what made the difference?

`smolalign compare RUN…` writes it, and so does every training run for itself when it ends. A run
folder is read as it is: whatever it lacks (held-out lines in metrics.jsonl, `eval/eval.json` from
`smolalign eval`, generated answers) is left out, so a fresh run and a finished sweep get the same
report. The report is built once, as sections of plain blocks, and every block renders itself both
as Markdown and as HTML, so the two files always say the same thing. The HTML opens offline: inline
CSS, no scripts, PNGs next to it under `plots/`.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from smolalign.config.train import flatten
from smolalign.errors import UserError
from smolalign.metrics import last_values, read_metrics
from smolalign.report.plots import CURVES, logps_unit, plot_curves, plot_sweep, plot_win_rates, run_colors
from smolalign.stats import ACCURACY_METRICS, CHANCE, Proportion, interval_keys

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
# Algorithms whose `logps/*` metrics are mean token log-probs of an answer (losses.py); the others log sums.
AVERAGED_LOGPS = ("orpo", "simpo")
VERDICTS = {"policy": ("judge: policy wins", "win"), "reference": ("judge: reference wins", "loss"),
            "tie": ("judge: tie", "tie")}

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;max-width:1240px;
  margin:2em auto;padding:0 1.5em}
h1{font-size:1.6em;margin-bottom:.2em}
h2{margin-top:2em;padding-bottom:.3em;border-bottom:1px solid #d0d7de}
h3{font-size:1em;margin:.2em 0 .5em}
nav{color:#57606a}nav a{margin-right:1em;color:#0969da;text-decoration:none}
code{background:#f6f8fa;padding:1px 4px;border-radius:3px;font-size:.9em}
.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:left;vertical-align:top;
  font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
th{background:#f6f8fa}
tr.differs td{background:#fff8c5;font-weight:600}
details>summary{cursor:pointer;color:#57606a;margin:.6em 0}
.figures{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:0;font:13px/1.45 ui-monospace,Menlo,Consolas,monospace}
.sample{border:1px solid #d0d7de;border-radius:6px;padding:.8em 1em;margin:1em 0}
.prompt{background:#f6f8fa;padding:.6em;border-radius:4px;max-height:16em;overflow:auto}
.answers{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:10px;margin-top:.8em}
.answer{border:1px solid #d0d7de;border-left:4px solid #0969da;border-radius:4px;padding:.5em .7em}
.answer.reference{border-left-color:#8c959f;background:#fafbfc}
.answer.win{border-left-color:#1a7f37}.answer.loss{border-left-color:#cf222e}.answer.tie{border-left-color:#bf8700}
.who{font-size:.85em;margin-bottom:.3em}.who span{color:#57606a}
"""


@dataclass
class Run:
    """One run folder as the report reads it; whatever the folder lacks is empty."""

    name: str
    path: Path
    config: dict[str, object]  # flattened: `lora: {r: 8}` is `lora.r`
    records: list[dict]  # metrics.jsonl, training and held-out lines interleaved
    evaluation: dict  # eval/eval.json
    generations: list[dict]  # eval/generations.jsonl

    @property
    def train_records(self) -> list[dict]:
        return [r for r in self.records if not _is_held_out(r)]

    @property
    def eval_records(self) -> list[dict]:
        return [r for r in self.records if _is_held_out(r)]

    @property
    def logps_scale(self) -> str | None:
        """"mean" or "sum": how the run's `logps/*` metrics are scaled; None without an algorithm in config.yaml."""
        algorithm = self.config.get("algorithm")
        if algorithm is None:
            return None
        return "mean" if algorithm in AVERAGED_LOGPS else "sum"


def compare_runs(run_dirs: list[Path], out_dir: Path, sweep_keys: list[str] | None = None) -> Path:
    """Write report.md, report.html and plots/*.png about `run_dirs` into `out_dir`; returns the HTML path.

    `sweep_keys` (config keys a sweep varied, the first on the x axis) adds the final metrics plotted
    against them.
    """
    runs = read_runs(run_dirs)
    sweep_keys = sweep_keys or []
    _check_sweep_keys(runs, sweep_keys)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [
        headline_section(runs, sweep_keys),
        settings_section(runs),
        sweep_section(runs, sweep_keys, out_dir) if sweep_keys else None,
        curves_section(runs, out_dir),
        final_metrics_section("Final training metrics", runs, lambda run: run.train_records, TRAIN_ORDER),
        final_metrics_section("Final held-out metrics (evaluation during training)", runs,
                              lambda run: run.eval_records, HELD_OUT_ORDER, pairs_key="eval_pairs"),
        evaluation_section(runs),
        judge_section(runs, out_dir),
        samples_section(runs),
    ]
    sections = [section for section in sections if section is not None]
    title = "smolalign report: " + (", ".join(run.name for run in runs) if len(runs) <= 4 else f"{len(runs)} runs")
    (out_dir / "report.md").write_text(render_markdown(title, sections))
    path = out_dir / "report.html"
    path.write_text(render_html(title, sections))
    return path


write_report = compare_runs  # the name train.py uses for the report of the run it just finished


# ---------------------------------------------------------------- reading run folders


def read_runs(run_dirs: list[Path]) -> list[Run]:
    """Every run folder read whole; a folder that is not a run is the user's mistake, said in one sentence."""
    for path in run_dirs:
        if not (path / "config.yaml").is_file() and not (path / "metrics.jsonl").is_file():
            raise UserError(f"'{path}' is not a run folder: it has neither config.yaml nor metrics.jsonl.")
    return [
        Run(
            name=name,
            path=path,
            config=flatten(_read_yaml(path / "config.yaml")),
            records=read_metrics(path / "metrics.jsonl"),
            evaluation=_read_json(path / "eval" / "eval.json"),
            generations=read_metrics(path / "eval" / "generations.jsonl"),  # any JSONL, torn lines skipped
        )
        for name, path in zip(run_names(run_dirs), run_dirs, strict=True)
    ]


def run_names(run_dirs: list[Path]) -> list[str]:
    """Folder names; runs that share one get as many parent folders as it takes (`a/dpo`, `b/dpo`)."""
    paths = [path.resolve() for path in run_dirs]
    for i, path in enumerate(paths):
        if path in paths[:i]:
            raise UserError(f"'{run_dirs[i]}' is given twice: name each run folder once.")
    names = [path.name for path in paths]
    depth = 1
    while len(set(names)) < len(names):
        depth += 1
        names = ["/".join(path.parts[-depth:]) if names.count(name) > 1 else name
                 for path, name in zip(paths, names, strict=True)]
    return names


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise UserError(f"{path} is not valid YAML: fix it or rerun the training that wrote it.") from None
    return config if isinstance(config, dict) else {}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON (line {error.lineno}): rerun `smolalign eval` to rewrite it.") from None


def _is_held_out(record: dict) -> bool:
    return any(key.startswith("eval_") for key in record)


def _check_sweep_keys(runs: list[Run], sweep_keys: list[str]) -> None:
    for key in sweep_keys:
        if not any(key in run.config for run in runs):
            raise UserError(f"sweep key '{key}' is in no run's config.yaml (nested keys are written like lora.r).")


# ---------------------------------------------------------------- what the runs achieved


def _held_out_key(runs: list[Run]) -> str:
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
        "judge win rate": _win_rate(run.evaluation),
    }
    return {name: value for name, value in values.items() if value is not None}


def effect_verdict(run: Run, held_out_key: str) -> str:
    """In words, whether the run's effect on held-out accuracy is larger than its uncertainty.

    Held out during training, the effect is the change from step 0 to the last evaluation: measurable
    when the two 95% intervals do not overlap (a conservative test: they rest on the same pairs).
    Without a step-0 evaluation, or from `smolalign eval` alone, it is the distance from chance:
    measurable when the interval excludes 0.5.
    """
    done = outcomes(run, held_out_key)
    before, after = done.get("held-out accuracy before"), done.get("held-out accuracy")
    evaluation = done.get("eval.json reward accuracy")
    parts = []
    if after is not None:
        parts.append(_change_verdict(held_out_key, before, after))
    if evaluation is not None:
        parts.append(_chance_verdict("`smolalign eval`'s `rewards/accuracies`", evaluation))
    if not parts:
        return (f"{run.name}: not measured: no held-out accuracy (give the run an eval_dataset or a "
                "test_split_size, or run `smolalign eval` on its final model).")
    (label, reason), *others = parts  # the first part names the verdict; the others add their reasons
    return f"{run.name}: {label} — {reason}." + "".join(f" {other_reason}." for _, other_reason in others)


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
    label = ("measurable" if accuracy.low > CHANCE else "measurable, for the worse" if accuracy.high < CHANCE
             else "not measurable")
    return label, f"{what} is {accuracy}, whose 95% interval {_against_chance(accuracy)}"


def _against_chance(accuracy: Proportion) -> str:
    if accuracy.low > CHANCE:
        return f"excludes chance ({CHANCE})"
    if accuracy.high < CHANCE:
        return f"lies below chance ({CHANCE})"
    return f"includes chance ({CHANCE})"


# ---------------------------------------------------------------- sections


def headline_section(runs: list[Run], sweep_keys: list[str]) -> Section:
    key = _held_out_key(runs)
    header = ["run", *sweep_keys, "final train loss", "reward accuracy", "reward margin",
              "held-out accuracy before", "held-out accuracy after", "eval.json accuracy", "judge win rate"]
    rows = []
    for run in runs:
        done = outcomes(run, key)
        rows.append([
            run.name,
            *(_setting(run.config.get(k, _MISSING)) for k in sweep_keys),
            *(_number(done.get(name)) for name in ("final train loss", "train reward accuracy", "train reward margin",
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
    key = _held_out_key(runs)
    points = []
    for run in runs:
        line = ", ".join(f"{k}={_setting(run.config.get(k, _MISSING))}" for k in sweep_keys[1:])
        finals = {name: value for name, value in outcomes(run, key).items() if name != "held-out accuracy before"}
        points.append((run.config.get(sweep_keys[0]), line, finals))
    path = plot_sweep(points, sweep_keys[0], out_dir / "plots" / "sweep.png")
    if path is None:
        return Section("Sweep", [Paragraph("No run has final metrics to plot against the swept settings.")])
    return Section("Sweep", [Figures([(_relative(path, out_dir), f"final metrics against {sweep_keys[0]}")])])


def curves_section(runs: list[Run], out_dir: Path) -> Section:
    images = plot_curves({run.name: run.records for run in runs}, out_dir / "plots",
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
    return [[name, *(_number(Proportion.read(values, name, n_key=pairs_key) if name in accuracies else values.get(name))
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
    rows = [[run.name, *(_number(run.evaluation.get(f"judge/{k}")) for k in ("name", "n", "wins", "ties", "losses")),
             _number(_win_rate(run.evaluation))] for run in judged]
    rates = {run.name: (run.evaluation["judge/win_rate"], run.evaluation.get("judge/ci_low"),
                        run.evaluation.get("judge/ci_high")) for run in judged}
    chart = plot_win_rates(rates, out_dir / "plots" / "win_rates.png", run_colors([run.name for run in runs]))
    return Section("Judge", [Table(header, rows), Figures([(_relative(chart, out_dir), "judge win rates")])])


def samples_section(runs: list[Run]) -> Section | None:
    """The first prompts of eval/generations.jsonl, each shown once with every run's answer under it."""
    by_prompt: dict[str, list[tuple[str, dict]]] = {}
    for run in runs:
        for row in run.generations:
            by_prompt.setdefault(_prompt_text(row.get("prompt")), []).append((run.name, row))
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


def _number(value) -> str:
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


def _win_rate(evaluation: dict) -> Proportion | None:
    """The judge's win rate with its interval (`judge/ci_low`, `judge/ci_high`) over `judge/n` prompts."""
    rate = evaluation.get("judge/win_rate")
    if rate is None:
        return None
    return Proportion(rate, evaluation.get("judge/ci_low"), evaluation.get("judge/ci_high"), evaluation.get("judge/n"))


def _tokens(count) -> str:
    return "" if count is None else f"{count} tokens"


def _prompt_text(prompt) -> str:
    """A prompt as the dataset gave it: a string, or chat messages as `role: content` paragraphs."""
    if isinstance(prompt, list):
        return "\n\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return "" if prompt is None else str(prompt)


def _ordered(names: list[str], order: tuple[str, ...]) -> list[str]:
    present = list(dict.fromkeys(names))
    return [name for name in order if name in present] + [name for name in present if name not in order]


def _relative(path: Path, out_dir: Path) -> str:
    return path.relative_to(out_dir).as_posix()


# ---------------------------------------------------------------- blocks: each renders as Markdown and HTML


@dataclass
class Paragraph:
    """Prose; `code` spans become <code> in HTML."""

    text: str

    def markdown(self) -> str:
        return self.text

    def html(self) -> str:
        return "<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(self.text)) + "</p>"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    highlighted: set[int] = field(default_factory=set)  # indices of rows to stand out (settings that differ)

    def markdown(self) -> str:
        lines = [_markdown_row(self.header), "|" + " --- |" * len(self.header)]
        lines += [_markdown_row(row, bold_label=i in self.highlighted) for i, row in enumerate(self.rows)]
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(cell)}</th>" for cell in self.header)
        body = "".join(
            ('<tr class="differs">' if i in self.highlighted else "<tr>")
            + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
            for i, row in enumerate(self.rows)
        )
        return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


@dataclass
class Figures:
    images: list[tuple[str, str]]  # (path relative to the report, description)

    def markdown(self) -> str:
        return "\n\n".join(f"![{alt}]({path})" for path, alt in self.images)

    def html(self) -> str:
        figures = "".join(f'<figure><img src="{html.escape(path)}" alt="{html.escape(alt)}"></figure>'
                          for path, alt in self.images)
        return f'<div class="figures">{figures}</div>'


@dataclass
class Collapsible:
    """Folded in HTML; in Markdown, which cannot fold, a bold line and the blocks after it."""

    summary: str
    blocks: list
    open: bool = False

    def markdown(self) -> str:
        return "\n\n".join([f"**{self.summary}**", *(block.markdown() for block in self.blocks)])

    def html(self) -> str:
        inner = "".join(block.html() for block in self.blocks)
        return f"<details{' open' if self.open else ''}><summary>{html.escape(self.summary)}</summary>{inner}</details>"


@dataclass
class Answer:
    title: str  # the run, or "reference"
    detail: str  # length, verdict, scores
    text: str
    kind: str  # CSS classes: "policy win", "reference", …


@dataclass
class Sample:
    """One prompt, shown once, and the answers to it side by side (one after the other in Markdown)."""

    heading: str
    prompt: str
    answers: list[Answer]

    def markdown(self) -> str:
        parts = [f"### {self.heading}", _markdown_code(self.prompt)]
        for answer in self.answers:
            parts += [f"**{answer.title}**" + (f" — {answer.detail}" if answer.detail else ""),
                      _markdown_code(answer.text)]
        return "\n\n".join(parts)

    def html(self) -> str:
        cards = "".join(
            f'<div class="answer {answer.kind}"><div class="who"><b>{html.escape(answer.title)}</b> '
            f"<span>{html.escape(answer.detail)}</span></div><pre>{html.escape(answer.text)}</pre></div>"
            for answer in self.answers
        )
        return (f'<div class="sample"><h3>{html.escape(self.heading)}</h3>'
                f'<pre class="prompt">{html.escape(self.prompt)}</pre><div class="answers">{cards}</div></div>')


@dataclass
class Section:
    title: str
    blocks: list

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


def render_markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {title}"]
    for section in sections:
        parts += [f"## {section.title}", *(block.markdown() for block in section.blocks)]
    return "\n\n".join(parts) + "\n"


def render_html(title: str, sections: list[Section]) -> str:
    nav = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(
        f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>' + "".join(b.html() for b in s.blocks) + "</section>"
        for s in sections
    )
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1><nav>{nav}</nav>\n{body}\n</body></html>\n")


def _markdown_row(cells: list[str], *, bold_label: bool = False) -> str:
    """A table row; a highlighted row has its label in bold, which every Markdown viewer shows."""
    cells = [cell.replace("|", "\\|").replace("\n", " ") for cell in cells]
    if bold_label:
        cells[0] = f"**{cells[0]}**"
    return "| " + " | ".join(cells) + " |"


def _markdown_code(text: str) -> str:
    """A fenced block longer than any backtick run inside, so answers show verbatim whatever they hold."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"
