"""Element actions on sampling grids (eqaudit.transforms.geometry): known-answer cases."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from eqaudit.transforms import parse_transforms
from eqaudit.transforms.elements import (
    D4_NAMES,
    D4Element,
    NotMeasurable,
    Rotation,
    Shift,
    d4_apply,
    rotate,
)
from eqaudit.transforms.geometry import (
    aligned,
    cell_map,
    choose_aligned_size,
    compare_on_grid,
    misaligned_tensors,
)


@dataclass(frozen=True)
class Axis:
    n: int
    stride: float
    offset: float
    free: tuple[int, int] | None = None  # padding-free cells: None, not known


@dataclass(frozen=True)
class Grid:
    h: Axis
    w: Axis


def square(n: int, stride: float, offset: float) -> Grid:
    return Grid(Axis(n, stride, offset), Axis(n, stride, offset))


def window(axis: Axis, k: int, s: int, pad: int) -> Axis:
    """One conv/pool window on an axis (the formula of eqaudit.grids)."""
    n = (axis.n + 2 * pad - k) // s + 1
    return Axis(n, axis.stride * s, axis.offset + axis.stride * (-pad + (k - 1) / 2))


class StackGraph:
    """A chain of (kernel, stride, pad) windows: a stand-in for a model's grid graph."""

    def __init__(self, layers: list[tuple[int, int, int]]) -> None:
        self.layers = layers

    def _axis(self, size: int) -> list[Axis]:
        axis, out = Axis(size, 1.0, 0.0), []
        for k, s, p in self.layers:
            axis = window(axis, k, s, p)
            out.append(axis)
        return out

    def grids(self, height: int, width: int) -> dict[str, object]:
        return {
            f"l{i}": Grid(h, w)
            for i, (h, w) in enumerate(zip(self._axis(height), self._axis(width), strict=True))
        }

    def invalid_reason(self, height: int, width: int) -> str | None:
        small = [a for a in self._axis(min(height, width)) if a.n < 1]
        return "too small" if small else None


D4 = [D4Element(k, f) for (k, f) in D4_NAMES]


@pytest.mark.parametrize("element", D4, ids=lambda e: e.name)
def test_d4_point_maps_agree_with_the_pixel_action(element: D4Element) -> None:
    # The content of pixel (y, x) must land where d4_apply puts it.
    h = w = 5
    image = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)
    moved = d4_apply(image, element.k, element.flip)
    a, t = element.point_map(h, w)
    for y in range(h):
        for x in range(w):
            dy, dx = np.rint(a @ np.array([y, x]) + t).astype(int)
            assert moved[0, 0, dy, dx] == image[0, 0, y, x]


def test_rotation_point_map_matches_rotate() -> None:
    # A single bright pixel rotated by 90 degrees with the bicubic sampler lands where the
    # point map says (an exact quarter turn samples pixel centres).
    image = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    image[0, 0, 2, 6] = 1.0
    turned = rotate(image, 90.0)
    a, t = Rotation(90).point_map(9, 9)
    y, x = np.rint(a @ np.array([2.0, 6.0]) + t).astype(int)
    assert turned[0, 0, y, x] == pytest.approx(1.0, abs=1e-9)
    a30, _ = Rotation(30).point_map(9, 9)
    assert a30 == pytest.approx(
        np.array([[math.cos(math.pi / 6), -0.5], [0.5, math.cos(math.pi / 6)]])
    )


@pytest.mark.parametrize("element", D4, ids=lambda e: e.name)
def test_exact_action_on_a_centred_grid_is_the_plain_d4_action(element: D4Element) -> None:
    fmap = torch.randn(2, 3, 7, 7)
    found = compare_on_grid(element, fmap, square(7, 2.0, 0.0), (13, 13), (2.0, 2.0))
    assert found.comparison == "exact" and found.aligned is True
    assert found.action.mask is None
    assert torch.equal(found.action.transformed, d4_apply(fmap, element.k, element.flip))


@pytest.mark.parametrize(
    ("size", "expected"),
    [(224, False), (225, True), (223, True), (226, False)],
)
def test_stride_two_pad_one_conv_is_aligned_only_at_odd_sizes(size: int, expected: bool) -> None:
    # 3x3 stride-2 pad-1: cells at 2i, centre (n - 1); aligned iff (N - 1) / 2 == n - 1.
    axis = window(Axis(size, 1.0, 0.0), 3, 2, 1)
    grid = Grid(axis, axis)
    for name in ("flip_h", "flip_v", "rot90", "rot180", "antitranspose"):
        assert aligned(D4Element.named(name), grid, (size, size)) is expected
    # transpose (the main diagonal) keeps any grid with equal axes: no centring needed.
    assert aligned(D4Element.named("transpose"), grid, (size, size)) is True


