"""The training loop, read top to bottom: config -> data -> models -> optimizer -> steps -> final model.

Built on Accelerate, so the same code runs on a CPU, one GPU, or several processes (DDP, started by
torchrun or `accelerate launch`; tested with two CPU processes under torchrun). FSDP / ZeRO-3 would
need a sharded save of final/. There is no Trainer class: one function owns the loop.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
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

from smolalign.batching import block_tokens
from smolalign.checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from smolalign.config import TrainConfig, flatten, save_config
from smolalign.cpu_memory import keep_freed_memory
from smolalign.data.prepare import prepare_data
from smolalign.errors import UserError
from smolalign.evaluate import evaluate_objective
from smolalign.export import save_final_model
from smolalign.forward import PairRunner
from smolalign.logprobs import RewardScorer, SequenceScorer, base_model_of, choose_layout
from smolalign.losses import OBJECTIVES, LossSettings
from smolalign.metrics import MetricsFile, MetricWindow, last_values, read_metrics
from smolalign.models import (
    add_lora,
    count_parameters,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_precision,
)
from smolalign.reference import precompute_reference, reference_source
from smolalign.report import write_report
from smolalign.steps import StepPlan

log = logging.getLogger("smolalign")


def train(config: TrainConfig) -> Path:
    """Run one alignment job end to end; returns the folder of the final model."""
    output_dir = Path(config.output_dir)
    objective = OBJECTIVES[config.algorithm]
    settings = LossSettings.from_config(config)
    device = resolve_device(config.device)
    if device.type == "cpu":
        keep_freed_memory()
    require_trackers(config.report_to)
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

    # Models. The reference is the initial policy (or `ref_model`): under LoRA the policy with its
    # adapters disabled; for full fine-tuning its log-probs are computed once before the first step, so
    # no second copy of the model is held (precompute_ref_log_probs: false keeps a frozen copy instead).
    policy, layout = build_policy(config, objective, tokenizer, dtype=dtype, device=accelerator.device)
    max_tokens = config.max_tokens_per_forward or (16384 if accelerator.device.type == "cuda" else 256)
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
        else config.lora is None and not config.ref_model
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

    metrics_file, start_step, total_tokens = open_run_folder(accelerator, config, output_dir)
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
            metrics_file.write(record)
        accelerator.log(values, step=step)

    if data.eval and start_step == 0 and config.eval_on_start:
        log_record(0, evaluate())

    scorer.train()
    window, window_tokens, window_start = MetricWindow(), 0, time.perf_counter()
    progress = tqdm(total=plan.total_steps, initial=start_step, desc=config.algorithm, unit="step",
                    disable=not accelerator.is_main_process)
    for step in range(start_step, plan.total_steps):
        micro_batches = plan.micro_batches(step, process_index=accelerator.process_index,
                                           num_processes=accelerator.num_processes)
        step_loss, step_tokens = 0.0, 0
        for index, pair_ids in enumerate(micro_batches):
            result = runner.run(
                [data.train[i] for i in pair_ids],
                backward=accelerator.backward,
                # Each micro-batch loss is a mean over its pairs; dividing by the number of micro-batches
                # makes the accumulated gradient the mean over the step (TRL's scaling).
                loss_scale=1 / len(micro_batches),
                # Processes exchange gradients once per step, after the last chunk of the last micro-batch.
                no_sync=lambda: accelerator.no_sync(scorer),
                sync_after_last_chunk=index == len(micro_batches) - 1,
            )
            step_loss += result.output.loss.item() / len(micro_batches)
            window.add(result.output.metrics)
            step_tokens += result.tokens
        window.add({"loss": step_loss})
        step_tokens = int(across_processes(accelerator, {"tokens": step_tokens}, "sum")["tokens"])
        window_tokens += step_tokens
        total_tokens += step_tokens
        # The norm is measured before clipping and logged as TRL logs it; max_grad_norm=0 only measures.
        grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), config.max_grad_norm or math.inf)
        learning_rate = scheduler.get_last_lr()[0]  # the rate this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        progress.update(1)
        if done % config.logging_steps == 0 or done == plan.total_steps:
            elapsed = time.perf_counter() - window_start
            values = {**across_processes(accelerator, window.mean(), "mean"), "learning_rate": learning_rate,
                      "grad_norm": float(grad_norm), "tokens_per_second": window_tokens / elapsed,
                      "num_tokens": total_tokens}
            log_record(done, values)
            accuracy = values.get("rewards/accuracies", values.get("accuracy", 0.0))
            progress.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{accuracy:.2f}",
                                 tok_s=f"{values['tokens_per_second']:.0f}")
            window.clear()
            window_tokens, window_start = 0, time.perf_counter()
        paused = time.perf_counter()
        if data.eval and (done == plan.total_steps or (config.eval_steps and done % config.eval_steps == 0)):
            log_record(done, evaluate())
        if done % config.save_steps == 0 and done < plan.total_steps:
            save_checkpoint(accelerator, output_dir, done, total_tokens, config, config.save_total_limit)
        window_start += time.perf_counter() - paused  # evaluating and saving do not count as training time
    progress.close()

    final = None
    if accelerator.is_main_process:
        summary = {k: v for k, v in last_values(read_metrics(metrics_file.path)).items() if k not in ("step", "epoch")}
        final = save_final_model(accelerator.unwrap_model(scorer).model, tokenizer, config, output_dir, summary)
        report = write_report([output_dir], output_dir)
        log.info("final model: %s", final)
        log.info("report: %s", report)
    accelerator.end_training()
    AcceleratorState._reset_state()  # leave the process as we found it, for whatever trains next
    return final


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


def open_run_folder(accelerator: Accelerator, config: TrainConfig, output_dir: Path) -> tuple[MetricsFile, int, int]:
    """Create or reopen the run folder: restore a checkpoint if asked, keep metrics only up to it, save
    the resolved config. Returns the metrics file and the steps and tokens already done."""
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = MetricsFile(output_dir / "metrics.jsonl")
    start_step = num_tokens = 0
    if config.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(config.resume_from_checkpoint, output_dir)
        start_step, num_tokens = load_checkpoint(accelerator, checkpoint, config)
        log.info("resumed from step %d", start_step)
    if start_step:
        metrics_file.truncate_after(start_step)
    elif accelerator.is_main_process:  # a fresh run replaces an earlier run in the folder, checkpoints included
        metrics_file.path.unlink(missing_ok=True)
        for stale in list_checkpoints(output_dir):
            log.warning("starting afresh: removing %s of an earlier run in this folder", stale.name)
            shutil.rmtree(stale)
    if accelerator.is_main_process:
        save_config(config, output_dir / "config.yaml")
    return metrics_file, start_step, num_tokens


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
