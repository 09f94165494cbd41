"""`smolalign bench` options for GPU runs, checked on the CPU: random-weight models from bundled
architectures, LoRA for every framework, warm-up steps left out of the timings, and TRL + Liger."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tokenize_hh
from transformers import AutoConfig, AutoModelForCausalLM

from smolalign.bench.command import bench, model_config_file
from smolalign.bench.flops import forward_flops, training_flops
from smolalign.bench.tables import BenchResult
from smolalign.config.commands import BenchConfig
from smolalign.data.tokenize import tokenize_pairs
from smolalign.errors import UserError


def bench_args(tmp_path, pairs_file, **overrides) -> BenchConfig:
    settings = {"dataset": str(pairs_file), "steps": 2, "batch_size": 2, "max_length": 256, "frameworks": "smolalign",
                "output_dir": str(tmp_path / "bench"), "device": "cpu"}
    return BenchConfig.from_values({**settings, **overrides})


@pytest.mark.parametrize("name, parameters", [("smollm2-135m", 134.5e6), ("smollm2-1.7b", 1711.4e6)])
def test_bundled_architectures_have_the_smollm2_sizes(name, parameters):
    settings = {k: v for k, v in json.loads(model_config_file(name).read_text()).items() if not k.startswith("_")}
    config = AutoConfig.for_model(**settings)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=1e-3)
    assert config.vocab_size == 49152 and config.tie_word_embeddings


@pytest.mark.slow
def test_lora_bench_of_a_random_model_against_trl(tmp_path, tokenizer, pairs_file):
    """A tiny architecture from a config.json, LoRA in both frameworks, the first step left out of the timings."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 64,
                                  "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "tie_word_embeddings": True}))
    args = bench_args(tmp_path, pairs_file, model_config=str(config), lora=True, warmup_steps=1,
                      frameworks="smolalign,trl")
    report = bench(args)
    assert [row["framework"] for row in report["rows"]] == ["smolalign", "trl"]
    for row in report["rows"]:
        assert len(row["step_seconds"]) == 2
        assert row["seconds_per_step"] == pytest.approx(row["step_seconds"][1])  # the warm-up step is left out
        assert 0 < row["mfu"] < 1
    trained = [row["trainable_parameters"] for row in report["rows"]]
    # r=16 on q, o (64 -> 64), k, v (64 -> 32), gate, up (64 -> 128) and down (128 -> 64), in 2 layers
    assert trained[0] == trained[1] == 2 * 16 * (2 * 128 + 2 * 96 + 3 * 192)
    assert report["settings"]["lora"] and report["settings"]["model_config"] == str(config)
    assert "LoRA" in report["markdown"] and "without the first 1" in report["markdown"]
    assert report["ratios"][0]["baseline"] == "trl" and report["ratios"][0]["speedup_seconds_per_step"] > 0


def test_bench_refuses_what_cannot_run_here(tmp_path, pairs_file):
    with pytest.raises(UserError, match="CUDA"):
        bench(bench_args(tmp_path, pairs_file, frameworks="smolalign,trl_liger"))
    with pytest.raises(UserError, match="'warmup_steps' \\(2\\) must be smaller than 'steps' \\(2\\)"):
        bench_args(tmp_path, pairs_file, warmup_steps=2)
    with pytest.raises(UserError, match="'frameworks' must be one of smolalign, trl, trl_liger, not 'tlr'"):
        bench_args(tmp_path, pairs_file, frameworks="smolalign,tlr")
    with pytest.raises(UserError, match="'algorithm' must be one of dpo, orpo, simpo, not 'sft'"):
        bench_args(tmp_path, pairs_file, algorithm="dpo, sft")
    with pytest.raises(UserError, match="smollm2-135m"):
        bench(bench_args(tmp_path, pairs_file, model_config="gpt-5"))


def test_warmup_steps_leave_their_share_of_tokens_and_flops_out():
    run = BenchResult("smolalign", "dpo", 10.0, [5.0, 1.0, 1.0, 2.0], tokens=4000, peak_bytes=1, flops=8e12,
                      kept_freed_memory=False, warmup_steps=1)
    assert run.seconds_per_step == pytest.approx(4 / 3)
    assert run.tokens_per_second == pytest.approx(3000 / 4)
    assert run.mfu(1e12) == pytest.approx(6e12 / 4 / 1e12)


