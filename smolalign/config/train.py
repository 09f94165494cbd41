"""The training run's configuration: TrainConfig's fields, the rules its values obey, and how it is
loaded (defaults, then a YAML file, then `--key value` flags).

Keys use TRL's names wherever TRL has one, so a DPOConfig / ORPOConfig / CPOConfig user can move a
config over unchanged (config/trl.py reads TRL's own files). The resolved config is written to the run
folder and every checkpoint, and is enough to rerun the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from smolalign.config.choices import (
    ALGORITHM_TITLES,
    DPO_LOSS_TYPES,
    TRACKERS,
    Algorithm,
    BatchLayout,
    Device,
    DpoLossType,
    Dtype,
    Scheduler,
)
from smolalign.config.fields import Settings, nest, option, require, require_at_least
from smolalign.config.files import read_yaml
from smolalign.errors import UserError


@dataclass
class LoraSettings:
    """PEFT LoRA settings; present in a config as `lora: {r: 16, ...}`, absent or null for full fine-tuning."""

    r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA scaling numerator (scale = lora_alpha / r).")
    lora_dropout: float = option(0.05, "Dropout on the LoRA branch.")
    target_modules: str | list[str] = option(
        "all-linear", "Modules that get adapters: 'all-linear' (every linear layer but the output head) or a list."
    )


@dataclass
class TrainConfig(Settings):
    """Everything a run needs. Field names follow TRL's DPOConfig / ORPOConfig / CPOConfig. Fields marked
    `bookkeeping` change no number of the run (where and how often it reports and saves, how it splits
    work into chunks): a run may resume with other values of them."""

    command: ClassVar[str] = "train"

    # --- model ---
    model: str | None = option(None, "Hub id or local folder of the policy; empty = the embedded SmolLM2-135M-Instruct.")
    ref_model: str | None = option(
        None, "Reference model (Hub id or folder). Default: the initial policy (LoRA: adapters disabled)."
    )
    lora: LoraSettings | None = option(None, "LoRA settings (PEFT); null = full fine-tuning.")
    merge_lora: bool = option(False, "Save final/ with the LoRA adapter merged into the base weights.")
    chat_template: str | None = option(
        None, "'chatml' to give a base model ChatML (like TRL's setup_chat_format), or a Jinja template string."
    )
    dtype: Dtype = option(
        "auto", "Training precision; auto = float32 on CPU, bfloat16 on CUDA GPUs that support it. Half precision "
        "is autocast over float32 weights for full fine-tuning; LoRA keeps the frozen base weights in it."
    )
    device: Device = option("auto", "Where to train; auto = CUDA when available.")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")

    # --- data ---
    dataset: str | None = option(None, "Preference data: a JSONL/JSON/CSV/Parquet file or a Hub id; empty = bundled HH-RLHF.")
    dataset_config: str | None = option(None, "Configuration (subset) name when `dataset` is a Hub id.")
    dataset_split: str = option("train", "Split to read when `dataset` is a Hub id.")
    eval_dataset: str | None = option(None, "Held-out pairs (file or Hub id).")
    eval_dataset_config: str | None = option(None, "Configuration name of `eval_dataset`; default: dataset_config.")
    eval_split: str = option("test", "Split to read when `eval_dataset` is a Hub id.")
    test_split_size: float = option(0.0, "Hold out this fraction (<1) or number (>=1) of training pairs for evaluation.")
    max_train_pairs: int | None = option(None, "Use only the first N training pairs.")
    max_eval_pairs: int | None = option(None, "Use only the first N held-out pairs.")
    system_prompt: str | None = option(None, "System message prepended to conversational prompts that have none.")
    max_length: int = option(1024, "Maximum tokens of prompt + answer.")
    max_prompt_length: int | None = option(None, "Maximum prompt tokens (cut from the left, keeping the latest turns).")

    # --- algorithm ---
    algorithm: Algorithm = option(
        "dpo", "Objective: " + "; ".join(f"{name}, {title}" for name, title in ALGORITHM_TITLES.items()) + "."
    )
    loss_type: DpoLossType = option("sigmoid", f"DPO loss variant: {', '.join(DPO_LOSS_TYPES)}.")
    beta: float = option(0.1, "DPO/SimPO temperature; for ORPO the weight lambda of the odds-ratio term.")
    label_smoothing: float = option(0.0, "Label noise for loss_type robust (DPO) and for SimPO, in [0, 0.5).")
    rpo_alpha: float | None = option(None, "Weight of an NLL term on the chosen answers added to the DPO loss (RPO).")
    simpo_gamma: float = option(0.5, "SimPO target reward margin gamma.")
    cpo_alpha: float = option(0.0, "SimPO only: weight of an NLL term on the chosen answers (TRL's CPO-SimPO uses 1.0).")
    center_rewards_coefficient: float | None = option(
        None, "Reward models only: weight of the penalty that keeps rewards centred on zero (TRL's name)."
    )

    # --- optimisation ---
    learning_rate: float = option(1e-6, "Peak AdamW learning rate.")
    per_device_train_batch_size: int = option(8, "Pairs per micro-batch on each device.")
    per_device_eval_batch_size: int = option(8, "Pairs per evaluation batch on each device.", bookkeeping=True)
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    num_train_epochs: float = option(1.0, "Passes over the training pairs (ignored when max_steps > 0).")
    max_steps: int = option(-1, "Optimizer steps to run; -1 = derive from num_train_epochs.")
    lr_scheduler_type: Scheduler = option(
        "linear", "Learning-rate schedule after warmup."
    )
    warmup_ratio: float = option(0.0, "Fraction of the steps spent warming up linearly from 0.")
    warmup_steps: int = option(0, "Warmup steps; overrides warmup_ratio when > 0.")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norm weights).")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this value; 0 = no clipping.")
    max_nonfinite_steps: int = option(
        3, "A step whose loss or gradient norm is NaN or infinite is skipped (no update); after this many in a "
        "row the run stops, keeping its last checkpoint.", bookkeeping=True
    )
    seed: int = option(42, "Seed for data order, LoRA initialisation and dropout.")

    # --- performance ---
    batch_layout: BatchLayout = option(
        "auto", "How pairs become rows: padded (TRL's way), packed, prefix_shared; auto = fastest the model supports."
    )
    logprob_chunk_size: int = option(
        256, "Tokens per chunk when projecting hidden states onto the vocabulary.", bookkeeping=True
    )
    max_tokens_per_forward: int | None = option(
        None, "Run a batch through the model in chunks of whole pairs up to this many tokens (activation memory); "
        "auto = 256 on CPU (about one pair); on CUDA derived from free memory and the model's size (1024-32768). "
        "Numbers do not change.", bookkeeping=True
    )
    max_tokens_per_batch: int | None = option(
        None, "Token-budget batching: fill each micro-batch with pairs up to this many tokens instead of a fixed "
        "count (per_device_train_batch_size becomes the cap). Tokens are counted with each prompt once, for all "
        "processes together. Changes which pairs share a step."
    )
    precompute_ref_log_probs: bool | None = option(
        None, "Compute reference log-probs once before training and cache them on disk (keyed by the reference "
        "weights, so sweeps and eval reuse them); auto = on without ref_model, for full fine-tuning and LoRA."
    )

    # --- logging and saving ---
    output_dir: str = option("runs/smolalign", "Run folder.", bookkeeping=True)
    logging_steps: int = option(10, "Write metrics every N optimizer steps.", bookkeeping=True)
    eval_on_start: bool = option(
        False, "Evaluate the initial model before the first step (logged as step 0).", bookkeeping=True
    )
    eval_steps: int | None = option(
        None, "Evaluate on held-out pairs every N steps (and at the end); null = only at the end.", bookkeeping=True
    )
    save_steps: int = option(500, "Write a resumable checkpoint every N steps.", bookkeeping=True)
    save_total_limit: int | None = option(2, "Keep only the newest N checkpoints; null = keep all.", bookkeeping=True)
    resume_from_checkpoint: str | None = option(
        None, "Checkpoint folder to continue from, or 'latest' in output_dir.", bookkeeping=True
    )
    report_to: list[str] = option([], f"Trackers: {', '.join(TRACKERS)}.", bookkeeping=True)
    run_name: str | None = option(
        None, "Name shown in trackers and reports; default: the output_dir folder name.", bookkeeping=True
    )
    push_to_hub: bool = option(
        False, "Upload final/ (with its model card) and the report to the Hugging Face Hub when the run ends; "
        "needs a token (`hf auth login` or HF_TOKEN) and the network, both checked before training starts.",
        bookkeeping=True,
    )
    hub_model_id: str | None = option(
        None, "Hub repository to push to, 'namespace/name' or 'name' (in your namespace); default: your "
        "namespace / the output_dir folder name.", bookkeeping=True
    )
    hub_private: bool | None = option(
        None, "Create the Hub repository private; null = the Hub's default (public unless your organisation "
        "says otherwise). An existing repository keeps its visibility.", bookkeeping=True
    )

    def validate(self) -> None:
        _check_values(self)
        _check_algorithm(self)
        if self.hub_model_id is not None:
            _check_hub_model_id(self.hub_model_id)


def load_config(source: str | Path | TrainConfig | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then `source` (a YAML file or packaged recipe, or a TrainConfig to start from), then
    `overrides` (key -> value; `lora.r` reaches a nested key)."""
    if isinstance(source, TrainConfig):
        values = source.to_dict()
    else:
        from smolalign.config.trl import translate_trl_config  # a TRL DPOConfig / ORPOConfig / CPOConfig file

        values = translate_trl_config(read_yaml(source) if source is not None else {})
    for key, value in nest(overrides or {}).items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}  # a flag changes one key of a YAML section, not all
        else:
            values[key] = value
    return TrainConfig.from_values(values)


