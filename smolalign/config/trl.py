"""A TRL config file, read as a smolalign config.

`trl dpo --config FILE.yaml` (and TRL's ORPO and CPO example scripts) take one YAML mapping that mixes
three of TRL's dataclasses: the script arguments (`dataset_name`, `dataset_train_split`, ...), the
`ModelConfig` (`model_name_or_path`, `use_peft`, `lora_r`, ...) and the trainer's `DPOConfig` /
`ORPOConfig` / `CPOConfig`, which is transformers' `TrainingArguments` plus `beta`, `loss_type`, ....
smolalign already uses TRL's names for most of these keys; `translate_trl_config` renames the others,
and sorts what is left into:

- keys about how TRL runs rather than what it computes (data-loader workers, console logging, the dtype
  weights are loaded in, `bf16: true`): ignored, and listed once in a warning;
- keys that switch on something smolalign does not do (`use_dora`, `load_in_4bit`, `optim: adafactor`):
  accepted at TRL's default value, where they switch nothing on, and an error otherwise;
- anything else: an error naming the closest key, as for any config.

A file is read as TRL's when it holds a key only TRL uses (`model_name_or_path`, `use_peft`, `bf16`, ...),
or says so with `trl_config: DPOConfig` (or `ORPOConfig`, `CPOConfig`), which also picks the algorithm;
without it, `loss_type: simpo` means CPOConfig and anything else DPOConfig (`algorithm: orpo` works too).
Where TRL's default differs from smolalign's and changes the run, TRL's applies: 3 epochs, and for SimPO
(TRL's CPOTrainer with `loss_type: simpo`) `cpo_alpha: 1.0`. Flags on the command line keep smolalign's
names.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

from smolalign.config.fields import unknown_key_message
from smolalign.config.train import TrainConfig
from smolalign.errors import UserError

log = logging.getLogger("smolalign")

# TRL's name -> smolalign's, same value. Keys spelled alike in both (beta, learning_rate, max_length,
# output_dir, push_to_hub, ...) need no entry.
RENAMED = {
    "model_name_or_path": "model",
    "dataset_name": "dataset",
    "dataset_config_name": "dataset_config",  # TRL's spelling before `dataset_config`, and alignment-handbook's
    "dataset_train_split": "dataset_split",
    "hub_private_repo": "hub_private",
}

# How TRL runs, not what it computes: any value is accepted and ignored.
IGNORED = frozenset({
    # precision and kernels: smolalign keeps float32 master weights, picks bf16/fp16 autocast per device
    # (`--dtype` sets it), chooses its own attention kernel and batch layout
    "dtype", "torch_dtype", "attn_implementation", "tf32", "bf16_full_eval", "fp16_full_eval",
    "use_liger_kernel", "liger_kernel_config", "torch_compile", "torch_compile_backend", "torch_compile_mode",
    "padding_free", "pad_to_multiple_of", "padding_value", "pad_token", "use_logits_to_keep",
    "gradient_checkpointing_kwargs", "activation_offloading", "model_init_kwargs", "use_cache",
    "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage",  # only read with load_in_4bit
    "truncation_mode",  # smolalign cuts long prompts from the left and then the answers (see `max_prompt_length`)
    # data loading
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context", "dataset_num_proc", "dataset_streaming", "remove_unused_columns",
    "precompute_ref_batch_size", "preprocessing_num_workers",
    # logging, saving, evaluating, distributing: smolalign logs to metrics.jsonl, saves every save_steps,
    # runs under `accelerate launch`
    "logging_dir", "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "log_level",
    "log_level_replica", "log_on_each_node", "disable_tqdm", "save_strategy", "save_safetensors", "save_only_model",
    "save_on_each_node", "overwrite_output_dir", "do_train", "do_eval", "do_predict", "eval_accumulation_steps",
    "eval_do_concat_batches", "include_tokens_per_second", "include_num_input_tokens_seen", "include_for_metrics",
    "skip_memory_metrics", "generate_during_eval", "hub_strategy", "hub_token", "hub_always_push",
    "ddp_find_unused_parameters", "ddp_timeout", "ddp_backend", "ddp_bucket_cap_mb", "ddp_broadcast_buffers",
    "local_rank", "ignore_bias_buffers", "torch_empty_cache_steps", "project", "trackio_space_id",
    "trackio_bucket_id", "trackio_static_space_id", "metric_for_best_model", "greater_is_better",
    "prediction_loss_only", "batch_eval_metrics", "eval_use_gather_object", "eval_delay", "full_determinism",
    "is_encoder_decoder",
    # settings read only when another key, rejected below at a non-default value, switches their feature on
    "f_alpha_divergence_coef", "discopop_tau", "ref_model_mixup_alpha", "ref_model_sync_steps",
    "force_use_ref_model",
})

# Features smolalign does not have: accepted (and nothing to do) at TRL's default, where they are off.
DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "model_revision": ("main",),
    "trust_remote_code": (False,),
    "use_rslora": (False,),
    "use_dora": (False,),
    "load_in_8bit": (False,),
    "load_in_4bit": (False,),
    "lora_modules_to_save": (None,),
    "lora_target_parameters": (None,),
    "lora_task_type": ("CAUSAL_LM",),
    "optim": ("adamw_torch", "adamw_torch_fused"),  # smolalign's AdamW is the fused torch one
    "optim_args": (None,),
    "lr_scheduler_kwargs": (None, {}),
    "disable_dropout": (True,),  # smolalign always trains without dropout, as TRL by default
    "max_completion_length": (None,),
    "reference_free": (False,),
    "loss_weights": (None,),
    "ld_alpha": (None,),
    "f_divergence_type": ("reverse_kl",),
    "use_weighting": (False,),
    "sync_ref_model": (False,),
    "router_aux_loss_coef": (None,),
    "alpha": (0.0,),  # CPOConfig's AlphaPO exponent
    "neftune_noise_alpha": (None,),
    "label_smoothing_factor": (0.0,),
    "group_by_length": (False,),
    "train_sampling_strategy": ("random",),
    "auto_find_batch_size": (False,),
    "hub_revision": (None,),
    "data_seed": (None,),
    "dataloader_drop_last": (False,),
    "load_best_model_at_end": (False,),
    "deepspeed": (None,),
    "fsdp": (None, "", []),
    "fsdp_config": (None,),
}

LORA_KEYS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
             "lora_target_modules": "target_modules"}
# TRL leaves lora_target_modules to PEFT, which adapts q_proj and v_proj on Llama, Mistral, Qwen2, Gemma
# (SmolLM2 is a Llama); smolalign's own default is all-linear.
TRL_LORA_TARGETS = ["q_proj", "v_proj"]
HANDLED = {"trl_config", "use_peft", *LORA_KEYS, "bf16", "fp16", "use_cpu", "eval_strategy", "evaluation_strategy",
           "dataset_test_split"}

TRL_CLASSES = {"dpo": ("DPOConfig", "dpo"), "orpo": ("ORPOConfig", "orpo"), "cpo": ("CPOConfig", "simpo")}
TRL_ALGORITHMS = tuple(algorithm for _, algorithm in TRL_CLASSES.values())  # what TRL's trainers also train
# TRL's defaults that differ from smolalign's and change what a run computes.
TRL_DEFAULTS = {"num_train_epochs": 3.0}
CPO_DEFAULTS = {"cpo_alpha": 1.0}

_warned: set[str] = set()


def translate_trl_config(values: dict[str, Any]) -> dict[str, Any]:
    """`values` in smolalign's keys when they are a TRL config file's (see the module docstring), else unchanged."""
    own_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    if not any(key not in own_keys and key in trl_key_names() for key in values):
        return values
    values = dict(values)
    ignored: list[str] = []
    marker = values.pop("trl_config", None)
    class_name, algorithm = _trl_class(values, marker)
    out: dict[str, Any] = {"algorithm": algorithm}

    for trl_key, own_key in RENAMED.items():
        if trl_key in values:
            if own_key in values:
                raise UserError(f"'{trl_key}' and '{own_key}' both set {own_key}; keep one.")
            out[own_key] = values.pop(trl_key)
    out.update(_lora(values, ignored))
    out.update(_precision(values, ignored))
    out.update(_evaluation(values, {**values, **out}, ignored))
    if values.pop("use_cpu", False) is True:
        out["device"] = "cpu"
    if "loss_type" in values:
        out.update(_loss_type(values.pop("loss_type"), algorithm))
    elif class_name == "CPOConfig" and marker is not None:
        raise UserError("TRL's CPOConfig trains CPO (loss_type sigmoid) by default, which smolalign does not; "
                        "set loss_type: simpo for SimPO.")
    if isinstance(values.get("warmup_steps"), float) and 0 < values["warmup_steps"] < 1:
        out["warmup_ratio"] = values.pop("warmup_steps")  # transformers reads a fraction as a ratio of the steps

    for key in list(values):
        if key in IGNORED:
            values.pop(key)
            ignored.append(key)
        elif key in DEFAULT_ONLY:
            value = values.pop(key)
            if value not in DEFAULT_ONLY[key]:
                raise UserError(f"'{key}: {value}' has no equivalent in smolalign and would change the run; "
                                f"remove it (TRL's default is {DEFAULT_ONLY[key][0]!r}).")
        elif key not in own_keys:
            if key in _training_argument_names():
                raise UserError(f"'{key}' is a transformers TrainingArguments setting that smolalign has no "
                                "equivalent for; remove it.")
            raise UserError(unknown_key_message(key, sorted(own_keys | trl_key_names()), "config"))
    out.update(values)  # keys spelled alike in TRL and smolalign

    defaults = {**TRL_DEFAULTS, **(CPO_DEFAULTS if algorithm == "simpo" else {})}
    applied = {key: value for key, value in defaults.items() if key not in out}
    out.update(applied)
    log.info("config read as TRL's %s (algorithm %s)%s", class_name, algorithm,
             "; TRL's defaults: " + ", ".join(f"{k} {v}" for k, v in applied.items()) if applied else "")
    _warn_once(ignored)
    return out


@functools.cache
def trl_key_names() -> frozenset[str]:
    """Every key this module knows as TRL's."""
    return frozenset({*RENAMED, *IGNORED, *DEFAULT_ONLY, *HANDLED})


