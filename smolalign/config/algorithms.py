"""The settings that belong to some algorithms only, checked together: each rule is one sentence naming the key.

`loss_type` left unset means the algorithm's default (DPO: sigmoid, KTO: kto): `loss_types` says which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from smolalign.config.choices import DPO_LOSS_TYPES, KTO_LOSS_TYPES
from smolalign.config.fields import require

if TYPE_CHECKING:
    from smolalign.config.train import TrainConfig

# DPO loss types that read label_smoothing (TRL 1.16's), and those an f-divergence may reshape.
SMOOTHED_DPO_LOSSES = frozenset({"robust", "exo_pair", "aot", "aot_unpaired"})
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
# Settings of one algorithm, which the others take only at their defaults.
DPO_ONLY = ("loss_weights", "rpo_alpha", "f_divergence_type", "ld_alpha", "use_weighting")
KTO_ONLY = ("desirable_weight", "undesirable_weight")


DEFAULT_LOSS_TYPES = {"dpo": "sigmoid", "kto": "kto"}


def loss_types(config: TrainConfig) -> list[str]:
    """The loss types a config trains with, as a list (one or several; the algorithm's default when unset;
    none for algorithms without loss types)."""
    if config.loss_type is None:
        return [DEFAULT_LOSS_TYPES[config.algorithm]] if config.algorithm in DEFAULT_LOSS_TYPES else []
    return list(config.loss_type) if isinstance(config.loss_type, list) else [config.loss_type]


def check_algorithm_settings(config: TrainConfig) -> None:
    name = config.algorithm
    for key in (*(DPO_ONLY if name != "dpo" else ()), *(KTO_ONLY if name != "kto" else ())):
        require(getattr(config, key) == getattr(type(config), key),  # the class holds each field's default
                f"'{key}' is a {'DPO' if key in DPO_ONLY else 'KTO'} setting; it does not apply to {name}.")
    if name == "dpo":
        _check_dpo(config)
    elif name == "kto":
        _check_kto(config)
    else:
        # "sigmoid" was the default of every algorithm before the default became the algorithm's own
        require(config.loss_type in (None, "sigmoid"), f"'loss_type' selects a DPO or KTO loss; it does not apply "
                                                        f"to {name}.")
        require(config.ref_model is None, f"{name} is reference-free; remove 'ref_model' (it would be loaded and "
                                          "never used).")
        require(not config.precompute_ref_log_probs,
                f"{name} is reference-free, so there is nothing to precompute; remove 'precompute_ref_log_probs'.")
        require(config.label_smoothing == 0 or name == "simpo", f"'label_smoothing' does not apply to {name}.")
    require(config.cpo_alpha == 0 or name == "simpo", "'cpo_alpha' applies to simpo only.")
    require(config.cpo_alpha >= 0, "'cpo_alpha' must be >= 0.")
    require(config.center_rewards_coefficient is None or name == "reward",
            "'center_rewards_coefficient' applies to algorithm: reward only.")


def _check_dpo(config: TrainConfig) -> None:
    types = loss_types(config)
    for loss_type in types:
        require(loss_type in DPO_LOSS_TYPES, f"'loss_type' {loss_type} is KTO's; DPO's are {', '.join(DPO_LOSS_TYPES)}.")
    require(len(set(types)) == len(types), f"'loss_type' names {types}: each loss type once.")
    require(config.loss_weights is None or len(config.loss_weights) == len(types),
            f"'loss_weights' has {len(config.loss_weights or [])} weights for {len(types)} loss types; give one per "
            "loss type.")
    require(config.label_smoothing == 0 or bool(SMOOTHED_DPO_LOSSES & set(types)),
            "'label_smoothing' applies to loss_type robust, exo_pair, aot and aot_unpaired (and to simpo); choose one "
            "or remove it.")
    require("exo_pair" not in types or config.label_smoothing > 0,
            "loss_type exo_pair needs 'label_smoothing' > 0 (its paper recommends 1e-3).")
    require(config.f_divergence_type == "reverse_kl" or set(types) <= F_DIVERGENCE_LOSSES,
            f"'f_divergence_type: {config.f_divergence_type}' reshapes the margin of loss types "
            f"{', '.join(sorted(F_DIVERGENCE_LOSSES))} only, not {', '.join(sorted(set(types) - F_DIVERGENCE_LOSSES))}.")
    require(not config.use_weighting or not {"aot", "aot_unpaired", "sft"} & set(types),
            "'use_weighting' (WPO) weights per-pair losses, which aot, aot_unpaired and sft are not; remove one.")
    require(config.ld_alpha is None or 0 <= config.ld_alpha <= 1, f"'ld_alpha' must lie in [0, 1], not "
                                                                   f"{config.ld_alpha}.")
    require(config.rpo_alpha is None or config.rpo_alpha >= 0, "'rpo_alpha' must be >= 0.")
    require(config.discopop_tau > 0, f"'discopop_tau' must be > 0, not {config.discopop_tau}.")


def _check_kto(config: TrainConfig) -> None:
    require(config.loss_type in (None, *KTO_LOSS_TYPES), f"'loss_type' for kto is {' or '.join(KTO_LOSS_TYPES)}, "
                                                         f"not {config.loss_type}.")
    require(config.desirable_weight > 0 and config.undesirable_weight > 0,
            "'desirable_weight' and 'undesirable_weight' must be > 0.")
    require(config.per_device_train_batch_size >= 2 or config.loss_type == "apo_zero_unpaired",
            "KTO estimates its KL reference point by pairing each prompt with another row's answer of the same "
            "batch: 'per_device_train_batch_size' must be >= 2 (or use loss_type apo_zero_unpaired).")
    require(config.label_smoothing == 0, "'label_smoothing' does not apply to kto.")
