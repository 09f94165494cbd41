"""The training loop, read top to bottom: config -> data -> models -> optimizer -> steps -> final model.

Built on Accelerate, so the same code runs on a CPU, one GPU, or several processes (DDP, started by
torchrun or `accelerate launch`; tested with two CPU processes under torchrun). FSDP / ZeRO-3 would
need a sharded save of final/. There is no Trainer class: one function owns the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    is_tensorboard_available,
    is_wandb_available,
    set_seed,
)
from tqdm.auto import tqdm
from transformers import get_scheduler

from smolalign.config.train import TrainConfig, flatten, save_config
from smolalign.core.heldout import evaluate_objective
from smolalign.core.layouts import block_tokens, choose_layout
from smolalign.core.logprobs import RewardScorer, SequenceScorer
from smolalign.core.losses import OBJECTIVES, LossSettings
from smolalign.core.reference import precompute_reference, reference_source
from smolalign.core.scoring import default_max_tokens_per_forward
from smolalign.data.prepare import prepare_data
from smolalign.data.tokenize import TokenizedPair
from smolalign.errors import RunError, UserError, writes_reported
from smolalign.locks import run_folder_lock
from smolalign.metrics import MetricsFile, MetricWindow, last_values, read_metrics
from smolalign.models.loading import (
    add_lora,
    base_model_of,
    count_parameters,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_precision,
)
from smolalign.models.memory import keep_freed_memory
from smolalign.report.write import write_report
from smolalign.training.checkpoint import (
    RunProgress,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from smolalign.training.final import save_final_model
from smolalign.training.plan import StepPlan
from smolalign.training.push import check_push_access, push_run
from smolalign.training.step import PairRunner

log = logging.getLogger("smolalign")


def train(config: TrainConfig) -> Path:
    """Run one alignment job end to end; returns the folder of the final model.

    The run owns its output_dir meanwhile: another run pointed at it fails at once (UserError). Under
    several processes the main one holds that lock for all.
    """
    output_dir = Path(config.output_dir)
    make_output_dir(output_dir)
    is_main_process = int(os.environ.get("RANK", "0")) == 0  # set by torchrun and accelerate launch
    with run_folder_lock(output_dir) if is_main_process else contextlib.nullcontext():
        return _train(config, output_dir)


def make_output_dir(output_dir: Path) -> None:
    """Create the run folder, or say in one sentence why it cannot be."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot create output_dir '{output_dir}': it or a folder above it is a file.") from None
    except OSError as error:
        raise UserError(f"cannot write to output_dir '{output_dir}': {error.strerror or error}.") from None


