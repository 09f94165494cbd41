"""What `smolalign.train/evaluate/compare/sweep` return: views of the folders a command wrote.

Each result reads its folder when asked (a run evaluated later shows its eval.json too) and shows
itself in a notebook: `_repr_html_` gives the numbers that say whether alignment worked, each accuracy
with its 95% interval and pair count, and the run's curves (its plots/*.png, embedded); `repr()` gives
the same numbers as text. A comparison shows its whole report inline.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from smolalign.report.runs import Run, read_runs
from smolalign.report.sections import format_number, prompt_text
from smolalign.report.verdicts import effect_verdict, held_out_key, outcomes, win_rate
from smolalign.run_folder import EvalFolder, RunFolder, read_jsonl
from smolalign.stats import ACCURACY_METRICS, Proportion, interval_keys

SHOWN_CURVES = ("loss", "accuracy", "margins")  # plots/<name>.png shown at once; the others behind a click
REPORT_HEIGHT_PX = 800  # the inline report scrolls inside a frame of this height
MAX_GENERATIONS_SHOWN = 4
FIGURE_HEIGHT_PX = 250  # figures shrink to this height, so that the shown ones sit side by side


class TrainResult:
    """A training run's folder: config, metrics, final model, report and, once evaluated, eval/eval.json."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.folder = RunFolder(self.run_dir)

    def __fspath__(self) -> str:
        """The run's folder, so a result goes wherever a run folder's path does (compare, export)."""
        return str(self.run_dir)

    @property
    def final_model(self) -> Path | None:
        """`RUN/final` (a transformers folder, or a PEFT adapter under LoRA); None until the run finished."""
        return self.folder.final if self.folder.final.is_dir() else None

    @property
    def report(self) -> Path | None:
        return self.folder.report_html if self.folder.report_html.is_file() else None

    @property
    def config(self):
        """The run's resolved settings (a TrainConfig), as config.yaml holds them."""
        from smolalign.config.train import load_config

        return load_config(self.folder.config_file)

    @property
    def metrics(self) -> list[dict]:
        """metrics.jsonl: one dict per logged step; held-out lines have `eval_…` keys."""
        return self.folder.read_metrics()

    @property
    def evaluation(self) -> dict:
        """eval/eval.json, the summary `smolalign.evaluate` writes for `RUN/final`; empty before that."""
        return _read_run(self.run_dir).evaluation

    @property
    def held_out_accuracy(self) -> Proportion | None:
        """The last held-out accuracy during training with its 95% interval and pair count (the report's headline)."""
        run = _read_run(self.run_dir)
        return outcomes(run, held_out_key([run])).get("held-out accuracy")

    def to_pandas(self):
        """The metrics as a pandas DataFrame, one row per logged line (needs pandas)."""
        return _data_frame(self.metrics)

    def _numbers(self) -> tuple[Run, dict[str, float | Proportion], str]:
        run = _read_run(self.run_dir)
        key = held_out_key([run])
        numbers = {"steps": max((record["step"] for record in run.train_records), default=0)}
        for name, value in outcomes(run, key).items():  # the held-out accuracies say which one they are
            numbers[f"{name} ({key})" if name.startswith("held-out") else name] = value
        return run, numbers, effect_verdict(run, key)

    def __repr__(self) -> str:
        run, numbers, verdict = self._numbers()
        lines = [f"TrainResult('{self.run_dir}')", f"  algorithm: {run.config.get('algorithm', '?')}",
                 f"  final model: {self.final_model or 'not written (the run has not finished)'}",
                 f"  report: {self.report or 'not written'}"]
        lines += [f"  {name}: {_text(value)}" for name, value in numbers.items()]
        return "\n".join([*lines, f"  verdict: {verdict}"])

    def _repr_html_(self) -> str:
        run, numbers, verdict = self._numbers()
        head = (f"<b>smolalign {html.escape(str(run.config.get('algorithm', '')))} run</b> "
                f"<code>{html.escape(str(self.run_dir))}</code>")
        places = {"final model": self.final_model, "report": self.report}
        rows = [(name, f"<code>{html.escape(str(path))}</code>" if path else "not written")
                for name, path in places.items()]
        rows += [(name, html.escape(_text(value))) for name, value in numbers.items()]
        return (f"<div>{head}{_html_table(rows)}<p>{html.escape(verdict)}</p>"
                f"{_curves_html(self.folder.plots)}</div>")


