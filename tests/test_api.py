"""The Python API (`smolalign.train/evaluate/compare/sweep`): the CLI's settings and sentences, result objects."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import write_jsonl

import smolalign
from smolalign.api import train_config
from smolalign.cli import main
from smolalign.config.train import load_config
from smolalign.errors import UserError
from smolalign.results import ComparisonResult, EvalResult, TrainResult
from smolalign.stats import Proportion


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, hh_rows):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", hh_rows[:8])


@pytest.fixture(scope="module")
def settings(tiny_model, pairs_file) -> dict:
    """A run of two steps on a tiny model, with held-out accuracy before and after."""
    return {"model": tiny_model(0), "dataset": pairs_file, "test_split_size": 2, "eval_on_start": True,
            "max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1,
            "max_length": 128}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, settings) -> TrainResult:
    return smolalign.train(**settings, output_dir=tmp_path_factory.mktemp("runs") / "dpo")


def test_import_smolalign_is_light():
    code = "import smolalign, sys; print(sorted({'torch', 'transformers', 'matplotlib'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_keywords_a_file_and_a_config_object_give_the_same_config(tmp_path, settings):
    values = {**settings, "lora": {"r": 4, "lora_alpha": 8}, "output_dir": tmp_path / "run"}
    from_keywords = train_config(**values)  # paths as pathlib.Path, as a notebook passes them
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({k: str(v) if k in ("model", "dataset", "output_dir") else v
                                           for k, v in values.items()}))
    assert train_config(config_file) == from_keywords
    assert train_config(config=str(config_file)) == from_keywords
    assert train_config(from_keywords) == from_keywords
    assert load_config(config_file) == from_keywords  # what `smolalign train --config FILE` runs

    # Keywords override the file or the object; a section's key changes that key only, as --lora.r does.
    assert train_config(config_file, beta=0.3).beta == 0.3
    for changed in (train_config(config_file, lora={"r": 8}), train_config(from_keywords, lora={"r": 8}),
                    train_config(from_keywords, **{"lora.r": 8})):
        assert (changed.lora.r, changed.lora.lora_alpha) == (8, 8)
    assert train_config(from_keywords, lora=None).lora is None
    assert train_config(train_config(**settings), **{"lora.r": 2}).lora.r == 2  # switched on from an object
    assert train_config("demo", max_steps=2).max_steps == 2  # a packaged recipe by name


def cli_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit):
        main(argv)
    return capsys.readouterr().err.strip().splitlines()[-1].removeprefix("smolalign: error: ")


@pytest.mark.parametrize(("keywords", "flags"), [
    ({"bta": 0.1}, ["--bta", "0.1"]),
    ({"beta": -1}, ["--beta", "-1"]),
    ({"max_steps": "many"}, ["--max_steps", "many"]),
    ({"loss_type": "sigmod"}, ["--loss_type", "sigmod"]),
    ({"config": "no-such-recipe"}, ["--config", "no-such-recipe"]),
])
def test_mistakes_raise_user_error_with_the_cli_sentence(tmp_path, capsys, keywords, flags):
    with pytest.raises(UserError) as raised:
        smolalign.train(output_dir=tmp_path / "run", **keywords)
    assert str(raised.value) == cli_error(capsys, ["train", "--output_dir", str(tmp_path / "run"), *flags])
    assert not (tmp_path / "run").exists()


def test_train_returns_the_run_with_its_numbers_and_curves(trained, settings):
    assert trained.final_model == trained.run_dir / "final" and (trained.final_model / "config.json").exists()
    assert trained.report == trained.run_dir / "report.html"  # written by the API, after training
    assert trained.config == train_config(**settings, output_dir=trained.run_dir)
    assert [r["step"] for r in trained.metrics if "loss" in r] == [1, 2]
    frame = trained.to_pandas()
    assert {"step", "loss", "rewards/accuracies", "eval_logps/mean_accuracy"} <= set(frame.columns)

    accuracy = trained.held_out_accuracy
    assert isinstance(accuracy, Proportion) and accuracy.n == 2 and accuracy.has_interval
    page = trained._repr_html_()
    assert str(accuracy) in page and "held-out accuracy before" in page  # value [low, high], n=2
    assert str(trained.final_model) in page and str(trained.report) in page
    assert page.count('<img src="data:image/png;base64,') == len(list((trained.run_dir / "plots").glob("*.png"))) >= 5
    text = repr(trained)
    assert str(trained.run_dir) in text and str(accuracy) in text and "verdict:" in text


def test_compare_shows_the_report_inline(tmp_path, trained):
    second = tmp_path / "second"
    (second / "plots").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl"):
        (second / name).write_bytes((trained.run_dir / name).read_bytes())
    result = smolalign.compare(trained, second, output_dir=tmp_path / "compare")
    assert isinstance(result, ComparisonResult) and result.report == tmp_path / "compare" / "report.html"
    assert [run.run_dir for run in result.runs] == [trained.run_dir, second]
    page = result._repr_html_()
    assert page.count("<iframe srcdoc=") == 1 and "Did it work?" in page
    assert "data:image/png;base64," in page and "src=&quot;plots/" not in page  # the frame has no folder
    assert "second" in repr(result) and str(trained.held_out_accuracy) in repr(result)
    with pytest.raises(UserError, match="is not a run folder"):
        smolalign.compare(trained, tmp_path / "nothing-here", output_dir=tmp_path / "compare")


@pytest.mark.slow
def test_sweep_trains_each_point_and_compares_them(tmp_path, settings):
    config = train_config(**{**settings, "max_steps": 1}, output_dir=tmp_path / "sweep")
    result = smolalign.sweep(config, grid={"beta": [0.1, 0.5]})
    assert smolalign.sweep is smolalign.api.sweep  # no module import has replaced the function
    assert [run.run_dir.name for run in result.runs] == ["beta=0.1", "beta=0.5"]
    assert [run.config.beta for run in result.runs] == [0.1, 0.5]
    assert all(run.final_model is not None for run in result.runs)
    assert result.report == tmp_path / "sweep" / "report.html" and (tmp_path / "sweep" / "plots" / "sweep.png").exists()
    with pytest.raises(UserError, match="sweep needs at least one"):
        smolalign.sweep(config, grid={})


def test_evaluate_returns_the_summary_with_intervals(tmp_path, trained, pairs_file):
    result = smolalign.evaluate(model=trained.final_model, dataset=pairs_file, max_pairs=4, generate=1,
                                max_new_tokens=4)
    assert isinstance(result, EvalResult) and result.output_dir == trained.run_dir / "eval"
    assert result.summary["pairs"] == 4 and len(result.pairs) == 4 and len(result.generations) == 1
    assert trained.evaluation == result.summary  # the run's view shows it too
    accuracy = Proportion.read(result.summary, "rewards/accuracies", n_key="pairs")
    assert str(accuracy) in result._repr_html_() and str(accuracy) in repr(result)
    with pytest.raises(UserError, match="does not exist"):
        smolalign.evaluate(model=trained.final_model, dataset=tmp_path / "missing.jsonl")
