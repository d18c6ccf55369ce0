"""Property-based tests (Hypothesis): laws that must hold for every input, not just hand-picked ones.

* D4 is a group and acts on images: composition = applying in turn, associativity, inverses,
  rot90^4 = flip^2 = id, f r f = r^-1.
* The action on feature maps commutes with the action on images wherever the grid is aligned: a
  D4-symmetric convolution at stride 1 (any size) or stride 2 (odd sizes), a circular convolution
  under shifts by multiples of its stride.
* Integer circular shifts compose additively and invert; a crop-shift is a window of the roll.
* ``parse_transforms`` round-trips valid specs and raises only ``TransformSpecError`` on any text.
* Declared label actions are accepted exactly when they respect D4's relations.
* Accumulators: merge is associative and commutative, and streaming equals one shot.

Examples are kept few (``max_examples`` 50 or less) and no example database is written.
"""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from eqaudit.errors import TransformSpecError, UsageError
from eqaudit.metrics import (
    HIST_EDGES,
    LayerStats,
    OrbitStats,
    OutputStats,
    cosine_distance,
    js_divergence,
    relative_error,
)
from eqaudit.transforms import (
    D4_NAMES,
    FAMILIES,
    D4Element,
    Rotation,
    Shift,
    Transform,
    fourier_shift,
    parse_transforms,
)
from eqaudit.transforms.labels import build_label_action, compose, identity, invert

SETTINGS = settings(max_examples=50, deadline=None, database=None)
FEW = settings(max_examples=25, deadline=None, database=None)

ID = D4Element(0, False)
R = D4Element.named("rot90")
F_H = D4Element.named("flip_h")

d4_elements = st.builds(D4Element, st.integers(0, 3), st.booleans())


@st.composite
def images(draw, *, square: bool = True, min_side: int = 1, max_side: int = 6) -> torch.Tensor:
    """A float64 batch ``(B, C, H, W)`` of arbitrary finite values."""
    batch, channels = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    height = draw(st.integers(min_side, max_side))
    width = height if square else draw(st.integers(min_side, max_side))
    values = draw(
        hnp.arrays(
            np.float64,
            (batch, channels, height, width),
            elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
        )
    )
    return torch.from_numpy(values)


def act(g: D4Element, x: torch.Tensor) -> torch.Tensor:
    return g.apply_image(x, 0)


# -- D4: group laws and the action on images ---------------------------------------------------
@SETTINGS
@given(d4_elements, d4_elements, images())
def test_composition_is_applying_in_turn(a: D4Element, b: D4Element, x: torch.Tensor) -> None:
    assert torch.equal(act(a.compose(b), x), act(a, act(b, x)))
    assert a.compose(b).name in D4_NAMES.values()  # closed


@SETTINGS
@given(d4_elements, d4_elements, d4_elements)
def test_composition_is_associative(a: D4Element, b: D4Element, c: D4Element) -> None:
    assert a.compose(b).compose(c) == a.compose(b.compose(c))
    assert a.compose(ID) == a == ID.compose(a)


@SETTINGS
@given(d4_elements, images())
def test_inverse_undoes_the_element(g: D4Element, x: torch.Tensor) -> None:
    assert g.compose(g.inverse()) == ID == g.inverse().compose(g)
    assert torch.equal(act(g.inverse(), act(g, x)), x)
    assert g.inverse().inverse() == g


@SETTINGS
@given(images(), d4_elements)
def test_defining_relations(x: torch.Tensor, g: D4Element) -> None:
    r4 = x
    for _ in range(4):
        r4 = act(R, r4)
    assert torch.equal(r4, x)
    assert torch.equal(act(F_H, act(F_H, x)), x)
    # f r f = r^-1, as elements and on pixels; and every element is r^k f^p.
    assert F_H.compose(R).compose(F_H) == R.inverse()
    assert torch.equal(act(F_H, act(R, act(F_H, x))), act(R.inverse(), x))
    word = ID
    for _ in range(g.k):
        word = R.compose(word)
    assert (word.compose(F_H) if g.flip else word) == g


