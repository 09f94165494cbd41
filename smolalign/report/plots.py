"""The report's figures as PNG files: training curves, judge win rates, a sweep's final metrics, and the
quality bench's methods side by side,
and the speed bench's growth with max_length and pairs per step.

Every figure gives a run the same color (its place in the report), so a reader who learns that the
ORPO run is orange can follow it from figure to figure; training values are solid lines, held-out
(`eval_…`) values dashed, a held-out accuracy's 95% interval shaded around it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from smolalign.stats import CHANCE, Proportion, interval_keys  # noqa: E402

# file name -> (figure title, one panel per metric; a panel overlays the metric and its `eval_` twin)
CURVES = {
    "loss": ("Loss", ["loss"]),
    "accuracy": ("Preference accuracy (share of pairs where the chosen answer wins)",
                 ["rewards/accuracies", "logps/mean_accuracy", "accuracy"]),
    "margins": ("Reward margin (chosen − rejected)", ["rewards/margins"]),
    "rewards": ("Implicit rewards", ["rewards/chosen", "rewards/rejected"]),
    "logps": ("Log-probs of the answers", ["logps/chosen", "logps/rejected"]),
    "nll": ("NLL of the chosen answers", ["nll_loss"]),
    "log_odds": ("ORPO log-odds", ["log_odds_ratio", "log_odds_chosen"]),
    "learning_rate": ("Learning rate", ["learning_rate"]),
    "grad_norm": ("Gradient norm (before clipping)", ["grad_norm"]),
}
# Figures whose log-prob values are sums over an answer's tokens for some algorithms and per-token means
# for others: runs of each scale get panels of their own, with the unit on the axis.
SCALED_FIGURES = {"logps"}
LOGPS_UNITS = {"sum": "nats, summed over answer tokens", "mean": "nats per token, mean over answer tokens"}
UNKNOWN_SCALE = "scale unknown: no algorithm in config.yaml"
PANEL_SIZE = (5.2, 3.6)  # inches; figures grow with their panels so text keeps its size


@dataclass
class Curve:
    run: str
    held_out: bool  # an `eval_…` metric: drawn dashed
    steps: list[int]
    values: list[float]
    band: tuple[list[float], list[float]] | None = None  # a held-out accuracy's 95% interval at each step


@dataclass
class Panel:
    metric: str
    unit: str | None  # what the values measure, where that depends on the run (log-prob sums or means)
    curves: list[Curve]


def run_colors(names: Sequence[str]) -> dict[str, tuple]:
    """One distinct color per run: tab10 while it lasts, then evenly spaced viridis (sweeps)."""
    if len(names) <= 10:
        return {name: plt.cm.tab10(i) for i, name in enumerate(names)}
    return {name: plt.cm.viridis(i / (len(names) - 1)) for i, name in enumerate(names)}


def curve_panels(runs: dict[str, list[dict]], logps_scales: dict[str, str | None]) -> dict[str, list[Panel]]:
    """The panels of every figure of CURVES for which some run logged data, keyed by the figure's file name.

    A panel overlays a metric and its `eval_` twin for every run, except in SCALED_FIGURES, where runs
    are grouped by `logps_scales` ("sum", "mean" or None per run): a log-prob sum of a 100-token answer
    and a per-token mean differ a hundredfold, and one axis for both would flatten one of them and
    invite comparing what is not comparable.
    """
    figures = {}
    for name, (_, metrics) in CURVES.items():
        groups = _scale_groups(runs, logps_scales) if name in SCALED_FIGURES else {None: runs}
        panels = [Panel(metric, unit, curves) for unit, group in groups.items() for metric in metrics
                  if (curves := _curves(group, metric))]
        if panels:
            figures[name] = panels
    return figures


def plot_curves(runs: dict[str, list[dict]], out_dir: Path, logps_scales: dict[str, str | None]) -> list[Path]:
    """Every figure of `curve_panels`, runs overlaid; returns the files written.

    A held-out accuracy logged with its interval is drawn with the interval as a shaded band, and
    accuracy panels mark chance (0.5) with a dotted line.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = run_colors(list(runs))
    written = []
    for name, panels in curve_panels(runs, logps_scales).items():
        split = len({panel.unit for panel in panels}) > 1  # runs of different scales: a row of panels per scale
        columns = len({panel.metric for panel in panels}) if split else 3
        figure, axes = _panels(len(panels), CURVES[name][0], columns=columns)
        for ax, panel in zip(axes, panels, strict=False):
            for curve in panel.curves:
                label = ("held-out" if curve.held_out else "train") if len(runs) == 1 else (
                    f"{curve.run} (held-out)" if curve.held_out else curve.run)
                ax.plot(curve.steps, curve.values, "--" if curve.held_out else "-", color=colors[curve.run],
                        label=label, marker="o" if len(curve.steps) < 30 else None, markersize=3)
                if curve.band is not None:
                    ax.fill_between(curve.steps, *curve.band, color=colors[curve.run], alpha=0.15, linewidth=0)
            if name == "accuracy":
                ax.axhline(CHANCE, color="gray", linestyle=":", linewidth=1)  # a coin flip
            _label(ax, panel.metric if panel.unit is None else f"{panel.metric}\n({panel.unit})", "optimizer step")
            if split:
                runs_here = dict.fromkeys(curve.run for curve in panel.curves)
                ax.set_title(", ".join(runs_here), fontsize=9)
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


