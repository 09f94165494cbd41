"""`smolalign bench`: the same job through smolalign, TRL and TRL with Liger's kernels, one process each.

Each framework trains the same pairs (normalised once into explicit-prompt conversations) for the
same steps, batch size and max_length, full fine-tuning or LoRA, in a fresh process whose whole wall
time is measured from outside, with its peak memory (RSS on CPU from the kernel's accounting; on a GPU
`torch.cuda.max_memory_allocated` inside the process). On CUDA every framework trains in bf16 autocast
(LoRA: over a bf16 base), as each does by default there. `--model_config` builds a model with random
weights from a bundled architecture (SmolLM2-135M or -1.7B; random weights are as fast as real ones).
Throughput counts prompt + answer tokens per sequence as TRL's padded layout feeds them, for all.
Model FLOP utilisation is the useful model FLOPs of the training steps (matmuls and causal attention
over real tokens, output head over scored tokens; backward = 2 x forward, 1 x under LoRA, whose frozen
weights get no gradient) over the step time and the highest dense matmul rate (bf16 on CUDA) measured
in the same benchmark, before every run. `--warmup_steps N` leaves the first N steps (kernel compilation
and autotuning) out of the step times, tokens/s and MFU; the whole-process time keeps them. On a shared
machine timings vary between runs: `--repeats N` keeps the fastest of N runs (and the highest memory
peak seen).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from smolalign.config.commands import BUNDLED_ARCHITECTURES, BenchConfig
from smolalign.core.layouts import padded_tokens
from smolalign.core.losses import OBJECTIVES
from smolalign.data.prepare import read_pairs, tokenize_and_fit
from smolalign.data.sources import bundled_dataset
from smolalign.data.tokenize import TokenizedPair
from smolalign.errors import UserError
from smolalign.models.loading import load_tokenizer, model_source, resolve_device

BASELINES = {"trl": "TRL", "trl_liger": "TRL+Liger"}


@dataclass
class BenchResult:
    framework: str
    algorithm: str
    process_seconds: float
    step_seconds: list[float]
    tokens: int
    peak_bytes: int
    flops: float
    kept_freed_memory: bool
    warmup_steps: int = 0  # the first steps, left out of the step times, tokens/s and MFU
    trainable_parameters: int | None = None

    @property
    def timed_seconds(self) -> list[float]:
        return self.step_seconds[self.warmup_steps:]

    @property
    def timed_share(self) -> float:
        """The timed steps' share of the tokens and FLOPs (every step counts as an average one: the
        frameworks shuffle the pairs differently)."""
        return len(self.timed_seconds) / len(self.step_seconds)

    @property
    def seconds_per_step(self) -> float:
        return sum(self.timed_seconds) / len(self.timed_seconds)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens * self.timed_share / sum(self.timed_seconds)

    def mfu(self, peak_flops: float) -> float:
        return self.flops * self.timed_share / sum(self.timed_seconds) / peak_flops


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


def model_config_file(name: str) -> Path:
    """A bundled architecture (`smollm2-135m`, `smollm2-1.7b`) or a config.json file."""
    bundled = BUNDLED_ARCHITECTURES / f"{name}.json"
    if bundled.is_file():
        return bundled
    if Path(name).is_file():
        return Path(name)
    names = ", ".join(sorted(p.stem for p in BUNDLED_ARCHITECTURES.glob("*.json")))
    raise UserError(f"'model_config' takes {names} or a config.json file, not '{name}'.")


def build_random_model(config_file: Path, tokenizer, folder: Path, device: torch.device) -> Path:
    """A model folder with the architecture of `config_file`, random (seeded) float32 weights and `tokenizer`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
    config = AutoConfig.for_model(**settings, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"{config_file.name} has a vocabulary of {config.vocab_size}, smaller than the "
                        f"tokenizer's {len(tokenizer)}.")
    torch.manual_seed(0)
    with torch.device(device):  # initialising a 1.7B model takes seconds on a GPU, a minute on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


