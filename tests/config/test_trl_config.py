"""TRL config files (`trl dpo --config FILE.yaml`, TRL's ORPO and CPO scripts) read as smolalign configs."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
from conftest import write_jsonl

from smolalign.cli import main
from smolalign.config import trl as trl_config
from smolalign.config.fields import parse_override_args
from smolalign.config.train import LoraSettings, TrainConfig, load_config
from smolalign.errors import UserError

# The LoRA example of TRL's DPO script (trl/scripts/dpo.py), as a `trl dpo --config` YAML file.
DPO_PEFT = """\
model_name_or_path: Qwen/Qwen2-0.5B-Instruct
dtype: bfloat16
attn_implementation: sdpa
dataset_name: trl-lib/ultrafeedback_binarized
learning_rate: 5.0e-6
num_train_epochs: 1
per_device_train_batch_size: 2
max_steps: 1000
gradient_accumulation_steps: 8
gradient_checkpointing: true
eval_strategy: steps
eval_steps: 50
output_dir: Qwen2-0.5B-DPO
remove_unused_columns: false
use_peft: true
lora_r: 32
lora_alpha: 16
bf16: true
report_to: none
dataloader_num_workers: 4
"""

# TRL's ORPO example (ORPOConfig + ModelConfig + ScriptArguments), marked as ORPOConfig.
ORPO = """\
trl_config: ORPOConfig
model_name_or_path: HuggingFaceTB/SmolLM2-135M
dataset_name: trl-lib/ultrafeedback_binarized
dataset_config: default
dataset_train_split: train
beta: 0.2
learning_rate: 8.0e-6
lr_scheduler_type: cosine
warmup_steps: 0.1
per_device_train_batch_size: 4
gradient_accumulation_steps: 4
max_length: 512
logging_steps: 5
save_steps: 100
seed: 7
output_dir: SmolLM2-135M-ORPO
"""

# CPO's SimPO variant (CPOConfig with loss_type simpo), as in TRL's CPO trainer docs.
CPO_SIMPO = """\
model_name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct
dataset_name: trl-lib/ultrafeedback_binarized
loss_type: simpo
beta: 2.0
simpo_gamma: 0.5
learning_rate: 1.0e-6
per_device_train_batch_size: 8
max_length: 1024
fp16: true
output_dir: SmolLM2-SimPO
"""


def write(tmp_path: Path, text: str, name: str = "trl.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def warnings_seen(caplog, monkeypatch):
    """Warnings of the smolalign logger (whose propagation the CLI turns off), with a fresh once-only memory."""
    monkeypatch.setattr(trl_config, "_warned", set())
    logger = logging.getLogger("smolalign")
    monkeypatch.setattr(logger, "propagate", False)  # as under the CLI: only the handler added here sees records
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="smolalign")
    yield lambda: [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    logger.removeHandler(caplog.handler)


def test_dpo_config_with_peft_maps_every_key(tmp_path, warnings_seen):
    config = load_config(write(tmp_path, DPO_PEFT))
    assert config.algorithm == "dpo" and config.loss_type == "sigmoid"
    assert config.model == "Qwen/Qwen2-0.5B-Instruct"
    assert config.dataset == "trl-lib/ultrafeedback_binarized" and config.dataset_split == "train"
    # eval_strategy steps: TRL evaluates on the dataset's test split every eval_steps
    assert (config.eval_dataset, config.eval_split, config.eval_steps) == ("trl-lib/ultrafeedback_binarized", "test", 50)
    # use_peft + lora_*: TRL's ModelConfig defaults for the rest, PEFT's Llama/Qwen2 targets as TRL gets them
    assert config.lora == LoraSettings(r=32, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    assert config.learning_rate == 5e-6 and config.num_train_epochs == 1.0 and config.max_steps == 1000
    assert config.per_device_train_batch_size == 2 and config.gradient_accumulation_steps == 8
    assert config.gradient_checkpointing is True
    assert config.output_dir == "Qwen2-0.5B-DPO"
    assert config.report_to == []
    assert config.dtype == "auto"  # bf16: true is what auto does on a GPU with bf16
    assert warnings_seen() == ["ignored TRL settings that do not apply to smolalign: attn_implementation, bf16, "
                               "dataloader_num_workers, dtype, remove_unused_columns"]


def test_ignored_keys_are_listed_once(tmp_path, warnings_seen):
    path = write(tmp_path, DPO_PEFT)
    load_config(path)
    load_config(path, {"beta": 0.2})  # a sweep reads the file once per run
    assert len(warnings_seen()) == 1


def test_orpo_config_by_marker(tmp_path, warnings_seen):
    config = load_config(write(tmp_path, ORPO))
    assert config.algorithm == "orpo"
    assert config.model == "HuggingFaceTB/SmolLM2-135M"
    assert (config.dataset, config.dataset_config, config.dataset_split) == (
        "trl-lib/ultrafeedback_binarized", "default", "train")
    assert config.beta == 0.2 and config.learning_rate == 8e-6 and config.lr_scheduler_type == "cosine"
    assert config.warmup_ratio == 0.1 and config.warmup_steps == 0  # transformers reads warmup_steps < 1 as a ratio
    assert config.max_length == 512 and config.logging_steps == 5 and config.save_steps == 100 and config.seed == 7
    assert config.lora is None and config.eval_dataset is None  # no use_peft, eval_strategy defaults to no
    assert config.num_train_epochs == 3.0  # TrainingArguments' default, not smolalign's 1
    assert warnings_seen() == []


def test_orpo_config_by_algorithm_key(tmp_path):
    text = ORPO.replace("trl_config: ORPOConfig", "algorithm: orpo")
    assert load_config(write(tmp_path, text)).algorithm == "orpo"


def test_cpo_simpo_config(tmp_path):
    config = load_config(write(tmp_path, CPO_SIMPO))
    assert config.algorithm == "simpo"
    assert config.loss_type == "sigmoid"  # smolalign's loss_type selects DPO variants only
    assert config.beta == 2.0 and config.simpo_gamma == 0.5
    assert config.cpo_alpha == 1.0  # CPOConfig's default: TRL's CPO-SimPO adds the NLL term
    assert config.dtype == "float16"
    explicit = load_config(write(tmp_path, CPO_SIMPO + "cpo_alpha: 0.0\n"))
    assert explicit.cpo_alpha == 0.0
    by_algorithm = load_config(write(tmp_path, "model_name_or_path: m\nalgorithm: simpo\n"))
    assert by_algorithm.algorithm == "simpo" and by_algorithm.cpo_alpha == 1.0


@pytest.mark.parametrize(("text", "expected"), [
    ("trl_config: CPOConfig\nmodel_name_or_path: m\n", "set loss_type: simpo"),
    ("model_name_or_path: m\ntrl_config: CPOConfig\nloss_type: hinge\n", "loss_type hinge has no equivalent"),
    ("model_name_or_path: m\nloss_type: [sigmoid, sft]\n", "one loss type at a time"),
    ("model_name_or_path: m\ntrl_config: PPOConfig\n", "DPOConfig, ORPOConfig or CPOConfig"),
    ("trl_config: ORPOConfig\nalgorithm: dpo\n", "keep one"),
    ("model_name_or_path: m\nmodel: n\n", "'model_name_or_path' and 'model' both set model"),
    ("model_name_or_path: m\nbf16: true\nfp16: true\n", "'bf16' and 'fp16' are both true"),
    ("model_name_or_path: m\nuse_dora: true\n", "'use_dora: True' has no equivalent"),
    ("model_name_or_path: m\noptim: adafactor\n", "'optim: adafactor' has no equivalent"),
    ("model_name_or_path: m\nddp_static_graph: true\n", "'ddp_static_graph' is a transformers TrainingArguments"),
    ("model_name_or_path: m\ndataset_name: pairs.jsonl\neval_strategy: steps\n", "test_split_size"),
    ("model_name_or_path: m\nuse_peft: true\nlora: {r: 4}\n", "not both"),
])
def test_what_cannot_be_honoured_is_an_error(tmp_path, text, expected):
    with pytest.raises(UserError, match=expected.replace("[", r"\[")):
        load_config(write(tmp_path, text))


def test_unknown_key_names_the_closest_trl_or_smolalign_key(tmp_path):
    with pytest.raises(UserError, match="unknown config key 'lora_alhpa'; did you mean 'lora_alpha'"):
        load_config(write(tmp_path, "model_name_or_path: m\nuse_peft: true\nlora_alhpa: 8\n"))
    with pytest.raises(UserError, match="unknown config key 'lerning_rate'; did you mean 'learning_rate'"):
        load_config(write(tmp_path, "model_name_or_path: m\nlerning_rate: 1.0e-5\n"))


def test_switches_at_trl_default_are_accepted_silently(tmp_path, warnings_seen):
    config = load_config(write(tmp_path, "model_name_or_path: m\nuse_dora: false\noptim: adamw_torch\n"
                                         "load_in_4bit: false\ntrust_remote_code: false\n"))
    assert config.model == "m" and warnings_seen() == []


def test_precision_switches(tmp_path):
    assert load_config(write(tmp_path, "model_name_or_path: m\nbf16: false\n")).dtype == "float32"
    assert load_config(write(tmp_path, "model_name_or_path: m\nfp16: true\n")).dtype == "float16"
    assert load_config(write(tmp_path, "model_name_or_path: m\n")).dtype == "auto"


def test_evaluation_strategies(tmp_path, warnings_seen):
    steps = load_config(write(tmp_path, "model_name_or_path: m\ndataset_name: org/pairs\neval_strategy: steps\n"
                                        "logging_steps: 7\ndataset_test_split: validation\n"))
    assert (steps.eval_dataset, steps.eval_split, steps.eval_steps) == ("org/pairs", "validation", 7)
    epoch = load_config(write(tmp_path, "model_name_or_path: m\ndataset_name: org/pairs\neval_strategy: epoch\n"))
    assert epoch.eval_dataset == "org/pairs" and epoch.eval_steps is None  # at the end
    off = load_config(write(tmp_path, "model_name_or_path: m\ndataset_name: org/pairs\ndataset_test_split: dev\n"))
    assert off.eval_dataset is None
    split_off = load_config(write(tmp_path, "model_name_or_path: m\ndataset_name: pairs.jsonl\neval_strategy: steps\n"
                                            "eval_steps: 3\ntest_split_size: 0.1\ndataset_test_split: test\n"))  # DatasetMixtureConfig's key
    assert (split_off.eval_dataset, split_off.test_split_size, split_off.eval_steps) == (None, 0.1, 3)
    assert any("eval_strategy: epoch" in message for message in warnings_seen())
    assert any("dataset_test_split" in message for message in warnings_seen())


def test_lora_keys_without_use_peft_are_ignored_as_trl_does(tmp_path, warnings_seen):
    config = load_config(write(tmp_path, "model_name_or_path: m\nlora_r: 8\nlora_target_modules: [q_proj]\n"))
    assert config.lora is None
    assert warnings_seen() == ["ignored TRL settings that do not apply to smolalign: lora_r, lora_target_modules"]


def test_lora_all_linear_and_explicit_targets(tmp_path):
    text = "model_name_or_path: m\nuse_peft: true\nlora_target_modules: {}\n"
    assert load_config(write(tmp_path, text.format("all-linear"))).lora.target_modules == "all-linear"
    assert load_config(write(tmp_path, text.format("[all-linear]"))).lora.target_modules == "all-linear"
    assert load_config(write(tmp_path, text.format("[q_proj, k_proj]"))).lora.target_modules == ["q_proj", "k_proj"]


def test_flags_keep_smolalign_names_and_beat_the_file(tmp_path):
    config = load_config(write(tmp_path, DPO_PEFT), parse_override_args(["--lora.r", "4", "--max_steps", "3",
                                                                         "--dtype", "float32"]))
    assert config.lora.r == 4 and config.lora.lora_alpha == 16
    assert config.max_steps == 3 and config.dtype == "float32"


def test_hub_keys_are_mapped(tmp_path):
    config = load_config(write(tmp_path, "model_name_or_path: m\npush_to_hub: true\nhub_model_id: me/run\n"
                                         "hub_private_repo: true\nhub_strategy: end\n"))
    assert (config.push_to_hub, config.hub_model_id, config.hub_private) == (True, "me/run", True)


def test_smolalign_config_is_not_translated(tmp_path):
    path = write(tmp_path, "model: m\nalgorithm: simpo\nlora: {r: 4}\n")
    config = load_config(path)
    assert config.cpo_alpha == 0.0 and config.num_train_epochs == 1.0  # smolalign's defaults, not TRL's


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
def test_tables_agree_with_trl():
    """Every key of TRL's script arguments, ModelConfig and DPO/ORPO/CPO configs is known here, the defaults
    this module relies on are TRL's, and a default-only switch is accepted at TRL's own default."""
    trl = pytest.importorskip("trl")
    from transformers import TrainingArguments
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    def defaults(cls) -> dict:
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}

    ours = {f.name for f in dataclasses.fields(TrainConfig)}
    training_arguments = defaults(TrainingArguments)
    for cls in (trl.ScriptArguments, trl.ModelConfig, trl.DPOConfig, ORPOConfig, CPOConfig):
        unknown = [key for key in defaults(cls) if key not in ours and key not in trl_config.trl_key_names()
                   and key not in training_arguments]
        assert unknown == [], (cls.__name__, unknown)
        for key, value in defaults(cls).items():
            if key in trl_config.DEFAULT_ONLY:
                assert value in trl_config.DEFAULT_ONLY[key], (cls.__name__, key, value)
    assert training_arguments["num_train_epochs"] == trl_config.TRL_DEFAULTS["num_train_epochs"]
    assert defaults(CPOConfig)["cpo_alpha"] == trl_config.CPO_DEFAULTS["cpo_alpha"]
    model_config = defaults(trl.ModelConfig)
    lora = LoraSettings()
    assert (model_config["lora_r"], model_config["lora_alpha"], model_config["lora_dropout"]) == (
        lora.r, lora.lora_alpha, lora.lora_dropout)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_targets

    assert peft_targets["llama"] == trl_config.TRL_LORA_TARGETS


def test_train_command_runs_a_trl_config(tmp_path, tiny_model, hh_rows, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", hh_rows[:4])
    path = write(tmp_path, f"""\
model_name_or_path: {tiny_model(0)}
dataset_name: {data}
use_peft: true
lora_r: 4
lora_alpha: 8
beta: 0.1
learning_rate: 1.0e-4
max_steps: 1
per_device_train_batch_size: 2
max_length: 256
logging_steps: 1
output_dir: {tmp_path / "run"}
bf16: true
dataloader_num_workers: 2
""")
    main(["train", "--config", str(path)])
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()
    saved = load_config(tmp_path / "run" / "config.yaml")  # the resolved config, in smolalign's keys
    assert saved.lora.r == 4 and saved.model == str(tiny_model(0)) and saved.num_train_epochs == 3.0
    assert "ignored TRL settings that do not apply to smolalign: bf16, dataloader_num_workers" in capsys.readouterr().err
