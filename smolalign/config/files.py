"""Config files: packaged recipes, reading YAML, and comparing two configs.

`changed_settings` is the one test of "the same run": resuming from a checkpoint and reusing a sweep's
run folder both ask it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from smolalign.errors import UserError, first_line

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def recipe_path(name: str | Path) -> Path:
    """A config file: `name` itself when it exists, else the packaged recipe of that name (`demo`,
    `recipes/demo.yaml`), so the recipes work from any folder after `pip install smolalign`."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = RECIPES_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(recipe.stem for recipe in RECIPES_DIR.glob("*.yaml")))
    raise UserError(f"config file '{name}' does not exist, and no packaged recipe has that name ({known}).")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = recipe_path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"config file '{path}' is not valid YAML: {first_line(error)}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of keys to values, not {type(data).__name__}.")
    return data


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys (`lora.r`): what trackers take, and how runs line up in reports."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(before: Any, after: Any) -> list[str]:
    """`key: old -> new` for each setting that changes a run's numbers (dotted keys for sections) and
    differs between two configs. Bookkeeping settings (fields marked `bookkeeping`: where and how often
    a run reports and saves, how it splits work into chunks) may differ."""
    bookkeeping = {f.name for f in dataclasses.fields(after) if f.metadata.get("bookkeeping")}
    old, new = flatten(dataclasses.asdict(before)), flatten(dataclasses.asdict(after))
    absent = object()  # a key only one side has (a section added or removed: `lora.r` against `lora: null`)

    def shown(values: dict, key: str) -> str:
        return repr(values[key]) if key in values else "unset"

    return [f"{key}: {shown(old, key)} -> {shown(new, key)}" for key in dict.fromkeys([*old, *new])
            if key not in bookkeeping and old.get(key, absent) != new.get(key, absent)]
