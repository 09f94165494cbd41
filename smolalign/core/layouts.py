"""Batch layouts: how tokenized pairs become rows of model input.

Every layout returns the same `Batch`: input rows, positions, an attention mask, and the list of
scored tokens (which hidden state predicts which target, for which pair and part). The log-prob and
loss code never looks at the layout, so every layout gives the same numbers as `padded`.

- `padded` (TRL's layout): chosen sequences, then rejected sequences, one per row, right-padded to
  the longest; a 2-D padding mask. The prompt is run twice.
- `packed`: the same sequences without padding waste: several per row, positions restarting at each
  sequence, a block-causal 4-D mask so sequences never see each other.
- `prefix_shared`: one block per pair, `prompt | chosen | rejected`: the prompt is run once, rejected
  tokens attend to the prompt and to themselves only, and their positions continue from the prompt.

Packed and prefix-shared rows are filled up to the longest block of the batch, never beyond, so the
attention cost stays per block rather than growing with the square of the whole batch.

The attention mask is kept as per-token ids (`AttentionMask`) and made, on the batch's device and only
when a forward pass asks, into the form the model's attention takes: a 2-D padding mask, a dense 4-D
boolean mask for SDPA (on CPU), or a FlexAttention `BlockMask` (on CUDA, where SDPA with an arbitrary
4-D mask falls back to its slow math kernel and FlexAttention skips the fully masked tiles).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
from torch import nn

from smolalign.data.tokenize import TokenizedPair
from smolalign.models.attention import BLOCK_MASK_IMPLEMENTATIONS, PROMPT_BRANCH, AttentionMask
from smolalign.models.loading import base_model_of

log = logging.getLogger("smolalign")

CHOSEN, REJECTED, PROMPT = 0, 1, 2  # parts of a pair whose log-probs are summed separately
PARTS_PER_PAIR = 3


@dataclass
class Batch:
    """Model input for a list of pairs, plus the tokens to score.

    For two pairs (prompt ids p, answers c and r) in the `prefix_shared` layout, with the first
    pair `p=[1,2] c=[3] r=[4,5]` and the second `p=[6] c=[7,8] r=[9]`, one row per pair:

        input_ids       [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
        position_ids    [[0, 1, 2, 2, 3], [0, 1, 2, 1, 0]]
        attention_mask  block_ids  [[0, 0, 0, 0, 0], [0, 0, 0, 0, -1]]
                        branch_ids [[0, 0, 1, 2, 2], [0, 1, 1, 2, 0]]
                        dense(): [2, 1, 5, 5] bool: token 4 sees 1, 2, 4 (not 3); padding sees only itself
        score_positions [1, 1, 3, 5, 6, 5]            flat index (row * 5 + column) of the predicting token
        score_targets   [3, 4, 5, 7, 8, 9]
        score_owners    [0, 1, 1, 3, 3, 4]            pair * 3 + part (0 chosen, 1 rejected, 2 prompt)
        score_shared    [1, 1, 0, 1, 0, 1]            within the length both answers of the pair have (LD-DPO)

    `num_tokens` counts prompt + answer tokens per sequence as TRL's padded layout feeds them (the
    prompt once per answer), so throughput stays comparable across layouts.
    """

    input_ids: torch.Tensor  # [rows, length]
    position_ids: torch.Tensor  # [rows, length]
    attention_mask: AttentionMask
    score_positions: torch.Tensor  # [scored tokens]
    score_targets: torch.Tensor  # [scored tokens]
    score_owners: torch.Tensor  # [scored tokens]
    score_shared: torch.Tensor  # [scored tokens] bool: an answer token within the pair's shorter answer's length
    num_pairs: int
    num_tokens: int
    labels: torch.Tensor | None = None  # [pairs] bool: the thumbs up or down of unpaired rows (KTO)

    def to(self, device: torch.device | str) -> Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{name: value.to(device) if isinstance(value, (torch.Tensor, AttentionMask)) else value
                        for name, value in values.items()})


@dataclass
class _Block:
    """Tokens that attend only among themselves: one sequence, or one whole pair when prefix-shared."""

    token_ids: list[int]
    positions: list[int]
    branches: list[int]
    scores: list[tuple[int, int, int, bool]]  # (index of the predicting token in the block, target id, owner, shared)


def build_batch(
    pairs: list[TokenizedPair],
    layout: str,
    *,
    pad_token_id: int,
    score_prompt: bool = False,
    score_ends: bool = False,
) -> Batch:
    """Rows for `pairs` in `layout`.

    Scored are the answer tokens (their log-probs), plus with `score_prompt` the prompt tokens (ORPO's
    NLL term); with `score_ends` instead one position per answer: its sequence's last token that is not
    the padding id, where a sequence-classification head reads the reward (as transformers does).
    """
    ends_after = pad_token_id if score_ends else None
    if layout == "prefix_shared":
        blocks = [_pair_block(pair, slot, score_prompt, ends_after) for slot, pair in enumerate(pairs)]
    else:
        blocks = [
            _sequence_block(p, p.chosen_ids, slot, CHOSEN, score_prompt, ends_after) for slot, p in enumerate(pairs)
        ]
        blocks += [
            _sequence_block(p, p.rejected_ids, slot, REJECTED, False, ends_after)
            for slot, p in enumerate(pairs)
            if p.rejected_ids is not None
        ]
    rows = [[block] for block in blocks] if layout == "padded" else _pack(blocks)
    batch = _assemble(rows, pad_token_id, block_causal=layout != "padded", num_pairs=len(pairs),
                      num_tokens=sum(padded_tokens(p) for p in pairs))
    if any(p.label is not None for p in pairs):
        batch.labels = torch.tensor([bool(p.label) for p in pairs])
    return batch


def padded_tokens(pair: TokenizedPair) -> int:
    """Tokens of a pair as TRL's padded layout feeds them (the prompt once per answer): what throughput counts."""
    return len(pair.prompt_ids) * len(pair.answers) + sum(len(a) for a in pair.answers)