def _train(config: TrainConfig, output_dir: Path) -> Path:
    objective = OBJECTIVES[config.algorithm]
    settings = LossSettings.from_config(config)
    device = resolve_device(config.device)
    if device.type == "cpu":
        keep_freed_memory()
    require_trackers(config.report_to)
    check_push_access(config)  # push_to_hub: token, network and repository id, before any work
    dtype, mixed_precision = resolve_precision(config.dtype, device, lora=config.lora is not None)
    # Accelerate keeps one state per process: without a reset, a trainer made earlier in the same process
    # (a notebook that ran TRL first) would impose its mixed precision on this run.
    AcceleratorState._reset_state()
    # The schedule counts optimizer steps of the whole job, so the scheduler steps once per optimizer step
    # (Accelerate would otherwise step it once per process).
    # Processes may run different numbers of forward passes per step (chunks of their own pairs), so DDP
    # must not broadcast buffers at every forward pass (the rotary tables are constant anyway).
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision,
                              log_with=config.report_to or None, project_dir=str(output_dir),
                              step_scheduler_with_optimizer=False,
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    set_seed(config.seed)  # before LoRA: PEFT initialises the adapters randomly

    # Data comes first, so that a bad file fails before any weights are loaded.
    tokenizer = load_tokenizer(config.model, chat_template=config.chat_template)
    data = prepare_data(config, tokenizer, needs_rejected=objective.needs_rejected)

    # Models. The reference is the initial policy (or `ref_model`): for full fine-tuning and LoRA alike its
    # log-probs are computed once before the first step (under LoRA: the policy with its adapters disabled),
    # so no second copy of the model is held and no step pays for a reference pass
    # (precompute_ref_log_probs: false computes it in every step: adapters off, or a frozen copy).
    policy, layout = build_policy(config, objective, tokenizer, dtype=dtype, device=accelerator.device)
    max_tokens = config.max_tokens_per_forward or default_max_tokens_per_forward(
        policy, accelerator.device, mixed_precision=mixed_precision, max_length=config.max_length)
    trainable, total = count_parameters(policy)
    log.info("%s on %s (%s): %d/%d parameters trainable, layout %s, %d training pairs",
             config.algorithm, accelerator.device, str(dtype).removeprefix("torch."), trainable, total, layout,
             len(data.train))

    scorer = (RewardScorer if objective.reward_model else SequenceScorer)(policy, config.logprob_chunk_size)
    plan = StepPlan(
        num_pairs=len(data.train),
        batch_size=config.per_device_train_batch_size * accelerator.num_processes,
        accumulation=config.gradient_accumulation_steps,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        seed=config.seed,
        pair_tokens=tuple(block_tokens(p) for p in data.train),
        max_tokens=config.max_tokens_per_batch,
    )
    precompute = objective.needs_reference and (
        config.precompute_ref_log_probs
        if config.precompute_ref_log_probs is not None
        else not config.ref_model
    )
    reference_args = {"policy": policy, "tokenizer": tokenizer, "dtype": dtype, "device": accelerator.device}
    if precompute:
        source, weights = reference_source(config, policy_scorer=scorer, precompute=True, **reference_args)
        needed = [data.train[i] for i in plan.pairs_used()] + data.eval
        # The main process fills the on-disk cache first; the others then read it instead of recomputing.
        with accelerator.main_process_first(), accelerator.autocast():  # the precision the policy will train in
            reference = precompute_reference(source, weights, needed, layout=layout,
                                             pad_token_id=tokenizer.pad_token_id, device=accelerator.device,
                                             max_tokens_per_forward=max_tokens)
        del source, weights  # a separate ref_model is no longer needed

    optimizer = build_optimizer(scorer, config)
    scheduler = get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=config.warmup_steps or math.ceil(config.warmup_ratio * plan.total_steps),
        num_training_steps=plan.total_steps,
    )
    scorer, optimizer, scheduler = accelerator.prepare(scorer, optimizer, scheduler)
    if objective.needs_reference and not precompute:
        reference, _ = reference_source(config, policy_scorer=scorer, precompute=False, **reference_args)
    runner = PairRunner(scorer, reference if objective.needs_reference else None, objective, settings, layout,
                        tokenizer.pad_token_id, accelerator.device, max_tokens, autocast=accelerator.autocast)

    metrics_file, start_step, progress_state = open_run_folder(accelerator, config, output_dir)
    tracked = {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)  # lists become text
               for k, v in flatten(config.to_dict()).items()}
    accelerator.init_trackers("smolalign", config=tracked,
                              init_kwargs={"wandb": {"name": config.run_name or output_dir.name}})

    def evaluate() -> dict[str, float]:
        scorer.eval()
        result = evaluate_objective(runner, data.eval, batch_size=config.per_device_eval_batch_size)
        scorer.train()
        return result

    def log_record(step: int, values: dict[str, float]) -> None:
        record = {"step": step, "epoch": round(plan.epoch_at(step), 4), **values}
        if accelerator.is_main_process:
            with writes_reported(metrics_file.path):
                metrics_file.write(record)
        accelerator.log(values, step=step)

    if data.eval and start_step == 0 and config.eval_on_start:
        log_record(0, evaluate())

    scorer.train()
    window, window_tokens, window_start = MetricWindow(), 0, time.perf_counter()
    with tqdm(total=plan.total_steps, initial=start_step, desc=config.algorithm, unit="step",
              disable=not accelerator.is_main_process) as progress:  # closed on errors too
        for step in range(start_step, plan.total_steps):
            micro_batches = plan.micro_batches(step, process_index=accelerator.process_index,
                                               num_processes=accelerator.num_processes)
            step_pairs = [[data.train[i] for i in ids] for ids in micro_batches]
            outcome = training_step(accelerator, runner, step_pairs, optimizer=optimizer, scheduler=scheduler,
                                    max_grad_norm=config.max_grad_norm)
            window_tokens += outcome.tokens
            progress_state.num_tokens += outcome.tokens
            if outcome.finite:
                progress_state.nonfinite_in_a_row = 0
                for metrics in outcome.metrics:
                    window.add(metrics)
                window.add({"loss": outcome.loss})
            else:
                skip_nonfinite_step(progress_state, step + 1, outcome, step_pairs, config, output_dir)

            done = step + 1
            progress.update(1)
            if done % config.logging_steps == 0 or done == plan.total_steps:
                elapsed = time.perf_counter() - window_start
                values = {**across_processes(accelerator, window.mean(), "mean"),
                          "learning_rate": outcome.learning_rate,
                          "grad_norm": outcome.grad_norm if outcome.finite else None,
                          "tokens_per_second": window_tokens / elapsed,
                          "num_tokens": progress_state.num_tokens, "skipped_steps": progress_state.skipped_steps}
                log_record(done, values)
                if "loss" in values:  # a window whose steps were all skipped has no loss
                    accuracy = values.get("rewards/accuracies", values.get("accuracy", 0.0))
                    progress.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{accuracy:.2f}",
                                         tok_s=f"{values['tokens_per_second']:.0f}")
                window.clear()
                window_tokens, window_start = 0, time.perf_counter()
            paused = time.perf_counter()
            if data.eval and (done == plan.total_steps or (config.eval_steps and done % config.eval_steps == 0)):
                log_record(done, evaluate())
            if done % config.save_steps == 0 and done < plan.total_steps:
                require_finite_weights(scorer, f"checkpoint-{done}", output_dir)
                save_checkpoint(accelerator, output_dir, done, progress_state, config, config.save_total_limit)
            window_start += time.perf_counter() - paused  # evaluating and saving do not count as training time

    final = None
    if accelerator.is_main_process:
        summary = {k: v for k, v in last_values(read_metrics(metrics_file.path)).items() if k not in ("step", "epoch")}
        model = accelerator.unwrap_model(scorer).model
        require_finite_weights(model, "final/", output_dir)
        with writes_reported(output_dir / "final"):
            final = save_final_model(model, tokenizer, config, output_dir, summary)
        with writes_reported(output_dir / "report.html"):
            report = write_report([output_dir], output_dir)
        log.info("final model: %s", final)
        log.info("report: %s", report)
    accelerator.end_training()
    AcceleratorState._reset_state()  # leave the process as we found it, for whatever trains next
    if final is not None and config.push_to_hub:  # the main process, once the run is complete on disk
        log.info("pushed to the Hub: %s", push_run(output_dir, config))
    return final


