"""`smolalign sweep`: one run per point of a grid of settings, one after another, then a compare report.

Each run lives in its own sub-folder named after its settings (`beta=0.1`, `beta=0.1,learning_rate=5e-6`).
A run whose `final/` exists is skipped; a run that stopped after a checkpoint resumes from it; either
only when the folder's run was started with the same settings. Every point's config is built and
validated before the first run starts, so a bad value fails at once.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

from smolalign.config.train import FlagText, TrainConfig, changed_settings, load_config, read_yaml
from smolalign.errors import UserError
from smolalign.training.checkpoint import list_checkpoints

log = logging.getLogger("smolalign")


def parse_grid(specs: list[str]) -> dict[str, list[FlagText]]:
    """`["beta=0.05,0.1", "loss_type=sigmoid,ipo"]` -> {"beta": ["0.05", "0.1"], "loss_type": [...]}."""
    grid: dict[str, list[FlagText]] = {}
    for spec in specs:
        key, equals, values = spec.partition("=")
        if not equals or not key or not values:
            raise UserError(f"--grid takes KEY=VALUE,VALUE,…, not '{spec}'.")
        key = key.replace("-", "_")
        if key in grid:
            raise UserError(f"--grid names '{key}' twice; give all its values in one --grid.")
        grid[key] = [FlagText(v.strip()) for v in values.split(",") if v.strip()]
    if not grid:
        raise UserError("a sweep needs at least one --grid KEY=VALUE,VALUE,….")
    return grid


def run_name(point: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in point.items())


def plan_sweep(config_path: str | None, grid: dict[str, list[FlagText]], overrides: dict) -> tuple[Path, list[tuple[Path, dict]]]:
    """The sweep folder and, per grid point, its run folder and settings (all validated)."""
    base = load_config(config_path, overrides)
    root = Path(base.output_dir)
    points = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values, strict=True))
        folder = root / run_name(point)
        load_config(config_path, {**overrides, **point, "output_dir": str(folder)})  # fail before any training
        points.append((folder, point))
    return root, points


def check_same_settings(folder: Path, config: TrainConfig) -> None:
    """A run folder left by an earlier sweep is reused only if it was started with `config`'s settings."""
    if not (folder / "config.yaml").exists():
        return
    started = load_config(folder / "config.yaml")
    changed = changed_settings(started, config, ignore=("output_dir", "resume_from_checkpoint"))
    if changed:
        raise UserError(f"'{folder}' holds a run with other settings ({', '.join(changed[:3])}); remove it or "
                        f"choose another output_dir to sweep with the new settings.")


def run_sweep(config_path: str | None, grid_specs: list[str], overrides: dict) -> Path:
    """Train every grid point not yet finished, then write the compare report; returns its path."""
    from smolalign.report.write import write_report
    from smolalign.training.loop import train

    if config_path is not None:
        read_yaml(config_path)  # a missing or broken file is reported before anything else
    grid = parse_grid(grid_specs)
    root, points = plan_sweep(config_path, grid, overrides)
    for number, (folder, point) in enumerate(points, start=1):
        settings = {**overrides, **point, "output_dir": str(folder)}
        check_same_settings(folder, load_config(config_path, settings))
        if (folder / "final").exists():
            log.info("[%d/%d] %s: finished earlier, skipped", number, len(points), folder.name)
            continue
        if folder.is_dir() and list_checkpoints(folder):
            settings["resume_from_checkpoint"] = "latest"
            log.info("[%d/%d] %s: resuming from its last checkpoint", number, len(points), folder.name)
        else:
            log.info("[%d/%d] %s", number, len(points), folder.name)
        config: TrainConfig = load_config(config_path, settings)
        train(config)
    return write_report([folder for folder, _ in points], root, sweep_keys=list(grid))
