"""Config files written for TRL and the alignment-handbook, in smolalign's keys.

`trl dpo --config FILE.yaml` files hold TRL's DPOConfig / ORPOConfig / CPOConfig / KTOConfig keys (which
include transformers' TrainingArguments), its scripts' ModelConfig and ScriptArguments, and dataset
mixtures (`datasets:`); the alignment-handbook's recipes add `dataset_mixture`, the older `dataset_mixer`
/ `dataset_splits`, and `chat_template`. smolalign already uses TRL's names for most keys; the tables
of config/trl_keys.py sort the others into:

- renamed: the same setting under another name (`model_name_or_path` is `model`);
- launch-only: how many processes or devices run the job (`num_processes`, `deepspeed`, `ddp_*`,
  `dataloader_*`): ignored, with how to launch several processes instead;
- ignored: how TRL runs, not what it computes (kernels, logging, when to save): listed once;
- approximated: honoured by the nearest equivalent, with one logged line saying what differs (an 8-bit or
  paged AdamW becomes torch's AdamW, `bf16: true` becomes smolalign's per-device precision);
- default only: a feature smolalign does not have, accepted at TRL's default (where it is off) and
  refused otherwise, in a sentence that names the key.

A file is TRL's when it holds a key only TRL uses; the algorithm is `algorithm` if set (a flag can set it),
else the class named by `trl_config: ORPOConfig`, else what the keys say (`desirable_weight` is KTO's,
`loss_type: simpo` CPO's SimPO), else DPO. Where TRL's default differs from smolalign's and changes the
run, TRL's applies: 3 epochs, `cpo_alpha: 1.0` for SimPO, sequential order for KTO.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path
from typing import Any

import huggingface_hub

from smolalign.config.choices import TRACKERS
from smolalign.config.fields import unknown_key_message
from smolalign.config.train import TrainConfig
from smolalign.config.translation import Translation
from smolalign.config.trl_keys import (
    CLASS_DEFAULTS,
    COMPRESSED_ADAMW,
    DEFAULT_ONLY,
    HANDLED,
    IGNORED,
    LAUNCH_ONLY,
    LORA_KEYS,
    REFUSALS,
    RENAMED,
    TORCH_ADAMW,
    TRL_CLASSES,
    TRL_DEFAULTS,
    TRL_LORA_TARGETS,
)
from smolalign.errors import UserError
from smolalign.hub import hub_reachable, is_data_file_name


@functools.cache
def trl_key_names() -> frozenset[str]:
    """Every key this module knows as TRL's or the alignment-handbook's."""
    return frozenset({*RENAMED, *LAUNCH_ONLY, *IGNORED, *DEFAULT_ONLY, *HANDLED})


def is_trl_file(values: dict[str, Any]) -> bool:
    """A file is TRL's (or the handbook's) when it holds a key only they use."""
    own_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    return any(key not in own_keys and key in trl_key_names() for key in values)


def translate_trl(t: Translation, *, trl_file: bool, source: str | None = None) -> None:
    """Move TRL's and the handbook's keys of `t.values` into smolalign's (`t.out`). With `trl_file` the file is
    written for TRL (or `source`, which translated its own keys first): its algorithm, precision keys, push
    and trackers are read as TRL reads them, and TRL's defaults apply."""
    marker = t.values.get("trl_config")
    if trl_file:
        class_name, algorithm = _trl_class(t)
        t.out["algorithm"] = algorithm
    else:
        class_name, algorithm = None, t.values.get("algorithm", TrainConfig.algorithm)
    for trl_key, own_key in RENAMED.items():
        if trl_key in t.values:
            if own_key in t.values:
                raise UserError(f"'{trl_key}' and '{own_key}' both set {own_key}; keep one.")
            t.out[own_key] = t.values.pop(trl_key)
    if t.values.pop("use_cpu", False) is True:
        t.out["device"] = "cpu"
    _lora(t)
    _precision(t, trl_file=trl_file)
    _optimizer(t)
    _mixtures(t)
    _evaluation(t)
    if t.values.get("model_revision") in ("main", None):
        t.values.pop("model_revision", None)  # transformers' default
    if "truncation_mode" in t.values:
        t.note("truncation_mode", f"{t.values.pop('truncation_mode')}: smolalign cuts a long prompt from the left "
                                  "(keeping its latest turns), then the answers from the right")
    if trl_file and "loss_type" in t.values:
        t.out.update(_loss_type(t.values.pop("loss_type"), algorithm))
    elif class_name == "CPOConfig" and marker is not None:
        raise UserError("TRL's CPOConfig trains CPO (loss_type sigmoid) by default, which smolalign does not; "
                        "set loss_type: simpo for SimPO.")
    if isinstance(t.values.get("warmup_steps"), float) and 0 < t.values["warmup_steps"] < 1:
        t.out["warmup_ratio"] = t.values.pop("warmup_steps")  # transformers reads a fraction as a ratio of the steps
    if trl_file:
        _publishing(t)
    _sort_the_rest(t)
    if trl_file:
        defaults = {**TRL_DEFAULTS, **CLASS_DEFAULTS.get(algorithm, {})}
        t.defaults(defaults, source or f"TRL's {class_name or 'config'}")


