"""`smolalign bench`: the same job through smolalign and TRL, one process each, one after the other.

Each framework trains the same pairs (normalised once into explicit-prompt conversations) for the
same steps, batch size and max_length, full fine-tuning, in a fresh process whose whole wall time and
peak memory (RSS on CPU from the kernel's accounting, CUDA peak on GPU) are measured from outside.
Throughput counts prompt + answer tokens per sequence as TRL's padded layout feeds them, for both.
Model FLOP utilisation is the useful model FLOPs of the training steps (matmuls and causal attention
over real tokens, output head over scored tokens; backward = 2 x forward) over the step time and the
highest dense matmul rate measured during the benchmark (before every run). On a shared machine
timings vary between runs: `--repeats N` keeps the fastest of N runs (and the highest memory peak seen).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from smolalign.batching import padded_tokens
from smolalign.data.prepare import read_pairs, tokenize_and_fit
from smolalign.data.tokenize import TokenizedPair
from smolalign.errors import UserError
from smolalign.losses import OBJECTIVES
from smolalign.models import load_tokenizer, model_source

FRAMEWORKS = ("smolalign", "trl")


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

    @property
    def seconds_per_step(self) -> float:
        return sum(self.step_seconds) / len(self.step_seconds)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / sum(self.step_seconds)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 3.0) -> float:
    """Best sustained FLOP/s of square matmuls of a few sizes on this machine (the MFU denominator)."""
    best = 0.0
    for size in (1024, 2048, 4096):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b  # warm-up
        repeats, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            repeats += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
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


def training_flops(config, pairs: list[TokenizedPair], *, algorithm: str, framework: str) -> float:
    """Useful FLOPs of the training steps, counted the same way for every framework (each prompt once):
    policy forward + backward, plus the reference forward where it runs inside the steps (TRL;
    smolalign precomputes it before the first step for full fine-tuning)."""
    objective = OBJECTIVES[algorithm]
    total = 0.0
    for pair in pairs:
        total += 3 * forward_flops(config, pair, shared_prompt=True, scored_prompt=objective.needs_prompt_logps)
        if objective.needs_reference and framework == "trl":
            total += forward_flops(config, pair, shared_prompt=True, scored_prompt=False)
    return total


def run_framework(spec: dict, run_dir: Path) -> tuple[dict, float, int]:
    """Run one worker process in a fresh folder; returns its result, its wall time and its peak RSS in bytes.

    The folder holds the run's own reference cache, so every run pays for its reference log-probs."""
    run_dir.mkdir()
    spec_path, result_path, log_path = run_dir / "spec.json", run_dir / "result.json", run_dir / "stderr.log"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "SMOLALIGN_REFERENCE_CACHE": str(run_dir / "reference-cache"), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "smolalign.bench_worker", str(spec_path), str(result_path)],
                                   env=env, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0 or not result_path.exists():
        error = log_path.read_text().strip().splitlines()
        raise UserError(f"the {spec['framework']} run failed: {error[-1] if error else 'no output'}")
    max_rss_unit = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
    return json.loads(result_path.read_text()), seconds, usage.ru_maxrss * max_rss_unit


