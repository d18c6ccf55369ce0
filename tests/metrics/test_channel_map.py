"""Equivariance up to a fitted channel map: known relations, streaming/merge, C4 group convolutions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from models_group import c4_net, rotation_permutation

from eqaudit.data import synthetic_images
from eqaudit.metrics.channel_map import (
    DEFAULT_MAX_CHANNELS,
    ChannelMapStats,
    fitted_channel_error,
    pooled_error,
)


def _rot(x: torch.Tensor, k: int = 1) -> torch.Tensor:
    return torch.rot90(x, k, (-2, -1))


def _parity(batch: int, start: int = 0) -> torch.Tensor:
    """The engine's split: even global image index -> FIT half."""
    return (torch.arange(start, start + batch) % 2) == 0


def _features(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g)


# -- known relations ---------------------------------------------------------------------------


def test_identity_relation_gives_zero_for_both_errors():
    b = _features(8, 6, 5, seed=0)
    result = fitted_channel_error(b, b.clone(), _parity(8))
    assert result["naive_error"] < 1e-7
    assert result["fitted_error"] < 1e-7
    assert result["permutation"] == list(range(6))
    assert (result["fit_images"], result["eval_images"]) == (4, 4)
    assert (result["fit_cells"], result["eval_cells"]) == (4 * 25, 4 * 25)


def test_channel_permutation_naive_large_fitted_zero_and_map_recovered():
    b = _features(10, 8, 6, seed=1).abs()  # ReLU-like: positive, correlated channels
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    a = b[:, perm]  # a[:, i] = b[:, perm[i]]
    stats = ChannelMapStats()
    stats.update(a, b, _parity(10))
    result = stats.compute()
    assert result["naive_error"] > 0.3
    assert result["fitted_error"] < 1e-6
    assert result["permutation"] == perm.tolist()
    assert result["is_permutation"]
    assert result["row_peak_share_min"] > 1 - 1e-9
    expected = np.eye(8)[perm.numpy()]  # W[i, perm[i]] = 1
    np.testing.assert_allclose(stats.channel_map(), expected, atol=1e-6)


def test_a_permutation_of_rank_deficient_channels_is_found_by_its_own_error():
    # 12 channels made from 9 values (rotated copies of 3x3 filters on one input channel, as a
    # lifting convolution): S_bb has rank 9, the ridge's least-norm map spreads its rows over
    # collinear channels (peak shares 0.6-0.75) and the permutation went unseen (review).
    g = torch.Generator().manual_seed(4)
    basis = torch.randn(10, 9, 7, 7, generator=g)
    mix = torch.randn(12, 9, generator=g)
    b = torch.einsum("ck,nkhw->nchw", mix, basis)  # 12 channels of rank 9
    perm = torch.randperm(12, generator=g)
    stats = ChannelMapStats()
    stats.update(b[:, perm], b, _parity(10))
    result = stats.compute()
    assert result["fit_rank"] == 9 and result["fitted_error"] < 1e-6
    assert result["permutation_error"] < 1e-6
    # ... while a general invertible mix has a permutation error far above its fitted error.
    mixed = torch.einsum("ij,njhw->nihw", torch.randn(12, 12, generator=g), b)
    other = ChannelMapStats()
    other.update(mixed, b, _parity(10))
    found = other.compute()
    assert found["fitted_error"] < 1e-5
    assert found["permutation_error"] is None or found["permutation_error"] > 0.1


def test_general_linear_map_on_flat_features():
    g = torch.Generator().manual_seed(3)
    b = torch.randn(400, 5, generator=g, dtype=torch.float64)
    mixing = torch.randn(5, 5, generator=g, dtype=torch.float64)
    a = b @ mixing.T  # a_i = M b_i: flat (B, D) rows are the samples
    stats = ChannelMapStats()
    stats.update(a, b, _parity(400))
    result = stats.compute()
    assert result["fitted_error"] < 1e-7
    assert result["fit_cells"] == 200
    np.testing.assert_allclose(stats.channel_map(), mixing.numpy(), atol=1e-6)