@pytest.mark.parametrize(("size", "expected"), [(224, True), (225, False), (32, True)])
def test_two_by_two_pool_is_aligned_only_at_even_sizes(size: int, expected: bool) -> None:
    axis = window(Axis(size, 1.0, 0.0), 2, 2, 0)
    assert axis.offset == 0.5
    assert aligned(D4Element.named("flip_h"), Grid(axis, axis), (size, size)) is expected


def test_flip_h_needs_only_the_width_axis_centred() -> None:
    grid = Grid(Axis(4, 2.0, 0.0), Axis(5, 2.0, 0.0))  # h misaligned at 8, w centred at 9
    assert aligned(D4Element.named("flip_h"), grid, (8, 9)) is True
    assert aligned(D4Element.named("flip_v"), grid, (8, 9)) is False


def test_shifts_are_aligned_when_the_stride_divides_them() -> None:
    grid = square(8, 4.0, 1.5)  # offset does not matter for a translation
    assert aligned(Shift(0, 8), grid, (32, 32)) is True
    assert aligned(Shift(4, -4), grid, (32, 32)) is True
    assert aligned(Shift(0, 2), grid, (32, 32)) is False
    found = compare_on_grid(Shift(0, 8), torch.ones(1, 1, 8, 8), grid, (32, 32), (4.0, 4.0))
    assert found.comparison == "exact"
    assert found.action.mask[0, 0].sum().item() == 8 * 6  # two columns moved in from outside
    with pytest.raises(NotMeasurable, match=r"\(0, 2\) px is \(0, 0.5\) cells"):
        compare_on_grid(Shift(0, 2), torch.ones(1, 1, 8, 8), grid, (32, 32), (4.0, 4.0))


def test_misaligned_pairs_are_flagged_resampled_or_skipped() -> None:
    grid = square(4, 2.0, 0.5)  # a 2x2 pool of a 9x9 input: centre 3.5 vs 4
    fmap = torch.randn(1, 2, 4, 4)
    flip = D4Element.named("flip_h")
    flagged = compare_on_grid(flip, fmap, grid, (9, 9), (2.0, 2.0), "flag")
    assert (flagged.comparison, flagged.aligned) == ("naive", False)
    assert torch.equal(flagged.action.transformed, torch.flip(fmap, (-1,)))
    resampled = compare_on_grid(flip, fmap, grid, (9, 9), (2.0, 2.0), "resample")
    assert (resampled.comparison, resampled.aligned) == ("resampled", False)
    # The true mirror of cell j is at 3.5 - j cells: column 2 mirrors to 1.5, midway between
    # columns 1 and 2 (the only source whose bicubic stencil stays inside the map).
    assert resampled.action.mask[0, 0].any(dim=0).tolist() == [False, False, True, False]
    with pytest.raises(NotMeasurable, match="not symmetric about the image centre"):
        compare_on_grid(flip, fmap, grid, (9, 9), (2.0, 2.0), "skip")


def test_resampled_flip_of_a_linear_ramp_is_exact() -> None:
    # Bicubic reproduces linear functions, so resampling a ramp at the true mirror positions is
    # exact: the mirror of a ramp u -> u about the true centre c is u -> 2c - u.
    n, stride, offset, size = 12, 2.0, 0.5, 25  # misaligned: centre 11.5 vs 12
    grid = square(n, stride, offset)
    cols = torch.arange(n, dtype=torch.float64)
    fmap = (offset + stride * cols).expand(1, 1, n, n).clone()  # each cell holds its x coordinate
    found = compare_on_grid(D4Element.named("flip_h"), fmap, grid, (size, size), None, "resample")
    mirrored = (size - 1) - (offset + stride * cols)  # x -> 2 * 12 - x
    mask = found.action.mask[0, 0]
    assert mask.any()
    got = found.action.transformed[0, 0][mask]
    want = mirrored.expand(n, n)[mask]
    assert torch.allclose(got, want, atol=1e-9)


