"""Chat messages as datasets spell them, read into one shape: `{"role", "content"}` with text content.

Spellings read: `{"role", "content"}` (OpenAI, TRL), ShareGPT's `{"from", "value"}` with `human` / `gpt` /
`system` speakers (LLaMA-Factory), content as a list of parts (`{"type": "text", "text": …}`, or `"value"`
in LLaMA-Factory's v1 files), and Anthropic's HH-RLHF transcripts (`"\\n\\nHuman: … \\n\\nAssistant: …"`).
A message that cannot be used (a tool call, an image) makes its row unusable, with the reason.
"""

from __future__ import annotations

import re
from typing import Any

Message = dict[str, str]

# Speaker names of the common spellings -> the roles chat templates know.
ROLES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant", "chatgpt": "assistant",
    "system": "system",
}
ROLE_KEYS, CONTENT_KEYS = ("role", "from"), ("content", "value")
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class UnusableRow(Exception):
    """A row that cannot be used; the message says why."""


def is_message(value: Any) -> bool:
    """A mapping with a speaker and a content, in any spelling read here."""
    return isinstance(value, dict) and any(k in value for k in ROLE_KEYS) and any(k in value for k in CONTENT_KEYS)


def is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(is_message(m) for m in value)


def read_messages(value: Any, name: str) -> list[Message]:
    """A column's list of messages (a single message counts as a list of one) in the one shape."""
    if value is None:
        raise UnusableRow(f"missing '{name}'")
    if is_message(value):
        value = [value]
    if not is_messages(value):
        raise UnusableRow(f"'{name}' must be a non-empty list of {{role, content}} messages")
    return [_read_message(message, name) for message in value]


def _read_message(message: dict, name: str) -> Message:
    speaker = str(next(message[k] for k in ROLE_KEYS if k in message))
    role = ROLES.get(speaker.lower())
    if role is None:
        raise UnusableRow(f"'{name}' has a '{speaker}' turn; smolalign trains on user, assistant and system turns "
                          "only (no tool calls)")
    content = next(message[k] for k in CONTENT_KEYS if k in message)
    return {"role": role, "content": message_text(content, name)}


def message_text(content: Any, name: str) -> str:
    """Text content, or the text parts of a list of content parts joined (any other part is refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        texts = []
        for part in content:
            if part.get("type", "text") != "text":
                raise UnusableRow(f"'{name}' holds a '{part.get('type')}' part; smolalign trains on text only")
            texts.append(str(part.get("text", part.get("value", ""))))
        return "".join(texts)
    raise UnusableRow(f"'{name}' has content of type {type(content).__name__}, not text")


def parse_hh_transcript(transcript: str) -> list[Message]:
    """An HH-RLHF transcript as messages; it must start with a Human turn and end with an Assistant turn."""
    text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript.lstrip()
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise UnusableRow("HH-RLHF transcript does not start with 'Human:'")
    turns = zip(parts[1::2], parts[2::2], strict=True)  # split() alternates speaker, text
    messages = [{"role": HH_ROLES[speaker], "content": content.strip()} for speaker, content in turns]
    if not messages or messages[-1]["role"] != "assistant":
        raise UnusableRow("HH-RLHF transcript does not end with an 'Assistant:' turn")
    return messages


def is_hh_transcript(text: str) -> bool:
    return bool(HH_TURN.match(text)) or text.lstrip().startswith("Human:")
