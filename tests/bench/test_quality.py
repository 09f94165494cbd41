"""`smolalign bench --quality`: every method trained at one budget and scored on the same held-out pairs,
judged by a reward model trained on the same pairs; finished work is not redone; wrong flags are refused."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import write_jsonl

from smolalign.bench import quality
from smolalign.bench.quality import quality_bench, verdict
from smolalign.cli import main
from smolalign.config.commands import QualityConfig
from smolalign.errors import UserError
from smolalign.stats import Proportion


@pytest.fixture
def recipe(tmp_path, tiny_model, hh_rows):
    train = write_jsonl(tmp_path / "train.jsonl", hh_rows[100:108])
    test = write_jsonl(tmp_path / "test.jsonl", hh_rows[200:206])
    settings = {"model": str(tiny_model(0)), "dataset": str(train), "eval_dataset": str(test),
                "max_length": 96, "max_prompt_length": 48, "per_device_train_batch_size": 4,
                "learning_rate": 1e-3, "logging_steps": 1, "seed": 0}
    path = tmp_path / "quality.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def quality_config(recipe, tmp_path, **settings) -> QualityConfig:
    return QualityConfig.from_values({"algorithm": "dpo,orpo", "recipe": str(recipe), "eval_pairs": 6,
                                      "judge_prompts": 3, "max_new_tokens": 4, "device": "cpu",
                                      "output_dir": str(tmp_path / "quality"), **settings})


@pytest.mark.slow
def test_quality_bench_scores_every_method_on_the_same_held_out_pairs(recipe, tmp_path, monkeypatch):
    result = quality_bench(quality_config(recipe, tmp_path))
    output = tmp_path / "quality"
    assert [row["method"] for row in result["rows"]] == ["dpo", "orpo"]
    for row in result["rows"]:
        summary = row["eval"]
        assert summary["pairs"] == 6 and summary["judge/n"] == 3
        accuracy = Proportion.read(summary, "rewards/accuracies", n_key="pairs")
        assert accuracy.low <= accuracy.value <= accuracy.high
        assert row["verdict"] == verdict(accuracy)
        assert summary["kl/chosen_per_token"] >= 0 and summary["perplexity/chosen"] > 1
        assert row["train_seconds"] > 0 and row["eval_seconds"] > 0
    assert (output / "dpo" / "config.yaml").exists() and (output / "orpo" / "final").is_dir()
    assert yaml.safe_load((output / "orpo" / "config.yaml").read_text())["algorithm"] == "orpo"
    judge = result["judge"]
    assert judge["accuracy"]["n"] == 6 and 0 <= judge["accuracy"]["value"] <= 1
    assert "perplexity/chosen" in result["starting_model"] and "kl/chosen_per_token" not in result["starting_model"]
    markdown = (output / "quality.md").read_text()
    assert markdown == result["markdown"]
    assert "| starting model |" in markdown and "| dpo | loss_type sigmoid, beta 0.1 |" in markdown
    assert f"its held-out accuracy: {Proportion(**judge['accuracy'])}" in markdown
    assert (output / "quality.png").stat().st_size > 10_000
    assert json.loads((output / "quality.json").read_text())["rows"] == result["rows"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("finished work was redone")

    # A rerun with the same settings reuses every run and evaluation, with the times they took.
    monkeypatch.setattr(quality, "run_training", must_not_run)
    monkeypatch.setattr(quality, "run_eval", must_not_run)
    assert quality_bench(quality_config(recipe, tmp_path)) == result


def test_verdict_says_whether_the_interval_excludes_chance():
    assert verdict(Proportion(0.62, 0.53, 0.70, 120)) == "measurable"
    assert verdict(Proportion(0.52, 0.44, 0.61, 120)) == "not measurable"
    assert verdict(Proportion(0.30, 0.22, 0.39, 120)) == "measurable, for the worse"
    assert verdict(None) == "not measured"


def test_a_recipe_without_held_out_pairs_is_refused(tmp_path, recipe):
    settings = yaml.safe_load(recipe.read_text())
    del settings["eval_dataset"]
    recipe.write_text(yaml.safe_dump(settings))
    with pytest.raises(UserError, match="names no eval_dataset"):
        quality_bench(quality_config(recipe, tmp_path))


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "quality", "--repeats", "2"], "unknown config key 'repeats'"),
    (["bench", "speed", "--eval_pairs", "10"], "unknown config key 'eval_pairs'"),
    (["bench", "quality", "--algorithm", "sft"], "'algorithm'"),
    (["bench", "generation", "--repeats", "2"], "run `smolalign bench generation --help`"),
    (["bench", "--quality", "--generation"], "two benches"),
    (["bench", "--quality", "--repeats", "2"], "unknown config key 'repeats'"),  # the old form, still read
    (["bench", "generation", "--prompts", "0"], "'prompts'"),
])
def test_each_bench_takes_its_own_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
