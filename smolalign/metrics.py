"""Metric bookkeeping: averaging over a logging window as TRL does, and the latest value of each metric."""

from __future__ import annotations

from collections import defaultdict

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


def last_values(records: list[dict]) -> dict[str, float]:
    """The latest value of every numeric metric across records (train and eval lines interleave)."""
    last: dict[str, float] = {}
    for record in records:
        last.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
    return last
