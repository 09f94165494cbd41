"""Preference pairs -> token ids, with TRL DPOTrainer's convention for every algorithm.

- conversational: prompt ids = chat template of the prompt with the generation prompt; answer ids =
  chat template of prompt + answer with the prompt ids sliced off (where the two renderings diverge,
  the answer starts at the divergence, as in TRL);
- strings: the EOS token is appended to an answer that does not end with it; prompt and
  prompt + answer are tokenized with the tokenizer's own special tokens.

Truncation then fits each pair into `max_length`: the prompt is cut from the left first (so the
latest turns stay), answers are cut from the right only when the prompt is already down to its
budget, an answer is never left empty, and a pair that cannot fit is dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from smolalign.data.formats import PreferencePair
from smolalign.errors import UserError


@dataclass
class TokenizedPair:
    index: int  # row number in the source dataset
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] | None  # None for SFT and unpaired rows, which have one answer
    truncated: bool = False
    label: bool | None = None  # an unpaired row's thumbs up (True) or down (False)

    @property
    def answers(self) -> list[list[int]]:
        return [self.chosen_ids] if self.rejected_ids is None else [self.chosen_ids, self.rejected_ids]

    @property
    def longest_sequence(self) -> int:
        return len(self.prompt_ids) + max(len(a) for a in self.answers)


def tokenize_pairs(pairs: list[PreferencePair], tokenizer: PreTrainedTokenizerBase) -> list[TokenizedPair]:
    """Token ids of every pair, untruncated. Renders all texts first and tokenizes them in one batch."""
    if any(p.is_conversational for p in pairs) and not tokenizer.chat_template:
        raise UserError(
            "the data is conversational but the tokenizer has no chat template; set 'chat_template: chatml' "
            "to give the model ChatML, or use a chat model."
        )
    prompts, with_chosen, with_rejected = [], [], []
    for pair in pairs:
        if pair.is_conversational:
            render = _renderer(tokenizer)
            prompts.append(render(pair.prompt, add_generation_prompt=True))
            with_chosen.append(render(pair.prompt + pair.chosen))
            with_rejected.append(render(pair.prompt + pair.rejected) if pair.rejected is not None else None)
        else:
            prompts.append(pair.prompt)
            with_chosen.append(pair.prompt + _with_eos(pair.chosen, tokenizer.eos_token))
            with_rejected.append(
                pair.prompt + _with_eos(pair.rejected, tokenizer.eos_token) if pair.rejected is not None else None
            )
    special = not pairs[0].is_conversational if pairs else True  # the chat template already holds them
    prompt_ids = _encode(tokenizer, prompts, special)
    chosen_full = _encode(tokenizer, with_chosen, special)
    rejected_full = _encode(tokenizer, [t for t in with_rejected if t is not None], special)
    rejected_iter = iter(rejected_full)

    tokenized = []
    for pair, prompt, chosen in zip(pairs, prompt_ids, chosen_full, strict=True):
        rejected = next(rejected_iter) if pair.rejected is not None else None
        prompt_len = _common_prefix(prompt, chosen)
        if rejected is not None:
            prompt_len = min(prompt_len, _common_prefix(prompt, rejected))
        tokenized.append(
            TokenizedPair(
                index=pair.index,
                prompt_ids=prompt[:prompt_len],
                chosen_ids=chosen[prompt_len:],
                rejected_ids=rejected[prompt_len:] if rejected is not None else None,
                label=pair.label,
            )
        )
    return tokenized


def fit_to_length(pair: TokenizedPair, *, max_length: int, max_prompt_length: int | None) -> TokenizedPair | None:
    """Truncate a pair to `max_length` tokens per sequence; None when it cannot fit.

    The prompt keeps its last `max_prompt_length` tokens (default: half of max_length) when it must
    be shortened; it is cut only as far as needed for the longest answer to fit. Answers are then cut
    from the right to what is left, and a pair whose prompt is empty or leaves no room is dropped.
    """
    prompt = pair.prompt_ids
    if not prompt or not all(pair.answers):
        return None
    truncated = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, truncated = prompt[-max_prompt_length:], True
    longest_answer = max(len(a) for a in pair.answers)
    if len(prompt) + longest_answer > max_length:
        prompt_budget = max_prompt_length if max_prompt_length is not None else max_length // 2
        keep = max(max_length - longest_answer, min(len(prompt), prompt_budget))
        if keep < len(prompt):
            prompt, truncated = prompt[-keep:], True
    room = max_length - len(prompt)
    if room < 1:
        return None
    answers = [a[:room] for a in pair.answers]
    truncated = truncated or any(len(a) > room for a in pair.answers)
    return dataclasses.replace(pair, prompt_ids=prompt, chosen_ids=answers[0],
                               rejected_ids=answers[1] if pair.rejected_ids is not None else None, truncated=truncated)


def _renderer(tokenizer: PreTrainedTokenizerBase):
    def render(messages, add_generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render


def _with_eos(text: str, eos_token: str | None) -> str:
    return text if eos_token is None or text.endswith(eos_token) else text + eos_token


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def _common_prefix(ids: list[int], other: list[int]) -> int:
    length = 0
    for a, b in zip(ids, other, strict=False):
        if a != b:
            break
        length += 1
    return length
