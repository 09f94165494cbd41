"""PairRunner, the forward and backward pass of a batch: forward passes in chunks and gradient checkpointing
change no number of the whole batch's loss, metrics or gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from smolalign.core.logprobs import SequenceScorer
from smolalign.core.losses import OBJECTIVES, LossSettings
from smolalign.core.reference import model_reference
from smolalign.core.scoring import PairScoring
from smolalign.models.loading import base_model_of
from smolalign.training.step import PairRunner


def run_once(model, reference_model, pairs, algorithm, max_tokens, pad_token_id):
    objective = OBJECTIVES[algorithm]
    reference = model_reference(reference_model, 16) if objective.needs_reference else None
    runner = PairRunner(SequenceScorer(model, 16), reference, objective, LossSettings(beta=0.3, rpo_alpha=0.1),
                        PairScoring("prefix_shared", pad_token_id, torch.device("cpu"), max_tokens))
    model.zero_grad()
    result = runner.run(pairs, backward=lambda loss: loss.backward())
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("algorithm", ["dpo", "orpo", "simpo"])
def test_chunked_forward_passes_give_the_whole_batch_numbers(tiny_model, tokenizer, tokenized_pairs, algorithm):
    model = AutoModelForCausalLM.from_pretrained(tiny_model(0))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model(1))
    whole, whole_grads = run_once(model, reference, tokenized_pairs, algorithm, 10**6, tokenizer.pad_token_id)
    chunked, chunked_grads = run_once(model, reference, tokenized_pairs, algorithm, 1, tokenizer.pad_token_id)  # 1 pair each
    assert torch.allclose(chunked.output.loss, whole.output.loss, atol=1e-5)
    for name, value in whole.output.metrics.items():
        assert torch.allclose(chunked.output.metrics[name], value, atol=1e-5), name
    for name, grad in whole_grads.items():
        assert torch.allclose(chunked_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_gradient_checkpointing_changes_no_number(tiny_model, tokenizer, tokenized_pairs):
    model = AutoModelForCausalLM.from_pretrained(tiny_model(0))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model(1))
    plain, plain_grads = run_once(model, reference, tokenized_pairs, "dpo", 10**6, tokenizer.pad_token_id)
    base_model_of(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    checkpointed, checkpointed_grads = run_once(model, reference, tokenized_pairs, "dpo", 10**6, tokenizer.pad_token_id)
    assert torch.allclose(checkpointed.output.loss, plain.output.loss, atol=1e-6)
    for name, grad in plain_grads.items():
        assert torch.allclose(checkpointed_grads[name], grad, atol=1e-6), name
