"""What a benchmark measured, per run, and the tables people read: one row per run, the ratios of
smolalign to each baseline, and how time and memory grow with max_length and pairs per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smolalign.config.commands import BenchConfig

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
    max_length: int = 0
    batch_size: int = 0
    failure: str | None = None  # why the run stopped (out of memory …); it then has no timings
    first_step_logps: dict[str, float] | None = None  # smolalign's logps/chosen and logps/rejected at step 1

    @property
    def job(self) -> tuple[str, int, int]:
        """What was trained: the runs of one job are compared with each other."""
        return self.algorithm, self.max_length, self.batch_size

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


PRECISIONS = {"bf16": "bf16 autocast", "fp16": "fp16 autocast", "no": "float32"}
PEAK_OF = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}  # the matmul peak a precision is measured on


def summarise(results: list[BenchResult], peaks: dict[str, float], precision: str, config: BenchConfig,
              device: torch.device) -> dict:
    """bench.json's content: a row per run, the ratios to the baselines, and the markdown tables. Model FLOP
    utilisation is measured against the matmul peak of the precision every framework trained in."""
    memory = "peak CUDA memory" if device.type == "cuda" else "peak RSS"
    peak = peaks[PEAK_OF[precision]]
    lines = [_heading(results, peaks, precision, config, device), "",
             f"| algorithm | max_length | pairs/step | framework | whole process (s) | s/step | tokens/s | "
             f"{memory} (GB) | MFU |", "|---|---|---|---|---|---|---|---|---|"]
    rows = [_row(r, peak) for r in results]
    for r, row in zip(results, rows, strict=True):
        job = f"| {r.algorithm} | {r.max_length} | {r.batch_size} | {r.framework} |"
        if r.failure:
            lines.append(f"{job} failed: {r.failure} | | | | |")
        else:
            lines.append(f"{job} {r.process_seconds:.1f} | {r.seconds_per_step:.2f} | {r.tokens_per_second:.0f} | "
                         f"{r.peak_bytes / 1e9:.2f} | {row['mfu']:.0%} |")
    ratios = compare_to_baselines(results)
    for ratio in ratios:
        lines.append(f"| {ratio['algorithm']} | {ratio['max_length']} | {ratio['batch_size']} | "
                     f"**smolalign / {BASELINES[ratio['baseline']]}** | "
                     f"**{ratio['speedup_whole_process']:.2f}x faster** | **{ratio['speedup_seconds_per_step']:.2f}x** | "
                     f"**{ratio['speedup_tokens_per_second']:.2f}x** | **{ratio['memory_ratio']:.2f}x** | |")
    lines += growth_table(results, memory)
    lines += ["", "versions: " + ", ".join(f"{name} {version}" for name, version in versions().items())]
    return {"matmul_peak_flops": peaks, "precision": PRECISIONS[precision], "rows": rows, "ratios": ratios, "markdown": "\n".join(lines) + "\n",
            "settings": {"steps": config.steps, "batch_size": config.batch_size, "max_length": config.max_length,
                         "fill": config.fill, "repeats": config.repeats,
                         "trl_keep_freed_memory": config.trl_keep_freed_memory, "model": config.model or "embedded",
                         "model_config": config.model_config, "lora": config.lora,
                         "warmup_steps": config.warmup_steps, "dataset": config.dataset, "device": device.type,
                         "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                         "versions": versions()}}


def _heading(results: list[BenchResult], peaks: dict[str, float], precision: str, config: BenchConfig,
             device: torch.device) -> str:
    trl_kept = [r.kept_freed_memory for r in results if r.framework == "trl" and not r.failure]
    trl_malloc = ""
    if device.type == "cpu" and trl_kept:
        trl_malloc = ("; TRL also keeps freed memory (--trl_keep_freed_memory)" if all(trl_kept)
                      else "; TRL with glibc's default malloc settings")
    model = config.model_config or config.model or "embedded"
    unit, scale = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    where = f"{device_name}, every framework in {PRECISIONS[precision]}"
    rate = "measured matmul peaks " + ", ".join(f"{name} {value / scale:,.0f} {unit}" for name, value in peaks.items())
    timed = f" (step times without the first {config.warmup_steps})" if config.warmup_steps else ""
    filled = ", pairs filled to about max_length with earlier conversations" if config.fill else ""
    return (f"{model}: {config.steps} steps{timed}{filled}, {'LoRA' if config.lora else 'full fine-tuning'}, "
            f"{where}, best of {config.repeats} process runs; {rate}{trl_malloc}")


def _row(r: BenchResult, peak: float) -> dict:
    row = {"algorithm": r.algorithm, "framework": r.framework, "max_length": r.max_length,
           "batch_size": r.batch_size, "kept_freed_memory": r.kept_freed_memory, "failure": r.failure}
    if not r.failure:
        row.update(process_seconds=r.process_seconds, seconds_per_step=r.seconds_per_step,
                   step_seconds=r.step_seconds, tokens_per_second=r.tokens_per_second, peak_bytes=r.peak_bytes,
                   mfu=r.mfu(peak), trainable_parameters=r.trainable_parameters,
                   first_step_logps=r.first_step_logps)
    return row


def compare_to_baselines(results: list[BenchResult]) -> list[dict]:
    """smolalign against each baseline that ran the same job: speed-ups and the memory ratio."""
    ratios = []
    for job in dict.fromkeys(r.job for r in results):
        by_framework = {r.framework: r for r in results if r.job == job and not r.failure}
        for baseline in BASELINES:
            if {"smolalign", baseline} <= set(by_framework):
                ours, theirs = by_framework["smolalign"], by_framework[baseline]
                algorithm, max_length, batch_size = job
                ratios.append({"algorithm": algorithm, "max_length": max_length, "batch_size": batch_size,
                               "baseline": baseline,
                               "speedup_whole_process": theirs.process_seconds / ours.process_seconds,
                               "speedup_seconds_per_step": theirs.seconds_per_step / ours.seconds_per_step,
                               "speedup_tokens_per_second": ours.tokens_per_second / theirs.tokens_per_second,
                               "memory_ratio": ours.peak_bytes / theirs.peak_bytes})
    return ratios


def growth_table(results: list[BenchResult], memory: str) -> list[str]:
    """How s/step and memory grow with max_length and pairs per step: a row per job, a column per framework;
    nothing when the benchmark measured one job per algorithm."""
    jobs = sorted(dict.fromkeys(r.job for r in results), key=lambda job: (job[0], job[2], job[1]))
    if len(jobs) <= len({job[0] for job in jobs}):
        return []
    frameworks = list(dict.fromkeys(r.framework for r in results))
    lines = ["", "Growth with max_length and pairs per step:", "",
             "| algorithm | max_length | pairs/step | " + " | ".join(f"{f} s/step" for f in frameworks) + " | "
             + " | ".join(f"{f} {memory} (GB)" for f in frameworks) + " |",
             "|---|---|---|" + "---|" * 2 * len(frameworks)]
    for algorithm, max_length, batch_size in jobs:
        run = {r.framework: r for r in results if r.job == (algorithm, max_length, batch_size)}
        time = [_cell(run.get(f), lambda r: f"{r.seconds_per_step:.2f}") for f in frameworks]
        peak = [_cell(run.get(f), lambda r: f"{r.peak_bytes / 1e9:.2f}") for f in frameworks]
        lines.append(f"| {algorithm} | {max_length} | {batch_size} | " + " | ".join(time + peak) + " |")
    return lines


def _cell(result: BenchResult | None, show) -> str:
    if result is None:
        return ""
    return "failed" if result.failure else show(result)