def test_unrelated_noise_keeps_a_large_fitted_error():
    a = _features(40, 8, 10, seed=4)
    b = _features(40, 8, 10, seed=5)
    result = fitted_channel_error(a, b, _parity(40))
    # Equal-norm unrelated maps: no cross term, naive = sqrt(2) / 2.
    assert result["naive_error"] == pytest.approx(math.sqrt(2) / 2, abs=0.01)
    # The best map from noise is W ~ 0 (overfit share c = C / fit_cells of the energy): the
    # pooled formula then gives ~ sqrt(1 + c) / (1 + sqrt(c)), 0.96 here, not 0.71.
    c = 8 / result["fit_cells"]
    assert result["fitted_error"] == pytest.approx(math.sqrt(1 + c) / (1 + math.sqrt(c)), abs=0.01)
    assert result["fitted_error"] > 0.9
    assert not result["row_peak_share_min"] > 0.9


def test_pooled_error_formula_by_hand():
    # One sample a = (3, 4), b = (4, -3): E = 50 for W = I, ||a|| = ||b|| = 5 -> sqrt(50) / 10.
    s_ab = np.outer([3.0, 4.0], [4.0, -3.0])
    s_bb = np.outer([4.0, -3.0], [4.0, -3.0])
    assert pooled_error(25.0, s_ab, s_bb) == pytest.approx(math.sqrt(2) / 2, rel=1e-15)
    # W = 0: E = ||a||^2, denominator ||a|| -> exactly 1.
    assert pooled_error(25.0, s_ab, s_bb, np.zeros((2, 2))) == pytest.approx(1.0, rel=1e-12)
    assert pooled_error(0.0, np.zeros((2, 2)), np.zeros((2, 2))) == 0.0  # two zero maps
    # Rounding that pushes E of an exact relation below 0 is clamped: exactly 0, not sqrt(|E|).
    assert pooled_error(25.0 - 1e-9, s_bb, s_bb) == 0.0


def test_scale_free():
    b = _features(6, 4, 5, seed=6)
    a = b[:, [1, 0, 3, 2]] + 0.01 * _features(6, 4, 5, seed=7)
    small = fitted_channel_error(a, b, _parity(6))
    # A power of two scales float32 exactly, so only the float64 sums may differ.
    large = fitted_channel_error(2.0**12 * a, 2.0**12 * b, _parity(6))
    for key in ("naive_error", "fitted_error", "fit_residual"):
        assert large[key] == pytest.approx(small[key], rel=1e-9)


def test_ridge_bias_is_about_half_the_ridge_for_well_conditioned_features():
    # Why the default ridge is 1e-8: an exact permutation reads as ~ridge / 2, not 0.
    b = _features(20, 8, 10, seed=8)
    a = b[:, [3, 1, 2, 0, 7, 6, 5, 4]]
    for ridge in (1e-4, 1e-6):
        result = fitted_channel_error(a, b, _parity(20), ridge=ridge)
        assert result["fitted_error"] == pytest.approx(ridge / 2, rel=0.3)
    assert fitted_channel_error(a, b, _parity(20))["fitted_error"] < 1e-7


def test_mask_keeps_only_defined_cells():
    b = _features(6, 3, 7, seed=9)
    a = b[:, [2, 0, 1]].clone()
    mask = torch.zeros(1, 1, 7, 7, dtype=torch.bool)
    mask[..., 1:-1, 1:-1] = True
    a[..., 0, :] = 100.0  # garbage on the border the mask removes
    masked = fitted_channel_error(a, b, _parity(6), mask)
    inner = fitted_channel_error(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], _parity(6))
    assert masked["eval_cells"] == 3 * 25
    for key in ("naive_error", "fitted_error"):
        assert masked[key] == pytest.approx(inner[key], rel=1e-12, abs=1e-12)
    assert masked["fitted_error"] < 1e-7


def test_dead_reference_channel_is_tolerated_and_shows_in_the_rank():
    b = _features(8, 4, 5, seed=10).abs()
    b[:, 2] = 0.0  # a dead channel: S_bb is singular, the ridge keeps the solve defined
    a = b[:, [1, 2, 3, 0]]
    result = fitted_channel_error(a, b, _parity(8))
    assert result["fit_rank"] == 3
    assert result["fitted_error"] < 1e-7
    assert result["naive_error"] > 0.3
    # The dead channel pairs with itself: the matched permutation is found, and exact (it was
    # None, so a group-conv layer with a dead ReLU channel read "not a permutation", review).
    assert result["permutation_error"] is not None and result["permutation_error"] < 1e-7


