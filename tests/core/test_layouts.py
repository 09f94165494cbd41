"""Every batch layout gives the padded layout's numbers: loss, metrics and gradients, for every objective,
on the CPU and (where present) on a CUDA GPU, whose packed and prefix-shared layouts run FlexAttention; and
attention without 4D masks falls back to the padded layout."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import transformers.integrations.flex_attention
from conftest import tokenize_hh
from torch.nn.attention.flex_attention import flex_attention
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import smolalign.core.logprobs
from smolalign.config.choices import LAYOUTS
from smolalign.core.layouts import build_batch, choose_layout
from smolalign.core.logprobs import RewardScorer, SequenceScorer, score_batch, token_logprobs
from smolalign.core.losses import OBJECTIVES, BatchTotals, LossSettings
from smolalign.core.reference import adapter_disabled_reference, model_reference
from smolalign.data.tokenize import TokenizedPair, fit_to_length
from smolalign.models.attention import BLOCK_SPARSE, resolve_attention
from smolalign.models.loading import add_lora

SETTINGS = {
    "dpo": LossSettings(beta=0.3, rpo_alpha=0.2),
    # several loss types, LD-DPO's shared lengths and WPO's weights
    "dpo-options": LossSettings(beta=0.3, loss_type=("sigmoid", "bco_pair", "sigmoid_norm"), loss_weights=(0.8, 0.2, 1.0),
                                ld_alpha=0.5, use_weighting=True, f_divergence_type="js_divergence"),
    "dpo-aot": LossSettings(beta=0.3, loss_type=("aot", "sft")),
    "orpo": LossSettings(beta=0.5),
    "simpo": LossSettings(beta=2.0, simpo_gamma=0.5, cpo_alpha=0.3, label_smoothing=0.1),
    "kto": LossSettings(beta=0.3, loss_type="kto", desirable_weight=1.2),
    "sft": LossSettings(),
    "reward": LossSettings(center_rewards_coefficient=0.01),
}


@pytest.fixture(scope="module")
def awkward_pairs(hh_rows, tokenizer):
    """Real pairs of very different lengths, answers of one token, and prompts cut by truncation."""
    real = tokenize_hh(hh_rows[300:304], tokenizer)
    truncated = [fit_to_length(p, max_length=60, max_prompt_length=20) for p in real[:2]]
    assert all(p is not None and p.truncated for p in truncated)
    one_token = TokenizedPair(90, real[0].prompt_ids, [tokenizer.eos_token_id], [real[1].chosen_ids[0]])
    tiny_prompt = TokenizedPair(91, real[2].prompt_ids[-1:], real[3].chosen_ids, real[2].rejected_ids[:1])
    return [*real, *truncated, one_token, tiny_prompt]


def run_objective(model, reference_model, pairs, layout, case, pad_token_id, device="cpu"):
    objective, settings = OBJECTIVES[case.split("-")[0]], SETTINGS[case]
    scorer = (RewardScorer(model, chunk_size=16) if objective.reward_model else
              SequenceScorer(model, chunk_size=16, square_mass=settings.use_weighting))
    if objective.rows == "pairs":
        batch_pairs = pairs
    elif objective.rows == "labelled":  # each row's rejected answer stands for another row's (the KL rows)
        batch_pairs = [dataclasses.replace(p, label=i % 2 == 0) for i, p in enumerate(pairs)]
    else:
        batch_pairs = [TokenizedPair(p.index, p.prompt_ids, p.chosen_ids, None) for p in pairs]
    batch = build_batch(batch_pairs, layout, pad_token_id=pad_token_id, score_prompt=objective.needs_prompt_logps,
                        score_ends=objective.reward_model).to(device)
    reference = None
    if objective.needs_reference:
        source = (adapter_disabled_reference(scorer, model) if reference_model is None
                  else model_reference(reference_model, chunk_size=16))
        reference = source.logps(batch, batch_pairs)
    model.zero_grad()
    policy = score_batch(scorer, batch)
    totals = BatchTotals.of(policy)
    if objective.reference_point is not None:
        totals = dataclasses.replace(totals, kl=objective.reference_point(policy, reference, settings).clamp(min=0))
    out = objective.compute(policy, reference, settings, totals)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_every_objective_is_checked_in_every_layout():
    assert {case.split("-")[0] for case in SETTINGS} == set(OBJECTIVES)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("case", list(SETTINGS))
def test_every_layout_matches_padded(tiny_model, tokenizer, awkward_pairs, case, use_lora, device):
    torch.manual_seed(0)
    attention = {"attn_implementation": resolve_attention("auto", device)}  # FlexAttention on CUDA
    if OBJECTIVES[case.split("-")[0]].reward_model:  # a one-output head on the same backbone (random, seeded)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model(0), num_labels=1, **attention)
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_model(0), **attention)
    model.to(device)
    reference_model = None
    if use_lora:
        model = add_lora(model, type("Lora", (), {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                                  "target_modules": "all-linear"})())
        for name, parameter in model.named_parameters():  # move B off zero so the adapters matter
            if "lora_B" in name:
                parameter.data.normal_(std=0.05)
    else:
        reference_model = AutoModelForCausalLM.from_pretrained(tiny_model(1), **attention).to(device)

    results = {layout: run_objective(model, reference_model, awkward_pairs, layout, case, tokenizer.pad_token_id,
                                     device)
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
    assert int(padded.attention_mask.padding().sum()) == 2 * prompt_tokens + answer_tokens
    assert shared.num_tokens == padded.num_tokens  # throughput is counted in the same units
    longest_pair = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in awkward_pairs)
    assert shared.input_ids.shape[1] == longest_pair  # rows never grow past one pair: per-pair attention cost


def test_rejected_tokens_never_see_the_chosen_answer():
    pair = TokenizedPair(0, [5, 6], [7, 8], [9, 10])
    batch = build_batch([pair], "prefix_shared", pad_token_id=0)
    mask = batch.attention_mask.dense()[0, 0]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 2, 3]
    assert mask[4].tolist() == [True, True, False, False, True, False]
    assert mask[5].tolist() == [True, True, False, False, True, True]
    assert mask[3].tolist() == [True, True, True, True, False, False]


@pytest.mark.parametrize("keep_softmax", [True, False], ids=["softmax-kept", "softmax-recomputed"])
def test_chunked_logprobs_match_log_softmax_with_gradients(monkeypatch, keep_softmax):
    if not keep_softmax:  # larger batches recompute the softmax chunk by chunk in the backward pass
        monkeypatch.setattr(smolalign.core.logprobs, "KEEP_SOFTMAX_ELEMENTS", 0)
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    expected = torch.log_softmax(hidden @ weight.T + bias, dim=-1)[torch.arange(37), targets]
    assert torch.allclose(token_logprobs(hidden, weight, bias, targets, 8)[0], expected)
    assert torch.autograd.gradcheck(lambda h, w, b: token_logprobs(h, w, b, targets, 8)[0], (hidden, weight, bias))


def test_reward_scores_sit_on_the_last_non_padding_token():
    pad = 0
    pair = TokenizedPair(0, [5, 6], [7, pad], [9, 10])  # chosen ends in the padding id (an EOS used as padding)
    for layout in LAYOUTS:
        batch = build_batch([pair], layout, pad_token_id=pad, score_ends=True)
        tokens = batch.input_ids.flatten()[batch.score_positions].tolist()
        assert tokens == [7, 10], layout  # transformers reads a sequence's score at its last non-padding token


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_flex_attention_gives_the_padded_log_probs(tiny_model, tokenizer, awkward_pairs, layout, monkeypatch):
    """The FlexAttention BlockMask built from the batch's block and branch ids gives the padded layout's
    log-probs (answers and prompts). On the CPU PyTorch 2.13's FlexAttention runs forward only (its
    backward raises NotImplementedError) and its compiled kernel fails to compile a second sequence
    length (an inductor C++ error), so this runs it uncompiled; the CUDA run of
    test_every_layout_matches_padded checks the compiled kernel and the gradients."""
    monkeypatch.setattr(transformers.integrations.flex_attention, "compile_friendly_flex_attention",
                        lambda query, key, value, training=False, **kwargs: flex_attention(query, key, value, **kwargs))
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model(0))
    flex = AutoModelForCausalLM.from_pretrained(tiny_model(0), attn_implementation=BLOCK_SPARSE)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        padded = score_batch(SequenceScorer(sdpa, 16), build_batch(awkward_pairs, "padded", pad_token_id=pad,
                                                                  score_prompt=True))
        batch = build_batch(awkward_pairs, layout, pad_token_id=pad, score_prompt=True)
        blocks = score_batch(SequenceScorer(flex, 16), batch)
    assert "flex" in batch.attention_mask._built  # the BlockMask ran, not the dense mask
    for part in ("chosen", "rejected", "prompt"):
        assert torch.allclose(getattr(blocks, part), getattr(padded, part), atol=1e-4, rtol=0), part
    assert bool((padded.chosen < -1).all())  # real log-probs, not an empty sum


def test_block_masks_skip_the_tiles_no_query_sees():
    """Two 300-token sequences packed in a 600-token row: the second one's queries compute no tile of the first."""
    long, first, second = (TokenizedPair(i, [5 + i] * (2 * n), [9] * n, None) for i, n in enumerate((200, 100, 100)))
    mask = build_batch([long, first, second], "packed", pad_token_id=0).attention_mask
    row = int((mask.block_ids.amax(dim=1) == 1).nonzero())  # the row holding two sequences
    assert mask.dense().shape == (2, 1, 600, 600)
    tiles = mask.flex().to_dense()[row, 0]  # [query tiles, key tiles]: 1 where the kernel computes the tile
    assert tiles.shape == (5, 5)
    assert tiles[3:, :2].sum() == 0  # query tiles 3-4 (tokens 384-599, second sequence) skip keys 0-255
    assert tiles.sum() < 5 * 6 / 2  # fewer tiles than a causal mask over the whole row
    # Tile by tile, the BlockMask and the dense mask say the same.
    dense = mask.dense()[row, 0]
    for q in range(5):
        for k in range(5):
            seen = bool(dense[q * 128:(q + 1) * 128, k * 128:(k + 1) * 128].any())
            assert seen == bool(tiles[q, k]), (q, k)


def test_attention_without_4d_masks_falls_back_to_padded(tiny_model, caplog):
    model = AutoModelForCausalLM.from_pretrained(tiny_model(0))
    assert choose_layout("auto", model) == "prefix_shared"
    model.config._attn_implementation = "flash_attention_2"
    with caplog.at_level(logging.WARNING, logger="smolalign"):
        assert choose_layout("auto", model) == "padded"
        assert choose_layout("packed", model) == "padded"
    assert "flash_attention_2" in caplog.text and "padded" in caplog.text
