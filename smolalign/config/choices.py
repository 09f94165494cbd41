"""Every list of names a setting chooses from, defined once.

Config fields are typed with these `Literal`s, so a wrong name is refused with the list and the closest
name; the tuples serve the code that needs the names at run time (the loss registry, the batch layouts,
help texts). Registries keyed by these names (`core.losses.OBJECTIVES`, `DPO_LOSSES`) are checked
against them by the tests.
"""

from __future__ import annotations

import typing
from typing import Literal

# What each algorithm trains, as the model card and `--help` name it.
ALGORITHM_TITLES = {
    "dpo": "Direct Preference Optimization (Rafailov et al. 2023)",
    "orpo": "Odds Ratio Preference Optimization (Hong et al. 2024)",
    "simpo": "Simple Preference Optimization (Meng et al. 2024)",
    "sft": "supervised fine-tuning",
    "reward": "a Bradley-Terry reward model (sequence classification, one output)",
}
Algorithm = Literal[tuple(ALGORITHM_TITLES)]
ALGORITHMS: tuple[str, ...] = tuple(ALGORITHM_TITLES)
# Algorithms whose `logps/*` metrics are mean token log-probs of an answer (their losses are length-normalised);
# the others log sums over answer tokens. Plots and tables never put the two scales on one axis.
MEAN_LOGPS_ALGORITHMS: tuple[str, ...] = ("orpo", "simpo")

DpoLossType = Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down"]
DPO_LOSS_TYPES: tuple[str, ...] = typing.get_args(DpoLossType)

BatchLayout = Literal["auto", "padded", "packed", "prefix_shared"]
LAYOUTS: tuple[str, ...] = tuple(name for name in typing.get_args(BatchLayout) if name != "auto")

Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
Tracker = Literal["tensorboard", "wandb"]
TRACKERS: tuple[str, ...] = typing.get_args(Tracker)