def test_channels_dead_in_both_maps_pair_among_themselves():
    from eqaudit.metrics.channel_map import matched_permutation

    # a = P b with b's channels 1 and 3 dead (and so a's channels 0 and 2): live ones pair by
    # their covariance, the dead ones in order, with sign +1.
    s_bb = np.diag([4.0, 0.0, 9.0, 0.0])
    s_ab = np.zeros((4, 4))
    s_ab[1, 0], s_ab[3, 2] = 4.0, -9.0  # a_1 = b_0, a_3 = -b_2
    p = matched_permutation(s_ab, s_bb)
    assert p is not None
    expected = np.zeros((4, 4))
    expected[0, 1], expected[1, 0], expected[2, 3], expected[3, 2] = 1, 1, 1, -1
    np.testing.assert_array_equal(p, expected)
    # a live channel of a that only a taken channel of b explains: no bijection
    s_ab[0, 0] = 1.0
    assert matched_permutation(s_ab, s_bb) is None


# -- streaming, merging, empty halves ---------------------------------------------------------


def _streamed(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, cuts: list[int]
) -> ChannelMapStats:
    stats = ChannelMapStats()
    for start, stop in itertools.pairwise(cuts):
        stats.update(a[start:stop], b[start:stop], _parity(stop - start, start), mask)
    return stats


def test_streaming_equals_one_shot_and_merge_equals_whole():
    b = _features(23, 5, 6, seed=11)
    mixing = torch.randn(5, 5, generator=torch.Generator().manual_seed(12))
    a = torch.einsum("ij,bjhw->bihw", mixing, b) + 0.3 * _features(23, 5, 6, seed=13)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    mask[..., :, 0] = False
    whole = fitted_channel_error(a, b, _parity(23), mask)
    streamed = _streamed(a, b, mask, [0, 3, 4, 11, 23])
    merged = _streamed(a, b, mask, [0, 3, 10]).merge(_streamed(a, b, mask, [10, 17, 23]))
    for stats in (streamed, merged):
        result = stats.compute()
        for key, value in whole.items():
            if isinstance(value, float):
                assert result[key] == pytest.approx(value, rel=1e-10), key
            else:
                assert result[key] == value, key
    assert whole["fit_images"] == 12 and whole["eval_images"] == 11
    assert 0.05 < whole["fitted_error"] < whole["naive_error"]


def test_merge_with_an_empty_accumulator_is_a_copy():
    b = _features(4, 3, 4, seed=14)
    full = ChannelMapStats()
    full.update(b[:, [1, 2, 0]], b, _parity(4))
    for merged in (ChannelMapStats().merge(full), full.merge(ChannelMapStats())):
        assert merged.compute() == full.compute()
    merged.update(b, b, _parity(4))  # the merge result owns its state
    assert full.compute()["fit_images"] == 2


def test_empty_halves_and_zero_reference_give_none_with_a_reason():
    b = _features(4, 3, 4, seed=15)
    only_fit = fitted_channel_error(b, b, torch.ones(4, dtype=torch.bool))
    assert only_fit["naive_error"] is None and only_fit["fitted_error"] is None
    assert only_fit["reason"] == "no eval images"
    assert only_fit["fit_residual"] < 1e-7
    only_eval = fitted_channel_error(b, b, torch.zeros(4, dtype=torch.bool))
    assert only_eval["fitted_error"] is None and only_eval["naive_error"] < 1e-7
    assert only_eval["reason"] == "no fit images"
    zero = fitted_channel_error(b, torch.zeros_like(b), _parity(4))
    assert zero["fitted_error"] is None and zero["naive_error"] == pytest.approx(1.0)
    assert zero["reason"] == "the reference is zero on every fit cell"
    assert ChannelMapStats().compute()["channels"] is None


def test_memory_guidance_and_misuse():
    assert ChannelMapStats.bytes_for(DEFAULT_MAX_CHANNELS) == 8 * 2**20
    assert ChannelMapStats.bytes_for(256) == 2 * 2**20
    with pytest.raises(ValueError, match="ridge"):
        ChannelMapStats(ridge=0.0)
    stats = ChannelMapStats(channels=3)
    with pytest.raises(ValueError, match="channels"):
        stats.update(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3), _parity(2))
    with pytest.raises(ValueError, match="fit mask"):
        stats.update(torch.zeros(2, 3, 3, 3), torch.zeros(2, 3, 3, 3), _parity(3))
    with pytest.raises(ValueError, match="merge"):
        stats.merge(ChannelMapStats(channels=4))


