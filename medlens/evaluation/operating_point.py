"""Operating points: the decision rule of a two-class model as a stated clinical intent.

A threshold on a calibrated probability is a decision about error costs, not an artefact of one
validation split. An :class:`OperatingPoint` names the intent; :func:`choose_operating_point`
turns it into a threshold on validation data and says how sure that is (bootstrap intervals of
the threshold and of the sensitivity and specificity at it).

Rules (text form, as on the command line and in recipes):

* ``balanced`` (default): the Bayes decision on calibrated probabilities with equal error
  costs, ``p >= 0.5``. It needs no data; the data only measure it.
* ``cost_ratio=R``: a missed positive costs ``R`` false alarms; the Bayes decision is
  ``p >= 1 / (1 + R)`` (positive when ``p R >= (1 - p)``).
* ``sensitivity=S``: screening; the highest threshold whose validation sensitivity is ``>= S``
  (the best specificity that keeps it).
* ``specificity=S``: confirmation; the lowest threshold whose validation specificity is
  ``>= S``.
* ``youden``: Youden's J (sensitivity + specificity - 1; Youden 1950), made robust: the middle
  of the range of thresholds whose J is within :data:`YOUDEN_TOLERANCE` of the best, not the
  edge of that plateau where a few validation images happen to fall.

A target that validation can meet only by calling every image positive (or negative) cannot be
met: :class:`~medlens.errors.UsageError` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import numpy as np
from numpy.typing import ArrayLike

from medlens.errors import UsageError

__all__ = [
    "OperatingPoint",
    "OperatingPointSpec",
    "choose_operating_point",
    "rates_at",
    "RULES",
    "YOUDEN_TOLERANCE",
    "WIDE_THRESHOLD",
    "WIDE_RATE",
]

RULES = ("balanced", "youden", "sensitivity", "specificity", "cost_ratio")
YOUDEN_TOLERANCE = 0.02
"""Thresholds whose Youden's J is within this of the best count as near-optimal."""
WIDE_THRESHOLD = 0.3
"""A threshold interval wider than this (probability scale) is reported as uncertain."""
WIDE_RATE = 0.15
"""A sensitivity or specificity interval wider than this is reported as uncertain."""
_GRID = np.linspace(0.0005, 0.9995, 1999)


