"""One benchmark run in its own process: `python -m smolalign.bench.worker SPEC.json RESULT.json`.

SPEC names the framework (`smolalign`, `trl`, or `trl_liger`: TRL with `use_liger_kernel=True`),
algorithm, model folder, pairs file, steps, batch size, max_length, device, LoRA or not, and whether the
process keeps freed memory (models/memory.py). RESULT receives the seconds of every optimizer step, whether
freed memory was kept, smolalign's step-1 log-probs (to compare precisions), and on CUDA the process's peak
allocated memory. The whole process's time (and its peak RSS on a CPU) is measured from outside, by
`smolalign bench`.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

from smolalign.models.memory import keep_freed_memory

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}  # the same for every framework


def run_smolalign(spec: dict, output_dir: Path) -> dict:
    from smolalign.config.train import load_config
    from smolalign.run_folder import RunFolder
    from smolalign.training.loop import run_training

    config = load_config(None, {
        "model": spec["model"], "dataset": spec["dataset"], "algorithm": spec["algorithm"],
        "per_device_train_batch_size": spec["batch_size"], "max_steps": spec["steps"],
        "max_length": spec["max_length"], "logging_steps": 1, "save_steps": 10**9, "output_dir": str(output_dir),
        "device": spec["device"], "lora": LORA if spec.get("lora") else None, "dtype": spec["dtype"],
    })
    final = run_training(config)
    records = [r for r in RunFolder(output_dir).read_metrics() if "tokens_per_second" in r]
    tokens = [r["num_tokens"] for r in records]
    step_tokens = [t - previous for t, previous in zip(tokens, [0, *tokens[:-1]], strict=True)]
    return {"step_seconds": [n / r["tokens_per_second"] for n, r in zip(step_tokens, records, strict=True)],
            "trainable_parameters": _saved_parameters(final, adapter=bool(spec.get("lora"))),
            "first_step_logps": {name: records[0][name] for name in ("logps/chosen", "logps/rejected")}}


def _saved_parameters(folder: Path, *, adapter: bool) -> int:
    """Parameters in a saved model folder (the adapter's only, for LoRA): what was trained."""
    from safetensors import safe_open

    files = [folder / "adapter_model.safetensors"] if adapter else sorted(folder.glob("model*.safetensors"))
    total = 0
    for file in files:
        with safe_open(file, "pt") as weights:
            for name in weights.keys():
                total += math.prod(weights.get_slice(name).get_shape())
    return total


def run_trl(spec: dict, output_dir: Path) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    step_seconds: list[float] = []
    cuda = spec["device"] == "cuda"

    class StepTimer(TrainerCallback):
        """Step times with the GPU's queued work included (TRL reads the loss only after on_step_end)."""

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            step_seconds.append(time.perf_counter() - self.start)

    common = {
        "output_dir": str(output_dir), "per_device_train_batch_size": spec["batch_size"], "max_steps": spec["steps"],
        "max_length": spec["max_length"], "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "gradient_checkpointing": False, "use_cpu": not cuda,
        # the precision smolalign trains in, set as TRL's users set it
        "bf16": spec["precision"] == "bf16", "fp16": spec["precision"] == "fp16",
        "use_liger_kernel": spec["framework"] == "trl_liger",
    }
    if spec["algorithm"] == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer
    elif spec["algorithm"] == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer

        common.update(loss_type="simpo", cpo_alpha=0.0)
    peft_config = None
    if spec.get("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **LORA)
    trainer = Trainer(  # weights as smolalign keeps them: float32, or LoRA's frozen base in the half precision
        model=AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["weights_dtype"])),
        args=Config(**common),
        train_dataset=load_dataset("json", data_files=spec["dataset"], split="train"),
        processing_class=AutoTokenizer.from_pretrained(spec["model"]),
        callbacks=[StepTimer()],
        peft_config=peft_config,
    )
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"step_seconds": step_seconds, "trainable_parameters": trainable}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    # smolalign's train() keeps freed memory on CPU anyway; TRL runs get it only when the spec asks.
    kept = spec["keep_freed_memory"] and keep_freed_memory(spec["device"])
    with tempfile.TemporaryDirectory(prefix="smolalign-bench-") as scratch:
        runner = run_smolalign if spec["framework"] == "smolalign" else run_trl
        result = runner(spec, Path(scratch))
    result["kept_freed_memory"] = kept
    if spec["device"] == "cuda":
        import torch

        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
