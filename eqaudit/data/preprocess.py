"""Pixel-space preprocessing: decoding to floats, channel conversion, resizing, normalisation.

Conventions
-----------
* **Pixel space** is float32 in [0, 1], channels RGB (3) or gray (1). Transforms act here, so a
  zero fill means black; the model's own normalisation (:class:`Preprocessing`) comes after.
* Arrays inside this module are ``(H, W, C)`` float32 (the layout Pillow and numpy share);
  tensors handed out are ``(C, H, W)`` (one image) or ``(B, C, H, W)`` (a batch).
* Transparency is composited onto **black** (``rgb * alpha``), the same black a rotation fills
  with, so hidden colours under transparent pixels never reach the model.
* Gray from colour uses the ITU-R BT.601 luma weights (those Pillow's ``convert("L")`` uses),
  computed in float so no precision is lost to 8-bit rounding.
* Resizing is done in float with Pillow's antialiased bicubic filter, per channel (mode ``"F"``),
  whatever the source (file or array), so the same picture gives the same pixels either way.
  An image that already has the target size is passed through untouched (bit-exact).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from eqaudit.errors import UsageError

RESIZE_POLICIES: tuple[str, ...] = ("crop", "center", "stretch", "letterbox")
CHANNEL_ORDERS: tuple[str, ...] = ("rgb", "bgr", "gray")

#: ITU-R BT.601 luma weights for R, G, B.
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)

PRESETS: dict[str, dict] = {
    "imagenet": {
        "channels": "rgb",
        "scale": 1.0,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    },
    "caffe": {
        "channels": "bgr",
        "scale": 255.0,
        "mean": (103.939, 116.779, 123.68),
        "std": (1.0, 1.0, 1.0),
    },
    "inception": {"channels": "rgb", "scale": 1.0, "mean": (0.5,), "std": (0.5,)},
    "unit": {"channels": "rgb", "scale": 1.0, "mean": (0.0,), "std": (1.0,)},
    "raw255": {"channels": "rgb", "scale": 255.0, "mean": (0.0,), "std": (1.0,)},
}

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "F"}) | _SIXTEEN_BIT_MODES
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


# -- model-side normalisation ---------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocessing:
    """How pixel-space images become the model's input.

    ``normalise`` computes ``(reorder(x) * scale - mean) / std`` per channel, where ``reorder``
    flips RGB to BGR when ``channels == "bgr"``. ``mean`` and ``std`` are in the scaled units and
    in the *model's* channel order; a single value broadcasts over channels. ``resize`` is the
    policy used to bring source images to the model's size (see :func:`plan_resize`).
    """

    resize: str = "crop"
    channels: str = "rgb"
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    preset: str | None = None

    def __post_init__(self) -> None:
        _check_choice("resize policy", self.resize, RESIZE_POLICIES)
        _check_choice("channel order", self.channels, CHANNEL_ORDERS)
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise UsageError(
                f"--scale must be a positive number (1 for 0-1 inputs, 255 for 0-255), not {self.scale}"
            )
        mean = _float_tuple("mean", self.mean)
        std = _float_tuple("std", self.std)
        for name, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, self.pixel_channels):
                raise UsageError(
                    f"--{name} has {len(values)} values but channel order '{self.channels}' has "
                    f"{self.pixel_channels} channel(s): give 1 value or {self.pixel_channels}"
                )
        if any(s <= 0 for s in std):
            raise UsageError(
                f"--std values must be positive (pixels are divided by them), not {','.join(map(str, std))}"
            )
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def pixel_channels(self) -> int:
        """Channels in pixel space: 1 for a gray model, else 3 (RGB)."""
        return 1 if self.channels == "gray" else 3

    def normalise(self, pixels: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``(B, C, H, W)`` pixel-space batch (RGB or gray, [0, 1]) -> model input, NCHW float32.

        ``inplace``: overwrite ``pixels`` (a float32 batch the caller owns) instead of allocating
        the result; the same operations in the same order, so the same values."""
        if pixels.ndim != 4 or pixels.shape[1] != self.pixel_channels:
            raise ValueError(
                f"expected pixels (B, {self.pixel_channels}, H, W), got {tuple(pixels.shape)}"
            )
        x = pixels.to(torch.float32)
        if self.channels == "bgr":
            x = x.flip(1)
        mean, std = (channel_constant(v, x.device) for v in (self.mean, self.std))
        # x * 1.0 is x, bit for bit: the pass is skipped for the presets that do not scale.
        if inplace and x.data_ptr() == pixels.data_ptr():
            return (x.mul_(self.scale) if self.scale != 1.0 else x).sub_(mean).div_(std)
        return ((x * self.scale if self.scale != 1.0 else x) - mean) / std

    def to_dict(self) -> dict:
        return {
            "preset": self.preset,
            "resize": self.resize,
            "channels": self.channels,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@functools.lru_cache(maxsize=16)
def channel_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``values`` as a ``(1, C, 1, 1)`` float32 tensor on ``device``, made once: a small tensor
    built from a list on a GPU is a copy that waits for all the work queued on the device."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def make_preprocessing(
    *,
    preset: str | None = None,
    channels: str | None = None,
    scale: float | None = None,
    mean: tuple[float, ...] | list[float] | float | None = None,
    std: tuple[float, ...] | list[float] | float | None = None,
    resize: str | None = None,
) -> Preprocessing:
    """A :class:`Preprocessing` from a preset, with every explicit value overriding the preset's.

    Without a preset the defaults are those of ``"unit"`` (RGB, [0, 1], no mean/std).
    Raises :class:`~eqaudit.errors.UsageError` for unknown names or inconsistent values.
    """
    base: dict = {}
    if preset is not None:
        preset = preset.strip().lower()
        _check_choice("preset", preset, tuple(PRESETS))
        base = dict(PRESETS[preset])
    overrides = {
        "channels": channels.strip().lower() if channels is not None else None,
        "scale": scale,
        "mean": _as_tuple(mean),
        "std": _as_tuple(std),
        "resize": resize.strip().lower() if resize is not None else None,
    }
    base.update({key: value for key, value in overrides.items() if value is not None})
    return Preprocessing(preset=preset, **base)


