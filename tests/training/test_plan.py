"""StepPlan, which pairs each step trains on: token-budget micro-batches, each pair once per epoch, a pure
function of (seed, step), a share for every process; and a run trained with a token budget."""

from __future__ import annotations

import pytest

from smolalign.config.train import load_config
from smolalign.core.layouts import block_tokens
from smolalign.training.loop import run_training
from smolalign.training.plan import StepPlan


def test_token_budget_batching(tokenized_pairs):
    tokens = tuple(block_tokens(p) for p in tokenized_pairs) * 4  # 24 pairs of varied length
    budget = max(tokens) + min(tokens)
    plan = StepPlan(num_pairs=len(tokens), batch_size=5, accumulation=2, num_train_epochs=2.0, max_steps=-1, seed=3,
                    pair_tokens=tokens, max_tokens=budget)
    for epoch in (0, 1):
        batches = plan.epoch_micro_batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(tokens)))  # each pair once per epoch
        assert all(len(b) <= 5 for b in batches)
        assert all(sum(tokens[i] for i in b) <= budget or len(b) == 1 for b in batches)
    assert plan.total_steps == plan.steps_in_epoch(0) + plan.steps_in_epoch(1)
    seen = [i for step in range(plan.total_steps) for b in plan.micro_batches(step) for i in b]
    assert sorted(seen) == sorted(list(range(len(tokens))) * 2)
    again = StepPlan(num_pairs=len(tokens), batch_size=5, accumulation=2, num_train_epochs=2.0, max_steps=-1, seed=3,
                     pair_tokens=tokens, max_tokens=budget)
    assert [again.micro_batches(s) for s in range(plan.total_steps)] == [
        plan.micro_batches(s) for s in range(plan.total_steps)
    ]  # a pure function of (seed, step): a resumed run sees the same pairs
    assert plan.epoch_at(plan.total_steps) == 2.0


@pytest.mark.parametrize("max_tokens", [None, 600])
def test_a_long_run_draws_each_epoch_once(monkeypatch, max_tokens):
    plan = StepPlan(num_pairs=50, batch_size=4, accumulation=1, num_train_epochs=10.0, max_steps=-1, seed=0,
                    pair_tokens=tuple(100 + 37 * i % 300 for i in range(50)), max_tokens=max_tokens)
    total_steps = plan.total_steps  # counts each epoch's steps once
    draws = []
    draw = plan._draw_micro_batches
    monkeypatch.setattr(plan, "_draw_micro_batches", lambda epoch: draws.append(epoch) or draw(epoch))
    seen = [i for step in range(total_steps) for b in plan.micro_batches(step) for i in b]
    assert sorted(seen) == sorted(list(range(50)) * 10)
    assert draws == list(range(10))  # walking the steps never redraws an earlier epoch's order


@pytest.mark.parametrize("max_tokens", [None, 150])
def test_every_process_gets_pairs_even_from_a_short_micro_batch(max_tokens):
    plan = StepPlan(num_pairs=7, batch_size=4, accumulation=1, num_train_epochs=1.0, max_steps=-1, seed=0,
                    pair_tokens=(100,) * 7, max_tokens=max_tokens)
    for step in range(plan.total_steps):
        whole = plan.micro_batches(step)[0]
        shares = [plan.micro_batches(step, process_index=p, num_processes=3)[0] for p in range(3)]
        assert len({len(share) for share in shares}) == 1 and shares[0]  # same count, never empty
        assert set(whole) == {i for share in shares for i in share}  # repeats only pairs of this micro-batch


@pytest.mark.parametrize(("max_steps", "num_processes"), [(2, 1), (2, 2), (-1, 2)])
def test_first_micro_batches_are_where_each_used_pair_is_first_trained(max_steps, num_processes):
    """The reference log-probs are precomputed in these micro-batches: every pair a step trains, each in its
    first step's micro-batch of its process."""
    plan = StepPlan(num_pairs=7, batch_size=4, accumulation=1, num_train_epochs=3.0, max_steps=max_steps, seed=0)
    first = plan.first_micro_batches(num_processes)
    steps = [plan.micro_batches(step, process_index=p, num_processes=num_processes)
             for step in range(plan.total_steps) for p in range(num_processes)]
    trained = [batch for step in steps for batch in step]
    assert {i for b in first for i in b} == {i for b in trained for i in b}
    assert first == trained[: len(first)]
    assert len(first) == (2 if max_steps == 2 else plan.steps_in_epoch(0)) * num_processes


def test_training_with_a_token_budget(tmp_path, tiny_model, pairs_file):
    final = run_training(load_config(None, {"model": str(tiny_model(0)), "dataset": str(pairs_file), "max_steps": 2,
                                     "max_tokens_per_batch": 300, "per_device_train_batch_size": 8,
                                     "output_dir": str(tmp_path / "run")}))
    assert final.exists()
