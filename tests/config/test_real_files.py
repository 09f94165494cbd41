"""Config and data files as their authors publish them (tests/real_files, with their licences): TRL's
documentation, the alignment-handbook's recipes, LLaMA-Factory's examples and demo data, HH-RLHF as
Anthropic ships it. Each is read, inspected and trained for a step offline, with only the model and the
data swapped on the command line; what cannot be honoured is refused naming its key."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

from smolalign.cli import main
from smolalign.config import translation
from smolalign.config.fields import parse_override_args
from smolalign.config.train import load_config
from smolalign.errors import UserError

REAL = Path(__file__).resolve().parents[1] / "real_files"
HANDBOOK, TRL, LLAMA_FACTORY = REAL / "alignment-handbook", REAL / "trl", REAL / "llama-factory"
SWAP = ["--model", "embedded", "--dataset", "hh-rlhf-harmless", "--eval_dataset", "hh-rlhf-harmless"]


@pytest.fixture
def notes(caplog, monkeypatch):
    """The lines the config translation logged (each logged once per process: reset here)."""
    monkeypatch.setattr(translation, "_logged", set())
    logger = logging.getLogger("smolalign")
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="smolalign")
    yield lambda: "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    logger.removeHandler(caplog.handler)


def swapped(path: Path, *extra: str):
    return load_config(path, parse_override_args([*SWAP, *extra]))


def test_smollm2_dpo_recipe(notes):
    config = swapped(HANDBOOK / "smollm2-dpo-config_smol.yaml")
    assert (config.algorithm, config.beta, config.learning_rate, config.num_train_epochs) == ("dpo", 0.5, 1e-6, 2.0)
    assert (config.max_length, config.max_prompt_length, config.lr_scheduler_type) == (1024, 512, "cosine")
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (2, 8)
    # the flags replaced the mixture, its test split and the model; evaluation uses --eval_dataset
    assert (config.model, config.dataset, config.dataset_mixture, config.test_split_size) == (
        "embedded", "hh-rlhf-harmless", [], 0.0)
    assert (config.eval_dataset, config.eval_steps) == ("hh-rlhf-harmless", 100)
    installed = [name for name in ("tensorboard", "wandb") if importlib.util.find_spec(name) is not None]
    assert config.push_to_hub is False and config.report_to == installed  # the trackers this machine has
    assert "push_to_hub true: not pushed" in notes()
    assert ("report_to " in notes()) == (installed != ["tensorboard", "wandb"])


def test_smollm2_dpo_recipe_mixture_as_written():
    config = load_config(HANDBOOK / "smollm2-dpo-config_smol.yaml")
    assert [(s.path, s.name, s.split, s.columns, s.weight) for s in config.dataset_mixture] == [
        ("HuggingFaceH4/ultrafeedback_binarized", "default", split, ["chosen", "rejected"], 1.0)
        for split in ("train_prefs", "test_prefs")]
    assert config.test_split_size == 2000 and config.eval_dataset is None  # the mixture's test split


def test_smollm3_apo_recipe(notes):
    config = swapped(HANDBOOK / "smollm3-dpo-apo.yaml")
    assert (config.loss_type, config.beta, config.max_grad_norm) == ("apo_zero", 0.05, 0.2)
    assert (config.lr_scheduler_type, config.lr_scheduler_kwargs) == ("cosine_with_min_lr", {"min_lr_rate": 0.1})
    assert config.save_steps == 0.5  # half of the run's steps, as transformers reads it
    assert config.model_revision is None  # --model replaced the model and its revision
    assert config.trust_remote_code is True
    assert load_config(HANDBOOK / "smollm3-dpo-apo.yaml").model_revision == "it-SFT"


def test_zephyr_orpo_recipe_with_the_algorithm_flag(notes):
    dpo = swapped(HANDBOOK / "zephyr-141b-A35b-orpo-config_full.yaml")
    assert dpo.algorithm == "dpo" and "add --algorithm orpo" in notes()
    config = swapped(HANDBOOK / "zephyr-141b-A35b-orpo-config_full.yaml", "--algorithm", "orpo")
    assert (config.algorithm, config.beta, config.lr_scheduler_type, config.warmup_steps) == (
        "orpo", 0.05, "inverse_sqrt", 100)
    assert config.chat_template.startswith("{% for message in messages %}")
    assert "optim adamw_bnb_8bit: smolalign uses torch's fused AdamW" in notes()


def test_zephyr_qlora_recipe_names_load_in_4bit():
    with pytest.raises(UserError, match=r"^'load_in_4bit: True' asks for QLoRA"):
        swapped(HANDBOOK / "zephyr-7b-beta-dpo-config_qlora.yaml")
    config = swapped(HANDBOOK / "zephyr-7b-beta-dpo-config_qlora.yaml", "--load_in_4bit", "false")
    assert config.lora.r == 128 and config.lora.lora_alpha == 128
    assert config.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_zephyr_qlora_recipe_mixer_as_written():
    config = load_config(HANDBOOK / "zephyr-7b-beta-dpo-config_qlora.yaml", {"load_in_4bit": False})
    assert [(s.path, s.split, s.weight) for s in config.dataset_mixture] == [
        ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", 1.0)]
    assert (config.eval_dataset, config.eval_split) == ("HuggingFaceH4/ultrafeedback_binarized", "test_prefs")


@pytest.mark.parametrize("name", ["dpo_config.yaml", "dpo_config_num_processes.yaml",
                                  "dpo_config_accelerate_config.yaml", "dpo_config_datasets.yaml"])
def test_trl_documentation_configs(name, notes):
    config = swapped(TRL / name)
    assert (config.algorithm, config.model, config.dataset, config.num_train_epochs) == (
        "dpo", "embedded", "hh-rlhf-harmless", 3.0)
    if name != "dpo_config.yaml" and name != "dpo_config_datasets.yaml":
        assert "ignored launch settings" in notes() and "accelerate launch --num_processes N" in notes()
    as_written = load_config(TRL / name)
    if name == "dpo_config_datasets.yaml":
        assert [s.path for s in as_written.dataset_mixture] == ["BAAI/Infinity-Preference", "argilla/Capybara-Preferences"]
    else:
        assert (as_written.dataset, as_written.dataset_mixture) == ("anthropic/hh-rlhf", [])


def test_flags_rescue_an_evaluation_the_file_cannot_do():
    path = TRL / "dpo_config.yaml"
    with pytest.raises(UserError, match=r"^'eval_strategy: steps' evaluates on the 'test' split of the dataset, but "
                                        r"'pairs.jsonl' is one file; set --eval_dataset FILE, --test_split_size"):
        load_config(path, parse_override_args(["--dataset", "pairs.jsonl", "--eval_strategy", "steps"]))
    config = load_config(path, parse_override_args(["--dataset", "pairs.jsonl", "--eval_strategy", "steps",
                                                    "--test_split_size", "0.1"]))
    assert config.test_split_size == 0.1 and config.eval_dataset is None


def test_flags_in_trl_names_override_the_file(tmp_path):
    path = tmp_path / "trl.yaml"
    path.write_text("model_name_or_path: m\noptim: sgd\neval_strategy: steps\nbf16: false\n")
    config = load_config(path, parse_override_args(["--optim", "adamw_torch", "--eval_strategy", "no",
                                                    "--dtype", "bfloat16"]))
    assert config.eval_dataset is None and config.dtype == "bfloat16"


def test_llamafactory_dpo_example(monkeypatch, notes):
    monkeypatch.chdir(LLAMA_FACTORY)  # dataset_dir `data` is read from the working folder, as LLaMA-Factory does
    config = load_config(LLAMA_FACTORY / "qwen3_lora_dpo.yaml")
    assert (config.algorithm, config.loss_type, config.beta) == ("dpo", "sigmoid", 0.1)
    assert config.lora.r == 8 and config.lora.lora_alpha == 16 and config.lora.target_modules == "all-linear"
    assert (config.max_length, config.max_train_pairs, config.learning_rate, config.num_train_epochs) == (
        2048, 1000, 5e-6, 3.0)
    assert config.dataset == "data/dpo_en_demo.json"
    assert config.dataset_columns == {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
    assert "template qwen3_nothink: smolalign renders with the model's own chat template" in notes()
    orpo = load_config(LLAMA_FACTORY / "qwen3_lora_dpo.yaml", {"pref_loss": "orpo"})
    assert orpo.algorithm == "orpo" and orpo.ref_model is None
    simpo = load_config(LLAMA_FACTORY / "qwen3_lora_dpo.yaml", {"pref_loss": "simpo", "pref_ftx": 0.5})
    assert (simpo.algorithm, simpo.cpo_alpha) == ("simpo", 0.5)
    reward = load_config(LLAMA_FACTORY / "qwen3_lora_reward.yaml")
    assert (reward.algorithm, reward.learning_rate) == ("reward", 1e-4)


def test_llamafactory_dataset_outside_its_folder_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^'dataset: dpo_en_demo' names an entry of LLaMA-Factory's "
                                        r"data/dataset_info.json, which does not exist here"):
        load_config(LLAMA_FACTORY / "qwen3_lora_dpo.yaml")
    assert swapped(LLAMA_FACTORY / "qwen3_lora_dpo.yaml").dataset == "hh-rlhf-harmless"


@pytest.mark.parametrize(("text", "first_words"), [
    ("stage: ppo\n", "'stage: ppo' (PPO) is not an algorithm smolalign trains"),
    ("stage: dpo\npref_loss: kto_pair\n", "'pref_loss: kto_pair' has no equivalent"),
    ("stage: dpo\nfinetuning_type: freeze\n", "'finetuning_type: freeze' has no equivalent"),
    ("stage: dpo\nquantization_bit: 4\n", "'quantization_bit: 4' asks for QLoRA"),
    ("stage: dpo\ndpo_label_smoothing: 0.1\n", "'dpo_label_smoothing: 0.1' has no equivalent"),
    ("stage: dpo\npref_loss: orpo\npref_ftx: 0.1\n", "'pref_ftx: 0.1' adds an NLL term"),
])
def test_llamafactory_refusals_name_the_key(tmp_path, text, first_words):
    path = tmp_path / "lf.yaml"
    path.write_text("model_name_or_path: m\ndataset: pairs.jsonl\n" + text)
    with pytest.raises(UserError, match="^" + first_words.replace("(", r"\(").replace(")", r"\)")):
        load_config(path)


CONFIGS = [
    (HANDBOOK / "smollm2-dpo-config_smol.yaml", []),
    (HANDBOOK / "smollm3-dpo-apo.yaml", []),
    (HANDBOOK / "zephyr-141b-A35b-orpo-config_full.yaml", ["--algorithm", "orpo"]),
    (HANDBOOK / "zephyr-7b-beta-dpo-config_full.yaml", []),
    (HANDBOOK / "zephyr-7b-beta-dpo-config_qlora.yaml", ["--load_in_4bit", "false"]),
    (TRL / "dpo_config.yaml", []),
    (TRL / "dpo_config_num_processes.yaml", []),
    (TRL / "dpo_config_accelerate_config.yaml", []),
    (TRL / "dpo_config_datasets.yaml", []),
    (TRL / "kto_config.yaml", ["--algorithm", "kto"]),  # written for `trl kto --config`: the file does not say
    (LLAMA_FACTORY / "qwen3_lora_dpo.yaml", []),
    (LLAMA_FACTORY / "qwen3_lora_kto.yaml", []),  # KTO's KL estimate needs 2 rows a batch: the run below has 2
    (LLAMA_FACTORY / "qwen3_lora_reward.yaml", []),
]


@pytest.mark.slow
@pytest.mark.parametrize(("path", "extra"), CONFIGS, ids=[path.stem for path, _ in CONFIGS])
def test_real_config_trains_a_step(path, extra, tmp_path, tiny_model):
    """The run itself: only the model and data swapped, and the run kept to one step of a few pairs."""
    main(["train", "--config", str(path), *extra, "--model", str(tiny_model(0)), "--dataset", "hh-rlhf-harmless",
          "--eval_dataset", "hh-rlhf-harmless", "--max_steps", "1", "--max_train_pairs", "4", "--max_eval_pairs", "2",
          "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
          "--output_dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "final").is_dir()
