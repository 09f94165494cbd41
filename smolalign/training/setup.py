"""What a run builds before its first step: the run folder, Accelerate, the policy, the step plan, the
reference, the optimizer and its schedule. Each builder is small and called once, in order, by `train()`."""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, is_tensorboard_available, is_wandb_available
from transformers import get_scheduler

from smolalign.config.files import flatten
from smolalign.config.train import TrainConfig
from smolalign.core.layouts import block_tokens, choose_layout
from smolalign.core.logprobs import RewardScorer, SequenceScorer
from smolalign.core.losses import LossSettings, Objective
from smolalign.core.reference import (
    Reference,
    precompute_reference,
    precomputes_reference,
    reference_source,
    weights_key,
)
from smolalign.core.scoring import PairScoring, default_max_tokens_per_forward
from smolalign.data.prepare import PreparedData
from smolalign.errors import UserError, writes_reported
from smolalign.models.loading import add_lora, base_model_of, load_model
from smolalign.run_folder import RunFolder
from smolalign.training.bookkeeping import eval_batches
from smolalign.training.checkpoint import RunProgress, load_checkpoint, resolve_checkpoint
from smolalign.training.plan import StepPlan
from smolalign.training.step import forward_chunks

log = logging.getLogger("smolalign")


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


def require_trackers(names: list[str]) -> None:
    """Accelerate skips a tracker whose package is missing with only a warning; here it is an error."""
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for name in names:
        if not available[name]():
            raise UserError(f"report_to {name} needs the {name} package: pip install {name} (or smolalign[tracking]).")


def make_accelerator(config: TrainConfig, device: torch.device, mixed_precision: str, output_dir: Path) -> Accelerator:
    """Accelerate for this run, in a fresh state."""
    # Accelerate keeps one state per process: without a reset, a trainer made earlier in the same process
    # (a notebook that ran TRL first) would impose its mixed precision on this run.
    reset_accelerate_state()
    # The schedule counts optimizer steps of the whole job, so the scheduler steps once per optimizer step
    # (Accelerate would otherwise step it once per process).
    # Processes may run different numbers of forward passes per step (chunks of their own pairs), so DDP
    # must not broadcast buffers at every forward pass (the rotary tables are constant anyway).
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision,
                       log_with=config.report_to or None, project_dir=str(output_dir),
                       step_scheduler_with_optimizer=False,
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


def reset_accelerate_state() -> bool:
    """Forget Accelerate's per-process state (its private `_reset_state`); False where a release lacks it, and
    then a run in a process where another trainer ran first keeps that one's settings."""
    reset = getattr(AcceleratorState, "_reset_state", None)
    if reset is None:
        log.debug("accelerate has no AcceleratorState._reset_state: its state is kept between runs")
        return False
    reset()
    return True


def build_policy(config: TrainConfig, objective: Objective, tokenizer, *, dtype, device) -> tuple[torch.nn.Module, str]:
    """The model to train (with LoRA adapters and gradient checkpointing if asked) and its batch layout."""
    policy = load_model(config.model, dtype=dtype, device=device, tokenizer=tokenizer,
                        reward_head=objective.reward_model, revision=config.model_revision,
                        trust_remote_code=config.trust_remote_code)
    if config.lora is not None:
        policy = add_lora(policy, config.lora)
    if config.gradient_checkpointing:
        base_model_of(policy).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy, choose_layout(config.batch_layout, policy)


def build_scorer(config: TrainConfig, objective: Objective, policy: torch.nn.Module) -> torch.nn.Module:
    """The module that turns the policy's batches into what the objective needs: per-token log-probs of the
    answers, or a reward model's scores."""
    if objective.reward_model:
        return RewardScorer(policy, config.logprob_chunk_size)
    return SequenceScorer(policy, config.logprob_chunk_size, square_mass=config.use_weighting)


def build_plan(config: TrainConfig, data: PreparedData, num_processes: int) -> StepPlan:
    """Which pairs each optimizer step sees."""
    return StepPlan(
        num_pairs=len(data.train),
        batch_size=config.per_device_train_batch_size * num_processes,
        accumulation=config.gradient_accumulation_steps,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        seed=config.seed,
        shuffle=config.train_sampling_strategy == "random",
        pair_tokens=tuple(block_tokens(p) for p in data.train),
        max_tokens=config.max_tokens_per_batch,
    )


