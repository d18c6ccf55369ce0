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
"""

from __future__ import annotations

import numpy as np
import torch

from eqaudit.data.preprocess import LUMA_WEIGHTS

_QUANT = 65535.0


def synthetic_images(
    n: int, size_hw: tuple[int, int], channels: int = 3, seed: int = 0, start: int = 0
) -> torch.Tensor:
    """Images ``start .. start+n-1`` of the synthetic set: ``(n, channels, H, W)`` in [0, 1].

    ``synthetic_images(n, ..., start=0)[k]`` equals ``synthetic_images(1, ..., start=k)[0]``.
    """
    if n < 0 or start < 0 or seed < 0:
        raise ValueError("n, start and seed must be non-negative")
    h, w = size_hw
    images = [synthetic_image(start + i, size_hw, channels, seed) for i in range(n)]
    if not images:
        return torch.zeros((0, channels, h, w), dtype=torch.float32)
    return torch.from_numpy(np.stack(images))


def synthetic_image(
    index: int, size_hw: tuple[int, int], channels: int = 3, seed: int = 0
) -> np.ndarray:
    """One synthetic image, ``(channels, H, W)`` float32 in [0, 1]; ``channels`` is 1 or 3."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    rng = np.random.default_rng([seed, index])
    h, w = size_hw
    half = max(h, w) / 2.0  # pixels per coordinate unit
    x = ((np.arange(w) + 0.5) - w / 2.0)[None, :] / half
    y = ((np.arange(h) + 0.5) - h / 2.0)[:, None] / half
    image = _gradient(rng, x, y)
    for _ in range(int(rng.integers(1, 3))):
        image = image + _grating(rng, x, y)
    for _ in range(int(rng.integers(3, 7))):
        coverage = _shape_coverage(rng, x, y, half)
        opacity = rng.uniform(0.75, 1.0)
        fill = _gradient(rng, x, y)
        image = image * (1.0 - opacity * coverage) + fill * (opacity * coverage)
    image = np.clip(image, 0.0, 1.0)
    if channels == 1:
        image = np.tensordot(np.asarray(LUMA_WEIGHTS), image, axes=(0, 0))[None]
    return (np.round(image * _QUANT) / _QUANT).astype(np.float32)


def _direction(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coordinate along a random direction, broadcast to ``(H, W)``."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    return x * np.cos(angle) + y * np.sin(angle)


def _gradient(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(3, H, W)`` linear ramp between two random colours along a random direction."""
    start, end = rng.uniform(0.05, 0.95, size=(2, 3, 1, 1))
    t = np.clip(0.5 + 0.5 * _direction(rng, x, y), 0.0, 1.0)[None]
    return start + (end - start) * t


def _grating(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(3, H, W)`` oriented sinusoid, 1-3.5 cycles across the image, coloured, zero-mean."""
    cycles = rng.uniform(1.0, 3.5)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    colour = rng.uniform(-1.0, 1.0, size=(3, 1, 1))
    colour = colour / max(np.abs(colour).max(), 1e-6) * rng.uniform(0.06, 0.16)
    return colour * np.sin(np.pi * cycles * _direction(rng, x, y) + phase)[None]


def _shape_coverage(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, half: float
) -> np.ndarray:
    """``(H, W)`` coverage in [0, 1] of a random ellipse, rotated rectangle or thick segment.

    Coverage is ``clip(0.5 - d, 0, 1)`` with ``d`` the (approximate) signed distance to the
    shape's edge in pixels: a one-pixel antialiased edge.
    """
    cx, cy = rng.uniform(-0.65, 0.65, size=2)
    angle = rng.uniform(0.0, np.pi)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    kind = int(rng.integers(0, 3))
    if kind == 0:  # ellipse
        a, b = rng.uniform(0.12, 0.45, size=2)
        distance = (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * min(a, b)
    elif kind == 1:  # rectangle
        a, b = rng.uniform(0.1, 0.4, size=2)
        distance = np.maximum(np.abs(u) - a, np.abs(v) - b)
    else:  # thick line segment along u
        length = rng.uniform(0.3, 0.9)
        thickness = rng.uniform(1.5, 4.0) / half
        along = np.clip(u, -length, length)
        distance = np.sqrt((u - along) ** 2 + v**2) - thickness / 2.0
    return np.clip(0.5 - distance * half, 0.0, 1.0)
