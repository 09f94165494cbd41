"""Every key of TRL's configs (and the alignment-handbook's), sorted by what smolalign does with it.

config/trl.py applies these tables; the tests check them against the installed TRL, so a key TRL adds
is sorted here before a user meets it.
"""

from __future__ import annotations

from typing import Any

from smolalign.config.translation import same_setting

# TRL's (or the handbook's) name -> smolalign's, same value. Keys spelled alike need no entry.
RENAMED = {
    "model_name_or_path": "model",
    "dataset_name": "dataset",
    "dataset_config_name": "dataset_config",  # TRL's spelling before `dataset_config`, and the handbook's
    "dataset_train_split": "dataset_split",
    "hub_private_repo": "hub_private",
}
# Groups of keys that set the same thing: a command-line flag of one replaces the file's others.
SAME_SETTING_GROUPS = (
    ("model", "model_name_or_path", "model_revision"),
    ("dataset", "dataset_name", "datasets", "dataset_mixture", "dataset_mixer", "dataset_splits", "streaming"),
    ("dataset_config", "dataset_config_name"),
    ("dataset_split", "dataset_train_split"),
    ("eval_dataset", "test_split_size", "dataset_test_split"),
    ("dtype", "bf16", "fp16"),
    ("algorithm", "trl_config"),
    ("hub_private", "hub_private_repo"),
    ("eval_strategy", "evaluation_strategy"),
)
SAME_SETTING = same_setting(SAME_SETTING_GROUPS)

# How many processes or devices run the job: smolalign runs in the processes it is started in.
LAUNCH_ONLY = frozenset({
    "num_processes", "accelerate_config", "deepspeed", "fsdp", "fsdp_config", "local_rank", "accelerator_config",
    "parallelism_config", "ddp_find_unused_parameters", "ddp_timeout", "ddp_backend", "ddp_bucket_cap_mb",
    "ddp_broadcast_buffers", "ddp_static_graph", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "dataloader_in_order", "dataset_num_proc", "preprocessing_num_workers", "dataset_streaming", "streaming",
})

# How TRL runs, not what it computes: any value is accepted and ignored.
IGNORED = frozenset({
    # kernels and memory: smolalign chooses its own attention kernel, batch layout and head computation
    "attn_implementation", "tf32", "bf16_full_eval", "fp16_full_eval", "use_liger_kernel", "liger_kernel_config",
    "torch_compile", "torch_compile_backend", "torch_compile_mode", "padding_free", "pad_to_multiple_of",
    "padding_value", "pad_token", "label_pad_token_id", "use_logits_to_keep", "gradient_checkpointing_kwargs",
    "activation_checkpointing", "activation_checkpointing_kwargs", "activation_offloading", "model_init_kwargs",
    "use_cache", "enable_jit_checkpoint", "average_tokens_across_devices", "torch_empty_cache_steps",
    "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage",  # only read with load_in_4bit
    "precompute_ref_batch_size", "remove_unused_columns", "label_names", "length_column_name", "debug",
    # logging, saving, evaluating: smolalign logs to metrics.jsonl, saves every save_steps, evaluates at the end
    # and every eval_steps
    "logging_dir", "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "log_level",
    "log_level_replica", "log_on_each_node", "disable_tqdm", "save_strategy", "save_safetensors", "save_only_model",
    "save_on_each_node", "overwrite_output_dir", "do_train", "do_eval", "do_predict", "eval_accumulation_steps",
    "eval_do_concat_batches", "include_tokens_per_second", "include_num_input_tokens_seen", "include_for_metrics",
    "skip_memory_metrics", "generate_during_eval", "hub_strategy", "hub_token", "hub_always_push",
    "ignore_bias_buffers", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
    "metric_for_best_model", "greater_is_better", "prediction_loss_only", "batch_eval_metrics", "eval_delay",
    "eval_use_gather_object", "full_determinism", "is_encoder_decoder", "ignore_data_skip",
    "restore_callback_states_from_checkpoint", "hub_model_revision", "text_column", "auto_insert_empty_system_msg",
    # settings read only when another key, refused below at a non-default value, switches their feature on
    "ref_model_mixup_alpha", "ref_model_sync_steps", "force_use_ref_model",
})

# Features smolalign does not have: accepted (and nothing to do) at TRL's default, where they are off.
DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "use_rslora": (False,),
    "use_dora": (False,),
    "load_in_8bit": (False,),
    "load_in_4bit": (False,),
    "lora_modules_to_save": (None,),
    "lora_target_parameters": (None,),
    "lora_task_type": ("CAUSAL_LM",),
    "optim_args": (None,),
    "optim_target_modules": (None,),
    "disable_dropout": (True,),  # smolalign always trains without dropout, as TRL by default
    "max_completion_length": (None,),
    "reference_free": (False,),
    "sync_ref_model": (False,),
    "router_aux_loss_coef": (None,),
    "alpha": (0.0,),  # CPOConfig's AlphaPO exponent
    "neftune_noise_alpha": (None,),
    "label_smoothing_factor": (0.0,),
    "group_by_length": (False,),
    "auto_find_batch_size": (False,),
    "hub_revision": (None,),
    "data_seed": (None,),
    "dataloader_drop_last": (False,),
    "load_best_model_at_end": (False,),
}
# What a refusal of these says instead of "no equivalent".
REFUSALS = {
    "load_in_4bit": "QLoRA (a 4-bit base model through bitsandbytes on a CUDA GPU), which smolalign does not do; it "
                    "trains LoRA over the full- or half-precision base model: drop it with --load_in_4bit false",
    "load_in_8bit": "an 8-bit base model through bitsandbytes, which smolalign does not do; drop it with "
                    "--load_in_8bit false",
}

# transformers' optimizers that are AdamW with their state kept in 8 or 4 bits, or paged to the CPU: the same
# update as torch's AdamW, up to the rounding of that state.
COMPRESSED_ADAMW = frozenset({"adamw_hf", "adamw_torch_npu_fused", "adamw_apex_fused", "adamw_anyprecision",
                              "adamw_torch_xla", "adamw_torch_4bit", "adamw_torch_8bit", "adamw_bnb_8bit",
                              "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"})
TORCH_ADAMW = frozenset({"adamw_torch", "adamw_torch_fused"})

LORA_KEYS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
             "lora_target_modules": "target_modules"}
# TRL leaves lora_target_modules to PEFT, which adapts q_proj and v_proj on Llama, Mistral, Qwen2, Gemma
# (SmolLM2 is a Llama); smolalign's own default is all-linear.
TRL_LORA_TARGETS = ["q_proj", "v_proj"]
HANDLED = {"trl_config", "use_peft", *LORA_KEYS, "bf16", "fp16", "dtype", "torch_dtype", "use_cpu", "eval_strategy",
           "evaluation_strategy", "dataset_test_split", "optim", "datasets", "dataset_mixture", "dataset_mixer",
           "dataset_splits", "truncation_mode", "model_revision"}

TRL_CLASSES = {"dpo": ("DPOConfig", "dpo"), "orpo": ("ORPOConfig", "orpo"), "cpo": ("CPOConfig", "simpo"),
               "kto": ("KTOConfig", "kto")}
TRL_ALGORITHMS = ("dpo", "orpo", "simpo")  # what smolalign trains and TRL's trainers too (bench compares them)
# TRL's defaults that differ from smolalign's and change what a run computes.
TRL_DEFAULTS = {"num_train_epochs": 3.0}
CLASS_DEFAULTS = {"simpo": {"cpo_alpha": 1.0}, "kto": {"train_sampling_strategy": "sequential"}}


