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
from smolalign.models.embedded import EMBEDDED_NAME, embedded_model_dir, embedded_tokenizer_dir, is_embedded

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


def native_bf16() -> bool:
    """Whether the CUDA GPU computes in bf16 natively (Ampere and later). A T4 reports bf16 as supported
    when emulation counts, and emulated bf16 is slower than float32 there."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(requested: str, device: torch.device, *, lora: bool) -> tuple[torch.dtype, str]:
    """Weights dtype and Accelerate mixed precision for training.

    On a CPU: float32 (bf16 is emulated there). On a CUDA GPU: float32 master weights under autocast in
    half precision, as TRL trains, since AdamW on half-precision weights loses small updates: bf16 where
    the GPU has it natively, else fp16, for which Accelerate adds a gradient scaler (it scales the loss,
    unscales before clipping and skips steps whose gradients overflow). Under LoRA the frozen base weights
    are stored in that half precision and only the adapters are float32. `float16` forces the fp16 path
    on any GPU (it is how older cards train); `float32` turns autocast off.
    """
    if device.type != "cuda":
        return resolve_dtype(requested, device), "no"
    if requested == "float32":
        return torch.float32, "no"
    if requested == "bfloat16" and not native_bf16():
        raise UserError("dtype bfloat16 was asked for but this GPU has no native bf16 (it would be emulated); "
                        "use float16 or auto.")
    if requested == "bfloat16" or (requested == "auto" and native_bf16()):
        return (torch.bfloat16 if lora else torch.float32), "bf16"
    return (torch.float16 if lora else torch.float32), "fp16"


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """Weights dtype for inference: float32 on CPU (bf16 is emulated and slow there); bf16 on CUDA GPUs
    that have it natively, float32 on older ones (float16 when asked)."""
    if requested == "auto":
        if device.type == "cuda" and native_bf16():
            return torch.bfloat16
        return torch.float32
    if requested == "float16" and device.type == "cpu":
        raise UserError("dtype float16 is not supported on the CPU; use float32 (or auto).")
    if requested == "bfloat16" and device.type == "cpu":
        log.warning("bfloat16 on this CPU is emulated and usually slower than float32")
    return getattr(torch, requested)


_logged_attention: set[str | None] = set()


def attention_implementation(requested: str, device: torch.device) -> str | None:
    """`resolve_attention`, logged the first time each choice is made in a process."""
    implementation = resolve_attention(requested, device)
    if implementation not in _logged_attention:
        _logged_attention.add(implementation)
        log.info("attention on %s: %s", device.type, describe_attention(implementation))
    return implementation


def run_folder_of(model: str) -> Path | None:
    """RUN when `model` names a run's `RUN/final` (beside the run's config.yaml; it may not exist yet)."""
    path = Path(model)
    return path.parent if path.name == "final" and (path.parent / "config.yaml").is_file() else None


def model_source(name: str | None) -> str:
    """A loadable folder or Hub id for `name`; None or 'embedded' means the embedded SmolLM2."""
    if is_embedded(name):
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise UserError(f"'{name}' is a folder but not a model folder (no config.json).")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise UserError(f"model folder '{name}' is incomplete: it has no weights "
                            "(model.safetensors or adapter_model.safetensors).")
        return str(path)
    if run_folder_of(name):
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


def load_tokenizer(name: str | None, *, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    source = str(embedded_tokenizer_dir()) if is_embedded(name) else model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
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
) -> PreTrainedModel:
    """A causal LM in `dtype` on `device`, dropout off (as TRL), vocabulary grown to the tokenizer's.

    With `reward_head`, the same backbone with a one-output sequence-classification head to train (see
    load_reward_model). `attention` chooses the kernel of the packed and prefix-shared layouts
    (attention.resolve_attention).
    """
    source = model_source(name)
    implementation = attention_implementation(attention, device)
    if reward_head:
        model = load_reward_model(name, dtype=dtype, trained_head=False, attn_implementation=implementation)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=implementation)
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
    name: str, *, dtype: torch.dtype, trained_head: bool, attn_implementation: str | None = None
) -> PreTrainedModel:
    """A sequence-classification model with one output, the format TRL's RewardTrainer saves and loads.

    To train one (`trained_head=False`), a causal LM checkpoint gets a new, randomly initialised head.
    To score with one, the head must be there and trained, with one output; a LoRA reward adapter (PEFT
    task SEQ_CLS) is loaded on its base model.
    """
    source = model_source(name)
    options = {"dtype": dtype, "attn_implementation": attn_implementation, "output_loading_info": True}
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


def load_frozen(name: str, *, dtype, device, tokenizer) -> PreTrainedModel:
    model = load_model(name, dtype=dtype, device=device, tokenizer=tokenizer).eval()
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
