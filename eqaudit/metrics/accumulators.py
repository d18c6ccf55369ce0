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
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from eqaudit.metrics.exact import ExactSum, exact_mean, exact_row_integers
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


_PADDED_EDGES = np.append(HIST_EDGES, np.inf)


def bin_index(values: np.ndarray) -> np.ndarray:
    """Each value's histogram bin: the first upper edge at or above it (the last bin for larger
    values), i.e. ``minimum(searchsorted(HIST_EDGES, values, "left"), bins - 1)``, without the
    binary search over 1301 edges: ``log10`` places each value within a bin of its own, and
    comparisons with the neighbouring edges settle it, so the bins are searchsorted's exactly."""
    values = np.maximum(values, 0.0)  # (negative values: bin 0, as searchsorted)
    with np.errstate(divide="ignore"):  # log10(0) = -inf: bin 0
        guess = np.log10(values)
    guess -= _LOW_EXP
    guess *= _BINS_PER_DECADE
    np.ceil(guess, out=guess)
    last = len(HIST_EDGES) - 1
    np.nan_to_num(guess, copy=False, nan=last)  # (NaN: the last bin, as searchsorted)
    index = np.clip(guess, 0, last, out=guess).astype(np.intp)
    while True:  # log10 and the edges are within an ulp or so of exact: one step, if any
        up = _PADDED_EDGES[index] < values
        if not up.any():
            break
        index += up
    while True:
        down = (index > 0) & (_PADDED_EDGES[index - 1] >= values)
        if not down.any():
            break
        index -= down
    return np.minimum(index, last, out=index)


def _histogram(values: np.ndarray) -> np.ndarray:
    return np.bincount(bin_index(values), minlength=len(HIST_EDGES))


