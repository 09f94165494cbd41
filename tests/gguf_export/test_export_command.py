"""`smolalign export`, `smolalign.export` and `train --export_gguf`: the commands around export_gguf."""

from __future__ import annotations

import gguf
import pytest
from conftest import write_jsonl

import smolalign
from smolalign.cli import main


@pytest.mark.slow
def test_export_command_writes_the_quantization_asked(tmp_path, tiny_model, capsys):
    main(["export", str(tiny_model(0)), "--output", str(tmp_path / "tiny.gguf"), "--quantization", "q4_1"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(tmp_path / "tiny.gguf")
    assert reader.get_tensor(0).tensor_type == gguf.GGMLQuantizationType.Q8_0  # a 4-bit file keeps its head in q8_0
    assert {t.tensor_type for t in reader.tensors} >= {gguf.GGMLQuantizationType.Q4_1}


@pytest.mark.slow
def test_training_exports_final_when_asked(tmp_path, tiny_model, hh_rows):
    data = write_jsonl(tmp_path / "pairs.jsonl", hh_rows[:4])
    run = smolalign.train(model=str(tiny_model(0)), dataset=str(data), max_steps=1, per_device_train_batch_size=2,
                          max_length=256, export_gguf="f16", output_dir=str(tmp_path / "run"))
    exported = tmp_path / "run" / "run-f16.gguf"
    assert exported.is_file() and run.final_model is not None
    assert smolalign.export(run.run_dir, tmp_path / "again.gguf", quantization="f16").stat().st_size == \
        exported.stat().st_size
    assert smolalign.export(run, tmp_path / "from-result.gguf", quantization="f16").stat().st_size == \
        exported.stat().st_size  # the TrainResult itself, as the package docstring shows
