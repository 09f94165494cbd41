"""Training curves as PNG files: one figure per question a user asks of a run (or of several)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# figure name -> (title, metrics drawn in it)
FIGURES = {
    "loss": ("Loss", ["loss", "eval_loss"]),
    "accuracy": ("Reward accuracy (chosen reward > rejected)", ["rewards/accuracies", "eval_rewards/accuracies"]),
    "margins": ("Reward margin (chosen - rejected)", ["rewards/margins", "eval_rewards/margins"]),
    "rewards": ("Rewards", ["rewards/chosen", "rewards/rejected"]),
    "logps": ("Log-probs of the answers", ["logps/chosen", "logps/rejected"]),
    "nll": ("NLL of the chosen answers", ["nll_loss", "eval_nll_loss"]),
    "learning_rate": ("Learning rate", ["learning_rate"]),
    "grad_norm": ("Gradient norm (before clipping)", ["grad_norm"]),
}


def plot_curves(runs: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """Draw every figure for which some run logged data; runs are overlaid, named by their keys."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, metrics) in FIGURES.items():
        series = [
            (run, metric, [(r["step"], r[metric]) for r in records if metric in r])
            for run, records in runs.items()
            for metric in metrics
        ]
        series = [(run, metric, points) for run, metric, points in series if points]
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(6.4, 3.8))
        for run, metric, points in series:
            steps, values = zip(*points, strict=True)
            label = metric if len(runs) == 1 else f"{run}: {metric}"
            style = "--" if metric.startswith("eval_") else "-"
            marker = "o" if len(points) < 30 else None
            axes.plot(steps, values, style, marker=marker, markersize=3, label=label)
        axes.set_title(title)
        axes.set_xlabel("optimizer step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = out_dir / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
