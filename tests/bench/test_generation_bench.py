"""`smolalign bench --generation`: transformers' one-prompt loop and smolalign's generation answer the same
prompts with the same greedy answers, timed side by side (its flags are checked in test_quality.py, with
those of the other benches)."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from smolalign.bench.generation import TRANSFORMERS_LOOP, generation_bench
from smolalign.config.commands import GenerationBenchConfig
from smolalign.errors import UserError


def bench_config(tmp_path, model, dataset, **settings) -> GenerationBenchConfig:
    return GenerationBenchConfig.from_values({"model": str(model), "dataset": str(dataset), "prompts": 5,
                                              "max_new_tokens": 6, "generation_batch_size": 2, "device": "cpu",
                                              "output_dir": str(tmp_path / "generation"), **settings})


def test_every_way_of_generating_gives_the_loops_answers(tmp_path, tiny_model, hh_rows):
    dataset = write_jsonl(tmp_path / "test.jsonl", hh_rows[200:207])
    timings = generation_bench(bench_config(tmp_path, tiny_model(0), dataset))

    assert [t.method for t in timings] == [TRANSFORMERS_LOOP, "smolalign, one prompt at a time",
                                           "smolalign, batches of 2"]
    assert all(t.same_as_loop == 5 for t in timings)
    assert len({t.new_tokens for t in timings}) == 1 and timings[0].new_tokens > 5
    assert all(t.seconds > 0 for t in timings)

    written = json.loads((tmp_path / "generation" / "generation.json").read_text())
    assert [t["new_tokens"] for t in written["timings"]] == [t.new_tokens for t in timings]
    table = (tmp_path / "generation" / "generation.md").read_text()
    assert "Greedy answers to 5 prompts, at most 6 new tokens each" in table
    assert f"| {TRANSFORMERS_LOOP} | {timings[0].new_tokens} |" in table and "| 1.00x | 5/5 |" in table


def test_too_few_prompts_are_refused(tmp_path, tiny_model, hh_rows):
    dataset = write_jsonl(tmp_path / "test.jsonl", hh_rows[200:203])
    with pytest.raises(UserError, match="3 usable prompts, fewer than 'prompts' \\(5\\)"):
        generation_bench(bench_config(tmp_path, tiny_model(0), dataset))
