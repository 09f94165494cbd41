"""Rows -> preference pairs: detect the dataset format and normalise every row to one shape.

Recognised without configuration (the first row decides, every row is checked):

- `prompt_completion_strings`: `prompt`, `chosen`, `rejected` strings;
- `implicit_prompt_strings`: `chosen` / `rejected` strings without a `prompt`: the prompt is their
  common beginning (as TRL's `extract_prompt` reads them);
- `conversational`: `chosen` / `rejected` lists of `{"role", "content"}` messages, with the prompt as
  an explicit `prompt` column (messages or a string) or implicit as their common leading messages;
- `hh_rlhf`: `chosen` / `rejected` transcripts `"\\n\\nHuman: … \\n\\nAssistant: …"` (Anthropic HH-RLHF);
- `messages`: one `messages` conversation per row (SFT data): the last assistant turn is the answer.

An optional `system` column becomes a system message. A row that cannot be used is reported with its
index and the reason, and left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]
Text = str | list[Message]

HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
FORMAT_DESCRIPTIONS = {
    "prompt_completion_strings": "prompt / chosen / rejected strings",
    "implicit_prompt_strings": "chosen / rejected strings, prompt implicit (common beginning)",
    "conversational_explicit_prompt": "conversational messages with an explicit prompt",
    "conversational_implicit_prompt": "conversational messages, prompt implicit (common leading turns)",
    "hh_rlhf": "HH-RLHF transcripts (\\n\\nHuman: … \\n\\nAssistant: …)",
    "messages": "messages conversations (SFT: last assistant turn is the answer)",
}


@dataclass
class PreferencePair:
    """One usable row. Conversational pairs hold message lists, string pairs hold text."""

    index: int
    prompt: Text
    chosen: Text
    rejected: Text | None  # None for SFT rows from a `messages` dataset

    @property
    def is_conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class RowProblem:
    index: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.index}: {self.reason}"


class UnusableRow(Exception):
    pass


def detect_format(columns: list[str], first_row: dict[str, Any]) -> str | None:
    """Name of the format of a dataset, from its columns and first row; None if unrecognised."""
    if "chosen" in columns and "rejected" in columns:
        chosen = first_row.get("chosen")
        if _is_messages(chosen):
            return "conversational_explicit_prompt" if "prompt" in columns else "conversational_implicit_prompt"
        if isinstance(chosen, str):
            if "prompt" in columns:
                return "conversational_explicit_prompt" if _is_messages(first_row.get("prompt")) else (
                    "prompt_completion_strings"
                )
            if HH_TURN.match(chosen) or chosen.lstrip().startswith("Human:"):
                return "hh_rlhf"
            return "implicit_prompt_strings"
        return None
    if "messages" in columns and _is_messages(first_row.get("messages")):
        return "messages"
    return None


def missing_columns_message(source: str, columns: list[str]) -> str:
    return (
        f"dataset '{source}' has columns {columns}; smolalign needs 'chosen' and 'rejected' (with an optional "
        "'prompt' and 'system'), or a 'messages' conversation column."
    )


def to_pair(row: dict[str, Any], index: int, data_format: str, *, system_prompt: str | None = None) -> PreferencePair:
    """Normalise one row; raises UnusableRow with the reason when it cannot be used."""
    if data_format == "messages":
        messages = _messages(row.get("messages"), "messages")
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise UnusableRow("'messages' must end with an assistant turn that follows at least one other turn")
        prompt, chosen, rejected = messages[:-1], [messages[-1]], None
    elif data_format in ("prompt_completion_strings", "implicit_prompt_strings"):
        if data_format == "implicit_prompt_strings":
            prompt, chosen, rejected = _split_common_text(
                _string(row.get("chosen"), "chosen"), _string(row.get("rejected"), "rejected")
            )
        else:
            prompt = _string(row.get("prompt"), "prompt")
            chosen = _string(row.get("chosen"), "chosen")
            rejected = _string(row.get("rejected"), "rejected")
        if row.get("system"):
            raise UnusableRow("a 'system' column needs conversational data (messages), not plain strings")
        if chosen == rejected:
            raise UnusableRow("chosen and rejected answers are identical")
        return PreferencePair(index, prompt, chosen, rejected)
    elif data_format == "hh_rlhf":
        prompt, chosen, rejected = _split_common_prefix(
            _parse_hh(_string(row.get("chosen"), "chosen")), _parse_hh(_string(row.get("rejected"), "rejected"))
        )
    elif data_format == "conversational_implicit_prompt":
        prompt, chosen, rejected = _split_common_prefix(
            _messages(row.get("chosen"), "chosen"), _messages(row.get("rejected"), "rejected")
        )
    elif data_format == "conversational_explicit_prompt":
        raw_prompt = row.get("prompt")
        prompt = (
            [{"role": "user", "content": raw_prompt}] if isinstance(raw_prompt, str) else _messages(raw_prompt, "prompt")
        )
        chosen = _answer_messages(row.get("chosen"), prompt, "chosen")
        rejected = _answer_messages(row.get("rejected"), prompt, "rejected")
    else:
        raise ValueError(f"unknown data format {data_format}")

    system = row.get("system") or system_prompt
    if system and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": str(system)}, *prompt]
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if answer is not None and not any(m["content"].strip() for m in answer):
            raise UnusableRow(f"empty {name} answer")
    if chosen == rejected:
        raise UnusableRow("chosen and rejected answers are identical")
    if not prompt:
        raise UnusableRow("empty prompt")
    return PreferencePair(index, prompt, chosen, rejected)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value
    )


def _string(value: Any, name: str) -> str:
    if value is None:
        raise UnusableRow(f"missing '{name}'")
    if not isinstance(value, str):
        raise UnusableRow(f"'{name}' must be a string, not {type(value).__name__}")
    if not value.strip():
        # An empty prompt leaves nothing to predict the answer's first token from.
        raise UnusableRow(f"empty {name} answer" if name in ("chosen", "rejected") else f"empty '{name}'")
    return value


def _split_common_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Prompt = the common beginning; a space right before the split goes to the answers."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if chosen == rejected:
        raise UnusableRow("chosen and rejected answers are identical")
    if shared > 0 and chosen[shared - 1] == " ":
        shared -= 1
    if shared == 0:
        raise UnusableRow("chosen and rejected share no beginning, so there is no prompt")
    if shared == len(chosen) or shared == len(rejected):
        raise UnusableRow("one answer is a prefix of the other, so there is no answer to compare")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _messages(value: Any, name: str) -> list[Message]:
    if value is None:
        raise UnusableRow(f"missing '{name}'")
    if not _is_messages(value):
        raise UnusableRow(f"'{name}' must be a non-empty list of {{role, content}} messages")
    return [{"role": str(m["role"]), "content": str(m["content"] or "")} for m in value]


def _answer_messages(value: Any, prompt: list[Message], name: str) -> list[Message]:
    """An answer given as a string, as assistant messages, or as the whole conversation including the prompt."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": _string(value, name)}]
    messages = _messages(value, name)
    if messages[: len(prompt)] == prompt:
        messages = messages[len(prompt):]
    if not messages:
        raise UnusableRow(f"empty {name} answer")
    return messages


def _split_common_prefix(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], ...]:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) and shared == len(rejected):
        raise UnusableRow("chosen and rejected conversations are identical")
    if shared == len(chosen) or shared == len(rejected):
        raise UnusableRow("one answer is a prefix of the other, so there is no answer to compare")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _parse_hh(transcript: str) -> list[Message]:
    text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript.lstrip()
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise UnusableRow("HH-RLHF transcript does not start with 'Human:'")
    turns = zip(parts[1::2], parts[2::2], strict=True)  # split() alternates speaker, text
    messages = [{"role": HH_ROLES[speaker], "content": content.strip()} for speaker, content in turns]
    if not messages or messages[-1]["role"] != "assistant":
        raise UnusableRow("HH-RLHF transcript does not end with an 'Assistant:' turn")
    return messages
