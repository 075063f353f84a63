"""PASS/FAIL checks of measured numbers against the theory, with stated tolerances."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Check:
    """One claim: ``measured`` agrees with ``expected`` within ``tol``.

    kind="rel": |measured / expected - 1| <= tol;  kind="abs": |measured - expected| <= tol;
    kind="max": measured <= expected (+ tol) — for errors and distances that must be small;
    kind="min": measured >= expected (- tol).
    A non-finite measurement always fails.
    """

    name: str
    measured: float
    expected: float
    tol: float
    kind: str = "rel"

    def __post_init__(self) -> None:
        if self.kind not in ("rel", "abs", "max", "min"):
            raise ValueError(f"unknown check kind {self.kind!r}")
        if self.tol < 0:
            raise ValueError("tolerance must be >= 0")

    @property
    def deviation(self) -> float:
        if self.kind == "rel":
            return abs(self.measured / self.expected - 1) if self.expected else math.inf
        if self.kind == "abs":
            return abs(self.measured - self.expected)
        if self.kind == "max":
            return self.measured - self.expected
        return self.expected - self.measured

    @property
    def passed(self) -> bool:
        return math.isfinite(self.measured) and self.deviation <= self.tol

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        if self.kind == "rel":
            rule = f"within {self.tol:.1%} of {self.expected:.4g} (off by {self.deviation:.2%})"
        elif self.kind == "abs":
            rule = f"within {self.tol:.3g} of {self.expected:.4g}"
        elif self.kind == "max":
            rule = f"<= {self.expected + self.tol:.4g}"
        else:
            rule = f">= {self.expected - self.tol:.4g}"
        return f"{verdict}  {self.name}: {self.measured:.4g}  ({rule})"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}


def all_passed(checks: list[Check]) -> bool:
    return bool(checks) and all(c.passed for c in checks)
