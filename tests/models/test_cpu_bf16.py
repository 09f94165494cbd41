"""bf16 on CPUs that multiply it natively (AMX, AVX512-BF16): the policy's decisions, and training and inference
under it. These run on any CPU (emulated bf16 is slow but computes the same numbers)."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, tokenize_hh, varied_llama, write_jsonl
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from smolalign.config.train import load_config
from smolalign.core import reference
from smolalign.core.layouts import build_batch
from smolalign.core.logprobs import SequenceScorer, score_batch, token_logprobs
from smolalign.models import precision
from smolalign.models.precision import resolve_dtype, resolve_precision
from smolalign.training import setup
from smolalign.training.loop import run_training

CPU = torch.device("cpu")


def test_cpu_precision_follows_the_hardware(native_bf16_cpu):
    native_bf16_cpu(True)
    assert resolve_precision("auto", CPU, lora=False) == (torch.float32, "bf16")  # float32 master weights
    assert resolve_precision("auto", CPU, lora=True) == (torch.bfloat16, "bf16")  # frozen base in bf16
    assert resolve_precision("float32", CPU, lora=False) == (torch.float32, "no")  # always off
    assert resolve_dtype("auto", CPU) == torch.float32  # inference stays float32: batched answers stay exact
    native_bf16_cpu(False)
    assert resolve_precision("auto", CPU, lora=True) == (torch.float32, "no")
    assert resolve_precision("bfloat16", CPU, lora=False) == (torch.float32, "bf16")  # asked for: autocast anyway
    assert resolve_dtype("auto", CPU) == torch.float32


def test_the_cpu_features_come_from_pytorchs_cpuinfo(monkeypatch):
    reported = {"avx2": True, "avx512_bf16": True, "amx_bf16": False, "sve_max_length": 256, "cpu_name": "x"}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: reported)
    assert precision.cpu_bf16_features() == {"avx512_bf16"}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"neon": True, "bf16": True, "sve_bf16": False})
    assert precision.cpu_bf16_features() == {"bf16"}  # ARM64 (Graviton 3 and later)
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # an older PyTorch: nothing known, float32
    assert precision.cpu_bf16_features() == set()


def test_the_cpu_features_agree_with_linux(monkeypatch):
    """On an x86 Linux machine, the features PyTorch reports are the kernel's /proc/cpuinfo flags."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not cpuinfo.is_file():
        pytest.skip("compares with the flags of x86 Linux's /proc/cpuinfo")
    flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split(":")[1].split()
    assert precision.cpu_bf16_features() == {"amx_bf16", "avx512_bf16"} & set(flags)


def test_the_probe_reads_the_features_times_a_matmul_and_remembers(monkeypatch, tmp_path):
    monkeypatch.delenv(precision.CPU_BF16_OVERRIDE)
    monkeypatch.setattr(precision, "cache_root", lambda: tmp_path)
    timed = []
    monkeypatch.setattr(precision, "bf16_speedup", lambda: timed.append(1) or 2.5)
    for features, expected in [(set(), False), ({"avx512_bf16"}, True)]:
        monkeypatch.setattr(precision, "cpu_bf16_features", lambda features=features: features)
        precision.cpu_native_bf16.cache_clear()
        assert precision.cpu_native_bf16() is expected
    assert timed == [1]  # without the features nothing is timed
    precision.cpu_native_bf16.cache_clear()
    assert precision.cpu_native_bf16() is True and timed == [1]  # the machine's answer is kept on disk
    assert list(json.loads((tmp_path / "cpu-bf16.json").read_text()).values()) == [True]
    monkeypatch.setattr(precision, "cache_root", lambda: tmp_path / "other")
    monkeypatch.setattr(precision, "bf16_speedup", lambda: 0.4)  # emulated: slower than float32
    precision.cpu_native_bf16.cache_clear()
    assert precision.cpu_native_bf16() is False
    precision.cpu_native_bf16.cache_clear()