@dataclass
class StepOutcome:
    """What one optimizer step did; `tokens` is summed over processes, `finite` agreed by all of them."""

    loss: float  # mean over the micro-batches of this process
    metrics: list[dict[str, torch.Tensor]]  # the objective's metrics, one dict per micro-batch
    tokens: int
    grad_norm: float  # before clipping
    learning_rate: float  # the rate this step used
    finite: bool  # False: a loss or the gradient norm was NaN or infinite, and the weights were not updated


def training_step(
    accelerator: Accelerator, runner: PairRunner, micro_batches: list[list[TokenizedPair]], *,
    optimizer: torch.optim.Optimizer, scheduler, max_grad_norm: float,
) -> StepOutcome:
    """One optimizer step over the micro-batches (gradient accumulation), skipped if a number is not finite."""
    loss, metrics, tokens = 0.0, [], 0
    for index, pairs in enumerate(micro_batches):
        result = runner.run(
            pairs,
            backward=accelerator.backward,
            # Each micro-batch loss is a mean over its pairs; dividing by the number of micro-batches
            # makes the accumulated gradient the mean over the step (TRL's scaling).
            loss_scale=1 / len(micro_batches),
            # Processes exchange gradients once per step, after the last chunk of the last micro-batch.
            no_sync=lambda: accelerator.no_sync(runner.scorer),
            sync_after_last_chunk=index == len(micro_batches) - 1,
        )
        loss += result.output.loss.item() / len(micro_batches)
        metrics.append(result.output.metrics)
        tokens += result.tokens
    # The norm is measured before clipping and logged as TRL logs it; max_grad_norm=0 only measures.
    grad_norm = float(accelerator.clip_grad_norm_(runner.scorer.parameters(), max_grad_norm or math.inf))
    nonfinite = not (math.isfinite(loss) and math.isfinite(grad_norm))
    reduced = across_processes(accelerator, {"tokens": tokens, "nonfinite": float(nonfinite)}, "sum")
    learning_rate = scheduler.get_last_lr()[0]
    finite = reduced["nonfinite"] == 0  # every process decides alike, so their weights stay equal
    if finite:
        optimizer.step()
    scheduler.step()  # a skipped step has still used its pairs and its place in the schedule
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss, metrics, int(reduced["tokens"]), grad_norm, learning_rate, finite)


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


