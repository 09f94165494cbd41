"""Drift from the reference (KL, perplexity) against a full-logits computation, generations side by side,
reference-free summaries, and the check of `--generate`."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from conftest import read_jsonl, tokenize_hh, varied_llama, write_jsonl
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from smolalign.cli import main
from smolalign.core.logprobs import SequenceScorer, chunk_logits
from smolalign.core.scoring import PairScoring, ScorerView
from smolalign.data.tokenize import TokenizedPair
from smolalign.evaluation import drift, generation
from smolalign.evaluation.drift import generate_with_drift, score_with_drift
from smolalign.evaluation.generation import generate_answers

CPU = torch.device("cpu")


def full_logits_statistics(policy, reference, pairs):
    """KL and perplexity on the chosen answers from whole logits, position by position."""
    logp_sum = ref_logp_sum = kl_sum = 0.0
    tokens, per_answer = 0, []
    for pair in pairs:
        ids = torch.tensor([pair.prompt_ids + pair.chosen_ids])
        with torch.no_grad():
            log_p = policy(ids).logits[0, :-1].float().log_softmax(-1)
            log_q = reference(ids).logits[0, :-1].float().log_softmax(-1)
        answer = range(len(pair.prompt_ids) - 1, ids.shape[1] - 1)
        targets = ids[0, 1:]
        answer_kl = 0.0
        for t in answer:
            logp_sum += log_p[t, targets[t]].item()
            ref_logp_sum += log_q[t, targets[t]].item()
            answer_kl += sum(math.exp(a) * (a - b) for a, b in zip(log_p[t].tolist(), log_q[t].tolist(), strict=True))
            tokens += 1
        kl_sum += answer_kl
        per_answer.append(answer_kl)
    return {
        "perplexity/chosen": math.exp(-logp_sum / tokens),
        "ref_perplexity/chosen": math.exp(-ref_logp_sum / tokens),
        "kl/chosen_per_token": kl_sum / tokens,
        "kl/chosen_per_answer": sum(per_answer) / len(per_answer),
    }


def test_kl_and_perplexity_match_a_full_logits_computation(tiny_model, tokenizer, rows, monkeypatch):
    """One pass gives the drift on the chosen answers and both models' log-probs of every answer, the same
    as scoring each model on its own."""
    policy = ScorerView(SequenceScorer(AutoModelForCausalLM.from_pretrained(tiny_model(0))))
    reference = ScorerView(SequenceScorer(AutoModelForCausalLM.from_pretrained(tiny_model(1))))
    pairs = tokenize_hh(rows, tokenizer)
    scoring = PairScoring("prefix_shared", tokenizer.pad_token_id, torch.device("cpu"), 300)
    ours = score_with_drift(policy, reference, pairs, name="chosen", scoring=scoring)
    expected = full_logits_statistics(policy.scorer.model, reference.scorer.model, pairs)
    assert ours.statistics.keys() == expected.keys()
    for key, value in expected.items():
        assert ours.statistics[key] == pytest.approx(value, rel=1e-4), key
    for scores, scorer in ((ours.policy, policy), (ours.reference, reference)):
        alone = scoring.logps(scorer, pairs)
        for part in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
            torch.testing.assert_close(getattr(scores, part), getattr(alone, part), rtol=1e-5, atol=1e-4)
    # A run's smaller head chunk is honoured, with the same numbers.
    head_rows = []
    monkeypatch.setattr(drift, "chunk_logits",
                        lambda hidden, *a: head_rows.append(len(hidden)) or chunk_logits(hidden, *a))
    small = [ScorerView(SequenceScorer(view.scorer.model, chunk_size=3)) for view in (policy, reference)]
    in_small_chunks = score_with_drift(*small, pairs, name="chosen", scoring=scoring).statistics
    assert in_small_chunks == pytest.approx(ours.statistics, rel=1e-5)
    assert max(head_rows) == 3
    monkeypatch.undo()
    padded = PairScoring("padded", tokenizer.pad_token_id, torch.device("cpu"), 1024)
    same = score_with_drift(policy, policy, pairs, name="chosen", scoring=padded).statistics
    assert same["kl/chosen_per_token"] == pytest.approx(0.0, abs=1e-6)  # a model does not drift from itself


def generation_options(tokenizer, policy_model, prompts, *, batch_size: int, do_sample: bool = False) -> dict:
    """Settings of `generate_with_drift`. Tiny random models never say EOS: a token the policy says in its first
    answer stands for it, so that answers end at different lengths (right padding in the reference's pass)."""
    options = {"max_new_tokens": 7, "do_sample": do_sample, "temperature": 0.8, "top_p": 0.9, "seed": 0,
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "device": CPU,
               "batch_size": batch_size}
    options["eos_token_id"] = generate_answers(policy_model, prompts[:1], desc="policy", **options)[0][3]
    return options


def prompts_of(rows, tokenizer) -> list[list[int]]:
    prompts = [p.prompt_ids for p in tokenize_hh(rows, tokenizer)]
    assert len({len(p) for p in prompts}) > 1  # batches are left-padded
    return prompts


def spy_on_reference_passes(monkeypatch) -> list[tuple[bool, bool]]:
    """Per batch: did the reference's pass over the policy's answers run after a prompt cache, and were its
    inputs only the answers' positions?"""
    passes = []
    answer_hidden_states = drift.answer_hidden_states

    def spy(scorer, prompts, answers, prompt_cache, **kwargs):
        hidden = answer_hidden_states(scorer, prompts, answers, prompt_cache, **kwargs)
        passes.append((prompt_cache is not None, hidden.shape[1] == max(map(len, answers))))
        return hidden

    monkeypatch.setattr(drift, "answer_hidden_states", spy)
    return passes


@pytest.mark.parametrize(("reference_kind", "batch_size", "stacked_cache", "do_sample", "near_ties"), [
    pytest.param("model", 3, True, False, False, id="stacked-cache"),
    pytest.param("model", 3, False, False, False, id="no-stacked-cache"),
    pytest.param("model", 1, True, False, False, id="one-prompt-per-batch"),
    pytest.param("lora", 4, True, False, False, id="lora-base-reference"),
    pytest.param("model", 3, True, True, False, id="sampled"),
    pytest.param("model", 3, True, False, True, id="every-answer-again-alone"),
])
def test_drift_along_generated_answers_equals_scoring_them_afterwards(
        tokenizer, rows, monkeypatch, reference_kind, batch_size, stacked_cache, do_sample, near_ties):
    """Generation's own logits for the policy and the reference's prompt cache give the statistics that scoring
    the generated answers afterwards gives (the way eval measured them before), and the same answers as
    generating with each model alone: with a stacked prompt cache, without one (prompts left-padded in the
    reference's pass), one prompt per batch, a LoRA policy whose reference is its base model, sampled answers
    (the kept logits are the raw ones), and answers generated again alone after near-ties (their logits too)."""
    if reference_kind == "lora":
        torch.manual_seed(2)
        policy_model = get_peft_model(varied_llama(tokenizer, 1),
                                      LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        policy_model.eval()
        reference_model, reference_context = policy_model, policy_model.disable_adapter
    else:
        policy_model, reference_model = varied_llama(tokenizer, 0), varied_llama(tokenizer, 1)
        reference_context = contextlib.nullcontext
    policy = ScorerView(SequenceScorer(policy_model))
    reference = ScorerView(SequenceScorer(reference_model), reference_context)
    prompts = prompts_of(rows, tokenizer)
    options = generation_options(tokenizer, policy_model, prompts, batch_size=batch_size, do_sample=do_sample)
    if not stacked_cache:
        monkeypatch.setattr(generation, "stacked_prompt_cache", lambda *args, **kwargs: None)
    if near_ties:
        monkeypatch.setattr(generation, "NEAR_TIE", math.inf)
    reference_passes = spy_on_reference_passes(monkeypatch)
    redone = []
    monkeypatch.setattr(drift.GenerationLog, "report", lambda self: redone.append(self.redone))
    ours = generate_with_drift(policy, reference, prompts, **options)
    monkeypatch.undo()

    assert ours.policy_answers == generate_answers(policy_model, prompts, desc="policy", **options)
    assert ours.reference_answers == generate_answers(reference_model, prompts, context=reference_context,
                                                      desc="reference", **options)
    assert ours.policy_answers != ours.reference_answers
    assert len({len(answer) for answer in ours.policy_answers}) > 1
    generated = [TokenizedPair(i, p, a, None) for i, (p, a) in enumerate(zip(prompts, ours.policy_answers,
                                                                             strict=True))]
    scoring = PairScoring("prefix_shared", tokenizer.pad_token_id, CPU, 300)
    expected = score_with_drift(policy, reference, generated, name="generated", scoring=scoring).statistics
    assert ours.statistics.keys() == expected.keys()
    for key, value in expected.items():
        assert ours.statistics[key] == pytest.approx(value, rel=1e-4), key
    assert expected["kl/generated_per_token"] > 0.01  # the two models differ: the comparison has something to see
    # The reference reads only the policy's answers where its generation left a prompt cache.
    uses_cache = stacked_cache and batch_size > 1
    assert reference_passes == [(uses_cache, True)] * math.ceil(len(prompts) / batch_size)
    if near_ties:  # every answer of a batch was generated again alone, by both models
        assert redone == [len(prompts)] * 2


def test_a_model_does_not_drift_from_itself_along_its_answers(tokenizer, rows):
    model = varied_llama(tokenizer, 0)
    view = ScorerView(SequenceScorer(model))
    prompts = prompts_of(rows, tokenizer)
    statistics = generate_with_drift(view, view, prompts,
                                     **generation_options(tokenizer, model, prompts, batch_size=3)).statistics
    assert statistics["kl/generated_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert statistics["perplexity/generated"] == pytest.approx(statistics["ref_perplexity/generated"], rel=1e-5)


def test_kept_logits_bound_the_batch(tokenizer, rows, monkeypatch):
    """Where a batch's kept logits would exceed the budget, both models answer fewer prompts at a time."""
    policy_model, reference_model = varied_llama(tokenizer, 0), varied_llama(tokenizer, 1)
    prompts = prompts_of(rows, tokenizer)
    options = generation_options(tokenizer, policy_model, prompts, batch_size=4)
    per_prompt = options["max_new_tokens"] * policy_model.config.vocab_size * 4
    monkeypatch.setattr(drift, "KEPT_LOGITS_BYTES", 2 * per_prompt + 1)
    passes = spy_on_reference_passes(monkeypatch)
    generated = generate_with_drift(ScorerView(SequenceScorer(policy_model)),
                                    ScorerView(SequenceScorer(reference_model)), prompts, **options)
    assert len(passes) == 3  # 6 prompts, 2 at a time
    assert generated.policy_answers == generate_answers(policy_model, prompts, desc="policy", **options)


def test_eval_generates_side_by_side_and_measures_drift(tmp_path, tiny_model, tokenizer, rows):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "eval"
    main(["eval", "--model", str(tiny_model(0)), "--ref_model", str(tiny_model(1)), "--dataset", str(data),
          "--output_dir", str(out), "--generate", "2", "--max_new_tokens", "6"])
    summary = json.loads((out / "eval.json").read_text())
    for key in ("perplexity/chosen", "kl/chosen_per_token", "kl/generated_per_token", "perplexity/generated",
                "generation/policy_mean_tokens", "generation/reference_mean_tokens"):
        assert key in summary, key
    generations = read_jsonl(out / "generations.jsonl")
    assert [g["index"] for g in generations] == [0, 1]
    policy = AutoModelForCausalLM.from_pretrained(tiny_model(0))
    pairs = tokenize_hh(rows[:2], tokenizer)
    for row, pair in zip(generations, pairs, strict=True):
        assert row["prompt"][-1]["role"] == "user"  # the prompt as the dataset gave it
        ids = torch.tensor([pair.prompt_ids])
        greedy = policy.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        assert row["policy_tokens"] == len(greedy)
        assert row["policy"] == tokenizer.decode(greedy, skip_special_tokens=True).strip()
        assert row["reference_tokens"] > 0


def test_reference_free_eval_uses_mean_log_probs(tmp_path, tiny_model, rows):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    main(["eval", "--model", str(tiny_model(0)), "--dataset", str(data), "--output_dir", str(tmp_path / "e"),
          "--beta", "2"])
    summary = json.loads((tmp_path / "e" / "eval.json").read_text())
    pairs = read_jsonl(tmp_path / "e" / "eval_pairs.jsonl")
    margins = [2 * (p["logps_chosen"] / p["n_tokens_chosen"] - p["logps_rejected"] / p["n_tokens_rejected"])
               for p in pairs]
    assert summary["rewards/margins"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    assert summary["rewards/accuracies"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert "kl/chosen_per_token" not in summary  # no reference: no KL
    nll = -sum(p["logps_chosen"] for p in pairs) / sum(p["n_tokens_chosen"] for p in pairs)
    assert summary["perplexity/chosen"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_generate_rejects_a_negative_count(tmp_path, tiny_model, rows, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(tiny_model(0)), "--dataset", str(data), "--generate", "-1"])
    assert exit_info.value.code == 2
    assert "'generate' must be >= 0, not -1." in capsys.readouterr().err
