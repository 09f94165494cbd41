"""LLaMA-Factory's train YAML (`llamafactory-cli train FILE.yaml`) in smolalign's keys.

Its own keys (ModelArguments, DataArguments, FinetuningArguments, GeneratingArguments) are moved to
smolalign's or TRL's names here; what is left is transformers' TrainingArguments, which config/trl.py
reads next. `stage` and `pref_loss` choose the algorithm (`dpo` with `pref_loss: orpo` is ORPO);
`finetuning_type` (LoRA unless it says full) with `lora_rank` and `lora_alpha` (twice the rank unless set)
the LoRA section; `dataset` names an entry of `dataset_dir/dataset_info.json` (a file or a Hub dataset with
its column mapping), or is read as a file or Hub id itself. LLaMA-Factory's defaults that differ from
smolalign's apply: learning rate 5e-5, 3 epochs, a training length (`cutoff_len`) of 2048 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from smolalign.config.translation import Translation, same_setting
from smolalign.errors import UserError
from smolalign.hub import is_data_file_name

# Keys only LLaMA-Factory uses: a file holding one is its train config.
MARKERS = frozenset({"stage", "finetuning_type", "template", "cutoff_len", "dataset_dir", "lora_rank", "lora_target",
                     "pref_beta", "pref_loss", "pref_ftx", "max_samples", "val_size", "plot_loss",
                     "kto_chosen_weight", "kto_rejected_weight"})
RENAMED = {"pref_beta": "beta", "kto_chosen_weight": "desirable_weight", "kto_rejected_weight": "undesirable_weight",
           "cutoff_len": "max_length", "val_size": "test_split_size", "default_system": "system_prompt"}
SAME_SETTING_GROUPS = (
    ("model", "model_name_or_path", "model_revision"),
    ("max_length", "cutoff_len"),
    ("beta", "pref_beta"),
    ("eval_dataset", "val_size", "test_split_size"),
    ("dtype", "bf16", "fp16", "pure_bf16"),
    ("system_prompt", "default_system"),
    ("desirable_weight", "kto_chosen_weight"),
    ("undesirable_weight", "kto_rejected_weight"),
    ("max_train_pairs", "max_samples"),
)
SAME_SETTING = same_setting(SAME_SETTING_GROUPS)
SAME_SETTING["algorithm"] = ("stage", "pref_loss")  # --algorithm orpo replaces both; --pref_loss orpo only itself

# Inference, export, tracking, kernels and data-loading settings: they do not change what training computes.
IGNORED = frozenset({
    "do_sample", "temperature", "top_p", "top_k", "num_beams", "max_new_tokens", "repetition_penalty",
    "length_penalty", "skip_special_tokens",  # GeneratingArguments: decoding only (and max_length, below)
    "plot_loss", "include_effective_tokens_per_second", "compute_accuracy", "overwrite_cache", "buffer_size",
    "preprocessing_batch_size", "eval_num_beams", "eval_on_each_dataset", "data_shared_file_system", "media_dir",
    "flash_attn", "use_unsloth", "use_unsloth_gc", "enable_liger_kernel", "use_v1_kernels", "use_reentrant_gc",
    "upcast_layernorm", "upcast_lmhead_output", "low_cpu_mem_usage", "cache_dir", "offload_folder", "use_kv_cache",
    "infer_backend", "infer_dtype", "hf_hub_token", "ms_hub_token", "om_hub_token", "print_param_status",
    "use_mca", "use_megatron_bridge", "freeze_vision_tower", "freeze_multi_modal_projector",
    "freeze_language_model", "adapter_folder", "init_special_tokens", "quantization_method", "quantization_type",
    "double_quantization", "quantization_device_map", "export_dir", "export_size", "export_device",
    "export_quantization_bit", "export_quantization_dataset", "export_quantization_nsamples",
    "export_quantization_maxlen", "export_legacy_format", "export_hub_model_id", "vllm_maxlen", "vllm_gpu_util",
    "vllm_enforce_eager", "vllm_max_lora_rank", "vllm_config", "sglang_maxlen", "sglang_mem_fraction",
    "sglang_tp_size", "sglang_config", "sglang_lora_backend", "image_max_pixels", "image_min_pixels",
    "image_do_pan_and_scan", "crop_to_patches", "video_max_pixels", "video_min_pixels", "video_fps",
    "video_maxlen", "use_audio_in_video", "audio_sampling_rate", "enable_torch_profiler", "profiler_output_dir",
    "profiler_wait_steps", "profiler_warmup_steps", "profiler_active_steps", "profiler_repeat",
    "profiler_record_shapes", "profiler_profile_memory", "profiler_with_stack", "profile_modules",
    "ray_num_workers", "ray_init_kwargs", "master_addr", "master_port", "use_swanlab", "swanlab_project",
    "swanlab_workspace", "swanlab_run_name", "swanlab_mode", "swanlab_api_key", "swanlab_logdir",
    "swanlab_lark_webhook_url", "swanlab_lark_secret", "predict_with_generate", "generation_max_length",
    "generation_num_beams", "generation_config", "hyper_parallel_args", "hyper_parallel_cp_size", "asft_alpha",
    "eaft_alpha", "loraplus_lr_embedding", "pissa_iter", "pissa_convert", "create_new_adapter", "module_dropout",
    "oft_rank", "oft_block_size", "oft_target", "freeze_trainable_layers", "freeze_trainable_modules",
    "freeze_extra_modules", "ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target", "ppo_whiten_rewards",
    "reward_model", "reward_model_adapters", "reward_model_quantization_bit", "reward_model_type", "fp8_backend",
    "galore_target", "galore_rank", "galore_update_interval", "galore_scale", "galore_proj_type", "galore_layerwise",
    "apollo_target", "apollo_rank", "apollo_update_interval", "apollo_scale", "apollo_proj", "apollo_proj_type",
    "apollo_scale_type", "apollo_layerwise", "apollo_scale_front", "badam_mode", "badam_start_block",
    "badam_switch_mode", "badam_switch_interval", "badam_update_ratio", "badam_mask_mode", "badam_verbose",
    "use_kt", "tokenized_path", "streaming",
})
# Features smolalign does not have: accepted at LLaMA-Factory's default, where they are off.
DEFAULT_ONLY: dict[str, Any] = {
    "pure_bf16": False, "use_llama_pro": False, "use_adam_mini": False, "use_hyper_parallel": False, "use_muon": False,
    "use_dft_loss": False, "use_asft_loss": False, "use_eaft_loss": False, "disable_shuffling": False,
    "early_stopping_steps": None, "additional_target": None, "loraplus_lr_ratio": None, "pissa_init": False,
    "pref_bco_weight": 0.0, "dpo_label_smoothing": 0.0, "ref_model_adapters": None, "ref_model_quantization_bit": None,
    "ld_alpha": None, "use_galore": False, "use_apollo": False, "use_badam": False, "train_on_prompt": False,
    "interleave_probs": None, "neat_packing": False, "tool_format": None, "enable_thinking": True,
    "preserve_thinking": False, "ignore_pad_token_for_loss": True, "adapter_name_or_path": None,
    "use_fast_tokenizer": True, "resize_vocab": False, "split_special_tokens": False, "add_tokens": None,
    "add_special_tokens": None, "new_special_tokens_config": None, "rope_scaling": None, "shift_attn": False,
    "mixture_of_depths": None, "moe_aux_loss_coef": None, "train_from_scratch": False, "quantization_bit": None,
    "fp8": False, "fp8_enable_fsdp_float8_all_gather": False, "do_train": True, "sortish_sampler": False,
    "mix_strategy": "concat",
}
REFUSALS = {"quantization_bit": "QLoRA (a quantized base model through bitsandbytes on a CUDA GPU), which smolalign "
                                "does not do; it trains LoRA over the full- or half-precision base model: drop it",
            "do_train": "no training, which is all `smolalign train` does"}
HANDLED = {"stage", "pref_loss", "pref_ftx", "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout",
           "lora_target", "dataset", "eval_dataset", "dataset_dir", "template", "max_samples", "mask_history",
           "packing", "disable_gradient_checkpointing"}
# LLaMA-Factory's defaults (transformers' for learning_rate and epochs) where they differ from smolalign's.
DEFAULTS = {"learning_rate": 5e-5, "num_train_epochs": 3.0, "max_length": 2048}
STAGES = {"dpo": "dpo", "kto": "kto", "rm": "reward", "sft": "sft"}
PREFERENCE_LOSSES = {"sigmoid": ("dpo", "sigmoid"), "hinge": ("dpo", "hinge"), "ipo": ("dpo", "ipo"),
                     "orpo": ("orpo", None), "simpo": ("simpo", None)}


def is_llamafactory_file(values: dict[str, Any]) -> bool:
    return any(key in MARKERS for key in values) or ("model_name_or_path" in values and "dataset" in values
                                                     and "dataset_name" not in values)


def translate_llamafactory(t: Translation) -> None:
    """Move LLaMA-Factory's keys of `t.values` to smolalign's (and TRL's, which config/trl.py reads next)."""
    algorithm = _algorithm(t)
    t.values["algorithm"] = algorithm
    _lora(t)
    _pref_ftx(t, algorithm)
    if algorithm in ("orpo", "simpo") and t.values.get("ref_model"):
        t.note("ref_model", f"{t.values.pop('ref_model')}: not loaded, {algorithm} is reference-free")
    if "max_length" in t.values and "max_length" not in t.from_flags:
        t.values.pop("max_length")  # GeneratingArguments' answer length; training's is cutoff_len
        t.ignored.append("max_length (of generation)")
    cutoff_from_file = "cutoff_len" in t.values and "cutoff_len" not in t.from_flags
    for lf_key, own_key in RENAMED.items():
        if lf_key in t.values:
            t.values[own_key] = t.values.pop(lf_key)
    _data(t, algorithm)
    if "disable_gradient_checkpointing" in t.values:
        t.values["gradient_checkpointing"] = not t.values.pop("disable_gradient_checkpointing")
    if t.values.pop("packing", None) and algorithm != "sft":
        t.values["max_length"] = t.values.get("max_length", DEFAULTS["max_length"]) - 1  # as LLaMA-Factory does
    if "template" in t.values:
        t.note("template", f"{t.values.pop('template')}: smolalign renders with the model's own chat template")
    if cutoff_from_file:
        t.note("cutoff_len", f"{t.values['max_length']}: smolalign cuts a long prompt from the left and drops a pair "
                             "that cannot fit, where LLaMA-Factory keeps the prompt's beginning")
    accepted = {key: (default,) for key, default in DEFAULT_ONLY.items()}
    for key in list(t.values):
        t.settle(key, ignored=IGNORED, accepted=accepted, refusals=REFUSALS, source="LLaMA-Factory")
    t.defaults(DEFAULTS, "LLaMA-Factory")


def _algorithm(t: Translation) -> str:
    """`stage` (sft unless set) and `pref_loss` as smolalign's algorithm and loss type; a flag's algorithm wins."""
    stage = str(t.values.pop("stage", "sft"))
    pref_loss = str(t.values.pop("pref_loss", "sigmoid"))
    if t.values.get("algorithm") is not None:
        return str(t.values.pop("algorithm"))
    if stage not in STAGES:
        raise UserError(f"'stage: {stage}' ({'pre-training' if stage == 'pt' else 'PPO'}) is not an algorithm "
                        "smolalign trains; it trains dpo, kto, rm (reward models) and sft.")
    if stage == "rm":
        t.note("stage", "rm: smolalign trains a sequence-classification reward head (TRL's RewardTrainer), where "
                        "LLaMA-Factory trains a value head with bias and dropout")
    if stage == "sft" and not t.values.pop("mask_history", False):
        t.note("mask_history", "false: smolalign's SFT trains the last assistant turn of a conversation only")
    if stage != "dpo":
        return STAGES[stage]
    if pref_loss not in PREFERENCE_LOSSES:
        raise UserError(f"'pref_loss: {pref_loss}' has no equivalent in smolalign (it trains sigmoid, hinge, ipo, "
                        "orpo and simpo); for unpaired data use stage: kto.")
    algorithm, loss_type = PREFERENCE_LOSSES[pref_loss]
    if loss_type is not None:
        t.values["loss_type"] = loss_type
    if pref_loss in ("hinge", "ipo"):
        t.note("pref_loss", f"{pref_loss}: trained as {pref_loss}; LLaMA-Factory with TRL 0.20 to 0.24 computes "
                            "sigmoid DPO instead")
    if algorithm == "orpo":
        t.note("pref_loss", "orpo: the NLL term covers prompt and answer tokens of the batch (TRL's ORPO), where "
                            "LLaMA-Factory averages answer tokens per pair")
    if algorithm == "simpo":
        t.values.setdefault("cpo_alpha", 0.0)  # LLaMA-Factory's SimPO adds no NLL term (pref_ftx does)
    return algorithm


def _lora(t: Translation) -> None:
    """`finetuning_type` (LoRA unless it says full) and LLaMA-Factory's LoRA keys as smolalign's `lora` section."""
    finetuning = t.values.pop("finetuning_type", "lora")
    keys = {key: t.values.pop(key) for key in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target")
            if key in t.values}
    if finetuning == "full":
        t.ignored += list(keys)
        return
    if finetuning != "lora":
        raise UserError(f"'finetuning_type: {finetuning}' has no equivalent in smolalign, which trains full models "
                        "or LoRA adapters; use lora or full.")
    rank = keys.get("lora_rank", 8)
    targets = keys.get("lora_target", "all")
    if isinstance(targets, str):
        targets = "all-linear" if targets.strip() == "all" else [name.strip() for name in targets.split(",")]
    section = {"r": rank, "lora_alpha": keys.get("lora_alpha") or 2 * rank,
               "lora_dropout": keys.get("lora_dropout", 0.0), "target_modules": targets}
    flagged = t.values.get("lora") if "lora" in t.from_flags else None
    t.values["lora"] = {**section, **(flagged or {})}


def _pref_ftx(t: Translation, algorithm: str) -> None:
    """LLaMA-Factory's SFT term: the NLL weight of DPO (rpo_alpha) or SimPO (cpo_alpha)."""
    weight = t.values.pop("pref_ftx", 0.0)
    if not weight:
        return
    if algorithm not in ("dpo", "simpo"):
        raise UserError(f"'pref_ftx: {weight}' adds an NLL term that smolalign's {algorithm} has no equivalent for; "
                        "remove it.")
    t.values["rpo_alpha" if algorithm == "dpo" else "cpo_alpha"] = weight
    t.note("pref_ftx", f"{weight}: the NLL is averaged over the chosen answers' tokens of the batch (TRL's), where "
                       "LLaMA-Factory averages per pair first; equal at one pair per device")


def _data(t: Translation, algorithm: str) -> None:
    """`dataset` / `eval_dataset`: names of `dataset_dir/dataset_info.json` entries, or files and Hub ids."""
    folder = Path(str(t.values.pop("dataset_dir", "data")))
    limit = t.values.pop("max_samples", None)
    if limit is not None:
        t.values.setdefault("max_train_pairs", limit)
    for key in ("dataset", "eval_dataset"):
        if key not in t.values or t.values[key] is None:
            continue
        names = t.values.pop(key)
        names = [name.strip() for name in names.split(",")] if isinstance(names, str) else list(names)
        sources = [_dataset_source(name, folder, key in t.from_flags) for name in names]
        if key == "eval_dataset":
            if len(sources) > 1:
                raise UserError("'eval_dataset' names several datasets; smolalign evaluates on one.")
            t.values.update({"eval_dataset": sources[0]["path"], "eval_split": sources[0].get("split", "test")})
            if limit is not None:
                t.values.setdefault("max_eval_pairs", limit)
        elif len(sources) == 1 and set(sources[0]) <= {"path", "split", "name", "dataset_columns"}:
            source = sources[0]
            t.values.update({"dataset": source["path"], "dataset_split": source.get("split", "train"),
                             "dataset_config": source.get("name"), "dataset_columns": source.get("dataset_columns")})
        else:
            t.values["dataset_mixture"] = sources


def _dataset_source(name: str, folder: Path, from_flag: bool) -> dict[str, Any]:
    """A `dataset_info.json` entry as a DatasetSource; a name it does not hold is a file, folder or Hub id."""
    info_file = folder / "dataset_info.json"
    entries = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if name not in entries:
        if not from_flag and not info_file.is_file() and "/" not in name and not is_data_file_name(name):
            raise UserError(f"'dataset: {name}' names an entry of LLaMA-Factory's {info_file}, which does not exist "
                            "here; set dataset_dir to the folder that holds it, or --dataset FILE.")
        return {"path": name}
    entry = entries[name]
    if entry.get("num_samples") is not None:
        raise UserError(f"dataset '{name}': 'num_samples' resamples rows, which smolalign does not; remove it.")
    if entry.get("formatting") == "openai":
        raise UserError(f"dataset '{name}': LLaMA-Factory's openai formatting adds its own system text, which "
                        "smolalign does not; convert the file to messages.")
    source: dict[str, Any] = {"path": entry.get("hf_hub_url") or str(folder / entry["file_name"])}
    for entry_key, own_key in (("subset", "name"), ("split", "split"), ("folder", "data_dir")):
        if entry.get(entry_key):
            source[own_key] = entry[entry_key]
    roles = {"prompt": "prompt", "query": "input", "response": "completion", "messages": "messages",
             "system": "system", "chosen": "chosen", "rejected": "rejected", "kto_tag": "label"}
    columns = {roles[role]: column for role, column in entry.get("columns", {}).items() if role in roles and column}
    if columns:
        source["dataset_columns"] = columns
    return source
