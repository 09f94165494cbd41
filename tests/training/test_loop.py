"""Tiny-model runs of the whole training path: artifacts, round trips, resume, accumulation invariance."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from smolalign.cli import main
from smolalign.config.train import load_config
from smolalign.core.layouts import block_tokens
from smolalign.data.prepare import prepare_data
from smolalign.errors import UserError
from smolalign.training.loop import run_training
from smolalign.training.plan import StepPlan
from smolalign.training.step import PairRunner

TRL_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected")
RUN_NAMES = ("step", "epoch", "learning_rate", "grad_norm", "tokens_per_second")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, hh_rows):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", hh_rows[:24])


def run(tmp_path, name, **settings):
    defaults = {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                "max_length": 256}
    config = load_config(None, {**defaults, **settings, "output_dir": str(tmp_path / name)})
    return run_training(config), tmp_path / name


def run_with_stacks_on_timeout(command: list[str], *, timeout: float, env: dict[str, str]) -> tuple[int, str]:
    """Run a launcher; if it outlives `timeout`, fail with the Python stacks of its workers (faulthandler prints
    them on SIGABRT), which say where a process hung."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**env, "PYTHONFAULTHANDLER": "1"})
    try:
        stderr = process.communicate(timeout=timeout)[1]
        return process.returncode, stderr
    except subprocess.TimeoutExpired:
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        for pid in children.read_text().split() if children.exists() else []:
            os.kill(int(pid), signal.SIGABRT)
        try:
            stderr = process.communicate(timeout=30)[1]
        finally:
            process.kill()
        stacks = re.findall(r"Fatal Python error.*?(?=\nExtension modules|\Z)", stderr, flags=re.DOTALL)
        pytest.fail(f"{command[2]} ran past {timeout} s; the workers' stacks:\n" + "\n".join(stacks)[-8000:])


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def generate(model, tokenizer) -> list[int]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    return output[0, prompt["input_ids"].shape[1]:].tolist()


def test_full_dpo_run_writes_a_complete_run_folder(tmp_path, tiny_model, pairs_file):
    policy = tiny_model(0)
    folder = tmp_path / "dpo"
    main(["train", "--model", str(policy), "--dataset", str(pairs_file), "--test_split_size", "4", "--eval_steps", "2",
          "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
          "--max_length", "256", "--output_dir", str(folder)])  # the command, which also writes the report
    final = folder / "final"

    records = read_jsonl(folder / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert set(TRL_NAMES + RUN_NAMES) <= set(train_records[0])
    assert train_records[0]["tokens_per_second"] > 0
    eval_records = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in eval_records] == [2, 4]
    assert "eval_rewards/accuracies" in eval_records[0]

    assert load_config(folder / "config.yaml").model == str(policy)
    for plot in ("loss", "accuracy", "margins", "logps", "learning_rate"):
        assert (folder / "plots" / f"{plot}.png").stat().st_size > 1000
    assert (folder / "report.html").exists() and (folder / "report.md").exists()

    # final/ is a plain transformers folder, trained away from the initial weights, and it generates
    trained, initial = weights(final), weights(policy)
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert len(generate(model, tokenizer)) > 0
    card = (final / "README.md").read_text()
    assert "Direct Preference Optimization" in card and "rewards/accuracies" in card
    held_out = eval_records[-1]
    low, high = held_out["eval_rewards/accuracies_ci_low"], held_out["eval_rewards/accuracies_ci_high"]
    accuracy = f"{held_out['eval_rewards/accuracies']:.2f} [{low:.2f}, {high:.2f}], n={held_out['eval_pairs']}"
    assert f"| eval_rewards/accuracies | {accuracy} |" in card  # a held-out accuracy with its interval
    assert "_ci_low" not in card


