"""The speed features change nothing but speed: chunked forward passes, the precomputed reference and
its cache, token-budget batching, gradient checkpointing, the padded fallback; and `smolalign bench` runs."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys

import pytest
import torch
from conftest import read_jsonl, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import smolalign.core.reference
from smolalign.bench.command import bench
from smolalign.cli import main
from smolalign.config.commands import BenchConfig
from smolalign.config.train import load_config
from smolalign.core.layouts import block_tokens, choose_layout
from smolalign.core.logprobs import PairLogps, SequenceScorer
from smolalign.core.losses import OBJECTIVES, LossSettings
from smolalign.core.reference import model_reference
from smolalign.core.scoring import PairScoring
from smolalign.data.formats import to_pair
from smolalign.data.tokenize import tokenize_pairs
from smolalign.models.loading import base_model_of
from smolalign.training.loop import train
from smolalign.training.plan import StepPlan
from smolalign.training.step import PairRunner


@pytest.fixture(scope="module")
def pairs(hh_rows, tokenizer):
    return tokenize_pairs([to_pair(row, i, "hh_rlhf") for i, row in enumerate(hh_rows[500:506])], tokenizer)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, hh_rows):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", hh_rows[100:116])


def run_once(model, reference_model, pairs, algorithm, max_tokens, pad_token_id):
    objective = OBJECTIVES[algorithm]
    reference = model_reference(reference_model, 16) if objective.needs_reference else None
    runner = PairRunner(SequenceScorer(model, 16), reference, objective, LossSettings(beta=0.3, rpo_alpha=0.1),
                        PairScoring("prefix_shared", pad_token_id, torch.device("cpu"), max_tokens))
    model.zero_grad()
    result = runner.run(pairs, backward=lambda loss: loss.backward())
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("algorithm", ["dpo", "orpo", "simpo"])
def test_chunked_forward_passes_give_the_whole_batch_numbers(tiny_model, tokenizer, pairs, algorithm):
    model = AutoModelForCausalLM.from_pretrained(tiny_model(0))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model(1))
    whole, whole_grads = run_once(model, reference, pairs, algorithm, 10**6, tokenizer.pad_token_id)
    chunked, chunked_grads = run_once(model, reference, pairs, algorithm, 1, tokenizer.pad_token_id)  # 1 pair each
    assert torch.allclose(chunked.output.loss, whole.output.loss, atol=1e-5)
    for name, value in whole.output.metrics.items():
        assert torch.allclose(chunked.output.metrics[name], value, atol=1e-5), name
    for name, grad in whole_grads.items():
        assert torch.allclose(chunked_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_gradient_checkpointing_changes_no_number(tiny_model, tokenizer, pairs):
    model = AutoModelForCausalLM.from_pretrained(tiny_model(0))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model(1))
    plain, plain_grads = run_once(model, reference, pairs, "dpo", 10**6, tokenizer.pad_token_id)
    base_model_of(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    checkpointed, checkpointed_grads = run_once(model, reference, pairs, "dpo", 10**6, tokenizer.pad_token_id)
    assert torch.allclose(checkpointed.output.loss, plain.output.loss, atol=1e-6)
    for name, grad in plain_grads.items():
        assert torch.allclose(checkpointed_grads[name], grad, atol=1e-6), name


def test_attention_without_4d_masks_falls_back_to_padded(tiny_model, caplog):
    model = AutoModelForCausalLM.from_pretrained(tiny_model(0))
    assert choose_layout("auto", model) == "prefix_shared"
    model.config._attn_implementation = "flash_attention_2"
    with caplog.at_level(logging.WARNING, logger="smolalign"):
        assert choose_layout("auto", model) == "padded"
        assert choose_layout("packed", model) == "padded"
    assert "flash_attention_2" in caplog.text and "padded" in caplog.text


def test_precomputed_reference_matches_a_frozen_copy_and_is_cached(tmp_path, tiny_model, pairs_file, monkeypatch):
    settings = {"model": str(tiny_model(0)), "dataset": str(pairs_file), "max_steps": 3,
                "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "test_split_size": 4}
    monkeypatch.setenv("SMOLALIGN_REFERENCE_CACHE", str(tmp_path / "cache"))

    def run(name, **extra):
        final = train(load_config(None, {**settings, **extra, "output_dir": str(tmp_path / name)}))
        return load_file(final / "model.safetensors"), read_jsonl(tmp_path / name / "metrics.jsonl")

    inline_weights, inline_metrics = run("inline", precompute_ref_log_probs=False)
    precomputed_weights, precomputed_metrics = run("precomputed")  # the default for full fine-tuning
    assert all(torch.allclose(inline_weights[k], precomputed_weights[k], atol=1e-6) for k in inline_weights)
    for ours, theirs in zip(precomputed_metrics, inline_metrics, strict=True):
        for key in ("loss", "rewards/margins", "eval_loss", "eval_rewards/accuracies"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key
    assert list((tmp_path / "cache").glob("*.safetensors"))

    # A later run with the same reference weights and pairs scores nothing again.
    def no_scoring(*args, **kwargs):
        raise AssertionError("the cache should have every pair")

    monkeypatch.setattr(PairScoring, "logps", no_scoring)
    _, again = run("again")
    assert again[0]["loss"] == pytest.approx(precomputed_metrics[0]["loss"], abs=1e-7)


def test_lora_precomputes_the_reference_of_its_base_model(tmp_path, tiny_model, pairs_file, monkeypatch):
    """Under LoRA the reference (adapters disabled) is precomputed by default: the same numbers as the
    adapters-off pass in every step, and a second run, or `smolalign eval`, scores no reference again."""
    settings = {"model": str(tiny_model(0)), "dataset": str(pairs_file), "max_steps": 3, "learning_rate": 1e-3,
                "per_device_train_batch_size": 4, "logging_steps": 1, "test_split_size": 4,
                "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}}
    monkeypatch.setenv("SMOLALIGN_REFERENCE_CACHE", str(tmp_path / "cache"))

    def run(name, **extra):
        final = train(load_config(None, {**settings, **extra, "output_dir": str(tmp_path / name)}))
        return load_file(final / "adapter_model.safetensors"), read_jsonl(tmp_path / name / "metrics.jsonl")

    per_step_weights, per_step_metrics = run("per-step", precompute_ref_log_probs=False)
    assert not (tmp_path / "cache").exists()
    precomputed_weights, precomputed_metrics = run("precomputed")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    assert all(torch.allclose(per_step_weights[k], precomputed_weights[k], atol=1e-6) for k in per_step_weights)
    for ours, theirs in zip(precomputed_metrics, per_step_metrics, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "eval_loss", "eval_rewards/accuracies"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key

    calls = []
    original = PairScoring.logps
    monkeypatch.setattr(PairScoring, "logps",
                        lambda self, *a, **k: calls.append(k.get("desc")) or original(self, *a, **k))
    main(["eval", "--model", str(tmp_path / "precomputed" / "final"), "--dataset", str(pairs_file),
          "--max_pairs", "4", "--max_length", "1024"])
    assert calls == ["scoring policy"]  # the base model's log-probs came from the training cache


def test_reference_cache_is_kept_apart_per_precision_and_merges_concurrent_writers(tmp_path, tiny_model, pairs,
                                                                                   monkeypatch):
    """A cache filled under bf16 autocast is never served to a float32 run (its numbers differ), two
    writers of one cache file keep each other's pairs, and values shipped with the package are found."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model(0))
    scored: list[int] = []

    def score(missing):  # stands for the reference pass: the numbers matter less than who gets scored
        scored.append(len(missing))
        values, zeros = torch.arange(len(missing), dtype=torch.float32), torch.zeros(len(missing))
        return PairLogps(values, -values, zeros, zeros, zeros, zeros)

    fp32 = smolalign.core.reference.ReferenceCache(model, tmp_path)
    fp32.fill(pairs, score)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = smolalign.core.reference.ReferenceCache(model, tmp_path)
        bf16.fill(pairs, score)
    assert fp32.path != bf16.path and fp32.path.name.endswith("-no-autocast.safetensors")
    assert bf16.path.name.endswith("-autocast-bfloat16.safetensors")
    assert scored == [len(pairs), len(pairs)]  # the bf16 run scored every pair itself
    smolalign.core.reference.ReferenceCache(model, tmp_path).fill(pairs, score)
    assert scored == [len(pairs), len(pairs)]  # a float32 run again: all from the cache

    # Two runs that started with an empty cache, each scoring its own pairs, save one after the other.
    fresh = tmp_path / "shared"
    first, second = (smolalign.core.reference.ReferenceCache(model, fresh) for _ in range(2))
    first_values = {smolalign.core.reference.pair_key(p): (1.0, 2.0) for p in pairs[:3]}
    second_values = {smolalign.core.reference.pair_key(p): (3.0, 4.0) for p in pairs[3:]}
    first.save(first_values)
    second.save(second_values)
    assert first.load() == {**first_values, **second_values}
    assert [p.name for p in fresh.iterdir() if p.suffix == ".partial"] == []

    # Values shipped with the package serve a machine whose own cache is empty.
    monkeypatch.setattr(smolalign.core.reference, "SHIPPED_CACHE", fresh)
    shipped_only = smolalign.core.reference.ReferenceCache(model, tmp_path / "empty")
    assert shipped_only.fill(pairs, score).of_pairs(pairs).chosen.tolist() == [1.0] * 3 + [3.0] * 3
    assert scored == [len(pairs), len(pairs)]


