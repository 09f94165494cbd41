"""Useful FLOPs of a training job, counted the same way for every framework, and the machine's matmul peak
they are measured against (model FLOP utilisation = useful FLOPs / step time / peak)."""

from __future__ import annotations

import time

import torch

from smolalign.core.losses import OBJECTIVES
from smolalign.data.tokenize import TokenizedPair


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 3.0) -> float:
    """Best sustained FLOP/s of square matmuls of a few sizes on this machine (the MFU denominator), on
    random data (zeros multiply faster on some GPUs)."""
    if device.type == "cuda":
        return _cuda_matmul_peak_flops(dtype)
    best = 0.0
    for size in (1024, 2048, 4096):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b  # warm-up
        repeats, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            repeats += 1
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best


def _cuda_matmul_peak_flops(dtype: torch.dtype, repeats: int = 20) -> float:
    """Timed with CUDA events after a warm-up, sizes large enough to fill an H100-class GPU."""
    best = 0.0
    for size in (4096, 8192):
        a = torch.randn(size, size, device="cuda", dtype=dtype)
        b = torch.randn(size, size, device="cuda", dtype=dtype)
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        end.synchronize()
        best = max(best, 2 * size**3 * repeats / (start.elapsed_time(end) / 1e3))
    del a, b
    torch.cuda.empty_cache()
    return best


def forward_flops(config, pair: TokenizedPair, *, shared_prompt: bool, scored_prompt: bool) -> float:
    """Useful FLOPs of one forward pass over a pair: the prompt once (shared) or once per answer."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", heads)
    weights = layers * (2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
                        + 3 * hidden * config.intermediate_size)
    per_token = 2 * weights
    attention_per_key = layers * 4 * heads * head_dim  # QK^T and attention @ V

    def causal(start: int, count: int) -> float:  # tokens at positions start..start+count-1 see pos+1 keys
        return attention_per_key * (count * start + count * (count + 1) / 2)

    prompt, answers = len(pair.prompt_ids), [len(a) for a in pair.answers]
    copies = 1 if shared_prompt else len(answers)
    tokens = prompt * copies + sum(answers)
    attention = copies * causal(0, prompt) + sum(causal(prompt, a) for a in answers)
    head = 2 * hidden * config.vocab_size * (sum(answers) + (prompt - 1 if scored_prompt else 0))
    return per_token * tokens + attention + head


def training_flops(config, pairs: list[TokenizedPair], *, algorithm: str, framework: str, lora: bool = False) -> float:
    """Useful FLOPs of the training steps, counted the same way for every framework (each prompt once):
    policy forward + backward (twice the forward for full fine-tuning, once under LoRA: input gradients
    only), plus the reference forward where it runs inside the steps (TRL's; smolalign precomputes the
    reference before the first step, for full fine-tuning and LoRA alike)."""
    objective = OBJECTIVES[algorithm]
    passes = 2 if lora else 3
    reference_in_steps = objective.needs_reference and framework != "smolalign"
    total = 0.0
    for pair in pairs:
        total += passes * forward_flops(config, pair, shared_prompt=True, scored_prompt=objective.needs_prompt_logps)
        if reference_in_steps:
            total += forward_flops(config, pair, shared_prompt=True, scored_prompt=False)
    return total