@SETTINGS
@given(d4_elements, images(square=False, min_side=2))
def test_axis_swapping_elements_are_skipped_on_non_square_inputs(
    g: D4Element, x: torch.Tensor
) -> None:
    height, width = x.shape[-2:]
    reason = g.skip_reason(height, width)
    swaps = g.k % 2 == 1
    assert (reason is not None) == (swaps and height != width)
    if reason is None:
        assert act(g, x).shape == x.shape


# -- feature maps: the action commutes with the network on aligned grids -----------------------
def _symmetric_kernel(seed: int, c_in: int, c_out: int, k: int = 3) -> torch.Tensor:
    """A conv kernel averaged over its 8 D4 images: the convolution commutes with D4."""
    w = torch.randn(c_out, c_in, k, k, generator=torch.Generator().manual_seed(seed))
    w = w.to(torch.float64)
    orbit = [act(D4Element(j, flip), w) for j in range(4) for flip in (False, True)]
    return torch.stack(orbit).mean(0)


@SETTINGS
@given(d4_elements, images(max_side=7), st.integers(0, 2**31 - 1), st.sampled_from([1, 2]))
def test_symmetric_conv_commutes_with_d4_on_aligned_grids(
    g: D4Element, x: torch.Tensor, seed: int, stride: int
) -> None:
    """Stride 1 keeps every grid centred; stride 2 (kernel 3, padding 1) only odd sizes: the
    cells of the output sit at 2i, symmetric about (n - 1) / 2 exactly when n is odd."""
    size = x.shape[-1]
    assume(stride == 1 or size % 2 == 1)
    w = _symmetric_kernel(seed, x.shape[1], 2)

    def conv(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, stride=stride, padding=1)

    a = conv(act(g, x))
    b = g.feature_action(conv(x), (float(stride), float(stride))).transformed
    scale = 1.0 + float(x.abs().max())
    assert torch.allclose(a, b, atol=1e-9 * scale, rtol=0)
    assert float(relative_error(a, b).max()) < 1e-9


@SETTINGS
@given(
    images(min_side=2, max_side=8),
    st.integers(-8, 8),
    st.integers(-8, 8),
    st.integers(0, 2**31 - 1),
    st.sampled_from([1, 2]),
)
def test_circular_conv_commutes_with_shifts_by_multiples_of_its_stride(
    x: torch.Tensor, ky: int, kx: int, seed: int, stride: int
) -> None:
    size = x.shape[-1]
    assume(size % stride == 0)
    dy, dx = ky * stride, kx * stride
    w = torch.randn(2, x.shape[1], 3, 3, generator=torch.Generator().manual_seed(seed))

    def conv(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (1, 1, 1, 1), mode="circular"), w.to(t.dtype), stride=stride)

    shift = Shift(dy, dx, "circular")
    a = conv(shift.apply_image(x, 0))
    action = shift.feature_action(conv(x), (float(stride), float(stride)))
    assert action.mask is None
    scale = 1.0 + float(x.abs().max())
    assert torch.allclose(a, action.transformed, atol=1e-9 * scale, rtol=0)


@SETTINGS
@given(images(min_side=2, max_side=8), st.integers(1, 3), st.integers(-7, 7), st.integers(-7, 7))
def test_shift_by_a_non_multiple_of_the_stride_is_not_measurable(
    x: torch.Tensor, stride: int, dy: int, dx: int
) -> None:
    from eqaudit.transforms import NotMeasurable

    shift = Shift(dy, dx, "circular")
    exact = dy % stride == 0 and dx % stride == 0
    try:
        shift.feature_action(x, (float(stride), float(stride)))
    except NotMeasurable:
        assert not exact
    else:
        assert exact


# -- shifts ----------------------------------------------------------------------------------------
shifts = st.integers(-9, 9)


@SETTINGS
@given(images(square=False), shifts, shifts, shifts, shifts)
def test_circular_shifts_compose_additively_and_invert(
    x: torch.Tensor, dy1: int, dx1: int, dy2: int, dx2: int
) -> None:
    def shift(dy: int, dx: int, t: torch.Tensor) -> torch.Tensor:
        return Shift(dy, dx, "circular").apply_image(t, 0)

    assert torch.equal(shift(dy1, dx1, shift(dy2, dx2, x)), shift(dy1 + dy2, dx1 + dx2, x))
    assert torch.equal(shift(-dy1, -dx1, shift(dy1, dx1, x)), x)
    height, width = x.shape[-2:]
    assert torch.equal(shift(dy1 + height, dx1 - 2 * width, x), shift(dy1, dx1, x))  # periodic