def test_eval_reuses_the_reference_cache_of_training(tmp_path, tiny_model, pairs_file, monkeypatch):
    monkeypatch.setenv("SMOLALIGN_REFERENCE_CACHE", str(tmp_path / "cache"))
    policy, reference = tiny_model(0), tiny_model(1)
    train(load_config(None, {"model": str(policy), "ref_model": str(reference), "dataset": str(pairs_file),
                             "eval_dataset": str(pairs_file), "max_steps": 1, "precompute_ref_log_probs": True,
                             "output_dir": str(tmp_path / "run")}))
    calls = []
    original = PairScoring.logps
    monkeypatch.setattr(PairScoring, "logps",
                        lambda self, *a, **k: calls.append(k.get("desc")) or original(self, *a, **k))
    main(["eval", "--model", str(policy), "--ref_model", str(reference), "--dataset", str(pairs_file),
          "--output_dir", str(tmp_path / "eval")])
    assert calls == ["scoring policy"]  # the reference came from the cache the training run filled
    rows = read_jsonl(tmp_path / "eval" / "eval_pairs.jsonl")
    assert all("ref_logps_chosen" in row for row in rows)


def test_token_budget_batching(pairs):
    tokens = tuple(block_tokens(p) for p in pairs) * 4  # 24 pairs of varied length
    budget = max(tokens) + min(tokens)
    plan = StepPlan(num_pairs=len(tokens), batch_size=5, accumulation=2, num_train_epochs=2.0, max_steps=-1, seed=3,
                    pair_tokens=tokens, max_tokens=budget)
    for epoch in (0, 1):
        batches = plan.epoch_micro_batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(tokens)))  # each pair once per epoch
        assert all(len(b) <= 5 for b in batches)
        assert all(sum(tokens[i] for i in b) <= budget or len(b) == 1 for b in batches)
    assert plan.total_steps == plan.steps_in_epoch(0) + plan.steps_in_epoch(1)
    seen = [i for step in range(plan.total_steps) for b in plan.micro_batches(step) for i in b]
    assert sorted(seen) == sorted(list(range(len(tokens))) * 2)
    again = StepPlan(num_pairs=len(tokens), batch_size=5, accumulation=2, num_train_epochs=2.0, max_steps=-1, seed=3,
                     pair_tokens=tokens, max_tokens=budget)
    assert [again.micro_batches(s) for s in range(plan.total_steps)] == [
        plan.micro_batches(s) for s in range(plan.total_steps)
    ]  # a pure function of (seed, step): a resumed run sees the same pairs
    assert plan.epoch_at(plan.total_steps) == 2.0


