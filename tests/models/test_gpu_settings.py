"""What smolalign decides for a GPU, checked on any machine: the attention kernel, and float32 trainable
weights over a half-precision base."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.flex_attention
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from smolalign.errors import UserError
from smolalign.models.attention import BLOCK_SPARSE, resolve_attention
from smolalign.models.loading import add_lora

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
LORA = type("Lora", (), {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"})()


def test_attention_is_flex_on_cuda_and_sdpa_on_the_cpu():
    assert resolve_attention("auto", CUDA) == BLOCK_SPARSE
    assert resolve_attention("flex_attention", CUDA) == BLOCK_SPARSE
    assert resolve_attention("auto", CPU) is None  # transformers' default: SDPA
    assert resolve_attention("sdpa", CUDA) == "sdpa" and resolve_attention("eager", CPU) == "eager"
    with pytest.raises(UserError, match="no backward"):
        resolve_attention("flex_attention", CPU)
    with pytest.raises(UserError, match="one of"):
        resolve_attention("flash", CUDA)


def test_block_sparse_attention_keeps_sdpa_for_generation(tiny_model, monkeypatch):
    """Generation and the padded layout never see a BlockMask: under block_sparse they run SDPA and give SDPA's tokens."""

    def no_flex(*args, **kwargs):
        raise AssertionError("FlexAttention ran without a BlockMask")

    monkeypatch.setattr(transformers.integrations.flex_attention, "flex_attention_forward", no_flex)
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model(0))
    block_sparse = AutoModelForCausalLM.from_pretrained(tiny_model(0), attn_implementation=BLOCK_SPARSE)
    assert block_sparse.config._attn_implementation == BLOCK_SPARSE
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    kwargs = {"max_new_tokens": 8, "do_sample": False, "attention_mask": torch.ones_like(prompt)}
    assert torch.equal(block_sparse.generate(prompt, **kwargs), sdpa.generate(prompt, **kwargs))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_lora_trains_float32_weights_over_a_half_precision_base(tiny_model, half):
    for model in (AutoModelForCausalLM.from_pretrained(tiny_model(0), dtype=half),
                  AutoModelForSequenceClassification.from_pretrained(tiny_model(0), dtype=half, num_labels=1)):
        model = add_lora(model, LORA)
        trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        assert trainable and set(trainable.values()) == {torch.float32}, trainable
        assert frozen == {half}
    assert any("score" in name for name in trainable)  # the reward model's trained head copy too