def build_scoring(config: TrainConfig, policy: torch.nn.Module, layout: str, tokenizer, accelerator: Accelerator,
                  mixed_precision: str) -> PairScoring:
    """How the run's pairs become batches: its layout, pad id and device, and the tokens per forward pass
    (`max_tokens_per_forward`, or what the device's memory allows)."""
    max_tokens = config.max_tokens_per_forward or default_max_tokens_per_forward(
        policy, accelerator.device, mixed_precision=mixed_precision, max_length=config.max_length)
    return PairScoring(layout, tokenizer.pad_token_id, accelerator.device, max_tokens)


def build_references(
    config: TrainConfig, objective: Objective, settings: LossSettings, *, policy: torch.nn.Module,
    scorer: torch.nn.Module, tokenizer, dtype: torch.dtype, accelerator: Accelerator, scoring: PairScoring,
    plan: StepPlan, data: PreparedData, eval_autocast: bool,
) -> tuple[Reference | None, Reference | None]:
    """The reference of every step and the one of held-out evaluation, decided here once, before Accelerate
    wraps the policy; None when the objective needs none.

    The reference is the initial policy (or `ref_model`): by default, for full fine-tuning and LoRA alike,
    its log-probs are computed now for every pair the run will see (under LoRA: the policy with its adapters
    disabled) and cached on disk, so no second copy of the model is held and no step pays for a reference
    pass. With `precompute_ref_log_probs: false` (the default with a `ref_model`) every step runs it: the
    policy with adapters off, a frozen copy of the policy, or the `ref_model`. The training pairs are scored in
    the precision the policy trains in, the held-out pairs in the one they are evaluated in (`eval_autocast`).
    """
    if not objective.needs_reference:
        return None, None
    source, weights = reference_source(config, policy=policy, policy_scorer=scorer, tokenizer=tokenizer,
                                       dtype=dtype, device=accelerator.device)
    if not precomputes_reference(config):
        return source, source  # each pass runs in the precision of the runner that calls it
    # Scored in the forward passes the steps and evaluations will make (see precompute_reference).
    train = [chunk for ids in plan.first_micro_batches(accelerator.num_processes)
             for chunk in forward_chunks([data.train[i] for i in ids], objective, settings, scoring)]
    held_out = [chunk for pairs in eval_batches(data.eval, config.per_device_eval_batch_size)
                for chunk in forward_chunks(pairs, objective, settings, scoring)]
    shared = config.ld_alpha is not None
    weights_hash = weights_key(weights)  # once for both precisions
    # The main process fills the on-disk cache first; the others then read it instead of recomputing.
    with accelerator.main_process_first():
        with accelerator.autocast():
            in_training_precision = train + held_out if eval_autocast else train
            for_training = precompute_reference(source, weights, in_training_precision, scoring,
                                                weights_hash=weights_hash, shared=shared)
        if eval_autocast or not data.eval:
            return for_training, for_training
        for_held_out = precompute_reference(source, weights, held_out, scoring, weights_hash=weights_hash,
                                            shared=shared, desc="reference log-probs (held-out pairs, float32)")
        return for_training, for_held_out


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


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """The learning-rate schedule over the run's optimizer steps."""
    return get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=config.warmup_steps or math.ceil(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs=config.lr_scheduler_kwargs,
    )


def open_run_folder(
    accelerator: Accelerator, config: TrainConfig, output_dir: Path
) -> tuple[RunFolder, int, RunProgress]:
    """Create or reopen the run folder: restore a checkpoint if asked, keep metrics only up to it, save
    the resolved config, start the trackers. Returns the folder, the steps already done and the progress
    counters."""
    run = RunFolder(output_dir)
    start_step, progress = 0, RunProgress()
    if config.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(config.resume_from_checkpoint, output_dir)
        start_step, progress = load_checkpoint(accelerator, checkpoint, config)
        log.info("resumed from step %d", start_step)
    if start_step:
        run.keep_metrics_until(start_step)
    elif accelerator.is_main_process:  # a fresh run replaces an earlier run in the folder, checkpoints included
        run.metrics_file.unlink(missing_ok=True)
        for stale in run.checkpoints():
            log.warning("starting afresh: removing %s of an earlier run in this folder", stale.name)
            shutil.rmtree(stale)
    if accelerator.is_main_process:
        with writes_reported(run.config_file):
            run.write_config(config)
    tracked = {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)  # lists become text
               for k, v in flatten(config.to_dict()).items()}
    accelerator.init_trackers("smolalign", config=tracked,
                              init_kwargs={"wandb": {"name": config.run_name or output_dir.name}})
    return run, start_step, progress
