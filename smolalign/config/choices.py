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
    "kto": "Kahneman-Tversky Optimization (Ethayarajh et al. 2024)",
    "sft": "supervised fine-tuning",
    "reward": "a Bradley-Terry reward model (sequence classification, one output)",
}
Algorithm = Literal[tuple(ALGORITHM_TITLES)]
ALGORITHMS: tuple[str, ...] = tuple(ALGORITHM_TITLES)
# Algorithms whose `logps/*` metrics are mean token log-probs of an answer (their losses are length-normalised);
# the others log sums over answer tokens. Plots and tables never put the two scales on one axis.
MEAN_LOGPS_ALGORITHMS: tuple[str, ...] = ("orpo", "simpo")

DpoLossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
DPO_LOSS_TYPES: tuple[str, ...] = typing.get_args(DpoLossType)
KtoLossType = Literal["kto", "apo_zero_unpaired"]
KTO_LOSS_TYPES: tuple[str, ...] = typing.get_args(KtoLossType)
LossType = Literal[DPO_LOSS_TYPES + KTO_LOSS_TYPES]
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
SamplingStrategy = Literal["random", "sequential"]

# GGUF storage types of an export (gguf_export/tensors.py maps them to gguf's).
Quantization = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]
QUANTIZATIONS: tuple[str, ...] = typing.get_args(Quantization)

BatchLayout = Literal["auto", "padded", "packed", "prefix_shared"]
LAYOUTS: tuple[str, ...] = tuple(name for name in typing.get_args(BatchLayout) if name != "auto")

Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
# transformers' schedules (get_scheduler), but reduce_lr_on_plateau, which follows an evaluation metric.
Scheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                    "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"]
Tracker = Literal["tensorboard", "wandb"]
TRACKERS: tuple[str, ...] = typing.get_args(Tracker)
