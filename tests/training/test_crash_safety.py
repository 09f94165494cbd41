"""Real crashes, non-finite numbers, concurrent runs and failed saves.

Crashes are real: `smolalign train` runs as a subprocess that a small driver kills with SIGKILL at a
chosen point (no cleanup runs, as with the OOM killer or a pulled plug of the process), then a second
`smolalign train --resume_from_checkpoint latest` finishes the run, which must equal an uninterrupted one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import read_jsonl, write_jsonl
from safetensors.torch import load_file

from smolalign.cli import main
from smolalign.locks import run_folder_lock
from smolalign.run_folder import RunFolder
from smolalign.training.checkpoint import resolve_checkpoint

# Runs `smolalign train` with one crash point armed: the process kills itself with SIGKILL there.
DRIVER = """
import os, signal, sys
import torch
import smolalign.training.final
import smolalign.training.step
import smolalign.training.loop
from smolalign.cli import main

point, argv = sys.argv[1], sys.argv[2:]

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

if point.startswith("mid-step-"):  # after the first micro-batch of that step, gradients half accumulated
    step, calls, run = int(point.removeprefix("mid-step-")), [0], smolalign.training.step.PairRunner.run
    def crashing_run(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2 * (step - 1) + 2:  # two micro-batches per step
            die()
        return run(self, *args, **kwargs)
    smolalign.training.step.PairRunner.run = crashing_run
elif point.startswith("saving-checkpoint-"):  # the model file of that checkpoint written, the rest not yet
    folder, save = f".checkpoint-{point.removeprefix('saving-checkpoint-')}.partial", torch.save
    def crashing_save(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)) and folder in str(f):
            die()
    torch.save = crashing_save
elif point == "saving-final":  # final/'s weights and tokenizer written into its staging folder
    smolalign.training.final.model_card = lambda *args, **kwargs: die()
elif point == "holding-the-lock":  # a run that owns its folder and waits until it is told to go on
    def waiting_train(config, output_dir):
        print("running", flush=True)
        sys.stdin.readline()
    smolalign.training.loop._train = waiting_train
