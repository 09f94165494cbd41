"""Which attention kernel runs the packed and prefix-shared layouts, and the mask handed to it.

Those layouts need a mask that is neither causal nor padding-only: sequences packed in a row must not
see each other, a rejected answer must not see the chosen one. SDPA takes such a mask as a dense 4-D
tensor, which on CUDA sends it to its slow math kernel (the fused kernels take causal or padding masks
only). FlexAttention takes the same mask as a `BlockMask`, built once per batch from the token ids of
`AttentionMask`, and runs a fused kernel that skips the 128 x 128 tiles no query may see.

On CUDA, models are therefore loaded with `block_sparse` attention: transformers' FlexAttention for a
`BlockMask`, its SDPA for anything else. Only smolalign's own scoring passes hand over a `BlockMask`;
generation, the padded layout and any other caller of the model get SDPA exactly as before. On the
CPU, FlexAttention has no backward pass (PyTorch 2.13) and compiles slowly, so SDPA with the dense mask
stays the default there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

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


PROMPT_BRANCH = 0  # a block's shared prompt; answers are branches 1 (chosen) and 2 (rejected)


@dataclass
class AttentionMask:
    """Which tokens each token attends to, kept as two per-token ids rather than a [length x length] grid.

    Query i sees key j when both lie in the same block, j <= i, and j is prompt or on i's own branch;
    padding sees only itself, so no softmax row is empty. The forms a model takes are built from the
    ids on their device when first asked for, and kept: a batch's policy and reference passes share them.
    In the padded layout each row holds one sequence, and its 2-D padding mask says it all (the model
    adds the causal part, as in TRL).
    """

    block_ids: torch.Tensor  # [rows, length] index of the token's block in its row; -1 for padding
    branch_ids: torch.Tensor  # [rows, length] PROMPT_BRANCH, or the answer's branch (1 chosen, 2 rejected)
    block_causal: bool  # False for the padded layout
    _built: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def to(self, device: torch.device | str) -> AttentionMask:
        return AttentionMask(self.block_ids.to(device), self.branch_ids.to(device), self.block_causal)

    def padding(self) -> torch.Tensor:
        """[rows, length] 1 for tokens, 0 for padding."""
        return (self.block_ids >= 0).long()

    def dense(self) -> torch.Tensor:
        """[rows, 1, length, length] bool, True where the query (dim 2) may see the key (dim 3)."""
        if "dense" not in self._built:
            length = self.block_ids.shape[1]
            query = torch.arange(length, device=self.block_ids.device)
            self._built["dense"] = self._visible(
                self.block_ids[:, :, None], self.block_ids[:, None, :], self.branch_ids[:, :, None],
                self.branch_ids[:, None, :], query[:, None], query[None, :],
            )[:, None]
        return self._built["dense"]

    def flex(self):
        """The same mask as a FlexAttention BlockMask: tiles of 128 x 128 that no query may see are skipped,
        tiles that every query may see skip the mask, only the rest evaluate it token by token."""
        if "flex" not in self._built:
            from torch.nn.attention.flex_attention import create_block_mask

            block_ids, branch_ids = self.block_ids, self.branch_ids

            def mask_mod(row, head, query, key):
                return self._visible(block_ids[row, query], block_ids[row, key], branch_ids[row, query],
                                     branch_ids[row, key], query, key)

            rows, length = block_ids.shape
            self._built["flex"] = create_block_mask(mask_mod, rows, None, length, length, device=block_ids.device)
        return self._built["flex"]

    @staticmethod
    def _visible(query_block, key_block, query_branch, key_branch, query, key):
        same_block = (query_block == key_block) & (query_block >= 0)
        on_branch = (key_branch == PROMPT_BRANCH) | (key_branch == query_branch)
        return (same_block & (key <= query) & on_branch) | (key == query)
