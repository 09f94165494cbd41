"""Batched generation for `smolalign eval --generate`: the same answers as one prompt at a time, each row stopping
at its own EOS, reproducible sampling, and the LoRA reference (adapters disabled) through the same path."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_jsonl, tiny_llama_config, tokenize_hh, varied_llama, write_jsonl
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from smolalign.cli import main
from smolalign.evaluation.generation import PreallocatedLayer, generate_answers, gumbel_scores

MAX_NEW_TOKENS = 12
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prompts(hh_rows, tokenizer) -> list[list[int]]:
    """Seven real prompts of seven different lengths (37 to 50 tokens): every batch is left-padded."""
    pairs = tokenize_hh(hh_rows[60:67], tokenizer)
    prompts = [pair.prompt_ids for pair in pairs]
    assert len({len(p) for p in prompts}) == len(prompts)
    return prompts


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    """A tied tiny Llama whose greedy answers depend on the whole prompt."""
    return varied_llama(tokenizer, 0, max_position_embeddings=2048, tie_word_embeddings=True)


def one_at_a_time(model, prompts, *, eos_token_id, pad_token_id, max_new_tokens=MAX_NEW_TOKENS):
    """Greedy answers the way `smolalign eval` generated them before batching: one prompt per `generate` call."""
    answers = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        answers.append(output[0, len(prompt):].tolist())
    return answers


def batched(model, prompts, *, batch_size, eos_token_id, pad_token_id, do_sample=False, seed=0, temperature=1.0,
            top_p=1.0, context=None):
    return generate_answers(
        model, prompts, max_new_tokens=MAX_NEW_TOKENS, do_sample=do_sample, temperature=temperature, top_p=top_p,
        seed=seed, eos_token_id=eos_token_id, pad_token_id=pad_token_id, device=CPU, desc="generating",
        batch_size=batch_size, **({"context": context} if context else {}),
    )


def count_generate_calls(model, monkeypatch) -> list[int]:
    """Rows of every `model.generate` call made from now on."""
    rows: list[int] = []
    generate = model.generate

    def counting(*args, **kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting, raising=False)
    return rows


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_greedy_answers_equal_one_at_a_time(model, tokenizer, prompts, monkeypatch, batch_size):
    expected = one_at_a_time(model, prompts, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert len({tuple(answer) for answer in expected}) == len(prompts)  # the answers tell the prompts apart
    calls = count_generate_calls(model, monkeypatch)
    answers = batched(model, prompts, batch_size=batch_size, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    assert answers == expected
    # Batches of batch_size rows (3, 3, 1 for size 3); no answer needed a second, one-row pass here.
    assert calls == [min(batch_size, len(prompts) - start) for start in range(0, len(prompts), batch_size)]


def test_without_preallocated_caches_batches_give_the_same_answers(model, tokenizer, prompts, monkeypatch):
    """The fallback where transformers' DynamicLayer changed under PreallocatedLayer: generate's own cache."""
    from smolalign.evaluation import generation

    expected = one_at_a_time(model, prompts, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    monkeypatch.setattr(generation, "preallocation_works", lambda: False)
    assert generation.stacked_prompt_cache(model, prompts[:2], capacity=80, device=CPU) is None
    answers = batched(model, prompts, batch_size=4, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    assert answers == expected


def test_preallocated_layers_are_checked_once_against_this_transformers():
    from smolalign.evaluation.generation import preallocation_works

    assert preallocation_works() is True


def test_each_row_stops_at_its_own_eos(model, tokenizer, prompts):
    """Stand-in EOS tokens taken from the answers: one row stops early while the others in its batch go on, and
    its answer ends with that EOS, not with the padding that followed it."""
    usual = one_at_a_time(model, prompts, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    for row, position in [(0, 3), (4, 7)]:
        eos = usual[row][position]
        assert eos != tokenizer.pad_token_id
        expected = one_at_a_time(model, prompts, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        assert len(expected[row]) == position + 1 and expected[row][-1] == eos
        assert sum(len(answer) == MAX_NEW_TOKENS for answer in expected) >= 4  # others went on to the end
        answers = batched(model, prompts, batch_size=16, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        assert answers == expected


def test_a_near_tied_answer_is_generated_again_alone(tokenizer, prompts, monkeypatch):
    """With an all-zero output head every choice is a tie: each answer of a batch is generated again alone."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    expected = one_at_a_time(model, prompts[:3], eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    calls = count_generate_calls(model, monkeypatch)
    answers = batched(model, prompts[:3], batch_size=3, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    assert answers == expected
    assert calls == [3, 1, 1, 1]


def test_the_prompt_cache_grows_in_place_as_a_dynamic_cache_would():
    """Two prompts' states (3 and 5 positions), left-padded to 5 in buffers with room for 7: each decoding step
    writes its position in place, and the states read back are those of plain concatenation, also after the
    buffers are outgrown."""
    torch.manual_seed(0)
    keys = [torch.randn(1, 2, length, 4) for length in (3, 5)]
    values = [torch.randn(1, 2, length, 4) for length in (3, 5)]
    layer = PreallocatedLayer(keys, values, width=5, capacity=7)
    expected_keys = torch.cat([torch.nn.functional.pad(k, (0, 0, 5 - k.shape[-2], 0)) for k in keys])
    expected_values = torch.cat([torch.nn.functional.pad(v, (0, 0, 5 - v.shape[-2], 0)) for v in values])
    buffer = layer.key_buffer.data_ptr()
    for step in range(4):
        new_keys, new_values = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
        expected_keys, expected_values = torch.cat([expected_keys, new_keys], 2), torch.cat([expected_values, new_values], 2)
        got_keys, got_values = layer.update(new_keys, new_values)
        assert torch.equal(got_keys, expected_keys) and torch.equal(got_values, expected_values)
        assert layer.get_seq_length() == 6 + step
        assert (got_keys.data_ptr() == buffer) == (step < 2)  # in place until the 7 positions are full


def test_sampling_is_reproducible_by_seed_whatever_the_batch_size(model, tokenizer, prompts):
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    sampled = batched(model, prompts, batch_size=3, do_sample=True, seed=5, temperature=0.8, top_p=0.9, **ids)
    assert sampled == batched(model, prompts, batch_size=3, do_sample=True, seed=5, temperature=0.8, top_p=0.9, **ids)
    assert sampled == batched(model, prompts, batch_size=1, do_sample=True, seed=5, temperature=0.8, top_p=0.9, **ids)
    other_seed = batched(model, prompts, batch_size=3, do_sample=True, seed=6, temperature=0.8, top_p=0.9, **ids)
    assert all(a != b for a, b in zip(sampled, other_seed, strict=True))
    greedy = one_at_a_time(model, prompts, **ids)
    assert all(a != b for a, b in zip(sampled, greedy, strict=True))


@pytest.mark.parametrize(("temperature", "top_p"), [(1.5, 1.0), (0.7, 0.8)])
def test_gumbel_scores_draw_from_the_tempered_nucleus(temperature, top_p):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    probabilities = (logits / temperature).softmax(-1)  # sorted already, as the logits are
    in_nucleus = probabilities.cumsum(-1) - probabilities < top_p
    expected = torch.where(in_nucleus, probabilities, 0.0)
    expected /= expected.sum()
    draws = 40_000
    uniform = torch.rand(draws, len(logits), generator=torch.Generator().manual_seed(0))
    scores, _ = gumbel_scores(logits.expand(draws, -1), -(-uniform.log()).log(), temperature=temperature, top_p=top_p)
    frequencies = scores.argmax(-1).bincount(minlength=len(logits)) / draws
    assert frequencies.tolist() == pytest.approx(expected.tolist(), abs=0.01)  # 4 standard errors
    assert (frequencies[~in_nucleus] == 0).all()


def test_the_nucleus_edge_counts_as_a_near_tie():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()  # the first two tokens hold exactly 0.8
    _, at_the_edge = gumbel_scores(logits, torch.zeros_like(logits), temperature=1.0, top_p=0.8)
    _, clear = gumbel_scores(logits, torch.zeros_like(logits), temperature=1.0, top_p=0.65)
    assert at_the_edge.item() < 1e-6
    assert clear.item() == pytest.approx(0.15 / 2, abs=1e-6)


def test_lora_policy_and_reference_answers_come_from_the_batched_path(tokenizer, prompts):
    base = varied_llama(tokenizer, 1)
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    base_answers = one_at_a_time(base, prompts, **ids)
    torch.manual_seed(2)
    policy = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    policy.eval()
    policy_answers = one_at_a_time(policy, prompts, **ids)
    assert policy_answers != base_answers  # the adapter matters
    assert batched(policy, prompts, batch_size=4, **ids) == policy_answers
    assert batched(policy, prompts, batch_size=4, context=policy.disable_adapter, **ids) == base_answers


def test_eval_writes_batched_generations_and_their_speed(tmp_path, tiny_model, tokenizer, hh_rows, capsys):
    rows = hh_rows[60:66]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "eval"
    main(["eval", "--model", str(tiny_model(0)), "--ref_model", str(tiny_model(1)), "--dataset", str(data),
          "--output_dir", str(out), "--generate", "4", "--generation_batch_size", "3", "--max_new_tokens", "5"])
    err = capsys.readouterr().err
    generations = read_jsonl(out / "generations.jsonl")
    assert [g["index"] for g in generations] == [0, 1, 2, 3]
    pairs = tokenize_hh(rows[:4], tokenizer)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model(0))
    expected = one_at_a_time(policy, [p.prompt_ids for p in pairs], eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, max_new_tokens=5)
    for row, answer in zip(generations, expected, strict=True):
        assert row["policy_tokens"] == len(answer)
        assert row["policy"] == tokenizer.decode(answer, skip_special_tokens=True).strip()
    summary = json.loads((out / "eval.json").read_text())
    policy_tokens = sum(g["policy_tokens"] for g in generations)
    assert summary["generation/policy_mean_tokens"] == policy_tokens / 4
    assert f"generating (policy): 4 answers, {policy_tokens} new tokens in " in err
    assert "generating (reference): 4 answers, " in err and "tokens/s)" in err
