"""A Llama model's tensors as llama.cpp stores them: GGUF names, rotary layout, storage type, bytes.

llama.cpp's `llama` architecture computes what transformers' LlamaForCausalLM computes, from the same
weights stored differently:
- names: `model.layers.3.self_attn.q_proj.weight` is `blk.3.attn_q.weight`, the head is `output.weight`;
  with tied embeddings there is no `output.weight` and llama.cpp reads the head from `token_embd.weight`;
- query and key rows are interleaved per head (`interleave_rotary_halves`);
- 1-D tensors (norms, biases, rope factors) stay float32; matrices take the asked type, and f16 where
  their rows are not whole blocks of it, as llama.cpp's converter does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, LlamaFileType
from gguf.quants import quantize
from transformers import PreTrainedModel

from smolalign.errors import UserError

# Each of config.choices.QUANTIZATIONS: the type its matrices are stored in, and the file type llama.cpp reads.
STORAGE: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
}

# A 4-bit file keeps the output head at 8 bits: next-token choices are the most sensitive to it, and
# llama.cpp's quantizer gives it more bits too (Q6_K, or Q8_0 where rows are not whole Q6_K blocks,
# as in SmolLM2; the gguf package has no Q6_K quantizer).
HEAD_TYPE_IN_4BIT = GGMLQuantizationType.Q8_0
FOUR_BIT = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)

TOP_TENSORS = {
    "model.embed_tokens": MODEL_TENSOR.TOKEN_EMBD,
    "model.norm": MODEL_TENSOR.OUTPUT_NORM,
    "lm_head": MODEL_TENSOR.OUTPUT,
}
LAYER_TENSORS = {
    "input_layernorm": MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj": MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
    "post_attention_layernorm": MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj": MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
}
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
TOP_KEY = re.compile(r"(.+)\.(weight|bias)")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: GGUF name, shape in torch's order (rows, columns), storage type, and its
    float values in llama.cpp's layout, computed when written so that one tensor at a time is converted."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    values: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        block_size, block_bytes = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block_size * block_bytes

    def encode(self) -> np.ndarray:
        """The bytes to write: float32 or f16 values, or bf16 / quantized blocks as uint8."""
        values = self.values().detach().to(torch.float32).contiguous().numpy()
        return quantize(values, self.qtype)


def gguf_name(key: str) -> str:
    """llama.cpp's name of the tensor a transformers state-dict key holds (`blk.0.attn_q.weight`)."""
    if match := LAYER_KEY.fullmatch(key):
        layer, module, kind = match.groups()
        if module in LAYER_TENSORS:
            return f"{TENSOR_NAMES[LAYER_TENSORS[module]].format(bid=int(layer))}.{kind}"
    elif (match := TOP_KEY.fullmatch(key)) and match.group(1) in TOP_TENSORS:
        return f"{TENSOR_NAMES[TOP_TENSORS[match.group(1)]]}.{match.group(2)}"
    raise UserError(f"the model has a tensor '{key}' that llama.cpp's llama architecture has no place for, "
                    "so it cannot be exported to GGUF.")


def interleave_rotary_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Query or key rows (weight or bias) from transformers' rotary layout to llama.cpp's.

    Within a head, transformers rotates dimension i together with dimension i + head_dim/2 (`rotate_half`);
    llama.cpp's `llama` architecture rotates dimension 2i with 2i + 1. Row i of each head's first half
    moves to row 2i and row i of its second half to row 2i + 1, so both compute the same attention.
    """
    halves = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return halves.transpose(1, 2).reshape(weight.shape)


def storage_type(shape: tuple[int, ...], quantization: str, *, is_head: bool) -> GGMLQuantizationType:
    """The type a tensor is stored in: float32 for 1-D tensors, else the asked one (8 bits for the head of a
    4-bit file), and f16 where a row is not a whole number of the type's blocks."""
    if len(shape) == 1:
        return GGMLQuantizationType.F32
    wanted = STORAGE[quantization][0]
    if is_head and wanted in FOUR_BIT:
        wanted = HEAD_TYPE_IN_4BIT
    block_size, _ = GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block_size == 0 else GGMLQuantizationType.F16


def plan_tensors(
    model: PreTrainedModel, quantization: str, *, rope_factors: torch.Tensor | None = None
) -> list[GGUFTensor]:
    """Every tensor of the GGUF file, in the order written: rope factors (when the model scales its rope
    per frequency), then the model's state dict without the tied head."""
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    tensors = []
    if rope_factors is not None:
        name = f"{TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS]}.weight"
        shape = tuple(rope_factors.shape)
        tensors.append(GGUFTensor(name, shape, GGMLQuantizationType.F32, lambda: rope_factors))
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reads the head from token_embd when output.weight is absent
        name = gguf_name(key)
        is_head = name == "output.weight" or (tied and name == "token_embd.weight")
        shape = tuple(value.shape)
        tensors.append(GGUFTensor(name, shape, storage_type(shape, quantization, is_head=is_head),
                                  _layout(value, heads.get(name.split(".")[-2]))))
    return tensors


def _layout(value: torch.Tensor, rotary_heads: int | None) -> Callable[[], torch.Tensor]:
    if rotary_heads is None:
        return lambda: value
    return lambda: interleave_rotary_halves(value, rotary_heads)
