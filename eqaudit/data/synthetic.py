"""Synthetic structured images: the fallback when no ``--data`` is given.

White noise is useless for an invariance audit (a model's answer on noise means nothing, and noise
has no edges for a rotation or shift to move), so each image is a small scene: a smooth colour
gradient background, one or two oriented sinusoidal gratings, and a few filled ellipses, rotated
rectangles and thick line segments with their own colour gradients and antialiased edges. No scene
is symmetric by design, so rot90/flips/shifts produce genuinely different images.

Determinism: image ``i`` depends only on ``(seed, i)`` (numpy ``default_rng([seed, i])``), not on
the batch it is generated in. Values are computed in float64 and rounded to 16-bit levels
(multiples of 1/65535) before the cast to float32, so last-ulp differences between machines' math
libraries do not change the output.

Coordinates: pixel centres at ``(i + 0.5)``, origin at the image centre, y down, scaled so the
longer side spans [-1, 1]. Still, these are not photographs: audits on them say little about
real-image behaviour, and callers must say loudly when they fall back to them.

Drawing is split in two so that loader threads run in parallel: :func:`_draw_scene` draws every
random parameter of one image (cheap, Python-level, holds the GIL), then :func:`_render` evaluates
the pixels of up to :data:`CHUNK` scenes at once with few, large numpy operations (which release
the GIL). The pixel formulas are evaluated element for element exactly as in the one-image-at-a-
time definition below, so the output does not depend on how images are grouped:

* background ``start + (end - start) * t`` with ``t = clip(0.5 + 0.5 * (x cos a + y sin a), 0, 1)``;
* each grating adds ``colour * sin(pi * cycles * (x cos a + y sin a) + phase)``;
* each shape, with coverage ``c = clip(0.5 - distance * half, 0, 1)`` and fill gradient ``f``,
  composites ``image * (1 - opacity * c) + f * (opacity * c)``; then ``clip(image, 0, 1)``,
  luma for one channel, and ``round(image * 65535) / 65535`` cast to float32.

A shape is only evaluated in a box around it: outside the box its coverage is exactly 0, so the
composite is ``image * 1.0 + 0.0 == image`` there (the image is finite and never ``-0.0``: the
background is positive and a sum of two products is ``-0.0`` only if both are).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from eqaudit.data.preprocess import LUMA_WEIGHTS

_QUANT = 65535.0
CHUNK = 8  # images rendered together: enough to amortise numpy calls, few enough for the cache
_BOX_MARGIN_PX = 2.0  # safety margin around a shape's support, far above rounding error
_BOX_SLACK = 1.5  # shapes share a box size while the padded area stays within this factor

# Parameter rows (float64), as drawn by _draw_scene:
# gradient: start colour (3), end colour (3), angle
# grating:  pi * cycles, phase, colour (3, normalised and scaled), angle
# shape:    cx, cy, angle, p, q, opacity, fill gradient (7); p, q are the ellipse semi-axes,
#           the rectangle half sides, or the segment's half length and thickness (coord. units)
_SHAPE_FILL = 6  # column where a shape's fill gradient starts
_ELLIPSE, _RECTANGLE, _SEGMENT = 0, 1, 2


class _Scene(NamedTuple):
    background: list[float]
    gratings: list[list[float]]
    shapes: list[list[float]]
    kinds: list[int]


def synthetic_images(
    n: int, size_hw: tuple[int, int], channels: int = 3, seed: int = 0, start: int = 0
) -> torch.Tensor:
    """Images ``start .. start+n-1`` of the synthetic set: ``(n, channels, H, W)`` in [0, 1].

    ``synthetic_images(n, ..., start=0)[k]`` equals ``synthetic_images(1, ..., start=k)[0]``.
    """
    if n < 0:
        raise ValueError("n, start and seed must be non-negative")
    h, w = size_hw
    out = np.empty((n, channels, h, w), dtype=np.float32)
    synthetic_images_into(out, start, seed)
    return torch.from_numpy(out)


def probe_image(channels: int, height: int, width: int) -> torch.Tensor:
    """One image ``(1, channels, H, W)`` in [0, 1] to learn a model's layers from: the first
    synthetic image, its channels repeated or cut to ``channels``. Not a blank one: a model
    that standardises each image by its own spread (``(x - x.mean()) / x.std()``, as ported
    TensorFlow and medical models do) gives NaN scores on a constant image, and the audit of
    real images failed on that probe."""
    base = synthetic_images(1, (height, width), 1 if channels == 1 else 3)
    if base.shape[1] != channels:
        base = base.repeat(1, -(-channels // base.shape[1]), 1, 1)[:, :channels]
    return base.contiguous()


def synthetic_image(
    index: int, size_hw: tuple[int, int], channels: int = 3, seed: int = 0
) -> np.ndarray:
    """One synthetic image, ``(channels, H, W)`` float32 in [0, 1]; ``channels`` is 1 or 3."""
    out = np.empty((1, channels, *size_hw), dtype=np.float32)
    synthetic_images_into(out, index, seed)
    return out[0]


def synthetic_images_into(out: np.ndarray, start: int, seed: int = 0) -> None:
    """Write images ``start .. start + len(out) - 1`` into ``out``, float32 ``(n, C, H, W)``,
    ``C`` 1 or 3; bit-identical to :func:`synthetic_image` for each index.

    Thread-safe (no shared state); the pixel work, which releases the GIL, is done
    :data:`CHUNK` images at a time.
    """
    n, channels, h, w = out.shape
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if start < 0 or seed < 0:
        raise ValueError("n, start and seed must be non-negative")
    half = max(h, w) / 2.0  # pixels per coordinate unit
    for first in range(0, n, CHUNK):
        count = min(CHUNK, n - first)
        scenes = [_draw_scene(start + first + k, seed, half) for k in range(count)]
        _render(scenes, out[first : first + count], half)


# -- parameters -----------------------------------------------------------------------------------
# The draws below are the definition of the set: their order and ranges must not change.
def _draw_scene(index: int, seed: int, half: float) -> _Scene:
    rng = np.random.default_rng([seed, index])
    background = _draw_gradient(rng)
    gratings = [_draw_grating(rng) for _ in range(int(rng.integers(1, 3)))]
    kinds: list[int] = []
    shapes = [_draw_shape(rng, half, kinds) for _ in range(int(rng.integers(3, 7)))]
    return _Scene(background, gratings, shapes, kinds)


def _draw_gradient(rng: np.random.Generator) -> list[float]:
    """Linear ramp between two random colours along a random direction."""
    ends = rng.uniform(0.05, 0.95, size=6).tolist()  # start (3), end (3)
    return [*ends, rng.uniform(0.0, 2.0 * np.pi)]


def _draw_grating(rng: np.random.Generator) -> list[float]:
    """Oriented sinusoid, 1-3.5 cycles across the image, coloured, zero-mean."""
    cycles = rng.uniform(1.0, 3.5)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    colour = rng.uniform(-1.0, 1.0, size=3)
    colour = colour / max(np.abs(colour).max(), 1e-6) * rng.uniform(0.06, 0.16)
    return [np.pi * cycles, phase, *colour.tolist(), rng.uniform(0.0, 2.0 * np.pi)]


def _draw_shape(rng: np.random.Generator, half: float, kinds: list[int]) -> list[float]:
    """A random ellipse, rotated rectangle or thick segment, its opacity and fill gradient."""
    cx, cy = rng.uniform(-0.65, 0.65, size=2).tolist()
    angle = rng.uniform(0.0, np.pi)
    kind = int(rng.integers(0, 3))
    kinds.append(kind)
    if kind == _ELLIPSE:
        p, q = rng.uniform(0.12, 0.45, size=2).tolist()
    elif kind == _RECTANGLE:
        p, q = rng.uniform(0.1, 0.4, size=2).tolist()
    else:  # thick line segment along u
        p = rng.uniform(0.3, 0.9)
        q = rng.uniform(1.5, 4.0) / half
    opacity = rng.uniform(0.75, 1.0)
    return [cx, cy, angle, p, q, opacity, *_draw_gradient(rng)]


# -- pixels ---------------------------------------------------------------------------------------
def _render(scenes: list[_Scene], out: np.ndarray, half: float, quantise: bool = True) -> None:
    """Evaluate ``len(scenes)`` scenes into ``out`` (float32 ``(n, C, H, W)``).

    ``quantise=False`` (tests, with a float64 ``out``) skips the rounding to 16-bit levels, so
    that the float64 values themselves can be compared with the definition."""
    n, channels, h, w = out.shape
    x = ((np.arange(w) + 0.5) - w / 2.0) / half
    y = ((np.arange(h) + 0.5) - h / 2.0) / half
    image = np.empty((n, 3, h, w))
    plane = np.empty((n, h, w))

    background = np.array([s.background for s in scenes])
    angle = background[:, 6]
    _ramp_into(image, plane, x, y, background, np.cos(angle), np.sin(angle))

    wave = np.empty((n, h, w))
    for slot in range(2):
        members = [k for k, s in enumerate(scenes) if len(s.gratings) > slot]
        if not members:
            break
        m = len(members)
        rows = np.array([scenes[k].gratings[slot] for k in members])
        phase = plane[:m]
        _direction_into(phase, x, y, np.cos(rows[:, 5]), np.sin(rows[:, 5]))
        np.multiply(phase, rows[:, 0, None, None], out=phase)
        np.add(phase, rows[:, 1, None, None], out=phase)
        np.sin(phase, out=phase)
        # image + colour * sin(...), a channel at a time: no (m, 3, H, W) temporary.
        for c in range(3):
            np.multiply(rows[:, 2 + c, None, None], phase, out=wave[:m])
            if m == n:
                np.add(image[:, c], wave, out=image[:, c])
            else:
                for j, k in enumerate(members):
                    np.add(image[k, c], wave[j], out=image[k, c])
    del wave

    # Coverage and fill of every shape first (they do not depend on the image), then the
    # composites, in each image's shape order.
    layers = _shape_layers(scenes, x, y, half)
    for k, scene in enumerate(scenes):
        for slot in range(len(scene.shapes)):
            r0, c0, keep, fill = layers[k, slot]
            box = image[k, :, r0 : r0 + keep.shape[0], c0 : c0 + keep.shape[1]]
            np.multiply(box, keep, out=box)  # image * (1 - opacity * coverage)
            np.add(box, fill, out=box)  # + fill * (opacity * coverage)

    np.maximum(image, 0.0, out=image)  # clip: the image is never NaN nor -0.0
    np.minimum(image, 1.0, out=image)
    if channels == 1:
        # One tensordot per image, as in the definition: BLAS may fuse the weighted sum.
        weights = np.asarray(LUMA_WEIGHTS)
        gray = plane[:, None]
        for k in range(n):
            gray[k, 0] = np.tensordot(weights, image[k], axes=(0, 0))
        image = gray
    if quantise:
        np.multiply(image, _QUANT, out=image)
        np.rint(image, out=image)  # np.round(decimals=0) is rint: half to even
        np.divide(image, _QUANT, out=image)
    out[...] = image


def _direction_into(
    out: np.ndarray, x: np.ndarray, y: np.ndarray, cos: np.ndarray, sin: np.ndarray
) -> None:
    """``out[k] = x cos[k] + y sin[k]``, ``(m, H, W)`` from ``x`` (W,) or ``(m, W)`` and ``y``
    (H,) or ``(m, H)``; ``cos``, ``sin`` (m,) of each direction's angle."""
    x_part = x[..., None, :] * cos[:, None, None]
    y_part = y[..., :, None] * sin[:, None, None]
    np.add(x_part, y_part, out=out)


