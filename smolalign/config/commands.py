"""The configs of `smolalign eval`, `chat`, `export`, `data inspect` and the benches: typed dataclasses like
TrainConfig.

Each field has its help text, and its type says which values it takes; the command line's flags are
derived from the fields (config/arguments.py), and the Python API builds the same configs from keyword
arguments with `from_values`. Defaults shared with training (lengths, splits, the reward scale) are
read from TrainConfig, never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from smolalign.config.choices import QUANTIZATIONS, BatchLayout, Device, Dtype, Quantization
from smolalign.config.fields import Settings, option, require, require_at_least, required
from smolalign.config.train import TrainConfig, check_lengths
from smolalign.config.trl_keys import TRL_ALGORITHMS

Framework = Literal["smolalign", "trl", "trl_liger"]  # trl_liger: TRL with use_liger_kernel=True
BenchAlgorithm = Literal[TRL_ALGORITHMS]
QualityMethod = Literal["dpo", "ipo", "orpo", "simpo", "kto"]  # what `bench quality` compares (IPO: DPO's ipo loss)
BUNDLED_ARCHITECTURES = Path(__file__).resolve().parents[1] / "bundled" / "model-configs"  # shipped in the wheel


def from_run(key: str, help: str) -> Any:
    """An eval setting that, left unset, takes the value of the run whose final/ is evaluated (its
    config.yaml), else training's default: a run is scored as it was trained."""
    default = getattr(TrainConfig, key)
    return option(None, f"{help} Default: the run's, else {'none' if default is None else default}.", from_run=True)


def check_sampling(config: EvalConfig | ChatConfig) -> None:
    require_at_least(config, 1, "max_new_tokens")
    require(0 < config.top_p <= 1, f"'top_p' must lie in (0, 1], not {config.top_p}.")


@dataclass
class EvalConfig(Settings):
    """`smolalign eval`: score held-out pairs with a model and its reference, generate, judge."""

    command: ClassVar[str] = "eval"

    model: str = required("Model to evaluate: a run's final/ folder (full or LoRA), another model folder, or a Hub id.")
    dataset: str = required("Preference pairs (file or Hub id).")
    ref_model: str | None = option(
        None, "Reference model; default: the model a run's final/ started from, or a LoRA adapter's base model."
    )
    output_dir: str | None = option(None, "Where eval.json and the rest go; default: RUN/eval for RUN/final, else ./eval.")
    split: str = option(TrainConfig.eval_split, "Split of a Hub dataset.")
    dataset_columns: dict[str, str] | None = option(None, "Role -> column for columns named otherwise, e.g. "
                                                          "{prompt: question}.")
    beta: float | None = from_run("beta", "Reward scale (DPO beta).")
    max_length: int | None = from_run("max_length", "Maximum tokens of prompt + answer.")
    max_prompt_length: int | None = from_run("max_prompt_length", "Maximum prompt tokens.")
    logprob_chunk_size: int | None = from_run("logprob_chunk_size", "Tokens per output-head chunk (at most 256 with a "
                                                                          "reference: the KL's chunks).")
    chat_template: str | None = from_run("chat_template", "'chatml' for a base model without a chat template.")
    system_prompt: str | None = from_run("system_prompt", "System message for prompts that have none.")
    max_pairs: int | None = option(None, "Use only the first N pairs.")
    max_tokens_per_forward: int | None = option(
        None, "Tokens per forward pass (whole pairs; a longer pair goes alone). Default: 8 x max_length. Numbers "
        "do not change.")
    batch_layout: BatchLayout = option(TrainConfig.batch_layout, "How pairs become rows (numbers do not change).")
    generate: int = option(0, "Answer the first N prompts with the policy and the reference, side by side.",
                           metavar="N")
    max_new_tokens: int = option(128, "Longest generated answer, in tokens.")
    generation_batch_size: int = option(16, "Prompts answered together (greedy answers are the same for any size).")
    do_sample: bool = option(False, "Sample instead of greedy decoding.")
    temperature: float = option(1.0, "Sampling temperature (with do_sample).")
    top_p: float = option(1.0, "Nucleus sampling: keep the most likely tokens up to this probability mass.")
    seed: int = option(0, "Seed for sampling.")
    judge: str | None = option(None, "Reward model (sequence classification; folder or Hub id) that judges answers.")
    judge_url: str | None = option(None, "OpenAI-compatible chat endpoint that judges answers (…/v1).")
    judge_model: str | None = option(None, "Model name to ask at judge_url.")
    judge_api_key_env: str = option(
        "SMOLALIGN_JUDGE_API_KEY", "Environment variable holding the endpoint's key (e.g. OPENAI_API_KEY); none = no key."
    )
    device: Device = option(TrainConfig.device, "Where to run; auto = CUDA when available.")
    dtype: Dtype = option(TrainConfig.dtype, "Weights dtype; auto = float32 on CPU, bfloat16 on GPUs that have it.")

    def validate(self) -> None:
        require(self.beta is None or self.beta > 0, f"'beta' must be > 0, not {self.beta}.")
        check_lengths(self.max_length, self.max_prompt_length)
        require_at_least(self, 1, "logprob_chunk_size", "max_pairs", "max_tokens_per_forward", "generation_batch_size")
        require_at_least(self, 0, "generate")
        require(not self.do_sample or self.temperature > 0, f"'temperature' must be > 0 to sample, not {self.temperature}.")
        check_sampling(self)


