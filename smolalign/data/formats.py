"""Rows -> examples: detect a dataset's format from its columns and first row, and read every row in it.

Three kinds of data, each in the spellings people publish (data/columns.py finds the columns,
data/messages.py reads the messages):

- **pairs** (DPO, ORPO, SimPO, reward models): a prompt with a chosen and a rejected answer, as
  `prompt` / `chosen` / `rejected` strings (TRL's standard format: no chat template), chosen / rejected
  strings whose common beginning is the prompt, conversational messages with the prompt explicit or as
  their common leading turns, HH-RLHF transcripts, or ShareGPT `conversations` with `chosen` / `rejected`
  turns. String prompts from instruction datasets (`question`, `instruction` + `input`) or with a `system`
  column are chat data: they are read as a user turn.
- **unpaired** (KTO): one answer with a boolean `label` (thumbs up or down): `prompt` / `completion` /
  `label`, or a `messages` conversation whose last assistant turn is the answer, with `label`.
- **sft**: one answer to imitate: a `messages` conversation, or `prompt` / `completion`.

An optional `system` column becomes a system message. A row that cannot be used is reported with its
index and the reason, and left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from smolalign.data.columns import ColumnMap
from smolalign.data.messages import (
    Message,
    UnusableRow,
    is_hh_transcript,
    is_message,
    is_messages,
    parse_hh_transcript,
    read_messages,
)

Text = str | list[Message]
DataKind = Literal["pairs", "unpaired", "sft"]
# What an algorithm trains on: chosen and rejected answers of a prompt (DPO, ORPO, SimPO, reward models),
# one answer to imitate (SFT), or answers labelled desirable or not (KTO).
RowUse = Literal["pairs", "answers", "labelled"]

# Format name -> (kind, what `data inspect` calls it).
FORMATS: dict[str, tuple[DataKind, str]] = {
    "prompt_completion_strings": ("pairs", "prompt / chosen / rejected strings"),
    "implicit_prompt_strings": ("pairs", "chosen / rejected strings, prompt implicit (common beginning)"),
    "conversational_explicit_prompt": ("pairs", "conversational messages with an explicit prompt"),
    "conversational_implicit_prompt": ("pairs", "conversational messages, prompt implicit (common leading turns)"),
    "hh_rlhf": ("pairs", "HH-RLHF transcripts (\\n\\nHuman: … \\n\\nAssistant: …)"),
    "unpaired_strings": ("unpaired", "unpaired prompt / completion strings with a label (thumbs up or down)"),
    "unpaired_conversational": ("unpaired", "unpaired conversational prompt / completion with a label (thumbs up "
                                            "or down)"),
    "sft_strings": ("sft", "prompt / completion strings (SFT: the completion is the answer)"),
    "sft_conversational": ("sft", "conversational prompt / completion (SFT: the completion is the answer)"),
    "messages": ("sft", "messages conversations (SFT: last assistant turn is the answer)"),
}
KIND_DESCRIPTIONS = {
    "pairs": "preference pairs",
    "unpaired": "unpaired preferences (one answer per row with a thumbs-up or thumbs-down label)",
    "sft": "SFT rows without a rejected answer",
}
STRING_FORMATS = frozenset({"prompt_completion_strings", "implicit_prompt_strings", "unpaired_strings", "sft_strings"})


@dataclass(frozen=True)
class RowFormat:
    """How every row of one dataset is read: the format's name and the column of each role."""

    name: str
    columns: ColumnMap

    @property
    def kind(self) -> DataKind:
        return FORMATS[self.name][0]

    @property
    def description(self) -> str:
        return FORMATS[self.name][1]


@dataclass
class PreferencePair:
    """One usable row. Conversational rows hold message lists, string rows hold text. `rejected` is None for
    SFT and unpaired rows; `label` is the thumbs up (True) or down (False) of an unpaired row's answer."""

    index: int
    prompt: Text
    chosen: Text
    rejected: Text | None
    label: bool | None = None

    @property
    def is_conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class RowProblem:
    index: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.index}: {self.reason}"


