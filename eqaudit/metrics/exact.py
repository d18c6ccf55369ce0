"""Exact, order-independent sums of float64 values: what makes sharded audits bit-identical.

A float64 sum depends on the order of its terms, so an audit split into shards and merged would
differ from a single run in the last digits. :class:`ExactSum` keeps the *exact* sum instead, as
one integer multiple of ``2**-SCALE_BITS`` (every finite float64 is such a multiple: the smallest
subnormal is ``2**-1074``), and rounds once, correctly, when read. Adding the same values in any
order or grouping (batches, shards, resumed runs) gives the same integer, hence the same float.

Adding a batch is vectorised: ``numpy.frexp`` splits each value into a 53-bit integer mantissa and
an exponent, mantissas are summed exactly in int64 per exponent (at most 2**10 terms per bucket
per call, far from overflow), and only the few distinct exponents touch Python integers.
:func:`exact_row_integers` does the same for many rows at once (buckets per row and group of
exponents, summed by ``np.bincount``); :func:`exact_integer` is its one-row definition.
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
#: exact_row_integers: binades per bucket, and the bits of each half a bucket's sum is split in
_GROUP_BITS, _HALF_BITS = 3, 30


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
    pass: the mantissas of every row are summed per (row, exponent group) bucket by
    ``np.bincount``, so the Python integers touched are the few buckets of each row, not one
    call per row, and nothing is sorted.

    A bucket holds ``2**_GROUP_BITS`` binades: each 53-bit mantissa is shifted left by its place
    in the group (< 2**60 in magnitude), then split into a high and a low part of at most 30
    bits that ``bincount`` sums in float64 exactly (at most 2**10 terms a call: < 2**40). The
    two sums become Python integers shifted into place."""
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
        integer = np.ldexp(mantissa, _MANTISSA_BITS).astype(np.int64)  # exact: 53 bits
        # value = integer * 2**shift / 2**SCALE_BITS, shift >= 0 (the smallest subnormal: 0)
        shift = exponent.astype(np.int64)
        shift += SCALE_BITS - _MANTISSA_BITS
        integer <<= shift & ((1 << _GROUP_BITS) - 1)
        group = shift >> _GROUP_BITS
        low = int(group.min())
        span = int(group.max()) - low + 1
        group -= low
        group += np.arange(count, dtype=np.int64)[:, None] * span  # one key per (row, group)
        key = group.reshape(-1)
        buckets = count * span  # at most 263 groups a row: float64's whole range
        high = np.bincount(key, weights=(integer >> _HALF_BITS).reshape(-1), minlength=buckets)
        halves = integer & ((1 << _HALF_BITS) - 1)
        rest = np.bincount(key, weights=halves.reshape(-1), minlength=buckets)
        used = np.flatnonzero((high != 0) | (rest != 0))
        if not used.size:  # all zeros, or terms that cancel
            continue
        bucket_row, bucket_group = np.divmod(used, span)
        # Python integers shifted into place and added per row by numpy's object loops, one
        # Python addition per row.
        place = ((bucket_group + low) << _GROUP_BITS).astype(object)
        shifted = np.left_shift(high[used].astype(np.int64).astype(object), place + _HALF_BITS)
        shifted += np.left_shift(rest[used].astype(np.int64).astype(object), place)
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
