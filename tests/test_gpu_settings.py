"""What smolalign decides for a GPU, checked on any machine: the attention kernel, float32 trainable
weights over a half-precision base, and the derived token budget of a forward pass."""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers.integrations.flex_attention
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from smolalign.core.scoring import (
    GPU_MAX_TOKENS_PER_FORWARD,
    GPU_MIN_TOKENS_PER_FORWARD,
    activation_bytes_per_token,
    default_max_tokens_per_forward,
)
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

