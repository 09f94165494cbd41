"""Answers generated in batches: left padding, a shared prompt cache, EOS per row; greedy or sampled."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import Cache, DynamicLayer

from smolalign.errors import UserError, first_line
from smolalign.models.packed import packed_linears

log = logging.getLogger("smolalign")

GENERATION_BATCH_SIZE = 16
NEAR_TIE = 3e-5
"""A choice is near-tied when its top two scores differ by less than this times max(1, |top logit|): float32
rounding differs between a batched and a one-row run by up to 1e-4 on SmolLM2-135M's logits of ~45 (2e-6 of
them, measured), and between packed and plain matmul kernels (models/packed.py) by up to 1.7e-4 (6.2e-6 of
the top logit, over 16 prompts of 200-350 tokens). A gap moves by at most twice that, 1.25e-5, so only
near-tied choices could come out differently."""


@dataclass
class GeneratedBatch:
    """Answers to a batch of prompts (`rows`: their indices), with what the batch's decoding computed on the way:
    each answer's logits (with `keep_logits`) and the prompts' KV cache (with `keep_prompt_cache`)."""

    rows: list[int]
    answers: list[list[int]]
    margins: list[float]
    logits: list[list[torch.Tensor]] | None = None
    """Per answer, the model's raw logits ([vocabulary]) at each of its steps (sampling draws from processed
    ones): views of `generate`'s logits, not copies."""
    prompt_cache: PreallocatedCache | None = None
    """Each prompt but its last token, left-padded to the longest; None where no prompt cache was stacked."""
    redone: int = 0
    """Answers generated again alone after a near-tie (see `generate_in_batches`)."""
    seconds: float = 0.0
    """How long the batch's generation took."""

    def replace_row(self, j: int, alone: GeneratedBatch) -> None:
        """Row `j`'s answer, margin and logits from `alone`, its prompt generated alone."""
        self.answers[j], self.margins[j] = alone.answers[0], alone.margins[0]
        if self.logits is not None:
            self.logits[j] = alone.logits[0]
        self.redone += 1


@dataclass
class GenerationLog:
    """What a model generated and how fast, for the log line of `desc`."""

    desc: str
    answers: int = 0
    new_tokens: int = 0
    redone: int = 0
    seconds: float = 0.0

    def add(self, batch: GeneratedBatch) -> None:
        self.answers += len(batch.answers)
        self.new_tokens += sum(map(len, batch.answers))
        self.redone += batch.redone
        self.seconds += batch.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def report(self) -> None:
        log.info("%s: %d answers, %d new tokens in %.1f s (%.1f tokens/s)%s", self.desc, self.answers,
                 self.new_tokens, self.seconds, self.tokens_per_second,
                 f"; {self.redone} generated again alone after a near-tie" if self.redone else "")


def generate_answers(model: torch.nn.Module, prompts: list[list[int]], *, desc: str, **options) -> list[list[int]]:
    """The model's answer ids to each prompt (prompt ids already end with the generation prompt), generated
    in batches by `generate_in_batches` (its options); an answer ends with the EOS token when the model stopped."""
    answers: list[list[int]] = [[] for _ in prompts]
    progress = GenerationLog(desc)
    with packed_linears(model), tqdm(total=len(prompts), desc=desc, unit="prompt") as bar:
        for batch in generate_in_batches(model, prompts, **options):
            for row, answer in zip(batch.rows, batch.answers, strict=True):
                answers[row] = answer
            progress.add(batch)
            bar.update(len(batch.rows))
            bar.set_postfix_str(f"{progress.tokens_per_second:.1f} tokens/s")
    progress.report()
    return answers


@torch.no_grad()
def generate_in_batches(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    seed: int,
    eos_token_id: int,
    pad_token_id: int,
    device: torch.device,
    batch_size: int = GENERATION_BATCH_SIZE,
    keep_logits: bool = False,
    keep_prompt_cache: bool = False,
) -> Iterator[GeneratedBatch]:
    """The model's answers to `prompts`, `batch_size` prompts at a time, longest prompts first (so that prompts
    of similar length share a batch). Each batch runs within `context()` (a LoRA reference's adapters off), so
    two models' batches can be interleaved.

    A batch runs each prompt but its last token alone (no padding) and stacks the KV caches, left-padded, into
    buffers with room for the new tokens (`stacked_prompt_cache`); `generate` then decodes one token per step,
    each row stopping at its own EOS.

    Greedy answers equal one-at-a-time generation's: batched float32 matmuls round differently from one-row
    ones, which can change a choice only where its top two scores are nearly tied, so every choice's margin is
    recorded and an answer with a near-tie (NEAR_TIE) is generated again alone. This holds for float32 weights
    with full-precision matmuls; in bf16 or fp16 a batched row's logits differ from a one-row run's by about 2%
    of the top logit on SmolLM2-135M, so nearly every answer would have to be generated again: there batched
    answers, like answers under any other change of kernel, may differ from one-at-a-time ones at near-ties.

    Sampling draws each prompt's tokens from its own generator seeded with `seed` + the prompt's index, by the
    Gumbel-max trick within the top-p nucleus (a draw from softmax(logits / temperature) there), so an answer
    depends on the seed and the prompt's index only, and the policy and the reference answer a prompt with the
    same random numbers. There is no implicit top-k: temperature and top_p alone shape the distribution.
    """
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise UserError(f"sampling needs --temperature > 0 and 0 < --top_p <= 1 (got {temperature} and {top_p}).")
    settings = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature,
                "top_p": top_p, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "device": device,
                "keep_logits": keep_logits}
    near_tie = NEAR_TIE if computes_in_full_float32(model) else 0.0
    longest_first = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(prompts), batch_size):
        rows = longest_first[start:start + batch_size]
        started = time.perf_counter()
        with context():
            batch = generate_batch(model, rows, [prompts[i] for i in rows], [seed + i for i in rows],
                                   keep_prompt_cache=keep_prompt_cache, **settings)
            for j, row in enumerate(rows):
                if len(rows) > 1 and batch.margins[j] < near_tie:  # batched rounding might have swapped this choice
                    batch.replace_row(j, generate_batch(model, [row], [prompts[row]], [seed + row], **settings))
        batch.seconds = time.perf_counter() - started
        yield batch
        del batch  # its logits and cache are not kept while the next batch is generated


