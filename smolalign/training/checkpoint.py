"""Resumable checkpoints: model, optimizer, scheduler and RNG state through Accelerate, written atomically.

`checkpoint-N/` is first written as a hidden staging folder and renamed when complete, so a crash
while saving never leaves a checkpoint that looks whole. Only the newest `save_total_limit` are kept.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from smolalign.config.files import changed_settings, save_config
from smolalign.config.train import TrainConfig, load_config
from smolalign.errors import RunError, UserError, writes_reported

STATE_FILE = "smolalign_state.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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
    target = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        with writes_reported(staging):
            accelerator.save_state(str(staging), safe_serialization=False)  # tied embeddings: torch.save keeps the tie
            if accelerator.is_main_process:
                (staging / STATE_FILE).write_text(json.dumps({"step": step, **dataclasses.asdict(progress)}))
                save_config(config, staging / "config.yaml")
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
    for old in list_checkpoints(output_dir)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*") if (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).exists()]


def last_good_checkpoint(output_dir: Path) -> str:
    """What a stopped run leaves to resume from, as part of its one sentence."""
    checkpoints = list_checkpoints(output_dir)
    return f"the last good checkpoint, '{checkpoints[-1]}', is kept" if checkpoints else "no checkpoint had been written yet"


def require_finite_weights(model: torch.nn.Module, target: str, output_dir: Path) -> None:
    """Weights that stopped being finite (a finite but huge update can overflow) are never saved."""
    if all(bool(torch.isfinite(parameter).all()) for parameter in model.parameters()):
        return
    raise RunError(f"the weights are no longer finite, so {target} was not saved in '{output_dir}'; lower the "
                   f"learning_rate; {last_good_checkpoint(output_dir)}.")


def resolve_checkpoint(requested: str, output_dir: Path) -> Path:
    if requested == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise UserError(f"resume_from_checkpoint=latest, but '{output_dir}' holds no complete checkpoint.")
        return checkpoints[-1]
    path = Path(requested)
    if not (path / STATE_FILE).exists():
        raise UserError(f"'{requested}' is not a smolalign checkpoint folder (no {STATE_FILE}).")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path, config: TrainConfig) -> tuple[int, RunProgress]:
    """Restore everything Accelerate prepared; returns the optimizer steps done and the progress counters."""
    # A resumed run may change bookkeeping settings only: any other change would alter the pairs or the
    # schedule of later steps.
    changed = changed_settings(load_config(path / "config.yaml"), config)
    if changed:
        raise UserError(f"cannot resume from '{path}' with other settings ({', '.join(changed[:3])}): later steps "
                        "would see other pairs or another schedule. Resume with the checkpoint's settings.")
    accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text())
    step = state.pop("step")
    return step, RunProgress(**state)
