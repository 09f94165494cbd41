"""The report's figures as PNG files: training curves, judge win rates, a sweep's final metrics.

Every figure gives a run the same color (its place in the report), so a reader who learns that the
ORPO run is orange can follow it from figure to figure; training values are solid lines, held-out
(`eval_…`) values dashed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# file name -> (figure title, one panel per metric; a panel overlays the metric and its `eval_` twin)
CURVES = {
    "loss": ("Loss", ["loss"]),
    "accuracy": ("Preference accuracy (share of pairs where the chosen answer wins)",
                 ["rewards/accuracies", "logps/mean_accuracy"]),
    "margins": ("Reward margin (chosen − rejected)", ["rewards/margins"]),
    "rewards": ("Implicit rewards", ["rewards/chosen", "rewards/rejected"]),
    "logps": ("Log-probs of the answers", ["logps/chosen", "logps/rejected"]),
    "nll": ("NLL of the chosen answers", ["nll_loss"]),
    "log_odds": ("ORPO log-odds", ["log_odds_ratio", "log_odds_chosen"]),
    "learning_rate": ("Learning rate", ["learning_rate"]),
    "grad_norm": ("Gradient norm (before clipping)", ["grad_norm"]),
}
PANEL_SIZE = (5.2, 3.6)  # inches; figures grow with their panels so text keeps its size


def run_colors(names: Sequence[str]) -> dict[str, tuple]:
    """One distinct color per run: tab10 while it lasts, then evenly spaced viridis (sweeps)."""
    if len(names) <= 10:
        return {name: plt.cm.tab10(i) for i, name in enumerate(names)}
    return {name: plt.cm.viridis(i / (len(names) - 1)) for i, name in enumerate(names)}


def plot_curves(runs: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """Every figure of CURVES for which some run logged data, runs overlaid; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = run_colors(list(runs))
    written = []
    for name, (title, metrics) in CURVES.items():
        panels = {metric: _curves(runs, metric) for metric in metrics}
        panels = {metric: curves for metric, curves in panels.items() if curves}
        if not panels:
            continue
        figure, axes = _panels(len(panels), title)
        for ax, (metric, curves) in zip(axes, panels.items(), strict=False):
            for run, held_out, steps, values in curves:
                label = ("held-out" if held_out else "train") if len(runs) == 1 else (
                    f"{run} (held-out)" if held_out else run)
                ax.plot(steps, values, "--" if held_out else "-", color=colors[run], label=label,
                        marker="o" if len(steps) < 30 else None, markersize=3)
            _label(ax, metric, "optimizer step")
        written.append(_save(figure, out_dir / f"{name}.png"))
    return written


def plot_win_rates(
    win_rates: dict[str, tuple[float, float | None, float | None]], path: Path, colors: dict[str, tuple]
) -> Path:
    """Judge win rate of each run's policy over its reference, as bars with the interval as error bars.

    `colors` are those of all the report's runs (`run_colors`), so a run keeps its color when others
    were not judged.
    """
    names = list(win_rates)
    figure, (ax,) = _panels(1, "Judge win rate of the policy over the reference",
                            size=(PANEL_SIZE[0] + 1.5, 1.2 + 0.45 * len(names)))
    for row, (name, (rate, low, high)) in enumerate(win_rates.items()):
        error = None if low is None or high is None else [[rate - low], [high - rate]]
        ax.barh(row, rate, xerr=error, color=colors[name], capsize=4, height=0.6)
        ax.text(min(high if high is not None else rate, 1.0) + 0.01, row, f"{rate:.0%}", va="center", fontsize=8)
    ax.axvline(0.5, color="gray", linestyle=":", linewidth=1)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()  # first run on top, as in the tables
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("win rate (dotted: no better than the reference)")
    return _save(figure, path)


def plot_sweep(points: list[tuple[object, str, dict[str, float]]], x_label: str, path: Path) -> Path | None:
    """Final metrics against a swept setting: one panel per metric, one line per `line` label.

    `points` holds (x value, line label, {metric: value}) per run. Numbers give a numeric axis
    (logarithmic when they span more than a factor of 20, as learning rates do); anything else is
    placed in order of first appearance.
    """
    metrics = list(dict.fromkeys(metric for _, _, finals in points for metric in finals))
    if not metrics:
        return None
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _, _ in points)
    categories = list(dict.fromkeys(str(x) for x, _, _ in points))
    lines = list(dict.fromkeys(line for _, line, _ in points))
    colors = run_colors(lines)
    figure, axes = _panels(len(metrics), f"Final metrics against {x_label}")
    for ax, metric in zip(axes, metrics, strict=False):
        for line in lines:
            xy = [(x if numeric else categories.index(str(x)), finals[metric])
                  for x, label, finals in points if label == line and metric in finals]
            if xy:
                xs, ys = zip(*sorted(xy), strict=True)
                ax.plot(xs, ys, "-o", color=colors[line], markersize=4, label=line or None)
        _label(ax, metric, x_label)
        if numeric and min(x for x, _, _ in points) > 0 and _spread(points) > 20:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(categories)), categories)
            ax.set_xlim(-0.5, len(categories) - 0.5)
    return _save(figure, path)


def _curves(runs: dict[str, list[dict]], metric: str) -> list[tuple[str, bool, list, list]]:
    """(run, held out?, steps, values) of `metric` and of `eval_<metric>`, for the runs that logged them."""
    curves = []
    for run, records in runs.items():
        for held_out, key in ((False, metric), (True, f"eval_{metric}")):
            points = [(r["step"], r[key]) for r in records if "step" in r and _is_number(r.get(key))]
            if points:
                steps, values = zip(*points, strict=True)
                curves.append((run, held_out, list(steps), list(values)))
    return curves


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _spread(points: list[tuple[object, str, dict]]) -> float:
    xs = [x for x, _, _ in points]
    return max(xs) / min(xs)


def _panels(count: int, title: str, *, columns: int = 3, size: tuple[float, float] | None = None):
    """A figure of `count` panels, at most `columns` per row, with room below for a shared legend."""
    columns = min(count, columns)
    rows = math.ceil(count / columns)
    width, height = size or (PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows + 0.5)
    figure, axes = plt.subplots(rows, columns, figsize=(width, height), layout="constrained", squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    figure.suptitle(title)
    return figure, list(axes.flat[:count])


def _label(ax, metric: str, x_label: str) -> None:
    ax.set_xlabel(x_label)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)


def _save(figure, path: Path) -> Path:
    """One legend for the whole figure (entries of all panels, each once), then the PNG."""
    entries = {}
    for ax in figure.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        figure.legend(entries.values(), entries.keys(), loc="outside lower center", ncols=min(len(entries), 4),
                      fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
