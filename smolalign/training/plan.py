"""Which pairs each optimizer step sees: a pure function of (seed, step), so resuming is exact.

Each epoch visits the pairs in a fresh permutation drawn from (seed, epoch), or in their order. The epoch is cut into
micro-batches of `batch_size` pairs (the last may be shorter), or, with token-budget batching, of
as many pairs as fit in `max_tokens` (never more than `batch_size`), and those into optimizer steps
of `accumulation` micro-batches (the last step of an epoch may hold fewer), like transformers'
Trainer. With several processes each takes every n-th pair of a micro-batch; a micro-batch that does
not divide evenly repeats its first pairs, so that every process has the same number of pairs (as
Accelerate's `even_batches` does) and none is left with nothing to back-propagate.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch


@dataclass
class StepPlan:
    num_pairs: int
    batch_size: int  # pairs per micro-batch across all processes (the cap under token-budget batching)
    accumulation: int
    num_train_epochs: float
    max_steps: int
    seed: int
    shuffle: bool = True  # a fresh permutation each epoch; False: the pairs in their order (TRL's KTO)
    pair_tokens: tuple[int, ...] | None = None  # needed for token-budget batching
    max_tokens: int | None = None  # token budget of a micro-batch; None = fixed batch_size
    # Each epoch's step count is kept for the whole run, its micro-batches only while its steps run.
    _epoch_steps: dict[int, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    _epoch_batches: dict[int, list[list[int]]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @functools.cached_property
    def total_steps(self) -> int:
        if self.max_steps > 0:
            return self.max_steps
        whole, fraction = divmod(self.num_train_epochs, 1)
        steps = sum(self.steps_in_epoch(e) for e in range(int(whole)))
        if fraction:
            steps += math.ceil(self.steps_in_epoch(int(whole)) * fraction)
        return max(1, steps)

    def every(self, interval: float) -> int:
        """Steps between two events of an `interval` setting (`save_steps`, ...): a whole number of steps, or
        below 1 that share of the run's steps rounded up, as transformers reads it."""
        return math.ceil(interval * self.total_steps) if interval < 1 else int(interval)

    def epoch_micro_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_batches:
            self._epoch_batches.clear()
            self._epoch_batches[epoch] = self._draw_micro_batches(epoch)
        return self._epoch_batches[epoch]

    def _draw_micro_batches(self, epoch: int) -> list[list[int]]:
        order = list(range(self.num_pairs))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.num_pairs, generator=generator).tolist()
        if self.max_tokens is None:
            return [order[i : i + self.batch_size] for i in range(0, self.num_pairs, self.batch_size)]
        batches: list[list[int]] = []
        size = 0
        for index in order:
            tokens = self.pair_tokens[index]
            if not batches or size + tokens > self.max_tokens or len(batches[-1]) == self.batch_size:
                batches.append([])
                size = 0
            batches[-1].append(index)
            size += tokens
        return batches

    def steps_in_epoch(self, epoch: int) -> int:
        if epoch not in self._epoch_steps:
            micro_batches = (math.ceil(self.num_pairs / self.batch_size) if self.max_tokens is None
                             else len(self.epoch_micro_batches(epoch)))
            self._epoch_steps[epoch] = math.ceil(micro_batches / self.accumulation)
        return self._epoch_steps[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within that epoch) of optimizer step `step` (0-based)."""
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step

    def micro_batches(self, step: int, *, process_index: int = 0, num_processes: int = 1) -> list[list[int]]:
        """Pair indices of each micro-batch of optimizer step `step` (0-based) for this process."""
        epoch, step_in_epoch = self.locate(step)
        batches = self.epoch_micro_batches(epoch)
        first = step_in_epoch * self.accumulation
        step_batches = batches[first : first + self.accumulation]
        return [_even(b, num_processes)[process_index::num_processes] for b in step_batches]

    def epoch_at(self, step: int) -> float:
        """Fractional epoch after `step` optimizer steps, as transformers logs it."""
        if step == 0:
            return 0.0
        epoch, step_in_epoch = self.locate(step - 1)
        batches = len(self.epoch_micro_batches(epoch))
        return epoch + min((step_in_epoch + 1) * self.accumulation, batches) / batches

    def first_micro_batches(self, num_processes: int = 1) -> list[list[int]]:
        """Every process's micro-batches of the first epoch's steps (or of the run's, if it is shorter): each pair
        the run trains on is in them, in the micro-batch that first trains it."""
        steps = min(self.total_steps, self.steps_in_epoch(0))
        return [batch for step in range(steps) for process in range(num_processes)
                for batch in self.micro_batches(step, process_index=process, num_processes=num_processes)]


def _even(batch: list[int], num_processes: int) -> list[int]:
    """`batch` cycled up to a multiple of `num_processes` pairs."""
    size = math.ceil(len(batch) / num_processes) * num_processes
    return [batch[i % len(batch)] for i in range(size)]