def test_lora_flops_count_no_weight_gradients(tiny_model, tokenizer, hh_rows):
    config = AutoConfig.from_pretrained(tiny_model(0))
    pairs = tokenize_hh(hh_rows[500:504], tokenizer)
    forward = sum(forward_flops(config, p, shared_prompt=True, scored_prompt=False) for p in pairs)
    assert training_flops(config, pairs, algorithm="dpo", framework="smolalign") == pytest.approx(3 * forward)
    assert training_flops(config, pairs, algorithm="dpo", framework="smolalign", lora=True) == pytest.approx(
        2 * forward)  # forward + input gradients; the reference was precomputed
    for framework in ("trl", "trl_liger"):  # TRL runs the reference forward in every step
        flops = training_flops(config, pairs, algorithm="dpo", framework=framework, lora=True)
        assert flops == pytest.approx(3 * forward)


def test_filled_pairs_come_near_max_length_without_passing_it(tokenizer):
    from smolalign.bench.pairs import bench_pairs
    from smolalign.data.sources import bundled_dataset

    read = bench_pairs(bundled_dataset("train"), tokenizer, count=4, max_length=1024, fill=True)
    assert len(read.pairs) == 4
    for pair in tokenize_pairs(read.pairs, tokenizer):
        length = len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))
        assert 600 < length <= 1024  # earlier conversations (under 400 tokens each) fill the room
    first = read.pairs[0]
    assert [m["role"] for m in first.prompt[:4]] == ["user", "assistant", "user", "assistant"]
    assert first.prompt[-1]["role"] == "user" and first.chosen[0]["role"] == "assistant"
    unfilled = bench_pairs(bundled_dataset("train"), tokenizer, count=4, max_length=1024, fill=False)
    assert [p.prompt[-1] for p in unfilled.pairs] == [p.prompt[-1] for p in read.pairs]  # the same questions


def test_a_system_message_stays_first_when_pairs_are_filled(tokenizer):
    from smolalign.bench.pairs import fill_to_length
    from smolalign.data.formats import PreferencePair

    def pair(index, question):
        return PreferencePair(index, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}],
                              [{"role": "assistant", "content": "Yes."}], [{"role": "assistant", "content": "No."}])

    pool = [pair(i, f"Question number {i}?") for i in range(1, 40)]
    filled = fill_to_length(pair(0, "Last question?"), pool, tokenizer, 200)
    roles = [m["role"] for m in filled.prompt]
    assert roles[0] == "system" and roles.count("system") == 1 and len(roles) > 5
    assert filled.prompt[-1]["content"] == "Last question?"


@pytest.mark.slow
def test_bench_measures_growth_with_max_length(tmp_path, tiny_model):
    report = bench(BenchConfig.from_values({
        "model": str(tiny_model(0)), "steps": 1, "batch_size": 2, "max_length": "128,256", "fill": True,
        "frameworks": "smolalign", "output_dir": str(tmp_path / "bench"), "device": "cpu"}))
    assert [(row["max_length"], row["batch_size"]) for row in report["rows"]] == [(128, 2), (256, 2)]
    short, long = report["rows"]
    assert long["peak_bytes"] > 0 and short["seconds_per_step"] > 0
    assert "Growth with max_length and pairs per step:" in report["markdown"]
    assert "| dpo | 256 | 2 | " in report["markdown"]
    assert (tmp_path / "bench" / "growth.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_run_over_the_memory_limit_is_recorded_as_out_of_memory(tmp_path, tiny_model, pairs_file):
    # Importing torch alone takes more than 0.2 GB.
    with pytest.raises(UserError, match=r"the smolalign run failed: out of memory: stopped when its memory passed "
                                        r"memory_limit_gb \(0.2 GB\)"):
        bench(bench_args(tmp_path, pairs_file, model=str(tiny_model(0)), memory_limit_gb=0.2))


def test_failed_runs_show_in_the_tables_and_leave_the_ratios():
    from smolalign.bench.tables import compare_to_baselines, growth_table

    def run(framework, max_length, seconds, failure=None):
        return BenchResult(framework, "dpo", seconds, [] if failure else [seconds / 2] * 2, tokens=1000,
                           peak_bytes=0 if failure else int(seconds * 1e8), flops=1e9, kept_freed_memory=True,
                           max_length=max_length, batch_size=4, failure=failure)

    results = [run("smolalign", 256, 10.0), run("trl", 256, 30.0), run("smolalign", 2048, 40.0),
               run("trl", 2048, 0.0, failure="out of memory (over 20 GB)")]
    ratios = compare_to_baselines(results)
    assert [(r["max_length"], round(r["speedup_whole_process"], 6)) for r in ratios] == [(256, 3.0)]
    table = growth_table(results, "peak RSS")
    assert table[-2:] == ["| dpo | 256 | 4 | 5.00 | 15.00 | 1.00 | 3.00 |", "| dpo | 2048 | 4 | 20.00 | failed | 4.00 | failed |"]