def _trl_class(t: Translation) -> tuple[str | None, str]:
    """TRL's config class the file is written for, and the smolalign algorithm that trains its loss."""
    marker = t.values.pop("trl_config", None)
    if t.values.get("algorithm") is not None:  # set in the file next to TRL's keys, or by a flag
        algorithm = str(t.values.pop("algorithm"))
        name = {"simpo": "cpo"}.get(algorithm, algorithm)
        class_name = TRL_CLASSES.get(name, (None, algorithm))[0]
        if marker is not None and str(marker).lower().removesuffix("config") != name:
            raise UserError(f"'trl_config: {marker}' and 'algorithm: {algorithm}' name different trainers; keep one.")
        return class_name, algorithm
    if marker is not None:
        name = str(marker).lower().removesuffix("config")
        if name not in TRL_CLASSES:
            *others, last = (class_name for class_name, _ in TRL_CLASSES.values())
            raise UserError(f"'trl_config' must be {', '.join(others)} or {last}, not '{marker}'.")
        return TRL_CLASSES[name]
    loss_type = t.values.get("loss_type")
    if "desirable_weight" in t.values or "undesirable_weight" in t.values or loss_type in ("kto", "apo_zero_unpaired"):
        return TRL_CLASSES["kto"]
    if loss_type in ("simpo", ["simpo"]) or "simpo_gamma" in t.values or "cpo_alpha" in t.values:
        return TRL_CLASSES["cpo"]
    t.note("algorithm", "dpo: the file names no other trainer (add --algorithm orpo, kto or simpo for a recipe of "
                        "another)")
    return TRL_CLASSES["dpo"]


def _lora(t: Translation) -> None:
    """`use_peft: true` and `lora_*` keys as smolalign's `lora` section (a `lora` section from a flag on top)."""
    use_peft = t.values.pop("use_peft", False)
    settings = {LORA_KEYS[key]: t.values.pop(key) for key in list(t.values) if key in LORA_KEYS}
    if use_peft is not True:
        t.ignored += [key for key, own in LORA_KEYS.items() if own in settings]  # TRL reads them only with use_peft
        return
    if "lora" in t.values and "lora" not in t.from_flags:
        raise UserError("set LoRA either with use_peft and lora_* (TRL's keys) or with a 'lora' section, not both.")
    targets = settings.get("target_modules") or TRL_LORA_TARGETS
    if targets == ["all-linear"]:
        targets = "all-linear"  # TRL's ModelConfig unwraps a one-item list
    section = t.values.get("lora")  # from a flag (`--lora.r 8`): it changes the keys it names
    t.values["lora"] = {**settings, "target_modules": targets, **(section if isinstance(section, dict) else {})}


