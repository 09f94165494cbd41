"""Data as people have it: compressed and binary files, folders, ShareGPT and content parts, column aliases and
explicit mappings, unpaired labelled rows, dataset mixtures."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma

import datasets
import pandas as pd
import pytest
from conftest import write_jsonl

from smolalign.config.commands import InspectConfig
from smolalign.config.fields import parse_override_args
from smolalign.config.train import DatasetSource, load_config
from smolalign.data.inspect import inspect_dataset
from smolalign.data.prepare import prepare_data, read_pairs
from smolalign.data.sources import load_mixture, load_rows
from smolalign.errors import UserError

ROWS = [{"prompt": f"Question {i}?", "chosen": f" Good {i}.", "rejected": f" Bad {i}."} for i in range(6)]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def jsonl_text(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.mark.parametrize(("suffix", "compress"), [(".jsonl.gz", gzip.compress), (".jsonl.bz2", bz2.compress),
                                                  (".jsonl.xz", lzma.compress), (".json.gz", None),
                                                  (".csv.gz", None)])
def test_compressed_files(tmp_path, suffix, compress):
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".json.gz":
        path.write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    elif suffix == ".csv.gz":
        path.write_bytes(gzip.compress(pd.DataFrame(ROWS).to_csv(index=False).encode()))
    else:
        path.write_bytes(compress(jsonl_text(ROWS)))
    read = read_pairs(str(path))
    assert read.data_format.name == "prompt_completion_strings" and len(read.pairs) == 6


def test_arrow_file_and_saved_dataset(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    assert len(read_pairs(str(saved)).pairs) == 6
    arrow = next(saved.glob("*.arrow"))
    assert len(read_pairs(str(arrow)).pairs) == 6


def test_folder_of_hub_style_split_files(tmp_path):
    (tmp_path / "data").mkdir()
    pd.DataFrame(ROWS[:4]).to_parquet(tmp_path / "data" / "train-00000-of-00001.parquet")
    pd.DataFrame(ROWS[4:]).to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    assert len(load_rows(str(tmp_path), split="train")) == 4
    assert len(load_rows(str(tmp_path), split="test")) == 2
    with pytest.raises(UserError, match="has no split 'validation'.*it has train, test"):
        load_rows(str(tmp_path), split="validation")


def test_compressed_binary_is_refused(tmp_path):
    path = tmp_path / "pairs.parquet.gz"
    path.write_bytes(b"x")
    with pytest.raises(UserError, match=r"smolalign reads JSON, JSONL, CSV \(also .gz, .bz2, .xz compressed\)"):
        read_pairs(str(path))


def test_sharegpt_pairs_and_roles(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"}],
             "chosen": {"from": "gpt", "value": "Hello."}, "rejected": {"from": "gpt", "value": "Go away."}},
            {"conversations": [{"from": "human", "value": "Call a tool"}],
             "chosen": {"from": "function_call", "value": "{}"}, "rejected": {"from": "gpt", "value": "No."}}]
    read = read_pairs(str(write_jsonl(tmp_path / "sharegpt.jsonl", rows)))
    assert read.pairs[0].prompt == [{"role": "system", "content": "Be brief."}, user("Hi?")]
    assert (read.pairs[0].chosen, read.pairs[0].rejected) == ([assistant("Hello.")], [assistant("Go away.")])
    assert [str(p) for p in read.problems] == [
        "row 1: 'chosen' has a 'function_call' turn; smolalign trains on user, assistant and system turns only (no "
        "tool calls)"]


def test_content_parts(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "?"}]}],
             "chosen": [assistant("a")], "rejected": [assistant("b")]},
            {"prompt": [{"role": "user", "content": [{"type": "image", "image": "x.png"}]}],
             "chosen": [assistant("a")], "rejected": [assistant("b")]}]
    read = read_pairs(str(write_jsonl(tmp_path / "parts.jsonl", rows)))
    assert read.pairs[0].prompt == [user("Hi ?")]
    assert read.problems[0].reason == "'prompt' holds a 'image' part; smolalign trains on text only"


def test_instruction_datasets_are_chat_data(tmp_path):
    alpaca = [{"instruction": "Translate.", "input": "Bonjour", "chosen": "Hello", "rejected": "Bye"},
              {"instruction": "Say hi.", "input": "", "chosen": "Hi", "rejected": "No"}]
    read = read_pairs(str(write_jsonl(tmp_path / "alpaca.jsonl", alpaca)))
    assert read.data_format.name == "conversational_explicit_prompt"
    assert read.data_format.columns.renamed() == {"prompt": "instruction"}
    assert read.pairs[0].prompt == [user("Translate.\nBonjour")] and read.pairs[1].prompt == [user("Say hi.")]
    assert read.pairs[0].chosen == [assistant("Hello")]
    orca = [{"system": "You are helpful.", "question": "2+2?", "chosen_response": "4", "rejected_response": "5"}]
    pair = read_pairs(str(write_jsonl(tmp_path / "orca.jsonl", orca))).pairs[0]
    assert pair.prompt == [{"role": "system", "content": "You are helpful."}, user("2+2?")]
    assert (pair.chosen, pair.rejected) == ([assistant("4")], [assistant("5")])


def test_explicit_column_mapping(tmp_path):
    rows = [{"q": "2+2?", "good": "4", "bad": "5"}]
    path = str(write_jsonl(tmp_path / "odd.jsonl", rows))
    with pytest.raises(UserError, match="dataset_columns"):
        read_pairs(path)
    mapping = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    assert read_pairs(path, columns=mapping).pairs[0].chosen == [assistant("4")]  # a renamed prompt is chat data
    with pytest.raises(UserError, match="maps chosen to 'best', but dataset '.*' has no such column; its columns "
                                        "are q, good, bad"):
        read_pairs(path, columns={**mapping, "chosen": "best"})
    with pytest.raises(UserError, match="maps the role 'promt' \\(did you mean 'prompt'\\?\\)"):
        read_pairs(path, columns={"promt": "q"})
    report = inspect_dataset(InspectConfig.from_values({"dataset": path, "dataset_columns": mapping}))
    assert "columns:  prompt <- q, chosen <- good, rejected <- bad" in report
    config = load_config(None, parse_override_args(["--dataset", path, "--dataset_columns",
                                                    "{prompt: q, chosen: good, rejected: bad}"]))
    assert config.dataset_columns == mapping


def test_unpaired_labels(tmp_path):
    rows = [{"prompt": "Q", "completion": "A", "label": True}, {"prompt": "Q", "completion": "B", "label": 0},
            {"prompt": "Q", "completion": "C", "label": "False"}, {"prompt": "Q", "completion": "D", "label": "maybe"}]
    read = read_pairs(str(write_jsonl(tmp_path / "kto.jsonl", [{**r, "label": str(r["label"])} for r in rows])))
    assert [p.label for p in read.pairs] == [True, False, False]
    assert read.problems[0].reason == "'label' must be true or false (or 1 / 0), not 'maybe'"


def test_sft_prompt_completion_rows(tmp_path):
    rows = [{"instruction": "Say hi.", "output": "Hi!"}, {"instruction": "Count.", "input": "to 2", "output": "1 2"}]
    read = read_pairs(str(write_jsonl(tmp_path / "alpaca_sft.jsonl", rows)))
    assert read.data_format.kind == "sft" and read.pairs[1].prompt == [user("Count.\nto 2")]


def test_mixtures_select_columns_and_subsample(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{**r, "extra": 1} for r in ROWS])
    second = write_jsonl(tmp_path / "b.jsonl", ROWS[:4])
    handbook = [DatasetSource(path=str(first), columns=["prompt", "chosen", "rejected"], weight=0.5),
                DatasetSource(path=str(second))]
    (name_a, rows_a), (_, rows_b) = load_mixture(handbook, seed=0)
    assert rows_a.column_names == ["prompt", "chosen", "rejected"] and len(rows_a) == 3 and len(rows_b) == 4
    assert name_a == str(first)
    trl = [DatasetSource(path=str(first), fraction=0.5), DatasetSource(path=str(second), fraction=0.5)]
    assert [len(rows) for _, rows in load_mixture(trl, seed=0)] == [4, 4]  # no dataset repeats a row
    with pytest.raises(UserError, match="'fraction' must be set for every dataset of the mixture or for none"):
        load_mixture([trl[0], DatasetSource(path=str(second))], seed=0)
    with pytest.raises(UserError, match="has no column 'answer' to select"):
        load_mixture([DatasetSource(path=str(first), columns=["answer"])], seed=0)


def test_mixture_trains_on_every_dataset(tmp_path, tokenizer):
    first = write_jsonl(tmp_path / "a.jsonl", ROWS)
    second = write_jsonl(tmp_path / "b.jsonl", [{"chosen": "Q? Yes", "rejected": "Q? No"}] * 2)
    config = load_config(None, {"dataset_mixture": [{"path": str(first)}, {"path": str(second)}], "max_length": 64})
    data = prepare_data(config, tokenizer, use="pairs")
    assert len(data.train) == 8 and len({p.index for p in data.train}) == 8  # row numbers stay unique
    with pytest.raises(UserError, match="set either 'dataset' or 'dataset_mixture', not both"):
        load_config(None, {"dataset": str(first), "dataset_mixture": [{"path": str(second)}]})


def test_real_files_are_not_mistaken_for_saved_datasets(tmp_path):
    (tmp_path / "dataset_info.json").write_text("{}")  # LLaMA-Factory's data folder holds one
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    assert len(load_rows(str(tmp_path))) == 6