main(["train", *argv])
"""


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, hh_rows):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", hh_rows[:16])


def flags(model: Path, data: Path, output_dir: Path, **extra) -> list[str]:
    settings = {"model": model, "dataset": data, "output_dir": output_dir, "max_steps": 6,
                "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-3,
                "logging_steps": 1, "save_steps": 2, "save_total_limit": None, "max_length": 256, **extra}
    return [f"--{key}={'null' if value is None else value}" for key, value in settings.items()]


def smolalign_train(arguments: list[str], crash_point: str = "none") -> SimpleNamespace:
    """Run the driver to its end (or its crash): its pid, exit status (-9 when killed) and stderr."""
    process = subprocess.Popen([sys.executable, "-c", DRIVER, crash_point, *arguments], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _, stderr = process.communicate(timeout=600)
    return SimpleNamespace(pid=process.pid, returncode=process.returncode, stderr=stderr)


def comparable(metrics_path: Path) -> list[dict]:
    """The logged records without the wall-clock rate, which differs between any two runs."""
    return [{k: v for k, v in record.items() if k != "tokens_per_second"} for record in read_jsonl(metrics_path)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model, pairs_file):
    folder = tmp_path_factory.mktemp("uninterrupted") / "run"
    main(["train", *flags(tiny_model(0), pairs_file, folder)])
    return folder


@pytest.mark.parametrize(
    ("crash_point", "resumed_from"),
    [("mid-step-5", "checkpoint-4"), ("saving-checkpoint-4", "checkpoint-2"), ("saving-final", "checkpoint-4")],
)
@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights_and_metrics(
    tmp_path, tiny_model, pairs_file, uninterrupted, crash_point, resumed_from, capsys
):
    folder = tmp_path / "run"
    arguments = flags(tiny_model(0), pairs_file, folder)
    crashed = smolalign_train(arguments, crash_point)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert not (folder / "final").exists()
    # A checkpoint caught half-written is left as a hidden staging folder, never taken for a checkpoint.
    if crash_point.startswith("saving-checkpoint-"):
        assert (folder / ".checkpoint-4.partial").is_dir() and not (folder / "checkpoint-4").exists()
    assert resolve_checkpoint("latest", folder).name == resumed_from

    main(["train", *arguments, "--resume_from_checkpoint=latest"])
    err = capsys.readouterr().err
    assert f"taking over {RunFolder(folder).lock_file} from process {crashed.pid}, which is no longer running" in err
    assert f"resumed from step {resumed_from.removeprefix('checkpoint-')}" in err

    expected, actual = load_file(uninterrupted / "final" / "model.safetensors"), load_file(folder / "final" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6)
    resumed_records, expected_records = comparable(folder / "metrics.jsonl"), comparable(uninterrupted / "metrics.jsonl")
    assert len(resumed_records) == len(expected_records) == 6
    for resumed_record, expected_record in zip(resumed_records, expected_records, strict=True):
        assert resumed_record == pytest.approx(expected_record, rel=1e-6)
    assert [p.name for p in RunFolder(folder).checkpoints()] == ["checkpoint-2", "checkpoint-4"]
    assert not list(folder.glob(".checkpoint-*.partial"))  # the resumed run rewrote what the crash left


# ----------------------------------------------------------------------------------------------------------
# Non-finite numbers


def test_non_finite_steps_are_skipped_then_the_run_stops_keeping_its_checkpoints(tmp_path, tiny_model, pairs_file,
                                                                              capsys):
    folder = tmp_path / "diverged"
    # Step 1 is finite; its update with an absurd learning rate makes every later loss NaN.
    with pytest.raises(SystemExit) as stopped:
        main(["train", *flags(tiny_model(0), pairs_file, folder, learning_rate=1e8, save_steps=1, max_steps=20)])
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "smolalign: error: stopped at step 4: the loss or gradient norm was not finite in 3 steps in a row" in err
    assert f"the last good checkpoint, '{folder / 'checkpoint-3'}', is kept" in err
    skipped = re.findall(r"step (\d) skipped \(no update, weights unchanged\): loss (\S+), gradient norm (\S+) on "
                         r"the pairs of rows \[[\d, ]+\] \((\d) in a row\)", err)
    assert [(step, in_a_row) for step, _, _, in_a_row in skipped] == [("2", "1"), ("3", "2"), ("4", "3")]
    assert all({"nan", "inf"} & {loss, norm} for _, loss, norm, _ in skipped)
    assert not (folder / "final").exists()

    records = read_jsonl(folder / "metrics.jsonl")
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(1, 0), (2, 1), (3, 2)]
    assert records[0]["grad_norm"] is not None and records[1]["grad_norm"] is None and "loss" not in records[1]
    # Skipped steps leave the weights untouched: checkpoints 1, 2 and 3 hold the same, finite, weights.
    saved = [torch.load(folder / f"checkpoint-{step}" / "pytorch_model.bin", weights_only=True) for step in (1, 2, 3)]
    assert all(torch.isfinite(tensor).all() for tensor in saved[0].values())
    for later in saved[1:]:
        assert all(torch.equal(later[name], saved[0][name]) for name in saved[0])
    assert json.loads((folder / "checkpoint-3" / "smolalign_state.json").read_text())["skipped_steps"] == 2


# ----------------------------------------------------------------------------------------------------------
# One run per output_dir


@pytest.mark.slow
def test_a_second_run_in_the_same_folder_stops_at_once_naming_the_first(tmp_path, tiny_model, pairs_file):
    folder = tmp_path / "shared"
    arguments = flags(tiny_model(0), pairs_file, folder)
    first = subprocess.Popen([sys.executable, "-c", DRIVER, "holding-the-lock", *arguments], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "running\n"  # it holds the folder now
        second = smolalign_train(arguments)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1] == (
            f"smolalign: error: '{folder}' is in use by another smolalign run (process {first.pid}); wait for it to "
            "finish, stop it, or choose another output_dir."
        )
        assert not (folder / "metrics.jsonl").exists()  # the second run touched nothing
    finally:
        first.kill()
        first.wait()
    # The first run died without cleaning up; its lock names it, and the next run takes over with a warning.
    assert RunFolder(folder).lock_file.read_text() == str(first.pid)
    with run_folder_lock(folder):
        assert RunFolder(folder).lock_file.read_text() == str(os.getpid())
    assert RunFolder(folder).lock_file.read_text() == ""  # a clean end names no holder


# ----------------------------------------------------------------------------------------------------------
# Failed saves


def test_a_full_disk_while_saving_a_checkpoint_stops_with_one_sentence(tmp_path, tiny_model, pairs_file, capsys,
                                                                     monkeypatch):
    import accelerate

    folder = tmp_path / "full-disk"
    save_state = accelerate.Accelerator.save_state

    def save_until_the_disk_fills(self, output_dir, **kwargs):
        if "checkpoint-4" in str(output_dir):
            save_state(self, output_dir, **kwargs)  # partly written, as a full disk leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(output_dir) / "optimizer.bin"))
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_until_the_disk_fills)
    with pytest.raises(SystemExit) as stopped:
        main(["train", *flags(tiny_model(0), pairs_file, folder)])
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"smolalign: error: could not write '{folder / '.checkpoint-4.partial' / 'optimizer.bin'}': No "
                   "space left on device; files written before it, checkpoints included, are unchanged.")
    assert [p.name for p in RunFolder(folder).checkpoints()] == ["checkpoint-2"]
    assert not (folder / ".checkpoint-4.partial").exists()  # the space is given back
    assert resolve_checkpoint("latest", folder).name == "checkpoint-2"
    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    main(["train", *flags(tiny_model(0), pairs_file, folder), "--resume_from_checkpoint=latest"])
    assert (folder / "final" / "model.safetensors").exists()


def test_an_output_dir_that_cannot_be_created_is_one_sentence(tmp_path, tiny_model, pairs_file, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as stopped:
        main(["train", *flags(tiny_model(0), pairs_file, blocker / "run")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (  # after the fixture's progress output, if any
        f"smolalign: error: cannot create output_dir '{blocker / 'run'}': it or a folder above it is a file."
    )


def test_eval_of_a_run_without_a_complete_final_model_is_one_sentence(tmp_path, tiny_model, pairs_file, capsys):
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.yaml").write_text(f"model: {tiny_model(0)}\n")

    def eval_error() -> str:
        with pytest.raises(SystemExit) as stopped:
            main(["eval", "--model", str(run / "final"), "--dataset", str(pairs_file)])
        assert stopped.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]  # after any progress output

    assert eval_error() == (
        f"smolalign: error: '{run / 'final'}' does not exist: the run in '{run}' has not finished; resume it with "
        "--resume_from_checkpoint latest."
    )
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text((tiny_model(0) / "config.json").read_text())
    assert eval_error() == (
        f"smolalign: error: model folder '{run / 'final'}' is incomplete: it has no weights "
        "(model.safetensors or adapter_model.safetensors)."
    )
