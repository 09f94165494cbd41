"""Data files as they are published (tests/real_files, with their licences): HH-RLHF as Anthropic ships it,
TRL's documented formats, LLaMA-Factory's ShareGPT and KTO demo data. Each is inspected, then trained on
for a step, or refused in one sentence that says what its rows are and what to use instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from smolalign.cli import main
from smolalign.config.commands import InspectConfig
from smolalign.data.inspect import inspect_dataset
from smolalign.data.prepare import read_pairs

REAL = Path(__file__).resolve().parents[1] / "real_files"
FILES = {
    "hh-rlhf/harmless-base-test.jsonl.gz": ("HH-RLHF transcripts", "pairs: 40"),
    "llama-factory/data/dpo_en_demo.json": ("conversational messages with an explicit prompt", "pairs: 12"),
    "llama-factory/data/v1_dpo_demo.jsonl": ("conversational messages, prompt implicit", "pairs: 8"),
    "llama-factory/data/kto_en_demo.json": ("unpaired conversational", "rows: 12 (7 desirable, 5 undesirable)"),
    "trl/preference_standard.jsonl": ("prompt / chosen / rejected strings", "pairs: 1"),
    "trl/preference_implicit_prompt.jsonl": ("chosen / rejected strings, prompt implicit", "pairs: 1"),
    "trl/preference_conversational.jsonl": ("conversational messages with an explicit prompt", "pairs: 1"),
    "trl/unpaired_preference_standard.jsonl": ("unpaired prompt / completion strings", "rows: 2 (1 desirable"),
    "trl/unpaired_preference_conversational.jsonl": ("unpaired conversational", "rows: 2 (1 desirable"),
}
PAIRED = [name for name, (_, usable) in FILES.items() if "pairs" in usable]
UNPAIRED = [name for name, (_, usable) in FILES.items() if "desirable" in usable]


@pytest.mark.parametrize("name", list(FILES))
def test_inspect_reads_the_published_file(name):
    kind, usable = FILES[name]
    report = inspect_dataset(InspectConfig.from_values({"dataset": str(REAL / name), "max_length": 512}))
    assert f"format:   {kind}" in report, report
    assert f"usable {usable}" in report and "unusable rows: 0" in report, report
    if name in UNPAIRED:
        assert "algorithm kto, or sft (desirable answers only)" in report


def test_sharegpt_pairs_keep_the_conversation_as_prompt():
    pair = read_pairs(str(REAL / "llama-factory/data/dpo_en_demo.json")).pairs[0]
    assert pair.prompt[0]["role"] == "user" and pair.prompt[0]["content"].startswith("Hi! I'd like to create")
    assert pair.chosen[0]["role"] == pair.rejected[0]["role"] == "assistant"


def test_content_parts_are_read_as_text():
    pair = read_pairs(str(REAL / "llama-factory/data/v1_dpo_demo.jsonl")).pairs[0]
    assert [m["role"] for m in pair.prompt] == ["system", "user"]
    assert pair.chosen[0]["content"].startswith("Abdulah Hasanagic is the proud owner")


def train_step(tmp_path: Path, tiny_model, dataset: Path, *extra: str) -> Path:
    run = tmp_path / "run"
    main(["train", "--model", str(tiny_model(0)), "--dataset", str(dataset), "--max_steps", "1",
          "--per_device_train_batch_size", "2", "--max_length", "512", "--output_dir", str(run), *extra])
    return run


@pytest.mark.slow
@pytest.mark.parametrize("name", PAIRED)
def test_published_pairs_train_a_dpo_step(name, tmp_path, tiny_model):
    assert (train_step(tmp_path, tiny_model, REAL / name) / "final").is_dir()


@pytest.mark.parametrize("name", UNPAIRED)
def test_unpaired_rows_are_refused_by_dpo_with_what_they_are(name, tmp_path, tiny_model, capsys):
    with pytest.raises(SystemExit):
        train_step(tmp_path, tiny_model, REAL / name)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds unpaired preferences (one answer per row with a thumbs-up or thumbs-down label)" in message
    assert "dpo needs a chosen and a rejected answer per prompt: use algorithm kto" in message


@pytest.mark.slow
def test_sft_on_labelled_rows_imitates_the_desirable_ones_only(tmp_path, tiny_model, capsys):
    run = train_step(tmp_path, tiny_model, REAL / "llama-factory/data/kto_en_demo.json", "--algorithm", "sft")
    assert (run / "final").is_dir()
    assert "SFT imitates the 7 desirable answers and leaves out the 5 undesirable ones" in capsys.readouterr().err
