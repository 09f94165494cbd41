"""Run configuration: typed dataclasses filled from YAML, then from `--key value` flags.

Keys use TRL's names wherever TRL has one, so a DPOConfig / ORPOConfig / CPOConfig user can move a
config over unchanged. Unknown keys and values of the wrong type are errors that name the key and the
closest valid one; nothing is dropped silently. The resolved config is written to the run folder and
every checkpoint, and is enough to rerun the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from smolalign.errors import UserError, first_line

DPO_LOSS_TYPES = (
    "sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
)


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class LoraSettings:
    """PEFT LoRA settings; present in a config as `lora: {r: 16, ...}`, absent or null for full fine-tuning."""

    r: int = _opt(16, "LoRA rank.")
    lora_alpha: int = _opt(32, "LoRA scaling numerator (scale = lora_alpha / r).")
    lora_dropout: float = _opt(0.05, "Dropout on the LoRA branch.")
    target_modules: str | list[str] = _opt(
        "all-linear", "Modules that get adapters: 'all-linear' (every linear layer but the output head) or a list."
    )


@dataclass
class TrainConfig:
    """Everything a run needs. Field names follow TRL's DPOConfig / ORPOConfig / CPOConfig."""

    # --- model ---
    model: str | None = _opt(None, "Hub id or local folder of the policy; empty = the embedded SmolLM2-135M-Instruct.")
    ref_model: str | None = _opt(
        None, "Reference model (Hub id or folder). Default: the initial policy (LoRA: adapters disabled)."
    )
    lora: LoraSettings | None = _opt(None, "LoRA settings (PEFT); null = full fine-tuning.")
    merge_lora: bool = _opt(False, "Save final/ with the LoRA adapter merged into the base weights.")
    chat_template: str | None = _opt(
        None, "'chatml' to give a base model ChatML (like TRL's setup_chat_format), or a Jinja template string."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _opt(
        "auto", "Training precision; auto = float32 on CPU, bfloat16 on CUDA GPUs that support it. Half precision "
        "is autocast over float32 weights for full fine-tuning; LoRA keeps the frozen base weights in it."
    )
    device: Literal["auto", "cpu", "cuda"] = _opt("auto", "Where to train; auto = CUDA when available.")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in the backward pass to save memory.")

    # --- data ---
    dataset: str | None = _opt(None, "Preference data: a JSONL/JSON/CSV/Parquet file or a Hub id; empty = bundled HH-RLHF.")
    dataset_config: str | None = _opt(None, "Configuration (subset) name when `dataset` is a Hub id.")
    dataset_split: str = _opt("train", "Split to read when `dataset` is a Hub id.")
    eval_dataset: str | None = _opt(None, "Held-out pairs (file or Hub id).")
    eval_dataset_config: str | None = _opt(None, "Configuration name of `eval_dataset`; default: dataset_config.")
    eval_split: str = _opt("test", "Split to read when `eval_dataset` is a Hub id.")
    test_split_size: float = _opt(0.0, "Hold out this fraction (<1) or number (>=1) of training pairs for evaluation.")
    max_train_pairs: int | None = _opt(None, "Use only the first N training pairs.")
    max_eval_pairs: int | None = _opt(None, "Use only the first N held-out pairs.")
    system_prompt: str | None = _opt(None, "System message prepended to conversational prompts that have none.")
    max_length: int = _opt(1024, "Maximum tokens of prompt + answer.")
    max_prompt_length: int | None = _opt(None, "Maximum prompt tokens (cut from the left, keeping the latest turns).")

    # --- algorithm ---
    algorithm: Literal["dpo", "orpo", "simpo", "sft", "reward"] = _opt(
        "dpo", "Objective: dpo, orpo, simpo, sft, or reward (a Bradley-Terry reward model)."
    )
    loss_type: str = _opt("sigmoid", f"DPO loss variant: {', '.join(DPO_LOSS_TYPES)}.")
    beta: float = _opt(0.1, "DPO/SimPO temperature; for ORPO the weight lambda of the odds-ratio term.")
    label_smoothing: float = _opt(0.0, "Label noise for loss_type robust (DPO) and for SimPO, in [0, 0.5).")
    rpo_alpha: float | None = _opt(None, "Weight of an NLL term on the chosen answers added to the DPO loss (RPO).")
    simpo_gamma: float = _opt(0.5, "SimPO target reward margin gamma.")
    cpo_alpha: float = _opt(0.0, "SimPO only: weight of an NLL term on the chosen answers (TRL's CPO-SimPO uses 1.0).")
    center_rewards_coefficient: float | None = _opt(
        None, "Reward models only: weight of the penalty that keeps rewards centred on zero (TRL's name)."
    )

    # --- optimisation ---
    learning_rate: float = _opt(1e-6, "Peak AdamW learning rate.")
    per_device_train_batch_size: int = _opt(8, "Pairs per micro-batch on each device.")
    per_device_eval_batch_size: int = _opt(8, "Pairs per evaluation batch on each device.")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.")
    num_train_epochs: float = _opt(1.0, "Passes over the training pairs (ignored when max_steps > 0).")
    max_steps: int = _opt(-1, "Optimizer steps to run; -1 = derive from num_train_epochs.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = _opt(
        "linear", "Learning-rate schedule after warmup."
    )
    warmup_ratio: float = _opt(0.0, "Fraction of the steps spent warming up linearly from 0.")
    warmup_steps: int = _opt(0, "Warmup steps; overrides warmup_ratio when > 0.")
    weight_decay: float = _opt(0.0, "AdamW weight decay (not applied to biases and norm weights).")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _opt(1.0, "Clip the global gradient norm to this value; 0 = no clipping.")
    max_nonfinite_steps: int = _opt(
        3, "A step whose loss or gradient norm is NaN or infinite is skipped (no update); after this many in a "
        "row the run stops, keeping its last checkpoint."
    )
    seed: int = _opt(42, "Seed for data order, LoRA initialisation and dropout.")

    # --- performance ---
    batch_layout: Literal["auto", "padded", "packed", "prefix_shared"] = _opt(
        "auto", "How pairs become rows: padded (TRL's way), packed, prefix_shared; auto = fastest the model supports."
    )
    logprob_chunk_size: int = _opt(256, "Tokens per chunk when projecting hidden states onto the vocabulary.")
    max_tokens_per_forward: int | None = _opt(
        None, "Run a batch through the model in chunks of whole pairs up to this many tokens (activation memory); "
        "auto = 256 on CPU (about one pair); on CUDA derived from free memory and the model's size (1024-32768). "
        "Numbers do not change."
    )
    max_tokens_per_batch: int | None = _opt(
        None, "Token-budget batching: fill each micro-batch with pairs up to this many tokens instead of a fixed "
        "count (per_device_train_batch_size becomes the cap). Tokens are counted with each prompt once, for all "
        "processes together. Changes which pairs share a step."
    )
    precompute_ref_log_probs: bool | None = _opt(
        None, "Compute reference log-probs once before training and cache them on disk (keyed by the reference "
        "weights, so sweeps and eval reuse them); auto = on without ref_model, for full fine-tuning and LoRA."
    )

    # --- logging and saving ---
    output_dir: str = _opt("runs/smolalign", "Run folder.")
    logging_steps: int = _opt(10, "Write metrics every N optimizer steps.")
    eval_on_start: bool = _opt(False, "Evaluate the initial model before the first step (logged as step 0).")
    eval_steps: int | None = _opt(None, "Evaluate on held-out pairs every N steps (and at the end); null = only at the end.")
    save_steps: int = _opt(500, "Write a resumable checkpoint every N steps.")
    save_total_limit: int | None = _opt(2, "Keep only the newest N checkpoints; null = keep all.")
    resume_from_checkpoint: str | None = _opt(None, "Checkpoint folder to continue from, or 'latest' in output_dir.")
    report_to: list[str] = field(default_factory=list, metadata={"help": "Trackers: tensorboard, wandb."})
    run_name: str | None = _opt(None, "Name shown in trackers and reports; default: the output_dir folder name.")
    push_to_hub: bool = _opt(
        False, "Upload final/ (with its model card) and the report to the Hugging Face Hub when the run ends; "
        "needs a token (`hf auth login` or HF_TOKEN) and the network, both checked before training starts."
    )
    hub_model_id: str | None = _opt(
        None, "Hub repository to push to, 'namespace/name' or 'name' (in your namespace); default: your "
        "namespace / the output_dir folder name."
    )
    hub_private: bool | None = _opt(
        None, "Create the Hub repository private; null = the Hub's default (public unless your organisation "
        "says otherwise). An existing repository keeps its visibility."
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- building a config ----------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then `overrides` (key -> value; `lora.r` reaches a nested key)."""
    values: dict[str, Any] = read_yaml(path) if path is not None else {}
    from smolalign.config.trl import translate_trl_config  # a TRL DPOConfig / ORPOConfig / CPOConfig file

    values = translate_trl_config(values)
    for key, value in _nest(overrides or {}).items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}  # a flag changes one key of a YAML section, not all
        else:
            values[key] = value
    config = build_dataclass(TrainConfig, values, where="config")
    validate(config)
    return config


RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def recipe_path(name: str | Path) -> Path:
    """A config file: `name` itself when it exists, else the packaged recipe of that name (`demo`,
    `recipes/demo.yaml`), so the recipes work from any folder after `pip install smolalign`."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = RECIPES_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(recipe.stem for recipe in RECIPES_DIR.glob("*.yaml")))
    raise UserError(f"config file '{name}' does not exist, and no packaged recipe has that name ({known}).")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = recipe_path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"config file '{path}' is not valid YAML: {first_line(error)}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of keys to values, not {type(data).__name__}.")
    return data


class FlagText(str):
    """A value typed on the command line. Text keys keep it verbatim; other keys read it as YAML."""


def parse_override_args(args: list[str]) -> dict[str, Any]:
    """Turn `--key value`, `--key=value` and bare `--flag` (true) into {key: value}; `--key=` is null."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(args):
        token = args[index]
        if not token.startswith("--") or token == "--":
            raise UserError(f"unexpected argument '{token}'; options look like --key value.")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            next_is_value = index + 1 < len(args) and not args[index + 1].startswith("--")
            value = FlagText(args[index + 1]) if next_is_value else True
            index += 1 if next_is_value else 0
        overrides[key.replace("-", "_")] = None if value == "" else FlagText(value) if isinstance(value, str) else value
        index += 1
    return overrides


def _read_flag(value: FlagText, key: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise UserError(f"cannot read the value {str(value)!r} given for '{key}'.") from None


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """`{"lora.r": 8}` -> `{"lora": {"r": 8}}`, so flags can reach nested settings."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        head, dot, rest = key.partition(".")
        if dot:
            section = nested.setdefault(head, {})
            if not isinstance(section, dict):
                raise UserError(f"'{head}' is set both as a value and as a section.")
            section[rest] = value
        else:
            nested[key] = value
    return nested


def build_dataclass(cls: type, values: dict[str, Any], *, where: str) -> Any:
    """Instantiate `cls` from a mapping, coercing each value to its field's annotated type."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(unknown_key_message(key, known, where))
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where != "config" else key)
    return cls(**kwargs)


def unknown_key_message(key: str, known: list[str], where: str) -> str:
    place = "" if where == "config" else f" in '{where}'"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "run `smolalign train --help` for the list of keys."
    return f"unknown config key '{key}'{place}; {hint}"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(value, FlagText):
        value = _from_flag(value, annotation, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if isinstance(value, str) and "," in value and any(typing.get_origin(o) is list for o in options):
            options.sort(key=lambda o: typing.get_origin(o) is not list)  # "a,b" is a list where one is allowed
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key)
            except UserError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.7)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"'{key}' must be one of {', '.join(map(str, args))}, not '{value}'{hint}.")
        return value
    if origin is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise UserError(f"'{key}' must be a list, not {value!r}.")
        return [_coerce(item, args[0], key) for item in items]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise UserError(f"'{key}' must be a mapping of settings, not {value!r}.")
        return build_dataclass(annotation, value, where=key)
    return _coerce_scalar(value, annotation, key)


def _from_flag(value: FlagText, annotation: Any, key: str) -> Any:
    """Command-line text as the key needs it: verbatim for text keys, YAML for numbers, lists, sections."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (
        annotation,
    )
    if type(None) in options and value.lower() in ("null", "none", "~"):
        return None
    takes_text = any(o is str or typing.get_origin(o) is Literal for o in options)
    takes_list = any(typing.get_origin(o) is list for o in options)
    if takes_text or (takes_list and not value.lstrip().startswith("[")):
        return str(value)
    return _read_flag(value, key)