def test_rotation_is_about_the_true_centre_of_a_misaligned_grid() -> None:
    # A map holding a radial function of each cell centre's distance from the image centre is
    # unchanged by a rotation about the image centre; rotating about the map's own centre
    # (a quarter cell away here) is not.
    n, stride, offset, size = 24, 2.0, 0.5, 49  # cells' centre 23.5 vs the image's 24
    grid = square(n, stride, offset)
    coords = offset + stride * torch.arange(n, dtype=torch.float64)
    c = (size - 1) / 2
    r2 = (coords[:, None] - c) ** 2 + (coords[None, :] - c) ** 2
    fmap = torch.exp(-r2 / (2 * (5 * stride) ** 2))[None, None]  # smooth: bicubic is accurate
    found = compare_on_grid(Rotation(30), fmap, grid, (size, size), None)
    assert found.comparison == "resampled"
    diff = (found.action.transformed - fmap)[found.action.mask.expand_as(fmap)]
    assert diff.abs().max() < 0.01
    naive = Rotation(30).feature_action(fmap, (stride, stride))
    naive_diff = (naive.transformed - fmap)[naive.mask.expand_as(fmap)]
    assert naive_diff.abs().max() > 3 * diff.abs().max()


def test_cell_map_of_a_quarter_turn_on_a_centred_grid() -> None:
    cm = cell_map(D4Element.named("rot90"), square(5, 4.0, 1.5), (20, 20))
    assert cm.M.tolist() == [[0.0, -1.0], [1.0, 0.0]]
    assert cm.b.tolist() == pytest.approx([4.0, 0.0])
    assert cm.is_bijection


def test_resnet_like_stack_aligned_at_225_not_224() -> None:
    # 7x7 s2 p3 stem, 3x3 s2 p1 max pool, three 3x3 s2 p1 stages: the DESIGN.md example.
    graph = StackGraph([(7, 2, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1), (3, 2, 1)])
    d4 = parse_transforms("d4", "crop")
    assert len(misaligned_tensors(graph, (224, 224), [e for e in d4 if not e.is_identity])) == 5
    assert misaligned_tensors(graph, (225, 225), [e for e in d4 if not e.is_identity]) == []
    choice = choose_aligned_size(graph, (224, 224), d4)
    assert choice.chosen == (225, 225)
    assert "225x225 chosen" in choice.note() and "5 tensors" in choice.note()


@pytest.mark.parametrize(
    ("layers", "start", "expected"),
    [
        ([(3, 2, 1)] * 3, 224, 225),  # three stride-2 pad-1 convs need 8k + 1
        ([(3, 2, 1)] * 3, 230, 233),  # 233 (+3) is nearer than 225 (-5)
        ([(3, 2, 1)] * 3, 229, 233),  # a tie (225 and 233, both 4 away) goes to the larger
        ([(2, 2, 0)] * 3, 225, 224),  # three 2x2 pools need multiples of 8
        ([(2, 2, 0)] * 2, 226, 228),  # multiples of 4: 228 and 224 tie, the larger wins
    ],
)
def test_nearest_aligned_size(layers: list, start: int, expected: int) -> None:
    graph = StackGraph(layers)
    found = choose_aligned_size(graph, (start, start), parse_transforms("flips", "crop"))
    assert found.chosen == (expected, expected)
    # ... and by brute force over the definition: nearest size, ties to the larger.
    elements = [D4Element.named("flip_h"), D4Element.named("flip_v")]
    candidates = [
        n
        for n in range(start - 64, start + 65)
        if misaligned_tensors(graph, (n, n), elements) == []
    ]
    assert min(candidates, key=lambda n: (abs(n - start), -n)) == expected


class PartlyKnownGraph(StackGraph):
    """A stack whose graph also has tensors of unknown grid (after an op the walk cannot read)."""

    def grids(self, height: int, width: int) -> dict[str, object]:
        return {**super().grids(height, width), "after_custom_op": None, "head": None}

    def unknown_reason(self, name: str, height: int, width: int) -> str | None:
        return (
            "Custom 'op' is not understood by the grid walk" if name == "after_custom_op" else None
        )


