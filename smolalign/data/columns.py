"""Which column of a dataset plays which role: by its name, by a common alias, or by an explicit mapping.

Roles: `prompt` (with alpaca's `input` appended), `chosen`, `rejected`, `completion` (one answer, for
unpaired or SFT rows), `label` (thumbs up or down), `system`, and `messages` (a whole conversation; in
ShareGPT preference data it holds the prompt). A config's `dataset_columns: {prompt: question, …}` names
the column of a role explicitly, as LLaMA-Factory's `dataset_info.json` does; the other roles are still
found by name.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from smolalign.errors import UserError

# Role -> the column names that hold it in published datasets, the role's own name first.
ALIASES: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "question", "instruction", "query"),
    "input": ("input",),  # alpaca: extra prompt text after the instruction
    "chosen": ("chosen", "chosen_response", "response_chosen", "chosen_messages"),
    "rejected": ("rejected", "rejected_response", "response_rejected", "rejected_messages"),
    "completion": ("completion", "response", "output", "answer"),
    "label": ("label", "kto_tag"),
    "system": ("system", "system_prompt"),
    "messages": ("messages", "conversations", "conversation"),
}
ROLES = tuple(ALIASES)


@dataclass(frozen=True)
class ColumnMap:
    """The column of each role a dataset has (roles it lacks are absent)."""

    columns: dict[str, str]

    def __contains__(self, role: str) -> bool:
        return role in self.columns

    def value(self, row: dict[str, Any], role: str) -> Any:
        """The row's value for `role`; None when the dataset has no such column."""
        return row.get(self.columns[role]) if role in self.columns else None

    def renamed(self) -> dict[str, str]:
        """The roles read from a column of another name (`prompt` <- `question`), for `data inspect`."""
        return {role: column for role, column in self.columns.items() if role != column}


def map_columns(columns: list[str], explicit: dict[str, str] | None = None, *, source: str = "dataset") -> ColumnMap:
    """The role of each column: `explicit` ones first (checked against `columns`), then each remaining role
    from the first of its aliases the dataset has."""
    found: dict[str, str] = {}
    for role, column in (explicit or {}).items():
        if role not in ALIASES:
            close = difflib.get_close_matches(role, ROLES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"'dataset_columns' maps the role '{role}'{hint}; roles are {', '.join(ROLES)}.")
        if column not in columns:
            raise UserError(f"'dataset_columns' maps {role} to '{column}', but {source} has no such column; its "
                            f"columns are {', '.join(columns)}.")
        found[role] = column
    taken = set(found.values())
    for role, aliases in ALIASES.items():
        if role not in found:
            column = next((name for name in aliases if name in columns and name not in taken), None)
            if column is not None:
                found[role] = column
                taken.add(column)
    return ColumnMap(found)