@dataclass(frozen=True)
class OperatingPoint:
    """A decision rule: ``rule`` is one of :data:`RULES`; ``value`` the target (sensitivity,
    specificity in (0, 1]) or the cost ratio (> 0)."""

    rule: str = "balanced"
    value: float | None = None

    @classmethod
    def parse(cls, spec: str | dict | OperatingPoint | None) -> OperatingPoint:
        """``"balanced"``, ``"youden"``, ``"sensitivity=0.95"``, ``"specificity=0.9"``,
        ``"cost_ratio=3"``, or the same as a mapping (``{"sensitivity": 0.95}``).

        Raises:
            UsageError: naming the option and the forms it takes.
        """
        if spec is None:
            return cls()
        if isinstance(spec, OperatingPoint):
            return spec
        if isinstance(spec, dict):
            if len(spec) != 1:
                raise UsageError(_usage(f"{spec!r} names {len(spec)} rules"))
            (rule, value), = spec.items()  # fmt: skip
        else:
            rule, _, value = str(spec).strip().partition("=")
            value = value or None
        rule = str(rule).strip().lower().replace("-", "_")
        if rule not in RULES:
            raise UsageError(_usage(f"unknown rule {rule!r}"))
        if rule in ("balanced", "youden"):
            if value not in (None, "", True):
                raise UsageError(_usage(f"{rule} takes no value"))
            return cls(rule)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(_usage(f"{rule} needs a number, got {value!r}")) from None
        if rule == "cost_ratio" and not number > 0:
            raise UsageError(_usage(f"cost_ratio must be > 0, got {number:g}"))
        if rule != "cost_ratio" and not 0 < number <= 1:
            raise UsageError(_usage(f"{rule} must be in (0, 1], got {number:g}"))
        return cls(rule, number)

    def __str__(self) -> str:
        return self.rule if self.value is None else f"{self.rule}={self.value:g}"

    def describe(self, positive: str = "positive") -> str:
        """The rule in plain words."""
        if self.rule == "balanced":
            return (
                f"balanced: {positive} when its calibrated probability is at least 0.5 (the "
                "Bayes decision with equal costs for a missed case and a false alarm)"
            )
        if self.rule == "cost_ratio":
            return (
                f"cost ratio {self.value:g}: a missed {positive} case costs {self.value:g} false "
                f"alarms, so {positive} when its calibrated probability is at least "
                f"{self.bayes_threshold():.4g}"
            )
        if self.rule == "sensitivity":
            return (
                f"screening: the highest threshold that keeps validation sensitivity at least "
                f"{self.value:g}"
            )
        if self.rule == "specificity":
            return (
                f"confirmation: the lowest threshold that keeps validation specificity at least "
                f"{self.value:g}"
            )
        return (
            "Youden's J (sensitivity + specificity - 1), the middle of the thresholds within "
            f"{YOUDEN_TOLERANCE} of the best J on validation"
        )

    def bayes_threshold(self) -> float | None:
        """The data-free threshold of the cost rules (None for the rules that need data)."""
        if self.rule == "balanced":
            return 0.5
        if self.rule == "cost_ratio":
            assert self.value is not None  # parse() requires a number for cost_ratio
            return 1.0 / (1.0 + float(self.value))
        return None

    def threshold(self, y_true: ArrayLike, p_pos: ArrayLike) -> float:
        """The threshold this rule picks on ``(y_true, p_pos)`` (positive iff ``p >= t``).

        Raises:
            UsageError: a target that only a degenerate rule (every image one class) meets.
        """
        fixed = self.bayes_threshold()
        if fixed is not None:
            return fixed
        y, p = _binary(y_true, p_pos)
        t = _candidates(p, grid=self.rule == "youden")
        sens, spec = rates_at(y, p, t)
        if self.rule in ("sensitivity", "specificity"):
            screening = self.rule == "sensitivity"
            assert self.value is not None  # parse() requires a number for these rules
            kept, other = (sens, spec) if screening else (spec, sens)
            ok = np.flatnonzero(kept >= self.value - 1e-12)
            # t increases: the highest cut keeping sensitivity, the lowest keeping specificity,
            # has the best of the other rate
            i = int(ok[-1] if screening else ok[0])
            if other[i] == 0:
                raise UsageError(
                    f"the operating point {self} cannot be met on these {len(y)} validation "
                    f"images except by calling every image {'positive' if screening else 'negative'}"
                    "; choose a lower target or another rule"
                )
            return float(t[i])
        j = sens + spec - 1.0
        near = np.flatnonzero(j >= j.max() - YOUDEN_TOLERANCE)
        middle = (t[near[0]] + t[near[-1]]) / 2.0
        # The near-optimal set may have gaps: the near-optimal threshold closest to the middle.
        return float(t[near[np.argmin(np.abs(t[near] - middle))]])


def _usage(problem: str) -> str:
    return (
        f"--operating-point: {problem}; use balanced, youden, sensitivity=S, specificity=S "
        "(S in (0, 1]) or cost_ratio=R (R > 0)"
    )


def _binary(y_true: ArrayLike, p_pos: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(p_pos, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]
    p = p.ravel()
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} entries but p_pos has {len(p)}")
    classes = np.unique(y).tolist()
    if classes != [0, 1]:
        raise UsageError(
            "an operating point needs validation images of both classes "
            f"(found classes {classes}); cannot trade off sensitivity and specificity"
        )
    return y, p


def _candidates(p: np.ndarray, grid: bool) -> np.ndarray:
    """Increasing thresholds: the midpoints between distinct scores (every possible decision
    on the data, with a margin on both sides instead of sitting on one image's score), 0 and
    just above 1; with ``grid``, a fine grid of the probability scale too (so the middle of a
    near-optimal range is measured in probability, not in images)."""
    s = np.unique(p)
    mids = (s[1:] + s[:-1]) / 2.0
    extra: ArrayLike = _GRID if grid else []
    return np.unique(np.concatenate([[0.0], extra, mids, [np.nextafter(1.0, 2.0)]]))


