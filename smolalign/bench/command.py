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
peak seen). Comma lists of `--max_length` and `--batch_size` measure every combination, and the growth
table and plot show how time and memory grow; `--fill` makes the pairs about max_length tokens long
(bench/pairs.py), and `--memory_limit_gb` records a run that outgrows the machine as out of memory
instead of letting it swap.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from smolalign.bench.flops import matmul_peak_flops, training_flops
from smolalign.bench.pairs import bench_pairs
from smolalign.bench.tables import BenchResult, summarise
from smolalign.config.commands import BUNDLED_ARCHITECTURES, BenchConfig
from smolalign.core.layouts import padded_tokens
from smolalign.core.reference import IGNORE_SHIPPED
from smolalign.data.prepare import tokenize_and_fit
from smolalign.data.sources import bundled_dataset
from smolalign.data.tokenize import TokenizedPair
from smolalign.errors import UserError
from smolalign.models.loading import load_tokenizer, model_source, resolve_device
from smolalign.models.precision import resolve_precision
from smolalign.report.plots import plot_growth


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


def run_framework(spec: dict, run_dir: Path, memory_limit_gb: float | None = None) -> tuple[dict, float, int]:
    """Run one worker process in a fresh folder; returns its result, its wall time and its peak RSS in bytes.

    The folder holds the run's own reference cache, so every run pays for its reference log-probs, and
    the process's stderr.log (the benchmark keeps a copy in its output folder). With `memory_limit_gb`
    (Linux) a process whose resident memory passes the limit is stopped, so that a run too large for the
    machine fails as out of memory instead of swapping."""
    run_dir.mkdir()
    spec_path, result_path, log_path = run_dir / "spec.json", run_dir / "result.json", run_dir / "stderr.log"
    spec_path.write_text(json.dumps(spec))
    env = worker_environment(run_dir)
    start = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "smolalign.bench.worker", str(spec_path), str(result_path)],
                                   env=env, stdout=subprocess.DEVNULL, stderr=log)
        status, usage, stopped = _wait(process, memory_limit_gb)
    seconds = time.perf_counter() - start
    if stopped:
        raise UserError(f"out of memory: stopped when its memory passed memory_limit_gb ({memory_limit_gb:g} GB)")
    if status != 0 or not result_path.exists():
        error = log_path.read_text().strip().splitlines()
        raise UserError(error[-1] if error else "no output")
    max_rss_unit = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
    return json.loads(result_path.read_text()), seconds, usage.ru_maxrss * max_rss_unit


def worker_environment(run_dir: Path) -> dict[str, str]:
    """A run's environment: its own empty reference cache, and no reference values shipped with smolalign."""
    return {**os.environ, "SMOLALIGN_REFERENCE_CACHE": str(run_dir / "reference-cache"), IGNORE_SHIPPED: "1",
            "TQDM_DISABLE": "1"}


def _wait(process: subprocess.Popen, memory_limit_gb: float | None):
    """Wait for `process` (its exit status and resource usage); with a limit, poll its resident memory
    (psutil) and kill it when it passes. Returns whether it was stopped."""
    if memory_limit_gb is None:
        return (*os.wait4(process.pid, 0)[1:], False)
    watched = psutil.Process(process.pid)
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            return status, usage, False
        try:
            rss = watched.memory_info().rss
        except psutil.Error:  # exited between the two calls
            continue
        if rss > memory_limit_gb * 1e9:
            process.kill()
            return (*os.wait4(process.pid, 0)[1:], True)
        time.sleep(0.1)


@dataclass
class Job:
    """The pairs of one (max_length, pairs per step) setting, as every framework trains on them."""

    max_length: int
    batch_size: int
    data: Path  # the normalised pairs as JSONL, the same file for every framework
    pairs: list[TokenizedPair]

    @property
    def tokens(self) -> int:
        return sum(padded_tokens(p) for p in self.pairs)


