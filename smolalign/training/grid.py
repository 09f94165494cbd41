"""The runs of a sweep: one per point of a grid of settings (`smolalign sweep`, `smolalign.sweep`).

Each run lives in its own sub-folder named after its settings (`beta=0.1`, `beta=0.1,learning_rate=5e-6`).
A run whose `final/` exists is skipped; a run that stopped after a checkpoint resumes from it; either
only when the folder's run was started with the same settings. Every point's config is built and
validated before the first run starts, so a bad value fails at once. The API trains the runs and
writes the comparison.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

from smolalign.config.fields import FlagText
from smolalign.config.files import changed_settings, read_yaml
from smolalign.config.train import TrainConfig, load_config
from smolalign.errors import UserError
from smolalign.run_folder import RunFolder

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


@dataclass
class SweepPlan:
    root: Path  # output_dir: the comparison report goes here, each run into a sub-folder
    grid: dict[str, list[FlagText]]
    points: list[tuple[Path, dict]]  # each run's folder and its grid values

    @property
    def run_dirs(self) -> list[Path]:
        return [folder for folder, _ in self.points]


def plan_sweep(config_path: str | TrainConfig | None, grid_specs: list[str], overrides: dict) -> SweepPlan:
    """The sweep folder and, per grid point, its run folder and settings, all validated before any training."""
    if isinstance(config_path, str):
        read_yaml(config_path)  # a missing or broken file is reported before anything else
    grid = parse_grid(grid_specs)
    base = load_config(config_path, overrides)
    points = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values, strict=True))
        folder = Path(base.output_dir) / run_name(point)
        load_config(config_path, {**overrides, **point, "output_dir": str(folder)})  # fail before any training
        points.append((folder, point))
    return SweepPlan(Path(base.output_dir), grid, points)


def check_same_settings(folder: Path, config: TrainConfig) -> None:
    """A run folder left by an earlier sweep is reused only if it was started with `config`'s settings
    (bookkeeping ones aside, as when resuming from a checkpoint)."""
    run = RunFolder(folder)
    if not run.config_file.exists():
        return
    started = load_config(run.config_file)
    changed = changed_settings(started, config)
    if changed:
        raise UserError(f"'{folder}' holds a run with other settings ({', '.join(changed[:3])}); remove it or "
                        f"choose another output_dir to sweep with the new settings.")


def run_config(config_path: str | TrainConfig | None, overrides: dict, folder: Path, point: dict, *, number: int,
               total: int) -> TrainConfig | None:
    """The config to train one point with (resuming its last checkpoint, if any); None when it finished earlier."""
    settings = {**overrides, **point, "output_dir": str(folder)}
    check_same_settings(folder, load_config(config_path, settings))
    run = RunFolder(folder)
    if run.final.exists():
        log.info("[%d/%d] %s: finished earlier, skipped", number, total, folder.name)
        return None
    if folder.is_dir() and run.checkpoints():
        settings["resume_from_checkpoint"] = "latest"
        log.info("[%d/%d] %s: resuming from its last checkpoint", number, total, folder.name)
    else:
        log.info("[%d/%d] %s", number, total, folder.name)
    return load_config(config_path, settings)