@SETTINGS
@given(images(square=False, max_side=5), st.integers(0, 3), st.data())
def test_crop_shift_is_a_window_of_the_rolled_source(
    source: torch.Tensor, margin: int, data: st.DataObject
) -> None:
    """``out[i, j] = source[m + i - dy, m + j - dx]``: real content from the margin, no fill."""
    padded = F.pad(source, (margin,) * 4, mode="replicate") if margin else source
    dy = data.draw(st.integers(-margin, margin))
    dx = data.draw(st.integers(-margin, margin))
    out = Shift(dy, dx, "crop").apply_image(padded, margin)
    rolled = torch.roll(padded, (dy, dx), (-2, -1))
    height, width = source.shape[-2:]
    assert torch.equal(out, rolled[..., margin : margin + height, margin : margin + width])
    assert Shift(dy, dx, "crop").margin() == max(abs(dy), abs(dx))


@FEW
@given(
    images(square=False, min_side=1, max_side=7).filter(
        lambda t: t.shape[-1] % 2 == 1 and t.shape[-2] % 2 == 1
    ),
    st.floats(-3, 3),
    st.floats(-3, 3),
)
def test_fourier_shifts_compose_additively_on_odd_grids(
    x: torch.Tensor, a: float, b: float
) -> None:
    """Band-limited shifts are exact phase ramps on odd axes (no Nyquist bin), so they add."""
    scale = 1.0 + float(x.abs().max())
    twice = fourier_shift(fourier_shift(x, a, b), b, a)
    once = fourier_shift(x, a + b, a + b)
    assert torch.allclose(twice, once, atol=1e-9 * scale, rtol=0)
    back = fourier_shift(fourier_shift(x, a, b), -a, -b)
    assert torch.allclose(back, x, atol=1e-9 * scale, rtol=0)


# -- parse_transforms ------------------------------------------------------------------------------
positive = st.floats(0.01, 64, allow_nan=False).map(lambda v: round(v, 3)).filter(lambda v: v > 0)
angles = st.one_of(
    st.floats(-360, 360, allow_nan=False).map(lambda v: round(v, 3)),
    # Multiples of 90 degrees (D4 rotations) and angles that are one rotation (-30, 330, 690).
    st.sampled_from([90.0, -90.0, 180.0, 270.0, 450.0, -30.0, 330.0, 690.0, 15.0, -345.0]),
)


@st.composite
def spec_groups(draw) -> list[tuple[str, list[float]]]:
    """Families with their values, as a user might list them."""
    groups = []
    for _ in range(draw(st.integers(1, 4))):
        family = draw(st.sampled_from(sorted(FAMILIES)))
        values: list[float] = []
        if family == "rot":
            values = draw(st.lists(angles, min_size=1, max_size=3))
        elif family == "shift":
            values = draw(st.lists(positive, min_size=1, max_size=3))
        groups.append((family, values))
    return groups


def _write_spec(groups: list[tuple[str, list[float]]], draw) -> str:  # type: ignore[no-untyped-def]
    """A spec string with arbitrary case and spaces around tokens."""
    pad = st.sampled_from(["", " ", "  "])
    tokens = []
    for family, values in groups:
        name = draw(st.sampled_from([family, family.upper(), family.capitalize()]))
        numbers = [repr(float(v)) for v in values]
        tokens.append(draw(pad) + ":".join([name, *numbers[:1]]) + draw(pad))
        tokens += [draw(pad) + n + draw(pad) for n in numbers[1:]]
    return ",".join(tokens)


def _turn(degrees: float) -> float:
    turn = round(degrees % 360, 9)
    return 0.0 if turn == 360 else turn


def _signed(turn: float) -> float:
    """The one angle a rotation is named by: in (-180, 180] degrees."""
    return turn if turn <= 180 else round(turn - 360, 9)


