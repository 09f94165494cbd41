"""Hidden states -> log-probs of the scored tokens, without ever building the full logits.

`hidden @ lm_head.T` over a 49k vocabulary is the largest tensor of a preference step (TRL's padded
layout materialises batch x length x vocab floats). Here only scored positions go through the head,
in chunks of tokens, keeping each target's log-prob and log-sum-exp. The softmax the backward pass
needs is kept from the forward pass while it is small (a pair or two: up to 256 MB); beyond that the
backward pass recomputes it chunk by chunk instead of storing it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from smolalign.core.layouts import CHOSEN, PARTS_PER_PAIR, PROMPT, REJECTED, Batch
from smolalign.errors import UserError
from smolalign.models.attention import AttentionMask, model_mask
from smolalign.models.loading import base_model_of

log = logging.getLogger("smolalign")

KEEP_SOFTMAX_ELEMENTS = 2**26  # scored tokens x vocabulary; 256 MB in float32


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] for each row of `hidden`, in float32 (or float64); with
    `square_mass`, also log sum_v p_v^2 of each row's distribution (WPO's normaliser), without a gradient.

    Under autocast the head's matmuls, forward and backward, run in its half precision, as an autocast linear
    layer's would (the weight cast once for both); softmax, log-sum-exp and the sum of the weight gradient over
    chunks stay float32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, keep_softmax, square_mass):
        half = _autocast_dtype(hidden.device.type)
        head = weight.to(half) if half is not None else weight
        dtype = _accumulation_dtype(hidden)
        tokens = hidden.shape[0]
        logprobs = torch.empty(tokens, dtype=dtype, device=hidden.device)
        logsumexp = torch.empty_like(logprobs)
        log_square_mass = torch.empty_like(logprobs) if square_mass else logprobs.new_empty(0)
        keep = keep_softmax and tokens * weight.shape[0] <= KEEP_SOFTMAX_ELEMENTS
        softmax = torch.empty(tokens, weight.shape[0], dtype=dtype, device=hidden.device) if keep else None
        for start in range(0, tokens, chunk_size):
            end = start + chunk_size
            logits = chunk_logits(hidden[start:end], head, bias)
            logsumexp[start:end] = logits.logsumexp(dim=-1)
            logprobs[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - logsumexp[start:end]
            if square_mass:  # log sum p^2 = logsumexp(2 z) - 2 logsumexp(z)
                log_square_mass[start:end] = (2 * logits).logsumexp(dim=-1) - 2 * logsumexp[start:end]
            if keep:
                torch.exp(logits.sub_(logsumexp[start:end, None]), out=softmax[start:end])
        ctx.save_for_backward(hidden, head, bias, targets, logsumexp)
        ctx.softmax = softmax
        ctx.chunk_size = chunk_size
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(log_square_mass)
        return logprobs, log_square_mass

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_square_mass):
        hidden, head, bias, targets, logsumexp = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        dtype = _accumulation_dtype(hidden)
        grad_weight = grad_bias = None
        tokens = hidden.shape[0]
        # One block with the kept softmax, or chunks whose softmax is recomputed from the logits.
        blocks = [(0, tokens, ctx.softmax)] if ctx.softmax is not None else [
            (start, start + ctx.chunk_size, None) for start in range(0, tokens, ctx.chunk_size)
        ]
        ctx.softmax = None
        for start, end, softmax in blocks:
            chunk = hidden[start:end]
            if softmax is None:
                softmax = (chunk_logits(chunk, head, bias) - logsumexp[start:end, None]).exp_()
            grad = grad_logprobs[start:end, None]
            grad_logits = softmax.mul_(-grad)  # d logp / d logits = onehot(target) - softmax(logits)
            grad_logits.scatter_add_(1, targets[start:end, None], grad)
            if need_bias:
                grad_bias = grad_logits.sum(0) if grad_bias is None else grad_bias.add_(grad_logits.sum(0))
            grad_logits = grad_logits.to(head.dtype)
            if need_hidden:
                grad_hidden[start:end] = (grad_logits @ head).to(hidden.dtype)
            if need_weight:  # the first block's product starts the float32 sum: no vocabulary-sized zero fill
                product = grad_logits.t() @ chunk.to(head.dtype)
                grad_weight = product.to(dtype) if grad_weight is None else grad_weight.add_(product)
        return (
            grad_hidden,
            grad_weight.to(ctx.weight_dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
            None,
            None,
            None,
            None,
        )


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on `device_type` now, or None when it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _accumulation_dtype(hidden: torch.Tensor) -> torch.dtype:
    """float32 for half-precision and float32 models; float64 stays float64 (gradient checks)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Logits of a few positions, with the matmul in the weight's dtype, in float32 (float64 for float64 models)."""
    dtype = _accumulation_dtype(hidden)
    logits = (hidden.to(weight.dtype) @ weight.t()).to(dtype)
    return logits if bias is None else logits + bias.to(dtype)


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk_size: int,
    *, square_mass: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 log-prob of `targets[i]` after `hidden[i]` ([tokens, hidden] -> [tokens]), and with `square_mass`
    log sum_v p_v^2 of each position's distribution ([tokens], no gradient; else an empty tensor)."""
    # The softmax is kept for the backward pass only when there will be one (not for reference or eval passes).
    keep_softmax = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedTokenLogprobs.apply(hidden, weight, bias, targets, chunk_size, keep_softmax, square_mass)


