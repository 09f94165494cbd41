"""KTO's data and settings: unpaired rows, pairs unpaired as TRL does, the KL rows, and the mistakes refused."""

from __future__ import annotations

import logging

import pytest
from conftest import read_jsonl, write_jsonl

from smolalign.config.train import load_config
from smolalign.data.formats import PreferencePair
from smolalign.data.messages import parse_hh_transcript
from smolalign.data.prepare import prepare_data
from smolalign.data.tokenize import TokenizedPair
from smolalign.data.unpaired import check_labels, unpair, with_kl_answers
from smolalign.errors import UserError
from smolalign.training.loop import run_training


def row(index: int, label: bool | None, answer: list[int]) -> TokenizedPair:
    return TokenizedPair(index, [100 + index], answer, None, label=label)


def test_pairs_unpair_as_trl_orders_them():
    pairs = [PreferencePair(i, f"q{i}", f"good {i}", f"bad {i}") for i in range(3)]
    rows = unpair(pairs)
    assert [(r.index, r.chosen, r.label) for r in rows] == [
        (0, "good 0", True), (1, "good 1", True), (2, "good 2", True),
        (0, "bad 0", False), (1, "bad 1", False), (2, "bad 2", False)]
    assert all(r.rejected is None for r in rows)


def test_kl_rows_take_the_previous_answer_of_their_chunk():
    rows = [row(i, i % 2 == 0, [10 * i, 10 * i + 1]) for i in range(5)]
    paired = with_kl_answers(rows, chunk=2, max_length=100)
    assert [r.rejected_ids for r in paired] == [[10, 11], [0, 1], [30, 31], [20, 21], [40, 41]]
    cut = with_kl_answers([row(0, True, [1]), row(1, False, [5, 6, 7])], chunk=2, max_length=3)
    assert cut[0].rejected_ids == [5, 6]  # the KL answer fits max_length after the row's prompt


def test_one_kind_of_row_is_refused_and_imbalance_warned(caplog):
    with pytest.raises(UserError, match="every row of 'data' is desirable; KTO learns from both"):
        check_labels([row(i, True, [1]) for i in range(3)], "data", desirable_weight=1.0, undesirable_weight=1.0)
    rows = [row(i, i < 3, [1]) for i in range(4)]  # 3 desirable, 1 undesirable: 3 / 1 is outside [1, 1.33]
    with caplog.at_level(logging.WARNING, logger="smolalign"):
        check_labels(rows, "data", desirable_weight=1.0, undesirable_weight=1.0)
    assert "outside the KTO paper's [1, 1.33]; desirable_weight in [0.33, 0.44]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="smolalign"):
        check_labels(rows, "data", desirable_weight=0.4, undesirable_weight=1.0)
    assert caplog.text == ""


@pytest.mark.parametrize(("settings", "message"), [
    ({"per_device_train_batch_size": 1}, "'per_device_train_batch_size' must be >= 2"),
    ({"loss_type": "sigmoid"}, "'loss_type' for kto is kto or apo_zero_unpaired"),
    ({"desirable_weight": 0.0}, "'desirable_weight' and 'undesirable_weight' must be > 0"),
    ({"rpo_alpha": 0.5}, "'rpo_alpha' is a DPO setting; it does not apply to kto"),
])
def test_kto_settings_refused_in_one_sentence(settings, message):
    with pytest.raises(UserError, match=message):
        load_config(None, {"algorithm": "kto", **settings})
    assert load_config(None, {"algorithm": "kto", "per_device_train_batch_size": 1,
                              "loss_type": "apo_zero_unpaired"}).loss_type == "apo_zero_unpaired"


@pytest.mark.parametrize(("settings", "message"), [
    ({"loss_type": "sigmoid,sft", "loss_weights": "1.0"}, "'loss_weights' has 1 weights for 2 loss types"),
    ({"loss_type": "exo_pair"}, "loss_type exo_pair needs 'label_smoothing' > 0"),
    ({"loss_type": "apo_zero", "f_divergence_type": "js_divergence"}, "'f_divergence_type: js_divergence' reshapes"),
    ({"loss_type": "aot", "use_weighting": True}, "'use_weighting' (WPO) weights per-pair losses"),
    ({"ld_alpha": 1.5}, "'ld_alpha' must lie in [0, 1]"),
    ({"desirable_weight": 2.0}, "'desirable_weight' is a KTO setting; it does not apply to dpo"),
    ({"loss_type": "kto"}, "'loss_type' kto is KTO's"),
])
def test_dpo_options_refused_in_one_sentence(settings, message):
    from smolalign.config.fields import FlagText

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(None, {key: FlagText(value) if isinstance(value, str) else value for key, value in settings.items()})


def test_label_column_that_is_not_boolean_like(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "q", "completion": "a", "label": "thumbs up"}] * 2)
    config = load_config(None, {"algorithm": "kto", "dataset": str(path)})
    with pytest.raises(UserError, match=r"row 0: 'label' must be true or false \(or 1 / 0\), not 'thumbs up'"):
        prepare_data(config, tokenizer, use="labelled")


def test_pairwise_data_held_out_keeps_both_rows_of_a_pair_together(tmp_path, tokenizer, hh_rows):
    path = write_jsonl(tmp_path / "pairs.jsonl", hh_rows[:10])
    config = load_config(None, {"algorithm": "kto", "dataset": str(path), "test_split_size": 3,
                                "per_device_train_batch_size": 2})
    data = prepare_data(config, tokenizer, use="labelled")
    train_sources, held_sources = {r.index for r in data.train}, {r.index for r in data.eval}
    assert len(held_sources) == 3 and not train_sources & held_sources
    assert len(data.train) == 2 * len(train_sources) and len(data.eval) == 6  # a desirable and an undesirable row each
    assert all(r.rejected_ids is not None for r in data.train + data.eval)  # each with its KL answer


def unpaired(hh_row: dict, desirable: bool) -> dict:
    """An HH-RLHF pair's chosen (desirable) or rejected answer as a TRL unpaired row."""
    conversation = parse_hh_transcript(hh_row["chosen" if desirable else "rejected"])
    return {"prompt": conversation[:-1], "completion": conversation[-1:], "label": desirable}


@pytest.mark.parametrize(("data", "held_out_rows"), [("unpaired", 2), ("pairs", 4)])
def test_kto_trains_and_evaluates(tmp_path, tiny_model, hh_rows, data, held_out_rows):
    rows = [unpaired(r, i % 2 == 1) for i, r in enumerate(hh_rows[:6])] if data == "unpaired" else hh_rows[:6]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    config = load_config(None, {"algorithm": "kto", "model": str(tiny_model(0)), "dataset": str(path),
                                "test_split_size": 2, "max_steps": 2, "per_device_train_batch_size": 2,
                                "learning_rate": 1e-3, "logging_steps": 1, "output_dir": str(tmp_path / "run")})
    run_training(config)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert records[0]["loss"] == pytest.approx(0.5)  # policy = reference: 1 - sigmoid(0) for every row
    assert records[-1]["eval_pairs"] == held_out_rows and "eval_rewards/accuracies_ci_low" in records[-1]
    assert (tmp_path / "run" / "final" / "config.json").exists()