def _expected_names(groups: list[tuple[str, list[float]]], mode: str) -> list[str]:
    names, turns = ["id"], set()
    for family, values in groups:
        for element in FAMILIES[family].build(values, mode):
            name = element.name
            if isinstance(element, Rotation):
                turn = _turn(element.degrees)
                if turn == 0 or turn in turns:
                    continue  # the identity, or the same rotation under another angle
                turns.add(turn)
                # rot:-90 is rot270; other angles are named in (-180, 180]: rot:330 is rot-30
                name = f"rot{turn:g}" if turn % 90 == 0 else f"rot{_signed(turn):g}"
            elif isinstance(element, D4Element) and not element.flip and element.k:
                turns.add(90.0 * element.k)
            if name not in names:
                names.append(name)
    return names


def _kept_angles(groups: list[tuple[str, list[float]]]) -> set[float]:
    """The angles parsed as rotations: one of angles that are one rotation, in (-180, 180],
    quarter turns as 90, 180 or 270, none that a d4 or c4 family gives as its exact element."""
    covered = {
        90.0 * e.k for f, _ in groups if f in ("d4", "c4") for e in FAMILIES[f].build([], "")
    }
    kept: dict[float, float] = {}
    for family, values in groups:
        for v in values if family == "rot" else []:
            turn = _turn(v)
            if turn and turn not in covered:
                kept.setdefault(turn, turn if turn % 90 == 0 else _signed(turn))
    return set(kept.values())


def _d4_names(groups: list[tuple[str, list[float]]]) -> set[str]:
    return {
        e.name for f, _ in groups if f in ("d4", "c4", "flips") for e in FAMILIES[f].build([], "")
    }


def _spec_of(elements: list[Transform]) -> str:
    """Write parsed elements back as a spec (the inverse of parsing, up to family names)."""
    d4 = {e.name for e in elements if isinstance(e, D4Element)}
    tokens = []
    if {"transpose", "antitranspose"} & d4:
        tokens.append("d4")
    else:
        quarter_turns = [n for n in ("rot90", "rot180", "rot270") if n in d4]
        if len(quarter_turns) == 3:
            tokens.append("c4")
        else:  # from rot:90 (180, 270) alone
            tokens += [f"rot:{n.removeprefix('rot')}" for n in quarter_turns]
        tokens += ["flips"] if "flip_h" in d4 else []
    amounts: set[float] = set()
    for e in elements:  # in order: each shift amount gives four elements, written once
        if isinstance(e, Rotation):
            tokens.append(f"rot:{e.degrees!r}")
        elif isinstance(e, Shift) and abs(e.dx + e.dy) not in amounts:
            amounts.add(abs(e.dx + e.dy))
            tokens.append(f"shift:{float(abs(e.dx + e.dy))!r}")
    return ",".join(tokens)


@SETTINGS
@given(spec_groups(), st.sampled_from(["crop", "circular", "zero", "reflect"]), st.data())
def test_parse_transforms_round_trips_valid_specs(
    groups: list[tuple[str, list[float]]], mode: str, data: st.DataObject
) -> None:
    spec = _write_spec(groups, data.draw)
    expected = _expected_names(groups, mode)
    if expected == ["id"]:  # only rotations by multiples of 360 degrees
        with pytest.raises(TransformSpecError, match="only the identity"):
            parse_transforms(spec, mode)
        return
    elements = parse_transforms(spec, mode)
    names = [e.name for e in elements]
    assert names == expected
    assert elements[0].is_identity and len(set(names)) == len(names)
    assert all(e.mode == mode for e in elements if isinstance(e, Shift))
    # Values survive exactly (repr round-trips floats); d4's exact rot90 replaces rot:90
    # (-90 is rot270), and angles that are one rotation (-30, 330) run once, named in (-180, 180].
    d4 = _d4_names(groups)
    assert all(isinstance(e, D4Element) for e in elements if e.name in d4)
    assert {e.degrees for e in elements if isinstance(e, Rotation)} == _kept_angles(groups)
    # Written back and parsed again: the same elements (D4 elements may come in another order).
    again = [e.name for e in parse_transforms(_spec_of(elements), mode)]
    assert sorted(again) == sorted(names)
    assert [n for n in again if n not in D4_NAMES.values()] == [
        n for n in names if n not in D4_NAMES.values()
    ]
    # Repeating the spec changes nothing: duplicates run once.
    assert [e.name for e in parse_transforms(f"{spec},{spec}", mode)] == names


