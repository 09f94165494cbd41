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

from smolalign.config.algorithms import check_algorithm_settings
from smolalign.config.choices import (
    ALGORITHM_TITLES,
    DPO_LOSS_TYPES,
    KTO_LOSS_TYPES,
    TRACKERS,
    Algorithm,
    BatchLayout,
    Device,
    Dtype,
    FDivergence,
    LossType,
    Quantization,
    SamplingStrategy,
    Scheduler,
)
from smolalign.config.fields import Settings, nest, option, require, require_at_least, required
from smolalign.config.files import read_yaml
from smolalign.errors import UserError


@dataclass
class LoraSettings:
    """PEFT LoRA settings; present in a config as `lora: {r: 16, ...}`, absent or null for full fine-tuning."""

    r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA scaling numerator (scale = lora_alpha / r).")
    lora_dropout: float = option(0.05, "Dropout on the LoRA branch, as the saved adapter records it (training turns "
                                       "every dropout off, as TRL's preference trainers do).")
    target_modules: str | list[str] = option(
        "all-linear", "Modules that get adapters: 'all-linear' (every linear layer but the output head) or a list."
    )


@dataclass
class DatasetSource:
    """One dataset of a mixture: TRL's `datasets` entries (the arguments of `datasets.load_dataset`) and
    alignment-handbook's `dataset_mixture` entries."""

    path: str = required("File, folder or Hub id (or a `datasets` builder such as json, with data_files).")
    name: str | None = option(None, "Configuration (subset) of a Hub dataset.")
    split: str = option("train", "Split to read.")
    data_dir: str | None = option(None, "Folder of the data files inside the dataset.")
    data_files: str | list[str] | None = option(None, "Data file(s) to read.")
    columns: list[str] | None = option(None, "Keep only these columns.")
    dataset_columns: dict[str, str] | None = option(None, "Role -> column for columns named otherwise (as "
                                                          "dataset_columns).")
    fraction: float | None = option(None, "TRL: this dataset's share of the mixture (set for all or none).")
    weight: float | None = option(None, "alignment-handbook: keep this share of the dataset's rows, drawn with the "
                                        "run's seed.")