def detect_format(columns: ColumnMap, first_row: dict[str, Any]) -> RowFormat | None:
    """The format of a dataset, from the roles its columns play and its first row; None if unrecognised."""
    name = _format_name(columns, first_row)
    return RowFormat(name, columns) if name else None


def _format_name(columns: ColumnMap, row: dict[str, Any]) -> str | None:
    chosen = columns.value(row, "chosen")
    if "chosen" in columns and "rejected" in columns:
        if is_messages(chosen) or is_message(chosen):
            explicit = "prompt" in columns or _is_prompt_conversation(columns.value(row, "messages"))
            return "conversational_explicit_prompt" if explicit else "conversational_implicit_prompt"
        if not isinstance(chosen, str):
            return None
        if "prompt" in columns or "input" in columns:
            return "conversational_explicit_prompt" if _is_chat(columns, row) else "prompt_completion_strings"
        return "hh_rlhf" if is_hh_transcript(chosen) else "implicit_prompt_strings"
    completion = columns.value(row, "completion")
    if "label" in columns:
        if "completion" in columns and ("prompt" in columns or "input" in columns):
            conversational = _is_chat(columns, row) or is_messages(completion) or is_message(completion)
            return "unpaired_conversational" if conversational else "unpaired_strings"
        conversation = completion if is_messages(completion) else columns.value(row, "messages")
        return "unpaired_conversational" if is_messages(conversation) else None
    if "completion" in columns and ("prompt" in columns or "input" in columns):
        conversational = _is_chat(columns, row) or is_messages(completion) or is_message(completion)
        return "sft_conversational" if conversational else "sft_strings"
    return "messages" if is_messages(columns.value(row, "messages")) else None


def _is_chat(columns: ColumnMap, row: dict[str, Any]) -> bool:
    """String rows that are chat data: a conversational prompt, a system column, or an instruction dataset's
    prompt (`question`, `instruction`), which a chat model reads as a user turn."""
    prompt = columns.value(row, "prompt")
    return (is_messages(prompt) or "system" in columns
            or columns.columns.get("prompt", "prompt") != "prompt" or "input" in columns)


def _is_prompt_conversation(value: Any) -> bool:
    """A `messages` / `conversations` value that is a prompt (ShareGPT pairs): turns not ending with an answer."""
    return is_messages(value) and read_messages(value, "messages")[-1]["role"] != "assistant"


def to_pair(row: dict[str, Any], index: int, data_format: RowFormat, *, system_prompt: str | None = None
            ) -> PreferencePair:
    """Normalise one row; raises UnusableRow with the reason when it cannot be used."""
    if data_format.name in STRING_FORMATS:
        return _string_row(row, index, data_format)
    prompt, chosen, rejected, label = _conversation_row(row, data_format)
    system = data_format.columns.value(row, "system") or system_prompt
    if system and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": str(system)}, *prompt]
    for part, answer in (("chosen", chosen), ("rejected", rejected)):
        if answer is not None and not any(m["content"].strip() for m in answer):
            raise UnusableRow(f"empty {_answer_name(data_format, part)}")
    if chosen == rejected:
        raise UnusableRow("chosen and rejected answers are identical")
    if not prompt:
        raise UnusableRow("empty prompt")
    return PreferencePair(index, prompt, chosen, rejected, label)


def _answer_name(data_format: RowFormat, part: str) -> str:
    return f"{part} answer" if data_format.kind == "pairs" else "completion"


def _string_row(row: dict[str, Any], index: int, data_format: RowFormat) -> PreferencePair:
    """TRL's standard (non-conversational) rows: text in, text out, no chat template."""
    columns = data_format.columns
    if data_format.name == "implicit_prompt_strings":
        prompt, chosen, rejected = _split_common_text(_string(columns.value(row, "chosen"), "chosen"),
                                                      _string(columns.value(row, "rejected"), "rejected"))
        return PreferencePair(index, prompt, chosen, rejected)
    prompt = _string(columns.value(row, "prompt"), "prompt")
    if data_format.kind == "pairs":
        chosen = _string(columns.value(row, "chosen"), "chosen")
        rejected = _string(columns.value(row, "rejected"), "rejected")
        if chosen == rejected:
            raise UnusableRow("chosen and rejected answers are identical")
        return PreferencePair(index, prompt, chosen, rejected)
    completion = _string(columns.value(row, "completion"), "completion")
    label = read_label(columns.value(row, "label")) if data_format.kind == "unpaired" else None
    return PreferencePair(index, prompt, completion, None, label)


