"""Exact, order-independent sums of float64 values: what makes sharded audits bit-identical.

A float64 sum depends on the order of its terms, so an audit split into shards and merged would
differ from a single run in the last digits. :class:`ExactSum` keeps the *exact* sum instead, as
one integer multiple of ``2**-SCALE_BITS`` (every finite float64 is such a multiple: the smallest
subnormal is ``2**-1074``), and rounds once, correctly, when read. Adding the same values in any
order or grouping (batches, shards, resumed runs) gives the same integer, hence the same float.

Adding a batch is vectorised: ``numpy.frexp`` splits each value into a 53-bit integer mantissa and
an exponent, mantissas are summed exactly in int64 per exponent (at most 2**10 terms per bucket
per call, far from overflow), and only the few distinct exponents touch Python integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Values are held as integers times 2**-SCALE_BITS (covers every float64 down to subnormals).
SCALE_BITS = 1126
_MANTISSA_BITS = 53
_CHUNK = 1 << 10  # int64 mantissa sums per exponent stay below 2**63


def _as_array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, on any device
        values = values.detach().to("cpu").double().numpy()
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(array).all():
        raise ValueError("ExactSum takes finite values only")
    return array


def exact_integer(values: Any) -> int:
    """``sum(values) * 2**SCALE_BITS`` as an exact Python integer."""
    array = _as_array(values)
    total = 0
    for start in range(0, array.size, _CHUNK):
        part = array[start : start + _CHUNK]
        mantissa, exponent = np.frexp(part)  # part = mantissa * 2**exponent, |mantissa| in [.5, 1)
        integer = np.ldexp(mantissa, _MANTISSA_BITS).astype(np.int64)  # exact: 53 bits
        shift = exponent.astype(np.int64) - _MANTISSA_BITS + SCALE_BITS
        for value in np.unique(shift):
            bucket = int(integer[shift == value].sum())
            total += bucket << int(value) if value >= 0 else bucket >> int(-value)
    return total


def exact_row_integers(rows: np.ndarray) -> list[int]:
    """``[exact_integer(row) for row in rows]`` for a ``(R, N)`` float64 array, in one vectorised
    pass: the mantissas of every row are summed per (row, exponent) bucket with one sort and
    ``np.add.reduceat`` in int64 (still at most 2**10 terms a bucket), so the Python integers
    touched are the few buckets of each row, not one call per row."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"expected a (R, N) array, got shape {rows.shape}")
    if not np.isfinite(rows).all():
        raise ValueError("ExactSum takes finite values only")
    count, width = rows.shape
    totals = [0] * count
    for start in range(0, width if count else 0, _CHUNK):
        part = rows[:, start : start + _CHUNK]
        mantissa, exponent = np.frexp(part)
        integer = np.ldexp(mantissa, _MANTISSA_BITS).astype(np.int64).reshape(-1)
        shift = (exponent.astype(np.int64) - _MANTISSA_BITS + SCALE_BITS).reshape(-1)
        row = np.repeat(np.arange(count, dtype=np.int64), part.shape[1])
        # shift lies in [0, 2 * SCALE_BITS]: one integer key per (row, shift) bucket.
        key = row * (2 * SCALE_BITS + 1) + shift
        order = np.argsort(key, kind="stable")
        key, integer = key[order], integer[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        sums = np.add.reduceat(integer, starts)
        bucket_row, shift = np.divmod(key[starts], 2 * SCALE_BITS + 1)
        # Python integers shifted into place and added per row by numpy's object loops (shift
        # >= 0: the smallest subnormal's exponent gives 0), one Python addition per row.
        shifted = np.left_shift(sums.astype(object), shift.astype(object))
        first = np.flatnonzero(np.r_[True, bucket_row[1:] != bucket_row[:-1]])
        for r, total in zip(
            bucket_row[first].tolist(), np.add.reduceat(shifted, first), strict=True
        ):
            totals[r] += total
    return totals


@dataclass
class ExactSum:
    """The exact sum of float64 values (see the module docstring); ``+`` merges two sums."""

    total: int = 0

    def add(self, values: Any) -> None:
        self.total += exact_integer(values)

    def __add__(self, other: ExactSum) -> ExactSum:
        return ExactSum(self.total + other.total)

    @property
    def value(self) -> float:
        """The exact sum rounded once to the nearest float64 (true division of integers)."""
        return self.total / (1 << SCALE_BITS)

    def __float__(self) -> float:
        return self.value

    def to_json(self) -> str:
        return hex(self.total)

    @classmethod
    def from_json(cls, text: str) -> ExactSum:
        return cls(int(text, 16))


def exact_mean(total: ExactSum, count: int) -> float:
    """``total / count`` correctly rounded (NaN when ``count`` is 0)."""
    if count == 0:
        return math.nan
    return total.total / (count << SCALE_BITS)
