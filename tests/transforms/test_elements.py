"""Transforms against hand-computed tensors, and the group laws of D4."""

from __future__ import annotations

import itertools

import pytest
import torch

from eqaudit.errors import TransformSpecError
from eqaudit.transforms import (
    D4_NAMES,
    D4Element,
    Rotation,
    Shift,
    fourier_shift,
    parse_transforms,
    rotate,
)

# A 3x3 image with distinct values; row index grows downwards.
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])[None, None]

EXPECTED = {
    "id": [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
    "rot90": [[3, 6, 9], [2, 5, 8], [1, 4, 7]],  # counter-clockwise: the top row goes left
    "rot180": [[9, 8, 7], [6, 5, 4], [3, 2, 1]],
    "rot270": [[7, 4, 1], [8, 5, 2], [9, 6, 3]],
    "flip_h": [[3, 2, 1], [6, 5, 4], [9, 8, 7]],  # left-right mirror
    "flip_v": [[7, 8, 9], [4, 5, 6], [1, 2, 3]],
    "transpose": [[1, 4, 7], [2, 5, 8], [3, 6, 9]],
    "antitranspose": [[9, 6, 3], [8, 5, 2], [7, 4, 1]],
}


@pytest.mark.parametrize("name", list(D4_NAMES.values()))
def test_d4_elements_match_hand_computed_images(name):
    element = D4Element.named(name)
    out = element.apply_image(X, margin=0)
    assert out[0, 0].tolist() == EXPECTED[name]
    # The action on a feature map is the same operation on the map's grid.
    assert element.feature_action(X, (1.0, 1.0)).transformed[0, 0].tolist() == EXPECTED[name]


def test_rot90_is_torch_rot90_counter_clockwise():
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(D4Element.named("rot90").apply_image(x, 0), torch.rot90(x, 1, (-2, -1)))


@pytest.mark.parametrize(("a", "b"), list(itertools.product(D4_NAMES.values(), repeat=2)))
def test_d4_composition_matches_applying_in_turn(a, b):
    ga, gb = D4Element.named(a), D4Element.named(b)
    x = torch.randn(1, 1, 4, 4)
    composed = ga.compose(gb).apply_image(x, 0)
    assert torch.equal(composed, ga.apply_image(gb.apply_image(x, 0), 0))


@pytest.mark.parametrize("name", list(D4_NAMES.values()))
def test_d4_inverse(name):
    g = D4Element.named(name)
    assert g.compose(g.inverse()).is_identity
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(g.inverse().apply_image(g.apply_image(x, 0), 0), x)


def test_rot90_fourth_power_and_flip_relations():
    r, f = D4Element.named("rot90"), D4Element.named("flip_h")
    assert r.compose(r).compose(r).compose(r).is_identity
    assert f.compose(f).is_identity
    # f r f = r^-1 (the dihedral relation)
    assert f.compose(r).compose(f) == r.inverse()
    assert r.compose(f).name == "transpose"


def test_rot90_skipped_for_non_square_inputs():
    assert "square" in D4Element.named("rot90").skip_reason(48, 192)
    assert D4Element.named("rot180").skip_reason(48, 192) is None
    assert D4Element.named("flip_h").skip_reason(48, 192) is None


def test_crop_shift_cuts_from_the_margin():
    source = torch.arange(49.0).reshape(1, 1, 7, 7)  # margin 2 around a 3x3 input
    identity = Shift(0, 0).apply_image(source, 2)
    assert identity[0, 0].tolist() == [[16, 17, 18], [23, 24, 25], [30, 31, 32]]
    right = Shift(0, 1).apply_image(source, 2)  # content moves right by one pixel
    assert right[0, 0].tolist() == [[15, 16, 17], [22, 23, 24], [29, 30, 31]]
    down = Shift(2, 0).apply_image(source, 2)
    assert down[0, 0].tolist() == [[2, 3, 4], [9, 10, 11], [16, 17, 18]]
    assert Shift(2, 0).margin() == 2 and Shift(0, 1, "circular").margin() == 0


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("circular", [[3, 1, 2], [6, 4, 5], [9, 7, 8]]),
        ("zero", [[0, 1, 2], [0, 4, 5], [0, 7, 8]]),
        ("reflect", [[2, 1, 2], [5, 4, 5], [8, 7, 8]]),
    ],
)
def test_padded_shift_modes(mode, expected):
    assert Shift(0, 1, mode).apply_image(X, 0)[0, 0].tolist() == expected


def test_shift_feature_action_uses_cells_and_masks_the_wrapped_border():
    fmap = torch.arange(16.0).reshape(1, 1, 4, 4)
    action = Shift(0, 4, "crop").feature_action(fmap, (2.0, 2.0))  # 4 px = 2 cells
    assert action.transformed[0, 0, 0].tolist() == [0, 0, 0, 1]
    assert action.mask[0, 0, 0].tolist() == [False, False, True, True]
    with pytest.raises(Exception, match="cells at stride"):
        Shift(0, 1, "crop").feature_action(fmap, (2.0, 2.0))


def test_fourier_shift_equals_roll_for_integers_and_inverts_for_fractions():
    x = torch.rand(1, 2, 8, 9, dtype=torch.float64)
    assert torch.allclose(fourier_shift(x, 2, -3), torch.roll(x, (2, -3), (-2, -1)), atol=1e-12)
    back = fourier_shift(fourier_shift(x, 0.5, 0.25), -0.5, -0.25)
    # The Nyquist bin of even axes is not invertible under a half-sample shift; odd axes are.
    y = torch.rand(1, 1, 9, 9, dtype=torch.float64)
    assert torch.allclose(fourier_shift(fourier_shift(y, 0.5, 0.3), -0.5, -0.3), y, atol=1e-12)
    assert back.shape == x.shape