def bench(args) -> dict:
    """Run the benchmark described by the CLI arguments; writes bench.json and bench.md."""
    from transformers import AutoConfig

    frameworks = [f.strip() for f in args.frameworks.split(",")]
    algorithms = [a.strip() for a in args.algorithm.split(",")]
    for name in frameworks:
        if name not in FRAMEWORKS:
            raise UserError(f"--frameworks accepts {', '.join(FRAMEWORKS)}, not '{name}'.")
    for name in algorithms:
        if name not in ("dpo", "orpo", "simpo"):
            raise UserError(f"--algorithm accepts dpo, orpo and simpo, not '{name}'.")
    if "trl" in frameworks:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("TRL is not installed: measuring smolalign alone (pip install trl==1.16.0 to compare).")
            frameworks.remove("trl")
    if not frameworks:
        raise UserError("nothing to measure: TRL is not installed and --frameworks names no other framework.")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_source(args.model)
    tokenizer = load_tokenizer(args.model)
    read = read_pairs(args.dataset, limit=args.steps * args.batch_size)
    if len(read.pairs) < args.steps * args.batch_size:
        raise UserError(f"'{args.dataset}' has {len(read.pairs)} usable pairs; {args.steps} steps of "
                        f"{args.batch_size} need {args.steps * args.batch_size}.")
    pairs = tokenize_and_fit(read, tokenizer, max_length=args.max_length, max_prompt_length=None)
    model_config = AutoConfig.from_pretrained(model)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    matmul_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: list[BenchResult] = []
    peaks: list[float] = []
    with tempfile.TemporaryDirectory(prefix="smolalign-bench-") as scratch:
        workdir = Path(scratch)
        data = workdir / "pairs.jsonl"  # the same normalised pairs for every framework
        data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                                for p in read.pairs))
        tokens = sum(padded_tokens(p) for p in pairs)
        for algorithm in algorithms:
            for framework in frameworks:
                spec = {"framework": framework, "algorithm": algorithm, "model": model, "dataset": str(data),
                        "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                        "device": device.type,
                        "keep_freed_memory": framework == "smolalign" or args.trl_keep_freed_memory}
                flops = training_flops(model_config, pairs, algorithm=algorithm, framework=framework)
                runs = []
                for repeat in range(args.repeats):
                    print(f"running {algorithm} with {framework} ({repeat + 1}/{args.repeats}) ...", flush=True)
                    peaks.append(matmul_peak_flops(device, matmul_dtype))
                    result, seconds, peak_rss = run_framework(spec, workdir / f"{algorithm}-{framework}-{repeat}")
                    runs.append(BenchResult(framework, algorithm, seconds, result["step_seconds"], tokens,
                                            result.get("cuda_peak_bytes", peak_rss), flops,
                                            result["kept_freed_memory"]))
                # The fastest repeat is the least disturbed by the machine's neighbours; memory is the highest seen.
                best = min(runs, key=lambda r: r.process_seconds)
                best.peak_bytes = max(r.peak_bytes for r in runs)
                results.append(best)
    report = summarise(results, max(peaks), args, device)
    (output_dir / "bench.json").write_text(json.dumps(report, indent=2))
    (output_dir / "bench.md").write_text(report["markdown"])
    print(report["markdown"])
    return report


def summarise(results: list[BenchResult], peak: float, args, device: torch.device) -> dict:
    memory = "peak CUDA memory" if device.type == "cuda" else "peak RSS"
    trl_kept = [r.kept_freed_memory for r in results if r.framework == "trl"]  # what the TRL processes did
    trl_malloc = ""
    if device.type == "cpu" and trl_kept:
        trl_malloc = ("; TRL also keeps freed memory (--trl_keep_freed_memory)" if all(trl_kept)
                      else "; TRL with glibc's default malloc settings")
    rows = []
    lines = [
        f"{args.steps} steps of {args.batch_size} pairs, max_length {args.max_length}, full fine-tuning, "
        f"{device.type}, {torch.get_num_threads()} threads, best of {args.repeats} process runs; "
        f"measured matmul peak {peak / 1e9:.0f} GFLOP/s{trl_malloc}",
        "",
        f"| algorithm | framework | whole process (s) | s/step | tokens/s | {memory} (GB) | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mfu = r.flops / sum(r.step_seconds) / peak
        rows.append({"algorithm": r.algorithm, "framework": r.framework, "process_seconds": r.process_seconds,
                     "seconds_per_step": r.seconds_per_step, "step_seconds": r.step_seconds,
                     "tokens_per_second": r.tokens_per_second, "peak_bytes": r.peak_bytes, "mfu": mfu,
                     "kept_freed_memory": r.kept_freed_memory})
        lines.append(f"| {r.algorithm} | {r.framework} | {r.process_seconds:.1f} | {r.seconds_per_step:.2f} | "
                     f"{r.tokens_per_second:.0f} | {r.peak_bytes / 1e9:.2f} | {mfu:.0%} |")
    ratios = []
    for algorithm in dict.fromkeys(r.algorithm for r in results):
        by_framework = {r.framework: r for r in results if r.algorithm == algorithm}
        if {"smolalign", "trl"} <= set(by_framework):
            ours, theirs = by_framework["smolalign"], by_framework["trl"]
            ratio = {"algorithm": algorithm,
                     "speedup_whole_process": theirs.process_seconds / ours.process_seconds,
                     "speedup_tokens_per_second": ours.tokens_per_second / theirs.tokens_per_second,
                     "memory_ratio": ours.peak_bytes / theirs.peak_bytes}
            ratios.append(ratio)
            lines.append(f"| {algorithm} | **smolalign / TRL** | **{ratio['speedup_whole_process']:.2f}x faster** | | "
                         f"**{ratio['speedup_tokens_per_second']:.2f}x** | **{ratio['memory_ratio']:.2f}x** | |")
    markdown = "\n".join(lines) + "\n"
    return {"matmul_peak_flops": peak, "rows": rows, "ratios": ratios, "markdown": markdown,
            "settings": {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                         "repeats": args.repeats, "trl_keep_freed_memory": args.trl_keep_freed_memory,
                         "model": args.model or "embedded", "dataset": args.dataset, "device": device.type}}
