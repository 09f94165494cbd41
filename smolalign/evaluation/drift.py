"""How far the policy moved from its reference: KL and perplexity on answers, and generated answers.

The KL is exact per token: at every answer position, the sum over the whole vocabulary of
p(v) (log p(v) - log q(v)) for the policy p and the reference q, computed in chunks of positions so
the full logits are never held. Averaged per token and summed per answer. On given answers (the
chosen answers of held-out pairs) it measures drift where the data is; on answers sampled from the
policy it is the per-token estimate of KL(policy || reference) along the policy's own outputs.

One pass over the pairs gives both models' log-probs of every answer (what the preference metrics need)
and the drift on the chosen answers: each batch runs through the policy and the reference once. Along
generated answers, the drift comes with the generation itself: the policy's logits are those of its
generation, and the reference reads the policy's answers after the prompt cache of its own generation,
so neither model runs over the prompts again (where generation stacked a prompt cache: batches of more
than one prompt, on models with plain key-value caches).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from smolalign.core.layouts import CHOSEN, PARTS_PER_PAIR
from smolalign.core.logprobs import (
    PairLogps,
    SequenceScorer,
    chunk_logits,
    concat_pair_logps,
    sum_by_pair,
    token_logprobs,
)
from smolalign.core.scoring import PairScoring, ScorerView
from smolalign.data.tokenize import TokenizedPair
from smolalign.evaluation.generation import (
    GENERATION_BATCH_SIZE,
    GenerationLog,
    PreallocatedCache,
    generate_in_batches,
)
from smolalign.models.loading import base_model_of
from smolalign.models.packed import packed_linears

log = logging.getLogger("smolalign")

CHUNK = 256
KEPT_LOGITS_BYTES = 2**30
"""At most this much of the policy's generation logits is kept, for one batch (SmolLM2's 49k vocabulary: 128
new tokens for 42 prompts)."""


def token_kl(policy_hidden, policy_head, reference_hidden, reference_head, chunk: int = CHUNK) -> torch.Tensor:
    """KL(policy || reference) of the next-token distributions at each position ([tokens])."""
    parts = []
    for start in range(0, policy_hidden.shape[0], chunk):
        end = start + chunk
        log_p = chunk_logits(policy_hidden[start:end], policy_head.weight, policy_head.bias).log_softmax(-1)
        log_q = chunk_logits(reference_hidden[start:end], reference_head.weight, reference_head.bias).log_softmax(-1)
        parts.append(kl_of_rows(log_p, log_q))
    return torch.cat(parts) if parts else policy_hidden.new_zeros(0, dtype=torch.float32)


def kl_of_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of each row's distributions, given as log-probs ([rows, vocabulary] -> [rows])."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_chunk_size(policy: ScorerView, reference: ScorerView) -> int:
    """The run's head chunk, at most CHUNK positions: the KL holds both models' full-vocabulary rows of a chunk."""
    return min(policy.scorer.chunk_size, reference.scorer.chunk_size, CHUNK)


def drift_statistics(name: str, *, logps: float, reference_logps: float, kl_per_answer: torch.Tensor,
                     tokens: int) -> dict[str, float]:
    """Perplexities and KL of answers from the sums of their tokens' log-probs and each answer's KL."""
    return {
        f"perplexity/{name}": math.exp(-logps / tokens),
        f"ref_perplexity/{name}": math.exp(-reference_logps / tokens),
        f"kl/{name}_per_token": kl_per_answer.sum().item() / tokens,
        f"kl/{name}_per_answer": kl_per_answer.mean().item(),
    }


@dataclass
class DriftScores:
    """Both models' log-probs of every pair's answers, and the drift statistics of the chosen answers."""

    policy: PairLogps
    reference: PairLogps
    statistics: dict[str, float]


@torch.no_grad()
def score_with_drift(
    policy: ScorerView,
    reference: ScorerView,
    pairs: list[TokenizedPair],
    *,
    name: str,
    scoring: PairScoring,
) -> DriftScores:
    """Log-probs of the answers of `pairs` under the policy and the reference, and on their chosen answers
    the perplexity under each and the KL (as `perplexity/<name>`, `ref_perplexity/<name>`, `kl/<name>_...`)."""
    chunk_size = kl_chunk_size(policy, reference)
    policy_parts, reference_parts, kl_parts = [], [], []
    desc = f"scoring policy and reference, drift on {name} answers"
    for chunk, batch in scoring.batches(scoring.chunks(pairs), desc=desc):
        inputs = (batch.input_ids, batch.position_ids, batch.attention_mask, batch.score_positions)
        with policy.context():
            hidden = policy.scorer.hidden_at(*inputs)
            head = policy.scorer.head
            token_logps, _ = token_logprobs(hidden, head.weight, head.bias, batch.score_targets, chunk_size)
        with reference.context():
            reference_hidden = reference.scorer.hidden_at(*inputs)
            reference_head = reference.scorer.head
            reference_token_logps, _ = token_logprobs(reference_hidden, reference_head.weight, reference_head.bias,
                                                   batch.score_targets, chunk_size)
            chosen = batch.score_owners % PARTS_PER_PAIR == CHOSEN
            kl = token_kl(hidden[chosen], head, reference_hidden[chosen], reference_head, chunk_size)
        policy_parts.append(sum_by_pair(token_logps, batch))
        reference_parts.append(sum_by_pair(reference_token_logps, batch))
        pair_slot = batch.score_owners[chosen] // PARTS_PER_PAIR
        kl_parts.append(kl.new_zeros(len(chunk)).index_add(0, pair_slot, kl))
    policy_logps, reference_logps = concat_pair_logps(policy_parts).cpu(), concat_pair_logps(reference_parts).cpu()
    return DriftScores(policy_logps, reference_logps, drift_statistics(
        name, logps=policy_logps.chosen.sum().item(), reference_logps=reference_logps.chosen.sum().item(),
        kl_per_answer=torch.cat(kl_parts).cpu(), tokens=policy_logps.chosen_tokens.sum().item()))


@dataclass
class GeneratedDrift:
    """Both models' answers to each prompt, and the drift along the policy's answers."""

    policy_answers: list[list[int]]
    reference_answers: list[list[int]]
    statistics: dict[str, float]


@torch.no_grad()
def generate_with_drift(
    policy: ScorerView,
    reference: ScorerView,
    prompts: list[list[int]],
    *,
    pad_token_id: int,
    device: torch.device,
    **options,
) -> GeneratedDrift:
    """The policy's and the reference's answers to `prompts` (`generate_in_batches` with its `options`), and
    along the policy's answers the perplexity under each model and the KL (`perplexity/generated`, ...).

    Batch by batch: the policy generates, keeping its raw logits at every step (its distribution at every
    answer position); the reference generates its own answers, then reads the policy's answers after the
    prompt cache that generation built. So the prompts, most of the tokens, run through each model once.
    The kept logits (answer steps x rows x vocabulary floats) are held for one batch at a time, and a batch
    has fewer prompts where they would exceed KEPT_LOGITS_BYTES."""
    chunk_size = kl_chunk_size(policy, reference)
    options["batch_size"] = batch_size_for_kept_logits(policy.scorer.head.weight.shape[0], options["max_new_tokens"],
                                                       options.get("batch_size", GENERATION_BATCH_SIZE))
    policy_answers: list[list[int]] = [[] for _ in prompts]
    reference_answers: list[list[int]] = [[] for _ in prompts]
    logps = reference_logps = drift_seconds = 0.0
    kl_per_answer: list[float] = []
    logs = GenerationLog("generating (policy)"), GenerationLog("generating (reference)")
    options.update(pad_token_id=pad_token_id, device=device)
    both = zip(generate_in_batches(policy.scorer.model, prompts, context=policy.context, keep_logits=True, **options),
               generate_in_batches(reference.scorer.model, prompts, context=reference.context, keep_prompt_cache=True,
                                   **options), strict=True)
    with (packed_linears(policy.scorer.model), packed_linears(reference.scorer.model),
          tqdm(total=len(prompts), desc="generating (policy and reference), drift on generated answers",
               unit="prompt") as bar):
        for policy_batch, reference_batch in both:
            started = time.perf_counter()
            assert policy_batch.rows == reference_batch.rows, "both models answer the same prompts in each batch"
            batch_prompts = [prompts[row] for row in policy_batch.rows]
            with reference.context():
                hidden = answer_hidden_states(reference.scorer, batch_prompts, policy_batch.answers,
                                              reference_batch.prompt_cache, pad_token_id=pad_token_id, device=device)
                for row, answer, logits, answer_hidden in zip(policy_batch.rows, policy_batch.answers,
                                                              policy_batch.logits, hidden, strict=True):
                    answer_kl, answer_logp, answer_reference_logp = drift_along_answer(
                        answer, logits, answer_hidden[:len(answer)], reference.scorer.head, chunk_size)
                    kl_per_answer.append(answer_kl)
                    logps += answer_logp
                    reference_logps += answer_reference_logp
                    policy_answers[row] = answer
            for row, answer in zip(reference_batch.rows, reference_batch.answers, strict=True):
                reference_answers[row] = answer
            drift_seconds += time.perf_counter() - started
            for generation_log, batch in zip(logs, (policy_batch, reference_batch), strict=True):
                generation_log.add(batch)
            bar.update(len(policy_batch.rows))
            del policy_batch, reference_batch, hidden  # not held while the next batch is generated
    for generation_log in logs:
        generation_log.report()
    log.info("drift along the policy's answers: %.1f s", drift_seconds)
    return GeneratedDrift(policy_answers, reference_answers, drift_statistics(
        "generated", logps=logps, reference_logps=reference_logps, kl_per_answer=torch.tensor(kl_per_answer),
        tokens=sum(map(len, policy_answers))))


def batch_size_for_kept_logits(vocabulary: int, max_new_tokens: int, batch_size: int) -> int:
    """`batch_size`, or fewer prompts where a batch's kept logits would take more than KEPT_LOGITS_BYTES."""
    fitting = max(1, KEPT_LOGITS_BYTES // (max_new_tokens * vocabulary * 4))
    if fitting < batch_size:
        log.info("generating %d prompts at a time, not %d: the policy's logits kept for the KL (%d new tokens x "
                 "%d-token vocabulary) would exceed %.0f GB", fitting, batch_size, max_new_tokens, vocabulary,
                 KEPT_LOGITS_BYTES / 1e9)
    return min(batch_size, fitting)


def drift_along_answer(answer: list[int], policy_logits: list[torch.Tensor], reference_hidden: torch.Tensor,
                       reference_head: torch.nn.Module, chunk_size: int) -> tuple[float, float, float]:
    """The KL summed over the answer's tokens, and the answer's log-prob under the policy and the reference,
    from the policy's logits at each step and the reference's final hidden states there."""
    targets = torch.tensor(answer, device=reference_hidden.device)
    kl = logp = reference_logp = 0.0
    for start in range(0, len(answer), chunk_size):
        end = start + chunk_size
        log_p = torch.stack(policy_logits[start:end]).log_softmax(-1)
        log_q = chunk_logits(reference_hidden[start:end], reference_head.weight, reference_head.bias).log_softmax(-1)
        kl += kl_of_rows(log_p, log_q).sum().item()
        logp += log_p.gather(-1, targets[start:end, None]).sum().item()
        reference_logp += log_q.gather(-1, targets[start:end, None]).sum().item()
    return kl, logp, reference_logp


def answer_hidden_states(
    scorer: SequenceScorer,
    prompts: list[list[int]],
    answers: list[list[int]],
    prompt_cache: PreallocatedCache | None,
    *,
    pad_token_id: int,
    device: torch.device,
) -> torch.Tensor:
    """The model's final hidden states where it predicts each answer token after its prompt ([rows, longest
    answer, hidden], right-padded). Its inputs are each prompt's last token and the answer but its last token,
    after `prompt_cache`: each prompt but its last token, left-padded to the longest (as generation stacked
    it); without a cache, after those left-padded prompts themselves."""
    width = max(map(len, prompts)) - 1
    longest = max(map(len, answers))
    input_ids, attention_mask = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        padding, tail = width - (len(prompt) - 1), longest - len(answer)
        prefix = [] if prompt_cache is not None else [pad_token_id] * padding + prompt[:-1]
        input_ids.append(prefix + [prompt[-1]] + answer[:-1] + [pad_token_id] * tail)
        attention_mask.append([0] * padding + [1] * (len(prompt) + len(answer) - 1) + [0] * tail)
    input_ids = torch.tensor(input_ids, device=device)
    attention_mask = torch.tensor(attention_mask, device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
    causal_lm = base_model_of(scorer.model)
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=prompt_cache, use_cache=prompt_cache is not None).last_hidden_state
    return hidden[:, -longest:]
