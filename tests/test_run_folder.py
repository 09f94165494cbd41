"""RunFolder and EvalFolder: the one place that knows a run folder's files, and the torn-last-line rule."""

from __future__ import annotations

import pytest

from smolalign.errors import UserError
from smolalign.run_folder import EvalFolder, RunFolder, read_jsonl


def test_a_torn_last_line_is_left_out_and_a_damaged_middle_line_is_an_error(tmp_path):
    run = RunFolder(tmp_path)
    run.metrics_file.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert run.read_metrics() == [{"step": 1}, {"step": 2}]
    run.metrics_file.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl is damaged: line 2 is not JSON"):
        run.read_metrics()


def test_resuming_keeps_the_records_up_to_the_checkpoint(tmp_path):
    run = RunFolder(tmp_path)
    for step in (1, 2, 3):
        run.append_metrics({"step": step, "loss": 0.5})
    run.keep_metrics_until(2)
    assert [record["step"] for record in run.read_metrics()] == [1, 2]


def test_a_run_final_and_its_evaluation(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert RunFolder.of_final(run.final) is None  # no config.yaml: not a run yet
    run.path.mkdir()
    run.config_file.write_text("algorithm: dpo\n")
    assert RunFolder.of_final(run.final) == run and run.read_config() == {"algorithm": "dpo"}
    run.eval.write_summary({"pairs": 3})
    assert EvalFolder(run.eval.path).read_summary() == {"pairs": 3}
    run.eval.write_generations([{"prompt": "q", "policy": "a"}])
    assert read_jsonl(run.eval.generations_file) == [{"prompt": "q", "policy": "a"}]
    assert run.checkpoints() == []
