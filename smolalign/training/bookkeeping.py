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
from smolalign.core.heldout import mean_logps_wins
from smolalign.data.tokenize import TokenizedPair
from smolalign.errors import RunError, writes_reported
from smolalign.metrics import MetricsFile, MetricWindow
from smolalign.stats import ACCURACY_METRICS, interval_fields
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
                 eval_pairs: list[TokenizedPair], metrics_file: MetricsFile, progress: RunProgress,
                 output_dir: Path):
        self.accelerator, self.config, self.plan, self.runner = accelerator, config, plan, runner
        self.eval_pairs, self.metrics_file, self.progress, self.output_dir = eval_pairs, metrics_file, progress, output_dir
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
        config, last = self.config, step == self.plan.total_steps
        if step % config.logging_steps == 0 or last:
            self.log_window(step, outcome, bar)
        paused = time.perf_counter()
        if self.eval_pairs and (last or (config.eval_steps and step % config.eval_steps == 0)):
            self.evaluate(step)
        if step % config.save_steps == 0 and not last:
            require_finite_weights(self.runner.scorer, f"checkpoint-{step}", self.output_dir)
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
            with writes_reported(self.metrics_file.path):
                self.metrics_file.write(record)
        self.accelerator.log(values, step=step)


@torch.no_grad()
def evaluate_objective(runner: PairRunner, pairs: list[TokenizedPair], *, batch_size: int) -> dict[str, float]:
    """The objective's loss and metrics on held-out pairs, averaged over batches as TRL's evaluate does;
    for each accuracy also its 95% interval (`eval_<name>_ci_low`, `eval_<name>_ci_high`), and the
    number of pairs (`eval_pairs`).

    The interval is Wilson's for the pairs the accuracy got right out of all pairs. The logged accuracy
    is TRL's mean of batch means, which is that same share when every batch is full; a smaller last
    batch weighs as much as a full one in TRL's number, so the two may then differ a little.
    """
    window = MetricWindow()
    wins: dict[str, int] = dict.fromkeys(ACCURACY_METRICS, 0)
    for start in tqdm(range(0, len(pairs), batch_size), desc="evaluating", leave=False, unit="batch"):
        batch = pairs[start : start + batch_size]
        result = runner.run(batch)
        metrics = {"loss": result.output.loss, **result.output.metrics}
        if runner.objective.needs_rejected and not runner.objective.reward_model:
            metrics["logps/mean_accuracy"] = mean_logps_wins(result.policy).float().mean()
        window.add(metrics)
        for name in wins.keys() & metrics.keys():  # an accuracy is a share of the batch: back to a count
            wins[name] += round(float(metrics[name]) * len(batch))
    summary = window.mean()
    for name in [name for name in ACCURACY_METRICS if name in summary]:
        summary |= interval_fields(name, wins[name], len(pairs))
    summary["pairs"] = len(pairs)
    return {f"eval_{name}": value for name, value in summary.items()}


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