def test_lora_run_saves_an_adapter_that_peft_loads(tmp_path, tiny_model, pairs_file):
    from peft import AutoPeftModelForCausalLM, PeftModel

    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    final, _ = run(tmp_path, "lora", model=str(tiny_model(0)), dataset=str(pairs_file), lora=lora)
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    adapted = AutoPeftModelForCausalLM.from_pretrained(final)
    assert isinstance(adapted, PeftModel)
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # adapters were trained (B starts at zero)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert len(generate(adapted, tokenizer)) > 0

    merged_final, _ = run(tmp_path, "merged", model=str(tiny_model(0)), dataset=str(pairs_file), lora=lora,
                          merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_final)
    inputs = tokenizer("Hello there", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, adapted(**inputs).logits, atol=1e-4)


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights(tmp_path, tiny_model, pairs_file, monkeypatch):
    settings = {"model": str(tiny_model(0)), "dataset": str(pairs_file), "max_steps": 6, "save_steps": 3,
                "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "lr_scheduler_type": "cosine",
                "warmup_steps": 1}
    batches: dict[str, list[list[int]]] = {"straight": [], "crashed": []}
    current = ["straight"]

    run_pairs = PairRunner.run

    def recording_run(runner, pairs, *args, **kwargs):
        batches[current[0]].append([pair.index for pair in pairs])
        return run_pairs(runner, pairs, *args, **kwargs)

    monkeypatch.setattr(PairRunner, "run", recording_run)
    final, folder = run(tmp_path, "straight", **settings)
    assert [p.name for p in folder.glob("checkpoint-*")] == ["checkpoint-3"]

    # A run that stopped after step 3: only its checkpoint and the metrics up to it survive.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(folder / "checkpoint-3", crashed / "checkpoint-3")
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # torn last line
    current[0] = "crashed"
    resumed_final, _ = run(tmp_path, "crashed", **settings, resume_from_checkpoint="latest")
    # only steps 4-6 ran, on the same pairs in the same order as the uninterrupted run
    assert 0 < len(batches["crashed"]) < len(batches["straight"])
    assert batches["crashed"] == batches["straight"][-len(batches["crashed"]):]

    expected, actual = weights(final), weights(resumed_final)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)

    def without_timing(path):
        return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in read_jsonl(path)]

    assert without_timing(crashed / "metrics.jsonl") == without_timing(folder / "metrics.jsonl")

    # Resuming with settings that change which pairs later steps see is refused.
    with pytest.raises(UserError, match=r"seed: \d+ -> 7"):
        run(tmp_path, "crashed", **settings, seed=7, resume_from_checkpoint=str(folder / "checkpoint-3"))

    # A fresh run in the same folder replaces the earlier run, checkpoints included.
    run(tmp_path, "straight", **{**settings, "max_steps": 2, "save_steps": 1})
    assert [p.name for p in folder.glob("checkpoint-*")] == ["checkpoint-1"]


