"""`smolalign bench generation`: how much faster smolalign answers prompts than transformers' own loop.

The same model answers the same held-out prompts greedily three ways, one after the other in one process:
transformers' `generate` called once per prompt (what a notebook does), smolalign's generation one prompt at
a time, and smolalign's generation in batches (left padding, one KV cache, EOS per row:
evaluation/generation.py). A short warm-up of both paths comes
first, so no one-time cost lands in one of the timings. The table gives the new tokens, seconds, tokens/s,
the speed-up over transformers' loop, and how many answers are identical to that loop's.

Writes generation.json and generation.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from smolalign.config.commands import GenerationBenchConfig
from smolalign.config.train import TrainConfig
from smolalign.data.prepare import read_pairs, tokenize_and_fit
from smolalign.data.sources import bundled_dataset
from smolalign.errors import UserError
from smolalign.evaluation.generation import generate_answers
from smolalign.models.loading import load_for_scoring, load_tokenizer, resolve_device
from smolalign.models.memory import freed_memory_kept

TRANSFORMERS_LOOP = "transformers generate, one prompt at a time"


@dataclass
class GenerationTiming:
    """One way of answering the prompts: what it produced and how long it took."""

    method: str
    new_tokens: int
    seconds: float
    same_as_loop: int  # answers identical to those of transformers' loop

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds


def transformers_loop(model, prompts: list[list[int]], *, max_new_tokens: int, eos_token_id: int,
                      pad_token_id: int, device: torch.device) -> list[list[int]]:
    """Greedy answers from `generate` called once per prompt (an answer keeps its EOS token, as smolalign's do)."""
    answers = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
            answers.append(output[0, len(prompt):].tolist())
    return answers


def generation_bench(config: GenerationBenchConfig) -> list[GenerationTiming]:
    """Time the three ways of answering (see the module's docstring); writes generation.json and .md."""
    device = resolve_device(config.device)
    with freed_memory_kept(device):  # as `smolalign eval` does; all three ways run under it
        return _time_generation(config, device)


def _time_generation(config: GenerationBenchConfig, device) -> list[GenerationTiming]:
    """The same prompts answered by each way in turn, timed, and their answers compared with the loop's."""
    tokenizer = load_tokenizer(config.model)
    read = read_pairs(config.dataset or bundled_dataset("test"), split="test", limit=config.prompts)
    pairs = tokenize_and_fit(read, tokenizer, max_length=TrainConfig.max_length,
                             max_prompt_length=TrainConfig.max_prompt_length, use="answers")
    if len(pairs) < config.prompts:
        raise UserError(f"the dataset gave {len(pairs)} usable prompts, fewer than 'prompts' ({config.prompts}).")
    prompts = [pair.prompt_ids for pair in pairs[: config.prompts]]
    model = load_for_scoring(config.model, dtype=torch.float32, device=device, tokenizer=tokenizer)
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "device": device}
    greedy = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "seed": 0, **ids}

    def smolalign(batch_size: int, chosen: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return generate_answers(model, chosen, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                desc=f"smolalign, batch {batch_size}", **greedy)

    warm_up = prompts[:2]
    transformers_loop(model, warm_up, max_new_tokens=4, **ids)
    smolalign(2, warm_up, 4)

    timings, loop_answers = [], None
    runs = [(TRANSFORMERS_LOOP, lambda: transformers_loop(model, prompts, max_new_tokens=config.max_new_tokens, **ids)),
            ("smolalign, one prompt at a time", lambda: smolalign(1, prompts, config.max_new_tokens)),
            (f"smolalign, batches of {config.generation_batch_size}",
             lambda: smolalign(config.generation_batch_size, prompts, config.max_new_tokens))]
    for method, answer in runs:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        answers = answer()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if loop_answers is None:
            loop_answers = answers
        same = sum(a == b for a, b in zip(answers, loop_answers, strict=True))
        timings.append(GenerationTiming(method, sum(map(len, answers)), seconds, same))
    write_outputs(config, timings, device)
    return timings


def generation_table(timings: list[GenerationTiming], prompts: int) -> str:
    """Markdown: one row per way of answering, with its speed-up over transformers' loop."""
    loop = timings[0]
    lines = ["| generation | new tokens | seconds | tokens/s | speed-up | answers as the loop's |",
             "|---|---|---|---|---|---|"]
    for t in timings:
        lines.append(f"| {t.method} | {t.new_tokens} | {t.seconds:.1f} | {t.tokens_per_second:.1f} | "
                     f"{t.tokens_per_second / loop.tokens_per_second:.2f}x | {t.same_as_loop}/{prompts} |")
    return "\n".join(lines)


def write_outputs(config: GenerationBenchConfig, timings: list[GenerationTiming], device: torch.device) -> None:
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    heading = (f"Greedy answers to {config.prompts} prompts, at most {config.max_new_tokens} new tokens each, "
               f"on {device.type} ({torch.get_num_threads()} threads).")
    markdown = f"{heading}\n\n{generation_table(timings, config.prompts)}\n"
    (output_dir / "generation.md").write_text(markdown)
    (output_dir / "generation.json").write_text(json.dumps(
        {"settings": config.to_dict(), "device": device.type,
         "timings": [asdict(t) | {"tokens_per_second": t.tokens_per_second} for t in timings]}, indent=2))
    print(markdown)