def test_autocast_log_probs_stay_close_to_float32(tokenizer, hh_rows):
    """bf16 matmuls, float32 log-softmax and sums: each answer's summed log-prob within 2% of float32's."""
    model = varied_llama(tokenizer, 0, max_position_embeddings=2048)
    pairs = tokenize_hh(hh_rows[500:504], tokenizer)
    batch = build_batch(pairs, "prefix_shared", pad_token_id=tokenizer.pad_token_id)
    scorer = SequenceScorer(model, 64)
    with torch.no_grad():
        exact = score_batch(scorer, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = score_batch(scorer, batch)
    assert half.chosen.dtype == torch.float32  # the sums stay float32
    for name in ("chosen", "rejected"):
        torch.testing.assert_close(getattr(half, name), getattr(exact, name), rtol=2e-2, atol=0.0)


class MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matrix product run inside it."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.dtype, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


def test_the_output_head_backward_multiplies_in_bf16_within_a_percent_of_float32():
    """Under autocast the head's products run in bf16 in the backward pass too, as an autocast linear layer's
    would; its gradients stay float32 and within 1% of float32's."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4000, 64) * 0.2)
    hidden = torch.randn(300, 64, requires_grad=True)
    targets = torch.randint(0, 4000, (300,))

    def gradients(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logprobs, _ = token_logprobs(hidden, weight, None, targets, 64)
        products = MatmulDtypes()
        with products:
            logprobs.sum().backward()
        grads = weight.grad, hidden.grad
        weight.grad = hidden.grad = None
        return grads, products.seen

    (weight_exact, hidden_exact), exact_products = gradients(False)
    (weight_half, hidden_half), half_products = gradients(True)
    assert exact_products and all(dtype == torch.float32 for dtypes in exact_products for dtype in dtypes)
    assert half_products and all(dtype == torch.bfloat16 for dtypes in half_products for dtype in dtypes)
    assert weight_half.dtype == hidden_half.dtype == torch.float32
    for half, exact in ((weight_half, weight_exact), (hidden_half, hidden_exact)):
        assert (half - exact).norm() / exact.norm() < 1e-2


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_training_under_bf16_autocast_starts_at_log_two_and_saves_float32_weights(tmp_path, tokenizer, hh_rows,
                                                                                   native_bf16_cpu, monkeypatch, lora):
    native_bf16_cpu(True)
    monkeypatch.setenv("SMOLALIGN_REFERENCE_CACHE", str(tmp_path / "cache"))  # the reference pass runs here
    folder = tmp_path / "model"
    varied_llama(tokenizer, 0, max_position_embeddings=2048).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Pairs of 180 to 480 tokens, 2 per step: under bf16 a long pair's log-probs move with the rows padded beside
    # it (by 1e-3 of the loss here), so the reference must be scored in the chunks of the steps.
    data = write_jsonl(tmp_path / "pairs.jsonl", hh_rows[701::150][:6])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", hh_rows[300:302])
    settings = {"model": str(folder), "dataset": str(data), "eval_dataset": str(held_out), "max_steps": 2,
                "logging_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "max_length": 512,
                "output_dir": str(tmp_path / "run"), "lora": {"r": 4, "lora_alpha": 8} if lora else None}
    hashes = []
    for module in (reference, setup):  # wherever the weights may be hashed
        monkeypatch.setattr(module, "weights_key", lambda model: hashes.append(model) or "same-weights")
    final = run_training(load_config(None, settings))
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    # the reference ran in the policy's precision (its cache is keyed by it) and chunks: step 1 is log 2 exactly
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    # full fine-tuning scores held-out pairs in float32, against a reference of that precision (LoRA's bf16 base
    # weights in the training precision); the weights are hashed once
    precisions = ["autocast-bfloat16"] if lora else ["autocast-bfloat16", "no-autocast"]
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors"))
    assert cached == [f"same-weights-{name}.safetensors" for name in precisions]
    assert len(hashes) == 1
    if lora:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(final)
        adapters = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert adapters and all(p.dtype == torch.float32 for p in adapters) and any(p.abs().sum() > 0 for p in adapters)
    else:
        model = AutoModelForCausalLM.from_pretrained(final)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # float32 master weights, saved as such