# -- C4 group convolutions (tests/models_group.py) ------------------------------------------


@pytest.fixture(scope="module")
def net_and_images() -> tuple[torch.nn.Module, torch.Tensor]:
    return c4_net(seed=0), synthetic_images(16, (15, 15), 3, seed=1)


def _lift(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.relu1(net.lift(x))


def _gconv(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.relu2(net.gconv(_lift(net, x)))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("layer", [_lift, _gconv])
def test_group_conv_channels_roll_within_groups_of_four_under_rot90(net_and_images, layer, k):
    net, x = net_and_images
    with torch.no_grad():
        a, b = layer(net, _rot(x, k)), _rot(layer(net, x), k)
    perm = rotation_permutation(a.shape[1] // 4, k)
    assert (a - b[:, perm]).abs().max().item() < 1e-6
    assert (a - b).abs().max().item() > 0.1  # ... and not with the identity on channels


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("layer", [_lift, _gconv])
def test_lifting_conv_naive_large_fitted_near_zero(net_and_images, layer, k):
    net, x = net_and_images
    stats = ChannelMapStats()
    for start in (0, 5, 11):  # uneven batches, the engine's global parity split
        batch = x[start : start + {0: 5, 5: 6, 11: 5}[start]]
        with torch.no_grad():
            stats.update(
                layer(net, _rot(batch, k)), _rot(layer(net, batch), k), _parity(len(batch), start)
            )
    result = stats.compute()
    assert result["naive_error"] > 0.3
    assert result["fitted_error"] < 1e-5
    assert result["permutation"] == rotation_permutation(result["channels"] // 4, k)
    assert result["row_peak_share_min"] > 0.9999


def test_c4_layers_under_a_flip_are_not_rescued_by_a_channel_map(net_and_images):
    net, x = net_and_images
    with torch.no_grad():
        a, b = _lift(net, torch.flip(x, (-1,))), torch.flip(_lift(net, x), (-1,))
    result = fitted_channel_error(a, b, _parity(16))
    assert result["fitted_error"] > 0.05  # C4 has no reflections: no channel map exists


def test_c4_net_group_pooling_and_output_are_invariant(net_and_images):
    net, x = net_and_images
    with torch.no_grad():
        pooled = net.gpool(_gconv(net, x))
        a, b = net.gpool(_gconv(net, _rot(x))), _rot(pooled)
        assert (a - b).abs().max().item() < 1e-6  # identity on channels after group pooling
        assert (net(_rot(x)) - net(x)).abs().max().item() < 1e-5
    assert fitted_channel_error(a, b, _parity(16))["naive_error"] < 1e-6


def test_sums_kept_on_the_device_give_the_host_numbers(monkeypatch):
    # On a GPU the moments are summed on the device and read back once (settle), and masked
    # cells are zeroed instead of dropped. The CPU stands in for the GPU here: the same batches
    # through both paths give the same state.
    from eqaudit.metrics import channel_map as module

    gen = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(5, 4, 6, 6, generator=gen), torch.randn(5, 4, 6, 6, generator=gen))
        for _ in range(3)
    ]
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 1:5, 2:6] = True  # 16 of 36 cells
    fits = [
        torch.tensor([True, False, True, False, True]),
        torch.tensor([False, True] * 2 + [False]),
    ]

    def run(device_sums: bool) -> ChannelMapStats:
        monkeypatch.setattr(module, "DEVICE_SUMS", {"cuda", "cpu"} if device_sums else {"cuda"})
        stats = ChannelMapStats(4)
        for i, (a, b) in enumerate(batches):
            stats.update(a, b, fits[i % 2], mask if i else None)
        assert (stats.fit.pending is not None) == device_sums  # not read back per update
        if device_sums:
            stats.compute()  # a reader brings the sums to the host first
        assert stats.fit.pending is None and stats.eval.pending is None
        return stats

    host, device = run(False), run(True)
    for ours, theirs in ((device.fit, host.fit), (device.eval, host.eval)):
        assert (ours.images, ours.cells) == (theirs.images, theirs.cells)
        assert ours.trace_aa == pytest.approx(theirs.trace_aa, rel=1e-12)
        np.testing.assert_allclose(ours.s_ab, theirs.s_ab, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ours.s_bb, theirs.s_bb, rtol=1e-12, atol=1e-12)
    ours, theirs = device.compute(), host.compute()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, float):
            assert ours[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert ours[key] == value, key
    # Counts: 3 batches; fit rows 3, 2, 3 images; cells 36 unmasked, 16 under the mask.
    assert (host.fit.images, host.fit.cells) == (8, 3 * 36 + 2 * 16 + 3 * 16)


def test_an_audit_with_sums_kept_on_the_device_gives_the_host_rows(monkeypatch):
    # The engine brings every layer's pending sums over in one copy (settle_all) before it
    # writes rows or a shard state; layers of 8 and 16 channels share the vector.
    from models_zoo import SmallCNN, calibrate_

    import eqaudit
    from eqaudit.metrics import channel_map as module

    torch.manual_seed(0)
    model = calibrate_(SmallCNN(), 17).eval()
    options = dict(input_size=17, num_images=6, seed=1, channel_map=True, lie=False)
    host = eqaudit.audit(model, "d4", **options).layers
    copies = []  # the moments each call found waiting
    monkeypatch.setattr(module, "DEVICE_SUMS", {"cuda", "cpu"})
    real = module.settle_all

    def spy(moments):
        moments = list(moments)
        if any(m.pending is not None for m in moments):
            copies.append([m for m in moments if m.pending is not None])
        real(moments)

    monkeypatch.setattr(module, "settle_all", spy)
    device = eqaudit.audit(model, "d4", **options).layers
    assert len(copies) == 1 and len({m.s_ab.shape for m in copies[0]}) == 2
    columns = ("fitted_relative_error", "pooled_relative_error", "channel_map_permutation")
    fitted = [r for r in host if r["fitted_relative_error"] is not None]
    assert len(fitted) >= 8 * 6  # conv and relu 1-3 under every element
    for a, b in zip(host, device, strict=True):
        for key in columns:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-9), (a["layer"], key)
            else:
                assert b[key] == a[key], (a["layer"], key)


