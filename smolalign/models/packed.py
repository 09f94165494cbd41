"""Linear layers on oneDNN's prepacked weights on CPUs, for passes over weights that do not change:
generation, chat, evaluation and the judge.

`F.linear` on a CPU reads a plain row-major weight. oneDNN can instead reorder ("pack") a weight once into
the blocked layout its matmul kernel reads, as torch.compile's freezing does for inference: small-row matmuls
(a decoding step) run faster, at the cost of a copy as large as the weights (docs/benchmarks.md). Training
keeps plain weights, which change every step.

Results equal `F.linear`'s up to float32 rounding (the kernels sum in another order), like any change of
matmul kernel.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import psutil
import torch
from torch import nn

log = logging.getLogger("smolalign")


@functools.cache
def packing_available() -> bool:
    """Whether this PyTorch's oneDNN packs and multiplies a small weight right (x86 CPU builds do; elsewhere,
    or in another PyTorch, the private ops may be missing or refuse)."""
    if not torch.backends.mkldnn.is_available():
        return False
    weight, x = torch.linspace(-1, 1, 128).reshape(8, 16), torch.linspace(1, -2, 48).reshape(3, 16)  # no RNG used
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        log.info("linear layers not packed: oneDNN's packed ops are unavailable here (%s)", error)
        return False
    return torch.allclose(out, nn.functional.linear(x, weight), rtol=1e-4, atol=1e-4)


def _packable(module: nn.Module) -> bool:
    """A plain float32 CPU linear layer, not packed already."""
    return (type(module) is nn.Linear and "forward" not in module.__dict__
            and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32)


def _packed_forward(layer: nn.Linear, packed: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad)):
            return nn.functional.linear(x, layer.weight, layer.bias)  # the packed op has no backward
        return torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")
    return forward


@contextlib.contextmanager
def packed_linears(model: nn.Module) -> Iterator[int]:
    """Within the block, the model's float32 CPU `nn.Linear` layers multiply by a packed copy of their weight
    (in passes that need no gradient); yields how many were packed. The weights must not change within the
    block. Nothing is packed where oneDNN is missing, the model lives on a GPU, or the copies would take more
    than half the memory available now."""
    layers = [m for m in model.modules() if _packable(m)]
    packed_bytes = sum(layer.weight.nbytes for layer in layers)
    if not layers or not packing_available():
        yield 0
        return
    if packed_bytes > psutil.virtual_memory().available / 2:
        log.info("linear layers not packed: their %.1f GB copy would take over half the available memory",
                 packed_bytes / 1e9)
        yield 0
        return
    try:
        for layer in layers:
            layer.forward = _packed_forward(layer, torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), None))
        yield len(layers)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