def _end_score(tokens: list[int], sequence: list[int], pad_token_id: int, owner: int) -> tuple[int, int, int, bool]:
    """Score the last token of a sequence (its block indices, in order) whose id is not the padding id."""
    real = [i for i in sequence if tokens[i] != pad_token_id]
    return (real[-1] if real else sequence[-1], 0, owner, True)


def shared_length(pair: TokenizedPair) -> int:
    """Answer tokens both answers of a pair have (the shorter answer's length; the one answer's without a rejected)."""
    return min(len(answer) for answer in pair.answers)


def _sequence_block(
    pair: TokenizedPair, answer: list[int], slot: int, part: int, score_prompt: bool, ends_after: int | None
) -> _Block:
    prompt = pair.prompt_ids
    tokens = prompt + answer
    owner = slot * PARTS_PER_PAIR
    if ends_after is not None:
        scores = [_end_score(tokens, list(range(len(tokens))), ends_after, owner + part)]
    else:
        shared = shared_length(pair)
        scores = [(len(prompt) - 1 + k, token, owner + part, k < shared) for k, token in enumerate(answer)]
        if score_prompt:
            scores += [(k - 1, prompt[k], owner + PROMPT, False) for k in range(1, len(prompt))]
    return _Block(tokens, list(range(len(tokens))), [PROMPT_BRANCH] * len(prompt) + [1] * len(answer), scores)


def _pair_block(pair: TokenizedPair, slot: int, score_prompt: bool, ends_after: int | None) -> _Block:
    prompt, chosen, rejected = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids or []
    tokens = prompt + chosen + rejected
    last_prompt = len(prompt) - 1
    after_chosen = len(prompt) + len(chosen)
    owner = slot * PARTS_PER_PAIR
    if ends_after is not None:
        scores = [_end_score(tokens, list(range(after_chosen)), ends_after, owner + CHOSEN)]
        if pair.rejected_ids is not None:
            rejected_sequence = list(range(len(prompt))) + list(range(after_chosen, len(tokens)))
            scores.append(_end_score(tokens, rejected_sequence, ends_after, owner + REJECTED))
    else:
        shared = shared_length(pair)
        scores = [(last_prompt + k, token, owner + CHOSEN, k < shared) for k, token in enumerate(chosen)]
        # The first rejected token is predicted from the prompt's last token, like the first chosen one.
        scores += [
            (last_prompt if k == 0 else after_chosen + k - 1, token, owner + REJECTED, k < shared)
            for k, token in enumerate(rejected)
        ]
        if score_prompt:
            scores += [(k - 1, prompt[k], owner + PROMPT, False) for k in range(1, len(prompt))]
    positions = list(range(after_chosen)) + list(range(len(prompt), len(prompt) + len(rejected)))
    branches = [PROMPT_BRANCH] * len(prompt) + [1] * len(chosen) + [2] * len(rejected)
    return _Block(tokens, positions, branches, scores)