def _conversation_row(row: dict[str, Any], data_format: RowFormat
                      ) -> tuple[list[Message], list[Message], list[Message] | None, bool | None]:
    """Prompt, answer(s) and label of a conversational row (messages, transcripts, or chat strings)."""
    columns, name = data_format.columns, data_format.name
    if name == "hh_rlhf":
        return (*_split_common_prefix(parse_hh_transcript(_string(columns.value(row, "chosen"), "chosen")),
                                      parse_hh_transcript(_string(columns.value(row, "rejected"), "rejected"))), None)
    if name == "conversational_implicit_prompt":
        return (*_split_common_prefix(read_messages(columns.value(row, "chosen"), "chosen"),
                                      read_messages(columns.value(row, "rejected"), "rejected")), None)
    if name == "messages":
        prompt, answer = _last_answer(read_messages(columns.value(row, "messages"), columns.columns["messages"]))
        return prompt, answer, None, None
    if data_format.kind == "unpaired" and "prompt" not in columns and "input" not in columns:
        conversation = columns.value(row, "completion")
        column = "completion" if is_messages(conversation) else "messages"
        prompt, answer = _last_answer(read_messages(columns.value(row, column), columns.columns[column]))
        return prompt, answer, None, read_label(columns.value(row, "label"))
    prompt = _prompt_messages(row, columns)
    if data_format.kind == "pairs":
        chosen = _answer_messages(columns.value(row, "chosen"), prompt, "chosen")
        rejected = _answer_messages(columns.value(row, "rejected"), prompt, "rejected")
        return prompt, chosen, rejected, None
    answer = _answer_messages(columns.value(row, "completion"), prompt, "completion")
    label = read_label(columns.value(row, "label")) if data_format.kind == "unpaired" else None
    return prompt, answer, None, label


def _prompt_messages(row: dict[str, Any], columns: ColumnMap) -> list[Message]:
    """The prompt as messages: a conversation (prompt or ShareGPT `conversations`), or text as a user turn
    (alpaca's instruction and input joined by a newline, as LLaMA-Factory joins them)."""
    value = columns.value(row, "prompt") if "prompt" in columns else None
    if value is None and "prompt" not in columns and is_messages(columns.value(row, "messages")):
        return read_messages(columns.value(row, "messages"), columns.columns["messages"])
    if is_messages(value):
        return read_messages(value, "prompt")
    parts = [part for part in (value, columns.value(row, "input")) if isinstance(part, str) and part.strip()]
    if value is not None and not isinstance(value, str):
        raise UnusableRow("'prompt' must be a string or a list of {role, content} messages")
    if not parts:
        raise UnusableRow("empty 'prompt'")
    return [{"role": "user", "content": "\n".join(parts)}]


def _last_answer(messages: list[Message]) -> tuple[list[Message], list[Message]]:
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise UnusableRow("'messages' must end with an assistant turn that follows at least one other turn")
    return messages[:-1], [messages[-1]]


def read_label(value: Any) -> bool:
    """A thumbs up (True) or down (False): a boolean, 0 / 1, or the words true / false."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise UnusableRow(f"'label' must be true or false (or 1 / 0), not {value!r}")


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


def _answer_messages(value: Any, prompt: list[Message], name: str) -> list[Message]:
    """An answer given as a string, as assistant messages, or as the whole conversation including the prompt."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": _string(value, name)}]
    messages = read_messages(value, name)
    if messages[: len(prompt)] == prompt:
        messages = messages[len(prompt):]
    if not messages:
        raise UnusableRow(f"empty {name} answer" if name != "completion" else "empty completion")
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