def describe_keys() -> str:
    """Help text listing every config key with its default, for `smolalign train --help`."""
    lines = []
    for prefix, cls in (("", TrainConfig), ("lora.", LoraSettings)):
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{prefix}{f.name} (default: {default!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


# -- the rules ------------------------------------------------------------------------------------


def check_lengths(max_length: int | None, max_prompt_length: int | None) -> None:
    """Token limits that leave room for a prompt and an answer (None: not known yet)."""
    if max_length is not None:
        require(max_length >= 2, f"'max_length' must be >= 2, not {max_length}.")
    if max_prompt_length is not None:
        limit = max_length if max_length is not None else float("inf")
        require(
            1 <= max_prompt_length < limit,
            f"'max_prompt_length' ({max_prompt_length}) must be >= 1 and below max_length ({max_length}).",
        )


def _check_values(config: TrainConfig) -> None:
    """Each value on its own, and the data and LoRA settings together."""
    require(config.beta > 0, f"'beta' must be > 0, not {config.beta}.")
    require(config.learning_rate >= 0, f"'learning_rate' must be >= 0, not {config.learning_rate}.")
    require(0 <= config.label_smoothing < 0.5, f"'label_smoothing' must lie in [0, 0.5), not {config.label_smoothing}.")
    require_at_least(config, 1, "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "logging_steps", "save_steps", "logprob_chunk_size",
                     "max_nonfinite_steps", "eval_steps", "save_total_limit", "max_train_pairs", "max_eval_pairs",
                     "max_tokens_per_forward", "max_tokens_per_batch")
    check_lengths(config.max_length, config.max_prompt_length)
    require(config.max_steps > 0 or config.num_train_epochs > 0, "set 'max_steps' > 0 or 'num_train_epochs' > 0.")
    require(config.max_steps != 0, "'max_steps' must be > 0, or -1 to train for num_train_epochs.")
    require(0 <= config.warmup_ratio <= 1, f"'warmup_ratio' must lie in [0, 1], not {config.warmup_ratio}.")
    require(config.warmup_steps >= 0, f"'warmup_steps' must be >= 0, not {config.warmup_steps}.")
    require(config.max_grad_norm >= 0, f"'max_grad_norm' must be >= 0, not {config.max_grad_norm}.")
    require(config.test_split_size >= 0, f"'test_split_size' must be >= 0, not {config.test_split_size}.")
    require(
        config.test_split_size < 1 or float(config.test_split_size).is_integer(),
        f"'test_split_size' is a fraction below 1 or a whole number of pairs, not {config.test_split_size}.",
    )
    require(
        config.eval_dataset is None or config.test_split_size == 0,
        "set either 'eval_dataset' or 'test_split_size', not both.",
    )
    config.report_to = [t for t in config.report_to if t != "none"]  # TRL's way of saying no tracker
    for tracker in config.report_to:
        require(tracker in TRACKERS, f"'report_to' accepts {' and '.join(TRACKERS)}, not '{tracker}'.")
    if config.lora is not None:
        require(config.lora.r >= 1, f"'lora.r' must be >= 1, not {config.lora.r}.")
        require(0 <= config.lora.lora_dropout < 1, "'lora.lora_dropout' must lie in [0, 1).")
    else:
        require(not config.merge_lora, "'merge_lora' needs LoRA; add a 'lora:' section or drop merge_lora.")


def _check_algorithm(config: TrainConfig) -> None:
    """Settings that belong to some algorithms only."""
    name = config.algorithm
    if name == "dpo":
        require(
            config.label_smoothing == 0 or config.loss_type == "robust",
            "'label_smoothing' applies to loss_type robust (and to simpo); set loss_type: robust or remove it.",
        )
        require(config.rpo_alpha is None or config.rpo_alpha >= 0, "'rpo_alpha' must be >= 0.")
    else:
        require(config.loss_type == TrainConfig.loss_type,
                f"'loss_type' selects a DPO variant; it does not apply to {name}.")
        require(config.rpo_alpha is None, f"'rpo_alpha' adds an NLL term to DPO; it does not apply to {name}.")
        require(config.ref_model is None, f"{name} is reference-free; remove 'ref_model' (it would be loaded and "
                                          "never used).")
        require(
            not config.precompute_ref_log_probs,
            f"{name} is reference-free, so there is nothing to precompute; remove 'precompute_ref_log_probs'.",
        )
        require(config.label_smoothing == 0 or name == "simpo", f"'label_smoothing' does not apply to {name}.")
    require(config.cpo_alpha == 0 or name == "simpo", "'cpo_alpha' applies to simpo only.")
    require(config.cpo_alpha >= 0, "'cpo_alpha' must be >= 0.")
    require(
        config.center_rewards_coefficient is None or name == "reward",
        "'center_rewards_coefficient' applies to algorithm: reward only.",
    )


def _check_hub_model_id(hub_model_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(hub_model_id)
    except HFValidationError:
        raise UserError(f"'hub_model_id' must be 'name' or 'namespace/name' with letters, digits, '-', '_' or "
                        f"'.' (at most 96), not '{hub_model_id}'.") from None
