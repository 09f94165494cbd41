"""The scoring path: tokenized pairs -> batches of one layout -> per-pair log-probs, in a token budget.

Training steps, the reference pass, held-out evaluation and drift all batch pairs through `PairScoring`,
so a layout, a padding id, a device and a token budget are chosen once per run and travel together.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from smolalign.core.layouts import Batch, build_batch, split_by_tokens
from smolalign.core.logprobs import KEEP_SOFTMAX_ELEMENTS, PairLogps, concat_pair_logps, score_batch
from smolalign.data.tokenize import TokenizedPair
from smolalign.models.attention import FLEX_IMPLEMENTATIONS
from smolalign.models.loading import base_model_of

log = logging.getLogger("smolalign")


@dataclass(frozen=True)
class ScorerView:
    """A scorer run without gradients inside `context`, which puts its model in the state to score in: the
    policy as it is (evaluation, drift), or a PEFT policy's `disable_adapter` (its own reference)."""

    scorer: nn.Module  # a SequenceScorer (or RewardScorer), possibly wrapped by Accelerate
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @torch.no_grad()
    def logps(self, batch: Batch, pairs: list[TokenizedPair] | None = None) -> PairLogps:
        """Per-pair log-probs of `batch` (its `pairs` are not needed: the batch holds their tokens)."""
        with self.context():
            return score_batch(self.scorer, batch)


@dataclass(frozen=True)
class PairScoring:
    """How pairs become model input: batches in `layout`, padded with `pad_token_id`, on `device`, of whole
    pairs up to `max_tokens` tokens each (a longer pair goes alone). Layouts and token budgets change no
    number beyond float noise; they bound the memory of one forward pass."""

    layout: str
    pad_token_id: int
    device: torch.device
    max_tokens: int

    def chunks(self, pairs: list[TokenizedPair]) -> list[list[TokenizedPair]]:
        """Consecutive chunks of `pairs`, each one forward pass."""
        return split_by_tokens(pairs, self.max_tokens)

    def batch(self, chunk: list[TokenizedPair], *, score_prompt: bool = False, score_ends: bool = False) -> Batch:
        """The model input of one chunk, on the device (`build_batch` says what is scored)."""
        return build_batch(chunk, self.layout, pad_token_id=self.pad_token_id, score_prompt=score_prompt,
                           score_ends=score_ends).to(self.device)

    def batches(self, chunks: list[list[TokenizedPair]], *, score_ends: bool = False, desc: str | None = None
                ) -> Iterator[tuple[list[TokenizedPair], Batch]]:
        """Each chunk with its batch (answer tokens scored, or with `score_ends` each answer's last token), with
        a progress bar when `desc` is given."""
        for chunk in tqdm(chunks, desc=desc, unit="chunk", disable=desc is None):
            yield chunk, self.batch(chunk, score_ends=score_ends)

    def logps(self, scorer: ScorerView, pairs: list[TokenizedPair], *, desc: str | None = None) -> PairLogps:
        """Per-pair answer log-prob sums and token counts of every pair, in order, on the CPU."""
        return self.chunk_logps(scorer, self.chunks(pairs), desc=desc)

    def chunk_logps(self, scorer: ScorerView, chunks: list[list[TokenizedPair]], *, desc: str | None = None
                    ) -> PairLogps:
        """`logps` of the pairs of `chunks`, each chunk one forward pass."""
        return concat_pair_logps([scorer.logps(batch, chunk) for chunk, batch in self.batches(chunks, desc=desc)]).cpu()

CPU_MAX_TOKENS_PER_FORWARD = 256  # about one HH-RLHF pair: a CPU gains nothing from larger float32 forward passes
CPU_BF16_MAX_TOKENS_PER_FORWARD = 1024  # bf16 matmuls of 576-wide models reach their speed only on more rows
GPU_MAX_TOKENS_PER_FORWARD = 32768  # a GPU is saturated well before; larger chunks would only cost memory
GPU_MIN_TOKENS_PER_FORWARD = 1024
GPU_MEMORY_HEADROOM = 0.8  # of the estimated room: allocator fragmentation, CUDA kernels' workspaces