def test_gradient_accumulation_equals_a_larger_batch(tmp_path, tiny_model, pairs_file):
    common = {"model": str(tiny_model(0)), "dataset": str(pairs_file), "max_train_pairs": 8, "max_steps": 2,
              "max_grad_norm": 0.0}
    big, _ = run(tmp_path, "big", per_device_train_batch_size=4, **common)
    accumulated, _ = run(tmp_path, "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common)
    a, b = weights(big), weights(accumulated)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_their_whole_batch(tmp_path, tiny_model, pairs_file):
    """torchrun, two CPU processes (DDP over gloo) with 2 pairs each per step, one of them in one forward
    pass and the other in two: the weights and logged numbers of one process with 4 pairs per step."""
    common = {"model": str(tiny_model(0)), "dataset": str(pairs_file), "max_train_pairs": 8, "max_steps": 2}
    config = load_config(None, {**common, "max_length": 256})
    data = prepare_data(config, AutoTokenizer.from_pretrained(tiny_model(0)), use="pairs")
    plan = StepPlan(num_pairs=len(data.train), batch_size=4, accumulation=1, num_train_epochs=config.num_train_epochs,
                    max_steps=2, seed=config.seed)
    shares = [sum(block_tokens(data.train[i]) for i in plan.micro_batches(0, process_index=p, num_processes=2)[0])
              for p in range(2)]
    assert shares[0] != shares[1]
    common["max_tokens_per_forward"] = min(shares)  # so the processes run different numbers of forward passes
    one, _ = run(tmp_path, "one", per_device_train_batch_size=4, **common)
    flags = [f"--{key}={value}" for key, value in {**common, "per_device_train_batch_size": 2, "max_length": 256,
                                                     "learning_rate": 1e-3, "logging_steps": 1,
                                                     "output_dir": tmp_path / "two"}.items()]
    # --standalone: torchrun binds its own free port for the processes to meet on (a port probed here and
    # released could be taken by another process before torchrun binds it).
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", "smolalign", "train", *flags]
    returncode, stderr = run_with_stacks_on_timeout(launch, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert returncode == 0, stderr[-3000:]

    a, b = weights(one), weights(tmp_path / "two" / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    logged = [read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("one", "two")]
    for single, double in zip(*logged, strict=True):
        assert single["num_tokens"] == double["num_tokens"]
        for name in TRL_NAMES + ("grad_norm",):
            assert single[name] == pytest.approx(double[name], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("algorithm", ["orpo", "simpo"])
def test_reference_free_algorithms_train(tmp_path, tiny_model, pairs_file, algorithm):
    final, folder = run(tmp_path, algorithm, model=str(tiny_model(0)), dataset=str(pairs_file), algorithm=algorithm)
    first = read_jsonl(folder / "metrics.jsonl")[0]
    assert "nll_loss" in first and "rewards/accuracies" in first
    if algorithm == "orpo":
        assert {"log_odds_ratio", "log_odds_chosen"} <= set(first)
    assert (final / "model.safetensors").exists()


def test_sft_on_a_messages_dataset(tmp_path, tiny_model):
    conversations = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
        for i in range(8)
    ]
    data = write_jsonl(tmp_path / "messages.jsonl", conversations)
    final, folder = run(tmp_path, "sft", model=str(tiny_model(0)), dataset=str(data), algorithm="sft", max_steps=6)
    losses = [r["loss"] for r in read_jsonl(folder / "metrics.jsonl")]
    assert losses[-1] < losses[0]


def test_an_earlier_trainer_in_the_process_does_not_change_the_precision(tmp_path, tiny_model, pairs_file):
    from accelerate import Accelerator

    settings = {"model": str(tiny_model(0)), "dataset": str(pairs_file), "max_train_pairs": 8, "max_steps": 2}
    first, _ = run(tmp_path, "first", **settings)
    Accelerator(cpu=True, mixed_precision="bf16")  # what a TRL trainer with its default bf16=True leaves behind
    second, _ = run(tmp_path, "second", **settings)
    a, b = weights(first), weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_precision_per_device(monkeypatch):
    from smolalign.errors import UserError
    from smolalign.models.precision import resolve_dtype, resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu, lora=False) == (torch.float32, "no")
    asked = []

    def gpu(native_bf16: bool):  # what torch reports without emulation; a T4 emulates bf16 and says yes with it
        def is_bf16_supported(including_emulation: bool = True) -> bool:
            asked.append(including_emulation)
            return native_bf16 or including_emulation
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)

    gpu(native_bf16=True)  # A100 / H100 class
    assert resolve_precision("auto", cuda, lora=False) == (torch.float32, "bf16")  # fp32 master weights
    assert resolve_precision("auto", cuda, lora=True) == (torch.bfloat16, "bf16")  # frozen base in bf16
    assert resolve_precision("float16", cuda, lora=False) == (torch.float32, "fp16")  # the T4 path, forced
    assert resolve_precision("float16", cuda, lora=True) == (torch.float16, "fp16")
    assert resolve_precision("float32", cuda, lora=True) == (torch.float32, "no")
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    gpu(native_bf16=False)  # T4: fp16 autocast, with Accelerate's gradient scaler
    assert resolve_precision("auto", cuda, lora=False) == (torch.float32, "fp16")
    assert resolve_precision("auto", cuda, lora=True) == (torch.float16, "fp16")
    assert resolve_dtype("auto", cuda) == torch.float32
    assert asked and not any(asked)  # emulated bf16 never counts
    with pytest.raises(UserError, match="no native bf16"):
        resolve_precision("bfloat16", cuda, lora=False)


def test_accelerate_state_is_reset_where_accelerate_lets_it(monkeypatch):
    from accelerate.state import AcceleratorState

    from smolalign.training.setup import reset_accelerate_state

    assert reset_accelerate_state() is True
    monkeypatch.delattr(AcceleratorState, "_reset_state")  # a release without the private method: run on
    assert reset_accelerate_state() is False