def _precision(t: Translation, *, trl_file: bool) -> None:
    """TRL's mixed-precision switches as smolalign's `dtype` (training precision). In a TRL file `dtype` and
    `torch_dtype` are the dtype ModelConfig loads weights in; smolalign keeps float32 master weights."""
    loaded_keys = ["torch_dtype"] + (["dtype"] if trl_file and "dtype" not in t.from_flags else [])
    for key in loaded_keys:
        loaded = t.values.pop(key, None)
        if loaded in ("bfloat16", "float16"):
            t.note(key, f"{loaded}: smolalign keeps float32 master weights and trains under {loaded} autocast where "
                        "the hardware has it natively, so small updates are not rounded away")
        elif loaded is not None:
            t.ignored.append(key)
    bf16, fp16 = t.values.pop("bf16", None), t.values.pop("fp16", None)
    if bf16 is True and fp16 is True:
        raise UserError("'bf16' and 'fp16' are both true; keep one.")
    if fp16 is True:
        t.out["dtype"] = "float16"
    elif bf16 is True:
        t.note("bf16", "true: smolalign trains under bf16 autocast where the GPU or CPU has native bf16, in float32 "
                       "elsewhere (dtype auto)")
    elif bf16 is False:
        t.out["dtype"] = "float32"  # TRL turns its bf16 default off: full float32


def _optimizer(t: Translation) -> None:
    if "optim" not in t.values:
        return
    optim = str(t.values.pop("optim"))
    if optim in COMPRESSED_ADAMW:
        t.note("optim", f"{optim}: smolalign uses torch's fused AdamW with float32 state, the same update up to the "
                        "rounding of the compressed state, with more optimizer memory")
    elif optim not in TORCH_ADAMW:
        raise UserError(f"'optim: {optim}' is another optimizer than AdamW, which smolalign does not have and which "
                        "would change the run; remove it or use adamw_torch.")


def _mixtures(t: Translation) -> None:
    """TRL's `datasets` list and the handbook's `dataset_mixture` / `dataset_mixer` as `dataset_mixture`."""
    if "datasets" in t.values:
        t.out["dataset_mixture"] = t.values.pop("datasets")
    if "dataset_mixture" in t.values and isinstance(t.values["dataset_mixture"], dict):  # the handbook's section
        mixture = dict(t.values.pop("dataset_mixture"))
        t.out["dataset_mixture"] = [_handbook_source(entry) for entry in mixture.pop("datasets", [])]
        if mixture.get("test_split_size") is not None:
            t.values.setdefault("test_split_size", mixture.pop("test_split_size"))
        if "seed" in mixture:
            t.note("dataset_mixture.seed", f"{mixture.pop('seed')}: smolalign draws the mixture's subsamples and "
                                           "test split with the run's seed")
        if mixture:
            raise UserError(f"'dataset_mixture' has the key '{next(iter(mixture))}'; it takes datasets, "
                            "test_split_size and seed.")
    if "dataset_mixer" in t.values:  # the handbook's older form: {id: fraction} and the splits to read
        splits = t.values.pop("dataset_splits", ["train", "test"])
        mixer = t.values.pop("dataset_mixer")
        t.out["dataset_mixture"] = [{"path": name, "split": split, "weight": fraction}
                                    for name, fraction in mixer.items() for split in splits if "train" in split]
        tests = [(name, split) for name in mixer for split in splits if "test" in split]
        if tests:
            t.values.setdefault("eval_dataset", tests[0][0])
            t.values.setdefault("eval_split", tests[0][1])
            if len(tests) > 1:
                t.note("dataset_splits", f"held-out pairs come from {tests[0][0]} ({tests[0][1]}) only")


def _handbook_source(entry: dict) -> dict:
    """A handbook mixture entry ({id, config, split, columns, weight}) as a smolalign DatasetSource."""
    entry = dict(entry)
    if "id" in entry:
        entry["path"] = entry.pop("id")
    if "config" in entry:
        entry["name"] = entry.pop("config")
    return entry


