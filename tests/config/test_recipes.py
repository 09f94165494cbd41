"""Every recipe is a valid config, and runs a step with its own settings on a tiny model and local data."""

from __future__ import annotations

import pytest
from conftest import read_jsonl, write_jsonl

from smolalign.config.files import RECIPES_DIR
from smolalign.config.train import load_config
from smolalign.training.loop import run_training

RECIPES = sorted(RECIPES_DIR.glob("**/*.yaml"))


def test_the_documented_recipes_exist():
    names = {path.name for path in RECIPES}
    assert {"demo.yaml", "demo-orpo.yaml", "dpo-smollm2.yaml", "orpo-smollm2.yaml", "dpo-hh-rlhf.yaml", "sft-smoltalk.yaml"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_a_step(recipe, tmp_path, tiny_model, hh_rows):
    config = load_config(recipe)  # validates the recipe exactly as written
    if config.algorithm == "sft":
        rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": str(i)}]}
                for i in range(6)]
    else:
        rows = hh_rows[:6]
    data = str(write_jsonl(tmp_path / "data.jsonl", rows))
    # Keep every setting of the recipe but the model, the data (Hub ids need the network) and the length.
    local = {"model": str(tiny_model(0)), "dataset": data, "eval_dataset": data if config.eval_dataset else None,
             "dataset_config": None, "max_steps": 1, "output_dir": str(tmp_path / "run"), "max_train_pairs": 4,
             "max_eval_pairs": 2, "eval_on_start": False}
    config = load_config(recipe, local)
    final = run_training(config)
    assert final.exists()
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["step"] == 1
