"""Which pairs each optimizer step sees: a pure function of (seed, step), so resuming is exact.

Each epoch visits the pairs in a fresh permutation drawn from (seed, epoch). The epoch is cut into
micro-batches of `batch_size` pairs (the last may be shorter) and those into optimizer steps of
`accumulation` micro-batches (the last step of an epoch may hold fewer), like transformers' Trainer.
With several processes each takes every n-th pair of a micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepPlan:
    num_pairs: int
    batch_size: int  # pairs per micro-batch across all processes
    accumulation: int
    total_steps: int
    seed: int

    @classmethod
    def create(cls, *, num_pairs, batch_size, accumulation, num_train_epochs, max_steps, seed) -> StepPlan:
        micro_batches = math.ceil(num_pairs / batch_size)
        steps_per_epoch = math.ceil(micro_batches / accumulation)
        total = max_steps if max_steps > 0 else max(1, math.ceil(steps_per_epoch * num_train_epochs))
        return cls(num_pairs, batch_size, accumulation, total, seed)

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.num_pairs / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / self.accumulation)

    def micro_batches(self, step: int, *, process_index: int = 0, num_processes: int = 1) -> list[list[int]]:
        """Pair indices of each micro-batch of optimizer step `step` (0-based) for this process."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        first = step_in_epoch * self.accumulation
        last = min(first + self.accumulation, self.micro_batches_per_epoch)
        batches = [order[m * self.batch_size : (m + 1) * self.batch_size] for m in range(first, last)]
        return [b[process_index::num_processes] for b in batches]

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_pairs, generator=generator).tolist()

    def epoch_at(self, step: int) -> float:
        """Fractional epoch after `step` optimizer steps, as transformers logs it."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        if step_in_epoch == 0 and step > 0:
            return float(epoch)
        done = min(step_in_epoch * self.accumulation, self.micro_batches_per_epoch)
        return epoch + done / self.micro_batches_per_epoch
