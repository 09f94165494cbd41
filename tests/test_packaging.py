"""A normal install works: the wheel carries the default data, its licence and the recipes, and a run
from another folder finds them inside the installed package, not in a source checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import read_jsonl

pytestmark = pytest.mark.slow  # builds and installs a wheel

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(out), str(REPO_ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (found,) = out.glob("smolalign-*.whl")
    return found


def test_the_wheel_carries_the_default_data_its_licence_and_the_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for split in ("train", "test"):
        assert f"smolalign/bundled/hh-rlhf-harmless/{split}.jsonl" in names
    assert "smolalign/bundled/hh-rlhf-harmless/LICENSE" in names
    recipes = {Path(name).name for name in names if name.startswith("smolalign/recipes/")}
    assert {"demo.yaml", "demo-orpo.yaml", "dpo-smollm2.yaml", "orpo-smollm2.yaml", "dpo-hh-rlhf.yaml",
            "sft-smoltalk.yaml"} <= recipes
    assert not [name for name in names if name.startswith(("tests/", "data/", "recipes/"))]


def test_an_installed_wheel_trains_on_its_bundled_pairs_from_any_folder(wheel, tmp_path, tiny_model):
    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                                str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The installed copy comes first on the path, before the source checkout's editable install.
    environment = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import smolalign; print(smolalign.__file__)"], cwd=elsewhere,
                           env=environment, capture_output=True, text=True)
    assert Path(where.stdout.strip()).is_relative_to(target)

    # No dataset: the bundled HH-RLHF pairs; a packaged recipe by name. (The embedded model is left to the
    # slow test: converting it takes half a minute.)
    done = subprocess.run([sys.executable, "-m", "smolalign", "train", "--config", "demo", "--model",
                           str(tiny_model(0)), "--dataset", "null", "--lora", "null", "--max_steps", "1",
                           "--max_train_pairs", "4", "--max_eval_pairs", "2", "--output_dir", "run"],
                          cwd=elsewhere, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{target / 'smolalign' / 'bundled' / 'hh-rlhf-harmless' / 'train.jsonl'}: " in done.stderr
    records = read_jsonl(elsewhere / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1]
    assert [r["eval_pairs"] for r in records if "eval_loss" in r] == [2, 2]  # the bundled test split, before and after
    assert (elsewhere / "run" / "final" / "model.safetensors").exists()