def require_finite_weights(model: torch.nn.Module, target: str, output_dir: Path) -> None:
    """Weights that stopped being finite (a finite but huge update can overflow) are never saved."""
    if all(bool(torch.isfinite(parameter).all()) for parameter in model.parameters()):
        return
    raise RunError(f"the weights are no longer finite, so {target} was not saved in '{output_dir}'; lower the "
                   f"learning_rate; {last_good_checkpoint(output_dir)}.")


def last_good_checkpoint(output_dir: Path) -> str:
    """What a stopped run leaves to resume from, as part of its one sentence."""
    checkpoints = list_checkpoints(output_dir)
    return f"the last good checkpoint, '{checkpoints[-1]}', is kept" if checkpoints else "no checkpoint had been written yet"


def across_processes(accelerator: Accelerator, values: dict[str, float], reduction: str) -> dict[str, float]:
    """Each value summed or averaged over the processes (every process must call this at the same point)."""
    if accelerator.num_processes == 1:
        return values
    reduced = accelerator.reduce(torch.tensor(list(values.values()), dtype=torch.float64,
                                              device=accelerator.device), reduction=reduction)
    return dict(zip(values, reduced.tolist(), strict=True))


def build_policy(config: TrainConfig, objective, tokenizer, *, dtype, device) -> tuple[torch.nn.Module, str]:
    """The model to train (with LoRA adapters and gradient checkpointing if asked) and its batch layout."""
    policy = load_model(config.model, dtype=dtype, device=device, tokenizer=tokenizer,
                        reward_head=objective.reward_model)
    if config.lora is not None:
        policy = add_lora(policy, config.lora)
    if config.gradient_checkpointing:
        base_model_of(policy).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy, choose_layout(config.batch_layout, policy)


def open_run_folder(
    accelerator: Accelerator, config: TrainConfig, output_dir: Path
) -> tuple[MetricsFile, int, RunProgress]:
    """Create or reopen the run folder: restore a checkpoint if asked, keep metrics only up to it, save
    the resolved config. Returns the metrics file, the steps already done and the progress counters."""
    metrics_file = MetricsFile(output_dir / "metrics.jsonl")
    start_step, progress = 0, RunProgress()
    if config.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(config.resume_from_checkpoint, output_dir)
        start_step, progress = load_checkpoint(accelerator, checkpoint, config)
        log.info("resumed from step %d", start_step)
    if start_step:
        metrics_file.truncate_after(start_step)
    elif accelerator.is_main_process:  # a fresh run replaces an earlier run in the folder, checkpoints included
        metrics_file.path.unlink(missing_ok=True)
        for stale in list_checkpoints(output_dir):
            log.warning("starting afresh: removing %s of an earlier run in this folder", stale.name)
            shutil.rmtree(stale)
    if accelerator.is_main_process:
        with writes_reported(output_dir / "config.yaml"):
            save_config(config, output_dir / "config.yaml")
    return metrics_file, start_step, progress


def require_trackers(names: list[str]) -> None:
    """Accelerate skips a tracker whose package is missing with only a warning; here it is an error."""
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for name in names:
        if not available[name]():
            raise UserError(f"report_to {name} needs the {name} package: pip install {name} (or smolalign[tracking]).")


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with transformers' grouping: no weight decay on biases and normalisation weights."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates in place; the default multi-tensor path allocates model-sized temporaries.
    return torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
        fused=True,
    )
