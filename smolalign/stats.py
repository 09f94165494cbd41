"""95% intervals of the proportions a user reads: held-out preference accuracies and judge win rates.

An accuracy of 0.65 means little without the number of pairs behind it: on 20 pairs its 95% interval
is [0.43, 0.82], on 400 pairs [0.60, 0.70]. So every accuracy smolalign writes has its interval beside
it as two more flat numbers, `<name>_ci_low` and `<name>_ci_high` (eval.json and metrics.jsonl keep
one number per key, which tables and plots read like any other metric), and the pair count next to it
(`pairs` in eval.json, `eval_pairs` in metrics.jsonl).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal
CHANCE = 0.5  # the accuracy of a coin flip between the chosen and the rejected answer

# The proportions of pairs that smolalign logs (without the `eval_` prefix of held-out lines):
# `rewards/accuracies` (DPO, ORPO, SimPO), `logps/mean_accuracy` (held-out only), `accuracy` (reward models).
ACCURACY_METRICS = ("rewards/accuracies", "logps/mean_accuracy", "accuracy")


def wilson_interval(successes: float, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of the proportion successes / n.

    Unlike the normal approximation p ± 1.96·sqrt(p(1-p)/n), it stays inside [0, 1] and behaves at
    p = 0 or 1 and for small n. `successes` may be fractional (a judge's tie counts half a win). With
    no trials at all nothing is known: [0, 1].
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = Z_95**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half_width = Z_95 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At p = 0 or 1 a bound equals p in exact arithmetic; rounding must not leave p outside its interval.
    return max(0.0, min(p, centre - half_width)), min(1.0, max(p, centre + half_width))


def interval_keys(name: str) -> tuple[str, str]:
    """The keys under which the interval of metric `name` is stored: `name_ci_low`, `name_ci_high`."""
    return f"{name}_ci_low", f"{name}_ci_high"


def interval_fields(name: str, successes: int, n: int) -> dict[str, float]:
    """`{name_ci_low: …, name_ci_high: …}` for the accuracy successes / n, to store beside it."""
    return dict(zip(interval_keys(name), wilson_interval(successes, n), strict=True))


@dataclass(frozen=True)
class Proportion:
    """A share of `n` pairs (or prompts) with its 95% interval; `low`, `high` and `n` are None where the
    file it was read from did not record how many pairs it rests on (runs of older versions)."""

    value: float
    low: float | None = None
    high: float | None = None
    n: int | None = None

    @classmethod
    def read(cls, values: dict, name: str, *, n_key: str) -> Proportion | None:
        """Metric `name` of a flat dict (eval.json, a metrics.jsonl line) with its stored interval and count.

        An accuracy written without its interval but with its pair count (eval.json of older versions)
        is an exact proportion of those pairs, so the interval is computed from the two.
        """
        value = values.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        n = values.get(n_key)
        low, high = (values.get(key) for key in interval_keys(name))
        if (low is None or high is None) and isinstance(n, int):
            low, high = wilson_interval(round(value * n), n)
        return cls(value, low, high, n)

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    def overlaps(self, other: Proportion) -> bool:
        return self.low <= other.high and other.low <= self.high

    def __str__(self) -> str:
        """`0.61 [0.53, 0.68], n=150`: the share, its 95% interval and the count it rests on."""
        if not self.has_interval:
            return f"{self.value:.2f} (n not recorded)"
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]" + (f", n={self.n:,}" if self.n is not None else "")
