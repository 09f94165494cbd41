"""Golden tests: smolalign logs TRL 1.16's numbers on the same model, data and settings.

One run per objective, the same for TRL and smolalign: a batch holding the whole dataset, a reference
model different from the policy (DPO), learning rate 0 at step 1 (constant schedule with one warmup
step), then three steps at a learning rate > 0. Step 1's metrics must agree within 1e-4 and the loss
of every later step within 1e-3.

DPO runs on real multi-turn HH-RLHF conversations through the chat template. ORPO and SimPO run on
strings that already start with BOS and end with EOS, where TRL's experimental trainers and
smolalign's single tokenization convention give the same token ids (docs/training.md, "Conventions shared with TRL").
"""

from __future__ import annotations

import math

import pytest
from conftest import read_jsonl, write_jsonl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from smolalign.config.train import load_config
from smolalign.data.messages import parse_hh_transcript
from smolalign.training.loop import run_training

pytestmark = pytest.mark.slow  # trains with TRL

NUM_PAIRS = 6
STEPS = 4
LEARNING_RATE = 2e-3
SCHEDULE = {
    "per_device_train_batch_size": NUM_PAIRS,
    "max_steps": STEPS,
    "learning_rate": LEARNING_RATE,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 1,
    "logging_steps": 1,
    "max_length": 512,
    "seed": 0,
}
TRL_ONLY = {
    "bf16": False,
    "gradient_checkpointing": False,
    "report_to": "none",
    "save_strategy": "no",
    "use_cpu": True,
    "disable_dropout": True,
}
COMPARED = (
    "loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
    "rewards/margins", "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen",
    "accuracy", "margin", "min_reward", "mean_reward", "max_reward", "kl",
)