def parse_floats(text: str, name: str = "value") -> tuple[float, ...]:
    """``"0.485,0.456,0.406"`` -> ``(0.485, 0.456, 0.406)``; commas and/or spaces separate.

    Surrounding brackets are allowed. Non-numbers and non-finite values raise
    :class:`~eqaudit.errors.UsageError` naming the option (``name``).
    """
    parts = [p for p in re.split(r"[,\s]+", text.strip().strip("[]()")) if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(
            f"cannot read {name} '{text}' as numbers: give comma-separated numbers "
            "like 0.485,0.456,0.406"
        )
    return values


def _as_tuple(value: tuple[float, ...] | list[float] | float | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return (float(value),)
    return tuple(value)


def _float_tuple(name: str, values: tuple[float, ...]) -> tuple[float, ...]:
    try:
        result = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be numbers, got {values!r}") from None
    if not result or not all(math.isfinite(v) for v in result):
        raise UsageError(f"{name} must be one or more finite numbers, got {values!r}")
    return result


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UsageError(f"unknown {what} '{value}': choose one of {', '.join(sorted(valid))}")


# -- decoding and channels ------------------------------------------------------------------------
def is_gray_mode(image: Image.Image) -> bool:
    """Whether a Pillow image holds gray values (with or without alpha)."""
    return image.mode in _GRAY_MODES


def has_alpha(image: Image.Image) -> bool:
    """Whether a Pillow image carries transparency (an alpha band or a transparent colour)."""
    return image.mode in _ALPHA_MODES or (
        image.mode in ("P", "L", "RGB") and image.info.get("transparency") is not None
    )


def pil_to_array(image: Image.Image) -> np.ndarray:
    """A Pillow image as ``(H, W, C)`` float32 in [0, 1], C = 1 (gray) or 3 (RGB).

    16-bit modes (``I;16*``, and ``I``, which Pillow uses for 16-bit PNGs) are divided by 65535,
    8-bit modes by 255. ``F`` (a float TIFF) is read in the smallest of 0-1, 0-255 and 0-65535
    whose top its values exceed by at most half (clipped: a resampled image overshoots), a
    ValueError beyond, for NaN, or below -0.5: a 0-255 float image was clipped to white. Palette, CMYK, YCbCr ... go through Pillow's conversion to RGB. Transparency is
    composited onto black.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float32) / np.float32(65535.0)
        return np.clip(values, 0.0, 1.0)[..., None]
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        divisor = _float_divisor(values)
        return np.clip(values / np.float32(divisor), 0.0, 1.0)[..., None]
    if has_alpha(image):
        target = "LA" if mode in ("LA", "La", "L") else "RGBA"
        values = np.asarray(image.convert(target), dtype=np.float32) / np.float32(255.0)
        return composite_alpha(values)
    target = "L" if mode in ("1", "L") else "RGB"
    values = np.asarray(image.convert(target), dtype=np.float32) / np.float32(255.0)
    return values[..., None] if target == "L" else values


def check_pil_pixels(image: Image.Image) -> None:
    """Raise the ValueError :func:`pil_to_array` raises for ``image`` (decoded), without building
    its array: float (``F``) pixels outside the ranges it reads (their values are read; a float
    TIFF is rare). Every other image converts: each conversion it makes is defined for every
    mode Pillow opens."""
    if image.mode == "F":
        _float_divisor(np.asarray(image, dtype=np.float32))


def _float_divisor(values: np.ndarray) -> float:
    """What float pixel values are divided by to reach [0, 1]: the smallest of 1, 255 and 65535
    whose top they exceed by at most half (then clipped: a resampled image overshoots a little);
    a ValueError beyond, for NaN or an infinity, or for values below -0.5 (normalised data, not
    pixels)."""
    low, high = float(values.min()), float(values.max())
    divisor = next((d for d in (1.0, 255.0, 65535.0) if high <= 1.5 * d), math.inf)
    if not (math.isfinite(low) and math.isfinite(high)) or divisor == math.inf or low < -0.5:
        raise ValueError(
            f"float pixel values from {low:g} to {high:g}, not in 0-1, 0-255 or 0-65535"
        )
    return divisor


def composite_alpha(values: np.ndarray) -> np.ndarray:
    """``(..., C+1)`` with alpha last -> ``(..., C)`` composited onto black."""
    return values[..., :-1] * values[..., -1:]


def to_channels(values: np.ndarray, channels: int) -> np.ndarray:
    """``(H, W, 1|3)`` float32 -> ``(H, W, channels)``: gray is repeated, colour goes to luma."""
    have = values.shape[-1]
    if have == channels:
        return values
    if channels == 3 and have == 1:
        return np.repeat(values, 3, axis=-1)
    if channels == 1 and have == 3:
        weights = np.asarray(LUMA_WEIGHTS, dtype=np.float32)
        return np.clip(values @ weights, 0.0, 1.0)[..., None].astype(np.float32)
    raise ValueError(f"cannot convert {have} channels to {channels}")


# -- resizing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResizePlan:
    """How one image of ``source`` size reaches ``target`` size: resample, then crop or pad.

    ``resized`` is the size after resampling; ``offset`` is where the target window starts in the
    resized image (crop, offsets >= 0) or where the resized image starts in the target (letterbox,
    pad). Sizes are ``(H, W)``. The odd pixel of an uneven crop/pad goes to the bottom/right.
    """

    policy: str
    source: tuple[int, int]
    target: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]

    @property
    def resamples(self) -> bool:
        return self.resized != self.source

    @property
    def upscales(self) -> bool:
        """Whether any axis is enlarged (the source was smaller than needed)."""
        return self.resized[0] > self.source[0] or self.resized[1] > self.source[1]


def plan_resize(source_hw: tuple[int, int], target_hw: tuple[int, int], policy: str) -> ResizePlan:
    """The :class:`ResizePlan` for a policy.

    * ``"crop"``: scale (keeping aspect) so the short side fits, then take the centre window.
    * ``"center"``: take the centre window without resampling (the image is scaled up, as by
      ``"crop"``, only when it is smaller than the target): pixel-exact crops of larger images.
    * ``"stretch"``: resample to exactly the target size (aspect not kept).
    * ``"letterbox"``: scale (keeping aspect) to fit inside, centre it, pad with black.
    """
    _check_choice("resize policy", policy, RESIZE_POLICIES)
    (h, w), (th, tw) = source_hw, target_hw
    if policy == "stretch":
        return ResizePlan(policy, (h, w), (th, tw), (th, tw), (0, 0))
    if policy == "center" and h >= th and w >= tw:
        return ResizePlan(policy, (h, w), (th, tw), (h, w), ((h - th) // 2, (w - tw) // 2))
    if policy in ("crop", "center"):
        scale = max(th / h, tw / w)
        rh, rw = max(th, _round(h * scale)), max(tw, _round(w * scale))
        return ResizePlan(policy, (h, w), (th, tw), (rh, rw), ((rh - th) // 2, (rw - tw) // 2))
    scale = min(th / h, tw / w)
    rh, rw = min(th, max(1, _round(h * scale))), min(tw, max(1, _round(w * scale)))
    return ResizePlan(policy, (h, w), (th, tw), (rh, rw), ((th - rh) // 2, (tw - rw) // 2))


def resize_array(values: np.ndarray, size_hw: tuple[int, int], policy: str = "crop") -> np.ndarray:
    """``(..., H, W, C)`` float32 in [0, 1] -> ``(..., *size_hw, C)`` by a resize policy,
    clamped. Images that only need cropping or padding may come several at once (leading
    axes); a resampled one comes alone, ``(H, W, C)``."""
    plan = plan_resize(values.shape[-3:-1], size_hw, policy)
    resized = _resample(values, plan.resized) if plan.resamples else values
    (th, tw), (oy, ox), (rh, rw) = plan.target, plan.offset, plan.resized
    if policy == "letterbox":
        out = np.zeros((*values.shape[:-3], th, tw, values.shape[-1]), dtype=np.float32)
        out[..., oy : oy + rh, ox : ox + rw, :] = resized
        return out
    return np.ascontiguousarray(resized[..., oy : oy + th, ox : ox + tw, :], dtype=np.float32)


def resize_to(
    image: Image.Image | torch.Tensor, size_hw: tuple[int, int], policy: str = "crop"
) -> torch.Tensor:
    """A Pillow image or a ``(C, H, W)`` / ``(H, W)`` tensor in [0, 1] -> ``(C, *size_hw)`` float32.

    Pillow images are decoded with :func:`pil_to_array` (native channels kept). An input already
    at ``size_hw`` comes back bit-exact.
    """
    if isinstance(image, Image.Image):
        values = pil_to_array(image)
    else:
        tensor = image.detach().to("cpu", torch.float32)
        if tensor.ndim == 2:
            tensor = tensor[None]
        if tensor.ndim != 3:
            raise ValueError(f"expected a (C, H, W) or (H, W) tensor, got {tuple(image.shape)}")
        values = tensor.permute(1, 2, 0).numpy().copy()  # never alias the caller's tensor
    return array_to_tensor(resize_array(values, size_hw, policy))


def array_to_tensor(values: np.ndarray) -> torch.Tensor:
    """``(H, W, C)`` -> contiguous ``(C, H, W)`` float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1), dtype=np.float32))


def _resample(values: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    # Pillow's float ("F") resampling is antialiased when shrinking and keeps full precision.
    h, w = size_hw
    bands = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(values[..., c], dtype=np.float32)).resize(
                (w, h), Image.Resampling.BICUBIC
            )
        )
        for c in range(values.shape[-1])
    ]
    return np.clip(np.stack(bands, axis=-1), 0.0, 1.0).astype(np.float32)


def _round(x: float) -> int:
    # Round half up (Python's round() rounds half to even), with a guard for float noise.
    return math.floor(x + 0.5 + 1e-9)