@dataclass
class ChatConfig(Settings):
    """`smolalign chat`: talk with a model, or with it and its reference side by side."""

    command: ClassVar[str] = "chat"

    model: str | None = option(
        None, "Model folder (a run's final/, full or LoRA) or Hub id; default: the embedded SmolLM2-135M-Instruct.",
        positional=True,
    )
    compare: bool = option(
        False, "Answer each message with the policy and its reference (a LoRA adapter's base model, the model a run "
        "started from, or ref_model)."
    )
    ref_model: str | None = option(None, "Reference model for compare (folder or Hub id).")
    system_prompt: str | None = option(None, "System message at the start of every conversation.")
    max_new_tokens: int = option(256, "Longest answer, in tokens.")
    do_sample: bool = option(False, "Sample instead of greedy decoding.")
    temperature: float | None = option(None, "Sampling temperature (implies do_sample); 0 = greedy.")
    top_p: float = option(1.0, "Nucleus sampling: keep the most likely tokens up to this probability mass.")
    seed: int = option(0, "Seed for sampling: the i-th message is answered with seed + i by every speaker.")
    chat_template: str | None = option(None, "'chatml' for a base model without a chat template.")
    device: Device = option(TrainConfig.device, "Where to run; auto = CUDA when available.")
    dtype: Dtype = option(TrainConfig.dtype, "Weights dtype; auto = float32 on CPU, bfloat16 on GPUs that have it.")

    def validate(self) -> None:
        require(self.temperature is None or self.temperature >= 0,
                f"'temperature' must be >= 0, not {self.temperature}.")
        check_sampling(self)


@dataclass
class InspectConfig(Settings):
    """`smolalign data inspect`: what a dataset looks like and what is wrong with it."""

    command: ClassVar[str] = "data inspect"

    dataset: str = required("Preference data: a file or a Hub id.", positional=True)
    model: str | None = option(None, "Tokenizer to measure lengths with; default: the embedded SmolLM2's.")
    split: str = option(TrainConfig.dataset_split, "Split of a Hub dataset or a folder of splits.")
    dataset_columns: dict[str, str] | None = option(None, "Role -> column for columns named otherwise, e.g. "
                                                          "{prompt: question}.")
    max_length: int = option(TrainConfig.max_length, "Maximum tokens of prompt + answer, as training would cut.")
    max_prompt_length: int | None = option(TrainConfig.max_prompt_length, "Maximum prompt tokens.")
    chat_template: str | None = option(None, "'chatml' for a base model without a chat template.")
    system_prompt: str | None = option(None, "System message for prompts that have none.")

    def validate(self) -> None:
        check_lengths(self.max_length, self.max_prompt_length)


@dataclass
class BenchConfig(Settings):
    """`smolalign bench speed`: the same training job timed with smolalign and TRL, side by side."""

    command: ClassVar[str] = "bench speed"

    algorithm: list[BenchAlgorithm] = option(["dpo"], "Algorithms to time, as a comma list.")
    model: str | None = option(
        None, "Model folder or Hub id; default: the embedded SmolLM2-135M-Instruct. With model_config, only its "
        "tokenizer is used."
    )
    model_config: str | None = option(
        None, "Random weights in a bundled architecture ("
        + ", ".join(sorted(path.stem for path in BUNDLED_ARCHITECTURES.glob("*.json")))
        + ") or that of a config.json file."
    )
    dataset: str | None = option(None, "Preference pairs; default: the bundled HH-RLHF pairs.")
    steps: int = option(6, "Optimizer steps per run.")
    warmup_steps: int = option(0, "First steps left out of step times, tokens/s and MFU (kernel compilation).")
    batch_size: list[int] = option([4], "Pairs per step; a comma list measures how the cost grows with it.")
    max_length: list[int] = option([512], "Maximum tokens of prompt + answer; a comma list measures how the cost "
                                          "grows with it (with fill).")
    fill: bool = option(False, "Make every pair about max_length tokens long by putting earlier conversations of "
                               "the dataset before its prompt.")
    lora: bool = option(False, "LoRA (r 16, all linear layers) instead of full fine-tuning.")
    device: Device = option(TrainConfig.device, "Where to run; auto = CUDA when available.")
    dtype: Dtype = option(TrainConfig.dtype, "Precision of every framework: auto = the device's native half "
                                             "precision (bf16 autocast, TRL with bf16=True) where it has one; "
                                             "float32 turns it off.")
    frameworks: list[Framework] = option(
        ["smolalign", "trl"], "Frameworks to time, as a comma list; trl_liger is TRL with use_liger_kernel=True "
        "(CUDA only)."
    )
    repeats: int = option(1, "Runs per framework; the fastest is kept.")
    memory_limit_gb: float | None = option(None, "Stop a run whose resident memory passes this (Linux) and record "
                                                 "it as out of memory, instead of letting the machine swap.")
    trl_keep_freed_memory: bool = option(False, "Give the TRL runs smolalign's glibc setting that keeps freed "
                                                "memory (CPU).")
    output_dir: str = option("runs/bench", "Where bench.json, bench.md and the runs' logs go.")

    def validate(self) -> None:
        require_at_least(self, 1, "steps", "repeats")
        require_at_least(self, 0, "warmup_steps")
        require(bool(self.batch_size) and min(self.batch_size) >= 1, "'batch_size' must be >= 1.")
        require(bool(self.max_length), "'max_length' names no length.")
        for length in self.max_length:
            check_lengths(length, None)
        require(self.memory_limit_gb is None or self.memory_limit_gb > 0, "'memory_limit_gb' must be > 0.")
        require(self.warmup_steps < self.steps,
                f"'warmup_steps' ({self.warmup_steps}) must be smaller than 'steps' ({self.steps}).")
        require(bool(self.algorithm), "'algorithm' names no algorithm.")
        require(bool(self.frameworks), "'frameworks' names no framework.")


