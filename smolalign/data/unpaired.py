"""Rows for KTO: answers labelled desirable or not, each with the mismatched answer its KL estimate reads.

Pairs become two rows each, as TRL's `unpair_preference_dataset` makes them (per block of 1,000 pairs, the
chosen answers as desirable rows, then the rejected ones as undesirable rows). KTO's reference point is
the KL of the policy from the reference on prompts paired with answers written for other prompts: as in
TRL, each row is given, in its `rejected` slot, the answer of the row before it within its chunk of
`per_device_train_batch_size` rows (the first row of a chunk takes the chunk's last answer).
"""

from __future__ import annotations

import dataclasses
import logging

from smolalign.data.formats import PreferencePair
from smolalign.data.tokenize import TokenizedPair
from smolalign.errors import UserError

log = logging.getLogger("smolalign")

UNPAIR_BLOCK = 1000  # the batch size of TRL's unpairing map


def unpair(pairs: list[PreferencePair]) -> list[PreferencePair]:
    """Each pair as a desirable row (its chosen answer) and an undesirable one (its rejected answer), in TRL's
    order; rows that are unpaired already are kept as they are."""
    if all(pair.rejected is None for pair in pairs):
        return pairs
    rows: list[PreferencePair] = []
    for start in range(0, len(pairs), UNPAIR_BLOCK):
        block = pairs[start:start + UNPAIR_BLOCK]
        rows += [dataclasses.replace(p, rejected=None, label=True) for p in block]
        rows += [dataclasses.replace(p, chosen=p.rejected, rejected=None, label=False) for p in block]
    return rows


def check_labels(rows: list[TokenizedPair], source: str, *, desirable_weight: float,
                 undesirable_weight: float) -> None:
    """Both kinds of rows present (a UserError otherwise); a warning, as TRL gives it, when the weights leave them
    unbalanced beyond the KTO paper's range 1 <= (weight_D n_D) / (weight_U n_U) <= 4/3 (Eq. 8)."""
    desirable = sum(1 for row in rows if row.label)
    if desirable in (0, len(rows)):
        kind = "desirable" if desirable else "undesirable"
        raise UserError(f"every row of '{source}' is {kind}; KTO learns from both thumbs up and thumbs down: add "
                        f"rows of the other kind, or use algorithm sft for desirable rows only.")
    undesirable = len(rows) - desirable
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if desirable != undesirable and not 1 <= ratio <= 1.33:
        low, high = undesirable * undesirable_weight / desirable, 1.33 * undesirable * undesirable_weight / desirable
        log.warning("%s: %d desirable and %d undesirable rows with desirable_weight %g and undesirable_weight %g put "
                    "(weight x rows) of desirable over undesirable at %.2f, outside the KTO paper's [1, 1.33]; "
                    "desirable_weight in [%.2f, %.2f] would bring it in", source, desirable, undesirable,
                    desirable_weight, undesirable_weight, ratio, low, high)


def with_kl_answers(rows: list[TokenizedPair], chunk: int, max_length: int) -> list[TokenizedPair]:
    """Each row with, as its `rejected` answer, the answer of the row before it in its chunk of `chunk` rows (cut to
    fit `max_length` after the row's prompt)."""
    paired = []
    for start in range(0, len(rows), chunk):
        block = rows[start:start + chunk]
        for offset, row in enumerate(block):
            other = block[offset - 1].chosen_ids  # offset 0 takes the block's last answer
            paired.append(dataclasses.replace(row, rejected_ids=other[:max(1, max_length - len(row.prompt_ids))]))
    return paired
