"""User mistakes end with one clear sentence and exit status 2: no traceback, no final/ folder."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import write_jsonl

from smolalign.cli import main


@pytest.fixture
def good_data(tmp_path, hh_rows):
    return write_jsonl(tmp_path / "pairs.jsonl", hh_rows[:8])


def fail(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    message = err[-1]
    assert message.startswith("smolalign: error: ")
    assert not any("Traceback" in line for line in err)
    return message


def train_args(tmp_path, model, data, *extra):
    return ["train", "--model", str(model), "--dataset", str(data), "--output_dir", str(tmp_path / "run"),
            "--max_steps", "1", *extra]


CASES = {
    "missing dataset file": (lambda t, m, d: train_args(t, m, t / "nope.jsonl"), "does not exist"),
    "unknown extension": (lambda t, m, d: train_args(t, m, d.with_suffix(".txt")), "does not exist"),
    "unknown key": (lambda t, m, d: train_args(t, m, d, "--lerning_rate", "1e-5"), "did you mean 'learning_rate'"),
    "invalid value": (lambda t, m, d: train_args(t, m, d, "--beta", "-1"), "'beta' must be > 0"),
    "wrong type": (lambda t, m, d: train_args(t, m, d, "--max_steps", "many"), "'max_steps' must be of type int"),
    "bad choice": (lambda t, m, d: train_args(t, m, d, "--loss_type", "sigmod"), "did you mean 'sigmoid'"),
    "incompatible options": (lambda t, m, d: train_args(t, m, d, "--algorithm", "orpo", "--ref_model", str(m)),
                             "reference-free"),
    "nothing to precompute": (lambda t, m, d: train_args(t, m, d, "--algorithm", "simpo",
                                                         "--precompute_ref_log_probs", "true"), "nothing to precompute"),
    "missing model folder": (lambda t, m, d: train_args(t, t / "models" / "missing" / "final", d),
                             "model folder"),
    "hub id without network": (lambda t, m, d: train_args(t, "someone/not-a-model", d), "embedded"),
    "missing config file": (lambda t, m, d: ["train", "--config", str(t / "none.yaml")], "does not exist"),
    "no gpu": (lambda t, m, d: train_args(t, m, d, "--device", "cuda"), "no CUDA GPU"),
    "tracker not installed": (lambda t, m, d: train_args(t, m, d, "--report_to", "wandb"), "pip install wandb"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_mistakes(case, tmp_path, capsys, tiny_model, good_data):
    build_args, expected = CASES[case]
    message = fail(capsys, build_args(tmp_path, tiny_model(0), good_data))
    assert expected in message, message
    assert not (tmp_path / "run" / "final").exists()


def test_bad_files(tmp_path, capsys, tiny_model):
    model = tiny_model(0)
    cases = {
        "wrong_columns.jsonl": ('{"text": "a", "score": 1}\n', "columns"),
        "empty.jsonl": ("", "empty"),
        "broken.jsonl": ('{"chosen": "a", "rejected"\n', "cannot parse"),
        "all_bad.jsonl": ('{"prompt": "q", "chosen": "", "rejected": "x"}\n', "no usable rows"),
        "empty_prompts.jsonl": ('{"prompt": "", "chosen": "a", "rejected": "b"}\n', "row 0: empty 'prompt'"),
        "sft_only.jsonl": ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
                           "needs a chosen and a rejected answer"),
        "unpaired.jsonl": ('{"prompt": "q", "completion": "a", "label": true}\n', "use algorithm kto"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        message = fail(capsys, train_args(tmp_path, model, path))
        assert expected in message, (name, message)
        assert not (tmp_path / "run" / "final").exists(), name
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("beta: [unclosed\n")
    assert "not valid YAML" in fail(capsys, ["train", "--config", str(bad_yaml)])
    assert not (tmp_path / "run" / "final").exists()


def test_eval_and_inspect_mistakes(tmp_path, capsys, tiny_model, good_data):
    assert "does not exist" in fail(capsys, ["eval", "--model", str(tmp_path / "a" / "b" / "c"),
                                             "--dataset", str(good_data)])
    assert "does not exist" in fail(capsys, ["eval", "--model", str(tiny_model(0)),
                                             "--dataset", str(tmp_path / "missing.jsonl")])
    assert "does not exist" in fail(capsys, ["data", "inspect", str(tmp_path / "missing.jsonl")])


@pytest.mark.parametrize(("argv", "expected"), [
    (["eval", "--model", "m", "--dataset", "d", "--bta", "0.3"], "unknown config key 'bta'; did you mean 'beta'?"),
    (["eval", "--model", "m", "--dataset", "d", "--batch_layout", "packd"],
     "'batch_layout' must be one of auto, padded, packed, prefix_shared, not 'packd' (did you mean 'packed'?)."),
    (["eval", "--model", "m", "--dataset", "d", "--max_length", "many"], "'max_length' must be of type int"),
    (["eval", "--model", "m", "--dataset", "d", "--beta", "0"], "'beta' must be > 0, not 0."),
    (["eval", "--dataset", "d"], "missing 'model'"),
    (["bench", "speed", "--algorithm", "dpo,sft"], "'algorithm' must be one of dpo, orpo, simpo, not 'sft'."),
    (["bench", "speed", "--steps", "2", "--warmup_steps", "2"], "'warmup_steps' (2) must be smaller than 'steps'"),
    (["export", "--output", "model.txt"], "the GGUF output must be a file name ending in .gguf"),
    (["export", "--output", "m.gguf", "--quantization", "q5_k"], "'quantization' must be one of f32, f16"),
    (["chat", "--top_p", "0"], "'top_p' must lie in (0, 1], not 0.0."),
    (["data", "inspect", "d.jsonl", "--max_lenght", "64"], "did you mean 'max_length'?"),
    (["data", "inspect", "d.jsonl", "--max_prompt_length", "64", "--max_length", "64"], "'max_prompt_length' (64)"),
])
def test_command_flags_are_checked_like_config_keys(capsys, argv, expected):
    """eval, bench, chat and data inspect read their flags as train reads its keys: same errors, before any work."""
    assert expected in fail(capsys, argv)


@pytest.mark.slow
def test_real_process_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "smolalign", "train", "--dataset", str(tmp_path / "nope.jsonl")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"smolalign: error: dataset file '{tmp_path / 'nope.jsonl'}' does not exist."]
