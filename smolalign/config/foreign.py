"""Config files written for other tools, read as smolalign configs: TRL's and the alignment-handbook's
(config/trl.py) and LLaMA-Factory's (config/llamafactory.py).

The file's keys and the command line's flags are merged first, flags winning: a flag replaces the
file's value of its key and of every key that sets the same thing (`--model` replaces
`model_name_or_path`, `--dataset` a dataset mixture), whichever tool's name either uses. Only then is
anything translated and checked, so a recipe written for a cluster can be rescued from the command line
(`--eval_strategy no`, `--load_in_4bit false`). Each foreign key is then honoured with the same meaning,
honoured by the nearest equivalent with one logged line saying what differs, ignored (launch-only and
bookkeeping keys, listed once), or refused in a sentence that names it first.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from smolalign.config import llamafactory, trl, trl_keys
from smolalign.config.fields import FlagText
from smolalign.config.train import TrainConfig
from smolalign.config.translation import Translation, merge_flags


def translate(file_values: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """smolalign's keys for a config file's values (smolalign's, TRL's, the handbook's or LLaMA-Factory's)
    with the command line's flags (nested: `{"lora": {"r": 8}}`) applied first."""
    flags = {key: _foreign_flag(key, value) for key, value in flags.items()}
    if llamafactory.is_llamafactory_file(file_values):
        merged = merge_flags(file_values, flags, llamafactory.SAME_SETTING)
        translation = Translation(merged, frozenset(flags))
        llamafactory.translate_llamafactory(translation)
        trl.translate_trl(translation, trl_file=True, source="LLaMA-Factory's train config")
    else:
        trl_file = trl.is_trl_file(file_values)
        translation = Translation(merge_flags(file_values, flags, trl_keys.SAME_SETTING), frozenset(flags))
        trl.translate_trl(translation, trl_file=trl_file)
    return translation.finish()


def _foreign_flag(key: str, value: Any) -> Any:
    """Command-line text for another tool's key, read as YAML (`--load_in_4bit false`); smolalign's own keys are
    read later, as their fields' types say."""
    if not isinstance(value, FlagText) or key in {f.name for f in dataclasses.fields(TrainConfig)}:
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return str(value)
