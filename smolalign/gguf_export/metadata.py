"""What a llama.cpp-family runtime reads about the model besides its weights: sizes, attention, rope and
file type, under llama.cpp's key names (`general.*`, `llama.*`)."""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_VERSION, GGUFWriter, RopeScalingType
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from smolalign.errors import UserError
from smolalign.gguf_export.tensors import STORAGE

SUPPORTED_ROPE = ("default", "linear", "llama3")


def add_model_metadata(writer: GGUFWriter, config: PretrainedConfig, *, name: str, quantization: str) -> None:
    """Sizes, attention, rope and file type (`llama.*`, `general.*` keys)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_parameters(config)["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope_type(config) == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_parameters(config)["factor"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(STORAGE[quantization][1])
    writer.add_quantization_version(GGML_QUANT_VERSION)


def rope_parameters(config: PretrainedConfig) -> dict:
    return dict(getattr(config, "rope_parameters", None) or {"rope_theta": 10000.0})


def rope_type(config: PretrainedConfig) -> str:
    """The model's rope scaling; those llama.cpp would compute differently from transformers are refused."""
    kind = rope_parameters(config).get("rope_type", "default")
    if kind not in SUPPORTED_ROPE:
        raise UserError(f"the model's rope scaling '{kind}' cannot be exported to GGUF yet (supported: "
                        f"{', '.join(SUPPORTED_ROPE)}).")
    return kind


def rope_factors(model: PreTrainedModel) -> torch.Tensor | None:
    """Llama 3's per-frequency rope scaling as llama.cpp reads it (`rope_freqs.weight`: the unscaled inverse
    frequency over the scaled one, per rotated pair), from the frequencies the transformers model uses."""
    if rope_type(model.config) != "llama3":
        return None
    unscaled, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(model.config)
    return (unscaled / model.model.rotary_emb.inv_freq.float().cpu()).contiguous()
