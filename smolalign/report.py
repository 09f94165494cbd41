"""`report.md` and `report.html` of one or more runs: settings, final metrics and curves, offline."""

from __future__ import annotations

import html
from pathlib import Path

import yaml

from smolalign.metrics import last_values, read_metrics
from smolalign.plots import plot_curves

HEADLINE = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "nll_loss")


def write_report(run_dirs: list[Path], out_dir: Path) -> Path:
    """Write report.md, report.html and plots/*.png into out_dir; returns the HTML path."""
    runs = {run.name: read_metrics(run / "metrics.jsonl") for run in run_dirs}
    configs = {run.name: _read_config(run) for run in run_dirs}
    images = plot_curves(runs, out_dir / "plots")
    finals = {name: last_values(records) for name, records in runs.items()}

    md = ["# smolalign report", ""]
    md += _markdown_table("Settings", ["setting", *runs], _settings_rows(configs))
    md += _markdown_table("Final metrics", ["metric", *runs], _metric_rows(finals))
    md += ["## Curves", ""] + [f"![{p.stem}](plots/{p.name})" for p in images] + [""]
    (out_dir / "report.md").write_text("\n".join(md))

    body = ["<h1>smolalign report</h1>"]
    body += _html_table("Settings", ["setting", *runs], _settings_rows(configs))
    body += _html_table("Final metrics", ["metric", *runs], _metric_rows(finals))
    body += ["<h2>Curves</h2>"] + [f'<img src="plots/{p.name}" alt="{p.stem}">' for p in images]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>smolalign report</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-width:48%;margin:4px}"
        "</style></head><body>" + "\n".join(body) + "</body></html>"
    )
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def _read_config(run: Path) -> dict:
    path = run / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def _settings_rows(configs: dict[str, dict]) -> list[list[str]]:
    keys = ["model", "algorithm", "loss_type", "beta", "learning_rate", "per_device_train_batch_size",
            "gradient_accumulation_steps", "max_steps", "num_train_epochs", "max_length", "lora", "dataset"]
    return [[key, *(str(c.get(key)) for c in configs.values())] for key in keys]


def _metric_rows(finals: dict[str, dict[str, float]]) -> list[list[str]]:
    names = [n for n in (*HEADLINE, *(f"eval_{h}" for h in HEADLINE), "eval_logps/mean_accuracy", "step")
             if any(n in f for f in finals.values())]
    return [[name, *(_fmt(f.get(name)) for f in finals.values())] for name in names]


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _markdown_table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _html_table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return [f"<h2>{html.escape(title)}</h2>", f"<table><tr>{head}</tr>{body}</table>"]
