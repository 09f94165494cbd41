"""How far the policy moved from its reference: KL and perplexity on answers, and generated answers.

The KL is exact per token: at every answer position, the sum over the whole vocabulary of
p(v) (log p(v) - log q(v)) for the policy p and the reference q, computed in chunks of positions so
the full logits are never held. Averaged per token and summed per answer. On given answers (the
chosen answers of held-out pairs) it measures drift where the data is; on answers sampled from the
policy it is the per-token estimate of KL(policy || reference) along the policy's own outputs.
"""

from __future__ import annotations

import logging

import torch

from smolalign.core.layouts import CHOSEN, PARTS_PER_PAIR
from smolalign.core.logprobs import chunk_logits, token_logprobs
from smolalign.core.scoring import NoGradScorer, PairScoring
from smolalign.data.tokenize import TokenizedPair

log = logging.getLogger("smolalign")

CHUNK = 256


def token_kl(policy_hidden, policy_head, reference_hidden, reference_head, chunk: int = CHUNK) -> torch.Tensor:
    """KL(policy || reference) of the next-token distributions at each position ([tokens])."""
    parts = []
    for start in range(0, policy_hidden.shape[0], chunk):
        end = start + chunk
        log_p = chunk_logits(policy_hidden[start:end], policy_head.weight, policy_head.bias).log_softmax(-1)
        log_q = chunk_logits(reference_hidden[start:end], reference_head.weight, reference_head.bias).log_softmax(-1)
        parts.append((log_p.exp() * (log_p - log_q)).sum(-1))
    return torch.cat(parts) if parts else policy_hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def answer_statistics(
    policy: NoGradScorer,
    reference: NoGradScorer,
    answers: list[TokenizedPair],
    *,
    name: str,
    scoring: PairScoring,
) -> dict[str, float]:
    """Perplexity of `answers` (their chosen side) under the policy and the reference, and the KL."""
    answers = [TokenizedPair(p.index, p.prompt_ids, p.chosen_ids, None) for p in answers]
    logp_sum = ref_logp_sum = kl_sum = 0.0
    tokens = 0
    kl_per_answer = []
    for chunk, batch in scoring.batches(answers, desc=f"drift on {name} answers"):
        inputs = (batch.input_ids, batch.position_ids, batch.attention_mask, batch.score_positions)
        with policy.context():
            hidden = policy.scorer.hidden_at(*inputs)
        head = policy.scorer.head
        logp_sum += token_logprobs(hidden, head.weight, head.bias, batch.score_targets, CHUNK).sum().item()
        tokens += len(batch.score_targets)
        with reference.context():
            reference_hidden = reference.scorer.hidden_at(*inputs)
            reference_head = reference.scorer.head
            ref_logp_sum += token_logprobs(
                reference_hidden, reference_head.weight, reference_head.bias, batch.score_targets, CHUNK
            ).sum().item()
            kl = token_kl(hidden, head, reference_hidden, reference_head)
        kl_sum += kl.sum().item()
        pair_slot = batch.score_owners // PARTS_PER_PAIR
        assert bool((batch.score_owners % PARTS_PER_PAIR == CHOSEN).all())
        kl_per_answer += kl.new_zeros(len(chunk)).index_add(0, pair_slot, kl).tolist()
    return {
        f"perplexity/{name}": float(torch.tensor(-logp_sum / tokens).exp()),
        f"ref_perplexity/{name}": float(torch.tensor(-ref_logp_sum / tokens).exp()),
        f"kl/{name}_per_token": kl_sum / tokens,
        f"kl/{name}_per_answer": sum(kl_per_answer) / len(kl_per_answer),
    }