def _ramp_into(
    out: np.ndarray,
    plane: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    gradients: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
) -> None:
    """``out = start + (end - start) * clip(0.5 + 0.5 * direction, 0, 1)``, ``(m, 3, H, W)``,
    for gradient rows ``(m, 7)`` whose angles have ``cos``, ``sin``; ``plane`` ``(m, H, W)`` is
    scratch."""
    _direction_into(plane, x, y, cos, sin)
    np.multiply(plane, 0.5, out=plane)
    np.add(plane, 0.5, out=plane)
    np.maximum(plane, 0.0, out=plane)  # clip: the ramp is never NaN nor -0.0
    np.minimum(plane, 1.0, out=plane)
    start, end = gradients[:, 0:3, None, None], gradients[:, 3:6, None, None]
    np.multiply(end - start, plane[:, None], out=out)
    np.add(out, start, out=out)


_Layer = tuple[int, int, np.ndarray, np.ndarray]  # box top row, left column, keep, weighted fill


def _shape_layers(
    scenes: list[_Scene], x: np.ndarray, y: np.ndarray, half: float
) -> dict[tuple[int, int], _Layer]:
    """For each shape ``(image, slot)``: its box and, in it, ``1 - opacity * coverage``
    ``(bh, bw)`` and ``fill * (opacity * coverage)`` ``(3, bh, bw)``.

    Shapes are evaluated in groups of one kind and one box size. A box holds every pixel where
    the shape's coverage may be non-zero and is shifted (not cropped) to fit the image.
    """
    h, w = y.size, x.size
    owners = [(k, slot) for k, s in enumerate(scenes) for slot in range(len(s.shapes))]
    kinds = np.array([kind for s in scenes for kind in s.kinds])
    table = np.array([row for s in scenes for row in s.shapes])
    # cos and sin of the shape angles and of the fill gradients' angles, once for the chunk.
    angles = table[:, [2, _SHAPE_FILL + 6]]
    trig = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)  # cos a, cos f, sin a, sin f
    reach_y, reach_x = _reaches(table, trig, kinds, half)
    top, bottom = _spans(table[:, 1], reach_y, half, h)
    left, right = _spans(table[:, 0], reach_x, half, w)
    heights, widths = (bottom - top).tolist(), (right - left).tolist()
    layers: dict[tuple[int, int], _Layer] = {}
    for group in _groups(kinds.tolist(), heights, widths):
        bh, bw = max(heights[i] for i in group), max(widths[i] for i in group)
        index = np.array(group)
        rows = np.minimum(top[index], h - bh)
        cols = np.minimum(left[index], w - bw)
        keep, fill = _evaluate_shapes(
            table[index],
            trig[index],
            int(kinds[group[0]]),
            x[cols[:, None] + np.arange(bw)],
            y[rows[:, None] + np.arange(bh)],
            half,
        )
        for j, i in enumerate(group):
            layers[owners[i]] = (int(rows[j]), int(cols[j]), keep[j], fill[j])
    return layers