@SETTINGS
@given(spec_groups(), st.randoms(use_true_random=False))
def test_parse_transforms_gives_the_same_elements_in_any_order(
    groups: list[tuple[str, list[float]]], rng
) -> None:  # type: ignore[no-untyped-def]
    shuffled = list(groups)
    rng.shuffle(shuffled)

    def parsed(gs: list[tuple[str, list[float]]]) -> set[tuple[str, type]] | None:
        spec = ",".join(f"{f}:{','.join(map(repr, vs))}" if vs else f for f, vs in gs)
        try:
            return {(e.name, type(e)) for e in parse_transforms(spec)}
        except TransformSpecError:
            return None

    assert parsed(groups) == parsed(shuffled)


@SETTINGS
@given(st.text(max_size=40), st.text(max_size=10))
def test_parse_transforms_raises_only_its_own_error_on_any_text(spec: str, mode: str) -> None:
    for shift_mode in ("crop", mode):
        try:
            elements = parse_transforms(spec, shift_mode)
        except TransformSpecError as exc:
            assert str(exc) and "\n" not in str(exc)
        else:
            assert elements[0].is_identity
            assert all(isinstance(e, Transform) for e in elements)


@SETTINGS
@given(
    st.lists(
        st.one_of(
            st.sampled_from(["d4", "c4", "flips", "rot", "shift", "rot:", "shift:", ":", ""]),
            st.floats(allow_nan=True, allow_infinity=True).map(repr),
            st.sampled_from(["nan", "inf", "-inf", "1e999", "0", "-1", "1e-400", "0x10", "1_0"]),
        ),
        max_size=6,
    )
)
def test_parse_transforms_on_near_valid_specs(tokens: list[str]) -> None:
    """Specs built from real family names and awkward numbers: parsed, or refused politely."""
    try:
        elements = parse_transforms(",".join(tokens))
    except TransformSpecError:
        return
    for e in elements:
        if isinstance(e, Shift):
            assert math.isfinite(e.dy) and math.isfinite(e.dx) and (e.dy, e.dx) != (0, 0)
        if isinstance(e, Rotation):
            assert math.isfinite(e.degrees) and e.degrees != 0


# -- declared label actions --------------------------------------------------------------------
def _power(p: tuple[int, ...], n: int) -> tuple[int, ...]:
    out = identity(len(p))
    for _ in range(n):
        out = compose(p, out)
    return out


def _spec(p: tuple[int, ...]) -> str:
    return ",".join(map(str, p))


def _is_d4_action(r: tuple[int, ...], f: tuple[int, ...]) -> bool:
    """D4 = <r, f | r^4 = f^2 = id, f r f = r^-1>: the declared pair must satisfy the relations."""
    k = len(r)
    return (
        _power(r, 4) == identity(k)
        and _power(f, 2) == identity(k)
        and compose(f, compose(r, f)) == invert(r)
    )


def _assert_homomorphism(permutations: dict[str, tuple[int, ...]]) -> None:
    for a in D4_NAMES.values():
        for b in D4_NAMES.values():
            ga, gb = D4Element.named(a), D4Element.named(b)
            assert permutations[ga.compose(gb).name] == compose(permutations[a], permutations[b])


permutations_of = st.integers(1, 6).flatmap(lambda k: st.permutations(list(range(k))))


@SETTINGS
@given(permutations_of)
def test_rot90_with_flip_identity_needs_an_involution(p: list[int]) -> None:
    """With flip_h = id, f r f = r^-1 becomes r = r^-1: only permutations of order <= 2 pass."""
    r = tuple(p)
    declared = {"rot90": _spec(r), "flip_h": "id"}
    if compose(r, r) == identity(len(r)):
        action = build_label_action(declared, len(r))
        _assert_homomorphism(action.permutations)
    else:
        with pytest.raises(UsageError, match="contradict the group"):
            build_label_action(declared, len(r))