@dataclass
class TrainConfig(Settings):
    """Everything a run needs. Field names follow TRL's DPOConfig / ORPOConfig / CPOConfig. Fields marked
    `bookkeeping` change no number of the run (where and how often it reports and saves, how it splits
    work into chunks): a run may resume with other values of them."""

    command: ClassVar[str] = "train"

    # --- model ---
    model: str | None = option(None, "Hub id or local folder of the policy; empty = the embedded SmolLM2-135M-Instruct.")
    model_revision: str | None = option(None, "Branch, tag or commit of a Hub model (policy and reference).")
    trust_remote_code: bool = option(False, "Run code from the model's repository (transformers' trust_remote_code).")
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
    dataset: str | None = option(None, "Training data: a JSON/JSONL/CSV file (also .gz, .bz2, .xz), Parquet or Arrow "
                                             "file, a folder, or a Hub id; empty = the bundled HH-RLHF pairs.")
    dataset_config: str | None = option(None, "Configuration (subset) name when `dataset` is a Hub id.")
    dataset_split: str = option("train", "Split to read when `dataset` is a Hub id or a folder of splits.")
    dataset_columns: dict[str, str] | None = option(
        None, "Role -> column for data whose columns are named otherwise, e.g. {prompt: question, chosen: best, "
        "rejected: worst}; roles: prompt, input, chosen, rejected, completion, label, system, messages."
    )
    dataset_mixture: list[DatasetSource] = option(
        [], "Several datasets concatenated (instead of `dataset`): a list of {path, name, split, columns, ...}."
    )
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
    loss_type: LossType | list[LossType] | None = option(
        None, f"DPO's loss: {', '.join(DPO_LOSS_TYPES)}, or a list of them, summed with loss_weights (default "
        f"sigmoid); KTO's: {' or '.join(KTO_LOSS_TYPES)} (default kto)."
    )
    loss_weights: list[float] | None = option(None, "DPO: the weight of each loss_type term (default 1 each).")
    beta: float = option(0.1, "DPO/KTO/SimPO temperature; for ORPO the weight lambda of the odds-ratio term.")
    label_smoothing: float = option(
        0.0, "Label noise eps in [0, 0.5): DPO's robust, exo_pair (needs eps > 0), aot and aot_unpaired; SimPO.")
    rpo_alpha: float | None = option(None, "Weight of an NLL term on the chosen answers added to the DPO loss (RPO).")
    f_divergence_type: FDivergence = option(
        "reverse_kl", "DPO: the divergence that constrains the policy to the reference (Wang et al. 2023).")
    f_alpha_divergence_coef: float = option(0.5, "DPO: alpha of f_divergence_type alpha_divergence.")
    ld_alpha: float | None = option(
        None, "DPO: LD-DPO's weight in [0, 1] of the answer tokens beyond the shorter answer's length.")
    use_weighting: bool = option(False, "DPO: weight each pair by how likely the policy finds its answers (WPO).")
    discopop_tau: float = option(0.05, "DPO: temperature of loss_type discopop.")
    desirable_weight: float = option(1.0, "KTO: weight of the losses of desirable rows.")
    undesirable_weight: float = option(1.0, "KTO: weight of the losses of undesirable rows.")
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
    lr_scheduler_type: Scheduler = option("linear", "Learning-rate schedule after warmup (transformers' names).")
    lr_scheduler_kwargs: dict[str, float | str] | None = option(
        None, "Settings of the schedule, e.g. {min_lr_rate: 0.1} for cosine_with_min_lr (transformers' names)."
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
    train_sampling_strategy: SamplingStrategy = option(
        "random", "Order of the training pairs: random (a new permutation each epoch) or sequential (as read; "
        "TRL's KTO default).")

    # --- performance ---
    batch_layout: BatchLayout = option(
        "auto", "How pairs become rows: padded (TRL's way), packed, prefix_shared; auto = fastest the model supports."
    )
    logprob_chunk_size: int = option(
        256, "Tokens per chunk when projecting hidden states onto the vocabulary.", bookkeeping=True
    )
    max_tokens_per_forward: int | None = option(
        None, "Run a batch through the model in chunks of whole pairs up to this many tokens (activation memory); "
        "auto = 256 on CPU (about one pair), 1024 under bf16 autocast; on CUDA derived from free memory and the "
        "model's size (1024-32768). Numbers do not change (in float32; half precision rounds per chunk).", bookkeeping=True
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
    logging_steps: float = option(10, "Write metrics every N optimizer steps (below 1: that share of the run's "
                                      "steps, as transformers reads it).", bookkeeping=True)
    eval_on_start: bool = option(
        False, "Evaluate the initial model before the first step (logged as step 0).", bookkeeping=True
    )
    eval_steps: float | None = option(
        None, "Evaluate on held-out pairs every N steps (and at the end; below 1: that share of the steps); null = "
        "only at the end.", bookkeeping=True
    )
    save_steps: float = option(500, "Write a resumable checkpoint every N steps (below 1: that share of the steps).",
                               bookkeeping=True)
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
    export_gguf: Quantization | None = option(
        None, "Also write final/ as a GGUF file (output_dir/<run name>-<quantization>.gguf) for llama.cpp, "
        "Ollama and LM Studio.", bookkeeping=True,
    )
    hub_private: bool | None = option(
        None, "Create the Hub repository private; null = the Hub's default (public unless your organisation "
        "says otherwise). An existing repository keeps its visibility.", bookkeeping=True
    )

    def validate(self) -> None:
        _check_values(self)
        check_algorithm_settings(self)
        if self.hub_model_id is not None:
            _check_hub_model_id(self.hub_model_id)


def load_config(source: str | Path | TrainConfig | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then `source` (a YAML file or packaged recipe, in smolalign's keys or those of TRL, the
    alignment-handbook or LLaMA-Factory, or a TrainConfig to start from), then `overrides` (key -> value;
    `lora.r` reaches a nested key), applied before anything is checked."""
    from smolalign.config.foreign import translate

    file_values = source.to_dict() if isinstance(source, TrainConfig) else read_yaml(source) if source else {}
    return TrainConfig.from_values(translate(file_values, nest(overrides or {})))


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
                     "gradient_accumulation_steps", "logprob_chunk_size", "max_nonfinite_steps", "save_total_limit",
                     "max_train_pairs", "max_eval_pairs", "max_tokens_per_forward", "max_tokens_per_batch")
    for key in ("logging_steps", "save_steps", "eval_steps"):
        value = getattr(config, key)
        require(value is None or (value > 0 and (value < 1 or float(value).is_integer())),
                f"'{key}' is a whole number of steps or a share of the run's steps below 1, not {value}.")
    require(not (config.dataset and config.dataset_mixture), "set either 'dataset' or 'dataset_mixture', not both.")
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


def _check_hub_model_id(hub_model_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(hub_model_id)
    except HFValidationError:
        raise UserError(f"'hub_model_id' must be 'name' or 'namespace/name' with letters, digits, '-', '_' or "
                        f"'.' (at most 96), not '{hub_model_id}'.") from None
