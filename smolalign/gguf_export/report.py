"""Numbers for the README: the embedded SmolLM2-135M-Instruct exported at each quantization, each file's size,
and how often it picks the float model's next token on real conversations, read back by transformers."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from smolalign.config.choices import QUANTIZATIONS
from smolalign.data.sources import bundled_dataset
from smolalign.gguf_export.gguf import export_gguf
from smolalign.models.embedded import EMBEDDED_NAME
from smolalign.models.loading import model_source

log = logging.getLogger("smolalign")


def export_report(
    folder: str | Path,
    *,
    quantizations: Sequence[str] = tuple(QUANTIZATIONS),
    texts: int = 16,
    max_tokens: int = 128,
) -> list[dict]:
    """Export the embedded model into `folder` at each quantization and measure each file.

    Returns one dict per quantization: `quantization`, `bytes` (the file's size), `top1_agreement` (the
    fraction of positions at which the file, de-quantized by transformers' GGUF loader, predicts the same next
    token as the float model) and `positions` (how many were compared: the first `max_tokens` tokens of the
    first `texts` conversations of the bundled HH-RLHF test split that are at least that long).
    """
    source = model_source(None)
    ids = conversation_ids(AutoTokenizer.from_pretrained(source), texts=texts, max_tokens=max_tokens)
    reference = next_tokens(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), ids)
    rows = []
    for quantization in quantizations:
        output = Path(folder) / f"{EMBEDDED_NAME}-{quantization}.gguf"
        path = export_gguf(None, output, quantization=quantization)
        read = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        agreement = (next_tokens(read, ids) == reference).float().mean().item()
        rows.append({"quantization": quantization, "bytes": path.stat().st_size, "top1_agreement": agreement,
                     "positions": reference.numel()})
        log.info("%s: %.1f MB, top-1 agreement %.3f", quantization, path.stat().st_size / 1e6, agreement)
    return rows


def conversation_ids(tokenizer, *, texts: int, max_tokens: int) -> torch.Tensor:
    """(texts, max_tokens) token ids: chosen conversations of the bundled test split, cut to one length."""
    lines = Path(bundled_dataset("test")).read_text().splitlines()
    ids = (tokenizer(json.loads(line)["chosen"]).input_ids for line in lines)
    return torch.tensor([row[:max_tokens] for row in ids if len(row) >= max_tokens][:texts])


def next_tokens(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """The model's top-1 next token at every position, one conversation at a time (bounded memory)."""
    with torch.no_grad():
        return torch.stack([model.eval()(row[None]).logits[0].argmax(-1) for row in ids])
