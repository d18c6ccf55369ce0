"""Metric functions against known answers; accumulators: streaming == one-shot, merge == whole."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eqaudit.metrics import (
    LayerStats,
    OutputStats,
    cosine_distance,
    image_norms,
    js_divergence,
    looks_like_probabilities,
    map_norms,
    normalised_logit_error,
    probabilities,
    relative_error,
    robustness_score,
    wilson_interval,
)
from eqaudit.metrics.accumulators import HIST_EDGES, bin_index


def _exact_norms(x: torch.Tensor, start: int = 1) -> np.ndarray:
    squares = x.double().numpy() ** 2
    return np.sqrt(squares.reshape(*x.shape[:start], -1).sum(-1))


@pytest.mark.parametrize(
    ("shape", "start"),
    [
        ((3, 64, 112, 112), 1),
        ((2, 3, 32, 48, 40), 2),
        ((3, 10_000), 1),
        ((3, 4095), 1),
        ((2, 1, 700, 700), 1),  # one plane of 490 000 cells: summed in chunks, not whole
    ],
)
def test_image_norms_are_accurate_whatever_the_map_size(shape, start):
    # A float32 vector_norm over a whole 64 x 112 x 112 map is off by ~1e-5 relative on the
    # CPU (one running sum per SIMD lane); summing planes or chunks first keeps ~1e-7.
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + 1
    got = image_norms(x, start)
    assert got.dtype == torch.float64 and got.shape == x.shape[:start]
    np.testing.assert_allclose(got.numpy(), _exact_norms(x, start), rtol=2e-7, atol=0)
    assert torch.equal(image_norms(x - x.clone(), start), torch.zeros(x.shape[:start]))


def test_image_norms_of_half_precision_maps_neither_overflow_nor_round():
    # 300 over 32 x 64 x 64 cells: a norm of 300 * 2^8.5 = 108 611.7, past float16's 65 504.
    half = torch.full((2, 32, 64, 64), 300.0, dtype=torch.float16)
    np.testing.assert_allclose(image_norms(half).numpy(), 300.0 * 2**8.5, rtol=1e-7)
    # sqrt(1000) = 31.6228 is 31.625 in bfloat16 (8 bits): the norm keeps float32's digits.
    ones = torch.ones(2, 1000, dtype=torch.bfloat16)
    np.testing.assert_allclose(image_norms(ones).numpy(), math.sqrt(1000), rtol=1e-7)


def test_js_divergence_known_values():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.25, 0.75]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.75, 0.25]])
    js = js_divergence(p, q)
    assert js[0].item() == 1.0  # disjoint supports: the maximum, in bits
    assert js[1].item() == 0.0
    # By hand: m = (0.5, 0.5); KL(p||m) = 0.25 log2 0.5 + 0.75 log2 1.5
    kl = 0.25 * math.log2(0.5) + 0.75 * math.log2(1.5)
    assert js[2].item() == pytest.approx(kl, rel=1e-12)


def test_normalised_logit_error_ignores_constant_shifts():
    z = torch.tensor([[1.0, 2.0, 3.0]])
    assert normalised_logit_error(z, z + 5.0).item() == 0.0
    # c(z) = (-1, 0, 1), c(w) = (1, 0, -1): ||c(w) - c(z)|| / ||c(z)|| = 2
    assert normalised_logit_error(z, z.flip(1)).item() == pytest.approx(2.0)


def test_relative_error_and_cosine_known_values():
    a = torch.tensor([[3.0, 4.0]])
    assert relative_error(a, a).item() == 0.0
    assert relative_error(a, -a).item() == pytest.approx(1.0)  # ||2a|| / 2||a||
    assert relative_error(a, torch.zeros_like(a)).item() == pytest.approx(1.0)
    b = torch.tensor([[4.0, -3.0]])  # orthogonal, same norm: sqrt(2) * 5 / 10
    assert relative_error(a, b).item() == pytest.approx(math.sqrt(2) / 2)
    assert cosine_distance(a, b).item() == pytest.approx(1.0)
    assert cosine_distance(torch.zeros(1, 2), torch.zeros(1, 2)).item() == 0.0
    mask = torch.tensor([True, False])
    assert relative_error(a, torch.tensor([[3.0, 100.0]]), mask).item() == 0.0


def test_wilson_interval_known_values():
    low, high = wilson_interval(9, 10)
    assert low == pytest.approx(0.5958499732, abs=1e-9)
    assert high == pytest.approx(0.9821237869, abs=1e-9)
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 10)[0] == 0.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_probability_detection_and_score():
    probs = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    assert looks_like_probabilities(probs)
    assert not looks_like_probabilities(torch.tensor([[2.0, -1.0]]))
    assert torch.allclose(probabilities(probs, "probs"), probs.double())
    assert robustness_score([1.0, 0.5], [0.0, 0.5]) == pytest.approx(100 * (1.0 + 0.5) / 2)


def _values(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rel = 10 ** (-8 * torch.rand(n, generator=g, dtype=torch.float64))
    return rel, torch.rand(n, generator=g, dtype=torch.float64)


def test_layer_stats_streaming_equals_one_shot_and_merge_equals_whole():
    rel, cos = _values(1000, 0)
    whole = LayerStats()
    whole.update(rel, cos)
    streamed = LayerStats()
    for i in range(0, 1000, 37):
        streamed.update(rel[i : i + 37], cos[i : i + 37])
    a, b = LayerStats(), LayerStats()
    a.update(rel[:400], cos[:400])
    b.update(rel[400:], cos[400:])
    for other in (streamed.compute(), a.merge(b).compute(), b.merge(a).compute()):
        for key, value in whole.compute().items():
            if value is None:  # no interpolation floor for exact elements
                assert other[key] is None
            else:
                assert other[key] == pytest.approx(value, rel=1e-12), key
    assert whole.compute()["relative_error"] == pytest.approx(rel.mean().item(), rel=1e-12)
    assert whole.compute()["relative_error_max"] == rel.max().item()


def test_layer_stats_p95_within_one_bin_of_the_exact_order_statistic():
    rel, cos = _values(1000, 1)
    stats = LayerStats()
    stats.update(rel, cos)
    exact = np.sort(rel.numpy())[math.ceil(0.95 * 1000) - 1]
    p95 = stats.compute()["relative_error_p95"]
    assert exact <= p95 <= exact * 10 ** (1 / 100) * (1 + 1e-12)
    zeros = LayerStats()
    zeros.update(torch.zeros(10), torch.zeros(10))
    assert zeros.compute()["relative_error_p95"] == 0.0


def test_bin_index_is_searchsorted_over_the_edges():
    # The definition: the first upper edge at or above the value, the last bin past the end.
    edges = HIST_EDGES
    values = np.concatenate(
        [
            edges,
            np.nextafter(edges, 0.0),
            np.nextafter(edges, np.inf),
            10.0 ** np.random.default_rng(0).uniform(-15, 3, 200_000),
            [0.0, -1.0, -0.0, 5e-324, 1e-300, 1e-12, 10.0, 1e300, np.inf, -np.inf, np.nan],
        ]
    )
    expected = np.minimum(np.searchsorted(edges, values, side="left"), len(edges) - 1)
    np.testing.assert_array_equal(bin_index(values), expected)
    np.testing.assert_array_equal(bin_index(values.reshape(-1, 2)), expected.reshape(-1, 2))


def test_output_stats_merge_and_compute():
    agree = torch.tensor([True, True, False, True])
    js = torch.tensor([0.0, 0.1, 0.5, 0.2])
    whole = OutputStats()
    whole.update(agree, js, logit_error=js * 2, correct=agree)
    a, b = OutputStats(), OutputStats()
    a.update(agree[:1], js[:1], logit_error=js[:1] * 2, correct=agree[:1])
    b.update(agree[1:], js[1:], logit_error=js[1:] * 2, correct=agree[1:])
    merged = a.merge(b).compute()
    expected = whole.compute()
    assert merged == pytest.approx(expected)
    assert expected["agreement"] == 0.75 and expected["accuracy"] == 0.75
    assert expected["js_divergence"] == pytest.approx(0.2)
    assert expected["agreement_low"] == pytest.approx(wilson_interval(3, 4)[0])


@pytest.mark.parametrize("masked", [False, True])
def test_half_precision_maps_are_compared_in_float32(masked) -> None:
    # Each cell differs by 120000, past float16's 65504: the difference is taken in float32
    # (as the GPU's comparison kernel takes it), not overflowed to inf.
    a = torch.full((2, 3, 4, 4), 60000.0, dtype=torch.float16)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 0, :] = False
    na, nb, nd = map_norms(a, -a, mask if masked else None)
    cells = 3 * (12 if masked else 16)
    assert nd.tolist() == pytest.approx([120000 * cells**0.5] * 2, rel=1e-7)
    assert na.tolist() == nb.tolist() == pytest.approx([60000 * cells**0.5] * 2, rel=1e-7)