def _evaluate_shapes(
    table: np.ndarray, trig: np.ndarray, kind: int, xs: np.ndarray, ys: np.ndarray, half: float
) -> tuple[np.ndarray, np.ndarray]:
    """Shapes of one kind on boxes with pixel-centre coordinates ``xs`` (g, bw), ``ys``
    (g, bh): ``1 - opacity * coverage`` (g, bh, bw) and ``fill * (opacity * coverage)``
    (g, 3, bh, bw), with coverage ``clip(0.5 - distance * half, 0, 1)``."""
    cx, cy, _, p, q, opacity = (table[:, c, None, None] for c in range(6))
    cos, sin = trig[:, 0, None, None], trig[:, 2, None, None]
    dx, dy = xs[:, None, :] - cx, ys[:, :, None] - cy
    u = dx * cos + dy * sin
    v = -dx * sin + dy * cos
    distance = np.empty(u.shape)
    if kind == _ELLIPSE:  # (sqrt((u / a)^2 + (v / b)^2) - 1) * min(a, b)
        np.divide(u, p, out=distance)
        np.square(distance, out=distance)
        np.add(distance, np.square(v / q), out=distance)
        np.sqrt(distance, out=distance)
        np.subtract(distance, 1.0, out=distance)
        np.multiply(distance, np.minimum(p, q), out=distance)
    elif kind == _RECTANGLE:  # max(|u| - a, |v| - b)
        np.abs(u, out=distance)
        np.subtract(distance, p, out=distance)
        np.maximum(distance, np.abs(v) - q, out=distance)
    else:  # segment: |(u - clip(u, -length, length), v)| - thickness / 2
        np.maximum(u, -p, out=distance)
        np.minimum(distance, p, out=distance)
        np.subtract(u, distance, out=distance)
        np.square(distance, out=distance)
        np.add(distance, np.square(v), out=distance)
        np.sqrt(distance, out=distance)
        np.subtract(distance, q / 2.0, out=distance)
    weight = distance  # becomes opacity * coverage, in place
    np.multiply(weight, half, out=weight)
    np.subtract(0.5, weight, out=weight)
    np.maximum(weight, 0.0, out=weight)
    np.minimum(weight, 1.0, out=weight)
    np.multiply(opacity, weight, out=weight)
    keep = np.subtract(1.0, weight)
    fill = np.empty((len(table), 3, *u.shape[1:]))
    _ramp_into(fill, u, xs, ys, table[:, _SHAPE_FILL:], trig[:, 1], trig[:, 3])
    np.multiply(fill, weight[:, None], out=fill)
    return keep, fill


