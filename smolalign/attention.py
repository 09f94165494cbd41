"""Which attention kernel runs the packed and prefix-shared layouts, and the mask handed to it.

Those layouts need a mask that is neither causal nor padding-only: sequences packed in a row must not
see each other, a rejected answer must not see the chosen one. SDPA takes such a mask as a dense 4-D
tensor, which on CUDA sends it to its slow math kernel (the fused kernels take causal or padding masks
only). FlexAttention takes the same mask as a `BlockMask`, built once per batch from the token ids of
`batching.AttentionMask`, and runs a fused kernel that skips the 128 x 128 tiles no query may see.

On CUDA, models are therefore loaded with `block_sparse` attention: transformers' FlexAttention for a
`BlockMask`, its SDPA for anything else. Only smolalign's own scoring passes hand over a `BlockMask`;
generation, the padded layout and any other caller of the model get SDPA exactly as before. On the
CPU, FlexAttention has no backward pass (PyTorch 2.13) and compiles slowly, so SDPA with the dense mask
stays the default there.
"""

from __future__ import annotations

import logging

import torch

from smolalign.batching import AttentionMask
from smolalign.errors import UserError

log = logging.getLogger("smolalign")

BLOCK_SPARSE = "smolalign_block_sparse"  # registered below: FlexAttention for BlockMasks, SDPA otherwise
FLEX_IMPLEMENTATIONS = (BLOCK_SPARSE, "flex_attention")
BLOCK_MASK_IMPLEMENTATIONS = (*FLEX_IMPLEMENTATIONS, "sdpa", "eager")  # those that take the layouts' masks
ATTENTION_CHOICES = ("auto", "sdpa", "flex_attention", "eager")


def _block_sparse_attention(module, query, key, value, attention_mask, **kwargs):
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if isinstance(attention_mask, BlockMask):
        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(BLOCK_SPARSE, _block_sparse_attention)
    AttentionMaskInterface.register(BLOCK_SPARSE, sdpa_mask)  # 2-D padding masks become SDPA's masks


_register()


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention(requested: str, device: torch.device) -> str | None:
    """The `attn_implementation` to load a model with, for `attention` auto, sdpa, flex_attention or eager.

    auto is `block_sparse` on CUDA when this PyTorch has FlexAttention, else transformers' default (None:
    SDPA where the model supports it). flex_attention on CUDA also means `block_sparse` (the padded layout
    and generation keep SDPA); on the CPU it is refused, as FlexAttention there has no backward pass.
    """
    if requested not in ATTENTION_CHOICES:
        raise UserError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, not '{requested}'.")
    if requested in ("sdpa", "eager"):
        return requested
    if device.type != "cuda":
        if requested == "flex_attention":
            raise UserError("attention flex_attention needs a CUDA GPU (PyTorch's FlexAttention has no backward "
                            "pass on the CPU); use auto or sdpa.")
        return None
    if flex_attention_available():
        return BLOCK_SPARSE
    if requested == "flex_attention":
        raise UserError(f"attention flex_attention needs PyTorch 2.5 or later (this is {torch.__version__}).")
    return None


def describe_attention(implementation: str | None) -> str:
    """How the packed and prefix-shared layouts' masks run under `implementation`, for the log."""
    if implementation is None:
        return "transformers' default (SDPA) with dense 4-D masks"
    if implementation in FLEX_IMPLEMENTATIONS:
        return "FlexAttention block masks"
    if implementation in ("sdpa", "eager"):
        return f"{implementation} with dense 4-D masks"
    return f"{implementation} (padded layout only)"


def model_mask(mask: AttentionMask, implementation: str, dtype: torch.dtype):
    """`mask` in the form the attention `implementation` takes: the padded layout's 2-D padding mask as it
    is; else a BlockMask for FlexAttention, a boolean 4-D mask for SDPA, an additive one for eager
    attention (which adds the mask to the scores)."""
    if not mask.block_causal:
        return mask.padding()
    if implementation in FLEX_IMPLEMENTATIONS:
        return mask.flex()
    dense = mask.dense()
    if implementation == "eager":
        additive = torch.zeros(dense.shape, dtype=dtype, device=dense.device)
        return additive.masked_fill_(~dense, torch.finfo(dtype).min)
    return dense
