"""Run folders as the report reads them: the config, the metrics, and `smolalign eval`'s summary and generations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from smolalign.config.choices import MEAN_LOGPS_ALGORITHMS
from smolalign.config.files import flatten
from smolalign.errors import UserError
from smolalign.run_folder import RunFolder


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
        return "mean" if algorithm in MEAN_LOGPS_ALGORITHMS else "sum"


def read_runs(run_dirs: list[Path]) -> list[Run]:
    """Every run folder read whole; a folder that is not a run is the user's mistake, said in one sentence."""
    folders = [RunFolder(path) for path in run_dirs]
    for folder in folders:
        if not folder.is_run():
            raise UserError(f"'{folder.path}' is not a run folder: it has neither {folder.config_file.name} nor "
                            f"{folder.metrics_file.name}.")
    return [
        Run(name=name, path=folder.path, config=flatten(folder.read_config()), records=folder.read_metrics(),
            evaluation=folder.eval.read_summary(), generations=folder.eval.read_generations())
        for name, folder in zip(run_names(run_dirs), folders, strict=True)
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


def _is_held_out(record: dict) -> bool:
    return any(key.startswith("eval_") for key in record)


def check_sweep_keys(runs: list[Run], sweep_keys: list[str]) -> None:
    for key in sweep_keys:
        if not any(key in run.config for run in runs):
            raise UserError(f"sweep key '{key}' is in no run's config.yaml (nested keys are written like lora.r).")
