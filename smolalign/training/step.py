"""One batch of pairs through policy and reference, in pieces that bound activation memory.

A batch of `per_device_train_batch_size` pairs is the unit of the loss and of the logged metrics, as
in TRL. It is run through the model in chunks of at most `max_tokens_per_forward` tokens (whole
pairs), each chunk's backward pass right after its forward pass: activation memory is that of one
chunk, and with one pair per chunk no row is padded. The objective divides by the whole batch's
sizes (`BatchTotals`), so the chunks' gradients add up exactly to the batch's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from smolalign.core.layouts import build_batch, split_by_tokens
from smolalign.core.logprobs import PairLogps, concat_pair_logps, score_batch
from smolalign.core.losses import BatchTotals, LossSettings, Objective, ObjectiveOutput
from smolalign.core.reference import Reference
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
    tokens: int  # prompt + answer tokens, counted as TRL's padded layout feeds them


@dataclass
class PairRunner:
    """Computes an objective on batches of pairs with a fixed model, reference and layout."""

    scorer: nn.Module
    reference: Reference | None
    objective: Objective
    settings: LossSettings
    layout: str
    pad_token_id: int
    device: torch.device
    max_tokens_per_forward: int
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # mixed precision

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
        chunks = split_by_tokens(pairs, self.max_tokens_per_forward)
        policy_parts, reference_parts, tokens = [], [], 0
        for index, chunk in enumerate(chunks):
            batch = build_batch(chunk, self.layout, pad_token_id=self.pad_token_id, score_prompt=score_prompt,
                                score_ends=self.objective.reward_model)
            batch = batch.to(self.device)
            tokens += batch.num_tokens
            # The reference pass comes first, under no_grad and in the same layout: it keeps no activations.
            with self.autocast():
                reference = self.reference.logps(batch, chunk) if self.objective.needs_reference else None
            if backward is None:
                with torch.no_grad(), self.autocast():
                    policy = score_batch(self.scorer, batch)
            else:
                last = sync_after_last_chunk and index == len(chunks) - 1
                with contextlib.nullcontext() if last else no_sync():
                    with self.autocast():
                        policy = score_batch(self.scorer, batch)
                        loss = self.objective.compute(policy, reference, self.settings, totals).loss * loss_scale
                    backward(loss)
            policy_parts.append(policy.detach())
            reference_parts.append(reference)
        policy = concat_pair_logps(policy_parts)
        reference = concat_pair_logps(reference_parts) if self.objective.needs_reference else None
        with torch.no_grad():  # metrics of the whole batch, from the per-pair values of all chunks
            output = self.objective.compute(policy, reference, self.settings, totals)
        return RunResult(output, policy, tokens)
