"""`smolalign bench` options for GPU runs, checked on the CPU: random-weight models from bundled
architectures, LoRA for every framework, warm-up steps left out of the timings, and TRL + Liger."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from smolalign.bench.command import (
    BenchResult,
    bench,
    forward_flops,
    model_config_file,
    training_flops,
)
from smolalign.config.commands import BenchConfig
from smolalign.data.formats import to_pair
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
    pairs = tokenize_pairs([to_pair(row, i, "hh_rlhf") for i, row in enumerate(hh_rows[500:504])], tokenizer)
    forward = sum(forward_flops(config, p, shared_prompt=True, scored_prompt=False) for p in pairs)
    assert training_flops(config, pairs, algorithm="dpo", framework="smolalign") == pytest.approx(3 * forward)
    assert training_flops(config, pairs, algorithm="dpo", framework="smolalign", lora=True) == pytest.approx(
        2 * forward)  # forward + input gradients; the reference was precomputed
    for framework in ("trl", "trl_liger"):  # TRL runs the reference forward in every step
        flops = training_flops(config, pairs, algorithm="dpo", framework=framework, lora=True)
        assert flops == pytest.approx(3 * forward)
