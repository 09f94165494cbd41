"""The reference's log-probs, precomputed once and cached: the numbers of a frozen copy (or of the LoRA base),
a cache kept apart per precision and shared by concurrent writers, and reused by `smolalign eval`."""

from __future__ import annotations

import pytest
import torch
from conftest import read_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import smolalign.core.reference
from smolalign.cli import main
from smolalign.config.train import load_config
from smolalign.core.logprobs import PairLogps
from smolalign.core.scoring import PairScoring
from smolalign.training.loop import run_training


def test_precomputed_reference_matches_a_frozen_copy_and_is_cached(tmp_path, tiny_model, pairs_file, monkeypatch):
    settings = {"model": str(tiny_model(0)), "dataset": str(pairs_file), "max_steps": 3,
                "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "test_split_size": 4}
    monkeypatch.setenv("SMOLALIGN_REFERENCE_CACHE", str(tmp_path / "cache"))

    def run(name, **extra):
        final = run_training(load_config(None, {**settings, **extra, "output_dir": str(tmp_path / name)}))
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


def test_lora_precomputes_the_reference_of_its_base_model(tmp_path, tiny_model, pairs_file, monkeypatch,
                                                            reference_cache_saves):
    """Under LoRA the reference (adapters disabled) is precomputed by default: the same numbers as the
    adapters-off pass in every step, and a second run, or `smolalign eval`, scores no reference again."""
    settings = {"model": str(tiny_model(0)), "dataset": str(pairs_file), "max_steps": 3, "learning_rate": 1e-3,
                "per_device_train_batch_size": 4, "logging_steps": 1, "test_split_size": 4,
                "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}}
    monkeypatch.setenv("SMOLALIGN_REFERENCE_CACHE", str(tmp_path / "cache"))

    def run(name, **extra):
        final = run_training(load_config(None, {**settings, **extra, "output_dir": str(tmp_path / name)}))
        return load_file(final / "adapter_model.safetensors"), read_jsonl(tmp_path / name / "metrics.jsonl")

    per_step_weights, per_step_metrics = run("per-step", precompute_ref_log_probs=False)
    assert not (tmp_path / "cache").exists()
    precomputed_weights, precomputed_metrics = run("precomputed")
    # One cache file, the base model's own: full fine-tuning, LoRA runs and the shipped values share it.
    base_cache = smolalign.core.reference.ReferenceCache(AutoModelForCausalLM.from_pretrained(tiny_model(0)))
    assert [p.name for p in (tmp_path / "cache").glob("*.safetensors")] == [base_cache.path.name]
    assert all(torch.allclose(per_step_weights[k], precomputed_weights[k], atol=1e-6) for k in per_step_weights)
    for ours, theirs in zip(precomputed_metrics, per_step_metrics, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "eval_loss", "eval_rewards/accuracies"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key

    reference_cache_saves.clear()
    main(["eval", "--model", str(tmp_path / "precomputed" / "final"), "--dataset", str(pairs_file),
          "--max_pairs", "4", "--max_length", "1024"])
    assert reference_cache_saves == []  # the base model's log-probs came from the training cache


def test_reference_cache_is_kept_apart_per_precision_and_merges_concurrent_writers(tmp_path, tiny_model, tokenized_pairs,
                                                                                   monkeypatch):
    """A cache filled under bf16 autocast is never served to a float32 run (its numbers differ), two
    writers of one cache file keep each other's tokenized_pairs, and values shipped with the package are found."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model(0))
    scored: list[int] = []

    def score(chunks):  # stands for the reference pass: the numbers matter less than who gets scored
        missing = [pair for chunk in chunks for pair in chunk]
        scored.append(len(missing))
        values, zeros = torch.arange(len(missing), dtype=torch.float32), torch.zeros(len(missing))
        return PairLogps(values, -values, zeros, zeros, zeros, zeros)

    fp32 = smolalign.core.reference.ReferenceCache(model, tmp_path)
    fp32.fill([tokenized_pairs], score)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = smolalign.core.reference.ReferenceCache(model, tmp_path)
        bf16.fill([tokenized_pairs], score)
    assert fp32.path != bf16.path and fp32.path.name.endswith("-no-autocast.safetensors")
    assert bf16.path.name.endswith("-autocast-bfloat16.safetensors")
    assert scored == [len(tokenized_pairs), len(tokenized_pairs)]  # the bf16 run scored every pair itself
    smolalign.core.reference.ReferenceCache(model, tmp_path).fill([tokenized_pairs], score)
    assert scored == [len(tokenized_pairs), len(tokenized_pairs)]  # a float32 run again: all from the cache

    # Two runs that started with an empty cache, each scoring its own tokenized_pairs, save one after the other.
    fresh = tmp_path / "shared"
    first, second = (smolalign.core.reference.ReferenceCache(model, fresh) for _ in range(2))
    first_values = {smolalign.core.reference.pair_key(p): (1.0, 2.0, 0.5, 1.5) for p in tokenized_pairs[:3]}
    second_values = {smolalign.core.reference.pair_key(p): (3.0, 4.0, 2.5, 3.5) for p in tokenized_pairs[3:]}
    first.save(first_values)
    second.save(second_values)
    assert first.load() == {**first_values, **second_values}
    assert [p.name for p in fresh.iterdir() if p.suffix == ".partial"] == []

    # Values shipped with the package serve a machine whose own cache is empty.
    monkeypatch.setattr(smolalign.core.reference, "SHIPPED_CACHE", fresh)
    shipped_only = smolalign.core.reference.ReferenceCache(model, tmp_path / "empty")
    assert shipped_only.fill([tokenized_pairs], score).of_pairs(tokenized_pairs).chosen.tolist() == [1.0] * 3 + [3.0] * 3
    assert scored == [len(tokenized_pairs), len(tokenized_pairs)]
    # ... unless they are to be ignored, as in the benchmark's runs.
    monkeypatch.setenv(smolalign.core.reference.IGNORE_SHIPPED, "1")
    smolalign.core.reference.ReferenceCache(model, tmp_path / "empty-again").fill([tokenized_pairs], score)
    assert scored == [len(tokenized_pairs)] * 3


def test_eval_reuses_the_reference_cache_of_training(tmp_path, tiny_model, pairs_file, monkeypatch,
                                                     reference_cache_saves):
    monkeypatch.setenv("SMOLALIGN_REFERENCE_CACHE", str(tmp_path / "cache"))
    policy, reference = tiny_model(0), tiny_model(1)
    run_training(load_config(None, {"model": str(policy), "ref_model": str(reference), "dataset": str(pairs_file),
                             "eval_dataset": str(pairs_file), "max_steps": 1, "precompute_ref_log_probs": True,
                             "output_dir": str(tmp_path / "run")}))
    reference_cache_saves.clear()
    main(["eval", "--model", str(policy), "--ref_model", str(reference), "--dataset", str(pairs_file),
          "--output_dir", str(tmp_path / "eval")])
    assert reference_cache_saves == []  # the reference came from the cache the training run filled
    rows = read_jsonl(tmp_path / "eval" / "eval_pairs.jsonl")
    assert all("ref_logps_chosen" in row for row in rows)
