"""`smolalign sweep`: the grid trained and compared, finished points skipped, interrupted ones resumed, runs
with other settings refused, and a bad grid rejected before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read_jsonl, write_jsonl

from smolalign.cli import main


@pytest.mark.slow
def test_sweep_trains_the_grid_skips_finished_runs_and_compares(tmp_path, tiny_model, hh_rows, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", hh_rows[:12])
    root = tmp_path / "sweep"
    args = ["sweep", "--grid", "beta=0.1,0.5", "--model", str(tiny_model(0)), "--dataset", str(data),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--output_dir", str(root), "--save_steps", "1",
            "--logging_steps", "1"]
    main(args)
    runs = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "final").exists())
    assert runs == ["beta=0.1", "beta=0.5"]
    assert (root / "report.html").exists()
    assert json.loads(json.dumps(read_jsonl(root / "beta=0.5" / "metrics.jsonl")))[0]["step"] == 1
    first = (root / "beta=0.1" / "final" / "model.safetensors").stat().st_mtime_ns

    # An interrupted point resumes from its checkpoint; finished points are left alone.
    import shutil

    shutil.rmtree(root / "beta=0.5" / "final")
    capsys.readouterr()
    main(args)
    err = capsys.readouterr().err
    assert "beta=0.1: finished earlier, skipped" in err and "beta=0.5: resuming" in err
    assert (root / "beta=0.1" / "final" / "model.safetensors").stat().st_mtime_ns == first
    assert (root / "beta=0.5" / "final").exists()

    # Finished runs trained with other settings are not mixed into the sweep.
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--max_steps", "3"])
    assert exit_info.value.code == 2
    assert "max_steps: 2 -> 3" in capsys.readouterr().err


def test_sweep_rejects_a_bad_grid_before_training(tmp_path, tiny_model, capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--grid", "beta=0.1,-1", "--model", str(tiny_model(0)), "--output_dir", str(tmp_path / "s")])
    assert "'beta' must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    with pytest.raises(SystemExit):
        main(["sweep", "--grid", "learning-rate=1e-5", "--grid", "learning_rate=2e-5", "--output_dir", "s"])
    assert "names 'learning_rate' twice" in capsys.readouterr().err


def test_a_grid_over_a_nested_key_starts_from_a_config_object(tmp_path):
    """A TrainConfig with a LoRA section as the base of a grid over `lora.r`: each point changes that key only."""
    from smolalign.config.train import load_config
    from smolalign.training.grid import plan_sweep, run_config

    base = load_config(None, {"lora": {"r": 16, "lora_alpha": 32}, "output_dir": str(tmp_path / "sweep")})
    plan = plan_sweep(base, ["lora.r=4,8"], {})
    configs = [run_config(base, {}, folder, point, number=i, total=2) for i, (folder, point) in enumerate(plan.points)]
    assert [(c.lora.r, c.lora.lora_alpha) for c in configs] == [(4, 32), (8, 32)]
    assert [Path(c.output_dir).name for c in configs] == ["lora.r=4", "lora.r=8"]
