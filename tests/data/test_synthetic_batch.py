"""Synthetic images drawn a run at a time are bit-identical to the one-image definition.

The oracle is ``_reference_image``: the original one-image-at-a-time code, kept here verbatim in
its formulas (numpy float64, one scene per call), so that the chunked renderer can be checked
byte for byte on any size, channel count, seed, start and chunk size. Two SHA-256 digests, taken
from that original code, pin the set itself.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from eqaudit.data import open_images, synthetic_images
from eqaudit.data.preprocess import LUMA_WEIGHTS
from eqaudit.data.synthetic import (
    _draw_scene,
    _reaches,
    _render,
    _spans,
    synthetic_image,
    synthetic_images_into,
)


# -- the definition, one image at a time ----------------------------------------------------------
def _reference_image(
    index: int, size_hw: tuple[int, int], channels: int, seed: int, quantise: bool = True
) -> np.ndarray:
    rng = np.random.default_rng([seed, index])
    h, w = size_hw
    half = max(h, w) / 2.0
    x = ((np.arange(w) + 0.5) - w / 2.0)[None, :] / half
    y = ((np.arange(h) + 0.5) - h / 2.0)[:, None] / half
    image = _reference_gradient(rng, x, y)
    for _ in range(int(rng.integers(1, 3))):
        cycles = rng.uniform(1.0, 3.5)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        colour = rng.uniform(-1.0, 1.0, size=(3, 1, 1))
        colour = colour / max(np.abs(colour).max(), 1e-6) * rng.uniform(0.06, 0.16)
        image = image + colour * np.sin(np.pi * cycles * _direction(rng, x, y) + phase)[None]
    for _ in range(int(rng.integers(3, 7))):
        coverage = _reference_coverage(rng, x, y, half)
        opacity = rng.uniform(0.75, 1.0)
        fill = _reference_gradient(rng, x, y)
        image = image * (1.0 - opacity * coverage) + fill * (opacity * coverage)
    image = np.clip(image, 0.0, 1.0)
    if channels == 1:
        image = np.tensordot(np.asarray(LUMA_WEIGHTS), image, axes=(0, 0))[None]
    if not quantise:
        return image
    return (np.round(image * 65535.0) / 65535.0).astype(np.float32)


def _direction(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    angle = rng.uniform(0.0, 2.0 * np.pi)
    return x * np.cos(angle) + y * np.sin(angle)


def _reference_gradient(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    start, end = rng.uniform(0.05, 0.95, size=(2, 3, 1, 1))
    t = np.clip(0.5 + 0.5 * _direction(rng, x, y), 0.0, 1.0)[None]
    return start + (end - start) * t


def _reference_coverage(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, half: float
) -> np.ndarray:
    cx, cy = rng.uniform(-0.65, 0.65, size=2)
    angle = rng.uniform(0.0, np.pi)
    return _coverage(rng, x, y, half, cx, cy, angle, int(rng.integers(0, 3)))


def _coverage(
    rng: np.random.Generator | None,
    x: np.ndarray,
    y: np.ndarray,
    half: float,
    cx: float,
    cy: float,
    angle: float,
    kind: int,
    params: tuple[float, float] | None = None,
) -> np.ndarray:
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    if kind == 0:
        a, b = rng.uniform(0.12, 0.45, size=2) if params is None else params
        distance = (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * min(a, b)
    elif kind == 1:
        a, b = rng.uniform(0.1, 0.4, size=2) if params is None else params
        distance = np.maximum(np.abs(u) - a, np.abs(v) - b)
    else:
        if params is None:
            length = rng.uniform(0.3, 0.9)
            thickness = rng.uniform(1.5, 4.0) / half
        else:
            length, thickness = params
        along = np.clip(u, -length, length)
        distance = np.sqrt((u - along) ** 2 + v**2) - thickness / 2.0
    return np.clip(0.5 - distance * half, 0.0, 1.0)


def _reference(n: int, size_hw: tuple[int, int], channels: int, seed: int, start: int) -> bytes:
    return np.stack(
        [_reference_image(start + i, size_hw, channels, seed) for i in range(n)]
    ).tobytes()


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size_hw", "channels", "seed", "start", "count"),
    [
        ((17, 17), 3, 0, 0, 40),
        ((33, 33), 1, 5, 37, 30),
        ((40, 57), 3, 9, 3, 30),
        ((57, 40), 1, 2, 1001, 24),
        ((1, 5), 3, 1, 0, 16),
        ((64, 64), 3, 123, 5, 16),
        ((232, 232), 3, 4, 77, 6),
    ],
)
def test_runs_equal_the_one_image_definition_bit_for_bit(
    size_hw: tuple[int, int], channels: int, seed: int, start: int, count: int
) -> None:
    expected = _reference(count, size_hw, channels, seed, start)
    assert synthetic_images(count, size_hw, channels, seed, start).numpy().tobytes() == expected
    singles = [synthetic_image(start + i, size_hw, channels, seed) for i in range(count)]
    assert np.stack(singles).tobytes() == expected
    for chunk in range(1, 9):
        out = np.empty((count, channels, *size_hw), dtype=np.float32)
        for first in range(0, count, chunk):
            synthetic_images_into(out[first : first + chunk], start + first, seed)
        assert out.tobytes() == expected, f"chunk {chunk}"


@pytest.mark.parametrize(("size_hw", "channels"), [((29, 29), 3), ((31, 18), 1), ((96, 96), 3)])
def test_float64_values_before_quantisation_are_bit_identical(
    size_hw: tuple[int, int], channels: int
) -> None:
    """The 16-bit rounding would hide last-ulp differences; compare the float64 images."""
    h, w = size_hw
    half = max(h, w) / 2.0
    start, count = 500, 16
    expected = np.stack(
        [_reference_image(start + i, size_hw, channels, 7, quantise=False) for i in range(count)]
    )
    for chunk in (1, 3, 8, 16):
        out = np.empty((count, channels, h, w))
        for first in range(0, count, chunk):
            stop = min(first + chunk, count)
            scenes = [_draw_scene(start + i, 7, half) for i in range(first, stop)]
            _render(scenes, out[first : first + chunk], half, quantise=False)
        assert out.tobytes() == expected.tobytes(), f"chunk {chunk}"


def test_known_digests_of_the_set() -> None:
    """SHA-256 of images 0..5 (32x32 RGB, seed 0) and 11..16 (40x57 gray, seed 3), computed
    with the original one-image code before the chunked renderer existed."""
    rgb = synthetic_images(6, (32, 32), 3, seed=0).numpy().tobytes()
    gray = synthetic_images(6, (40, 57), 1, seed=3, start=11).numpy().tobytes()
    assert (
        hashlib.sha256(rgb).hexdigest()
        == "a2e0e0d70ac2943ac66767aba55b5900bbcdb7e4298cd65e0233e948c1fa5b49"
    )
    assert (
        hashlib.sha256(gray).hexdigest()
        == "113a420edca9f1ce356a6c1e1b147ae58faf4fa992c07cee91943c0aea5b7656"
    )


def test_shape_boxes_hold_all_of_the_coverage() -> None:
    """Outside the box a shape is evaluated in, its coverage (the definition, on the whole
    image) is exactly 0; so skipping those pixels leaves them unchanged."""
    for size_hw in ((48, 48), (40, 57), (9, 3)):
        h, w = size_hw
        half = max(h, w) / 2.0
        x = ((np.arange(w) + 0.5) - w / 2.0)[None, :] / half
        y = ((np.arange(h) + 0.5) - h / 2.0)[:, None] / half
        scenes = [_draw_scene(i, 0, half) for i in range(150)]
        table = np.array([row for s in scenes for row in s.shapes])
        kinds = np.array([k for s in scenes for k in s.kinds])
        trig = np.cos(table[:, [2, 12]]), np.sin(table[:, [2, 12]])
        reach_y, reach_x = _reaches(table, np.concatenate(trig, axis=1), kinds, half)
        top, bottom = _spans(table[:, 1], reach_y, half, h)
        left, right = _spans(table[:, 0], reach_x, half, w)
        assert set(kinds.tolist()) == {0, 1, 2}
        for i, row in enumerate(table):
            cx, cy, angle, p, q = row[:5]
            coverage = _coverage(None, x, y, half, cx, cy, angle, int(kinds[i]), (p, q))
            inside = np.zeros((h, w), dtype=bool)
            inside[top[i] : bottom[i], left[i] : right[i]] = True
            assert not coverage[~inside].any()


def test_synthetic_source_loads_runs_identically() -> None:
    source = open_images(None, size=(20, 24), margin=2, num_images=21, seed=4)
    expected = _reference(21, (24, 28), 3, 4, 0)
    for workers in (1, 3):
        pixels = [b.pixels for b in source.iter_batches(5, workers=workers)]
        assert np.concatenate([p.numpy() for p in pixels]).tobytes() == expected
    # Positions that are not a run (a stepped range) are drawn one by one.
    out = np.empty((4, 3, 24, 28), dtype=np.float32)
    source._load_into(range(1, 9, 2), out)
    assert out.tobytes() == b"".join(_reference(1, (24, 28), 3, 4, i) for i in range(1, 9, 2))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="channels"):
        synthetic_images_into(np.empty((1, 2, 4, 4), dtype=np.float32), 0)
    with pytest.raises(ValueError, match="non-negative"):
        synthetic_images_into(np.empty((1, 3, 4, 4), dtype=np.float32), -1)
    with pytest.raises(ValueError, match="non-negative"):
        synthetic_images(-1, (4, 4))