def plot_sweep(points: list[tuple[object, str, dict[str, float | Proportion]]], x_label: str, path: Path) -> Path | None:
    """Final metrics against a swept setting: one panel per metric, one line per `line` label.

    `points` holds (x value, line label, {metric: value}) per run; a value that is a `Proportion` with
    an interval (held-out accuracy, win rate) gets it as an error bar. Numbers give a numeric axis
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
            xy = sorted(((x if numeric else categories.index(str(x)), finals[metric])
                         for x, label, finals in points if label == line and metric in finals), key=lambda p: p[0])
            if xy:
                xs = [x for x, _ in xy]
                ys = [value.value if isinstance(value, Proportion) else value for _, value in xy]
                intervals = [value if isinstance(value, Proportion) and value.has_interval else None for _, value in xy]
                errors = None
                if any(intervals):
                    errors = [[0.0 if p is None else p.value - p.low for p in intervals],
                              [0.0 if p is None else p.high - p.value for p in intervals]]
                ax.errorbar(xs, ys, yerr=errors, fmt="-o", color=colors[line], markersize=4, capsize=3,
                            label=line or None)
        _label(ax, metric, x_label)
        if numeric and min(x for x, _, _ in points) > 0 and _spread(points) > 20:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(categories)), categories)
            ax.set_xlim(-0.5, len(categories) - 0.5)
    return _save(figure, path)


def plot_quality(methods: dict[str, dict[str, Proportion | float | None]],
                 start: dict[str, Proportion | float | None], path: Path) -> Path:
    """The quality bench: one panel per metric, a bar per method with its 95% interval as error bars.

    Accuracies and win rates get the chance line (0.5); where the starting model has a value of its own
    (mean-log-prob accuracy), it is drawn as a dashed line: the "before" the methods are measured against.
    """
    metrics = [m for m in dict.fromkeys(m for values in methods.values() for m in values)
               if any(values.get(m) is not None for values in methods.values())]
    names = list(methods)
    colors = run_colors(names)
    figure, axes = _panels(len(metrics), "Held-out quality of each method at the same budget", columns=2)
    for ax, metric in zip(axes, metrics, strict=True):
        for column, name in enumerate(names):
            value = methods[name].get(metric)
            if value is None:
                continue
            error = None
            if isinstance(value, Proportion) and value.has_interval:
                error = [[value.value - value.low], [value.high - value.value]]
            ax.bar(column, value.value if isinstance(value, Proportion) else value, yerr=error,
                   color=colors[name], capsize=4, width=0.6)
        before = start.get(metric)
        if isinstance(before, Proportion):
            ax.axhline(before.value, color="black", linestyle="--", linewidth=1, label="starting model")
            ax.axhline(CHANCE, color="gray", linestyle=":", linewidth=1, label="chance")
        elif any(isinstance(values.get(metric), Proportion) for values in methods.values()):
            ax.axhline(CHANCE, color="gray", linestyle=":", linewidth=1, label="chance")
        ax.set_xticks(range(len(names)), names)
        _label(ax, metric, "method")
    return _save(figure, path)


def plot_growth(rows: list[dict], path: Path) -> Path | None:
    """The speed bench: seconds per step and peak memory against max_length and against pairs per step
    (whichever the bench varied), a line per framework and algorithm; failed runs are left out. None when
    nothing was varied."""
    done = [row for row in rows if not row.get("failure")]
    dimensions = [(key, label) for key, label in (("max_length", "max_length (tokens)"),
                                                  ("batch_size", "pairs per step"))
                  if len({row[key] for row in rows}) > 1]
    if not dimensions or not done:
        return None
    measures = (("seconds_per_step", "seconds per step", 1.0), ("peak_bytes", "peak memory (GB)", 1e9))
    figure, axes = _panels(2 * len(dimensions), "Cost as the work grows", columns=2)
    lines = list(dict.fromkeys(_line(row) for row in done))
    colors = run_colors(lines)
    panels = iter(axes)
    for key, label in dimensions:
        other = "batch_size" if key == "max_length" else "max_length"
        for measure, measure_label, scale in measures:
            ax = next(panels)
            for line in lines:
                failed = sorted({row[key] for row in rows if row.get("failure") and _line(row) == line})
                legend = f"{line} (failed at {', '.join(map(str, failed))})" if failed else line
                for fixed in sorted({row[other] for row in done}):
                    points = sorted((row[key], row[measure] / scale) for row in done
                                    if _line(row) == line and row[other] == fixed)
                    if len(points) > 1:
                        ax.plot(*zip(*points, strict=True), "-o", color=colors[line], markersize=4, label=legend)
            ax.set_xscale("log", base=2)
            values = sorted({row[key] for row in done})
            ax.set_xticks(values, [str(value) for value in values])
            ax.set_ylim(bottom=0)
            _label(ax, measure_label, label)
    return _save(figure, path)


def _line(row: dict) -> str:
    return f"{row['framework']} {row['algorithm']}"


def _curves(runs: dict[str, list[dict]], metric: str) -> list[Curve]:
    """The curves of `metric` and of `eval_<metric>`, for the runs that logged them; a held-out curve gets
    its interval band when every point of it has one (`eval_<metric>_ci_low`, `eval_<metric>_ci_high`)."""
    curves = []
    for run, records in runs.items():
        for held_out, key in ((False, metric), (True, f"eval_{metric}")):
            points = [r for r in records if "step" in r and _is_number(r.get(key))]
            if not points:
                continue
            curve = Curve(run, held_out, [r["step"] for r in points], [r[key] for r in points])
            low, high = interval_keys(key)
            if held_out and all(_is_number(r.get(low)) and _is_number(r.get(high)) for r in points):
                curve.band = ([r[low] for r in points], [r[high] for r in points])
            curves.append(curve)
    return curves


def logps_unit(scale: str | None) -> str:
    """What log-probs of the scale "sum" or "mean" measure, in words for axes and notes."""
    return LOGPS_UNITS.get(scale, UNKNOWN_SCALE)


def _scale_groups(runs: dict[str, list[dict]], logps_scales: dict[str, str | None]) -> dict[str | None, dict]:
    """Runs grouped by the unit of their log-probs, in the order the runs come; one group of runs of an
    unknown scale needs no unit."""
    units = {run: logps_unit(logps_scales.get(run)) for run in runs}
    if set(units.values()) == {UNKNOWN_SCALE}:
        return {None: runs}
    groups: dict[str | None, dict] = {}
    for run, records in runs.items():
        groups.setdefault(units[run], {})[run] = records
    return groups


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