@SETTINGS
@given(st.lists(st.integers(0, 3), min_size=2, max_size=4, unique=True))
def test_cycles_on_four_classes_with_flip_identity(cycle: list[int]) -> None:
    declared = {"rot90": "cycle:" + ",".join(map(str, cycle)), "flip_h": "id"}
    if len(cycle) <= 2:
        action = build_label_action(declared, 4)
        assert action.permutations["rot180"] == identity(4)
    else:
        with pytest.raises(UsageError, match="contradict the group"):
            build_label_action(declared, 4)


@SETTINGS
@given(permutations_of, permutations_of)
def test_any_declared_pair_is_accepted_exactly_when_it_is_a_d4_action(
    p: list[int], q: list[int]
) -> None:
    k = min(len(p), len(q))
    r = tuple(i for i in p if i < k)
    f = tuple(i for i in q if i < k)
    declared = {"rot90": _spec(r), "flip_h": _spec(f)}
    try:
        action = build_label_action(declared, k)
    except UsageError:
        assert not _is_d4_action(r, f)
    else:
        assert _is_d4_action(r, f)
        _assert_homomorphism(action.permutations)


@SETTINGS
@given(st.integers(0, 4), st.data())
def test_relabelled_orientation_actions_are_accepted(extra: int, data: st.DataObject) -> None:
    """The orientation classifier (up, left, down, right under a CCW rot90; flip_h swaps left
    and right), with its classes renamed at random and extra classes that never move."""
    k = 4 + extra
    sigma = tuple(data.draw(st.permutations(list(range(k)))))
    r0 = (1, 2, 3, 0, *range(4, k))
    f0 = (0, 3, 2, 1, *range(4, k))

    def relabel(p: tuple[int, ...]) -> tuple[int, ...]:
        return compose(sigma, compose(p, invert(sigma)))

    r, f = relabel(r0), relabel(f0)
    assert _is_d4_action(r, f)
    action = build_label_action({"rot90": _spec(r), "flip_h": _spec(f)}, k)
    assert action.permutations["rot90"] == r and action.permutations["flip_h"] == f
    _assert_homomorphism(action.permutations)


# -- accumulators ----------------------------------------------------------------------------------
unit = st.floats(0, 1, allow_nan=False)
small = st.floats(0, 1, allow_nan=False).map(lambda v: v**8)  # reaches deep into the histogram


@st.composite
def layer_values(draw) -> tuple[np.ndarray, np.ndarray, list[int]]:
    n = draw(st.integers(1, 40))
    rel = np.array(draw(st.lists(st.one_of(unit, small), min_size=n, max_size=n)))
    cos = np.array(draw(st.lists(st.floats(0, 2), min_size=n, max_size=n)))
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=2, max_size=2)))
    return rel, cos, cuts


def _layer(rel: np.ndarray, cos: np.ndarray) -> LayerStats:
    stats = LayerStats()
    if len(rel):
        stats.update(torch.from_numpy(rel), torch.from_numpy(cos))
    return stats


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key] is None or b[key] is None:
            assert a[key] is None and b[key] is None, key
        elif isinstance(a[key], float) and math.isnan(a[key]):
            assert math.isnan(b[key]), key
        else:
            assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-15), key


@SETTINGS
@given(layer_values())
def test_layer_stats_merge_is_associative_commutative_and_streaming_is_one_shot(
    values: tuple[np.ndarray, np.ndarray, list[int]],
) -> None:
    rel, cos, (i, j) = values
    parts = [_layer(rel[s], cos[s]) for s in (slice(0, i), slice(i, j), slice(j, None))]
    a, b, c = parts
    whole = _layer(rel, cos)
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    for merged in (left, right, c.merge(b).merge(a), b.merge(a).merge(c)):
        assert merged.n == whole.n and merged.rel_max == whole.rel_max
        assert np.array_equal(merged.hist, whole.hist)
        _same(merged.compute(), whole.compute())
    streaming = LayerStats()
    for s in (slice(0, i), slice(i, j), slice(j, None)):
        if len(rel[s]):
            streaming.update(torch.from_numpy(rel[s]), torch.from_numpy(cos[s]))
    _same(streaming.compute(), whole.compute())
    _same(a.merge(LayerStats()).compute(), a.compute())  # the empty state is neutral