def test_an_aligned_size_says_which_grids_it_could_not_check() -> None:
    # A quantize_dynamic model's maps had unknown grids: "every strided layer is already
    # aligned" at a size where they were not (review). The note says what it did not check.
    graph = PartlyKnownGraph([(3, 2, 1)] * 2)
    found = choose_aligned_size(graph, (33, 33), parse_transforms("flips", "crop"))
    assert found.chosen == (33, 33) and found.unknown == 2
    assert found.note() == (
        "input 33x33: every strided layer is already aligned under flip_h, flip_v; 2 tensors' "
        "grids are unknown (the first: Custom 'op' is not understood by the grid walk): their "
        "alignment is not checked"
    )
    assert found.to_dict()["note"] == found.note()
    assert "unknown" not in choose_aligned_size(StackGraph([(3, 2, 1)]), (33, 33), D4).note()


def test_non_square_inputs_search_each_axis() -> None:
    graph = StackGraph([(3, 2, 1), (3, 2, 1)])  # needs 4k + 1 on each axis
    found = choose_aligned_size(graph, (48, 190), parse_transforms("flips", "crop"))
    assert found.chosen == (49, 189)


def test_a_grid_off_centre_by_whole_cells_is_compared_exactly_on_the_overlap() -> None:
    # 8 cells at stride 1 in a 10-pixel input (a crop of one pixel on one side): the mirror of
    # cell j is cell 9 - j, so every comparison is exact, but two columns have no mirror.
    grid = Grid(Axis(8, 1.0, 0.0), Axis(8, 1.0, 0.0))
    fmap = torch.arange(64, dtype=torch.float64).reshape(1, 1, 8, 8)
    found = compare_on_grid(D4Element.named("flip_h"), fmap, grid, (10, 10), (1.0, 1.0))
    assert (found.comparison, found.aligned) == ("exact", False)
    assert found.action.mask[0, 0, 0].tolist() == [False, False] + [True] * 6
    for j in range(2, 8):
        assert torch.equal(found.action.transformed[..., j], fmap[..., 9 - j])
    assert aligned(D4Element.named("flip_h"), grid, (10, 10)) is False


def test_cell_map_tensors_are_made_once_per_device_and_read_again() -> None:
    # Every batch compares the same (element, grid) pairs: their index, position and mask
    # tensors are made once (on a GPU each copy from the host would wait for the device), and
    # the comparison is the same as the first time.
    from eqaudit.transforms import geometry

    geometry._DEVICE_PLANS.clear()
    off_centre = Grid(Axis(8, 1.0, 0.0), Axis(8, 1.0, 0.0))  # gathered, with a mask
    rotation = parse_transforms("rot:30")[1]  # resampled, inside a disk ([0]: the identity)
    centred = Grid(Axis(9, 1.0, 0.0), Axis(9, 1.0, 0.0))
    draw = torch.Generator().manual_seed(0)
    pairs = [
        (D4Element.named("flip_h"), torch.randn(2, 3, 8, 8, generator=draw), off_centre, (10, 10)),
        (rotation, torch.randn(2, 3, 9, 9, generator=draw), centred, (9, 9)),
    ]
    first = [compare_on_grid(e, f, g, size, (1.0, 1.0)).action for e, f, g, size in pairs]
    plans = dict(geometry._DEVICE_PLANS)
    # the gather's, the resampling's, and on the CPU the resampling as one sparse operator
    assert len(plans) == 3 and first[0].mask is not None and first[1].mask is not None
    again = [compare_on_grid(e, f, g, size, (1.0, 1.0)).action for e, f, g, size in pairs]
    assert plans == geometry._DEVICE_PLANS  # the same tensors, nothing made again
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.transformed, b.transformed) and a.mask is b.mask


def test_resampling_past_the_operator_budget_gives_the_same_samples(monkeypatch) -> None:
    # Which operators stay cached may depend on the order layers are compared in (threads):
    # one made again at each use must give the same samples as a cached one, bit for bit.
    from eqaudit.transforms import geometry

    rotation = parse_transforms("rot:30")[1]
    grid = Grid(Axis(11, 1.0, 0.0), Axis(11, 1.0, 0.0))
    fmap = torch.randn(3, 5, 11, 11, generator=torch.Generator().manual_seed(1))
    geometry.drop_device_plans()
    cached = compare_on_grid(rotation, fmap, grid, (11, 11), (1.0, 1.0)).action.transformed
    assert geometry._cubic_bytes > 0
    geometry.drop_device_plans()
    monkeypatch.setattr(geometry, "CUBIC_OPERATOR_BYTES", 0)
    again = compare_on_grid(rotation, fmap, grid, (11, 11), (1.0, 1.0)).action.transformed
    assert geometry._cubic_bytes == 0 and torch.equal(again, cached)
    geometry.drop_device_plans()
