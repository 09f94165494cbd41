"""On a CUDA GPU: TRL's numbers in float32, FlexAttention layouts in bf16, whole runs saved and reloaded,
the fp16 path of older cards, and the activation memory the token budget assumes.

Skipped where no GPU is present; `scripts/gpu_check.sh` runs them on one. The device-agnostic tests
elsewhere (every layout against padded, gradients included) also run on CUDA through the `device`
fixture, where the packed and prefix-shared layouts use FlexAttention.
"""

from __future__ import annotations

import math

import accelerate.accelerator
import pytest
import torch
from conftest import read_jsonl, tokenize_hh, write_jsonl
from core.test_trl_parity import (  # noqa: F401 (its fixtures, reused here)
    SCHEDULE,
    TRL_ONLY,
    assert_same_numbers,
    bos_eos_string_pairs,
    conversational_pairs,
    run_smolalign,
)
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from smolalign.config.choices import LAYOUTS
from smolalign.config.train import load_config
from smolalign.core.layouts import block_tokens, build_batch
from smolalign.core.logprobs import SequenceScorer, score_batch
from smolalign.core.scoring import activation_bytes_per_token, default_max_tokens_per_forward
from smolalign.models.attention import BLOCK_SPARSE
from smolalign.models.loading import load_for_scoring
from smolalign.training.loop import run_training

pytestmark = pytest.mark.cuda

FLOAT32_ON_CUDA = {"device": "cuda", "dtype": "float32"}


@pytest.fixture(scope="module")
def pairs(hh_rows, tokenizer):
    return tokenize_hh(hh_rows[500:508], tokenizer)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, hh_rows):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", hh_rows[:24])


def run_trl_on_cuda(tmp_path, trainer_class, config_class, data_rows, policy, reference=None, **settings):
    extra = {"ref_model": AutoModelForCausalLM.from_pretrained(reference)} if reference else {}
    trainer = trainer_class(
        model=AutoModelForCausalLM.from_pretrained(policy),
        args=config_class(output_dir=str(tmp_path / "trl"), **settings, **SCHEDULE, **{**TRL_ONLY, "use_cpu": False}),
        train_dataset=Dataset.from_list(data_rows),
        processing_class=AutoTokenizer.from_pretrained(policy),
        **extra,
    )
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_dpo_matches_trl_on_cuda_in_float32(tmp_path, cuda_device, tiny_model, conversational_pairs):  # noqa: F811
    from trl import DPOConfig, DPOTrainer

    policy, reference = tiny_model(0), tiny_model(1)
    ours = run_smolalign(tmp_path, conversational_pairs, model=str(policy), ref_model=str(reference), beta=0.5,
                         **FLOAT32_ON_CUDA)
    theirs = run_trl_on_cuda(tmp_path, DPOTrainer, DPOConfig, conversational_pairs, policy, reference, beta=0.5)
    assert_same_numbers(ours, theirs)


def test_orpo_matches_trl_on_cuda_in_float32(tmp_path, cuda_device, tiny_model, bos_eos_string_pairs):  # noqa: F811
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy = tiny_model(0)
    ours = run_smolalign(tmp_path, bos_eos_string_pairs, model=str(policy), algorithm="orpo", beta=0.25,
                         **FLOAT32_ON_CUDA)
    theirs = run_trl_on_cuda(tmp_path, ORPOTrainer, ORPOConfig, bos_eos_string_pairs, policy, beta=0.25)
    assert_same_numbers(ours, theirs)


