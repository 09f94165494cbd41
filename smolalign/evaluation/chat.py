"""`smolalign chat`: talk with a model in the terminal, to feel what the alignment changed.

The conversation goes through the model's chat template, as training saw it, and the answer is
printed token by token as it is generated. With `--compare` every message is answered twice: by the
policy, then by its reference (the model it started from), each side keeping its own history, so the two
conversations can be read side by side. Typing `/reset` starts a new conversation, `/quit` (or end of
input) leaves.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, TextStreamer

from smolalign.config.commands import ChatConfig
from smolalign.errors import UserError
from smolalign.models.embedded import EMBEDDED_NAME, is_embedded
from smolalign.models.loading import load_for_scoring, load_tokenizer, resolve_device
from smolalign.models.packed import packed_linears
from smolalign.models.precision import resolve_dtype

COMMANDS = "/reset starts a new conversation, /quit leaves"


@dataclass
class Speaker:
    """One side of the chat: a model, the context that makes it itself (a LoRA adapter's reference is the
    same model with the adapter switched off), and its own conversation so far."""

    name: str
    model: torch.nn.Module
    source: str  # what the model is, for the opening line
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    messages: list[dict[str, str]] = field(default_factory=list)


class StreamTo(TextStreamer):
    """transformers' TextStreamer (new text only, whole words at a time), writing to `out` instead of stdout."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out
        self.started = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.started:  # the answer is shown (and kept) without its leading space or newlines
            text = text.lstrip()
            self.started = bool(text)
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def answer(speaker: Speaker, text: str, tokenizer: PreTrainedTokenizerBase, config: ChatConfig,
           out: TextIO) -> str:
    """Add the user's `text` to the speaker's conversation, stream its answer to `out`, and keep the answer
    in the conversation (the next turn's prompt holds the whole history)."""
    speaker.messages.append({"role": "user", "content": text})
    system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    prompt = tokenizer.apply_chat_template(system + speaker.messages, tokenize=False, add_generation_prompt=True)
    device = next(speaker.model.parameters()).device
    input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad(), speaker.context():
        output = speaker.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=config.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            streamer=StreamTo(tokenizer, out), **sampling_options(config),
        )
    reply = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
    speaker.messages.append({"role": "assistant", "content": reply})
    return reply


def chat_loop(speakers: list[Speaker], tokenizer: PreTrainedTokenizerBase, config: ChatConfig, *,
              input_stream: TextIO, out: TextIO) -> None:
    """Read a message a line, answer it with every speaker in turn, until /quit or the end of the input."""
    interactive = input_stream is sys.stdin and sys.stdin.isatty()
    messages_asked = 0
    while True:
        line = _read_line(input_stream, out, interactive=interactive)
        if line is None or line in ("/quit", "/exit"):
            return
        if not line:
            continue
        if line == "/reset":
            for speaker in speakers:
                speaker.messages.clear()
            out.write("(new conversation)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}: {COMMANDS}.\n")
            continue
        lengths = [len(speaker.messages) for speaker in speakers]
        try:
            for speaker in speakers:
                out.write(f"{speaker.name}> ")
                out.flush()
                torch.manual_seed(config.seed + messages_asked)  # policy and reference draw the same numbers
                answer(speaker, line, tokenizer, config, out)
            messages_asked += 1
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat; the unanswered turn is forgotten
            for speaker, length in zip(speakers, lengths, strict=True):
                del speaker.messages[length:]
            out.write("\n(interrupted; the message was dropped)\n")


def _read_line(input_stream: TextIO, out: TextIO, *, interactive: bool) -> str | None:
    """The next message, stripped; None at the end of the input. A terminal gets line editing through
    input(); piped input is echoed, so a transcript shows what was asked."""
    if interactive:
        try:
            return input("you> ").strip()
        except EOFError:
            out.write("\n")
            return None
    line = input_stream.readline()
    if not line:
        return None
    out.write(f"you> {line.rstrip()}\n")
    return line.strip()


def open_speakers(model: str | None, *, compare: bool, ref_model: str | None, chat_template: str | None,
                  device: torch.device, dtype: torch.dtype) -> tuple[list[Speaker], PreTrainedTokenizerBase]:
    """The policy (a folder, a run's final/, a LoRA adapter or a Hub id; None = the embedded model), its
    reference with `compare`, and their tokenizer (the policy's: it carries the chat template it trained with)."""
    tokenizer = load_tokenizer(model, chat_template=chat_template)
    if not tokenizer.chat_template:
        raise UserError(f"'{model}' has no chat template (a base model?); pass --chat_template chatml, a Jinja "
                        "template or a template file.")
    policy = load_for_scoring(model, dtype=dtype, device=device, tokenizer=tokenizer)
    if not compare:
        return [Speaker("assistant", policy, describe(model))], tokenizer
    from smolalign.evaluation.command import starting_model_of_run

    reference_name = ref_model or (starting_model_of_run(model) if model else None)
    if reference_name:
        reference = Speaker("reference", load_for_scoring(reference_name, dtype=dtype, device=device,
                                                          tokenizer=tokenizer), describe(reference_name))
    elif isinstance(policy, PeftModel):
        reference = Speaker("reference", policy, "its base model (adapter off)", policy.disable_adapter)
    else:
        raise UserError(f"--compare needs a reference, and '{model or 'the embedded model'}' is neither a LoRA "
                        "adapter nor the final/ of a run; name one with --ref_model.")
    return [Speaker("policy", policy, describe(model)), reference], tokenizer


def describe(model: str | None) -> str:
    return model if model and not is_embedded(model) else EMBEDDED_NAME


def sampling_options(config: ChatConfig) -> dict:
    """generate()'s sampling arguments. Greedy by default, so the same message gets the same answer from
    policy and reference; a temperature alone asks for sampling, and 0 means greedy."""
    temperature = 1.0 if config.temperature is None else config.temperature
    if (config.do_sample or config.temperature is not None) and temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": config.top_p}
    return {"do_sample": False}


def run_chat(config: ChatConfig, *, input_stream: TextIO | None = None, out: TextIO | None = None) -> None:
    """`smolalign chat`: load the model (and its reference), then chat until /quit or the end of input."""
    device = resolve_device(config.device)
    speakers, tokenizer = open_speakers(config.model, compare=config.compare, ref_model=config.ref_model,
                                        chat_template=config.chat_template, device=device,
                                        dtype=resolve_dtype(config.dtype, device))
    out = out or sys.stdout
    for speaker in speakers:
        out.write(f"{speaker.name}: {speaker.source}\n")
    out.write(f"({COMMANDS})\n")
    with contextlib.ExitStack() as packed:  # the weights never change in a chat: packed once (models/packed.py)
        for model in {id(speaker.model): speaker.model for speaker in speakers}.values():
            packed.enter_context(packed_linears(model))
        chat_loop(speakers, tokenizer, config, input_stream=input_stream or sys.stdin, out=out)