def _evaluation(t: Translation) -> None:
    """TRL evaluates on the dataset's test split (`dataset_test_split`) when eval_strategy is not 'no'."""
    strategy = t.values.pop("evaluation_strategy", "no")  # TRL's name before eval_strategy
    strategy = t.values.pop("eval_strategy", strategy)
    strategy = "no" if strategy is False else strategy  # YAML reads an unquoted no as false
    test_split = t.values.pop("dataset_test_split", None)
    if strategy not in ("no", "steps", "epoch"):
        raise UserError(f"'eval_strategy' must be no, steps or epoch, not '{strategy}'.")
    held_out = t.values.get("eval_dataset") or t.values.get("test_split_size")
    if strategy == "no" or held_out:
        if test_split is not None and not held_out:
            t.ignored.append("dataset_test_split")  # no evaluation
        return
    dataset = t.out.get("dataset") or t.values.get("dataset")
    if t.out.get("dataset_mixture"):
        raise UserError(f"'eval_strategy: {strategy}' evaluates on held-out pairs, which a dataset mixture has only "
                        "with test_split_size; set --test_split_size 0.1, --eval_dataset FILE or --eval_strategy no.")
    if dataset is None or _is_one_file(str(dataset)):
        raise UserError(f"'eval_strategy: {strategy}' evaluates on the '{test_split or 'test'}' split of the "
                        f"dataset, but {'no dataset is set' if dataset is None else repr(dataset) + ' is one file'}; "
                        "set --eval_dataset FILE, --test_split_size 0.1 or --eval_strategy no.")
    t.out["eval_dataset"] = dataset
    t.out["eval_split"] = test_split or "test"
    if strategy == "steps":
        # TRL's fallback: evaluate as often as it logs
        t.out["eval_steps"] = t.values.pop("eval_steps", None) or t.values.get("logging_steps",
                                                                                  TrainConfig.logging_steps)
    else:
        t.note("eval_strategy", "epoch: smolalign evaluates at the end (and every eval_steps)")


def _is_one_file(dataset: str) -> bool:
    return Path(dataset).is_file() or is_data_file_name(dataset)


def _publishing(t: Translation) -> None:
    """A recipe's upload and trackers, from the file: honoured where they can be, else the run goes on locally
    (a flag asking for them is checked strictly, as in smolalign's own configs)."""
    if t.values.get("push_to_hub") is True and "push_to_hub" not in t.from_flags:
        reason = push_unavailable()
        if reason:
            t.values["push_to_hub"] = False
            t.note("push_to_hub", f"true: not pushed ({reason}); final/ stays in output_dir")
    if "report_to" in t.values and "report_to" not in t.from_flags:
        wanted = t.values.pop("report_to")
        wanted = [wanted] if isinstance(wanted, str) else list(wanted or [])
        if wanted == ["all"]:
            wanted = list(TRACKERS)
        kept = [name for name in wanted if name in TRACKERS and importlib.util.find_spec(name) is not None]
        dropped = [name for name in wanted if name not in kept and name != "none"]
        t.out["report_to"] = kept
        if dropped:
            t.note("report_to", f"{', '.join(dropped)}: not logged there (smolalign logs to "
                                f"{' and '.join(TRACKERS)} when installed, and always to metrics.jsonl)")


def push_unavailable() -> str | None:
    """Why an upload to the Hub cannot happen from here (no token, no network); None when it can."""
    if huggingface_hub.get_token() is None:
        return "no Hugging Face token"
    return None if hub_reachable() else "the Hugging Face Hub is unreachable"


def _loss_type(loss_type: Any, algorithm: str) -> dict[str, Any]:
    """DPOConfig takes a list of loss types (weighted and summed); CPOConfig's simpo is smolalign's SimPO."""
    if isinstance(loss_type, list) and len(loss_type) == 1:
        loss_type = loss_type[0]
    if algorithm == "simpo":
        if loss_type != "simpo":
            raise UserError(f"CPOConfig's loss_type {loss_type} has no equivalent in smolalign; "
                            "loss_type: simpo (SimPO) does.")
        return {}
    return {"loss_type": loss_type}


def _sort_the_rest(t: Translation) -> None:
    """Launch-only and ignored keys noted, default-only keys checked; what remains must be smolalign's."""
    own_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in list(t.values):
        if key in LAUNCH_ONLY:
            value = t.values.pop(key)
            t.launch.append(f"{key}: {value}" if key == "num_processes" else key)
        elif not t.settle(key, ignored=IGNORED, accepted=DEFAULT_ONLY, refusals=REFUSALS, source="TRL") and \
                key not in own_keys:
            if key in _training_argument_names():
                raise UserError(f"'{key}' is a transformers TrainingArguments setting that smolalign has no "
                                "equivalent for; remove it.")
            raise UserError(unknown_key_message(key, sorted(own_keys | trl_key_names()), "config"))


@functools.cache
def _training_argument_names() -> frozenset[str]:
    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments))
