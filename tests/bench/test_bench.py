"""`smolalign bench` runs: both frameworks side by side with their ratios, a reference paid for by each
repeat, and the same useful FLOPs counted for both frameworks."""

from __future__ import annotations

import json
import platform

import pytest

from smolalign.bench.command import bench
from smolalign.config.commands import BenchConfig
from smolalign.core.reference import IGNORE_SHIPPED

pytestmark = pytest.mark.slow  # times TRL against smolalign in subprocesses


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

    def recording(spec, run_dir, memory_limit_gb=None):
        result = run_framework(spec, run_dir, memory_limit_gb)
        caches.append(sorted(p.name for p in (run_dir / "reference-cache").glob("*.safetensors")))
        return result

    monkeypatch.setattr(smolalign.bench.command, "run_framework", recording)
    args = BenchConfig.from_values(dict(
        algorithm="dpo", model=str(tiny_model(0)), dataset=str(pairs_file), steps=1, batch_size=2, max_length=256,
        frameworks="smolalign", repeats=2, output_dir=str(tmp_path / "bench"), trl_keep_freed_memory=False))
    bench(args)
    assert len(caches) == 2 and all(len(files) == 1 for files in caches)  # each run computed and cached its own
    environment = smolalign.bench.command.worker_environment(tmp_path / "run")
    assert environment[IGNORE_SHIPPED] == "1"  # nor does a run read the reference values shipped with smolalign
    assert environment["SMOLALIGN_REFERENCE_CACHE"] == str(tmp_path / "run" / "reference-cache")


def test_bench_counts_the_same_useful_flops_for_both_frameworks(tiny_model, tokenized_pairs):
    from transformers import AutoConfig

    from smolalign.bench.flops import forward_flops, training_flops

    config = AutoConfig.from_pretrained(tiny_model(0))
    reference = sum(forward_flops(config, p, shared_prompt=True, scored_prompt=False) for p in tokenized_pairs)
    ours, theirs = (training_flops(config, tokenized_pairs, algorithm="dpo", framework=f) for f in ("smolalign", "trl"))
    assert theirs - ours == pytest.approx(reference)  # TRL's steps also run the reference forward
    assert training_flops(config, tokenized_pairs, algorithm="orpo", framework="trl") == training_flops(
        config, tokenized_pairs, algorithm="orpo", framework="smolalign")