@pytest.mark.parametrize("max_tokens", [None, 600])
def test_a_long_run_draws_each_epoch_once(monkeypatch, max_tokens):
    plan = StepPlan(num_pairs=50, batch_size=4, accumulation=1, num_train_epochs=10.0, max_steps=-1, seed=0,
                    pair_tokens=tuple(100 + 37 * i % 300 for i in range(50)), max_tokens=max_tokens)
    total_steps = plan.total_steps  # counts each epoch's steps once
    draws = []
    draw = plan._draw_micro_batches
    monkeypatch.setattr(plan, "_draw_micro_batches", lambda epoch: draws.append(epoch) or draw(epoch))
    seen = [i for step in range(total_steps) for b in plan.micro_batches(step) for i in b]
    assert sorted(seen) == sorted(list(range(50)) * 10)
    assert draws == list(range(10))  # walking the steps never redraws an earlier epoch's order


@pytest.mark.parametrize("max_tokens", [None, 150])
def test_every_process_gets_pairs_even_from_a_short_micro_batch(max_tokens):
    plan = StepPlan(num_pairs=7, batch_size=4, accumulation=1, num_train_epochs=1.0, max_steps=-1, seed=0,
                    pair_tokens=(100,) * 7, max_tokens=max_tokens)
    for step in range(plan.total_steps):
        whole = plan.micro_batches(step)[0]
        shares = [plan.micro_batches(step, process_index=p, num_processes=3)[0] for p in range(3)]
        assert len({len(share) for share in shares}) == 1 and shares[0]  # same count, never empty
        assert set(whole) == {i for share in shares for i in share}  # repeats only pairs of this micro-batch