@SETTINGS
@given(st.lists(st.one_of(unit, small), min_size=1, max_size=60))
def test_layer_stats_p95_is_the_upper_edge_of_the_exact_order_statistics_bin(
    values: list[float],
) -> None:
    stats = _layer(np.array(values), np.zeros(len(values)))
    exact = sorted(values)[math.ceil(0.95 * len(values)) - 1]  # nearest rank
    p95 = stats.quantile(0.95)
    assert p95 <= max(values)
    if exact <= HIST_EDGES[0]:  # the first bin holds values up to 1e-12, reported as 0
        assert p95 == 0.0
    else:
        assert exact * (1 - 1e-12) <= p95 <= exact * 10 ** (1 / 100) * (1 + 1e-12)


@st.composite
def output_values(draw) -> dict[str, np.ndarray]:
    n = draw(st.integers(1, 30))

    def floats(strategy) -> np.ndarray:  # type: ignore[no-untyped-def]
        return np.array(draw(st.lists(strategy, min_size=n, max_size=n)), dtype=np.float64)

    return {
        "agree": np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n))),
        "js": floats(unit),
        "logit": floats(st.floats(0, 10)),
        "correct": np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n))),
        "floor": floats(unit),
    }


def _outputs(v: dict[str, np.ndarray], s: slice, with_extras: bool) -> OutputStats:
    stats = OutputStats()
    if len(v["agree"][s]):
        t = {k: torch.from_numpy(a[s]) for k, a in v.items()}
        extras = (t["logit"], t["correct"], t["floor"]) if with_extras else (None, None, None)
        stats.update(t["agree"], t["js"], *extras)
    return stats


@SETTINGS
@given(output_values(), st.integers(0, 30), st.integers(0, 30), st.booleans())
def test_output_and_orbit_stats_merge_and_streaming(
    values: dict[str, np.ndarray], i: int, j: int, with_extras: bool
) -> None:
    n = len(values["agree"])
    i, j = sorted((min(i, n), min(j, n)))
    cuts = (slice(0, i), slice(i, j), slice(j, None))
    a, b, c = (_outputs(values, s, with_extras) for s in cuts)
    whole = _outputs(values, slice(None), with_extras)
    for merged in (a.merge(b).merge(c), a.merge(b.merge(c)), c.merge(a).merge(b)):
        assert (merged.n, merged.agree, merged.labelled, merged.correct) == (
            whole.n,
            whole.agree,
            whole.labelled,
            whole.correct,
        )
        _same(merged.compute(), whole.compute())
    orbit = [OrbitStats() for _ in cuts]
    for stats, s in zip(orbit, cuts, strict=True):
        if len(values["agree"][s]):
            stats.update(torch.from_numpy(values["agree"][s]))
    one_shot = OrbitStats()
    one_shot.update(torch.from_numpy(values["agree"]))
    assert orbit[0].merge(orbit[1]).merge(orbit[2]) == one_shot
    assert orbit[2].merge(orbit[0].merge(orbit[1])) == one_shot


# -- metric ranges ---------------------------------------------------------------------------------
@st.composite
def image_pairs(draw) -> tuple[torch.Tensor, torch.Tensor]:
    x = draw(images(max_side=4))
    values = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
    y = draw(hnp.arrays(np.float64, tuple(x.shape), elements=values))
    return x, torch.from_numpy(y)


@SETTINGS
@given(image_pairs(), st.floats(-10, 10).filter(lambda v: abs(v) > 1e-3))
def test_metric_ranges_and_symmetries(pair: tuple[torch.Tensor, torch.Tensor], c: float) -> None:
    x, y = pair
    rel, cos = relative_error(x, y), cosine_distance(x, y)
    assert ((rel >= 0) & (rel <= 1)).all() and ((cos >= 0) & (cos <= 2)).all()
    assert torch.equal(relative_error(x, x), torch.zeros_like(rel))
    assert (cosine_distance(x, c * x) >= 0).all()  # rounding must not go below 0
    assert torch.allclose(relative_error(y, x), rel)
    p = torch.softmax(x.flatten(1), dim=1)
    q = torch.softmax(y.flatten(1), dim=1)
    js = js_divergence(p, q)
    assert ((js >= 0) & (js <= 1)).all()
    assert torch.allclose(js, js_divergence(q, p), atol=1e-12)