def test_halves_are_picked_as_views_when_evenly_spaced():
    from eqaudit.metrics.channel_map import _rows

    assert _rows(torch.tensor([True, False, True, False, True])) == slice(0, 5, 2)
    assert _rows(torch.tensor([False, True, False, True, False])) == slice(1, 4, 2)
    assert _rows(torch.tensor([False, False, True])) == slice(2, 3)
    assert _rows(torch.tensor([False, False])) is None
    assert torch.equal(_rows(torch.tensor([True, True, False, True])), torch.tensor([0, 1, 3]))


def test_an_audit_calls_a_rank_deficient_lifting_layer_a_permutation() -> None:
    # One input channel, 3x3 filters: 9 values behind 4 x 3 = 12 channels of the lifting layer.
    import eqaudit

    result = eqaudit.audit(
        c4_net(seed=0, in_channels=1, fields=3),
        "c4",
        synthetic_images(12, (15, 15), 1, seed=1),
        input_size=15,
        channel_map=True,
        layer_patterns=("lift",),
        channels="gray",  # (no nn.Conv2d to read the channels from)
    )
    row = result.layer("lift", "rot90")
    assert row["fitted_relative_error"] < 1e-6 and row["pooled_relative_error"] > 0.1
    assert row["channel_map_permutation"] is True


def test_unrelated_channels_are_never_called_a_permutation() -> None:
    # A chance one-to-one pairing of noise channels reads ~0.7, within twice a fitted error of
    # ~0.96: without an absolute bound half of 20 seeds at C=2 were "permutations" (review).
    from eqaudit.audit import Engine

    class Row:  # the two fields Engine._channel_columns reads
        def __init__(self, stats: ChannelMapStats) -> None:
            self.channel_maps, self.reasons = [stats], [None]

    for channels in (2, 4):
        for seed in range(10):
            g = torch.Generator().manual_seed(seed)
            a = torch.randn(64, channels, 8, 8, generator=g, dtype=torch.float64)
            b = torch.randn(64, channels, 8, 8, generator=g, dtype=torch.float64)
            stats = ChannelMapStats()
            stats.update(a, b, _parity(64))
            columns = Engine._channel_columns(Row(stats), 0)  # type: ignore[arg-type]
            assert columns["channel_map_permutation"] is False, (channels, seed)