@dataclass
class QualityConfig(Settings):
    """`smolalign bench quality`: the preference methods trained at one budget and judged on held-out pairs."""

    command: ClassVar[str] = "bench quality"

    algorithm: list[QualityMethod] = option(["dpo", "ipo", "orpo", "simpo", "kto"], "Methods to train and evaluate, "
                                                                                    "as a comma list.")
    recipe: str = option("quality", "Recipe with the budget every method shares (model, pairs, steps, lengths, "
                                    "learning rate): a packaged recipe's name or a YAML file.")
    eval_pairs: int = option(120, "Held-out test pairs each model is scored on.")
    judge_prompts: int = option(64, "Held-out prompts each model and its starting model answer, judged by a reward "
                                    "model trained on the same pairs; 0 = no judge.")
    max_new_tokens: int = option(48, "Longest judged answer, in tokens.")
    device: Device = option(TrainConfig.device, "Where to run; auto = CUDA when available.")
    output_dir: str = option("runs/quality", "Where quality.json, quality.md, quality.png and the runs go.")

    def validate(self) -> None:
        require_at_least(self, 1, "eval_pairs", "max_new_tokens")
        require_at_least(self, 0, "judge_prompts")
        require(bool(self.algorithm), "'algorithm' names no method.")


@dataclass
class GenerationBenchConfig(Settings):
    """`smolalign bench generation`: the same greedy answers from transformers' one-prompt loop and from
    smolalign's batched generation, timed side by side."""

    command: ClassVar[str] = "bench generation"

    model: str | None = option(None, "Model folder or Hub id; default: the embedded SmolLM2-135M-Instruct.")
    dataset: str | None = option(None, "Preference pairs whose prompts are answered; default: the bundled HH-RLHF "
                                       "test pairs.")
    prompts: int = option(16, "Prompts to answer.")
    max_new_tokens: int = option(64, "New tokens per answer at most.")
    generation_batch_size: int = option(16, "Prompts smolalign answers together.")
    device: Device = option(TrainConfig.device, "Where to run; auto = CUDA when available.")
    output_dir: str = option("runs/generation", "Where generation.json and generation.md go.")

    def validate(self) -> None:
        require_at_least(self, 1, "prompts", "max_new_tokens", "generation_batch_size")


@dataclass(kw_only=True)
class ExportConfig(Settings):
    """`smolalign export`: a model as one GGUF file for llama.cpp, Ollama and LM Studio."""

    command: ClassVar[str] = "export"

    model: str | None = option(
        None, "A run folder (its final/), a model or LoRA adapter folder, or a Hub id; default: the embedded "
        "SmolLM2-135M-Instruct.", positional=True,
    )
    output: str = required("The .gguf file to write.")
    quantization: Quantization = option("q8_0", "Storage type of the matrices: " + ", ".join(QUANTIZATIONS) + ".")


@dataclass
class ExportBenchConfig(Settings):
    """`smolalign bench export`: the embedded model exported at each quantization, each file's size, and how
    often it predicts the float model's next token."""

    command: ClassVar[str] = "bench export"

    quantization: list[Quantization] = option(list(QUANTIZATIONS), "Quantizations to export, as a comma list.")
    texts: int = option(16, "Held-out HH-RLHF conversations the files predict.")
    max_tokens: int = option(128, "Tokens of each conversation compared.")
    output_dir: str = option("runs/export", "Where the .gguf files, export.json and export.md go.")

    def validate(self) -> None:
        require_at_least(self, 1, "texts", "max_tokens")
        require(bool(self.quantization), "'quantization' names no quantization.")