def rates_at(y: np.ndarray, p: np.ndarray, t: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity of the rule ``p >= t`` for each threshold in ``t``."""
    t = np.asarray(t, dtype=np.float64)
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    sens = 1.0 - np.searchsorted(pos, t, side="left") / max(len(pos), 1)
    spec = np.searchsorted(neg, t, side="left") / max(len(neg), 1)
    return sens, spec


def _interval(values: np.ndarray) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


class OperatingPointChoice(TypedDict):
    """:func:`choose_operating_point`'s answer (``model.json``'s ``operating_point``)."""

    rule: str
    description: str
    threshold: float
    threshold_ci: list[float]
    sensitivity: float
    sensitivity_ci: list[float]
    specificity: float
    specificity_ci: list[float]
    n: int
    n_positive: int
    n_negative: int
    measured_on: str
    warning: str | None


def choose_operating_point(
    y_true: ArrayLike,
    p_pos: ArrayLike,
    spec: str | dict | OperatingPoint | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    split: str = "validation",
) -> OperatingPointChoice:
    """The threshold ``spec`` picks on these images, with 95% bootstrap intervals.

    The images are resampled ``n_boot`` times within each class; each resample gives the
    threshold the rule would have picked there (its interval says how much the choice depends on
    which images validation happened to hold) and the sensitivity and specificity of the chosen
    threshold (their intervals). Intervals wider than :data:`WIDE_THRESHOLD` (threshold) or
    :data:`WIDE_RATE` (rates) give a ``warning``.

    Returns:
        ``{"rule", "description", "threshold", "threshold_ci", "sensitivity",
        "sensitivity_ci", "specificity", "specificity_ci", "n", "n_positive", "n_negative",
        "measured_on", "warning"}``.
    """
    op = OperatingPoint.parse(spec)
    y, p = _binary(y_true, p_pos)
    t = op.threshold(y, p)
    sens, spec_ = (float(v[0]) for v in rates_at(y, p, [t]))
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    boot_t, boot_sens, boot_spec = [], [], []
    fixed = op.bayes_threshold()
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        yb, pb = y[idx], p[idx]
        if fixed is not None:
            boot_t.append(fixed)
        else:
            try:
                boot_t.append(op.threshold(yb, pb))
            except UsageError:  # this resample cannot meet the target: its extreme
                boot_t.append(0.0 if op.rule == "sensitivity" else 1.0)
        s, c = rates_at(yb, pb, [t])
        boot_sens.append(s[0])
        boot_spec.append(c[0])
    out: OperatingPointChoice = {
        "rule": str(op),
        "description": op.describe(),
        "threshold": t,
        "threshold_ci": _interval(np.array(boot_t)),
        "sensitivity": sens,
        "sensitivity_ci": _interval(np.array(boot_sens)),
        "specificity": spec_,
        "specificity_ci": _interval(np.array(boot_spec)),
        "n": int(len(y)),
        "n_positive": int(len(pos)),
        "n_negative": int(len(neg)),
        "measured_on": split,
        "warning": None,
    }
    out["warning"] = _warning(out)
    return out


def _warning(op: OperatingPointChoice) -> str | None:
    """Plain words when the operating point rests on too little: a wide interval."""
    problems = []
    lo, hi = op["threshold_ci"]
    if hi - lo > WIDE_THRESHOLD:
        problems.append(f"the threshold could lie anywhere from {lo:.3f} to {hi:.3f}")
    for name, (lo, hi) in (
        ("sensitivity", op["sensitivity_ci"]),
        ("specificity", op["specificity_ci"]),
    ):
        if hi - lo > WIDE_RATE:
            problems.append(f"{name} at it lies between {lo:.3f} and {hi:.3f}")
    if not problems:
        return None
    return (
        f"uncertain operating point ({op['rule']}, {op['n_positive']} positive and "
        f"{op['n_negative']} negative {op['measured_on']} images): "
        + "; ".join(problems)
        + " (95% bootstrap intervals); more labelled images of each class would narrow it"
    )


OperatingPointSpec = str | dict | OperatingPoint | None
"""What names an operating point: its text, a one-entry mapping, the object, or None
(balanced)."""
