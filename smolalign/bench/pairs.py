"""The pairs a benchmark trains on, as every framework reads them.

Without `fill`, the dataset's first pairs. With `fill`, each of them is made nearly `max_length` tokens long:
earlier conversations of the dataset (prompt and chosen answer) go before its prompt, as long as the whole
pair still fits. That gives long multi-turn prompts of real text, so the cost of long sequences can be
measured: the bundled HH-RLHF pairs are mostly under 512 tokens, and a max_length above a pair's length
changes nothing. No framework then truncates anything, so all of them train on the same tokens.
"""

from __future__ import annotations

import dataclasses

from transformers import PreTrainedTokenizerBase

from smolalign.data.formats import PreferencePair
from smolalign.data.prepare import ReadResult, read_pairs
from smolalign.data.tokenize import tokenize_pairs
from smolalign.errors import UserError


def bench_pairs(dataset: str, tokenizer: PreTrainedTokenizerBase, *, count: int, max_length: int,
                fill: bool) -> ReadResult:
    """The first `count` usable pairs of `dataset`, each filled to about `max_length` tokens when `fill`."""
    read = read_pairs(dataset, limit=None if fill else count)
    if len(read.pairs) < count:
        raise UserError(f"'{dataset}' has {len(read.pairs)} usable pairs; the benchmark needs {count}.")
    if not fill:
        return read
    pool = read.pairs[count:] or read.pairs  # the conversations put before the prompts
    filled = [fill_to_length(pair, pool, tokenizer, max_length, start=i * 7) for i, pair in
              enumerate(read.pairs[:count])]
    return dataclasses.replace(read, pairs=filled)


def fill_to_length(pair: PreferencePair, pool: list[PreferencePair], tokenizer: PreTrainedTokenizerBase,
                   max_length: int, *, start: int = 0) -> PreferencePair:
    """`pair` with conversations from `pool` (from index `start` on, in turn) put before its prompt, as many
    as keep prompt + longer answer within `max_length` tokens."""
    filled = pair
    for offset in range(len(pool)):
        earlier = pool[(start + offset) % len(pool)]
        if earlier.index == pair.index or earlier.is_conversational != pair.is_conversational:
            continue
        longer = dataclasses.replace(filled, prompt=_before(earlier, filled.prompt))
        if _length(longer, tokenizer) > max_length:
            break
        filled = longer
    return filled


def _before(earlier: PreferencePair, prompt):
    """`prompt` preceded by the earlier conversation (after a leading system message, which stays first)."""
    if not earlier.is_conversational:
        return earlier.prompt + earlier.chosen + prompt
    turns = [m for m in earlier.prompt + earlier.chosen if m["role"] != "system"]
    system = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    return system + turns + prompt[len(system):]


def _length(pair: PreferencePair, tokenizer: PreTrainedTokenizerBase) -> int:
    (tokenized,) = tokenize_pairs([pair], tokenizer)
    answers = [tokenized.chosen_ids] + ([tokenized.rejected_ids] if tokenized.rejected_ids is not None else [])
    return len(tokenized.prompt_ids) + max(len(answer) for answer in answers)
