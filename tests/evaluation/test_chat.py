"""`smolalign chat`: streamed answers through the chat template, history, /reset, --compare, errors."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaForCausalLM

from smolalign.cli import main
from smolalign.config.commands import ChatConfig
from smolalign.config.fields import parse_override_args
from smolalign.errors import UserError
from smolalign.evaluation import chat
from smolalign.evaluation.chat import chat_loop, open_speakers, sampling_options

CPU = {"device": torch.device("cpu"), "dtype": torch.float32, "chat_template": None, "ref_model": None}
# A random tiny model answers greedily with newlines only; sampling gives words to check.
SAMPLING = ChatConfig(max_new_tokens=6, do_sample=True, seed=3)


@pytest.fixture
def generate_calls(monkeypatch):
    """The input ids of every generate() call (LoRA models end in the same Llama generate)."""
    calls: list[list[int]] = []
    original = LlamaForCausalLM.generate

    def recording(self, *args, **kwargs):
        calls.append(kwargs["input_ids"][0].tolist())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", recording)
    return calls


@pytest.fixture(scope="module")
def lora_adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter on tiny_model(0) with random (not zero) B matrices, so it answers differently."""
    base = tiny_model(0)
    torch.manual_seed(1)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = tmp_path_factory.mktemp("run-lora") / "final"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def full_run(tiny_model, tmp_path_factory) -> Path:
    """A full fine-tuning run's folder: it started from tiny_model(0); its final/ holds tiny_model(1)."""
    run = tmp_path_factory.mktemp("run-full")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_model(0)), "algorithm": "dpo"}))
    shutil.copytree(tiny_model(1), run / "final")
    return run


def talk(speakers, tokenizer, text: str, settings: ChatConfig = SAMPLING) -> str:
    out = io.StringIO()
    chat_loop(speakers, tokenizer, settings, input_stream=io.StringIO(text), out=out)
    return out.getvalue()


def test_answers_stream_and_history_accumulates(tiny_model, generate_calls):
    speakers, tokenizer = open_speakers(str(tiny_model(0)), compare=False, **CPU)
    [assistant] = speakers
    settings = ChatConfig(max_new_tokens=6, do_sample=True, seed=3, system_prompt="Be brief.")
    transcript = talk(speakers, tokenizer, "hello there\n\nwhat next?\n", settings)

    first_answer = assistant.messages[1]["content"]
    assert [m["role"] for m in assistant.messages] == ["user", "assistant", "user", "assistant"]
    assert first_answer  # sampled words, streamed as generated
    assert transcript.startswith(f"you> hello there\nassistant> {first_answer}")
    assert transcript.count("assistant> ") == 2  # the empty line is no message

    first, second = generate_calls
    assert second[:len(first)] == first  # the second prompt holds the whole first turn...
    rendered = tokenizer.decode(second)
    assert "Be brief." in rendered and "hello there" in rendered and first_answer in rendered
    assert rendered.index(first_answer) < rendered.index("what next?")  # ...then the new message
    assert tokenizer.decode(first).endswith("<|im_start|>assistant\n")  # the chat template's generation prompt


def test_reset_starts_a_new_conversation_and_quit_leaves(tiny_model, generate_calls):
    speakers, tokenizer = open_speakers(str(tiny_model(0)), compare=False, **CPU)
    transcript = talk(speakers, tokenizer, "hello there\n/reset\nhello there\n/quit\nnever asked\n")
    first, after_reset = generate_calls
    assert after_reset == first  # nothing of the first turn is left
    assert "(new conversation)" in transcript and "never asked" not in transcript
    assert len(speakers[0].messages) == 2


def test_unknown_command_is_explained(tiny_model, generate_calls):
    speakers, tokenizer = open_speakers(str(tiny_model(0)), compare=False, **CPU)
    transcript = talk(speakers, tokenizer, "/help\n")
    assert "unknown command /help: /reset starts a new conversation, /quit leaves." in transcript
    assert generate_calls == []


def test_interrupted_answer_drops_the_message(tiny_model, monkeypatch):
    speakers, tokenizer = open_speakers(str(tiny_model(0)), compare=False, **CPU)
    real_answer = chat.answer

    def interrupted_once(speaker, text, *args):
        if text == "stop me":
            speaker.messages.append({"role": "user", "content": text})
            raise KeyboardInterrupt
        return real_answer(speaker, text, *args)

    monkeypatch.setattr(chat, "answer", interrupted_once)
    transcript = talk(speakers, tokenizer, "stop me\nhello there\n")
    assert "(interrupted; the message was dropped)" in transcript
    assert [m["content"] for m in speakers[0].messages if m["role"] == "user"] == ["hello there"]