def run_framework(spec: dict, run_dir: Path) -> tuple[dict, float, int]:
    """Run one worker process in a fresh folder; returns its result, its wall time and its peak RSS in bytes.

    The folder holds the run's own reference cache, so every run pays for its reference log-probs, and
    the process's stderr.log (the benchmark keeps a copy in its output folder)."""
    run_dir.mkdir()
    spec_path, result_path, log_path = run_dir / "spec.json", run_dir / "result.json", run_dir / "stderr.log"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "SMOLALIGN_REFERENCE_CACHE": str(run_dir / "reference-cache"), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "smolalign.bench.worker", str(spec_path), str(result_path)],
                                   env=env, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0 or not result_path.exists():
        error = log_path.read_text().strip().splitlines()
        raise UserError(f"the {spec['framework']} run failed: {error[-1] if error else 'no output'}")
    max_rss_unit = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
    return json.loads(result_path.read_text()), seconds, usage.ru_maxrss * max_rss_unit


def bench(config: BenchConfig) -> dict:
    """Run the benchmark `config` describes; writes bench.json and bench.md."""
    from transformers import AutoConfig

    config = dataclasses.replace(config, dataset=config.dataset or bundled_dataset("train"))
    device = resolve_device(config.device)
    if "trl_liger" in config.frameworks and device.type != "cuda":
        raise UserError("trl_liger needs a CUDA GPU (Liger's kernels are Triton kernels); leave it out of 'frameworks'.")
    frameworks = [name for name in config.frameworks if _framework_available(name)]
    if not frameworks:
        raise UserError("nothing to measure: the packages of the frameworks named in 'frameworks' are not installed.")

    tokenizer = load_tokenizer(config.model)
    read = read_pairs(config.dataset, limit=config.steps * config.batch_size)
    if len(read.pairs) < config.steps * config.batch_size:
        raise UserError(f"'{config.dataset}' has {len(read.pairs)} usable pairs; {config.steps} steps of "
                        f"{config.batch_size} need {config.steps * config.batch_size}.")
    pairs = tokenize_and_fit(read, tokenizer, max_length=config.max_length, max_prompt_length=None)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    matmul_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: list[BenchResult] = []
    peaks: list[float] = []
    with tempfile.TemporaryDirectory(prefix="smolalign-bench-") as scratch:
        workdir = Path(scratch)
        if config.model_config:
            print(f"building a model with random weights from {config.model_config} ...", flush=True)
            model = str(build_random_model(model_config_file(config.model_config), tokenizer, workdir / "model", device))
        else:
            model = model_source(config.model)
        architecture = AutoConfig.from_pretrained(model)
        data = workdir / "pairs.jsonl"  # the same normalised pairs for every framework
        data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                                for p in read.pairs))
        tokens = sum(padded_tokens(p) for p in pairs)
        for algorithm in config.algorithm:
            for framework in frameworks:
                spec = {"framework": framework, "algorithm": algorithm, "model": model, "dataset": str(data),
                        "steps": config.steps, "batch_size": config.batch_size, "max_length": config.max_length,
                        "device": device.type, "lora": config.lora,
                        "keep_freed_memory": framework == "smolalign" or config.trl_keep_freed_memory}
                flops = training_flops(architecture, pairs, algorithm=algorithm, framework=framework, lora=config.lora)
                runs = []
                for repeat in range(config.repeats):
                    print(f"running {algorithm} with {framework} ({repeat + 1}/{config.repeats}) ...", flush=True)
                    peaks.append(matmul_peak_flops(device, matmul_dtype))
                    run_dir = workdir / f"{algorithm}-{framework}-{repeat}"
                    try:
                        result, seconds, peak_rss = run_framework(spec, run_dir)
                    finally:  # what each process said, kept for a failure's whole story
                        (output_dir / "logs").mkdir(exist_ok=True)
                        shutil.copy(run_dir / "stderr.log", output_dir / "logs" / f"{run_dir.name}.log")
                    runs.append(BenchResult(framework, algorithm, seconds, result["step_seconds"], tokens,
                                            result.get("cuda_peak_bytes", peak_rss), flops,
                                            result["kept_freed_memory"], config.warmup_steps,
                                            result.get("trainable_parameters")))
                # The fastest repeat is the least disturbed by the machine's neighbours; memory is the highest seen.
                best = min(runs, key=lambda r: r.process_seconds)
                best.peak_bytes = max(r.peak_bytes for r in runs)
                results.append(best)
    report = summarise(results, max(peaks), config, device)
    (output_dir / "bench.json").write_text(json.dumps(report, indent=2))
    (output_dir / "bench.md").write_text(report["markdown"])
    print(report["markdown"])
    return report


