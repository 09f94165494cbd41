"""`report.md` and `report.html` of one or more runs: did the alignment work, and what made the difference?

`smolalign compare RUN…` writes it, and so do `smolalign train` and the Python API for every run they finish. A run
folder is read as it is: whatever it lacks (held-out lines in metrics.jsonl, `eval/eval.json` from
`smolalign eval`, generated answers) is left out, so a fresh run and a finished sweep get the same
report. The report is built once, as sections of plain blocks, and every block renders itself both
as Markdown and as HTML, so the two files always say the same thing. The HTML opens offline: inline
CSS, no scripts, PNGs next to it under `plots/`.
"""

from __future__ import annotations

from pathlib import Path

from smolalign.report.render import render_html, render_markdown
from smolalign.report.runs import check_sweep_keys, read_runs
from smolalign.report.sections import (
    HELD_OUT_ORDER,
    TRAIN_ORDER,
    curves_section,
    evaluation_section,
    final_metrics_section,
    headline_section,
    judge_section,
    samples_section,
    settings_section,
    sweep_section,
)
from smolalign.run_folder import RunFolder


def write_report(run_dirs: list[Path], out_dir: Path, sweep_keys: list[str] | None = None) -> Path:
    """Write report.md, report.html and plots/*.png about `run_dirs` into `out_dir`; returns the HTML path.

    `sweep_keys` (config keys a sweep varied, the first on the x axis) adds the final metrics plotted
    against them.
    """
    runs = read_runs(run_dirs)
    sweep_keys = sweep_keys or []
    check_sweep_keys(runs, sweep_keys)
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
    folder = RunFolder(out_dir)  # a run's own report, or a comparison's folder laid out alike
    folder.report_md.write_text(render_markdown(title, sections))
    folder.report_html.write_text(render_html(title, sections))
    return folder.report_html

