"""Loading policy, reference and tokenizer: device and dtype, chat templates, LoRA."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from smolalign.errors import UserError, first_line
from smolalign.hub import hub_failure_reason, looks_like_path, prefer_local_cache
from smolalign.models.attention import describe_attention, resolve_attention
from smolalign.models.embedded import (
    EMBEDDED_NAME,
    embedded_model_dir,
    embedded_tokenizer_dir,
    gguf_model_dir,
    is_embedded,
)
from smolalign.run_folder import RunFolder

log = logging.getLogger("smolalign")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto.")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


_logged_attention: set[str | None] = set()


def attention_implementation(requested: str, device: torch.device) -> str | None:
    """`resolve_attention`, logged the first time each choice is made in a process."""
    implementation = resolve_attention(requested, device)
    if implementation not in _logged_attention:
        _logged_attention.add(implementation)
        log.info("attention on %s: %s", device.type, describe_attention(implementation))
    return implementation


def model_source(name: str | None) -> str:
    """A loadable folder or Hub id for `name`; None or 'embedded' means the embedded SmolLM2, and a .gguf
    file is read through its cached conversion to a Hugging Face folder."""
    if is_embedded(name):
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file '{name}' does not exist.")
        return str(gguf_model_dir(path))
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise UserError(f"'{name}' is a folder but not a model folder (no config.json).")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise UserError(f"model folder '{name}' is incomplete: it has no weights "
                            "(model.safetensors or adapter_model.safetensors).")
        return str(path)
    if RunFolder.of_final(name):
        raise UserError(f"'{name}' does not exist: the run in '{path.parent}' has not finished; resume it with "
                        "--resume_from_checkpoint latest.")
    if looks_like_path(name) or path.exists():
        raise UserError(f"model folder '{name}' does not exist.")
    prefer_local_cache()
    return name


def _hub_failure(name: str, error: Exception) -> UserError:
    return UserError(
        f"cannot load '{name}': it is not a local folder and {hub_failure_reason(error)}; check the name and the "
        f"network, or omit --model to use the embedded {EMBEDDED_NAME}."
    )


def load_tokenizer(name: str | None, *, chat_template: str | None = None, revision: str | None = None,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model (`revision` and `trust_remote_code` as transformers reads them for Hub ids)."""
    source = str(embedded_tokenizer_dir()) if is_embedded(name) else model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as error:  # missing repo, no network, corrupt files
        raise _hub_failure(name, error) from None
    if chat_template is not None:
        _set_chat_template(tokenizer, chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as TRL: pad positions are never scored
    return tokenizer


def _set_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str) -> None:
    if chat_template == "chatml":
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.eos_token = "<|im_end|>"
        tokenizer.pad_token = "<|im_end|>"
    elif "{%" in chat_template or "{{" in chat_template:
        tokenizer.chat_template = chat_template
    elif Path(chat_template).is_file():
        tokenizer.chat_template = Path(chat_template).read_text()
    else:
        raise UserError(f"'chat_template' must be 'chatml', a Jinja template or a template file, not '{chat_template}'.")