@functools.cache
def _training_argument_names() -> frozenset[str]:
    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments))


def _trl_class(values: dict[str, Any], marker: Any) -> tuple[str, str]:
    """TRL's config class the file is written for, and the smolalign algorithm that trains its loss."""
    if marker is not None:
        name = str(marker).lower().removesuffix("config")
        if name not in TRL_CLASSES:
            *others, last = (class_name for class_name, _ in TRL_CLASSES.values())
            raise UserError(f"'trl_config' must be {', '.join(others)} or {last}, not '{marker}'.")
    elif values.get("algorithm") is not None:
        name = {"simpo": "cpo"}.get(str(values["algorithm"]), str(values["algorithm"]))
    else:
        loss_type = values.get("loss_type")
        name = "cpo" if loss_type == "simpo" or loss_type == ["simpo"] else "dpo"
    class_name, algorithm = TRL_CLASSES.get(name, (None, name))
    chosen = values.pop("algorithm", algorithm)
    if chosen != algorithm:
        raise UserError(f"'trl_config: {marker}' trains {algorithm}, but 'algorithm' says {chosen}; keep one.")
    return class_name or "config", algorithm


def _lora(values: dict[str, Any], ignored: list[str]) -> dict[str, Any]:
    """`use_peft: true` and `lora_*` keys as smolalign's `lora` section."""
    use_peft = values.pop("use_peft", False)
    given = [key for key in values if key in LORA_KEYS]
    settings = {LORA_KEYS[key]: values.pop(key) for key in given}
    if use_peft is not True:
        ignored += given  # TRL reads them only with use_peft
        return {}
    if "lora" in values:
        raise UserError("set LoRA either with use_peft and lora_* (TRL's keys) or with a 'lora' section, not both.")
    targets = settings.get("target_modules") or TRL_LORA_TARGETS
    if targets == ["all-linear"]:
        targets = "all-linear"  # TRL's ModelConfig unwraps a one-item list
    return {"lora": {**settings, "target_modules": targets}}


