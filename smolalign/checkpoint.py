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

from smolalign.config import TrainConfig, changed_settings, load_config, save_config
from smolalign.errors import UserError

STATE_FILE = "smolalign_state.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, num_tokens: int, config: TrainConfig, limit: int | None
) -> Path:
    target = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=False)  # tied embeddings: torch.save keeps the tie
    if accelerator.is_main_process:
        (staging / STATE_FILE).write_text(json.dumps({"step": step, "num_tokens": num_tokens}))
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


# Settings a resumed run may change: where and how often it reports and saves, and how it splits work
# into chunks (which changes no number). Any other change would alter the pairs or schedule of later steps.
RESUMABLE_CHANGES = (
    "output_dir", "resume_from_checkpoint", "run_name", "report_to", "logging_steps", "eval_steps", "eval_on_start",
    "save_steps", "save_total_limit", "max_tokens_per_forward", "logprob_chunk_size", "per_device_eval_batch_size",
)


def load_checkpoint(accelerator: Accelerator, path: Path, config: TrainConfig) -> tuple[int, int]:
    """Restore everything Accelerate prepared; returns the optimizer steps and tokens already done."""
    changed = changed_settings(load_config(path / "config.yaml"), config, ignore=RESUMABLE_CHANGES)
    if changed:
        raise UserError(f"cannot resume from '{path}' with other settings ({', '.join(changed[:3])}): later steps "
                        "would see other pairs or another schedule. Resume with the checkpoint's settings.")
    accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text())
    return state["step"], state["num_tokens"]