def computes_in_full_float32(model: torch.nn.Module) -> bool:
    """Float32 weights, and float32 matmuls not rounded to TF32 or bf16 (torch.set_float32_matmul_precision)."""
    return model.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


def generate_batch(
    model: torch.nn.Module,
    rows: list[int],
    prompts: list[list[int]],
    seeds: list[int],
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    eos_token_id: int,
    pad_token_id: int,
    device: torch.device,
    keep_logits: bool = False,
    keep_prompt_cache: bool = False,
) -> GeneratedBatch:
    """Answers to `prompts` (those of `rows`) decoded together, and for each answer the smallest margin of its
    choices (the gap between the top two scores over max(1, |top logit|)); with `keep_logits` each answer's
    logits, with `keep_prompt_cache` the stacked prompt cache, rewound. One prompt is exactly one-at-a-time
    generation."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    choices = RecordedChoices(seeds if do_sample else None, temperature=temperature, top_p=top_p, device=device)
    cache = (stacked_prompt_cache(model, prompts, capacity=width + max_new_tokens, device=device) if len(prompts) > 1
             else None)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        do_sample=False,  # generate's argmax; sampling happens in RecordedChoices
        logits_processor=LogitsProcessorList([choices]),
        return_dict_in_generate=True,
        output_logits=keep_logits,
        **({"past_key_values": cache} if cache is not None else {}),
    )
    margins = torch.stack(choices.margins).cpu()  # [steps, rows]
    prompt_cache = cache if keep_prompt_cache else None
    if prompt_cache is not None:
        prompt_cache.rewind()
    batch = GeneratedBatch(rows, [], [], [] if keep_logits else None, prompt_cache)
    for row, tokens in enumerate(output.sequences[:, width:].tolist()):
        length = tokens.index(eos_token_id) + 1 if eos_token_id in tokens else len(tokens)  # padding after EOS
        batch.answers.append(tokens[:length])
        batch.margins.append(margins[:length, row].min().item())
        if keep_logits:
            batch.logits.append([step[row] for step in output.logits[:length]])
    return batch


def stacked_prompt_cache(model: torch.nn.Module, prompts: list[list[int]], *, capacity: int, device: torch.device):
    """The KV cache of each prompt but its last token, each computed alone, stacked left-padded into one batch
    cache with room for `capacity` positions (`generate` runs the last tokens). None where a cache is not plain
    keys and values per layer (sliding windows, ...) or a prompt has a single token: `generate` then runs the
    padded prompts itself."""
    if min(map(len, prompts)) < 2 or not preallocation_works():
        return None
    width = max(map(len, prompts)) - 1
    per_prompt = []
    for prompt in prompts:
        output = model(input_ids=torch.tensor([prompt[:-1]], device=device), use_cache=True, logits_to_keep=1)
        cache = output.past_key_values
        if not isinstance(cache, DynamicCache) or any(cache.is_sliding):
            return None
        layers = [(keys, values) for keys, values, *_ in cache]
        if any(keys is None for keys, _ in layers):
            return None
        per_prompt.append(layers)
    return PreallocatedCache([PreallocatedLayer([states for states, _ in layer], [states for _, states in layer],
                                                width=width, capacity=capacity)
                              for layer in zip(*per_prompt, strict=True)])


class PreallocatedLayer(DynamicLayer):
    """A cache layer whose keys and values sit at the front of buffers with room for `capacity` positions, so
    that a decoding step writes its position in place instead of copying the whole cache (DynamicLayer's
    torch.cat each step). Built from one prompt's [1, heads, length, head_dim] states per row, each
    left-padded to `width` with zeros. Should the cache outgrow the buffers or be replaced (`generate`
    reordering it), it grows like a DynamicLayer. It subclasses transformers' DynamicLayer, whose internals may
    change between releases: `preallocation_works` checks it once per process before it is used."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], *, width: int, capacity: int):
        super().__init__()
        self.lazy_initialization(keys[0], values[0])
        self.key_buffer, self.value_buffer = (
            states[0].new_zeros(len(states), states[0].shape[1], capacity, states[0].shape[-1])
            for states in (keys, values))
        for row, (k, v) in enumerate(zip(keys, values, strict=True)):
            self.key_buffer[row, :, width - k.shape[-2]:width] = k[0]
            self.value_buffer[row, :, width - v.shape[-2]:width] = v[0]
        self.width = width
        self.rewind()

    def rewind(self) -> None:
        """Back to the prompts' states it was built with, as if nothing had been decoded."""
        self.keys, self.values = self.key_buffer[..., :self.width, :], self.value_buffer[..., :self.width, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self.key_buffer.shape[-2] or self.keys.data_ptr() != self.key_buffer.data_ptr():
            return super().update(key_states, value_states, *args, **kwargs)
        self.key_buffer[..., start:end, :] = key_states
        self.value_buffer[..., start:end, :] = value_states
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        return self.keys, self.values


@functools.cache
def preallocation_works() -> bool:
    """Whether PreallocatedLayer builds and updates as a DynamicLayer would in this transformers (else batches
    decode with `generate`'s own cache: slower, the same answers)."""
    states = [torch.arange(12.0).reshape(1, 2, 3, 2), torch.arange(8.0).reshape(1, 2, 2, 2)]
    step = torch.full((2, 2, 1, 2), -1.0)
    try:
        layer = PreallocatedLayer(states, [s + 100 for s in states], width=3, capacity=5)
        keys, values = layer.update(step, step - 1)
    except Exception as error:  # a changed private API: any failure means "do not use it"
        log.info("batched generation without preallocated caches: %s", first_line(error))
        return False
    padded = torch.cat([states[0], torch.cat([torch.zeros(1, 2, 1, 2), states[1]], dim=2)])
    return torch.equal(keys, torch.cat([padded, step], dim=2)) and torch.equal(values[..., :3, :][0], states[0][0] + 100)


class PreallocatedCache(DynamicCache):
    """A DynamicCache made of given PreallocatedLayers."""

    def __init__(self, layers: list[PreallocatedLayer]):
        Cache.__init__(self, layers=layers)

    def rewind(self) -> None:
        """Back to the prompts' states, ready for other tokens after them (decoding wrote past them)."""
        for layer in self.layers:
            layer.rewind()


class RecordedChoices(LogitsProcessor):
    """The last of `generate`'s logits processors. It records, at every step, each row's margin: the gap
    between its top two scores over max(1, |top logit|). When sampling (`seeds` given), it first replaces the
    scores by logits + temperature x Gumbel noise from each row's own generator, outside the top-p nucleus
    -inf, so that generate's argmax draws the token."""

    def __init__(self, seeds: list[int] | None, *, temperature: float, top_p: float, device: torch.device):
        self.generators = None if seeds is None else [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p
        self.margins: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scale = scores.max(-1).values.abs().clamp(min=1.0)
        nucleus_margin = None
        if self.generators is not None:
            uniform = torch.stack([
                torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators
            ])
            gumbel = -(-uniform.log()).log()  # uniform 0 gives -inf: that token is never drawn
            scores, nucleus_margin = gumbel_scores(scores, gumbel, temperature=self.temperature, top_p=self.top_p)
        top_two = scores.topk(2, dim=-1).values
        margin = (top_two[:, 0] - top_two[:, 1]) / scale
        if nucleus_margin is not None:
            margin = torch.minimum(margin, nucleus_margin / scale)
        self.margins.append(margin)
        return scores


def gumbel_scores(
    logits: torch.Tensor, gumbel: torch.Tensor, *, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores whose argmax is a draw from softmax(logits / temperature) restricted to the top-p nucleus
    (the fewest most likely tokens whose probabilities reach top_p), given standard Gumbel noise of the same
    shape ([rows, vocabulary]); in logit units: logits + temperature x noise, -inf outside the nucleus.

    Also, per row, how near the nucleus's edge was to moving, in logit units: the smallest distance between
    top_p and the probability mass before a token, times temperature / 2 (a logit change of d moves that mass
    by at most 2d / temperature). Infinite without a nucleus (top_p 1)."""
    scores = logits + temperature * gumbel
    if top_p >= 1:
        return scores, torch.full(logits.shape[:-1], torch.inf, device=logits.device)
    probabilities = (logits / temperature).softmax(-1)
    sorted_probabilities, order = probabilities.sort(dim=-1, descending=True)
    mass_before = sorted_probabilities.cumsum(-1) - sorted_probabilities
    in_nucleus = torch.zeros_like(mass_before, dtype=torch.bool).scatter(-1, order, mass_before < top_p)
    edge = (mass_before - top_p).abs().min(-1).values * temperature / 2
    return scores.masked_fill(~in_nucleus, -torch.inf), edge
