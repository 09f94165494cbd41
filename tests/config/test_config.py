"""Run configuration: defaults, YAML and flag precedence, flag parsing, errors that name the key."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from smolalign.config.algorithms import loss_types
from smolalign.config.commands import (
    BenchConfig,
    ChatConfig,
    EvalConfig,
    ExportBenchConfig,
    ExportConfig,
    GenerationBenchConfig,
    InspectConfig,
    QualityConfig,
)
from smolalign.config.fields import parse_override_args
from smolalign.config.files import RECIPES_DIR
from smolalign.config.train import LoraSettings, TrainConfig, load_config
from smolalign.errors import UserError
from smolalign.run_folder import RunFolder

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


# -- defaults -------------------------------------------------------------------------------------


def test_defaults_follow_trl_names_and_values():
    config = load_config()
    assert config == TrainConfig()
    assert config.algorithm == "dpo"
    assert config.loss_type is None and loss_types(config) == ["sigmoid"]  # the algorithm's default
    assert config.beta == 0.1
    assert config.label_smoothing == 0.0
    assert config.rpo_alpha is None
    assert config.simpo_gamma == 0.5
    assert config.cpo_alpha == 0.0
    assert config.learning_rate == 1e-6
    assert config.per_device_train_batch_size == 8
    assert config.gradient_accumulation_steps == 1
    assert config.max_length == 1024
    assert config.max_prompt_length is None
    assert config.num_train_epochs == 1.0
    assert config.max_steps == -1
    assert config.lr_scheduler_type == "linear"
    assert config.seed == 42
    assert config.model is None and config.ref_model is None and config.dataset is None
    assert config.lora is None and config.merge_lora is False
    assert config.report_to == []


def test_report_to_default_is_not_shared_between_configs():
    first, second = TrainConfig(), TrainConfig()
    first.report_to.append("wandb")
    assert second.report_to == []


# -- YAML, then flags -------------------------------------------------------------------------------


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"beta": 0.3, "learning_rate": 5e-7, "seed": 7, "output_dir": "runs/a"})
    config = load_config(path, parse_override_args(["--beta", "0.2", "--output_dir=runs/b"]))
    assert config.beta == 0.2  # flag beats YAML
    assert config.output_dir == "runs/b"
    assert config.learning_rate == 5e-7  # YAML beats default
    assert config.seed == 7
    assert config.max_length == 1024  # default


def test_yaml_scientific_notation_without_a_dot_is_a_float(tmp_path):
    # YAML 1.1 reads `1e-6` as a string; a learning rate written that way must still be a float
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-6\nbeta: 5e-2\n")
    config = load_config(path)
    assert isinstance(config.learning_rate, float) and config.learning_rate == 1e-6
    assert config.beta == 0.05


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == TrainConfig()


def test_missing_and_invalid_yaml_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: [0.1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- beta\n- 0.1\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(listing)


def test_lora_section_from_yaml_and_nested_flag(tmp_path):
    path = write_yaml(tmp_path / "lora.yaml", {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})
    config = load_config(path)
    assert config.lora == LoraSettings(r=4, target_modules=["q_proj", "v_proj"])

    flagged = load_config(None, parse_override_args(["--lora.r", "8", "--lora.lora_dropout", "0.1"]))
    assert flagged.lora == LoraSettings(r=8, lora_dropout=0.1)
    assert isinstance(flagged.lora, LoraSettings)


def test_nested_flag_overrides_one_key_of_the_yaml_section(tmp_path):
    path = write_yaml(tmp_path / "lora.yaml", {"lora": {"r": 16, "lora_alpha": 64, "lora_dropout": 0.0}})
    config = load_config(path, parse_override_args(["--lora.r", "8"]))
    # only r changes; lora_alpha and lora_dropout stay as the YAML set them
    assert config.lora == LoraSettings(r=8, lora_alpha=64, lora_dropout=0.0)


def test_lora_can_be_switched_off_from_the_command_line(tmp_path):
    path = write_yaml(tmp_path / "lora.yaml", {"lora": {"r": 16}})
    assert load_config(path, parse_override_args(["--lora", "null"])).lora is None


# -- parsing flags ----------------------------------------------------------------------------------


def test_parse_override_args_forms():
    overrides = parse_override_args(
        ["--beta", "0.2", "--output_dir=runs/x", "--merge_lora", "--lora.r", "8", "--max_steps", "-1",
         "--gradient-checkpointing", "--model="]
    )
    # values stay text until the key's type is known; bare flags are true, `--key=` is null
    assert overrides == {
        "beta": "0.2",
        "output_dir": "runs/x",
        "merge_lora": True,  # bare flag followed by another option
        "lora.r": "8",
        "max_steps": "-1",  # a negative number is a value, not an option
        "gradient_checkpointing": True,  # bare flag at the end; dashes become underscores
        "model": None,  # --key= is null
    }
    config = load_config(None, overrides)
    assert (config.beta, config.output_dir, config.lora.r, config.max_steps) == (0.2, "runs/x", 8, -1)
    assert config.merge_lora is True and config.gradient_checkpointing is True and config.model is None


def test_flag_values_are_read_as_the_key_needs():
    overrides = parse_override_args(["--learning_rate", "1e-6", "--beta", "0.5", "--eval_steps", "20",
                                     "--merge_lora", "false", "--report_to", "[tensorboard, wandb]", "--lora.r", "4"])
    config = load_config(None, overrides)
    assert isinstance(config.learning_rate, float) and config.learning_rate == 1e-6  # YAML alone reads a string
    assert config.beta == 0.5 and config.eval_steps == 20 and config.merge_lora is False
    assert config.report_to == ["tensorboard", "wandb"]


def test_comma_separated_list_flag():
    config = load_config(None, parse_override_args(["--report_to", "tensorboard,wandb"]))
    assert config.report_to == ["tensorboard", "wandb"]


def test_comma_separated_target_modules_flag():
    # PEFT reads a string target_modules as one regex, so 'q_proj,v_proj' would match no module
    config = load_config(None, parse_override_args(["--lora.target_modules", "q_proj,v_proj"]))
    assert config.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("system_prompt", "Answer: briefly."),  # YAML reads a mapping
        ("system_prompt", "yes"),  # YAML 1.1 reads a bool
        ("run_name", "exp #1"),  # YAML drops the "comment"
        ("run_name", "0.10"),  # YAML reads 0.1
        ("chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}"),  # YAML scanner error
    ],
)
def test_string_flag_values_are_kept_verbatim(key, text):
    assert getattr(load_config(None, parse_override_args([f"--{key}", text])), key) == text


@pytest.mark.parametrize("value", ["[0.1", "{% raw %}"])
def test_unparsable_flag_value_is_a_user_error(value):
    with pytest.raises(UserError):
        load_config(None, parse_override_args(["--beta", value]))


@pytest.mark.parametrize("args", [["beta", "0.1"], ["-b", "0.1"], ["--"], ["--beta", "0.1", "extra"]])
def test_parse_override_args_rejects_positional_tokens(args):
    with pytest.raises(UserError, match="unexpected argument"):
        parse_override_args(args)


def test_int_and_float_coercion():
    config = load_config(None, {"max_steps": 10.0, "num_train_epochs": 3, "max_prompt_length": "128"})
    assert config.max_steps == 10 and isinstance(config.max_steps, int)
    assert config.num_train_epochs == 3.0 and isinstance(config.num_train_epochs, float)
    assert config.max_prompt_length == 128


# -- errors that name the key --------------------------------------------------------------------


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(UserError, match="unknown config key 'lerning_rate'.*did you mean 'learning_rate'"):
        load_config(None, parse_override_args(["--lerning_rate", "1e-5"]))


def test_unknown_nested_key_names_the_closest_lora_key():
    with pytest.raises(UserError) as error:
        load_config(None, parse_override_args(["--lora.rr", "8"]))
    message = str(error.value)
    assert "'rr'" in message and "lora" in message and "did you mean 'r'?" in message


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"betta": 0.2})
    with pytest.raises(UserError, match="'betta'.*did you mean 'beta'"):
        load_config(path)


def test_unknown_key_without_a_close_match_points_to_help():
    with pytest.raises(UserError, match="unknown config key 'zzzz'.*--help"):
        load_config(None, {"zzzz": 1})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("beta", "abc", "'beta' must be of type float"),
        ("beta", True, "'beta' must be of type float"),
        ("per_device_train_batch_size", 2.5, "'per_device_train_batch_size' must be of type int"),
        ("max_steps", True, "'max_steps' must be of type int"),
        ("merge_lora", "maybe", "'merge_lora' must be of type bool"),
        ("merge_lora", 1, "'merge_lora' must be of type bool"),
        ("max_prompt_length", "long", "'max_prompt_length' must be of type int"),
        ("seed", None, "'seed' needs a value of type int"),
        ("lora", 5, "'lora' must be a mapping"),
        ("lora.r", "big", "'lora.r' must be of type int"),
        ("report_to", 3, "'report_to' must be a list"),
        ("model", ["a", "b"], "'model' must be of type str"),
    ],
)
def test_wrong_types_name_the_key(key, value, expected):
    with pytest.raises(UserError, match=expected.replace(".", r"\.")):
        load_config(None, {key: value})


@pytest.mark.parametrize(
    ("key", "value", "suggestion"),
    [
        ("algorithm", "orp", "orpo"),
        ("lr_scheduler_type", "cosin", "cosine"),
        ("dtype", "bfloat", "bfloat16"),
        ("batch_layout", "packd", "packed"),
        ("device", "metal", None),
    ],
)
def test_literal_choices_list_options_and_suggest(key, value, suggestion):
    with pytest.raises(UserError) as error:
        load_config(None, {key: value})
    message = str(error.value)
    assert f"'{key}' must be one of" in message and f"not '{value}'" in message
    if suggestion:
        assert f"did you mean '{suggestion}'?" in message
    else:
        assert "did you mean" not in message


@pytest.mark.parametrize(
    ("values", "key_in_message"),
    [
        ({"beta": 0}, "'beta'"),
        ({"beta": -0.1}, "'beta'"),
        ({"learning_rate": -1e-5}, "'learning_rate'"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "'label_smoothing'"),
        ({"loss_type": "robust", "label_smoothing": -0.1}, "'label_smoothing'"),
        ({"algorithm": "simpo", "label_smoothing": 0.7}, "'label_smoothing'"),
        ({"label_smoothing": 0.1}, "'label_smoothing'"),  # dpo sigmoid has no label smoothing
        ({"algorithm": "orpo", "label_smoothing": 0.1}, "'label_smoothing'"),
        ({"loss_type": "hnge"}, "'loss_type'"),
        ({"algorithm": "orpo", "loss_type": "hinge"}, "'loss_type'"),
        ({"algorithm": "simpo", "loss_type": "ipo"}, "'loss_type'"),
        ({"algorithm": "orpo", "rpo_alpha": 1.0}, "'rpo_alpha'"),
        ({"rpo_alpha": -1.0}, "'rpo_alpha'"),
        ({"algorithm": "orpo", "ref_model": "some/model"}, "'ref_model'"),
        ({"algorithm": "simpo", "ref_model": "some/model"}, "'ref_model'"),
        ({"algorithm": "sft", "ref_model": "some/model"}, "'ref_model'"),
        ({"max_length": 128, "max_prompt_length": 128}, "'max_prompt_length'"),
        ({"max_length": 128, "max_prompt_length": 200}, "'max_prompt_length'"),
        ({"max_prompt_length": 0}, "'max_prompt_length'"),
        ({"max_length": 1}, "'max_length'"),
        ({"eval_dataset": "held_out.jsonl", "test_split_size": 0.1}, "'eval_dataset'"),
        ({"eval_dataset": "held_out.jsonl", "test_split_size": 0.1}, "'test_split_size'"),
        ({"test_split_size": -0.1}, "'test_split_size'"),
        ({"merge_lora": True}, "'merge_lora'"),
        ({"cpo_alpha": 1.0}, "'cpo_alpha'"),
        ({"algorithm": "orpo", "cpo_alpha": 1.0}, "'cpo_alpha'"),
        ({"algorithm": "simpo", "cpo_alpha": -1.0}, "'cpo_alpha'"),
        ({"report_to": ["tensorbaord"]}, "'report_to'"),
        ({"report_to": "wandb,mlflow"}, "'report_to'"),
        ({"per_device_train_batch_size": 0}, "'per_device_train_batch_size'"),
        ({"gradient_accumulation_steps": 0}, "'gradient_accumulation_steps'"),
        ({"logprob_chunk_size": 0}, "'logprob_chunk_size'"),
        ({"warmup_ratio": 1.5}, "'warmup_ratio'"),
        ({"max_grad_norm": -1.0}, "'max_grad_norm'"),
        ({"max_steps": 0}, "'max_steps'"),
        ({"max_train_pairs": 0}, "'max_train_pairs'"),
        ({"eval_steps": 0}, "'eval_steps'"),
        ({"save_total_limit": 0}, "'save_total_limit'"),
        ({"lora": {"r": 0}}, "'lora.r'"),
        ({"lora": {"lora_dropout": 1.0}}, "'lora.lora_dropout'"),
    ],
)
def test_validation_rules_name_the_key(values, key_in_message):
    with pytest.raises(UserError) as error:
        load_config(None, values)
    assert key_in_message in str(error.value)


def test_unknown_loss_type_suggests_the_closest():
    with pytest.raises(UserError, match="did you mean 'hinge'"):
        load_config(None, {"loss_type": "hnge"})


@pytest.mark.parametrize(
    "values",
    [
        {"loss_type": "robust", "label_smoothing": 0.2},
        {"algorithm": "simpo", "label_smoothing": 0.1, "cpo_alpha": 1.0, "beta": 2.0},
        {"algorithm": "orpo", "beta": 0.1},
        {"algorithm": "sft"},
        {"rpo_alpha": 1.0},
        {"ref_model": "some/model"},
        {"lora": {"r": 8}, "merge_lora": True},
        {"eval_dataset": "held_out.jsonl"},
        {"test_split_size": 0.1},
        {"max_length": 256, "max_prompt_length": 255},
        {"report_to": ["tensorboard", "wandb"]},
        {"max_steps": 5, "num_train_epochs": 0},
    ],
)
def test_valid_combinations_pass(values):
    load_config(None, values)


def test_validate_checks_a_config_changed_after_loading():
    config = load_config()
    config.algorithm = "orpo"
    config.ref_model = "some/model"
    with pytest.raises(UserError, match="ref_model"):
        config.validate()


# -- saving and loading -------------------------------------------------------------------------


def test_save_then_load_round_trips(tmp_path):
    config = load_config(
        None,
        {
            "algorithm": "simpo",
            "beta": 2.5,
            "simpo_gamma": 0.3,
            "cpo_alpha": 1.0,
            "label_smoothing": 0.1,
            "learning_rate": 5e-7,
            "max_length": 256,
            "max_prompt_length": 128,
            "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "merge_lora": True,
            "report_to": ["tensorboard"],
            "chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
            "system_prompt": "You are: helpful.",
            "dataset": "data/x.jsonl",
            "test_split_size": 0.25,
        },
    )
    path = tmp_path / "config.yaml"
    RunFolder(path.parent).write_config(config)
    loaded = load_config(path)
    assert loaded == config
    assert isinstance(loaded.lora, LoraSettings)
    assert dataclasses.asdict(loaded) == dataclasses.asdict(config)


def test_save_then_load_round_trips_defaults(tmp_path):
    path = tmp_path / "config.yaml"
    RunFolder(path.parent).write_config(TrainConfig())
    assert load_config(path) == TrainConfig()
    assert set(yaml.safe_load(path.read_text())) == {f.name for f in dataclasses.fields(TrainConfig)}


# -- recipes --------------------------------------------------------------------------------------


def test_every_recipe_loads_and_validates():
    recipes = sorted(RECIPES_DIR.glob("**/*.yaml"))
    assert recipes
    for recipe in recipes:
        try:
            config = load_config(recipe)
        except UserError as error:
            pytest.fail(f"{recipe.relative_to(REPO_ROOT)}: {error}")
        config.validate()


# -- one definition of every name and default ---------------------------------------------------------


def test_registries_name_exactly_the_configs_choices():
    from smolalign.config.choices import ALGORITHM_TITLES, ALGORITHMS, DPO_LOSS_TYPES
    from smolalign.core.losses import DPO_LOSSES, OBJECTIVES

    assert set(OBJECTIVES) == set(ALGORITHMS) == set(ALGORITHM_TITLES)
    assert set(DPO_LOSSES) == set(DPO_LOSS_TYPES)


def test_defaults_shared_with_training_are_train_configs():
    from smolalign.core.losses import LossSettings

    train = TrainConfig()
    assert all(getattr(LossSettings(), f.name) == getattr(train, f.name) for f in dataclasses.fields(LossSettings))
    assert LossSettings.from_config(train) == LossSettings()
    inspect = InspectConfig(dataset="d")
    assert (inspect.max_length, inspect.split) == (train.max_length, train.dataset_split)
    evaluate = EvalConfig(model="m", dataset="d")
    assert evaluate.split == train.eval_split


def test_changed_settings_are_those_that_change_the_numbers():
    from smolalign.config.files import changed_settings

    before = load_config(None, {"lora": {"r": 8}})
    bookkeeping = load_config(None, {"lora": {"r": 8}, "logging_steps": 1, "output_dir": "elsewhere",
                                     "logprob_chunk_size": 64, "report_to": "tensorboard"})
    assert changed_settings(before, bookkeeping) == []
    other = load_config(None, {"lora": {"r": 4}, "beta": 0.2})
    assert changed_settings(before, other) == ["lora.r: 8 -> 4", "beta: 0.1 -> 0.2"]
    full = load_config(None, {"lora": None})  # a section removed (or added) is a change too, key by key
    assert {"lora.r: 8 -> unset", "lora: unset -> None"} <= set(changed_settings(before, full))
    assert {"lora.r: unset -> 8", "lora: None -> unset"} <= set(changed_settings(full, before))


# -- the other commands' configs ------------------------------------------------------------------------


COMMAND_CONFIGS = {("eval",): EvalConfig, ("chat",): ChatConfig, ("export",): ExportConfig,
                   ("data", "inspect"): InspectConfig, ("bench", "speed"): BenchConfig,
                   ("bench", "quality"): QualityConfig, ("bench", "generation"): GenerationBenchConfig,
                   ("bench", "export"): ExportBenchConfig, ("train",): TrainConfig, ("sweep",): TrainConfig}
EXTRA_FLAGS = {("train",): {"config"}, ("sweep",): {"config", "grid"}}


@pytest.mark.parametrize("command", list(COMMAND_CONFIGS), ids=" ".join)
def test_command_flags_are_the_config_fields(command):
    """Each command's flags are derived from its config: one per field, no more, no less."""
    from smolalign.cli import _parser

    parser = _parser()
    for name in command:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = subparsers.choices[name]
    flags = {action.dest for action in parser._actions if action.dest != "help"}
    expected = {f.name for f in dataclasses.fields(COMMAND_CONFIGS[command])}
    assert flags == expected | EXTRA_FLAGS.get(command, set())


def test_command_configs_are_built_from_keyword_values_like_train_config():
    config = EvalConfig.from_values({"model": "runs/a/final", "dataset": "d.jsonl", "beta": "0.2", "generate": 4.0})
    assert (config.beta, config.generate, config.max_length) == (0.2, 4, None)
    with pytest.raises(UserError, match="unknown config key 'bta'; did you mean 'beta'"):
        EvalConfig.from_values({"model": "m", "dataset": "d", "bta": 0.2})
    with pytest.raises(UserError, match="unknown config key 'zzzz'.*smolalign eval --help"):
        EvalConfig.from_values({"model": "m", "dataset": "d", "zzzz": 1})
    with pytest.raises(UserError, match="missing 'dataset'"):
        EvalConfig.from_values({"model": "m"})
    with pytest.raises(UserError, match="'generate' must be >= 0"):
        EvalConfig.from_values({"model": "m", "dataset": "d", "generate": -1})
    bench = BenchConfig.from_values({"algorithm": "dpo, orpo", "frameworks": "smolalign"})
    assert (bench.algorithm, bench.frameworks) == (["dpo", "orpo"], ["smolalign"])