@pytest.fixture(scope="module")
def conversational_pairs(hh_rows):
    """Multi-turn HH-RLHF pairs as explicit conversational prompts (TRL's preferred format)."""
    multi_turn = [r for r in hh_rows[200:] if r["chosen"].count("\n\nHuman:") >= 2][:NUM_PAIRS]
    pairs = []
    for row in multi_turn:
        chosen, rejected = parse_hh_transcript(row["chosen"]), parse_hh_transcript(row["rejected"])
        pairs.append({"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]})
    return pairs


@pytest.fixture(scope="module")
def bos_eos_string_pairs(conversational_pairs, tokenizer):
    """The same pairs as chat-formatted strings that start with BOS and end with EOS."""
    pairs = []
    for pair in conversational_pairs:
        prompt = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
        pairs.append(
            {
                "prompt": prompt,
                "chosen": pair["chosen"][0]["content"] + tokenizer.eos_token,
                "rejected": pair["rejected"][0]["content"] + tokenizer.eos_token,
            }
        )
    assert all(p["prompt"].startswith(tokenizer.bos_token) for p in pairs)
    return pairs


def run_smolalign(tmp_path, data_rows, **settings) -> list[dict]:
    data = write_jsonl(tmp_path / "pairs.jsonl", data_rows)
    config = load_config(None, {**SCHEDULE, **settings, "dataset": str(data), "output_dir": str(tmp_path / "run")})
    run_training(config)
    return [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]


def run_trl(tmp_path, trainer_class, config_class, data_rows, policy, reference=None, **settings) -> list[dict]:
    """Train with a TRL trainer on the same rows and schedule; returns its logged training steps."""
    extra = {"ref_model": AutoModelForCausalLM.from_pretrained(reference)} if reference else {}
    trainer = trainer_class(
        model=AutoModelForCausalLM.from_pretrained(policy),
        args=config_class(output_dir=str(tmp_path / "trl"), **settings, **SCHEDULE, **TRL_ONLY),
        train_dataset=Dataset.from_list(data_rows),
        processing_class=AutoTokenizer.from_pretrained(policy),
        **extra,
    )
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def assert_same_numbers(
    ours: list[dict], theirs: list[dict], required: tuple[str, ...] = ("loss", "rewards/accuracies", "logps/chosen")
) -> None:
    assert [r["step"] for r in ours] == [t["step"] for t in theirs] == list(range(1, STEPS + 1))
    first, trl_first = ours[0], theirs[0]
    compared = [key for key in COMPARED if key in trl_first]
    assert set(required) <= set(compared)
    for key in compared:
        assert math.isclose(first[key], trl_first[key], rel_tol=1e-4, abs_tol=1e-4), (key, first[key], trl_first[key])
    assert first["learning_rate"] == 0.0 and ours[1]["learning_rate"] == LEARNING_RATE
    for mine, reference in zip(ours[1:], theirs[1:], strict=True):
        assert abs(mine["loss"] - reference["loss"]) < 1e-3, (mine["step"], mine["loss"], reference["loss"])
    assert abs(ours[-1]["loss"] - ours[0]["loss"]) > 1e-3, "the learning rate > 0 steps must move the loss"


DPO_CASES = [
    ("sigmoid", {}),
    ("ipo", {}),
    ("hinge", {}),
    ("robust", {"label_smoothing": 0.2}),
    ("exo_pair", {"label_smoothing": 1e-3}),
    ("bco_pair", {}),
    ("sppo_hard", {}),
    ("nca_pair", {}),
    ("aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", {}),
    ("apo_zero", {}),
    ("apo_down", {}),
    ("discopop", {"discopop_tau": 0.05}),
    ("sft", {}),
    ("sigmoid_norm", {}),
    (["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]}),  # MPO
    ("sigmoid", {"f_divergence_type": "forward_kl"}),
    ("sigmoid", {"f_divergence_type": "js_divergence"}),
    ("ipo", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    ("sigmoid", {"ld_alpha": 0.5}),
    ("sigmoid", {"use_weighting": True}),
    ("ipo", {"use_weighting": True, "ld_alpha": 0.2}),  # TRL 1.16 crashes on hinge with WPO (in-place on relu)
]


def case_id(case) -> str:
    loss_type, extra = case
    name = "+".join(loss_type) if isinstance(loss_type, list) else loss_type
    return "-".join([name, *(f"{key}={value}" for key, value in extra.items() if key != "loss_weights")])


@pytest.mark.parametrize(("loss_type", "extra"), DPO_CASES, ids=[case_id(c) for c in DPO_CASES])
def test_dpo_loss_types_match_trl(tmp_path, tiny_model, conversational_pairs, loss_type, extra):
    from trl import DPOConfig, DPOTrainer

    policy, reference = tiny_model(0), tiny_model(1)
    settings = {"beta": 0.5, "loss_type": loss_type, **extra}
    ours = run_smolalign(tmp_path, conversational_pairs, model=str(policy), ref_model=str(reference), **settings)
    theirs = run_trl(tmp_path, DPOTrainer, DPOConfig, conversational_pairs, policy, reference, **settings)
    assert_same_numbers(ours, theirs)


def test_ld_dpo_matches_trl_with_precomputed_reference_log_probs(tmp_path, tiny_model, conversational_pairs):
    """LD-DPO weights the reference's tokens too: a cached reference must hold the shared-length sums."""
    from trl import DPOConfig, DPOTrainer

    policy = tiny_model(0)
    settings = {"beta": 0.5, "ld_alpha": 0.3}
    ours = run_smolalign(tmp_path, conversational_pairs, model=str(policy), precompute_ref_log_probs=True, **settings)
    theirs = run_trl(tmp_path, DPOTrainer, DPOConfig, conversational_pairs, policy, precompute_ref_log_probs=True,
                     **settings)
    assert_same_numbers(ours, theirs)


def unpaired_rows(conversational_pairs) -> list[dict]:
    """TRL's unpaired format: each pair's chosen or rejected answer, alternately, with its label."""
    return [{"prompt": pair["prompt"], "completion": pair["chosen" if i % 2 == 0 else "rejected"],
             "label": i % 2 == 0} for i, pair in enumerate(conversational_pairs)]


KTO_CASES = [
    ("unpaired", {}),
    ("unpaired", {"desirable_weight": 1.3, "undesirable_weight": 0.7}),
    ("unpaired", {"loss_type": "apo_zero_unpaired"}),
    ("pairs", {}),
    ("pairs", {"loss_type": "apo_zero_unpaired", "desirable_weight": 0.5}),
]


@pytest.mark.parametrize(("data", "extra"), KTO_CASES, ids=[case_id(c) for c in KTO_CASES])
def test_kto_matches_trl(tmp_path, tiny_model, conversational_pairs, data, extra):
    """TRL's KTOTrainer reads rows in order (sequential sampling) and pairs each prompt with the answer of the row
    before it in its batch for the KL estimate; pairs are unpaired into their chosen rows, then their rejected
    ones."""
    from trl import KTOConfig, KTOTrainer

    policy, reference = tiny_model(0), tiny_model(1)
    rows = unpaired_rows(conversational_pairs) if data == "unpaired" else conversational_pairs
    settings = {"beta": 0.4, **extra}
    ours = run_smolalign(tmp_path, rows, model=str(policy), ref_model=str(reference), algorithm="kto",
                         train_sampling_strategy="sequential", **settings)
    theirs = run_trl(tmp_path, KTOTrainer, KTOConfig, rows, policy, reference, **settings)
    assert_same_numbers(ours, theirs, required=("loss", "kl") if "loss_type" not in extra else ("loss",))


def test_rpo_alpha_matches_trl_sigmoid_plus_sft(tmp_path, tiny_model, conversational_pairs):
    from trl import DPOConfig, DPOTrainer

    policy, reference = tiny_model(0), tiny_model(1)
    ours = run_smolalign(tmp_path, conversational_pairs, model=str(policy), ref_model=str(reference), rpo_alpha=0.5)
    theirs = run_trl(tmp_path, DPOTrainer, DPOConfig, conversational_pairs, policy, reference,
                     loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    assert_same_numbers(ours, theirs)


def test_orpo_matches_trl(tmp_path, tiny_model, bos_eos_string_pairs):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy = tiny_model(0)
    ours = run_smolalign(tmp_path, bos_eos_string_pairs, model=str(policy), algorithm="orpo", beta=0.25)
    theirs = run_trl(tmp_path, ORPOTrainer, ORPOConfig, bos_eos_string_pairs, policy, beta=0.25)
    assert_same_numbers(ours, theirs)


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0], ids=["simpo", "cpo-simpo"])
def test_simpo_matches_trl_cpo_trainer(tmp_path, tiny_model, bos_eos_string_pairs, cpo_alpha):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy = tiny_model(0)
    settings = {"beta": 2.0, "simpo_gamma": 0.8, "label_smoothing": 0.1, "cpo_alpha": cpo_alpha}
    ours = run_smolalign(tmp_path, bos_eos_string_pairs, model=str(policy), algorithm="simpo", **settings)
    theirs = run_trl(tmp_path, CPOTrainer, CPOConfig, bos_eos_string_pairs, policy, loss_type="simpo", **settings)
    assert_same_numbers(ours, theirs)


def test_reward_model_matches_trl_reward_trainer(tmp_path, tiny_model, conversational_pairs):
    from trl import RewardConfig, RewardTrainer

    policy = tiny_model(0)
    ours = run_smolalign(tmp_path, conversational_pairs, model=str(policy), algorithm="reward")
    trainer = RewardTrainer(
        model=str(policy),  # TRL loads it with a fresh one-output head after seeding, as smolalign does
        args=RewardConfig(output_dir=str(tmp_path / "trl"), **SCHEDULE, **TRL_ONLY),
        train_dataset=Dataset.from_list(conversational_pairs),
        processing_class=AutoTokenizer.from_pretrained(policy),
    )
    trainer.train()
    theirs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert_same_numbers(ours, theirs, required=("loss", "accuracy", "margin", "mean_reward"))