def load_model(
    name: str | None,
    *,
    dtype: torch.dtype,
    device: torch.device,
    tokenizer: PreTrainedTokenizerBase | None = None,
    reward_head: bool = False,
    attention: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal LM in `dtype` on `device`, dropout off (as TRL), vocabulary grown to the tokenizer's.

    With `reward_head`, the same backbone with a one-output sequence-classification head to train (see
    load_reward_model). `attention` chooses the kernel of the packed and prefix-shared layouts
    (attention.resolve_attention); `revision` and `trust_remote_code` go to transformers.
    """
    source = model_source(name)
    implementation = attention_implementation(attention, device)
    hub = {"revision": revision, "trust_remote_code": trust_remote_code}
    if reward_head:
        model = load_reward_model(name, dtype=dtype, trained_head=False, attn_implementation=implementation, **hub)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=implementation, **hub)
        except Exception as error:
            if Path(source).is_dir():
                raise UserError(f"cannot load a causal language model from '{name}': {first_line(error)}") from None
            raise _hub_failure(name, error) from None
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        configs = [model.config] + ([model.generation_config] if model.can_generate() else [])
        for config in configs:
            config.pad_token_id = tokenizer.pad_token_id
            config.eos_token_id = tokenizer.eos_token_id
    _disable_dropout(model)
    return model.to(device)


def load_reward_model(
    name: str, *, dtype: torch.dtype, trained_head: bool, attn_implementation: str | None = None,
    revision: str | None = None, trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A sequence-classification model with one output, the format TRL's RewardTrainer saves and loads.

    To train one (`trained_head=False`), a causal LM checkpoint gets a new, randomly initialised head.
    To score with one, the head must be there and trained, with one output; a LoRA reward adapter (PEFT
    task SEQ_CLS) is loaded on its base model.
    """
    source = model_source(name)
    options = {"dtype": dtype, "attn_implementation": attn_implementation, "output_loading_info": True,
               "revision": revision, "trust_remote_code": trust_remote_code}
    if not trained_head or _is_reward_adapter(source):
        # A causal LM's config does not say num_labels=1: transformers would build a two-output head.
        options["num_labels"] = 1
    try:
        model, loading = AutoModelForSequenceClassification.from_pretrained(source, **options)
    except Exception as error:  # missing repo, no network, not a classification architecture
        if Path(source).is_dir():
            raise UserError(f"cannot load a reward model from '{name}': {first_line(error)}") from None
        raise UserError(f"cannot load the reward model '{name}': {hub_failure_reason(error)}; check the name and "
                        "the network.") from None
    if trained_head and loading["missing_keys"]:
        raise UserError(f"'{name}' is not a reward model: it has no trained classification head "
                        f"({', '.join(sorted(loading['missing_keys']))} missing); give a model saved by a reward "
                        "trainer.")
    if trained_head and model.config.num_labels != 1:
        raise UserError(f"'{name}' is not a reward model: its head has {model.config.num_labels} outputs, not one "
                        "score.")
    return model


def _is_reward_adapter(source: str) -> bool:
    """Whether `source` is a LoRA adapter of a reward model (TRL's RewardTrainer with a peft_config)."""
    adapter_config = Path(source) / "adapter_config.json"
    if not adapter_config.exists():
        return False
    if json.loads(adapter_config.read_text()).get("task_type") != "SEQ_CLS":
        raise UserError(f"'{source}' is a LoRA adapter of a language model, not of a reward model (SEQ_CLS).")
    return True


def load_for_scoring(
    name: str | None, *, dtype: torch.dtype, device: torch.device, tokenizer: PreTrainedTokenizerBase
) -> torch.nn.Module:
    """A frozen model to score with: a full model, or a LoRA adapter folder on top of its base model."""
    source = model_source(name)
    if not (Path(source) / "adapter_config.json").exists():
        return load_frozen(name, dtype=dtype, device=device, tokenizer=tokenizer)
    from peft import AutoPeftModelForCausalLM

    try:
        model = AutoPeftModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attention_implementation("auto", device))
    except Exception as error:
        raise UserError(
            f"cannot load the LoRA adapter in '{name}' on its base model ({first_line(error)}); "
            "check base_model_name_or_path in its adapter_config.json."
        ) from None
    model.requires_grad_(False)
    return model.to(device).eval()


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The initial policy as a frozen reference (full fine-tuning without a separate ref_model)."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def load_frozen(name: str, *, dtype, device, tokenizer, trust_remote_code: bool = False) -> PreTrainedModel:
    model = load_model(name, dtype=dtype, device=device, tokenizer=tokenizer, trust_remote_code=trust_remote_code).eval()
    model.requires_grad_(False)
    return model


def add_lora(model: PreTrainedModel, settings) -> torch.nn.Module:
    """Wrap with PEFT LoRA adapters. A language model's output head is never adapted (log-probs read its
    weight); a reward model's new score head is trained in full (PEFT's SEQ_CLS task saves it too)."""
    reward_head = "ForSequenceClassification" in type(model).__name__
    config = LoraConfig(
        task_type="SEQ_CLS" if reward_head else "CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as error:
        raise UserError(f"invalid LoRA settings: {first_line(error)}") from None
    _disable_dropout(model)  # the adapters' dropout too: TRL's preference trainers train without any dropout
    # PEFT makes the adapters float32 over a half-precision base; a trained head copy (the reward model's
    # score) must be float32 too: AdamW loses small updates on half weights, and fp16's gradient scaler
    # refuses half-precision gradients.
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model (*ForCausalLM, *ForSequenceClassification) inside a PEFT wrapper; LoRA
    layers are injected into it in place."""
    return model.get_base_model() if isinstance(model, PeftModel) else model