def _precision(values: dict[str, Any], ignored: list[str]) -> dict[str, Any]:
    """TRL's mixed-precision switches as smolalign's `dtype` (training precision)."""
    bf16, fp16 = values.pop("bf16", None), values.pop("fp16", None)
    if bf16 is True and fp16 is True:
        raise UserError("'bf16' and 'fp16' are both true; keep one.")
    if fp16 is True:
        return {"dtype": "float16"}
    if bf16 is True:
        ignored.append("bf16")  # smolalign's dtype auto already trains in bf16 where the GPU has it natively
    elif bf16 is False:
        return {"dtype": "float32"}  # TRL turns its bf16 default off: full float32
    return {}


def _evaluation(values: dict[str, Any], resolved: dict[str, Any], ignored: list[str]) -> dict[str, Any]:
    """TRL evaluates on the dataset's test split when eval_strategy is not 'no'."""
    strategy = values.pop("evaluation_strategy", "no")  # TRL's name before eval_strategy
    strategy = values.pop("eval_strategy", strategy)
    test_split = values.pop("dataset_test_split", None)
    if strategy not in ("no", "steps", "epoch"):
        raise UserError(f"'eval_strategy' must be no, steps or epoch, not '{strategy}'.")
    out = {}
    if strategy != "no" and not resolved.get("test_split_size") and not resolved.get("eval_dataset"):
        dataset = resolved.get("dataset")
        if dataset is None or str(dataset).endswith((".json", ".jsonl", ".csv", ".parquet")):
            raise UserError(f"eval_strategy {strategy} evaluates on a test split of dataset_name, which needs a Hub "
                            "dataset or a folder of splits; for one file set test_split_size or eval_dataset.")
        out = {"eval_dataset": dataset, "eval_split": test_split or "test"}
    elif test_split is not None:
        ignored.append("dataset_test_split")  # no evaluation, or held-out pairs from elsewhere
    if strategy == "steps":
        # TRL's fallback: evaluate as often as it logs
        out["eval_steps"] = values.pop("eval_steps", None) or resolved.get("logging_steps", TrainConfig.logging_steps)
    elif strategy == "epoch":
        ignored.append("eval_strategy: epoch (evaluated at the end)")
    return out


def _loss_type(loss_type: Any, algorithm: str) -> dict[str, Any]:
    """DPOConfig takes a list of loss types (weighted and summed); CPOConfig's simpo is smolalign's SimPO."""
    if isinstance(loss_type, list):
        if len(loss_type) != 1:
            raise UserError(f"'loss_type' {loss_type}: smolalign trains one loss type at a time; keep one.")
        loss_type = loss_type[0]
    if algorithm == "simpo":
        if loss_type != "simpo":
            raise UserError(f"CPOConfig's loss_type {loss_type} has no equivalent in smolalign; "
                            "loss_type: simpo (SimPO) does.")
        return {}
    return {"loss_type": loss_type}


def _warn_once(ignored: list[str]) -> None:
    if not ignored:
        return
    message = "ignored TRL settings that do not apply to smolalign: " + ", ".join(sorted(ignored))
    if message not in _warned:  # a sweep reads the same file once per run
        _warned.add(message)
        log.warning(message)