class EvalResult:
    """An evaluation's folder: eval.json (the summary), eval_pairs.jsonl and generations.jsonl."""

    def __init__(self, output_dir: str | Path, model: str | None = None):
        self.output_dir = Path(output_dir)
        self.folder = EvalFolder(self.output_dir)
        self.model = model

    @property
    def summary(self) -> dict:
        """eval.json: accuracies with `_ci_low`/`_ci_high`, `pairs`, drift, and the judge's numbers when judged."""
        return self.folder.read_summary()

    @property
    def pairs(self) -> list[dict]:
        """eval_pairs.jsonl: per pair, in dataset order, the answers' log-prob sums (and the reference's)."""
        return read_jsonl(self.folder.pairs_file)

    @property
    def generations(self) -> list[dict]:
        """generations.jsonl: prompts answered by the policy and the reference (empty without `generate`)."""
        return self.folder.read_generations()

    def to_pandas(self):
        """The per-pair rows as a pandas DataFrame (needs pandas)."""
        return _data_frame(self.pairs)

    def _numbers(self) -> dict[str, object]:
        """The summary with each accuracy and the judge's win rate as a Proportion (interval and pair count)."""
        summary = self.summary
        folded = {key for name in ACCURACY_METRICS for key in interval_keys(name)}
        numbers: dict[str, object] = {
            key: Proportion.read(summary, key, n_key="pairs") if key in ACCURACY_METRICS else value
            for key, value in summary.items() if key not in folded and not key.startswith("judge/")
        }
        rate = win_rate(summary)
        if rate is not None:
            numbers[f"judge win rate ({summary.get('judge/name', 'judge')})"] = rate
        return numbers

    def __repr__(self) -> str:
        lines = [f"EvalResult('{self.output_dir}')"] + ([f"  model: {self.model}"] if self.model else [])
        return "\n".join(lines + [f"  {name}: {_text(value)}" for name, value in self._numbers().items()])

    def _repr_html_(self) -> str:
        head = f"<b>smolalign evaluation</b> <code>{html.escape(str(self.output_dir))}</code>"
        if self.model:
            head += f" of <code>{html.escape(self.model)}</code>"
        rows = [(name, html.escape(_text(value))) for name, value in self._numbers().items()]
        return f"<div>{head}{_html_table(rows)}{_generations_html(self.generations)}</div>"


class ComparisonResult:
    """A comparison of runs (`compare`, or a finished `sweep`): its report and the runs it compares."""

    def __init__(self, report: str | Path, run_dirs: list[Path]):
        self.report = Path(report)
        self.runs = [TrainResult(run_dir) for run_dir in run_dirs]

    @property
    def output_dir(self) -> Path:
        return self.report.parent

    def __repr__(self) -> str:
        runs = read_runs([result.run_dir for result in self.runs])
        key = held_out_key(runs)
        lines = [f"ComparisonResult('{self.report}')", f"  held-out accuracy ({key}) per run:"]
        lines += [f"    {run.name}: {_text(outcomes(run, key).get('held-out accuracy'))}" for run in runs]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """The report itself, in a frame (its styles stay its own), with its plots embedded."""
        page = _embed_images(self.report.read_text(), self.report.parent)
        return (f"<div><b>smolalign report</b> <code>{html.escape(str(self.report))}</code>"
                f'<iframe srcdoc="{html.escape(page, quote=True)}" title="smolalign report" '
                f'style="width:100%;height:{REPORT_HEIGHT_PX}px;border:1px solid #d0d7de"></iframe></div>')


# ---------------------------------------------------------------- reading and formatting


def _read_run(run_dir: Path) -> Run:
    return read_runs([run_dir])[0]


def _data_frame(rows: list[dict]):
    import pandas

    return pandas.DataFrame(rows)


def _text(value) -> str:
    """A value as the report writes it (a proportion with its interval and count: `0.61 [0.53, 0.68], n=150`)."""
    return "not measured" if value is None else format_number(value)


def _html_table(rows: list[tuple[str, str]]) -> str:
    """Two columns, name and value; values are HTML already."""
    body = "".join(f'<tr><th style="text-align:left">{html.escape(name)}</th><td style="text-align:left">{value}</td></tr>'
                   for name, value in rows)
    return f"<table>{body}</table>"


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _curves_html(plots_dir: Path) -> str:
    """The run's figures, embedded: loss, accuracy and margins shown, the others behind a <details>."""
    plots = sorted(plots_dir.glob("*.png"))
    if not plots:
        return ""

    def figure(path: Path) -> str:
        return (f'<img src="{_png_uri(path)}" alt="{html.escape(path.stem)}" '
                f'style="max-height:{FIGURE_HEIGHT_PX}px;max-width:100%;margin:4px">')

    def row(paths: list[Path]) -> str:  # side by side, wrapping (notebook styles stack bare images)
        return f'<div style="display:flex;flex-wrap:wrap;align-items:flex-start">{"".join(map(figure, paths))}</div>'

    shown = [path for name in SHOWN_CURVES for path in plots if path.stem == name]
    others = [path for path in plots if path not in shown]
    more = (f"<details><summary>{len(others)} more figures: {html.escape(', '.join(p.stem for p in others))}"
            f"</summary>{row(others)}</details>") if others else ""
    return row(shown) + more


def _embed_images(page: str, folder: Path) -> str:
    """`<img src="plots/x.png">` as data URIs: a frame's srcdoc has no folder to resolve relative paths in."""

    def inline(match: re.Match) -> str:
        path = folder / html.unescape(match.group(2))
        return f'{match.group(1)}"{_png_uri(path)}"' if path.is_file() else match.group(0)

    return re.sub(r'(<img\b[^>]*?\bsrc=)"([^":]+\.png)"', inline, page)


def _generations_html(rows: list[dict]) -> str:
    """The first prompts with the policy's and the reference's answers side by side."""
    if not rows:
        return ""
    shown = rows[:MAX_GENERATIONS_SHOWN]
    columns = ["prompt", "policy"] + (["reference"] if any("reference" in row for row in shown) else [])
    head = "".join(f'<th style="text-align:left">{name}</th>' for name in columns)
    body = "".join(
        "<tr>" + "".join(f'<td style="text-align:left;vertical-align:top;white-space:pre-wrap">'
                         f"{html.escape(prompt_text(row.get(name)) or '(empty)')}</td>" for name in columns) + "</tr>"
        for row in shown)
    return f"<p>Generations ({len(shown)} of {len(rows)} prompts):</p><table><tr>{head}</tr>{body}</table>"