def _pack(blocks: list[_Block]) -> list[list[_Block]]:
    """First-fit decreasing into rows no longer than the longest block."""
    capacity = max(len(b.token_ids) for b in blocks)
    rows: list[list[_Block]] = []
    room: list[int] = []
    for block in sorted(blocks, key=lambda b: len(b.token_ids), reverse=True):
        size = len(block.token_ids)
        target = next((i for i, free in enumerate(room) if free >= size), None)
        if target is None:
            rows.append([block])
            room.append(capacity - size)
        else:
            rows[target].append(block)
            room[target] -= size
    return rows


def _assemble(rows: list[list[_Block]], pad_token_id: int, *, block_causal: bool, num_pairs: int, num_tokens: int) -> Batch:
    length = max(sum(len(b.token_ids) for b in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    block_ids = torch.full(shape, -1, dtype=torch.long)
    branches = torch.zeros(shape, dtype=torch.long)
    score_positions, score_targets, score_owners, score_shared = [], [], [], []
    for r, row in enumerate(rows):
        start = 0
        for b, block in enumerate(row):
            end = start + len(block.token_ids)
            input_ids[r, start:end] = torch.tensor(block.token_ids)
            position_ids[r, start:end] = torch.tensor(block.positions)
            block_ids[r, start:end] = b
            branches[r, start:end] = torch.tensor(block.branches)
            for index, target, owner, shared in block.scores:
                score_positions.append(r * length + start + index)
                score_targets.append(target)
                score_owners.append(owner)
                score_shared.append(shared)
            start = end
    return Batch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=AttentionMask(block_ids, branches, block_causal=block_causal),
        score_positions=torch.tensor(score_positions, dtype=torch.long),
        score_targets=torch.tensor(score_targets, dtype=torch.long),
        score_owners=torch.tensor(score_owners, dtype=torch.long),
        score_shared=torch.tensor(score_shared, dtype=torch.bool),
        num_pairs=num_pairs,
        num_tokens=num_tokens,
    )


def block_tokens(pair: TokenizedPair) -> int:
    """Tokens a pair occupies in the prefix-shared layout (its prompt once)."""
    return len(pair.prompt_ids) + sum(len(answer) for answer in pair.answers)


def split_by_tokens(pairs: list[TokenizedPair], max_tokens: int) -> list[list[TokenizedPair]]:
    """Consecutive chunks of whole pairs with at most `max_tokens` tokens each (a longer pair goes alone)."""
    chunks: list[list[TokenizedPair]] = []
    size = 0
    for pair in pairs:
        tokens = block_tokens(pair)
        if chunks and size + tokens <= max_tokens:
            chunks[-1].append(pair)
            size += tokens
        else:
            chunks.append([pair])
            size = tokens
    return chunks


def supports_block_masks(model: nn.Module) -> bool:
    """Whether the model's attention takes the masks of the packed and prefix-shared layouts."""
    return base_model_of(model).config._attn_implementation in BLOCK_MASK_IMPLEMENTATIONS


def choose_layout(requested: str, model: nn.Module) -> str:
    """The batch layout to use: `auto` is prefix_shared where the attention takes its masks."""
    if supports_block_masks(model):
        return "prefix_shared" if requested == "auto" else requested
    if requested != "padded":
        implementation = base_model_of(model).config._attn_implementation
        log.warning("attention '%s' cannot take the 4-D masks of %s; falling back to the padded layout",
                    implementation, requested)
    return "padded"