def activation_bytes_per_token(config, *, half: bool, dense_attention_length: int | None = None,
                               checkpointing: bool = False) -> float:
    """Bytes a training forward pass of a Llama-shaped decoder keeps for its backward pass, per token.

    Per layer it keeps about ten hidden-sized tensors (the inputs and outputs of the two norms, q, k and
    v before and after rotary embeddings, the attention output), four intermediate-sized ones (gate, up,
    the activated gate, their product) and the key-value projections; under half-precision autocast the
    norms' inputs stay float32 and matmul outputs are half, about 3.25 bytes per element on average
    (measured on the CPU: 14 kB per token and layer for hidden 256, intermediate 688, where this gives
    18 kB). One more layer's worth covers the transient gradients of the backward pass. SDPA with a dense
    4-D mask runs the math kernel, which also keeps the attention probabilities: `dense_attention_length`
    keys per head and token. Gradient checkpointing keeps only each layer's input, plus one layer at a time.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_size = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    bytes_per_element = 3.25 if half else 4
    per_layer = bytes_per_element * (10 * max(hidden, heads * head_dim) + 4 * config.intermediate_size + 4 * kv_size)
    if dense_attention_length:
        per_layer += heads * dense_attention_length * (2 if half else 4)
    kept_layers = 1 + (layers if not checkpointing else 0)
    return per_layer * kept_layers + 4 * hidden * (layers if checkpointing else 0) + 3 * 4 * hidden


def default_max_tokens_per_forward(model: torch.nn.Module, device: torch.device, *, mixed_precision: str,
                                   max_length: int, free_bytes: int | None = None) -> int:
    """Tokens per forward pass (`max_tokens_per_forward` when the config leaves it unset).

    On a CPU, 256 (about one pair), or 1024 under bf16 autocast. On CUDA, what fits in the memory that is free now (the driver's
    free memory plus what PyTorch's allocator holds unused): minus what the first optimizer step will
    add (a float32 gradient and AdamW's two moments per trainable parameter, and under autocast a half
    copy of the float32 weights) and the log-prob head's kept softmax, with 20% headroom, divided by
    `activation_bytes_per_token`; between 1024 and 32768 tokens. Call it after the model is on the
    device and before the optimizer exists. A reference model loaded after it (a `ref_model` kept for
    every step instead of precomputed) is not counted: set `max_tokens_per_forward` for such runs.
    """
    if device.type != "cuda":
        return CPU_BF16_MAX_TOKENS_PER_FORWARD if mixed_precision == "bf16" else CPU_MAX_TOKENS_PER_FORWARD
    if free_bytes is None:
        driver_free, _ = torch.cuda.mem_get_info(device)
        free_bytes = driver_free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    base = base_model_of(model)
    half = mixed_precision in ("bf16", "fp16")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    float32_weights = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)
    optimizer_bytes = 12 * trainable + (2 * float32_weights if half else 0)
    head_bytes = 4 * KEEP_SOFTMAX_ELEMENTS
    dense = base.config._attn_implementation not in FLEX_IMPLEMENTATIONS
    per_token = activation_bytes_per_token(
        base.config, half=half, dense_attention_length=max_length if dense else None,
        checkpointing=any(getattr(module, "gradient_checkpointing", False) is True for module in base.modules()),
    )
    room = GPU_MEMORY_HEADROOM * (free_bytes - optimizer_bytes - head_bytes)
    tokens = int(room // per_token)
    if tokens < GPU_MIN_TOKENS_PER_FORWARD:
        log.warning("little GPU memory is left for activations (%.1f GB free): forward passes of %d tokens "
                    "may not fit; consider LoRA or gradient_checkpointing", free_bytes / 1e9,
                    GPU_MIN_TOKENS_PER_FORWARD)
    chosen = min(max(tokens, GPU_MIN_TOKENS_PER_FORWARD), GPU_MAX_TOKENS_PER_FORWARD)
    log.info("max_tokens_per_forward %d (%.1f GB free on %s, about %.0f kB of activations per token)",
             chosen, free_bytes / 1e9, device, per_token / 1e3)
    return chosen
