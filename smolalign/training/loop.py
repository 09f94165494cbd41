"""The training loop, read top to bottom: config -> data -> models -> optimizer -> steps -> final model.

Built on Accelerate, so the same code runs on a CPU, one GPU, or several processes (DDP, started by
torchrun or `accelerate launch`; tested with two CPU processes under torchrun). FSDP / ZeRO-3 would
need a sharded save of final/. There is no Trainer class: one function owns the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from smolalign.config.train import TrainConfig
from smolalign.core.losses import OBJECTIVES, LossSettings
from smolalign.data.prepare import prepare_data
from smolalign.errors import writes_reported
from smolalign.locks import run_folder_lock
from smolalign.metrics import last_values
from smolalign.models.loading import count_parameters, load_tokenizer, resolve_device
from smolalign.models.memory import freed_memory_kept
from smolalign.models.precision import held_out_autocast, resolve_precision
from smolalign.run_folder import RunFolder
from smolalign.training.bookkeeping import Bookkeeper
from smolalign.training.checkpoint import require_finite_weights
from smolalign.training.final import save_final_model
from smolalign.training.push import check_push_access
from smolalign.training.setup import (
    build_optimizer,
    build_plan,
    build_policy,
    build_references,
    build_scheduler,
    build_scorer,
    build_scoring,
    make_accelerator,
    make_output_dir,
    open_run_folder,
    require_trackers,
    reset_accelerate_state,
)
from smolalign.training.step import PairRunner, training_step

log = logging.getLogger("smolalign")


def run_training(config: TrainConfig) -> Path | None:
    """Run one alignment job end to end; returns the folder of the final model (None in the processes
    other than the main one, which saves it).

    The run owns its output_dir meanwhile: another run pointed at it fails at once (UserError). Under
    several processes the main one holds that lock for all. The report and the upload to the Hub
    (`push_to_hub`, whose access is checked here before any work) are the command's, once train() returns.
    """
    output_dir = Path(config.output_dir)
    make_output_dir(output_dir)
    is_main_process = int(os.environ.get("RANK", "0")) == 0  # set by torchrun and accelerate launch
    with run_folder_lock(output_dir) if is_main_process else contextlib.nullcontext():
        return _train(config, output_dir)


def _train(config: TrainConfig, output_dir: Path) -> Path | None:
    device = resolve_device(config.device)
    with freed_memory_kept(device):
        return _train_on(device, config, output_dir)


def _train_on(device, config: TrainConfig, output_dir: Path) -> Path | None:
    require_trackers(config.report_to)
    check_push_access(config)  # push_to_hub: token, network and repository id, before any work
    dtype, mixed_precision = resolve_precision(config.dtype, device, lora=config.lora is not None)
    accelerator = make_accelerator(config, device, mixed_precision, output_dir)
    final = _train_steps(accelerator, config, output_dir, dtype=dtype, mixed_precision=mixed_precision)
    # The model and optimizer go before the process group does. Under DDP the wrapped model's reducer holds
    # the group, and a gloo group freed with it after destroy_process_group (the main thread holding the GIL
    # while gloo's worker threads are joined) can deadlock: a process then never exits.
    accelerator.free_memory()
    accelerator.end_training()
    reset_accelerate_state()  # leave the process as we found it, for whatever trains next
    return final


def _train_steps(accelerator: Accelerator, config: TrainConfig, output_dir: Path, *, dtype,
                 mixed_precision: str) -> Path | None:
    """Data, models, optimizer, steps and final/: everything that holds the model lives in here."""
    objective = OBJECTIVES[config.algorithm]
    set_seed(config.seed)  # before LoRA: PEFT initialises the adapters randomly

    # Data comes first, so that a bad file fails before any weights are loaded.
    tokenizer = load_tokenizer(config.model, chat_template=config.chat_template, revision=config.model_revision,
                               trust_remote_code=config.trust_remote_code)
    data = prepare_data(config, tokenizer, use=objective.rows)

    # Models: the policy, the batches it is scored in, and its reference (see build_references).
    policy, layout = build_policy(config, objective, tokenizer, dtype=dtype, device=accelerator.device)
    scoring = build_scoring(config, policy, layout, tokenizer, accelerator, mixed_precision)
    trainable, total = count_parameters(policy)
    precision = str(dtype).removeprefix("torch.") + " weights" + (
        f", {mixed_precision} autocast" if mixed_precision != "no" else "")
    log.info("%s on %s (%s): %d/%d parameters trainable, layout %s, %d training pairs",
             config.algorithm, accelerator.device, precision, trainable, total, layout, len(data.train))
    scorer = build_scorer(config, objective, policy)
    plan = build_plan(config, data, accelerator.num_processes)
    eval_autocast = held_out_autocast(accelerator.device, dtype, mixed_precision)
    settings = LossSettings.from_config(config)
    reference, eval_reference = build_references(
        config, objective, settings, policy=policy, scorer=scorer, tokenizer=tokenizer, dtype=dtype,
        accelerator=accelerator, scoring=scoring, plan=plan, data=data, eval_autocast=eval_autocast)

    optimizer = build_optimizer(scorer, config)
    scheduler = build_scheduler(config, optimizer, plan.total_steps)
    scorer, optimizer, scheduler = accelerator.prepare(scorer, optimizer, scheduler)
    runner = PairRunner(scorer, reference, objective, settings, scoring,
                        autocast=accelerator.autocast,
                        mean_across_processes=lambda value: accelerator.reduce(value, reduction="mean"))

    run, start_step, progress = open_run_folder(accelerator, config, output_dir)
    # Accelerate runs the prepared scorer's forward under the training autocast; a float32 evaluation scores
    # through a second scorer around the same weights.
    eval_runner = runner if eval_autocast else dataclasses.replace(
        runner, scorer=build_scorer(config, objective, policy), reference=eval_reference,
        autocast=contextlib.nullcontext)
    books = Bookkeeper(accelerator, config, plan, eval_runner, data.eval, run, progress)
    books.begin(start_step)
    scorer.train()
    with tqdm(total=plan.total_steps, initial=start_step, desc=config.algorithm, unit="step",
              disable=not accelerator.is_main_process) as bar:  # closed on errors too
        for step in range(start_step, plan.total_steps):
            micro_batches = plan.micro_batches(step, process_index=accelerator.process_index,
                                               num_processes=accelerator.num_processes)
            step_pairs = [[data.train[i] for i in ids] for ids in micro_batches]
            outcome = training_step(accelerator, runner, step_pairs, optimizer=optimizer, scheduler=scheduler,
                                    max_grad_norm=config.max_grad_norm)
            books.after_step(step + 1, outcome, step_pairs, bar)

    return save_final(accelerator, scorer, tokenizer, config, run) if accelerator.is_main_process else None


def save_final(accelerator: Accelerator, scorer, tokenizer, config: TrainConfig, run: RunFolder) -> Path:
    """final/: the trained model, with a model card holding the last logged metrics."""
    output_dir = Path(config.output_dir)
    summary = {k: v for k, v in last_values(run.read_metrics()).items() if k not in ("step", "epoch")}
    model = accelerator.unwrap_model(scorer).model
    require_finite_weights(model, "final/", output_dir)
    with writes_reported(run.final):
        final = save_final_model(model, tokenizer, config, output_dir, summary)
    log.info("final model: %s", final)
    return final