def bench(config: BenchConfig) -> dict:
    """Run the benchmark `config` describes; writes bench.json, bench.md and, when it measured how the cost
    grows with max_length or pairs per step, growth.png."""
    from transformers import AutoConfig

    config = dataclasses.replace(config, dataset=config.dataset or bundled_dataset("train"))
    device = resolve_device(config.device)
    if "trl_liger" in config.frameworks and device.type != "cuda":
        raise UserError("trl_liger needs a CUDA GPU (Liger's kernels are Triton kernels); leave it out of 'frameworks'.")
    frameworks = [name for name in config.frameworks if _framework_available(name)]
    if not frameworks:
        raise UserError("nothing to measure: the packages of the frameworks named in 'frameworks' are not installed.")
    tokenizer = load_tokenizer(config.model)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results: list[BenchResult] = []
    weights_dtype, precision = resolve_precision(config.dtype, device, lora=config.lora)  # for every framework
    half = "float16" if precision == "fp16" else "bfloat16"  # the half precision this device would train in
    peaks: dict[str, list[float]] = {"float32": [], half: []}
    with tempfile.TemporaryDirectory(prefix="smolalign-bench-") as scratch:
        workdir = Path(scratch)
        if config.model_config:
            print(f"building a model with random weights from {config.model_config} ...", flush=True)
            model = str(build_random_model(model_config_file(config.model_config), tokenizer, workdir / "model", device))
        else:
            model = model_source(config.model)
        architecture = AutoConfig.from_pretrained(model)
        for max_length, batch_size in itertools.product(config.max_length, config.batch_size):
            job = prepare_job(config, tokenizer, workdir / f"pairs-{max_length}-{batch_size}.jsonl", max_length,
                              batch_size)
            for algorithm, framework in itertools.product(config.algorithm, frameworks):
                flops = training_flops(architecture, job.pairs, algorithm=algorithm, framework=framework,
                                       lora=config.lora)
                results.append(measure(config, job, algorithm, framework, model, flops, device, workdir, peaks,
                                       precision, weights_dtype))
    if all(r.failure for r in results):
        raise UserError(f"the {results[0].framework} run failed: {results[0].failure}")
    report = summarise(results, {name: max(values) for name, values in peaks.items()}, precision, config, device)
    (output_dir / "bench.json").write_text(json.dumps(report, indent=2))
    (output_dir / "bench.md").write_text(report["markdown"])
    plot_growth(report["rows"], output_dir / "growth.png")
    print(report["markdown"])
    return report


def prepare_job(config: BenchConfig, tokenizer, data: Path, max_length: int, batch_size: int) -> Job:
    read = bench_pairs(config.dataset, tokenizer, count=config.steps * batch_size, max_length=max_length,
                       fill=config.fill)
    data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in read.pairs))
    pairs = tokenize_and_fit(read, tokenizer, max_length=max_length, max_prompt_length=None)
    return Job(max_length, batch_size, data, pairs)


def measure(config: BenchConfig, job: Job, algorithm: str, framework: str, model: str, flops: float,
            device: torch.device, workdir: Path, peaks: dict[str, list[float]], precision: str,
            weights_dtype: torch.dtype) -> BenchResult:
    """The fastest of `repeats` runs of one framework on one job (memory: the highest peak seen), or the
    first failed run. Before each run, the machine's float32 and half-precision matmul peaks are measured again."""
    spec = {"framework": framework, "algorithm": algorithm, "model": model, "dataset": str(job.data),
            "steps": config.steps, "batch_size": job.batch_size, "max_length": job.max_length,
            "device": device.type, "lora": config.lora, "dtype": config.dtype, "precision": precision,
            "weights_dtype": str(weights_dtype).removeprefix("torch."),
            "keep_freed_memory": framework == "smolalign" or config.trl_keep_freed_memory}
    logs = Path(config.output_dir) / "logs"
    logs.mkdir(exist_ok=True)
    runs = []
    for repeat in range(config.repeats):
        name = f"{algorithm}-{job.max_length}-{job.batch_size}-{framework}-{repeat}"
        print(f"running {algorithm} with {framework}, max_length {job.max_length}, {job.batch_size} pairs per step "
              f"({repeat + 1}/{config.repeats}) ...", flush=True)
        for dtype_name, values in peaks.items():
            values.append(matmul_peak_flops(device, getattr(torch, dtype_name)))
        try:
            result, seconds, peak_rss = run_framework(spec, workdir / name, config.memory_limit_gb)
        except UserError as failure:
            return BenchResult(framework, algorithm, 0.0, [], job.tokens, 0, flops, False, config.warmup_steps,
                               max_length=job.max_length, batch_size=job.batch_size, failure=str(failure))
        finally:  # what each process said, kept for a failure's whole story
            shutil.copy(workdir / name / "stderr.log", logs / f"{name}.log")
        runs.append(BenchResult(framework, algorithm, seconds, result["step_seconds"], job.tokens,
                                result.get("cuda_peak_bytes", peak_rss), flops, result["kept_freed_memory"],
                                config.warmup_steps, result.get("trainable_parameters"), job.max_length,
                                job.batch_size, first_step_logps=result.get("first_step_logps")))
    # The fastest repeat is the least disturbed by the machine's neighbours; memory is the highest seen.
    best = min(runs, key=lambda r: r.process_seconds)
    best.peak_bytes = max(r.peak_bytes for r in runs)
    return best


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


