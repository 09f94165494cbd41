"""How far the policy moved from its reference: KL and perplexity on answers, and generated answers.

The KL is exact per token: at every answer position, the sum over the whole vocabulary of
p(v) (log p(v) - log q(v)) for the policy p and the reference q, computed in chunks of positions so
the full logits are never held. Averaged per token and summed per answer. On given answers (the
chosen answers of held-out pairs) it measures drift where the data is; on answers sampled from the
policy it is the per-token estimate of KL(policy || reference) along the policy's own outputs.

One pass over the pairs gives both models' log-probs of every answer (what the preference metrics need)
and the drift on the chosen answers: each batch runs through the policy and the reference once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from smolalign.core.layouts import CHOSEN, PARTS_PER_PAIR
from smolalign.core.logprobs import PairLogps, chunk_logits, concat_pair_logps, sum_by_pair, token_logprobs
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


@dataclass
class DriftScores:
    """Both models' log-probs of every pair's answers, and the drift statistics of the chosen answers."""

    policy: PairLogps
    reference: PairLogps
    statistics: dict[str, float]


@torch.no_grad()
def score_with_drift(
    policy: NoGradScorer,
    reference: NoGradScorer,
    pairs: list[TokenizedPair],
    *,
    name: str,
    scoring: PairScoring,
) -> DriftScores:
    """Log-probs of the answers of `pairs` under the policy and the reference, and on their chosen answers
    the perplexity under each and the KL (as `perplexity/<name>`, `ref_perplexity/<name>`, `kl/<name>_...`)."""
    # The run's head chunk, at most CHUNK positions: the KL holds both models' full-vocabulary rows of a chunk.
    chunk_size = min(policy.scorer.chunk_size, reference.scorer.chunk_size, CHUNK)
    policy_parts, reference_parts, kl_parts = [], [], []
    for chunk, batch in scoring.batches(pairs, desc=f"scoring policy and reference, drift on {name} answers"):
        inputs = (batch.input_ids, batch.position_ids, batch.attention_mask, batch.score_positions)
        with policy.context():
            hidden = policy.scorer.hidden_at(*inputs)
            head = policy.scorer.head
            token_logps = token_logprobs(hidden, head.weight, head.bias, batch.score_targets, chunk_size)
        with reference.context():
            reference_hidden = reference.scorer.hidden_at(*inputs)
            reference_head = reference.scorer.head
            reference_token_logps = token_logprobs(reference_hidden, reference_head.weight, reference_head.bias,
                                                   batch.score_targets, chunk_size)
            chosen = batch.score_owners % PARTS_PER_PAIR == CHOSEN
            kl = token_kl(hidden[chosen], head, reference_hidden[chosen], reference_head, chunk_size)
        policy_parts.append(sum_by_pair(token_logps, batch))
        reference_parts.append(sum_by_pair(reference_token_logps, batch))
        pair_slot = batch.score_owners[chosen] // PARTS_PER_PAIR
        kl_parts.append(kl.new_zeros(len(chunk)).index_add(0, pair_slot, kl))
    policy_logps, reference_logps = concat_pair_logps(policy_parts).cpu(), concat_pair_logps(reference_parts).cpu()
    tokens = policy_logps.chosen_tokens.sum().item()
    kl_per_answer = torch.cat(kl_parts).cpu()
    return DriftScores(policy_logps, reference_logps, {
        f"perplexity/{name}": math.exp(-policy_logps.chosen.sum().item() / tokens),
        f"ref_perplexity/{name}": math.exp(-reference_logps.chosen.sum().item() / tokens),
        f"kl/{name}_per_token": kl_per_answer.sum().item() / tokens,
        f"kl/{name}_per_answer": kl_per_answer.mean().item(),
    })
