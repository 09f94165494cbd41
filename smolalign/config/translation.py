"""The state of a foreign config being moved into smolalign's keys, and how flags merge into a file.

Each translator (config/trl.py, config/llamafactory.py) takes keys out of `Translation.values` and
writes smolalign's into `out`, noting what it approximated or ignored; `finish` logs those notes once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from smolalign.errors import UserError

log = logging.getLogger("smolalign")

LAUNCH_HINT = ("smolalign runs in the processes it is started in; for several, `accelerate launch --num_processes "
               "N -m smolalign train …` or `torchrun --nproc_per_node N -m smolalign train …`")
_logged: set[str] = set()  # a sweep reads the same file once per run: each line is logged once


def same_setting(groups: tuple[tuple[str, ...], ...]) -> dict[str, tuple[str, ...]]:
    """For each key of `groups` (names of one setting), the other names it stands for."""
    return {key: tuple(k for k in group if k != key) for group in groups for key in group}


@dataclass
class Translation:
    """A config being moved into smolalign's keys: what is left to read, what is read, and what to tell."""

    values: dict[str, Any]  # keys still to translate: the file's, merged with the flags
    from_flags: frozenset[str]  # the keys of `values` that the command line gave
    out: dict[str, Any] = field(default_factory=dict)  # smolalign's keys
    notes: list[str] = field(default_factory=list)  # "key value: what differs"
    ignored: list[str] = field(default_factory=list)
    launch: list[str] = field(default_factory=list)

    def note(self, key: str, text: str) -> None:
        self.notes.append(f"{key} {text}")

    def settle(self, key: str, *, ignored: frozenset[str], accepted: dict[str, tuple], refusals: dict[str, str],
               source: str) -> bool:
        """Take out `key` if it is ignored, or if it may only keep `source`'s default (or another of its
        `accepted` values; any other value is refused in one sentence, `refusals` saying why); False for any
        other key."""
        if key in ignored:
            self.values.pop(key)
            self.ignored.append(key)
            return True
        if key not in accepted:
            return False
        value = self.values.pop(key)
        if value not in accepted[key]:
            if key in refusals:
                raise UserError(f"'{key}: {value}' asks for {refusals[key]}.")
            raise UserError(f"'{key}: {value}' has no equivalent in smolalign and would change the run; remove it "
                            f"({source}'s default is {accepted[key][0]!r}).")
        return True

    def defaults(self, values: dict[str, Any], source: str) -> None:
        """`values` for the keys neither the file nor a flag set, as `source` defaults them."""
        applied = {key: value for key, value in values.items() if key not in self.out and key not in self.values}
        self.out.update(applied)
        if applied:
            self.notes.append(f"{source}'s defaults: " + ", ".join(f"{k} {v}" for k, v in applied.items()))

    def finish(self) -> dict[str, Any]:
        """smolalign's keys, after logging what was approximated and ignored."""
        self.out.update(self.values)  # keys spelled alike in both tools
        if self.notes:
            _log_once("read as smolalign's nearest equivalents: " + "; ".join(self.notes))
        if self.ignored:
            _log_once("ignored settings that do not change what smolalign computes: " + ", ".join(sorted(self.ignored)))
        if self.launch:
            _log_once(f"ignored launch settings ({', '.join(self.launch)}): {LAUNCH_HINT}")
        return self.out


def merge_flags(file_values: dict[str, Any], flags: dict[str, Any], same_setting: dict[str, tuple[str, ...]]
                ) -> dict[str, Any]:
    """The file's values with the flags on top. A flag drops the file's keys that set the same thing
    (`same_setting[key]`); a flag for one key of a section (`lora.r`) changes that key only."""
    replaced = {other for key in flags for other in same_setting.get(key, ()) if other not in flags}
    merged = {key: value for key, value in file_values.items() if key not in replaced}
    for key, value in flags.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)
