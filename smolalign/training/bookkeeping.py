"""What happens between optimizer steps: metrics logged per window of steps, held-out evaluation,
checkpoints, and the count of steps skipped for a non-finite loss."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from smolalign.config.train import TrainConfig
from smolalign.core.heldout import labelled_summary, preference_summary, reward_model_summary
from smolalign.core.logprobs import PairLogps, concat_pair_logps
from smolalign.core.losses import Objective
from smolalign.data.tokenize import TokenizedPair
from smolalign.errors import RunError, writes_reported
from smolalign.metrics import MetricWindow
from smolalign.run_folder import RunFolder
from smolalign.training.checkpoint import (
    RunProgress,
    last_good_checkpoint,
    require_finite_weights,
    save_checkpoint,
)
from smolalign.training.plan import StepPlan
from smolalign.training.step import PairRunner, StepOutcome, across_processes

log = logging.getLogger("smolalign")


class Bookkeeper:
    """Records a run as its steps go: each logging window's mean metrics, throughput and learning rate (in
    metrics.jsonl, the trackers and the progress bar), held-out metrics every `eval_steps` and at the end,
    a checkpoint every `save_steps`. Time spent evaluating and saving does not count as training time."""

    def __init__(self, accelerator: Accelerator, config: TrainConfig, plan: StepPlan, runner: PairRunner,
                 eval_pairs: list[TokenizedPair], run: RunFolder, progress: RunProgress):
        self.accelerator, self.config, self.plan, self.runner = accelerator, config, plan, runner
        self.eval_pairs, self.run, self.progress, self.output_dir = eval_pairs, run, progress, run.path
        self.window, self.window_tokens, self.window_start = MetricWindow(), 0, time.perf_counter()

    def begin(self, start_step: int) -> None:
        """Before the first step: the initial policy's held-out metrics if asked, then the first window opens."""
        if self.eval_pairs and start_step == 0 and self.config.eval_on_start:
            self.evaluate(0)
        self.window_start = time.perf_counter()

    def after_step(self, step: int, outcome: StepOutcome, step_pairs: list[list[TokenizedPair]], bar: tqdm) -> None:
        """Count optimizer step number `step` (from 1), then log, evaluate and save where the config asks."""
        self.count(step, outcome, step_pairs)
        bar.update(1)
        config, plan, last = self.config, self.plan, step == self.plan.total_steps
        if step % plan.every(config.logging_steps) == 0 or last:
            self.log_window(step, outcome, bar)
        paused = time.perf_counter()
        if self.eval_pairs and (last or (config.eval_steps and step % plan.every(config.eval_steps) == 0)):
            self.evaluate(step)
        if step % plan.every(config.save_steps) == 0 and not last:
            require_finite_weights(self.runner.scorer, self.run.checkpoint(step).name, self.output_dir)
            save_checkpoint(self.accelerator, self.output_dir, step, self.progress, config, config.save_total_limit)
        self.window_start += time.perf_counter() - paused

    def count(self, step: int, outcome: StepOutcome, step_pairs: list[list[TokenizedPair]]) -> None:
        """Add a step's tokens and metrics to the window; a skipped step adds tokens only."""
        self.window_tokens += outcome.tokens
        self.progress.num_tokens += outcome.tokens
        if outcome.finite:
            self.progress.nonfinite_in_a_row = 0
            for metrics in outcome.metrics:
                self.window.add(metrics)
            self.window.add({"loss": outcome.loss})
        else:
            skip_nonfinite_step(self.progress, step, outcome, step_pairs, self.config, self.output_dir)

    def log_window(self, step: int, outcome: StepOutcome, bar: tqdm) -> None:
        """Record the window's means over steps and processes, and open the next window."""
        elapsed = time.perf_counter() - self.window_start
        values = {**across_processes(self.accelerator, self.window.mean(), "mean"),
                  "learning_rate": outcome.learning_rate,
                  "grad_norm": outcome.grad_norm if outcome.finite else None,
                  "tokens_per_second": self.window_tokens / elapsed,
                  "num_tokens": self.progress.num_tokens, "skipped_steps": self.progress.skipped_steps}
        self.record(step, values)
        if "loss" in values:  # a window whose steps were all skipped has no loss
            accuracy = values.get("rewards/accuracies", values.get("accuracy", 0.0))
            bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{accuracy:.2f}",
                            tok_s=f"{values['tokens_per_second']:.0f}")
        self.window.clear()
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def evaluate(self, step: int) -> None:
        """Record the held-out metrics of the policy as it is after `step` steps."""
        scorer = self.runner.scorer
        scorer.eval()
        values = evaluate_objective(self.runner, self.eval_pairs, batch_size=self.config.per_device_eval_batch_size)
        scorer.train()
        self.record(step, values)

    def record(self, step: int, values: dict[str, float]) -> None:
        """One line of metrics.jsonl (written by the main process) and the trackers' values at `step`."""
        record = {"step": step, "epoch": round(self.plan.epoch_at(step), 4), **values}
        if self.accelerator.is_main_process:
            with writes_reported(self.run.metrics_file):
                self.run.append_metrics(record)
        self.accelerator.log(values, step=step)


