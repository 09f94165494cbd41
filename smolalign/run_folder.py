"""A run's folder and an evaluation's folder: the names of their files, and reading and writing them.

No other module knows these names; each asks a `RunFolder` or an `EvalFolder`.

    RUN/config.yaml         the resolved config, enough to rerun the run (also in each checkpoint)
    RUN/metrics.jsonl       one JSON object per logged step
    RUN/checkpoint-N/       resumable state, written as .checkpoint-N.partial and renamed when complete
    RUN/final/              the trained model: a Hugging Face folder, or a PEFT adapter
    RUN/eval/               what `smolalign eval` writes for RUN/final (an EvalFolder)
    RUN/report.html, report.md, plots/*.png
    RUN/.smolalign.lock     the lock of the run that owns the folder

    EVAL/eval.json, eval_pairs.jsonl, generations.jsonl

A JSONL file's last line may be torn (a crash while writing it): it is left out. Any other line that is not
JSON is a damaged file, said in one sentence.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from smolalign.errors import UserError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_STATE = "smolalign_state.json"  # written last into a checkpoint: its presence marks it complete


@dataclass(frozen=True)
class EvalFolder:
    """Where `smolalign eval` writes its summary, its per-pair rows and its generations."""

    path: Path

    @property
    def summary_file(self) -> Path:
        return self.path / "eval.json"

    @property
    def pairs_file(self) -> Path:
        return self.path / "eval_pairs.jsonl"

    @property
    def generations_file(self) -> Path:
        return self.path / "generations.jsonl"

    def read_summary(self) -> dict:
        return read_json(self.summary_file)

    def write_summary(self, summary: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.summary_file.write_text(json.dumps(summary, indent=2))

    def read_generations(self) -> list[dict]:
        return read_jsonl(self.generations_file)

    def write_generations(self, rows: list[dict]) -> None:
        write_jsonl(self.generations_file, rows)


@dataclass(frozen=True)
class RunFolder:
    """One run's folder (see the module's docstring for its layout)."""

    path: Path

    @classmethod
    def of_final(cls, model: str | Path) -> RunFolder | None:
        """The run whose `final/` `model` names (the run's config.yaml beside it; final/ may not exist yet)."""
        path = Path(model)
        run = cls(path.parent)
        return run if path.name == "final" and run.config_file.is_file() else None

    def is_run(self) -> bool:
        return self.config_file.is_file() or self.metrics_file.is_file()

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def final_staging(self) -> Path:
        return self.path / ".final.partial"

    @property
    def eval(self) -> EvalFolder:
        return EvalFolder(self.path / "eval")

    @property
    def report_html(self) -> Path:
        return self.path / "report.html"

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def lock_file(self) -> Path:
        return self.path / ".smolalign.lock"

    def published_files(self) -> list[str]:
        """What goes up to the Hub beside the model: the report, its plots, the config and the metrics."""
        return [name for name in (self.report_html.name, self.report_md.name, self.config_file.name,
                                  self.metrics_file.name)] + [f"{self.plots.name}/*.png"]

    # -- config and metrics

    def read_config(self) -> dict[str, Any]:
        """config.yaml as written (empty when the run has none yet)."""
        return read_yaml(self.config_file)

    def write_config(self, config: Any) -> None:
        self.config_file.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_file)

    def append_metrics(self, record: dict) -> None:
        with self.metrics_file.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def keep_metrics_until(self, step: int) -> None:
        """Keep the records up to `step` (resuming from its checkpoint); a torn last line goes too."""
        write_jsonl(self.metrics_file, [record for record in self.read_metrics() if record["step"] <= step])

    # -- checkpoints

    def checkpoint(self, step: int) -> Path:
        return self.path / f"checkpoint-{step}"

    def checkpoint_staging(self, step: int) -> Path:
        return self.path / f".checkpoint-{step}.partial"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        found = [(int(m.group(1)), p) for p in self.path.glob("checkpoint-*") if (m := CHECKPOINT.match(p.name))]
        return [path for _, path in sorted(found) if is_checkpoint(path)]


def is_checkpoint(path: Path) -> bool:
    return (path / CHECKPOINT_STATE).is_file()


def read_checkpoint_state(path: Path) -> dict:
    return json.loads((path / CHECKPOINT_STATE).read_text())


def write_checkpoint_state(path: Path, state: dict) -> None:
    (path / CHECKPOINT_STATE).write_text(json.dumps(state))


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSONL file (none when it does not exist); a torn last line is left out."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # torn by a crash while it was written
                break
            raise UserError(f"{path} is damaged: line {number} is not JSON (only a torn last line is "
                            "expected after a crash).") from None
    return records


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON (line {error.lineno}): rerun the command that wrote it.") from None


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise UserError(f"{path} is not valid YAML: fix it or rerun the training that wrote it.") from None
    return values if isinstance(values, dict) else {}
