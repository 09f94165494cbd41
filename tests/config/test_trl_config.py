"""TRL config files (`trl dpo --config FILE.yaml`, TRL's ORPO and CPO scripts) read as smolalign configs."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
from conftest import write_jsonl

from smolalign.cli import main
from smolalign.config import translation
from smolalign.config import trl_keys as trl_config
from smolalign.config.fields import parse_override_args
from smolalign.config.train import DatasetSource, LoraSettings, TrainConfig, load_config
from smolalign.config.trl import trl_key_names
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
    monkeypatch.setattr(translation, "_logged", set())
    logger = logging.getLogger("smolalign")
    monkeypatch.setattr(logger, "propagate", False)  # as under the CLI: only the handler added here sees records
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="smolalign")
    yield lambda: [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    logger.removeHandler(caplog.handler)


def test_dpo_config_with_peft_maps_every_key(tmp_path, warnings_seen):
    config = load_config(write(tmp_path, DPO_PEFT))
    assert config.algorithm == "dpo" and config.loss_type is None
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
    assert config.dtype == "auto"  # bf16: true is what auto does where the hardware has bf16
    notes, ignored, launch = warnings_seen()
    assert notes.startswith("read as smolalign's nearest equivalents: ")
    assert "dtype bfloat16: smolalign keeps float32 master weights" in notes and "bf16 true: " in notes
    assert ignored == "ignored settings that do not change what smolalign computes: attn_implementation, " \
                      "remove_unused_columns"
    assert launch.startswith("ignored launch settings (dataloader_num_workers): ") and "accelerate launch" in launch


def test_ignored_keys_are_listed_once(tmp_path, warnings_seen):
    path = write(tmp_path, DPO_PEFT)
    load_config(path)
    lines = len(warnings_seen())
    load_config(path, {"beta": 0.2})  # a sweep reads the file once per run
    assert len(warnings_seen()) == lines == 3


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
    assert warnings_seen() == ["read as smolalign's nearest equivalents: TRL's ORPOConfig's defaults: "
                               "num_train_epochs 3.0"]


def test_orpo_config_by_algorithm_key(tmp_path):
    text = ORPO.replace("trl_config: ORPOConfig", "algorithm: orpo")
    assert load_config(write(tmp_path, text)).algorithm == "orpo"


def test_cpo_simpo_config(tmp_path):
    config = load_config(write(tmp_path, CPO_SIMPO))
    assert config.algorithm == "simpo"
    assert config.loss_type is None  # smolalign's loss_type selects DPO and KTO losses only
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
    ("model_name_or_path: m\nloss_type: [sigmoid, sft]\nloss_weights: [1.0]\n", "'loss_weights' has 1 weights"),
    ("model_name_or_path: m\ntrl_config: PPOConfig\n", "DPOConfig, ORPOConfig, CPOConfig or KTOConfig"),
    ("trl_config: ORPOConfig\nalgorithm: dpo\n", "keep one"),
    ("model_name_or_path: m\nmodel: n\n", "'model_name_or_path' and 'model' both set model"),
    ("model_name_or_path: m\nbf16: true\nfp16: true\n", "'bf16' and 'fp16' are both true"),
    ("model_name_or_path: m\nuse_dora: true\n", "'use_dora: True' has no equivalent"),
    ("model_name_or_path: m\noptim: adafactor\n", "'optim: adafactor' is another optimizer than AdamW"),
    ("model_name_or_path: m\nload_in_4bit: true\n", "'load_in_4bit: True' asks for QLoRA"),
    ("model_name_or_path: m\nlr_scheduler_type: reduce_lr_on_plateau\n", "'lr_scheduler_type' must be one of"),
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
                                         "load_in_4bit: false\ntrust_remote_code: false\nmodel_revision: main\n"
                                         "num_train_epochs: 1\ntrl_config: DPOConfig\n"))
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
    assert any("eval_strategy epoch: smolalign evaluates at the end" in message for message in warnings_seen())
    assert any("dataset_test_split" in message for message in warnings_seen())


def test_lora_keys_without_use_peft_are_ignored_as_trl_does(tmp_path, warnings_seen):
    config = load_config(write(tmp_path, "model_name_or_path: m\nlora_r: 8\nlora_target_modules: [q_proj]\n"))
    assert config.lora is None
    assert "ignored settings that do not change what smolalign computes: lora_r, lora_target_modules" in warnings_seen()


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


def test_hub_keys_are_mapped(tmp_path, warnings_seen):
    path = write(tmp_path, "model_name_or_path: m\npush_to_hub: true\nhub_model_id: me/run\nhub_private_repo: true\n"
                           "hub_strategy: end\nreport_to: [tensorboard, mlflow]\n")
    config = load_config(path)  # offline here: a recipe's upload is skipped, the run goes on locally
    assert (config.push_to_hub, config.hub_model_id, config.hub_private) == (False, "me/run", True)
    assert config.report_to == [] or config.report_to == ["tensorboard"]  # tensorboard where it is installed
    notes = warnings_seen()[0]
    assert "push_to_hub true: not pushed (no Hugging Face token)" in notes or "unreachable" in notes
    assert "mlflow" in notes
    asked = load_config(path, parse_override_args(["--push_to_hub", "true"]))  # a flag asks for real: checked later
    assert asked.push_to_hub is True


def test_smolalign_config_is_not_translated(tmp_path):
    path = write(tmp_path, "model: m\nalgorithm: simpo\nlora: {r: 4}\n")
    config = load_config(path)
    assert config.cpo_alpha == 0.0 and config.num_train_epochs == 1.0  # smolalign's defaults, not TRL's


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
def test_every_trl_key_is_classified():
    """Every key of TRL's script arguments, ModelConfig, dataset mixtures and DPO / ORPO / CPO / KTO configs
    (transformers' TrainingArguments included) is smolalign's own or sorted by the tables, the defaults this
    module relies on are TRL's, and a default-only switch is accepted at TRL's own default."""
    trl = pytest.importorskip("trl")
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig
    from trl.scripts.utils import DatasetConfig, DatasetMixtureConfig

    def defaults(cls) -> dict:
        return {f.name: f.default if f.default is not dataclasses.MISSING else
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None
                for f in dataclasses.fields(cls)}

    ours = {f.name for f in dataclasses.fields(TrainConfig)}
    for cls in (trl.ScriptArguments, trl.ModelConfig, DatasetMixtureConfig, trl.DPOConfig, ORPOConfig, CPOConfig,
                trl.KTOConfig):
        unknown = [key for key in defaults(cls) if key not in ours and key not in trl_key_names()]
        assert unknown == [], (cls.__name__, unknown)
        for key, value in defaults(cls).items():
            if key in trl_config.DEFAULT_ONLY:
                assert value in trl_config.DEFAULT_ONLY[key], (cls.__name__, key, value)
    assert set(defaults(DatasetConfig)) <= {f.name for f in dataclasses.fields(DatasetSource)}
    assert defaults(trl.DPOConfig)["num_train_epochs"] == trl_config.TRL_DEFAULTS["num_train_epochs"]
    for cls, algorithm in ((CPOConfig, "simpo"), (trl.KTOConfig, "kto")):
        for key, value in trl_config.CLASS_DEFAULTS[algorithm].items():
            assert defaults(cls)[key] == value, (cls.__name__, key)
    model_config = defaults(trl.ModelConfig)
    lora = LoraSettings()
    assert (model_config["lora_r"], model_config["lora_alpha"], model_config["lora_dropout"]) == (
        lora.r, lora.lora_alpha, lora.lora_dropout)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_targets

    assert peft_targets["llama"] == trl_config.TRL_LORA_TARGETS


def test_train_command_runs_a_trl_config(tmp_path, tiny_model, hh_rows, capsys, monkeypatch):
    monkeypatch.setattr(translation, "_logged", set())
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
    err = capsys.readouterr().err
    assert "bf16 true: smolalign trains under bf16 autocast" in err
    assert "ignored launch settings (dataloader_num_workers)" in err
