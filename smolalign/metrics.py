"""Metric bookkeeping: averaging over a logging window as TRL does, and the run's metrics.jsonl."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch


class MetricWindow:
    """Collects one value per micro-batch per metric; `mean()` averages them (TRL's `log`)."""

    def __init__(self):
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        for name, value in metrics.items():
            self.values[name].append(float(value))

    def mean(self) -> dict[str, float]:
        return {name: sum(v) / len(v) for name, v in self.values.items() if v}

    def clear(self) -> None:
        self.values.clear()


class MetricsFile:
    """Append-only JSONL, one object per logged step. On resume, lines after the checkpoint are cut."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Keep the records up to `step`; a line torn by a crash is dropped too."""
        kept = [record for record in read_metrics(self.path) if record["step"] <= step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl; a torn (unparsable) line, as a crash can leave, is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def last_values(records: list[dict]) -> dict[str, float]:
    """The latest value of every numeric metric across records (train and eval lines interleave)."""
    last: dict[str, float] = {}
    for record in records:
        last.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
    return last
