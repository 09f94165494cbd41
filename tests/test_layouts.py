"""Every batch layout gives the padded layout's numbers: loss, metrics and gradients, for every objective."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import smolalign.logprobs
from smolalign.batching import LAYOUTS, build_batch
from smolalign.data.formats import to_pair
from smolalign.data.tokenize import TokenizedPair, fit_to_length, tokenize_pairs
from smolalign.logprobs import RewardScorer, SequenceScorer, score_batch, token_logprobs
from smolalign.losses import OBJECTIVES, LossSettings
from smolalign.models import add_lora
from smolalign.reference import adapter_disabled_reference, model_reference

SETTINGS = {
    "dpo": LossSettings(beta=0.3, rpo_alpha=0.2),
    "orpo": LossSettings(beta=0.5),
    "simpo": LossSettings(beta=2.0, simpo_gamma=0.5, cpo_alpha=0.3, label_smoothing=0.1),
    "sft": LossSettings(),
    "reward": LossSettings(center_rewards_coefficient=0.01),
}


@pytest.fixture(scope="module")
def awkward_pairs(hh_rows, tokenizer):
    """Real pairs of very different lengths, answers of one token, and prompts cut by truncation."""
    real = tokenize_pairs([to_pair(row, i, "hh_rlhf") for i, row in enumerate(hh_rows[300:304])], tokenizer)
    truncated = [fit_to_length(p, max_length=60, max_prompt_length=20) for p in real[:2]]
    assert all(p is not None and p.truncated for p in truncated)
    one_token = TokenizedPair(90, real[0].prompt_ids, [tokenizer.eos_token_id], [real[1].chosen_ids[0]])
    tiny_prompt = TokenizedPair(91, real[2].prompt_ids[-1:], real[3].chosen_ids, real[2].rejected_ids[:1])
    return [*real, *truncated, one_token, tiny_prompt]


def run_objective(model, reference_model, pairs, layout, algorithm, pad_token_id):
    objective = OBJECTIVES[algorithm]
    scorer = (RewardScorer if objective.reward_model else SequenceScorer)(model, chunk_size=16)
    if objective.needs_rejected:
        batch_pairs = pairs
    else:
        batch_pairs = [TokenizedPair(p.index, p.prompt_ids, p.chosen_ids, None) for p in pairs]
    batch = build_batch(batch_pairs, layout, pad_token_id=pad_token_id, score_prompt=objective.needs_prompt_logps,
                        score_ends=objective.reward_model)
    reference = None
    if objective.needs_reference:
        source = (adapter_disabled_reference(scorer, model) if reference_model is None
                  else model_reference(reference_model, chunk_size=16))
        reference = source.logps(batch, batch_pairs)
    model.zero_grad()
    out = objective.compute(score_batch(scorer, batch), reference, SETTINGS[algorithm])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("algorithm", list(OBJECTIVES))
def test_every_layout_matches_padded(tiny_model, tokenizer, awkward_pairs, algorithm, use_lora):
    torch.manual_seed(0)
    if OBJECTIVES[algorithm].reward_model:  # a one-output head on the same backbone (random, seeded)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model(0), num_labels=1)
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_model(0))
    reference_model = None
    if use_lora:
        model = add_lora(model, type("Lora", (), {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                                  "target_modules": "all-linear"})())
        for name, parameter in model.named_parameters():  # move B off zero so the adapters matter
            if "lora_B" in name:
                parameter.data.normal_(std=0.05)
    else:
        reference_model = AutoModelForCausalLM.from_pretrained(tiny_model(1))

    results = {layout: run_objective(model, reference_model, awkward_pairs, layout, algorithm, tokenizer.pad_token_id)
               for layout in LAYOUTS}
    padded_out, padded_grads = results["padded"]
    assert padded_grads, "some parameter must receive a gradient"
    for layout in ("packed", "prefix_shared"):
        out, grads = results[layout]
        assert torch.allclose(out.loss, padded_out.loss, atol=1e-4, rtol=1e-5), layout
        for name, value in padded_out.metrics.items():
            assert torch.allclose(out.metrics[name], value, atol=1e-4, rtol=1e-5), (layout, name)
        assert grads.keys() == padded_grads.keys()
        for name, grad in padded_grads.items():
            assert torch.allclose(grads[name], grad, atol=1e-4, rtol=1e-4), (layout, name)


def test_prefix_shared_runs_each_prompt_once(awkward_pairs):
    padded = build_batch(awkward_pairs, "padded", pad_token_id=0)
    shared = build_batch(awkward_pairs, "prefix_shared", pad_token_id=0)
    prompt_tokens = sum(len(p.prompt_ids) for p in awkward_pairs)
    answer_tokens = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in awkward_pairs)
    assert int((shared.input_ids != 0).sum()) <= prompt_tokens + answer_tokens
    assert int(padded.attention_mask.sum()) == 2 * prompt_tokens + answer_tokens
    assert shared.num_tokens == padded.num_tokens  # throughput is counted in the same units
    longest_pair = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in awkward_pairs)
    assert shared.input_ids.shape[1] == longest_pair  # rows never grow past one pair: per-pair attention cost


def test_rejected_tokens_never_see_the_chosen_answer():
    pair = TokenizedPair(0, [5, 6], [7, 8], [9, 10])
    batch = build_batch([pair], "prefix_shared", pad_token_id=0)
    mask = batch.attention_mask[0, 0]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 2, 3]
    assert mask[4].tolist() == [True, True, False, False, True, False]
    assert mask[5].tolist() == [True, True, False, False, True, True]
    assert mask[3].tolist() == [True, True, True, True, False, False]


@pytest.mark.parametrize("keep_softmax", [True, False], ids=["softmax-kept", "softmax-recomputed"])
def test_chunked_logprobs_match_log_softmax_with_gradients(monkeypatch, keep_softmax):
    if not keep_softmax:  # larger batches recompute the softmax chunk by chunk in the backward pass
        monkeypatch.setattr(smolalign.logprobs, "KEEP_SOFTMAX_ELEMENTS", 0)
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    expected = torch.log_softmax(hidden @ weight.T + bias, dim=-1)[torch.arange(37), targets]
    assert torch.allclose(token_logprobs(hidden, weight, bias, targets, 8), expected)
    assert torch.autograd.gradcheck(lambda h, w, b: token_logprobs(h, w, b, targets, 8), (hidden, weight, bias))


def test_reward_scores_sit_on_the_last_non_padding_token():
    pad = 0
    pair = TokenizedPair(0, [5, 6], [7, pad], [9, 10])  # chosen ends in the padding id (an EOS used as padding)
    for layout in LAYOUTS:
        batch = build_batch([pair], layout, pad_token_id=pad, score_ends=True)
        tokens = batch.input_ids.flatten()[batch.score_positions].tolist()
        assert tokens == [7, 10], layout  # transformers reads a sequence's score at its last non-padding token
