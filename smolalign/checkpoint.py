"""Resumable checkpoints: model, optimizer, scheduler and RNG state through Accelerate, written atomically.

`checkpoint-N/` is first written as a hidden staging folder and renamed when complete, so a crash
while saving never leaves a checkpoint that looks whole. Only the newest `save_total_limit` are kept.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from smolalign.config import TrainConfig, save_config
from smolalign.errors import UserError

STATE_FILE = "smolalign_state.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, config: TrainConfig, limit: int | None) -> Path:
    target = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=False)  # tied embeddings: torch.save keeps the tie
    if accelerator.is_main_process:
        (staging / STATE_FILE).write_text(json.dumps({"step": step}))
        save_config(config, staging / "config.yaml")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        _rotate(output_dir, limit)
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


def load_checkpoint(accelerator: Accelerator, path: Path) -> int:
    """Restore everything Accelerate prepared; returns the number of optimizer steps already done."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())["step"]
