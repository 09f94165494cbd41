"""Resumable checkpoints: model, optimizer, scheduler and RNG state through Accelerate, written atomically.

`checkpoint-N/` is first written as a hidden staging folder and renamed when complete, so a crash
while saving never leaves a checkpoint that looks whole. Only the newest `save_total_limit` are kept.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from smolalign.config.files import changed_settings
from smolalign.config.train import TrainConfig, load_config
from smolalign.errors import RunError, UserError, writes_reported
from smolalign.run_folder import RunFolder, is_checkpoint, read_checkpoint_state, write_checkpoint_state


@dataclass
class RunProgress:
    """Counters that a resumed run continues from, saved with each checkpoint."""

    num_tokens: int = 0
    skipped_steps: int = 0  # steps without an update because a number was not finite
    nonfinite_in_a_row: int = 0


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, progress: RunProgress, config: TrainConfig,
    limit: int | None,
) -> Path:
    """Write checkpoint-`step`; if the disk is full or the folder unwritable, the earlier ones stay whole."""
    run = RunFolder(output_dir)
    target, staging = run.checkpoint(step), run.checkpoint_staging(step)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        with writes_reported(staging):
            accelerator.save_state(str(staging), safe_serialization=False)  # tied embeddings: torch.save keeps the tie
            if accelerator.is_main_process:
                write_checkpoint_state(staging, {"step": step, **dataclasses.asdict(progress)})
                RunFolder(staging).write_config(config)
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
                _rotate(output_dir, limit)
    except RunError:
        shutil.rmtree(staging, ignore_errors=True)  # give the space back; `latest` never picks a staging folder
        raise
    accelerator.wait_for_everyone()
    return target


def _rotate(output_dir: Path, limit: int | None) -> None:
    if limit is None:
        return
    for old in RunFolder(output_dir).checkpoints()[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def last_good_checkpoint(output_dir: Path) -> str:
    """What a stopped run leaves to resume from, as part of its one sentence."""
    checkpoints = RunFolder(output_dir).checkpoints()
    return f"the last good checkpoint, '{checkpoints[-1]}', is kept" if checkpoints else "no checkpoint had been written yet"


def require_finite_weights(model: torch.nn.Module, target: str, output_dir: Path) -> None:
    """Weights that stopped being finite (a finite but huge update can overflow) are never saved."""
    if all(bool(torch.isfinite(parameter).all()) for parameter in model.parameters()):
        return
    raise RunError(f"the weights are no longer finite, so {target} was not saved in '{output_dir}'; lower the "
                   f"learning_rate; {last_good_checkpoint(output_dir)}.")


def resolve_checkpoint(requested: str, output_dir: Path) -> Path:
    if requested == "latest":
        checkpoints = RunFolder(output_dir).checkpoints()
        if not checkpoints:
            raise UserError(f"resume_from_checkpoint=latest, but '{output_dir}' holds no complete checkpoint.")
        return checkpoints[-1]
    path = Path(requested)
    if not is_checkpoint(path):
        raise UserError(f"'{requested}' is not a complete smolalign checkpoint folder.")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path, config: TrainConfig) -> tuple[int, RunProgress]:
    """Restore everything Accelerate prepared; returns the optimizer steps done and the progress counters."""
    # A resumed run may change bookkeeping settings only: any other change would alter the pairs or the
    # schedule of later steps.
    changed = changed_settings(load_config(RunFolder(path).config_file), config)
    if changed:
        raise UserError(f"cannot resume from '{path}' with other settings ({', '.join(changed[:3])}): later steps "
                        "would see other pairs or another schedule. Resume with the checkpoint's settings.")
    accelerator.load_state(str(path))
    state = read_checkpoint_state(path)
    step = state.pop("step")
    return step, RunProgress(**state)