def _coerce_scalar(value: Any, annotation: type, key: str) -> Any:
    if value is None:
        raise UserError(f"'{key}' needs a value of type {annotation.__name__}, not null.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-6" as a string
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(f"'{key}' must be of type {annotation.__name__}, not {value!r}.")


# -- validation -----------------------------------------------------------------------------------


def validate(config: TrainConfig) -> None:
    """Reject values and combinations that cannot work, with the reason."""

    def require(condition: bool, message: str) -> None:
        if not condition:
            raise UserError(message)

    require(config.beta > 0, f"'beta' must be > 0, not {config.beta}.")
    require(config.learning_rate >= 0, f"'learning_rate' must be >= 0, not {config.learning_rate}.")
    require(0 <= config.label_smoothing < 0.5, f"'label_smoothing' must lie in [0, 0.5), not {config.label_smoothing}.")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "save_steps", "logprob_chunk_size", "max_nonfinite_steps"):
        require(getattr(config, key) >= 1, f"'{key}' must be >= 1, not {getattr(config, key)}.")
    require(config.max_length >= 2, f"'max_length' must be >= 2, not {config.max_length}.")
    if config.max_prompt_length is not None:
        require(
            1 <= config.max_prompt_length < config.max_length,
            f"'max_prompt_length' ({config.max_prompt_length}) must be >= 1 and below max_length ({config.max_length}).",
        )
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
    require(config.eval_steps is None or config.eval_steps >= 1, "'eval_steps' must be >= 1 or null.")
    require(config.save_total_limit is None or config.save_total_limit >= 1, "'save_total_limit' must be >= 1 or null.")
    for key in ("max_train_pairs", "max_eval_pairs", "max_tokens_per_forward", "max_tokens_per_batch"):
        value = getattr(config, key)
        require(value is None or value >= 1, f"'{key}' must be >= 1 or null, not {value}.")
    require(
        config.eval_dataset is None or config.test_split_size == 0,
        "set either 'eval_dataset' or 'test_split_size', not both.",
    )
    config.report_to = [t for t in config.report_to if t != "none"]  # TRL's way of saying no tracker
    for tracker in config.report_to:
        require(tracker in ("tensorboard", "wandb"), f"'report_to' accepts tensorboard and wandb, not '{tracker}'.")
    if config.lora is not None:
        require(config.lora.r >= 1, f"'lora.r' must be >= 1, not {config.lora.r}.")
        require(0 <= config.lora.lora_dropout < 1, "'lora.lora_dropout' must lie in [0, 1).")
    else:
        require(not config.merge_lora, "'merge_lora' needs LoRA; add a 'lora:' section or drop merge_lora.")

    if config.algorithm == "dpo":
        if config.loss_type not in DPO_LOSS_TYPES:
            close = difflib.get_close_matches(config.loss_type, DPO_LOSS_TYPES, n=1, cutoff=0.7)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"'loss_type' must be one of {', '.join(DPO_LOSS_TYPES)}, not '{config.loss_type}'{hint}.")
        require(
            config.label_smoothing == 0 or config.loss_type == "robust",
            "'label_smoothing' applies to loss_type robust (and to simpo); set loss_type: robust or remove it.",
        )
        require(config.rpo_alpha is None or config.rpo_alpha >= 0, "'rpo_alpha' must be >= 0.")
    else:
        name = config.algorithm
        require(config.loss_type == "sigmoid", f"'loss_type' selects a DPO variant; it does not apply to {name}.")
        require(config.rpo_alpha is None, f"'rpo_alpha' adds an NLL term to DPO; it does not apply to {name}.")
        require(
            config.ref_model is None,
            f"{name} is reference-free; remove 'ref_model' (it would be loaded and never used).",
        )
        require(
            not config.precompute_ref_log_probs,
            f"{name} is reference-free, so there is nothing to precompute; remove 'precompute_ref_log_probs'.",
        )
        require(config.label_smoothing == 0 or name == "simpo", f"'label_smoothing' does not apply to {name}.")
    require(config.cpo_alpha == 0 or config.algorithm == "simpo", "'cpo_alpha' applies to simpo only.")
    require(
        config.center_rewards_coefficient is None or config.algorithm == "reward",
        "'center_rewards_coefficient' applies to algorithm: reward only.",
    )
    require(config.cpo_alpha >= 0, "'cpo_alpha' must be >= 0.")
    if config.hub_model_id is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(config.hub_model_id)
        except HFValidationError:
            raise UserError(f"'hub_model_id' must be 'name' or 'namespace/name' with letters, digits, '-', '_' or "
                            f"'.' (at most 96), not '{config.hub_model_id}'.") from None


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys (`lora.r`): what trackers take, and how runs line up in reports."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(before: TrainConfig, after: TrainConfig, *, ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: old -> new` for each setting (dotted keys for sections) that differs between two configs."""
    old, new = flatten(before.to_dict()), flatten(after.to_dict())
    return [f"{key}: {old.get(key)!r} -> {value!r}" for key, value in new.items()
            if key not in ignore and old.get(key) != value]


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def describe_keys() -> str:
    """Help text listing every config key with its default, for `smolalign train --help`."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name} (default: {default!r})\n      {f.metadata.get('help', '')}")
    for f in dataclasses.fields(LoraSettings):
        lines.append(f"  --lora.{f.name} (default: {f.default!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
