"""Data stage: format detection, row problems, TRL DPOTrainer's tokenization, truncation, splits, inspect."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_jsonl
from trl.data_utils import _tokenize as trl_tokenize
from trl.data_utils import common_prefix_length

from smolalign.config.commands import InspectConfig
from smolalign.config.train import load_config
from smolalign.data.formats import PreferencePair
from smolalign.data.inspect import inspect_dataset
from smolalign.data.prepare import prepare_data, read_pairs, tokenize_and_fit
from smolalign.data.sources import load_rows
from smolalign.data.tokenize import TokenizedPair, fit_to_length, tokenize_pairs
from smolalign.errors import UserError


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


STRING_ROWS = [
    {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Lyon."},
    {"prompt": "Name a prime number.", "chosen": " Seven.", "rejected": " Nine."},
]
EXPLICIT_ROWS = [
    {"prompt": [user("Hi there!")], "chosen": [assistant("Hello! How can I help?")], "rejected": [assistant("Go away.")]},
    {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]},
]
IMPLICIT_ROWS = [
    {
        "chosen": [user("Hi"), assistant("Hello"), user("Tell me a joke."), assistant("Why did the chicken...")],
        "rejected": [user("Hi"), assistant("Hello"), user("Tell me a joke."), assistant("No.")],
    },
]
HH_ROWS = [
    {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant: Buy some.",
    },
]
MESSAGES_ROWS = [
    {"messages": [user("Say hi."), assistant("Hi!")]},
    {"messages": [system("Be terse."), user("2+2?"), assistant("4")]},
]


def write_file(path: Path, rows: list[dict]) -> Path:
    """Rows to a .jsonl / .json / .csv / .parquet file, as users would write them."""
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    return path


# -- formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_prompt_completion_strings(tmp_path, suffix):
    read = read_pairs(str(write_file(tmp_path / f"pairs{suffix}", STRING_ROWS)))
    assert read.data_format.name == "prompt_completion_strings"
    assert read.num_rows == 2 and read.problems == []
    assert read.pairs == [PreferencePair(i, r["prompt"], r["chosen"], r["rejected"]) for i, r in enumerate(STRING_ROWS)]
    assert not read.pairs[0].is_conversational


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_conversational_explicit_prompt_as_messages(tmp_path, suffix):
    read = read_pairs(str(write_file(tmp_path / f"pairs{suffix}", EXPLICIT_ROWS)))
    assert read.data_format.name == "conversational_explicit_prompt"
    assert read.pairs[0] == PreferencePair(
        0, [user("Hi there!")], [assistant("Hello! How can I help?")], [assistant("Go away.")]
    )
    assert read.pairs[1].prompt == [user("2+2?")]
    assert read.pairs[0].is_conversational


def test_conversational_explicit_prompt_as_a_string(tmp_path):
    rows = [{"prompt": "Hi there!", "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]}]
    read = read_pairs(str(write_file(tmp_path / "pairs.jsonl", rows)))
    assert read.data_format.name == "conversational_explicit_prompt"
    assert read.pairs == [PreferencePair(0, [user("Hi there!")], [assistant("Hello!")], [assistant("Go away.")])]


def test_conversational_explicit_prompt_with_answers_that_repeat_the_prompt(tmp_path):
    rows = [{"prompt": [user("Q")], "chosen": [user("Q"), assistant("good")], "rejected": [user("Q"), assistant("bad")]}]
    read = read_pairs(str(write_file(tmp_path / "pairs.jsonl", rows)))
    assert read.pairs[0].chosen == [assistant("good")] and read.pairs[0].rejected == [assistant("bad")]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_conversational_implicit_prompt(tmp_path, suffix):
    read = read_pairs(str(write_file(tmp_path / f"pairs{suffix}", IMPLICIT_ROWS)))
    assert read.data_format.name == "conversational_implicit_prompt"
    pair = read.pairs[0]
    assert pair.prompt == [user("Hi"), assistant("Hello"), user("Tell me a joke.")]
    assert pair.chosen == [assistant("Why did the chicken...")]
    assert pair.rejected == [assistant("No.")]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_hh_rlhf_transcripts(tmp_path, suffix):
    read = read_pairs(str(write_file(tmp_path / f"hh{suffix}", HH_ROWS)))
    assert read.data_format.name == "hh_rlhf"
    assert read.pairs == [
        PreferencePair(
            0,
            [user("Hi"), assistant("Hello!"), user("How do I bake bread?")],
            [assistant("Mix flour and water.")],
            [assistant("Buy some.")],
        )
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_messages_rows_are_sft_pairs(tmp_path, suffix):
    read = read_pairs(str(write_file(tmp_path / f"sft{suffix}", MESSAGES_ROWS)))
    assert read.data_format.name == "messages"
    assert read.pairs[0] == PreferencePair(0, [user("Say hi.")], [assistant("Hi!")], None)
    assert read.pairs[1] == PreferencePair(1, [system("Be terse."), user("2+2?")], [assistant("4")], None)


def test_messages_not_ending_with_an_assistant_turn_is_a_problem(tmp_path):
    rows = [MESSAGES_ROWS[0], {"messages": [user("Hello?")]}, {"messages": [assistant("Hi"), user("Well?")]}]
    read = read_pairs(str(write_jsonl(tmp_path / "sft.jsonl", rows)))
    assert [p.index for p in read.pairs] == [0]
    assert [p.index for p in read.problems] == [1, 2]
    assert all("assistant" in p.reason for p in read.problems)


def test_unrecognised_columns_list_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "notes.jsonl", [{"text": "a?", "score": 1}])
    with pytest.raises(UserError) as error:
        read_pairs(str(path))
    message = str(error.value)
    assert "'text'" in message and "'score'" in message
    assert "chosen" in message and "rejected" in message and "dataset_columns" in message


def test_chosen_rejected_that_are_neither_strings_nor_messages_are_unrecognised(tmp_path):
    path = write_jsonl(tmp_path / "numbers.jsonl", [{"chosen": 1, "rejected": 2}])
    with pytest.raises(UserError, match="has columns"):
        read_pairs(str(path))


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_pairs(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_empty_file_is_a_user_error(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_text("")
    with pytest.raises(UserError, match="empty"):
        read_pairs(str(path))


def test_text_file_is_a_user_error(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("prompt chosen rejected\n")
    with pytest.raises(UserError) as error:
        read_pairs(str(path))
    assert ".txt" in str(error.value) and "JSONL" in str(error.value)


def test_unparsable_jsonl_is_a_user_error(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "chosen": \n')
    with pytest.raises(UserError, match="cannot parse"):
        read_pairs(str(path))


def test_folder_with_a_split_file(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", STRING_ROWS)
    assert len(load_rows(str(tmp_path), split="test")) == 2
    with pytest.raises(UserError, match="train.jsonl"):
        load_rows(str(tmp_path), split="train")


def test_no_usable_row_is_a_user_error_with_the_reasons(tmp_path):
    rows = [{"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": " ", "rejected": "x"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError) as error:
        read_pairs(str(path))
    assert "row 0: chosen and rejected answers are identical" in str(error.value)
    assert "row 1: empty chosen answer" in str(error.value)
    assert read_pairs(str(path), allow_empty=True).pairs == []


def test_limit_counts_usable_pairs(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "a"}] + [
        {"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(5)
    ]
    read = read_pairs(str(write_jsonl(tmp_path / "pairs.jsonl", rows)), limit=3)
    assert [p.index for p in read.pairs] == [1, 2, 3]


# -- HH-RLHF --------------------------------------------------------------------------------------


def test_hh_rlhf_answers_are_the_turns_after_the_first_difference(tmp_path):
    rows = [
        {
            "chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D",
            "rejected": "\n\nHuman: A\n\nAssistant: X\n\nHuman: C\n\nAssistant: E",
        },
        {  # without the leading blank lines
            "chosen": "Human: A\n\nAssistant: yes",
            "rejected": "Human: A\n\nAssistant: no",
        },
    ]
    read = read_pairs(str(write_jsonl(tmp_path / "hh.jsonl", rows)))
    assert read.data_format.name == "hh_rlhf"
    first, second = read.pairs
    assert first.prompt == [user("A")]
    assert first.chosen == [assistant("B"), user("C"), assistant("D")]
    assert first.rejected == [assistant("X"), user("C"), assistant("E")]
    assert second == PreferencePair(1, [user("A")], [assistant("yes")], [assistant("no")])


def test_hh_rlhf_problem_rows_are_reported_and_left_out(tmp_path):
    rows = [
        HH_ROWS[0],
        {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Hey"},  # empty chosen
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hey", "rejected": "\n\nHuman: Hi\n\nAssistant: Hey"},  # identical
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hey", "rejected": "\n\nHuman: Hi\n\nAssistant:   "},  # empty rejected
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: ok", "rejected": "\n\nHuman: Hi\n\nAssistant: No"},
        HH_ROWS[0],
    ]
    read = read_pairs(str(write_jsonl(tmp_path / "hh.jsonl", rows)))
    assert [p.index for p in read.pairs] == [0, 5]
    problems = {p.index: p.reason for p in read.problems}
    assert set(problems) == {1, 2, 3, 4}
    assert problems[1] == "empty chosen answer"
    assert "identical" in problems[2]
    assert problems[3] == "empty rejected answer"
    assert "Assistant" in problems[4]
    assert str(read.problems[0]) == "row 1: empty chosen answer"


def test_bundled_hh_rlhf_rows_parse(hh_rows, tmp_path):
    read = read_pairs(str(write_jsonl(tmp_path / "hh.jsonl", hh_rows[:50])))
    assert read.data_format.name == "hh_rlhf"
    assert len(read.pairs) + len(read.problems) == 50
    for pair in read.pairs:
        assert pair.prompt[0]["role"] == "user" and pair.prompt[-1]["role"] == "user"
        assert pair.chosen[0]["role"] == "assistant" and pair.rejected[0]["role"] == "assistant"
        assert pair.chosen != pair.rejected


# -- system prompts -------------------------------------------------------------------------------


def test_system_column_prepends_a_system_message(tmp_path):
    rows = [dict(EXPLICIT_ROWS[0], system="Be kind."), dict(EXPLICIT_ROWS[1], system=None)]
    read = read_pairs(str(write_jsonl(tmp_path / "pairs.jsonl", rows)))
    assert read.pairs[0].prompt == [system("Be kind."), user("Hi there!")]
    assert read.pairs[1].prompt == [user("2+2?")]


def test_system_prompt_argument_prepends_unless_the_prompt_has_one(tmp_path):
    rows = [
        EXPLICIT_ROWS[0],
        {"prompt": [system("Own."), user("Q")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
        dict(EXPLICIT_ROWS[1], system="From column."),
    ]
    read = read_pairs(str(write_jsonl(tmp_path / "pairs.jsonl", rows)), system_prompt="Default.")
    assert read.pairs[0].prompt == [system("Default."), user("Hi there!")]
    assert read.pairs[1].prompt == [system("Own."), user("Q")]
    assert read.pairs[2].prompt == [system("From column."), user("2+2?")]  # the row's own system wins

    hh = read_pairs(str(write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)), system_prompt="Default.")
    assert hh.pairs[0].prompt[0] == system("Default.") and hh.pairs[0].prompt[1] == user("Hi")


def test_system_column_makes_string_pairs_chat_data(tmp_path):
    rows = [dict(STRING_ROWS[0], system="Be kind."), dict(STRING_ROWS[1], system="")]
    read = read_pairs(str(write_jsonl(tmp_path / "pairs.jsonl", rows)))
    assert read.data_format.name == "conversational_explicit_prompt" and read.problems == []
    assert read.pairs[0] == PreferencePair(0, [system("Be kind."), user(STRING_ROWS[0]["prompt"])],
                                           [assistant(" Paris.")], [assistant(" Lyon.")])
    assert read.pairs[1].prompt == [user(STRING_ROWS[1]["prompt"])]


# -- tokenization: TRL DPOTrainer's convention -----------------------------------------------


def conversational_pairs(hh_rows, tmp_path) -> list[PreferencePair]:
    """Real HH-RLHF pairs (single- and multi-turn) and one with a system message."""
    multi_turn = [r for r in hh_rows[100:400] if r["chosen"].count("\n\nHuman:") >= 2][:4]
    pairs = read_pairs(str(write_jsonl(tmp_path / "hh.jsonl", [*hh_rows[20:23], *multi_turn]))).pairs
    with_system = PreferencePair(99, [system("Be brief."), user("Hi")], [assistant("Hey")],
                                 [assistant("Hello there, friend.")])
    return [*pairs, with_system]


def test_conversational_tokenization_matches_trl(tokenizer, hh_rows, tmp_path):
    pairs = conversational_pairs(hh_rows, tmp_path)
    assert len(pairs) >= 6 and any(len(p.prompt) >= 3 for p in pairs)
    tokenized = tokenize_pairs(pairs, tokenizer)
    assert [t.index for t in tokenized] == [p.index for p in pairs]
    for pair, ids in zip(pairs, tokenized, strict=True):
        # TRL 1.16 DPOTrainer: chat template of the prompt with the generation prompt, then of prompt + answer,
        # the completion starting where the two diverge
        prompt = tokenizer.apply_chat_template(pair.prompt, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        full_chosen = tokenizer.apply_chat_template(pair.prompt + pair.chosen, tokenize=True,
                                                    return_dict=True)["input_ids"]
        full_rejected = tokenizer.apply_chat_template(pair.prompt + pair.rejected, tokenize=True,
                                                      return_dict=True)["input_ids"]
        assert full_chosen[: len(prompt)] == prompt  # SmolLM2's template: the prompt is a prefix
        assert ids.prompt_ids == prompt
        assert ids.prompt_ids + ids.chosen_ids == full_chosen
        assert ids.prompt_ids + ids.rejected_ids == full_rejected
        assert ids.chosen_ids[-2:] == tokenizer.encode("<|im_end|>\n", add_special_tokens=False)
        assert ids.truncated is False

        # and the same through TRL's own helpers
        trl_prompt = trl_tokenize(tokenizer, pair.prompt, add_generation_prompt=True)["input_ids"]
        trl_chosen = trl_tokenize(tokenizer, pair.prompt + pair.chosen)["input_ids"]
        trl_rejected = trl_tokenize(tokenizer, pair.prompt + pair.rejected)["input_ids"]
        length = min(common_prefix_length(trl_prompt, trl_chosen), common_prefix_length(trl_prompt, trl_rejected))
        assert ids.prompt_ids == trl_prompt[:length]
        assert ids.chosen_ids == trl_chosen[length:]
        assert ids.rejected_ids == trl_rejected[length:]


def test_string_tokenization_appends_eos_once(tokenizer):
    eos = tokenizer.eos_token
    pairs = [
        PreferencePair(0, "The sky is", " blue.", " green."),
        PreferencePair(1, "Two plus two is", f" four.{eos}", " five."),  # chosen already ends with EOS
    ]
    tokenized = tokenize_pairs(pairs, tokenizer)
    for pair, ids in zip(pairs, tokenized, strict=True):
        for answer, answer_ids in ((pair.chosen, ids.chosen_ids), (pair.rejected, ids.rejected_ids)):
            text = answer if answer.endswith(eos) else answer + eos
            full = tokenizer(pair.prompt + text)["input_ids"]
            assert ids.prompt_ids == tokenizer(pair.prompt)["input_ids"]
            assert ids.prompt_ids + answer_ids == full
            assert answer_ids[-1] == tokenizer.eos_token_id
            assert answer_ids.count(tokenizer.eos_token_id) == 1  # appended when missing, never doubled
            # TRL: the same ids through its own helper
            trl_full = trl_tokenize(tokenizer, pair.prompt + text)["input_ids"]
            assert answer_ids == trl_full[len(ids.prompt_ids):]


def test_sft_pairs_tokenize_without_rejected(tokenizer):
    pairs = [PreferencePair(0, [user("Say hi.")], [assistant("Hi!")], None)]
    (ids,) = tokenize_pairs(pairs, tokenizer)
    assert ids.rejected_ids is None
    assert ids.answers == [ids.chosen_ids]
    full = tokenizer.apply_chat_template(pairs[0].prompt + pairs[0].chosen, tokenize=True,
                                         return_dict=True)["input_ids"]
    assert ids.prompt_ids + ids.chosen_ids == full


def test_conversational_data_needs_a_chat_template(tokenizer):
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        tokenize_pairs([PreferencePair(0, [user("Q")], [assistant("a")], [assistant("b")])], bare)


# -- fitting to max_length ------------------------------------------------------------------------


def pair(prompt: int, chosen: int, rejected: int | None = None, *, index: int = 7) -> TokenizedPair:
    """A pair with prompt ids 1.., chosen ids 101.., rejected ids 201.. (lengths given)."""
    return TokenizedPair(
        index=index,
        prompt_ids=list(range(1, prompt + 1)),
        chosen_ids=list(range(101, 101 + chosen)),
        rejected_ids=None if rejected is None else list(range(201, 201 + rejected)),
    )


def test_fit_leaves_a_pair_that_fits_unchanged():
    original = pair(3, 2, 3)
    fitted = fit_to_length(original, max_length=6, max_prompt_length=None)
    assert fitted == original
    assert fitted.truncated is False
    assert fit_to_length(original, max_length=6, max_prompt_length=3) == original


def test_fit_cuts_the_prompt_from_the_left_only_as_far_as_needed():
    # prompt 10 + longest answer 5 > 12: keep the last 7 prompt tokens, answers whole
    fitted = fit_to_length(pair(10, 5, 3), max_length=12, max_prompt_length=None)
    assert fitted.prompt_ids == [4, 5, 6, 7, 8, 9, 10]
    assert fitted.chosen_ids == [101, 102, 103, 104, 105]
    assert fitted.rejected_ids == [201, 202, 203]
    assert fitted.truncated is True
    assert fitted.index == 7


def test_fit_respects_max_prompt_length_even_when_the_pair_would_fit():
    fitted = fit_to_length(pair(10, 2, 2), max_length=100, max_prompt_length=4)
    assert fitted.prompt_ids == [7, 8, 9, 10]
    assert fitted.chosen_ids == [101, 102] and fitted.rejected_ids == [201, 202]
    assert fitted.truncated is True


def test_fit_cuts_answers_from_the_right_once_the_prompt_is_at_its_budget():
    # default prompt budget: max_length // 2 = 8; then answers get the 8 tokens left
    fitted = fit_to_length(pair(10, 20, 3), max_length=16, max_prompt_length=None)
    assert fitted.prompt_ids == list(range(3, 11))
    assert fitted.chosen_ids == list(range(101, 109))
    assert fitted.rejected_ids == [201, 202, 203]  # short answers are not cut
    assert fitted.truncated is True

    # with max_prompt_length 4: prompt keeps its last 4, answers get 12
    fitted = fit_to_length(pair(10, 20, 3), max_length=16, max_prompt_length=4)
    assert fitted.prompt_ids == [7, 8, 9, 10]
    assert fitted.chosen_ids == list(range(101, 113))

    # the prompt is cut to its budget, not below, before an answer is cut
    fitted = fit_to_length(pair(10, 5), max_length=12, max_prompt_length=8)
    assert fitted.prompt_ids == list(range(3, 11))
    assert fitted.chosen_ids == list(range(101, 105))


def test_fit_does_not_cut_a_prompt_shorter_than_its_budget():
    fitted = fit_to_length(pair(3, 20, 20), max_length=10, max_prompt_length=None)
    assert fitted.prompt_ids == [1, 2, 3]
    assert len(fitted.chosen_ids) == len(fitted.rejected_ids) == 7
    assert fitted.truncated is True


def test_fit_never_leaves_an_empty_answer():
    fitted = fit_to_length(pair(9, 9, 9), max_length=10, max_prompt_length=9)
    assert fitted.prompt_ids == list(range(1, 10))
    assert fitted.chosen_ids == [101] and fitted.rejected_ids == [201]
    for prompt, answer, max_length in [(50, 50, 2), (1, 100, 2), (100, 1, 3)]:
        fitted = fit_to_length(pair(prompt, answer, answer), max_length=max_length, max_prompt_length=None)
        assert fitted is not None
        assert fitted.prompt_ids and fitted.chosen_ids and fitted.rejected_ids
        assert len(fitted.prompt_ids) + len(fitted.chosen_ids) <= max_length


def test_fit_returns_none_when_a_pair_cannot_fit():
    assert fit_to_length(pair(0, 3, 3), max_length=10, max_prompt_length=None) is None  # no prompt left
    assert fit_to_length(pair(3, 3, 0), max_length=10, max_prompt_length=None) is None  # empty answer
    # a prompt budget that leaves no room for an answer (validate() forbids it in configs)
    assert fit_to_length(pair(10, 5, 5), max_length=10, max_prompt_length=10) is None


def test_fit_keeps_sft_pairs_without_rejected():
    fitted = fit_to_length(pair(6, 6), max_length=8, max_prompt_length=None)
    assert fitted.rejected_ids is None
    assert fitted.prompt_ids == [3, 4, 5, 6] and fitted.chosen_ids == [101, 102, 103, 104]


def test_fit_lengths_never_exceed_the_limits():
    for prompt in (1, 5, 17, 40):
        for chosen in (1, 6, 33):
            for rejected in (1, 12, 50):
                for max_length, max_prompt_length in ((8, None), (16, 5), (64, None), (64, 40)):
                    original = pair(prompt, chosen, rejected)
                    fitted = fit_to_length(original, max_length=max_length, max_prompt_length=max_prompt_length)
                    assert fitted is not None
                    assert fitted.longest_sequence <= max_length
                    if max_prompt_length is not None:
                        assert len(fitted.prompt_ids) <= max_prompt_length
                    # prompt keeps its end, answers keep their start
                    assert fitted.prompt_ids == original.prompt_ids[len(original.prompt_ids) - len(fitted.prompt_ids):]
                    assert fitted.chosen_ids == original.chosen_ids[: len(fitted.chosen_ids)]
                    assert fitted.rejected_ids == original.rejected_ids[: len(fitted.rejected_ids)]
                    changed = (fitted.prompt_ids, fitted.chosen_ids, fitted.rejected_ids) != (
                        original.prompt_ids, original.chosen_ids, original.rejected_ids
                    )
                    assert fitted.truncated == changed


# -- prepare_data ---------------------------------------------------------------------------------


@pytest.fixture
def twenty_pairs(tmp_path) -> str:
    rows = [{"prompt": f"Question {i}: what comes after {i}?", "chosen": f" {i + 1}.", "rejected": f" {i - 1}."}
            for i in range(20)]
    return str(write_jsonl(tmp_path / "pairs.jsonl", rows))


def prepared(tokenizer, dataset, use="pairs", **values):
    config = load_config(None, {"dataset": dataset, "max_length": 64, **values})
    return prepare_data(config, tokenizer, use=use)


@pytest.mark.parametrize(("size", "expected_eval"), [(0.25, 5), (4, 4), (1, 1), (0.5, 10)])
def test_test_split_size_gives_disjoint_sets_of_the_right_sizes(tokenizer, twenty_pairs, size, expected_eval):
    data = prepared(tokenizer, twenty_pairs, test_split_size=size, seed=3)
    assert len(data.eval) == expected_eval
    assert len(data.train) == 20 - expected_eval
    train_rows = {p.index for p in data.train}
    eval_rows = {p.index for p in data.eval}
    assert not train_rows & eval_rows
    assert train_rows | eval_rows == set(range(20))


def test_test_split_is_deterministic_for_a_seed(tokenizer, twenty_pairs):
    def held_out(seed):
        return [p.index for p in prepared(tokenizer, twenty_pairs, test_split_size=0.25, seed=seed).eval]

    assert held_out(0) == held_out(0)
    assert held_out(1) == held_out(1)
    assert {tuple(held_out(seed)) for seed in range(4)} != {tuple(held_out(0))}  # the seed matters
    assert held_out(0) != list(range(5))  # shuffled, not the first rows


@pytest.mark.parametrize("size", [20, 25, 0.01])
def test_test_split_that_empties_a_side_is_a_user_error(tokenizer, twenty_pairs, size):
    with pytest.raises(UserError, match="test_split_size"):
        prepared(tokenizer, twenty_pairs, test_split_size=size)


def test_max_train_pairs_limits(tokenizer, twenty_pairs):
    data = prepared(tokenizer, twenty_pairs, max_train_pairs=3)
    assert [p.index for p in data.train] == [0, 1, 2]
    assert data.eval == []

    split = prepared(tokenizer, twenty_pairs, max_train_pairs=3, test_split_size=5, max_eval_pairs=2)
    assert len(split.train) == 3 and len(split.eval) == 2
    assert not {p.index for p in split.train} & {p.index for p in split.eval}


def test_eval_dataset_is_read_and_limited(tokenizer, twenty_pairs, tmp_path):
    held = write_jsonl(tmp_path / "held.jsonl", STRING_ROWS * 3)
    data = prepared(tokenizer, twenty_pairs, eval_dataset=str(held), max_eval_pairs=4)
    assert len(data.train) == 20
    assert [p.index for p in data.eval] == [0, 1, 2, 3]


def test_prepared_pairs_are_fitted(tokenizer, twenty_pairs):
    data = prepared(tokenizer, twenty_pairs, max_length=8, max_prompt_length=4)
    assert len(data.train) == 20
    for fitted in data.train:
        assert len(fitted.prompt_ids) <= 4 and fitted.longest_sequence <= 8
        assert fitted.truncated


def test_empty_prompts_are_reported_rows(tokenizer, tmp_path):
    # an empty prompt leaves nothing to predict the answer's first token from: reported with its row
    rows = [{"prompt": "", "chosen": "yes", "rejected": "no"}] * 3
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(UserError) as error:
        prepared(tokenizer, str(path))
    assert "no usable rows" in str(error.value) and "row 0: empty 'prompt'" in str(error.value)


def test_implicit_prompt_strings_split_at_the_common_beginning(tmp_path):
    rows = [{"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}, {"chosen": "Say hi. Hello", "rejected": "Say hi. Go"}]
    read = read_pairs(str(write_jsonl(tmp_path / "rows.jsonl", rows)))
    assert read.data_format.name == "implicit_prompt_strings"
    assert [(p.prompt, p.chosen, p.rejected) for p in read.pairs] == [
        ("Q: 2+2? A:", " 4", " 5"),  # the space before the split goes to the answers, as in TRL
        ("Say hi.", " Hello", " Go"),
    ]


def test_pairwise_algorithms_on_sft_data_is_a_user_error(tokenizer, tmp_path):
    path = str(write_jsonl(tmp_path / "sft.jsonl", MESSAGES_ROWS))
    with pytest.raises(UserError, match="use algorithm sft"):
        prepared(tokenizer, path, use="pairs")
    data = prepared(tokenizer, path, use="answers")
    assert len(data.train) == 2 and all(p.rejected_ids is None for p in data.train)


def test_tokenize_and_fit_logs_counts(tokenizer, tmp_path, caplog):
    rows = [*STRING_ROWS, {"prompt": "q", "chosen": "x", "rejected": "x"}]
    read = read_pairs(str(write_jsonl(tmp_path / "pairs.jsonl", rows)))
    with caplog.at_level(logging.INFO, logger="smolalign"):
        fitted = tokenize_and_fit(read, tokenizer, max_length=6, max_prompt_length=3)
    assert len(fitted) == 2
    assert "2 kept, 2 truncated to max_length=6, 0 dropped" in caplog.text
    assert "1 rows unusable" in caplog.text
    assert "row 2: chosen and rejected answers are identical" in caplog.text


# -- inspect ----------------------------------------------------------------------------------------


def inspect_args(dataset, **changes) -> InspectConfig:
    return InspectConfig.from_values({"dataset": str(dataset), "max_length": 64, **changes})


def test_inspect_reports_format_counts_lengths_truncation_and_problems(tokenizer, tmp_path):
    rows = [
        {"prompt": "Tell me about cats. " * 10, "chosen": " Cats are small. " * 5, "rejected": " No."},
        {"prompt": "Hi", "chosen": "", "rejected": "Hello"},  # problem: empty chosen
        {"prompt": "Hi", "chosen": " Hello there.", "rejected": " Hey."},
        {"prompt": "Hi", "chosen": " Same.", "rejected": " Same."},  # problem: identical
        {"prompt": "What is 2+2?", "chosen": " 4.", "rejected": " 5."},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    report = inspect_dataset(inspect_args(path, max_length=40))

    assert f"dataset:  {path}" in report
    assert "format:   prompt / chosen / rejected strings" in report
    assert "rows:     5, usable pairs: 3, unusable rows: 2" in report
    assert "p50" in report and "p90" in report and "p99" in report and "max" in report

    eos = tokenizer.eos_token
    usable = [rows[0], rows[2], rows[4]]
    prompt_lengths = sorted(len(tokenizer(r["prompt"])["input_ids"]) for r in usable)
    chosen_lengths = sorted(
        len(tokenizer(r["prompt"] + r["chosen"] + eos)["input_ids"]) - len(tokenizer(r["prompt"])["input_ids"])
        for r in usable
    )
    table = {line.split()[0]: line.split()[1:] for line in report.splitlines() if line.startswith("  ")}
    # nearest rank over 3 values: p50 = 2nd, p90 = p99 = max = 3rd
    assert table["prompt"] == [str(prompt_lengths[1])] + [str(prompt_lengths[2])] * 3
    assert table["chosen"] == [str(chosen_lengths[1])] + [str(chosen_lengths[2])] * 3
    assert "rejected" in table and "longest" in table
    assert prompt_lengths[2] + chosen_lengths[2] > 40  # so the first pair must be truncated
    assert "with max_length=40: 1 pairs would be truncated, 0 dropped (cannot fit)" in report

    assert "problems:" in report
    assert "  row 1: empty chosen answer" in report
    assert "  row 3: chosen and rejected answers are identical" in report


def test_inspect_shows_max_prompt_length_and_no_problems(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", STRING_ROWS)
    report = inspect_dataset(inspect_args(path, max_length=64, max_prompt_length=2))
    assert "with max_length=64, max_prompt_length=2: 2 pairs would be truncated, 0 dropped" in report
    assert "problems: none" in report


def test_inspect_conversational_and_split_name(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", HH_ROWS)
    report = inspect_dataset(inspect_args(tmp_path, split="test", system_prompt="Be brief."))
    assert "(split test)" in report
    assert "format:   HH-RLHF transcripts" in report
    assert "rows:     1, usable pairs: 1, unusable rows: 0" in report


def test_inspect_with_no_usable_rows_lists_the_problems(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 25)
    report = inspect_dataset(inspect_args(path))
    assert "usable pairs: 0, unusable rows: 25" in report
    assert "token lengths" not in report
    assert "  row 0: chosen and rejected answers are identical" in report
    assert "  row 19: " in report and "  row 20: " not in report  # the first 20 are shown
    assert "… and 5 more" in report