def test_every_layout_matches_padded_in_bf16(cuda_device, tiny_model, tokenizer, pairs):
    """Under bf16 autocast each layout may differ from padded by no more than twice bf16's own error
    (padded bf16 against padded float32): the layouts change the arithmetic's order, not the math."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model(0), attn_implementation=BLOCK_SPARSE).to(cuda_device)
    scorer = SequenceScorer(model, 64)

    def logps(layout: str, autocast: bool) -> torch.Tensor:
        batch = build_batch(pairs, layout, pad_token_id=tokenizer.pad_token_id, score_prompt=True).to(cuda_device)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            values = score_batch(scorer, batch)
        if layout != "padded":
            assert "flex" in batch.attention_mask._built  # FlexAttention ran
        return torch.stack([values.chosen, values.rejected, values.prompt])

    float32 = logps("padded", autocast=False)
    padded = logps("padded", autocast=True)
    bf16_error = (padded - float32).abs().max()
    assert 0 < bf16_error < 0.05 * float32.abs().max()
    for layout in LAYOUTS[1:]:
        assert (logps(layout, autocast=True) - padded).abs().max() <= 2 * bf16_error + 1e-3, layout
        assert torch.allclose(logps(layout, autocast=False), float32, atol=1e-4, rtol=0), layout


def initial_logps(folder, tokenizer, pairs, device, dtype=torch.float32) -> torch.Tensor:
    model = load_for_scoring(str(folder), dtype=dtype, device=device, tokenizer=tokenizer)
    batch = build_batch(pairs, "prefix_shared", pad_token_id=tokenizer.pad_token_id).to(device)
    with torch.no_grad():
        values = score_batch(SequenceScorer(model, 64), batch)
    return torch.stack([values.chosen, values.rejected])


@pytest.mark.parametrize("lora", [None, {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}], ids=["full", "lora"])
@pytest.mark.parametrize("dtype", ["auto", "float16"], ids=["native-precision", "fp16-with-scaler"])
def test_a_run_on_cuda_saves_a_model_that_reloads(tmp_path, cuda_device, tiny_model, tokenizer, pairs_file, pairs,
                                                  monkeypatch, lora, dtype):
    """bf16 where the GPU has it (auto), and the older cards' fp16 with Accelerate's gradient scaler (forced)."""
    scalers = []
    make_scaler = accelerate.accelerator.get_grad_scaler
    monkeypatch.setattr(accelerate.accelerator, "get_grad_scaler",
                        lambda *args, **kwargs: scalers.append(make_scaler(*args, **kwargs)) or scalers[-1])
    policy = tiny_model(0)
    config = load_config(None, {"model": str(policy), "dataset": str(pairs_file), "max_steps": 3,
                                "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                                "device": "cuda", "dtype": dtype, "lora": lora, "output_dir": str(tmp_path / "run")})
    final = run_training(config)
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    half = dtype == "float16" or not torch.cuda.is_bf16_supported(including_emulation=False)
    assert len(scalers) == (1 if half else 0)
    if lora:
        assert (final / "adapter_config.json").exists()
    else:  # float32 master weights are what is saved
        saved = AutoModelForCausalLM.from_pretrained(final, dtype="auto")
        assert saved.dtype == torch.float32
    before = initial_logps(policy, tokenizer, pairs, cuda_device)
    after = initial_logps(final, tokenizer, pairs, cuda_device)
    assert torch.isfinite(after).all() and not torch.allclose(after, before, atol=1e-3)


def test_activation_memory_stays_within_the_token_budget_estimate(cuda_device, tokenizer, pairs):
    """A SmolLM2-135M-shaped model under bf16 autocast with FlexAttention: the memory a forward pass
    keeps for its backward pass, per token, is at most `activation_bytes_per_token`."""
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(cuda_device):
        model = LlamaForCausalLM(config)
    model.config._attn_implementation = BLOCK_SPARSE
    scorer = SequenceScorer(model, 256)
    many = pairs * 4
    batch = build_batch(many, "prefix_shared", pad_token_id=tokenizer.pad_token_id).to(cuda_device)
    tokens = sum(block_tokens(p) for p in many)

    def step() -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = score_batch(scorer, batch).chosen.sum()
        loss.backward()
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated() - start

    step()  # compiles FlexAttention's kernels, allocates the gradients once
    gradients_and_activations = step()
    gradients = 4 * sum(p.numel() for p in model.parameters())
    per_token = (gradients_and_activations - gradients) / tokens
    estimate = activation_bytes_per_token(config, half=True)
    print(f"measured {per_token / 1e3:.0f} kB per token, estimated {estimate / 1e3:.0f} kB ({tokens} tokens)")
    assert 0.2 * estimate < per_token <= estimate
    budget = default_max_tokens_per_forward(model, cuda_device, mixed_precision="bf16", max_length=1024)
    free, _ = torch.cuda.mem_get_info()
    assert 1024 <= budget <= 32768 and budget * per_token < free
