"""`smolalign eval`: per-pair log-probs equal a plain transformers computation; summaries are consistent;
a run is evaluated with its own settings, against the model it started from."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from conftest import read_jsonl, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from smolalign.cli import main
from smolalign.config.commands import EvalConfig
from smolalign.config.train import TrainConfig, load_config
from smolalign.data.messages import parse_hh_transcript
from smolalign.errors import UserError
from smolalign.evaluation.command import with_run_settings
from smolalign.models.embedded import embedded_model_dir
from smolalign.stats import wilson_interval
from smolalign.training.loop import run_training


def plain_answer_logps(model, tokenizer, messages: list[dict]) -> tuple[float, int]:
    """Sum of log-probs of the last message's tokens, from full logits, with the chat template rendered
    by transformers itself (TRL's convention: answer ids = template(prompt + answer) minus template(prompt))."""
    prompt_ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(torch.tensor([full_ids])).logits[0].float()
    logps = torch.log_softmax(logits[:-1], dim=-1)[torch.arange(len(full_ids) - 1), torch.tensor(full_ids[1:])]
    answer = logps[len(prompt_ids) - 1:]
    return answer.sum().item(), len(answer)


def check_against_plain_transformers(model_dir, rows, pair_rows, tolerance):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert [r["index"] for r in pair_rows] == list(range(len(rows)))
    for row, result in zip(rows, pair_rows, strict=True):
        for side in ("chosen", "rejected"):
            expected, count = plain_answer_logps(model, tokenizer, parse_hh_transcript(row[side]))
            assert result[f"n_tokens_{side}"] == count
            assert abs(result[f"logps_{side}"] - expected) < tolerance, (side, result[f"logps_{side}"], expected)


def test_eval_writes_summary_and_pairs(tmp_path, tiny_model, hh_rows, capsys):
    rows = [r for r in hh_rows[50:58]]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "eval"
    main(["eval", "--model", str(tiny_model(0)), "--dataset", str(data), "--ref_model", str(tiny_model(1)),
          "--output_dir", str(out), "--beta", "0.5"])
    printed = capsys.readouterr().out
    assert "rewards/accuracies" in printed

    summary = json.loads((out / "eval.json").read_text())
    pairs = read_jsonl(out / "eval_pairs.jsonl")
    assert summary["pairs"] == len(pairs) == len(rows)
    margins = [0.5 * ((p["logps_chosen"] - p["ref_logps_chosen"]) - (p["logps_rejected"] - p["ref_logps_rejected"]))
               for p in pairs]
    assert summary["rewards/accuracies"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    # each accuracy with its 95% Wilson interval over the 8 pairs, printed on one line with the count
    mean_wins = sum(p["logps_chosen"] / p["n_tokens_chosen"] > p["logps_rejected"] / p["n_tokens_rejected"]
                    for p in pairs)
    for name, wins in (("rewards/accuracies", sum(m > 0 for m in margins)), ("logps/mean_accuracy", mean_wins)):
        low, high = wilson_interval(wins, 8)
        assert (summary[f"{name}_ci_low"], summary[f"{name}_ci_high"]) == pytest.approx((low, high))
        line = f"{wins / 8:.2f} [{low:.2f}, {high:.2f}], n=8"
        assert re.search(rf"^  {re.escape(name)} +{re.escape(line)}$", printed, re.MULTILINE), line
    assert "_ci_low" not in printed
    assert summary["rewards/margins"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    assert summary["logps/chosen"] == pytest.approx(sum(p["logps_chosen"] for p in pairs) / len(pairs), abs=1e-4)
    check_against_plain_transformers(tiny_model(0), rows, pairs, tolerance=1e-3)


@pytest.mark.slow
def test_eval_on_the_embedded_model_matches_plain_transformers(tmp_path, hh_rows):
    rows = hh_rows[400:404]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    main(["eval", "--model", "embedded", "--dataset", str(data), "--output_dir", str(tmp_path / "eval")])
    pairs = read_jsonl(tmp_path / "eval" / "eval_pairs.jsonl")
    check_against_plain_transformers(embedded_model_dir(), rows, pairs, tolerance=1e-3)


@pytest.mark.slow
def test_eval_of_a_run_uses_the_runs_own_beta_and_lengths(tmp_path, tiny_model, hh_rows, monkeypatch,
                                                          reference_cache_saves):
    """A run trained at beta 0.5 and max_length 128 is scored with both unless the command says otherwise."""
    data = write_jsonl(tmp_path / "pairs.jsonl", hh_rows[800:808])  # longer than 128 tokens: cut to fit
    run = tmp_path / "run"
    monkeypatch.setenv("SMOLALIGN_REFERENCE_CACHE", str(tmp_path / "cache"))
    main(["train", "--model", str(tiny_model(0)), "--dataset", str(data), "--beta", "0.5", "--max_length", "128",
          "--max_steps", "2", "--per_device_train_batch_size", "4", "--output_dir", str(run)])
    reference_cache_saves.clear()
    main(["eval", "--model", str(run / "final"), "--dataset", str(data)])
    # The reference came from training's cache, whose keys are the token ids: cut at the run's max_length.
    assert reference_cache_saves == []
    summary = json.loads((run / "eval" / "eval.json").read_text())
    rows = read_jsonl(run / "eval" / "eval_pairs.jsonl")
    assert summary["beta"] == 0.5
    margins = [(r["logps_chosen"] - r["ref_logps_chosen"]) - (r["logps_rejected"] - r["ref_logps_rejected"])
               for r in rows]
    assert summary["rewards/margins"] == pytest.approx(0.5 * sum(margins) / len(margins), rel=1e-5)
    chosen = [r["logps_chosen"] - r["ref_logps_chosen"] for r in rows]
    assert summary["rewards/chosen"] == pytest.approx(0.5 * sum(chosen) / len(chosen), rel=1e-5, abs=1e-6)

    main(["eval", "--model", str(run / "final"), "--dataset", str(data), "--beta", "0.2", "--max_length", "1024",
          "--output_dir", str(tmp_path / "explicit")])
    assert json.loads((tmp_path / "explicit" / "eval.json").read_text())["beta"] == 0.2  # the flags win
    assert reference_cache_saves == [8]  # other token ids: not in the cache, so added to it


def test_unset_run_settings_come_from_the_run_else_from_training_defaults(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"beta": 0.5, "max_length": 128,
                                                                     "chat_template": "chatml"}))
    final = str(tmp_path / "run" / "final")
    config = with_run_settings(EvalConfig.from_values({"model": final, "dataset": "d.jsonl"}))
    assert (config.beta, config.max_length, config.chat_template) == (0.5, 128, "chatml")
    assert (config.logprob_chunk_size, config.max_prompt_length) == (TrainConfig.logprob_chunk_size, None)
    flagged = with_run_settings(EvalConfig.from_values({"model": final, "dataset": "d.jsonl", "beta": 0.2}))
    assert (flagged.beta, flagged.max_length) == (0.2, 128)  # a flag wins over the run's value
    plain = with_run_settings(EvalConfig.from_values({"model": str(tmp_path / "model"), "dataset": "d.jsonl"}))
    assert (plain.beta, plain.max_length) == (TrainConfig.beta, TrainConfig.max_length)  # no run: training's
    with pytest.raises(UserError, match="'max_prompt_length' \\(200\\) must be >= 1 and below max_length \\(128\\)"):
        with_run_settings(EvalConfig.from_values({"model": final, "dataset": "d.jsonl", "max_prompt_length": 200}))


def test_eval_of_a_full_fine_tuning_run_uses_its_starting_model_as_reference(tmp_path, tiny_model, pairs_file,
                                                                             monkeypatch, reference_cache_saves):
    monkeypatch.setenv("SMOLALIGN_REFERENCE_CACHE", str(tmp_path / "cache"))
    final = run_training(load_config(None, {"model": str(tiny_model(0)), "dataset": str(pairs_file), "max_steps": 1,
                                     "per_device_train_batch_size": 16, "output_dir": str(tmp_path / "run")}))
    reference_cache_saves.clear()
    main(["eval", "--model", str(final), "--dataset", str(pairs_file), "--max_pairs", "4"])
    assert reference_cache_saves == []  # the reference log-probs were precomputed by training and cached
    summary = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert "kl/chosen_per_token" in summary and summary["reward"].startswith("beta * (logps - ref_logps)")
    rows = read_jsonl(tmp_path / "run" / "eval" / "eval_pairs.jsonl")
    assert len(rows) == 4 and all("ref_logps_chosen" in row for row in rows)