def eval_batches(pairs: list[TokenizedPair], batch_size: int) -> list[list[TokenizedPair]]:
    """Held-out pairs in consecutive batches of `batch_size` (`per_device_eval_batch_size`)."""
    return [pairs[start : start + batch_size] for start in range(0, len(pairs), batch_size)]


@torch.no_grad()
def evaluate_objective(runner: PairRunner, pairs: list[TokenizedPair], *, batch_size: int) -> dict[str, float]:
    """The objective's loss (and its other terms, as `kl` and `nll_loss`) on held-out pairs, averaged over
    batches as TRL's evaluate does; the preference numbers (accuracies with their 95% intervals, margins,
    rewards) over all pairs at once, as `smolalign eval` computes them (core/heldout.py); `eval_pairs`."""
    window = MetricWindow()
    policy_parts, reference_parts = [], []
    for batch in tqdm(eval_batches(pairs, batch_size), desc="evaluating", leave=False, unit="batch"):
        result = runner.run(batch)
        window.add({"loss": result.output.loss, **result.output.metrics})
        policy_parts.append(result.policy)
        reference_parts.append(result.reference)
    policy = concat_pair_logps(policy_parts)
    reference = concat_pair_logps(reference_parts) if runner.reference is not None else None
    summary = {**window.mean(), **held_out_summary(runner.objective, policy, reference, beta=runner.settings.beta)}
    return {f"eval_{name}": value for name, value in summary.items()
            if isinstance(value, (int, float)) and name != "beta"}


def held_out_summary(objective: Objective, policy: PairLogps, reference: PairLogps | None, *,
                     beta: float) -> dict[str, float]:
    """The held-out numbers of core/heldout.py that fit the objective's rows."""
    if objective.reward_model:
        return reward_model_summary(policy)
    if objective.rows == "labelled":
        return labelled_summary(policy, reference, beta=beta)
    if objective.rows == "pairs":
        return preference_summary(policy, reference, beta=beta)
    return {"pairs": len(policy.chosen)}


def skip_nonfinite_step(
    progress: RunProgress, step: int, outcome: StepOutcome, step_pairs: list[list[TokenizedPair]],
    config: TrainConfig, output_dir: Path,
) -> None:
    """Count a skipped step and warn; stop the run (RunError) after `max_nonfinite_steps` in a row."""
    progress.skipped_steps += 1
    progress.nonfinite_in_a_row += 1
    rows = sorted(pair.index for pairs in step_pairs for pair in pairs)
    log.warning("step %d skipped (no update, weights unchanged): loss %s, gradient norm %s on the pairs of rows %s "
                "(%d in a row)", step, outcome.loss, outcome.grad_norm, rows, progress.nonfinite_in_a_row)
    if progress.nonfinite_in_a_row >= config.max_nonfinite_steps:
        raise RunError(f"stopped at step {step}: the loss or gradient norm was not finite in "
                       f"{progress.nonfinite_in_a_row} steps in a row (max_nonfinite_steps); lower the learning_rate "
                       f"or check the data; {last_good_checkpoint(output_dir)}, and nothing was saved from the "
                       "diverged weights.")