def test_compare_lora_adapter_with_its_base_model(tiny_model, lora_adapter):
    speakers, tokenizer = open_speakers(str(lora_adapter), compare=True, **CPU)
    policy, reference = speakers
    assert reference.model is policy.model  # one copy: the reference is the adapter switched off
    transcript = talk(speakers, tokenizer, "hello there\n")
    assert transcript.index("policy> ") < transcript.index("reference> ")

    alone, base_tokenizer = open_speakers(str(tiny_model(0)), compare=False, **CPU)
    talk(alone, base_tokenizer, "hello there\n")
    assert reference.messages[-1]["content"] == alone[0].messages[-1]["content"]  # same seed, same base weights
    assert policy.messages[-1]["content"] != reference.messages[-1]["content"]
    assert f"policy> {policy.messages[-1]['content']}" in transcript
    assert f"reference> {reference.messages[-1]['content']}" in transcript


def test_compare_full_run_with_the_model_it_started_from(tiny_model, full_run):
    speakers, tokenizer = open_speakers(str(full_run / "final"), compare=True, **CPU)
    policy, reference = speakers
    assert reference.source == str(tiny_model(0))
    talk(speakers, tokenizer, "hello there\n")
    alone, _ = open_speakers(str(tiny_model(0)), compare=False, **CPU)
    talk(alone, tokenizer, "hello there\n")
    assert reference.messages[-1]["content"] == alone[0].messages[-1]["content"]
    assert policy.messages[-1]["content"] != reference.messages[-1]["content"]


def test_compare_with_an_explicit_reference(tiny_model):
    speakers, _ = open_speakers(str(tiny_model(1)), compare=True, **{**CPU, "ref_model": str(tiny_model(0))})
    assert [s.name for s in speakers] == ["policy", "reference"] and speakers[1].source == str(tiny_model(0))


def test_compare_without_a_reference_is_a_user_error(tiny_model):
    with pytest.raises(UserError, match="--compare needs a reference.*--ref_model"):
        open_speakers(str(tiny_model(0)), compare=True, **CPU)


def test_sampling_options_from_flags():
    def parse(*flags):
        return sampling_options(ChatConfig.from_values(parse_override_args(list(flags))))

    assert parse() == {"do_sample": False}
    assert parse("--temperature", "0.7") == {"do_sample": True, "temperature": 0.7, "top_p": 1.0}
    assert parse("--do_sample") == {"do_sample": True, "temperature": 1.0, "top_p": 1.0}
    assert parse("--temperature", "0") == {"do_sample": False}
    with pytest.raises(UserError, match="'temperature' must be >= 0"):
        parse("--temperature", "-1")
    with pytest.raises(UserError, match="'top_p' must lie in"):
        parse("--top_p", "0")
    with pytest.raises(UserError, match="unknown config key 'temprature'; did you mean 'temperature'"):
        parse("--temprature", "0.5")


def test_an_omitted_model_is_the_embedded_one():
    """`smolalign chat` alone: the optional positional stays unset (None), whatever argparse does with defaults."""
    from smolalign.cli import _parser
    from smolalign.config.arguments import config_from_args

    args, rest = _parser().parse_known_args(["chat"])
    assert config_from_args(ChatConfig, args, rest).model is None
    args, rest = _parser().parse_known_args(["chat", "some/model"])
    assert config_from_args(ChatConfig, args, rest).model == "some/model"


@pytest.mark.slow
def test_chat_command_through_standard_input(tiny_model):
    result = subprocess.run(
        [sys.executable, "-m", "smolalign", "chat", str(tiny_model(0)), "--max_new_tokens", "5", "--temperature", "1"],
        input="hello there\nand then?\n", capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"assistant: {tiny_model(0)}"
    asked = [line for line in lines if line.startswith("you> ")]
    assert asked == ["you> hello there", "you> and then?"]  # end of input ends the chat
    answers = [line.removeprefix("assistant> ") for line in lines if line.startswith("assistant> ")]
    assert len(answers) == 2 and all(answer.strip() for answer in answers)
    assert "Traceback" not in result.stderr


def test_bad_model_path_is_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", str(tmp_path / "runs" / "missing" / "final")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"smolalign: error: model folder '{tmp_path / 'runs' / 'missing' / 'final'}' does not exist."]