def _framework_available(name: str) -> bool:
    """Whether the packages `name` needs are installed; says what is missing when they are not."""
    import importlib.util

    if name != "smolalign" and importlib.util.find_spec("trl") is None:
        print(f"TRL is not installed: leaving out {name} (pip install trl==1.16.0 to compare).")
        return False
    if name == "trl_liger" and importlib.util.find_spec("liger_kernel") is None:
        print("liger-kernel is not installed: leaving out trl_liger (pip install liger-kernel to compare).")
        return False
    return True


def versions() -> dict[str, str]:
    """Versions of the packages the benchmark ran with (those installed)."""
    import importlib.metadata

    found = {}
    for package in ("torch", "transformers", "accelerate", "peft", "trl", "liger-kernel"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def summarise(results: list[BenchResult], peak: float, config: BenchConfig, device: torch.device) -> dict:
    memory = "peak CUDA memory" if device.type == "cuda" else "peak RSS"
    trl_kept = [r.kept_freed_memory for r in results if r.framework == "trl"]  # what the TRL processes did
    trl_malloc = ""
    if device.type == "cpu" and trl_kept:
        trl_malloc = ("; TRL also keeps freed memory (--trl_keep_freed_memory)" if all(trl_kept)
                      else "; TRL with glibc's default malloc settings")
    model = config.model_config or config.model or "embedded"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name()}, bf16 autocast"
        rate = f"measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s"
    else:
        where = f"cpu, {torch.get_num_threads()} threads"
        rate = f"measured matmul peak {peak / 1e9:.0f} GFLOP/s"
    timed = f" (step times without the first {config.warmup_steps})" if config.warmup_steps else ""
    rows = []
    lines = [
        f"{model}: {config.steps} steps of {config.batch_size} pairs{timed}, max_length {config.max_length}, "
        f"{'LoRA' if config.lora else 'full fine-tuning'}, {where}, best of {config.repeats} process runs; {rate}{trl_malloc}",
        "",
        f"| algorithm | framework | whole process (s) | s/step | tokens/s | {memory} (GB) | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mfu = r.mfu(peak)
        rows.append({"algorithm": r.algorithm, "framework": r.framework, "process_seconds": r.process_seconds,
                     "seconds_per_step": r.seconds_per_step, "step_seconds": r.step_seconds,
                     "tokens_per_second": r.tokens_per_second, "peak_bytes": r.peak_bytes, "mfu": mfu,
                     "kept_freed_memory": r.kept_freed_memory, "trainable_parameters": r.trainable_parameters})
        lines.append(f"| {r.algorithm} | {r.framework} | {r.process_seconds:.1f} | {r.seconds_per_step:.2f} | "
                     f"{r.tokens_per_second:.0f} | {r.peak_bytes / 1e9:.2f} | {mfu:.0%} |")
    ratios = []
    for algorithm in dict.fromkeys(r.algorithm for r in results):
        by_framework = {r.framework: r for r in results if r.algorithm == algorithm}
        for baseline, label in BASELINES.items():
            if {"smolalign", baseline} <= set(by_framework):
                ours, theirs = by_framework["smolalign"], by_framework[baseline]
                ratio = {"algorithm": algorithm, "baseline": baseline,
                         "speedup_whole_process": theirs.process_seconds / ours.process_seconds,
                         "speedup_seconds_per_step": theirs.seconds_per_step / ours.seconds_per_step,
                         "speedup_tokens_per_second": ours.tokens_per_second / theirs.tokens_per_second,
                         "memory_ratio": ours.peak_bytes / theirs.peak_bytes}
                ratios.append(ratio)
                lines.append(f"| {algorithm} | **smolalign / {label}** | "
                             f"**{ratio['speedup_whole_process']:.2f}x faster** | "
                             f"**{ratio['speedup_seconds_per_step']:.2f}x** | "
                             f"**{ratio['speedup_tokens_per_second']:.2f}x** | **{ratio['memory_ratio']:.2f}x** | |")
    lines += ["", "versions: " + ", ".join(f"{name} {version}" for name, version in versions().items())]
    markdown = "\n".join(lines) + "\n"
    return {"matmul_peak_flops": peak, "rows": rows, "ratios": ratios, "markdown": markdown,
            "settings": {"steps": config.steps, "batch_size": config.batch_size, "max_length": config.max_length,
                         "repeats": config.repeats, "trl_keep_freed_memory": config.trl_keep_freed_memory,
                         "model": config.model or "embedded", "model_config": config.model_config,
                         "lora": config.lora, "warmup_steps": config.warmup_steps, "dataset": config.dataset,
                         "device": device.type,
                         "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                         "versions": versions()}}