def test_rotation_by_90_degrees_matches_rot90_and_is_counter_clockwise():
    x = torch.rand(1, 1, 7, 7)
    assert torch.allclose(rotate(x, 90), torch.rot90(x, 1, (-2, -1)), atol=1e-5)
    assert torch.allclose(rotate(x, -90), torch.rot90(x, -1, (-2, -1)), atol=1e-5)


def test_rotation_floor_is_small_for_smooth_images_and_zero_for_identity():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 33), torch.linspace(-1, 1, 33), indexing="ij")
    smooth = (0.5 + 0.4 * torch.sin(2 * xx + yy))[None, None]
    r = Rotation(15)
    rotated = r.apply_image(smooth, 0)
    floor = r.image_floor(smooth, rotated)
    assert 0 < floor.item() < 1e-2
    assert D4Element.named("rot90").image_floor(smooth, smooth) is None


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("c4", ["id", "rot90", "rot180", "rot270"]),
        ("flips", ["id", "flip_h", "flip_v"]),
        ("c4,flips", ["id", "rot90", "rot180", "rot270", "flip_h", "flip_v"]),
        ("rot:15,30", ["id", "rot15", "rot30"]),
        ("shift:2", ["id", "shift_x+2", "shift_x-2", "shift_y+2", "shift_y-2"]),
        ("rot:45,shift:1", ["id", "rot45", "shift_x+1", "shift_x-1", "shift_y+1", "shift_y-1"]),
        (" D4 ", list(D4_NAMES.values())),
        # One rotation written two ways runs (and counts in the score) once, as written first.
        ("rot:-30,330,690", ["id", "rot-30"]),
        ("rot:-90,450", ["id", "rot270", "rot90"]),
    ],
)
def test_parse_transforms(spec, names):
    assert [e.name for e in parse_transforms(spec)] == names


def test_quarter_turns_in_the_rot_family_are_exact_where_d4_defines_them():
    # rot:90 was resampled with Catmull-Rom and compared in a disk, flagged misaligned. The
    # engine makes it the D4 element where that exists: rot180 anywhere, rot90 and rot270 on
    # square inputs; on a non-square one they stay resampled rotations rather than be refused.
    from eqaudit.transforms import quarter_turns_exact

    parsed = parse_transforms("rot:90,180,-90")
    assert [e.name for e in parsed] == ["id", "rot90", "rot180", "rot270"]
    square = quarter_turns_exact(parsed, 32, 32)
    assert all(isinstance(e, D4Element) for e in square)
    wide = quarter_turns_exact(parsed, 16, 24)
    assert [type(e).__name__ for e in wide] == ["D4Element", "Rotation", "D4Element", "Rotation"]


@pytest.mark.parametrize(
    "spec", ["d5", "rot", "rot:abc", "shift:", "shift:-2", "d4:3", "", "rot:nan"]
)
def test_parse_transforms_rejects_bad_specs(spec):
    with pytest.raises(TransformSpecError):
        parse_transforms(spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_sparse_cubic_operator_samples_as_the_gathers_do(dtype) -> None:
    # A sparse product per image instead of 16 gathers (the CPU's path for rotations by other
    # angles): the same taps and weights, the zero fill included; sums within a few ulps.
    from eqaudit.transforms.elements import cubic_operator, cubic_sample

    draw = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 13, 11, generator=draw, dtype=dtype)
    src_y = torch.rand(9, 7, generator=draw, dtype=torch.float64) * 16 - 2  # some off the grid
    src_x = torch.rand(9, 7, generator=draw, dtype=torch.float64) * 14 - 2
    src_y[0, 0], src_x[0, 1] = -3.5, 13.25  # every tap off the grid: the zero fill
    src_y[1, 1], src_x[1, 1] = 4.0, 6.0  # on a pixel centre: that pixel
    operator = cubic_operator(src_y, src_x, 13, 11, dtype)
    gathered = cubic_sample(x, src_y, src_x)
    sparse = cubic_sample(x, src_y, src_x, operator)
    assert sparse.shape == gathered.shape == (5, 3, 9, 7)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(sparse, gathered, rtol=8 * eps, atol=8 * eps * float(x.abs().max()))
    assert not sparse[..., 0, 0].any() and not sparse[..., 0, 1].any()
    assert torch.equal(sparse[..., 1, 1], x[..., 4, 6])
    # a NaN still reaches the samples that weigh it (as 0 x NaN does in the gathers)
    x[0, 0, 6, 5] = float("nan")
    assert torch.equal(
        cubic_sample(x, src_y, src_x, operator).isnan(), cubic_sample(x, src_y, src_x).isnan()
    )
    assert cubic_operator(src_y, src_x, 13, 11, torch.float16) is None


@pytest.mark.parametrize("channels", [1, 3, 4, 8, 16])
def test_an_images_rotation_does_not_depend_on_its_batch(channels) -> None:
    # One sparse product over the whole batch rounded an image's samples differently with the
    # batch's size (its column count): a shard's numbers differed from a single run's in the
    # 8th digit (review). Per image, bit for bit, on one thread or two.
    from eqaudit.transforms.elements import rotate

    x = torch.rand(9, channels, 40, 40, generator=torch.Generator().manual_seed(channels))
    alone = rotate(x[:1], 30)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for size in range(1, 10):
                assert torch.equal(rotate(x[:size], 30)[:1], alone), (count, size)
    finally:
        torch.set_num_threads(threads)