def _reaches(
    table: np.ndarray, trig: np.ndarray, kinds: np.ndarray, half: float
) -> tuple[np.ndarray, np.ndarray]:
    """Half height and half width (coordinate units) of axis-aligned boxes outside which each
    shape's coverage is exactly 0.

    Coverage is non-zero where ``distance < 0.5 / half`` (half a pixel); a margin of
    :data:`_BOX_MARGIN_PX` more keeps the box safe from rounding. In the shape's frame the
    support lies in ``|u| < A, |v| < B``, which rotates into ``|dx| < A|cos| + B|sin|``,
    ``|dy| < A|sin| + B|cos|``.
    """
    reach = (0.5 + _BOX_MARGIN_PX) / half
    p, q = table[:, 3], table[:, 4]
    scale = 1.0 + reach / np.minimum(p, q)  # ellipse: sqrt((u/a)^2 + (v/b)^2) < scale
    a = np.where(kinds == _ELLIPSE, p * scale, np.where(kinds == _RECTANGLE, p, p + q / 2) + reach)
    b = np.where(kinds == _ELLIPSE, q * scale, np.where(kinds == _RECTANGLE, q, q / 2) + reach)
    cos, sin = np.abs(trig[:, 0]), np.abs(trig[:, 2])
    return a * sin + b * cos, a * cos + b * sin


