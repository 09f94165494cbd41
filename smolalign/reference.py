"""Reference log-probs for objectives that need them (the DPO family).

Three sources, same numbers: the policy with its LoRA adapters disabled (no second copy of the
model), a separate frozen model (`ref_model`, or a frozen copy of the initial policy for full
fine-tuning), each run in the same batch layout as the policy under `no_grad`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from smolalign.batching import Batch
from smolalign.logprobs import PairLogps, SequenceScorer, score_batch


class Reference:
    """Scores batches with a frozen model; `context` switches the model into its reference state."""

    def __init__(self, scorer: nn.Module, context=contextlib.nullcontext):
        self.scorer = scorer
        self.context = context

    @torch.no_grad()
    def logps(self, batch: Batch) -> PairLogps:
        with self.context():
            return score_batch(self.scorer, batch)


def adapter_disabled_reference(policy_scorer: nn.Module, peft_model) -> Reference:
    """LoRA: the reference is the base model, i.e. the policy with adapters switched off."""
    return Reference(policy_scorer, context=peft_model.disable_adapter)


def model_reference(model: nn.Module, chunk_size: int) -> Reference:
    return Reference(SequenceScorer(model, chunk_size=chunk_size))
