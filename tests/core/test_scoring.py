"""The token budget of a forward pass, checked on any machine: the activation estimate bounds what a forward
pass keeps, and the GPU budget follows free memory and model size."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from smolalign.core.scoring import (
    GPU_MAX_TOKENS_PER_FORWARD,
    GPU_MIN_TOKENS_PER_FORWARD,
    activation_bytes_per_token,
    default_max_tokens_per_forward,
)
from smolalign.models.attention import BLOCK_SPARSE

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def saved_activation_bytes(model, tokens: int, autocast: bool) -> int:
    """Bytes of the tensors a forward pass saves for backward (each storage once, weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), precision:
        model.model(input_ids=ids)
    return sum(saved.values())


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_activation_estimate_bounds_what_a_forward_pass_keeps(autocast):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(config)
    per_token = (saved_activation_bytes(model, 512, autocast) - saved_activation_bytes(model, 256, autocast)) / 256
    estimate = activation_bytes_per_token(config, half=autocast)
    assert per_token <= estimate <= 1.8 * per_token, (per_token, estimate)


def test_gpu_token_budget_follows_free_memory_and_model_size(monkeypatch):
    """A SmolLM2-135M-shaped model (random weights): the budget grows with free memory, shrinks with full
    fine-tuning's optimizer state and with dense SDPA masks, and stays within its bounds."""
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):  # sizes only: no memory
        model = LlamaForCausalLM(config)
    model.config._attn_implementation = BLOCK_SPARSE

    def budget(free_gb: float, **kwargs) -> int:
        settings = {"mixed_precision": "bf16", "max_length": 1024, **kwargs}
        return default_max_tokens_per_forward(model, CUDA, free_bytes=int(free_gb * 1e9), **settings)

    assert default_max_tokens_per_forward(model, CPU, mixed_precision="no", max_length=1024) == 256
    assert default_max_tokens_per_forward(model, CPU, mixed_precision="bf16", max_length=1024) == 1024
    assert GPU_MIN_TOKENS_PER_FORWARD < budget(16) < budget(24) < GPU_MAX_TOKENS_PER_FORWARD
    assert budget(1000) == GPU_MAX_TOKENS_PER_FORWARD and budget(2) == GPU_MIN_TOKENS_PER_FORWARD
    # 16 GB (a T4): 135M parameters need 12 bytes each of gradient and AdamW state plus a bf16 weight copy
    # (1.9 GB), the head's softmax 0.27 GB; about 1.3 MB of activations per token.
    per_token = activation_bytes_per_token(config, half=True)
    expected = 0.8 * (16e9 - 14 * 134.5e6 - 2**28) / per_token
    assert budget(16) == pytest.approx(expected, rel=0.01)
    assert budget(16, mixed_precision="no") < budget(16)  # float32 activations are larger
    model.requires_grad_(False)
    assert budget(16) > budget(16, mixed_precision="no")  # frozen (LoRA) base: no optimizer state
    model.requires_grad_(True)
    model.config._attn_implementation = "sdpa"  # the math kernel keeps attention probabilities
    assert budget(16) < budget(16, max_length=128)
    model.config._attn_implementation = BLOCK_SPARSE
    without_checkpointing = budget(8)
    model.gradient_checkpointing_enable()  # keeps each layer's input only
    assert budget(8) > 5 * without_checkpointing
    model.gradient_checkpointing_disable()

    # With no number given, the free memory is read from the driver and PyTorch's allocator.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(15e9), int(16e9)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(2e9))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: int(1e9))
    assert default_max_tokens_per_forward(model, CUDA, mixed_precision="bf16", max_length=1024) == budget(16)
