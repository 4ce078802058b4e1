"""Target transforms for training (`data.transform`), fitted on the training split only.

Models learn the transformed target; predictions are mapped back with `inverse` so every metric is
reported on the original scale. All transforms are monotone, so rank metrics are unaffected by the
inversion itself.
"""

from __future__ import annotations

import numpy as np

from runner.errors import PlanError, PlanIssue

NAMES = ("none", "log", "standardize", "rank")


class TargetTransform:
    """Fit on training targets, then `forward` / `inverse` arrays; `state()` is JSON for the run record."""

    def __init__(self, name: str = "none", log_offset: float | None = None):
        if name not in NAMES:
            raise PlanError(
                "plan", [PlanIssue("data.transform", f"unknown transform {name!r}; use one of {', '.join(NAMES)}")]
            )
        self.name = name
        self.log_offset = log_offset
        self.params: dict[str, float] = {}
        self._sorted: np.ndarray | None = None

    def fit(self, y: np.ndarray) -> TargetTransform:
        y = np.asarray(y, dtype=np.float64)
        if self.name == "log":
            # shift so the smallest training value maps to log(offset); the offset (1% of the spread by
            # default) keeps exact zeros — GB1 has 29k of them — finite without flattening small values
            spread = float(np.std(y)) or 1.0
            offset = self.log_offset if self.log_offset is not None else 0.01 * spread
            self.params = {"shift": float(-np.min(y) + offset)}
        elif self.name == "standardize":
            self.params = {"mean": float(np.mean(y)), "std": float(np.std(y)) or 1.0}
        elif self.name == "rank":
            self._sorted = np.sort(y)
        return self

    def forward(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if self.name == "log":
            return np.log(np.maximum(y + self.params["shift"], 1e-12))
        if self.name == "standardize":
            return (y - self.params["mean"]) / self.params["std"]
        if self.name == "rank":
            n = len(self._sorted)
            # mid-rank of each value among the training values, scaled to [0, 1]
            lo = np.searchsorted(self._sorted, y, side="left")
            hi = np.searchsorted(self._sorted, y, side="right")
            return ((lo + hi) / 2.0) / n
        return y

    def inverse(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        if self.name == "log":
            return np.exp(z) - self.params["shift"]
        if self.name == "standardize":
            return z * self.params["std"] + self.params["mean"]
        if self.name == "rank":
            n = len(self._sorted)
            grid = (np.arange(n) + 0.5) / n
            return np.interp(z, grid, self._sorted)
        return z

    def state(self) -> dict:
        return {"name": self.name, **self.params}