def test_training_with_a_token_budget(tmp_path, tiny_model, pairs_file):
    final = train(load_config(None, {"model": str(tiny_model(0)), "dataset": str(pairs_file), "max_steps": 2,
                                     "max_tokens_per_batch": 300, "per_device_train_batch_size": 8,
                                     "output_dir": str(tmp_path / "run")}))
    assert final.exists()


@pytest.mark.parametrize("trl_keeps", [False, True], ids=["trl-default-malloc", "trl-keeps-freed-memory"])
def test_bench_runs_both_frameworks_and_reports_ratios(tmp_path, tiny_model, pairs_file, trl_keeps):
    args = BenchConfig.from_values(dict(
        algorithm="dpo", model=str(tiny_model(0)), dataset=str(pairs_file), steps=1, batch_size=2, max_length=256,
        frameworks="smolalign,trl", repeats=1, output_dir=str(tmp_path / "bench"), trl_keep_freed_memory=trl_keeps))
    report = bench(args)
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert [row["framework"] for row in saved["rows"]] == ["smolalign", "trl"]
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert [row["kept_freed_memory"] for row in saved["rows"]] == [True, trl_keeps]
        assert ("TRL also keeps freed memory" in saved["markdown"]) == trl_keeps
    for row in saved["rows"]:
        assert row["process_seconds"] > 0 and row["peak_bytes"] > 100e6 and 0 < row["mfu"] < 1
        assert len(row["step_seconds"]) == 1
    ratio = saved["ratios"][0]
    assert ratio["speedup_whole_process"] > 0 and ratio["memory_ratio"] > 0
    markdown = (tmp_path / "bench" / "bench.md").read_text()
    assert "smolalign / TRL" in markdown and report["markdown"] == markdown


