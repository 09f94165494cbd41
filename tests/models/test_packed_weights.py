"""Linear layers on oneDNN's packed weights (generation on CPUs): the same outputs as F.linear up to float32
rounding, only inside the block, and never on a pass that needs gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import varied_llama
from transformers import LlamaForCausalLM

from smolalign.models import packed
from smolalign.models.packed import packed_linears, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this PyTorch has no oneDNN packed linear ops")

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    return varied_llama(tokenizer, 0)


def overridden(model) -> int:
    return sum("forward" in m.__dict__ for m in model.modules())


def test_packed_layers_give_the_plain_logits_inside_the_block_only(model):
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with packed_linears(model) as count:
            assert count == overridden(model) == LINEARS_PER_LAYER * model.config.num_hidden_layers + 1  # + lm_head
            packed_logits = model(input_ids=ids).logits
    assert overridden(model) == 0
    torch.testing.assert_close(packed_logits, plain, rtol=1e-5, atol=1e-4)


def test_the_packed_op_is_what_runs(model, monkeypatch):
    calls = []
    pointwise = torch.ops.mkldnn._linear_pointwise

    class CountingOps:
        @staticmethod
        def _linear_pointwise(*args):
            calls.append(args[0].shape)
            return pointwise(*args)

        _reorder_linear_weight = staticmethod(torch.ops.mkldnn._reorder_linear_weight)

    monkeypatch.setattr(packed.torch.ops, "mkldnn", CountingOps)
    with torch.no_grad(), packed_linears(model) as count:
        model(input_ids=torch.randint(0, 1000, (1, 5)))
    assert len(calls) == count


def test_a_pass_that_needs_gradients_takes_the_plain_path(model):
    ids = torch.randint(0, 1000, (1, 7))
    model.zero_grad()
    model(input_ids=ids).logits.sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with packed_linears(model):
        model(input_ids=ids).logits.sum().backward()
    for parameter, grad in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(parameter.grad, grad, rtol=0, atol=0)
    model.zero_grad()


def test_nothing_is_packed_in_float64_without_onednn_or_without_the_memory(model, monkeypatch):
    double = LlamaForCausalLM(model.config).double().eval()
    with packed_linears(double) as count:
        assert count == 0 and overridden(double) == 0
    monkeypatch.setattr(packed, "packing_available", lambda: False)
    with packed_linears(model) as count:
        assert count == 0 and overridden(model) == 0
    monkeypatch.undo()
    available = 2 * sum(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(packed.psutil, "virtual_memory", lambda: type("Memory", (), {"available": available - 8}))
    with packed_linears(model) as count:
        assert count == 0 and overridden(model) == 0
    monkeypatch.setattr(packed.psutil, "virtual_memory", lambda: type("Memory", (), {"available": available}))
    with packed_linears(model) as count:
        assert count > 0


def test_a_pytorch_whose_packed_ops_fail_packs_nothing(monkeypatch):
    class RefusingOps:
        @staticmethod
        def _reorder_linear_weight(*args):
            raise RuntimeError("mkldnn_reorder_linear_weight: not supported on this platform")

    assert packing_available.__wrapped__()  # the probe itself, past its cache
    monkeypatch.setattr(packed.torch.ops, "mkldnn", RefusingOps)
    assert not packing_available.__wrapped__()