class SequenceScorer(nn.Module):
    """A causal LM that returns log-probs of a batch's scored tokens instead of logits.

    Wrapping the model (rather than calling its parts from the loop) keeps Accelerate's DDP/FSDP
    wrappers in the forward path. Only the backbone runs over every token; the output head sees the
    scored positions only.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024, *, square_mass: bool = False):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.square_mass = square_mass  # also return log sum p^2 at each scored position (WPO)
        config = base_model_of(model).config
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
            raise UserError(f"{type(base_model_of(model)).__name__} scales or soft-caps its logits, which "
                            "smolalign's log-prob computation does not support yet; choose another model.")

    def hidden_at(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: AttentionMask,
        score_positions: torch.Tensor,
    ) -> torch.Tensor:
        """Final hidden states at the scored positions ([scored tokens, hidden])."""
        causal_lm = base_model_of(self.model)
        backbone = getattr(causal_lm, causal_lm.base_model_prefix)
        mask = model_mask(attention_mask, causal_lm.config._attn_implementation, self.head.weight.dtype)
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False
                          ).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, score_positions)

    @property
    def head(self) -> nn.Module:
        return base_model_of(self.model).get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: AttentionMask,
        score_positions: torch.Tensor,
        score_targets: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the scored tokens, and log sum p^2 at their positions (empty unless `square_mass`)."""
        scored = self.hidden_at(input_ids, position_ids, attention_mask, score_positions)
        return token_logprobs(scored, self.head.weight, self.head.bias, score_targets, self.chunk_size,
                              square_mass=self.square_mass)


class RewardScorer(SequenceScorer):
    """A sequence-classification reward model: the score head's value at each scored position, which the
    batch puts on the last (non-padding) token of each answer, where transformers reads a sequence's score."""

    @property
    def head(self) -> nn.Module:
        return base_model_of(self.model).score

    def forward(self, input_ids, position_ids, attention_mask, score_positions, score_targets
                ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.hidden_at(input_ids, position_ids, attention_mask, score_positions)
        rewards = self.head(hidden).squeeze(-1).float()
        return rewards, rewards.new_empty(0)


@dataclass
class PairLogps:
    """Per-pair sums of token log-probs and token counts, each a [pairs] float32 tensor. For a reward model
    the sums are the rewards of the chosen and rejected sequences (one scored position each).

    `chosen_shared` / `rejected_shared` sum the answer tokens within the length both answers have (LD-DPO);
    `chosen_wpo` / `rejected_wpo` sum log p - log sum p^2 over the answer tokens (WPO), when the scorer measures
    it; `labels` are the thumbs up or down of unpaired rows (KTO). Absent values are None."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    prompt: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    prompt_tokens: torch.Tensor
    chosen_shared: torch.Tensor | None = None
    rejected_shared: torch.Tensor | None = None
    chosen_wpo: torch.Tensor | None = None
    rejected_wpo: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    @property
    def chosen_mean(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)

    def _map(self, function) -> PairLogps:
        return PairLogps(**{name: None if value is None else function(value) for name, value in vars(self).items()})

    def detach(self) -> PairLogps:
        return self._map(torch.Tensor.detach)

    def cpu(self) -> PairLogps:
        return self._map(torch.Tensor.cpu)

    def take(self, rows: list[int]) -> PairLogps:
        """The values of the pairs at `rows`, in that order."""
        index = torch.tensor(rows, dtype=torch.long, device=self.chosen.device)
        return self._map(lambda value: value[index])


def concat_pair_logps(parts: list[PairLogps]) -> PairLogps:
    """The per-pair values of consecutive chunks of a batch, as one PairLogps."""
    names = vars(parts[0])
    return PairLogps(**{name: None if any(getattr(p, name) is None for p in parts) else
                        torch.cat([getattr(p, name) for p in parts]) for name in names})


def sum_by_pair(token_logps: torch.Tensor, batch: Batch, log_square_mass: torch.Tensor | None = None) -> PairLogps:
    """Add each scored token's log-prob to its pair and part (chosen / rejected / prompt), also over the shared
    length and, given `log_square_mass`, WPO's log p - log sum p^2."""
    slots = batch.num_pairs * PARTS_PER_PAIR
    owners = batch.score_owners

    def by_part(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(slots).index_add(0, owners, values).view(-1, PARTS_PER_PAIR)

    sums, counts = by_part(token_logps), by_part(torch.ones_like(token_logps))
    shared = by_part(token_logps * batch.score_shared)
    wpo = by_part((token_logps - log_square_mass).detach()) if log_square_mass is not None else None
    return PairLogps(
        chosen=sums[:, CHOSEN],
        rejected=sums[:, REJECTED],
        prompt=sums[:, PROMPT],
        chosen_tokens=counts[:, CHOSEN],
        rejected_tokens=counts[:, REJECTED],
        prompt_tokens=counts[:, PROMPT],
        chosen_shared=shared[:, CHOSEN],
        rejected_shared=shared[:, REJECTED],
        chosen_wpo=wpo[:, CHOSEN] if wpo is not None else None,
        rejected_wpo=wpo[:, REJECTED] if wpo is not None else None,
        labels=batch.labels,
    )


def score_batch(scorer: nn.Module, batch: Batch) -> PairLogps:
    """Run `scorer` (a SequenceScorer, possibly wrapped by Accelerate) on a batch, summed per pair."""
    token_logps, log_square_mass = scorer(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask,
        score_positions=batch.score_positions,
        score_targets=batch.score_targets,
    )
    return sum_by_pair(token_logps, batch, log_square_mass if log_square_mass.numel() else None)