class _Mergeable:
    """Dataclass helper: merge adds every field (max-fields take the maximum); the state
    round-trips through JSON-able dicts (exact sums as hex integers, histograms sparse)."""

    _max_fields: tuple[str, ...] = ()
    #: Fields added after states were first written (shards of an older eqaudit lack them):
    #: their default, or the value here when the default would claim something (unknown).
    _added_fields: tuple[str, ...] = ()
    _missing_values: dict[str, float] = {}  # noqa: RUF012 (read only)

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
            if f.name not in state and f.name in cls._added_fields:
                if f.name in cls._missing_values:
                    values[f.name] = cls._missing_values[f.name]
                continue  # a state written before the field existed: its default
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

    @staticmethod
    def _host(values: torch.Tensor | np.ndarray) -> np.ndarray:
        """A tensor (on any device) or array as a host numpy array, values unchanged."""
        if isinstance(values, torch.Tensor):
            return values.detach().cpu().numpy()
        return np.asarray(values)

    def update(
        self,
        agree: torch.Tensor | np.ndarray,
        js: torch.Tensor | np.ndarray,
        logit_error: torch.Tensor | np.ndarray | None = None,
        correct: torch.Tensor | np.ndarray | None = None,
        floor: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Per-image values: ``agree``/``correct`` bool ``(B,)`` (correct only for labelled
        images), ``js``/``logit_error``/``floor`` float ``(B,)``; numpy arrays or tensors on
        any device (host arrays are the cheap path: the engine passes those)."""
        agree = self._host(agree)
        self.n += agree.size
        self.agree += int(np.count_nonzero(agree))
        self.js_sum.add(self._host(js))
        if logit_error is not None:
            logit_error = self._host(logit_error)
            self.logit_n += logit_error.size
            self.logit_sum.add(logit_error)
        if correct is not None:
            correct = self._host(correct)
            self.labelled += correct.size
            self.correct += int(np.count_nonzero(correct))
        if floor is not None:
            floor = self._host(floor)
            self.floor_n += floor.size
            self.floor_sum.add(floor)

    @staticmethod
    def update_rows(
        stats: Sequence[OutputStats],
        agree: np.ndarray,
        js: np.ndarray,
        logit_error: np.ndarray | None = None,
        correct: np.ndarray | None = None,
        floors: Sequence[np.ndarray | None] | None = None,
    ) -> None:
        """``stats[g].update(agree[g], js[g], logit_error[g], correct[g], floors[g])`` for every
        element ``g`` at once, on host arrays ``(G, B)`` (``correct``: ``(G, L)`` over the
        labelled images; ``floors[g]``: ``(B,)`` or None). The exact sums of all rows are taken
        in one vectorised pass, the same integers as row by row."""
        agreed = np.count_nonzero(agree, axis=1).tolist()
        js_totals = exact_row_integers(js)
        logit_totals = exact_row_integers(logit_error) if logit_error is not None else None
        right = np.count_nonzero(correct, axis=1).tolist() if correct is not None else None
        for gi, s in enumerate(stats):
            s.n += agree.shape[1]
            s.agree += agreed[gi]
            s.js_sum.total += js_totals[gi]
            if logit_totals is not None:
                s.logit_n += logit_error.shape[1]  # type: ignore[union-attr]
                s.logit_sum.total += logit_totals[gi]
            if right is not None:
                s.labelled += correct.shape[1]  # type: ignore[union-attr]
                s.correct += right[gi]
            floor = floors[gi] if floors is not None else None
            if floor is not None:
                s.floor_n += floor.size
                s.floor_sum.add(floor)

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
    distance. ``nonfinite`` counts the images left out because a map held NaN or Inf (or its
    norms overflowed): their errors are undefined, and :meth:`update_rows` keeps them out of
    every other field."""

    _max_fields = ("rel_max", "norm_max")
    _added_fields = ("nonfinite", "norm_max")
    #: (an older shard's maps were not measured: not known to be zero)
    _missing_values = {"norm_max": math.inf}  # noqa: RUF012 (read only)

    n: int = 0
    rel_sum: ExactSum = field(default_factory=ExactSum)
    rel_max: float = 0.0
    cos_sum: ExactSum = field(default_factory=ExactSum)
    floor_n: int = 0
    floor_sum: ExactSum = field(default_factory=ExactSum)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_EDGES), dtype=np.int64))
    nonfinite: int = 0
    #: The largest norm of either map over the images (0: both maps are zero on every image,
    #: and the errors of 0 measure nothing)
    norm_max: float = 0.0

    def update(
        self, relative: torch.Tensor, cosine: torch.Tensor, floor: torch.Tensor | None = None
    ) -> None:
        """Per-image relative errors, cosine distances and (resampled elements) the
        interpolation floor of the feature-map action."""
        if floor is not None:
            self.floor_n += int(floor.numel())
            self.floor_sum.add(floor)
        rel = relative.detach().to(torch.float64).cpu().numpy()
        self.norm_max = math.inf  # (the maps' norms are not given: not known to be zero)
        self.n += rel.size
        self.rel_sum.add(rel)
        self.rel_max = max(self.rel_max, float(rel.max(initial=0.0)))
        self.cos_sum.add(cosine)
        self.hist = self.hist + _histogram(rel)

    @staticmethod
    def update_rows(
        stats: Sequence[LayerStats],
        relative: np.ndarray,
        cosine: np.ndarray,
        norms: np.ndarray | None = None,
    ) -> None:
        """``stats[r].update(relative[r], cosine[r])`` for every row ``r`` of two ``(R, N)``
        float64 arrays, vectorised: the same states, with one exact-sum pass, one histogram pass
        and one maximum for all rows instead of a call per (layer, element). ``norms``: ``(R, N)``,
        the larger of the two maps' norms per image (for :attr:`norm_max`).

        An image whose relative error or cosine distance is not finite (NaN or Inf in a map) is
        counted in its row's ``nonfinite`` and left out of the rest."""
        finite = np.isfinite(relative) & np.isfinite(cosine)
        if not finite.all():
            rows = finite.all(axis=1)
            if rows.any():
                LayerStats.update_rows(
                    [s for s, ok in zip(stats, rows, strict=True) if ok],
                    relative[rows],
                    cosine[rows],
                    norms[rows] if norms is not None else None,
                )
            for row in np.flatnonzero(~rows):
                keep = finite[row]
                stats[row].nonfinite += int((~keep).sum())
                if keep.any():
                    LayerStats.update_rows(
                        [stats[row]],
                        relative[row, keep][None],
                        cosine[row, keep][None],
                        norms[row, keep][None] if norms is not None else None,
                    )
            return
        count, width = relative.shape
        # (norms not given: the maps' norms are not known to be zero)
        largest = norms.max(axis=1, initial=0.0).tolist() if norms is not None else None
        rel_totals, cos_totals = exact_row_integers(relative), exact_row_integers(cosine)
        maxima = relative.max(axis=1, initial=0.0).tolist()
        bins = len(HIST_EDGES)
        index = bin_index(relative)
        index += np.arange(count)[:, None] * bins
        hists = np.bincount(index.reshape(-1), minlength=count * bins).reshape(count, bins)
        for row, state in enumerate(stats):
            state.n += width
            state.rel_sum.total += rel_totals[row]
            state.rel_max = max(state.rel_max, maxima[row])
            state.cos_sum.total += cos_totals[row]
            state.hist = state.hist + hists[row]
            state.norm_max = max(state.norm_max, largest[row] if largest else math.inf)

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