def test_bench_repeats_each_pay_for_their_own_reference(tmp_path, tiny_model, pairs_file, monkeypatch):
    import smolalign.bench.command

    caches = []
    run_framework = smolalign.bench.command.run_framework

    def recording(spec, run_dir):
        result = run_framework(spec, run_dir)
        caches.append(sorted(p.name for p in (run_dir / "reference-cache").glob("*.safetensors")))
        return result

    monkeypatch.setattr(smolalign.bench.command, "run_framework", recording)
    args = BenchConfig.from_values(dict(
        algorithm="dpo", model=str(tiny_model(0)), dataset=str(pairs_file), steps=1, batch_size=2, max_length=256,
        frameworks="smolalign", repeats=2, output_dir=str(tmp_path / "bench"), trl_keep_freed_memory=False))
    bench(args)
    assert len(caches) == 2 and all(len(files) == 1 for files in caches)  # each run computed and cached its own


def test_bench_counts_the_same_useful_flops_for_both_frameworks(tiny_model, pairs):
    from transformers import AutoConfig

    from smolalign.bench.command import forward_flops, training_flops

    config = AutoConfig.from_pretrained(tiny_model(0))
    reference = sum(forward_flops(config, p, shared_prompt=True, scored_prompt=False) for p in pairs)
    ours, theirs = (training_flops(config, pairs, algorithm="dpo", framework=f) for f in ("smolalign", "trl"))
    assert theirs - ours == pytest.approx(reference)  # TRL's steps also run the reference forward
    assert training_flops(config, pairs, algorithm="orpo", framework="trl") == training_flops(
        config, pairs, algorithm="orpo", framework="smolalign")


def test_eval_of_a_full_fine_tuning_run_uses_its_starting_model_as_reference(tmp_path, tiny_model, pairs_file,
                                                                             monkeypatch):
    monkeypatch.setenv("SMOLALIGN_REFERENCE_CACHE", str(tmp_path / "cache"))
    final = train(load_config(None, {"model": str(tiny_model(0)), "dataset": str(pairs_file), "max_steps": 1,
                                     "per_device_train_batch_size": 16, "output_dir": str(tmp_path / "run")}))
    calls = []
    original = PairScoring.logps
    monkeypatch.setattr(PairScoring, "logps",
                        lambda self, *a, **k: calls.append(k.get("desc")) or original(self, *a, **k))
    main(["eval", "--model", str(final), "--dataset", str(pairs_file), "--max_pairs", "4"])
    assert calls == ["scoring policy"]  # the reference log-probs were precomputed by training and cached
    summary = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert "kl/chosen_per_token" in summary and summary["reward"].startswith("beta * (logps - ref_logps)")
    rows = read_jsonl(tmp_path / "run" / "eval" / "eval_pairs.jsonl")
    assert len(rows) == 4 and all("ref_logps_chosen" in row for row in rows)


HEAP_OF_A_FREED_BLOCK = """
import ctypes, sys, torch
from smolalign.models.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):  # glibc's malloc statistics (malloc.h), all size_t
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
assert sys.argv[1] == "default" or keep_freed_memory()
block = torch.ones(16 * 2**20)  # 64 MB: above glibc's largest default mmap threshold (32 MB)
mapped_while_alive = libc.mallinfo2().hblkhd
del block
print(mapped_while_alive, libc.mallinfo2().fordblks)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"
                    or tuple(map(int, platform.libc_ver()[1].split("."))) < (2, 33), reason="glibc 2.33's mallinfo2")
def test_freed_tensor_memory_stays_in_the_heap_for_reuse():
    """glibc's own accounting, not page-fault counts (those depend on the kernel): by default a 64 MB tensor
    is a separate mapping, unmapped when freed, so the next one faults its pages in again; with the setting
    it comes from the heap and stays there, free for the next chunk."""

    def heap_after(mode: str) -> tuple[int, int]:
        done = subprocess.run([sys.executable, "-c", HEAP_OF_A_FREED_BLOCK, mode], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        mapped, free_in_heap = map(int, done.stdout.split())
        return mapped, free_in_heap

    block = 16 * 2**20 * 4
    mapped, free_in_heap = heap_after("default")
    assert mapped >= block and free_in_heap < block  # its own mapping, given back to the kernel when freed
    mapped, free_in_heap = heap_after("keep")
    assert mapped < block and free_in_heap >= block  # from the heap, and kept there once freed
