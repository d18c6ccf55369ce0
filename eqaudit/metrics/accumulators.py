"""Streaming, mergeable accumulators for the output and per-layer metrics.

Each accumulator declares its state (exact sums, integer counts, maxima, histograms), takes
per-image values with ``update`` and gives the aggregate with ``compute``; ``merge`` adds two
states, so an audit can be sharded and resumed. Sums are :class:`~eqaudit.metrics.exact.ExactSum`
(exact, rounded once when read), so ``merge(a, b).compute() == whole.compute()`` holds exactly,
whatever the batches and shards. ``to_state``/``from_state`` give a JSON-able form (no pickle).
The maths lives in :mod:`eqaudit.metrics.functional` and is shared with the one-shot functions.

Percentiles are read from a fixed log-spaced histogram (100 bins per decade from 1e-12 to 10),
which is what makes them mergeable with bounded memory: a reported 95th percentile is the upper
edge of its bin (at most 2.4% above the exact order statistic) and never above the observed maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from eqaudit.metrics.exact import ExactSum, exact_mean
from eqaudit.metrics.functional import wilson_interval

_BINS_PER_DECADE = 100
_LOW_EXP, _HIGH_EXP = -12, 1
#: Upper edges of the histogram bins; bin 0 holds values below 1e-12 (reported as 0).
HIST_EDGES = np.concatenate(
    [
        [10.0**_LOW_EXP],
        np.logspace(_LOW_EXP, _HIGH_EXP, (_HIGH_EXP - _LOW_EXP) * _BINS_PER_DECADE + 1)[1:],
    ]
)


def _histogram(values: np.ndarray) -> np.ndarray:
    index = np.searchsorted(HIST_EDGES, values, side="left")
    return np.bincount(np.minimum(index, len(HIST_EDGES) - 1), minlength=len(HIST_EDGES))


class _Mergeable:
    """Dataclass helper: merge adds every field (max-fields take the maximum); the state
    round-trips through JSON-able dicts (exact sums as hex integers, histograms sparse)."""

    _max_fields: tuple[str, ...] = ()

    def merge(self, other):  # type: ignore[no-untyped-def]
        merged = {}
        for f in fields(self):  # type: ignore[arg-type]
            a, b = getattr(self, f.name), getattr(other, f.name)
            merged[f.name] = max(a, b) if f.name in self._max_fields else a + b
        return type(self)(**merged)

    def to_state(self) -> dict:
        state: dict = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, ExactSum):
                state[f.name] = {"exact": value.to_json()}
            elif isinstance(value, np.ndarray):
                nonzero = np.flatnonzero(value)
                state[f.name] = {
                    "size": int(value.size),
                    "index": nonzero.tolist(),
                    "count": value[nonzero].tolist(),
                }
            else:
                state[f.name] = value
        return state

    @classmethod
    def from_state(cls, state: dict):  # type: ignore[no-untyped-def]
        values: dict = {}
        for f in fields(cls):  # type: ignore[arg-type]
            value = state[f.name]
            if isinstance(value, dict) and "exact" in value:
                value = ExactSum.from_json(value["exact"])
            elif isinstance(value, dict) and "size" in value:
                array = np.zeros(value["size"], dtype=np.int64)
                array[np.asarray(value["index"], dtype=np.int64)] = value["count"]
                value = array
            values[f.name] = value
        return cls(**values)


@dataclass
class OutputStats(_Mergeable):
    """Per transform element: agreement, JS divergence, logit error, accuracy, interpolation floor."""

    n: int = 0
    agree: int = 0
    js_sum: ExactSum = field(default_factory=ExactSum)
    logit_n: int = 0
    logit_sum: ExactSum = field(default_factory=ExactSum)
    labelled: int = 0
    correct: int = 0
    floor_n: int = 0
    floor_sum: ExactSum = field(default_factory=ExactSum)

    def update(
        self,
        agree: torch.Tensor,
        js: torch.Tensor,
        logit_error: torch.Tensor | None = None,
        correct: torch.Tensor | None = None,
        floor: torch.Tensor | None = None,
    ) -> None:
        """Per-image values: ``agree``/``correct`` bool ``(B,)`` (correct only for labelled
        images), ``js``/``logit_error``/``floor`` float ``(B,)``."""
        self.n += int(agree.numel())
        self.agree += int(agree.sum())
        self.js_sum.add(js)
        if logit_error is not None:
            self.logit_n += int(logit_error.numel())
            self.logit_sum.add(logit_error)
        if correct is not None:
            self.labelled += int(correct.numel())
            self.correct += int(correct.sum())
        if floor is not None:
            self.floor_n += int(floor.numel())
            self.floor_sum.add(floor)

    def compute(self) -> dict[str, float | None]:
        low, high = wilson_interval(self.agree, self.n)
        return {
            "n": self.n,
            "agreement": self.agree / self.n if self.n else math.nan,
            "agreement_low": low,
            "agreement_high": high,
            "js_divergence": exact_mean(self.js_sum, self.n),
            "logit_error": exact_mean(self.logit_sum, self.logit_n) if self.logit_n else None,
            "accuracy": self.correct / self.labelled if self.labelled else None,
            "interpolation_floor": exact_mean(self.floor_sum, self.floor_n)
            if self.floor_n
            else None,
        }


@dataclass
class OrbitStats(_Mergeable):
    """Share of images whose top-1 class is the same under every element of the battery."""

    n: int = 0
    consistent: int = 0

    def update(self, consistent: torch.Tensor) -> None:
        self.n += int(consistent.numel())
        self.consistent += int(consistent.sum())

    def compute(self) -> float:
        return self.consistent / self.n if self.n else math.nan


@dataclass
class LayerStats(_Mergeable):
    """Per (layer, element): mean, 95th percentile and maximum of the relative error, mean cosine
    distance."""

    _max_fields = ("rel_max",)

    n: int = 0
    rel_sum: ExactSum = field(default_factory=ExactSum)
    rel_max: float = 0.0
    cos_sum: ExactSum = field(default_factory=ExactSum)
    floor_n: int = 0
    floor_sum: ExactSum = field(default_factory=ExactSum)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_EDGES), dtype=np.int64))

    def update(
        self, relative: torch.Tensor, cosine: torch.Tensor, floor: torch.Tensor | None = None
    ) -> None:
        """Per-image relative errors, cosine distances and (resampled elements) the
        interpolation floor of the feature-map action."""
        if floor is not None:
            self.floor_n += int(floor.numel())
            self.floor_sum.add(floor)
        rel = relative.detach().to(torch.float64).cpu().numpy()
        self.n += rel.size
        self.rel_sum.add(rel)
        self.rel_max = max(self.rel_max, float(rel.max(initial=0.0)))
        self.cos_sum.add(cosine)
        self.hist = self.hist + _histogram(rel)

    def quantile(self, q: float) -> float:
        if self.n == 0:
            return math.nan
        rank = math.ceil(q * self.n)  # nearest-rank definition
        index = int(np.searchsorted(np.cumsum(self.hist), rank, side="left"))
        if index == 0:
            return 0.0
        return min(float(HIST_EDGES[index]), self.rel_max)

    def compute(self) -> dict[str, float]:
        return {
            "n": self.n,
            "relative_error": exact_mean(self.rel_sum, self.n),
            "relative_error_p95": self.quantile(0.95),
            "relative_error_max": self.rel_max if self.n else math.nan,
            "cosine_distance": exact_mean(self.cos_sum, self.n),
            "interpolation_floor": exact_mean(self.floor_sum, self.floor_n)
            if self.floor_n
            else None,
        }