def _spans(
    centres: np.ndarray, reaches: np.ndarray, half: float, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last pixel (clamped to ``0 .. size``, at least one pixel) whose centre
    is within ``reaches`` of ``centres``; pixel i's centre is at ``(i + 0.5 - size / 2) / half``."""
    first = np.floor((centres - reaches) * half + (size / 2.0 - 0.5)).astype(np.intp)
    last = np.ceil((centres + reaches) * half + (size / 2.0 - 0.5)).astype(np.intp)
    start = np.clip(first, 0, size - 1)
    return start, np.maximum(np.minimum(last + 1, size), start + 1)


def _groups(kinds: list[int], heights: list[int], widths: list[int]) -> list[list[int]]:
    """Shape indices grouped by kind, and by box size so that padding every box of a group to
    its largest height and width costs at most :data:`_BOX_SLACK` times the boxes' own area."""
    groups: list[list[int]] = []
    for kind in (_ELLIPSE, _RECTANGLE, _SEGMENT):
        order = sorted(
            (i for i, k in enumerate(kinds) if k == kind), key=lambda i: -heights[i] * widths[i]
        )
        group: list[int] = []
        bh = bw = area = 0
        for i in order:
            grown_h, grown_w = max(bh, heights[i]), max(bw, widths[i])
            own = area + heights[i] * widths[i]
            if group and grown_h * grown_w * (len(group) + 1) > _BOX_SLACK * own:
                groups.append(group)
                group, grown_h, grown_w, own = [], heights[i], widths[i], heights[i] * widths[i]
            group.append(i)
            bh, bw, area = grown_h, grown_w, own
        if group:
            groups.append(group)
    return groups
