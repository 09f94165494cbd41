"""One optimizer step: batches of pairs through policy and reference, in pieces that bound activation memory.

A batch of `per_device_train_batch_size` pairs is the unit of the loss and of the logged metrics, as
in TRL. It is run through the model in chunks of at most `max_tokens_per_forward` tokens (whole
pairs), each chunk's backward pass right after its forward pass: activation memory is that of one
chunk, and with one pair per chunk no row is padded. The objective divides by the whole batch's
sizes (`BatchTotals`), so the chunks' gradients add up exactly to the batch's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from smolalign.core.logprobs import PairLogps, concat_pair_logps, score_batch
from smolalign.core.losses import BatchTotals, LossSettings, Objective, ObjectiveOutput
from smolalign.core.reference import Reference
from smolalign.core.scoring import PairScoring
from smolalign.data.tokenize import TokenizedPair


def totals_of(pairs: list[TokenizedPair], *, score_prompt: bool) -> BatchTotals:
    """The batch sizes the objective divides by, known from the token ids before any forward pass."""
    return BatchTotals(
        pairs=len(pairs),
        chosen_tokens=float(sum(len(p.chosen_ids) for p in pairs)),
        prompt_tokens=float(sum(len(p.prompt_ids) - 1 for p in pairs)) if score_prompt else 0.0,
    )


@dataclass
class RunResult:
    output: ObjectiveOutput  # loss and metrics of the whole batch, detached
    policy: PairLogps  # per-pair policy values, detached
    reference: PairLogps | None  # per-pair reference values (None without a reference)
    tokens: int  # prompt + answer tokens, counted as TRL's padded layout feeds them


def forward_chunks(pairs: list[TokenizedPair], objective: Objective, settings: LossSettings, scoring: PairScoring
                   ) -> list[list[TokenizedPair]]:
    """The forward passes of one batch: the whole batch for an objective that couples its pairs (KTO's KL
    estimate), else consecutive chunks within the token budget."""
    return [pairs] if objective.couples_pairs(settings) else scoring.chunks(pairs)


@dataclass
class PairRunner:
    """Computes an objective on batches of pairs with a fixed model, reference and scoring path."""

    scorer: nn.Module
    reference: Reference | None  # None when the objective needs none
    objective: Objective
    settings: LossSettings
    scoring: PairScoring
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # mixed precision
    # The mean of a value over the processes (a KTO batch's KL estimate is averaged over all of them).
    mean_across_processes: Callable[[torch.Tensor], torch.Tensor] = lambda value: value

    def run(
        self,
        pairs: list[TokenizedPair],
        *,
        backward: Callable[[torch.Tensor], None] | None = None,
        loss_scale: float = 1.0,
        no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        sync_after_last_chunk: bool = True,
    ) -> RunResult:
        """Loss and metrics of `pairs`; with `backward`, also back-propagates `loss * loss_scale` chunk by chunk.

        Every chunk's backward runs inside `no_sync()` except the last one when `sync_after_last_chunk`,
        so distributed training exchanges gradients once per optimizer step.
        """
        score_prompt = self.objective.needs_prompt_logps
        totals = totals_of(pairs, score_prompt=score_prompt)
        chunks = forward_chunks(pairs, self.objective, self.settings, self.scoring)
        policy_parts, reference_parts, tokens = [], [], 0
        for index, chunk in enumerate(chunks):
            batch = self.scoring.batch(chunk, score_prompt=score_prompt, score_ends=self.objective.reward_model)
            tokens += batch.num_tokens
            # The reference pass comes first, under no_grad and in the same layout: it keeps no activations.
            with self.autocast():
                reference = self.reference.logps(batch, chunk) if self.reference is not None else None
            if backward is None:
                with torch.no_grad(), self.autocast():
                    policy = score_batch(self.scorer, batch)
                    totals = self.with_reference_point(totals, policy, reference)
            else:
                last = sync_after_last_chunk and index == len(chunks) - 1
                with contextlib.nullcontext() if last else no_sync():
                    with self.autocast():
                        policy = score_batch(self.scorer, batch)
                        totals = self.with_reference_point(totals, policy, reference)
                        loss = self.objective.compute(policy, reference, self.settings, totals).loss * loss_scale
                    backward(loss)
            policy_parts.append(policy.detach())
            reference_parts.append(reference)
        policy = concat_pair_logps(policy_parts)
        reference = concat_pair_logps(reference_parts) if self.reference is not None else None
        with torch.no_grad():  # metrics of the whole batch, from the per-pair values of all chunks
            output = self.objective.compute(policy, reference, self.settings, totals)
        return RunResult(output, policy, reference, tokens)

    def with_reference_point(self, totals: BatchTotals, policy: PairLogps, reference: PairLogps | None) -> BatchTotals:
        """`totals` with KTO's reference point: the batch's KL estimate averaged over the processes, at least 0
        (TRL's order: average, then clamp)."""
        if self.objective.reference_point is None:
            return totals
        estimate = self.objective.reference_point(policy, reference, self.settings)
        if estimate is None:
            return totals
        return dataclasses.replace(totals, kl=self.mean_across_processes(estimate).clamp(min=0))


@dataclass
class StepOutcome:
    """What one optimizer step did; `tokens` is summed over processes, `finite` agreed by all of them."""

    loss: float  # mean over the micro-batches of this process
    metrics: list[dict[str, torch.Tensor]]  # the objective's metrics, one dict per micro-batch
    tokens: int
    grad_norm: float  # before clipping
    learning_rate: float  # the rate this step used
    finite: bool  # False: a loss or the gradient norm was NaN or infinite, and the weights were not updated


def training_step(
    accelerator: Accelerator, runner: PairRunner, micro_batches: list[list[TokenizedPair]], *,
    optimizer: torch.optim.Optimizer, scheduler, max_grad_norm: float,
) -> StepOutcome:
    """One optimizer step over the micro-batches (gradient accumulation), skipped if a number is not finite."""
    loss, metrics, tokens = 0.0, [], 0
    for index, pairs in enumerate(micro_batches):
        result = runner.run(
            pairs,
            backward=accelerator.backward,
            # Each micro-batch loss is a mean over its pairs; dividing by the number of micro-batches
            # makes the accumulated gradient the mean over the step (TRL's scaling).
            loss_scale=1 / len(micro_batches),
            # Processes exchange gradients once per step, after the last chunk of the last micro-batch.
            no_sync=lambda: accelerator.no_sync(runner.scorer),
            sync_after_last_chunk=index == len(micro_batches) - 1,
        )
        loss += result.output.loss.item() / len(micro_batches)
        metrics.append(result.output.metrics)
        tokens += result.tokens
    # The norm is measured before clipping and logged as TRL logs it; max_grad_norm=0 only measures.
    grad_norm = float(accelerator.clip_grad_norm_(runner.scorer.parameters(), max_grad_norm or math.inf))
    nonfinite = not (math.isfinite(loss) and math.isfinite(grad_norm))
    reduced = across_processes(accelerator, {"tokens": tokens, "nonfinite": float(nonfinite)}, "sum")
    learning_rate = scheduler.get_last_lr()[0]
    finite = reduced["nonfinite"] == 0  # every process decides alike, so their weights stay equal
    if finite:
        optimizer.step()
    scheduler.step()  # a skipped step has still used its pairs and its place in the schedule
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss, metrics, int(reduced["tokens"]), grad_norm, learning_rate, finite)


def across_processes(accelerator: Accelerator, values: dict[str, float], reduction: str) -> dict[str, float]:
    """Each value summed or averaged over the processes (every process must call this at the same point)."""
    if accelerator.num_processes == 1:
        return values
    reduced = accelerator.reduce(torch.tensor(list(values.values()), dtype=torch.float64,
                                              device=accelerator.device), reduction=reduction)
    return dict(zip(values, reduced.tolist(), strict=True))
