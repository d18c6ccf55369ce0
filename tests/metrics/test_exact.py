"""Exact sums: the vectorised per-row sums and batched layer-statistics updates equal the
one-call-per-row forms bit for bit (shards and batchings rely on it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eqaudit.metrics import LayerStats
from eqaudit.metrics.exact import ExactSum, exact_integer, exact_row_integers


def _awkward(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Values over the whole float64 range: subnormals, zeros, signs, the largest finite."""
    values = rng.standard_normal(shape) * 10.0 ** rng.integers(-300, 300, size=shape)
    flat = values.reshape(-1)
    if flat.size >= 3:
        flat[0], flat[1], flat[2] = 5e-324, 0.0, -1.7e308
    return values


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 2500), (0, 4), (4, 0), (300, 8)])
def test_row_integers_equal_one_exact_integer_per_row(shape) -> None:
    rows = _awkward(np.random.default_rng(sum(shape)), shape)
    assert exact_row_integers(rows) == [exact_integer(row) for row in rows]


@pytest.mark.parametrize("value", [np.nextafter(2.0, 0.0), -np.nextafter(2.0, 0.0), -1.7e308])
@pytest.mark.parametrize("width", [1024, 3000])
def test_row_integers_hold_full_buckets(value, width) -> None:
    # Every term in one bucket with the largest mantissa and the largest shift inside its
    # group, a whole chunk of them: the bucket sums' widest case, of either sign.
    rows = np.full((2, width), value)
    rows[1, ::2] = -rows[1, ::2]  # the second row cancels to 0 (or to one term)
    assert exact_row_integers(rows) == [exact_integer(row) for row in rows]
    assert exact_row_integers(rows)[0] == exact_integer([value]) * width
    assert exact_row_integers(np.zeros((2, 3))) == [0, 0]


def test_row_integers_refuse_what_exact_sums_refuse() -> None:
    with pytest.raises(ValueError, match="finite values only"):
        exact_row_integers(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match=r"\(R, N\)"):
        exact_row_integers(np.zeros(3))


def test_a_sum_of_tiny_and_huge_terms_is_exact() -> None:
    # 1e300 + 1 - 1e300 is 0 in float64 arithmetic; the exact sum keeps the 1.
    rows = np.array([[1e300, 1.0, -1e300], [2.0**-1074, 2.0**-1074, 0.0]])
    totals = [ExactSum(t).value for t in exact_row_integers(rows)]
    assert totals == [1.0, 2.0**-1073]


def test_update_rows_gives_the_states_of_one_update_per_row() -> None:
    rng = np.random.default_rng(3)
    relative = rng.uniform(0, 1, size=(5, 9)) ** 4  # spread over many histogram bins
    cosine = rng.uniform(0, 2, size=(5, 9))
    one_by_one = [LayerStats() for _ in range(5)]
    batched = [LayerStats() for _ in range(5)]
    for _ in range(2):  # twice: the update adds to what the states already hold
        for state, rel, cos in zip(one_by_one, relative, cosine, strict=True):
            state.update(torch.from_numpy(rel), torch.from_numpy(cos))
        LayerStats.update_rows(batched, relative, cosine)
    for a, b in zip(one_by_one, batched, strict=True):
        assert a.to_state() == b.to_state()
        assert a.compute() == b.compute()
