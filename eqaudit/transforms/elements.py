"""Transform elements: how one group element acts on images and on feature maps.

Conventions (all elements):

* Tensors are ``(B, C, H, W)``; row index ``i`` grows downwards, column index ``j`` to the right.
* Images arrive in *pixel space* (values in [0, 1], before normalisation) at the model input size
  plus a margin ``m`` on every side, ``(B, C, H + 2m, W + 2m)``; the identity is the central crop.
  The margin lets a crop-shift cut real image content instead of inventing a border.
* ``rot90`` is counter-clockwise, as ``torch.rot90(x, 1, (-2, -1))``; ``flip_h`` mirrors left-right.
  A D4 element is stored as ``(k, flip)`` meaning ``rot90^k(flip_h^flip(x))``, so
  ``transpose = rot90 . flip_h``, ``flip_v = rot180 . flip_h``, ``antitranspose = rot270 . flip_h``.
* A shift by ``(dy, dx)`` moves content down by ``dy`` and right by ``dx``:
  ``out[i, j] = in[i - dy, j - dx]``.
* A rotation by ``angle`` degrees is counter-clockwise (same sense as rot90), about the true centre
  ``((H - 1) / 2, (W - 1) / 2)`` of the pixel grid, cubic convolution (Keys, Catmull-Rom),
  zero fill outside the source.
* Resampled images are not clipped to [0, 1]: the overshoot of bicubic or band-limited
  interpolation is part of the resampled signal, and clipping it would be a non-linear distortion
  that the feature-map action does not have (a linear model would no longer commute with the
  transform). Thumbnails clip for display only.

An element's action on a feature map of cumulative stride ``s`` is the same geometric operation on
the map's own grid (identity on channels): a shift of ``k`` pixels is ``k / s`` cells, measurable
exactly only when ``s`` divides ``k``. :meth:`Transform.feature_action` returns the transformed
map with the mask of cells where the comparison is defined, or raises :class:`NotMeasurable`.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from eqaudit.metrics.functional import relative_error


def _about_centre(linear: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A, t)`` of the linear map ``A`` applied about the grid centre ``c``: ``t = c - A c``."""
    centre = np.array([(height - 1) / 2, (width - 1) / 2])
    return linear, centre - linear @ centre


class NotMeasurable(Exception):
    """The element has no exact (or meaningful) action on this feature map; the reason says why."""


@dataclass(frozen=True)
class FeatureAction:
    """``T'_g h``: the transformed map and the cells (``(1, 1, H, W)`` bool) where it is defined."""

    transformed: torch.Tensor
    mask: torch.Tensor | None = None  # None: every cell


def center_crop(x: torch.Tensor, margin: int) -> torch.Tensor:
    """Remove ``margin`` pixels from every side of ``(..., H, W)``."""
    if margin == 0:
        return x
    return x[..., margin:-margin, margin:-margin]


def _disk_mask(
    height: int, width: int, fraction: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Cells whose centre lies within ``fraction`` of the inscribed radius of the grid centre."""
    cy, cx = (height - 1) / 2, (width - 1) / 2
    radius = fraction * (min(height, width) - 1) / 2
    ii = torch.arange(height, dtype=torch.float64, device=device)[:, None] - cy
    jj = torch.arange(width, dtype=torch.float64, device=device)[None, :] - cx
    return ((ii**2 + jj**2) <= radius**2)[None, None]


class Transform:
    """Base class of one transform element (see the module docstring for conventions)."""

    name: str = "?"
    family: str = "?"
    #: True when the element maps the pixel grid onto itself (no resampling).
    exact: bool = True

    def margin(self) -> int:
        """Source margin this element needs (pixels on each side)."""
        return 0

    def skip_reason(self, height: int, width: int) -> str | None:
        """Why this element cannot be applied to a model input of this size, or None."""
        return None

    def apply_image(self, source: torch.Tensor, margin: int) -> torch.Tensor:
        raise NotImplementedError

    def feature_action(
        self, fmap: torch.Tensor, stride: tuple[float, float] | None
    ) -> FeatureAction:
        raise NotImplementedError

    @property
    def is_identity(self) -> bool:
        return False

    def image_floor(self, identity: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor | None:
        """Interpolation floor per image: relative error of ``T_g^-1 T_g x`` against ``x``
        (None for exact elements). Reported beside the scores so that resampling loss is not
        blamed on the model."""
        return None

    def feature_floor(self, fmap: torch.Tensor) -> torch.Tensor | None:
        """The same floor for the element's action on a feature map (compared where defined)."""
        return None

    def point_map(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Where the element moves content, in input pixel coordinates ``p = (y, x)`` (pixel
        centres at integers): content at ``p`` ends up at ``A @ p + t``. Returns ``(A, t)``.
        The feature-map action on any sampling grid follows from it (:mod:`.geometry`)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"name": self.name, "family": self.family, "exact": self.exact}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


# --------------------------------------------------------------------------------------------
# D4: exact rotations by multiples of 90 degrees and reflections
# --------------------------------------------------------------------------------------------

D4_NAMES = {
    (0, False): "id",
    (1, False): "rot90",
    (2, False): "rot180",
    (3, False): "rot270",
    (0, True): "flip_h",
    (1, True): "transpose",
    (2, True): "flip_v",
    (3, True): "antitranspose",
}
D4_BY_NAME = {name: key for key, name in D4_NAMES.items()}


def d4_apply(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """``rot90^k(flip_h^flip(x))`` on the last two axes (exact, no resampling)."""
    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x


def d4_cell_index(
    elements: list[D4Element], height: int, width: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``(G, height width)`` int64: row ``g`` the cells of a flattened ``height x width`` map
    that ``elements[g]`` reads (:func:`d4_apply` of the cell numbers), to move a map under every
    element with one gather."""
    cells = torch.arange(height * width, device=device).view(1, 1, height, width)
    return torch.stack([d4_apply(cells, e.k, e.flip).flatten() for e in elements])


def d4_view(x: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """:func:`d4_apply` on a numpy array, as a view: negative strides rotate and flip without
    copying (torch tensors cannot)."""
    if flip:
        x = x[..., ::-1]
    return np.rot90(x, k, axes=(-2, -1))


class D4Element(Transform):
    """An element of the dihedral group of the square."""

    family = "d4"

    def __init__(self, k: int, flip: bool) -> None:
        self.k = k % 4
        self.flip = bool(flip)
        self.name = D4_NAMES[(self.k, self.flip)]

    @classmethod
    def named(cls, name: str) -> D4Element:
        return cls(*D4_BY_NAME[name])

    @property
    def is_identity(self) -> bool:
        return self.k == 0 and not self.flip

    def compose(self, other: D4Element) -> D4Element:
        """``self . other`` (apply ``other`` first)."""
        # flip_h . rot90^k = rot90^-k . flip_h, so r^a f^p . r^b f^q = r^(a + (-1)^p b) f^(p xor q)
        k = self.k + (-other.k if self.flip else other.k)
        return D4Element(k, self.flip != other.flip)

    def inverse(self) -> D4Element:
        return D4Element(self.k if self.flip else -self.k, self.flip)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, D4Element) and (self.k, self.flip) == (other.k, other.flip)

    def __hash__(self) -> int:
        return hash((self.k, self.flip))

    def _swaps_axes(self) -> bool:
        return self.k % 2 == 1

    def skip_reason(self, height: int, width: int) -> str | None:
        if self._swaps_axes() and height != width:
            return (
                f"{self.name} maps a {height}x{width} input to {width}x{height}; "
                "it is defined only for square inputs"
            )
        return None

    def apply_image(self, source: torch.Tensor, margin: int) -> torch.Tensor:
        return d4_apply(center_crop(source, margin), self.k, self.flip)

    def point_map(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        # In (y, x) with y down: flip_h sends (y, x) to (y, -x); rot90 (counter-clockwise on
        # screen, torch.rot90) sends (y, x) to (-x, y), both about the centre.
        linear = np.array([[1.0, 0.0], [0.0, -1.0]]) if self.flip else np.eye(2)
        turn = np.array([[0.0, -1.0], [1.0, 0.0]])
        for _ in range(self.k):
            linear = turn @ linear
        return _about_centre(linear, height, width)

    def feature_action(
        self, fmap: torch.Tensor, stride: tuple[float, float] | None
    ) -> FeatureAction:
        height, width = fmap.shape[-2:]
        if self._swaps_axes() and height != width:
            raise NotMeasurable(f"feature map is {height}x{width}, not square")
        return FeatureAction(d4_apply(fmap, self.k, self.flip))


# --------------------------------------------------------------------------------------------
# Translations
# --------------------------------------------------------------------------------------------

SHIFT_MODES = ("crop", "circular", "zero", "reflect")


def _fmt(value: float) -> str:
    return f"{value:+g}"


def fourier_shift(x: torch.Tensor, dy: float, dx: float) -> torch.Tensor:
    """Band-limited circular shift of ``(..., H, W)`` by a (possibly fractional) amount.

    For integer shifts of real input this equals ``torch.roll`` up to float rounding. The Nyquist
    bin of an even axis is shifted by its real part only, which keeps the output real.
    """
    height, width = x.shape[-2:]
    fy = torch.fft.fftfreq(height, dtype=torch.float64, device=x.device)
    fx = torch.fft.rfftfreq(width, dtype=torch.float64, device=x.device)
    # Separable phase ramp. A Nyquist bin (even axis) has no sign of its own: keeping only the
    # real part of its factor keeps the output real, and is exact for integer shifts.
    py = torch.exp(-2j * math.pi * fy * dy)
    px = torch.exp(-2j * math.pi * fx * dx)
    # (Tensors, not .item(): on a GPU a read back to the host would wait for the device.)
    if height % 2 == 0:
        py[height // 2] = py[height // 2].real.clone()
    if width % 2 == 0:
        px[-1] = px[-1].real.clone()
    phase = py[:, None] * px[None, :]
    spectrum = torch.fft.rfft2(x.to(torch.float64))
    return torch.fft.irfft2(spectrum * phase, s=(height, width)).to(x.dtype)


def _integer_shift(
    x: torch.Tensor, dy: int, dx: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift ``(B, C, H, W)`` by integers; return the shifted map and its validity mask."""
    height, width = x.shape[-2:]
    rolled = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    mask = torch.ones(1, 1, height, width, dtype=torch.bool, device=x.device)
    if mode == "circular":
        return rolled, mask
    # Cells that wrapped around are not defined by the shift itself.
    if dy > 0:
        mask[..., :dy, :] = False
    elif dy < 0:
        mask[..., dy:, :] = False
    if dx > 0:
        mask[..., :, :dx] = False
    elif dx < 0:
        mask[..., :, dx:] = False
    if mode == "zero":
        return rolled * mask.to(x.dtype), mask
    if mode == "reflect":
        py, px = abs(dy), abs(dx)
        padded = F.pad(x, (px, px, py, py), mode="reflect") if py or px else x
        return padded[..., py - dy : py - dy + height, px - dx : px - dx + width], mask
    return rolled * mask.to(x.dtype), mask  # crop: content outside is compared only where valid


class Shift(Transform):
    """Translation by ``(dy, dx)`` pixels (see module conventions)."""

    family = "shift"

    def __init__(self, dy: float, dx: float, mode: str = "crop") -> None:
        if mode not in SHIFT_MODES:
            raise ValueError(mode)
        self.dy, self.dx, self.mode = dy, dx, mode
        self.integer = float(dy).is_integer() and float(dx).is_integer()
        self.exact = self.integer
        axis = (
            f"x{_fmt(dx)}" if dy == 0 else f"y{_fmt(dy)}" if dx == 0 else f"{_fmt(dy)},{_fmt(dx)}"
        )
        suffix = "" if self.integer else "_fourier"
        self.name = f"shift_{axis}{suffix}"

    def margin(self) -> int:
        if self.mode == "crop" and self.integer:
            return int(max(abs(self.dy), abs(self.dx)))
        return 0

    def skip_reason(self, height: int, width: int) -> str | None:
        # A shift by the whole input or more leaves nothing to compare (and a crop-shift would
        # need a source image that many pixels larger on every side).
        if abs(self.dy) >= height or abs(self.dx) >= width:
            return (
                f"a shift of ({self.dy:g}, {self.dx:g}) px moves the whole {height}x{width} "
                "input out of view"
            )
        return None

    def apply_image(self, source: torch.Tensor, margin: int) -> torch.Tensor:
        if not self.integer:
            return fourier_shift(center_crop(source, margin), self.dy, self.dx)
        dy, dx = int(self.dy), int(self.dx)
        if self.mode == "crop":
            height = source.shape[-2] - 2 * margin
            width = source.shape[-1] - 2 * margin
            top, left = margin - dy, margin - dx
            return source[..., top : top + height, left : left + width]
        return _integer_shift(center_crop(source, margin), dy, dx, self.mode)[0]

    def feature_action(
        self, fmap: torch.Tensor, stride: tuple[float, float] | None
    ) -> FeatureAction:
        if stride is None:
            raise NotMeasurable("the layer's stride is unknown")
        cy, cx = self.dy / stride[0], self.dx / stride[1]
        if not self.integer:
            return FeatureAction(fourier_shift(fmap, cy, cx))
        if not (float(cy).is_integer() and float(cx).is_integer()):
            raise NotMeasurable(
                f"a shift of ({self.dy:g}, {self.dx:g}) px is ({cy:g}, {cx:g}) cells at stride "
                f"({stride[0]:g}, {stride[1]:g}): no exact comparison exists"
            )
        shifted, mask = _integer_shift(fmap, int(cy), int(cx), self.mode)
        return FeatureAction(shifted, None if self.mode == "circular" else mask)

    def point_map(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        return np.eye(2), np.array([float(self.dy), float(self.dx)])

    def image_floor(self, identity: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor | None:
        if self.integer:
            return None
        return relative_error(fourier_shift(transformed, -self.dy, -self.dx), identity)

    def feature_floor(self, fmap: torch.Tensor) -> torch.Tensor | None:
        if self.integer:
            return None
        there = fourier_shift(fmap, self.dy, self.dx)
        return relative_error(fourier_shift(there, -self.dy, -self.dx), fmap)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "dy": self.dy, "dx": self.dx, "mode": self.mode}


# --------------------------------------------------------------------------------------------
# Rotations by arbitrary angles (resampled)
# --------------------------------------------------------------------------------------------

#: Comparisons of resampled elements are made inside this fraction of the inscribed disk.
DISK_FRACTION = 0.8


#: Keys' cubic-convolution parameter. -0.5 (Catmull-Rom) is the third-order accurate choice: it
#: reproduces quadratics, and its slope at a pixel centre is the central difference. (torch's
#: bicubic ``grid_sample`` uses -0.75, which reproduces only constants: on a ramp it moves values
#: 1.5 times too fast under an infinitesimal rotation.)
CUBIC_A = -0.5


def _keys_weights(t: torch.Tensor) -> list[torch.Tensor]:
    """Weights of the taps at offsets -1, 0, 1, 2 for fractional positions ``t`` in [0, 1)."""
    a = CUBIC_A

    def kernel(d: torch.Tensor) -> torch.Tensor:
        d = d.abs()
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))

    return [kernel(t + 1), kernel(t), kernel(1 - t), kernel(2 - t)]


def cubic_sample(
    x: torch.Tensor,
    src_y: torch.Tensor,
    src_x: torch.Tensor,
    operator: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample ``(B, C, H, W)`` at fractional pixel positions ``(src_y, src_x)`` (each ``(h, w)``,
    shared by the batch) with Keys cubic convolution (:data:`CUBIC_A`), zero outside the grid.

    Convention: pixel centres at integer coordinates; a position on a centre returns that pixel.

    ``operator``: :func:`cubic_operator` of the same positions, for a CPU map of its dtype: a
    sparse product per image instead of 16 gathers and multiply-adds over the maps (5-10x faster
    on the CPU; the same taps and weights, the sums rounded within a few ulps of the gathers').
    Per image: the last bits of a sparse product depend on how many columns it has, and an
    image's samples must not depend on the batch it came in (shards merge bit for bit).
    """
    height, width = x.shape[-2:]
    lead = x.shape[:-2]
    if operator is not None and x.device.type == "cpu" and x.dtype == operator.dtype:
        images = x.reshape(lead[0] if lead else 1, -1, height * width)
        out = torch.empty((*images.shape[:2], operator.shape[0]), dtype=x.dtype)
        for image, samples in zip(images, out, strict=True):
            samples.copy_((operator @ image.T).T)
        return out.reshape(*lead, *src_y.shape)
    pad = 2
    flat = F.pad(x, (pad, pad, pad, pad)).reshape(-1, (height + 2 * pad) * (width + 2 * pad))
    src_y = src_y.to(device=x.device, dtype=torch.float64)
    src_x = src_x.to(device=x.device, dtype=torch.float64)
    y0, x0 = torch.floor(src_y), torch.floor(src_x)
    wy = [w.to(x.dtype).reshape(1, -1) for w in _keys_weights(src_y - y0)]
    wx = [w.to(x.dtype).reshape(1, -1) for w in _keys_weights(src_x - x0)]
    # Taps beyond the padding read the (zero) padding: the image is zero outside.
    rows = [(y0 + k + pad).clamp(0, height + 2 * pad - 1).long() for k in (-1, 0, 1, 2)]
    cols = [(x0 + k + pad).clamp(0, width + 2 * pad - 1).long() for k in (-1, 0, 1, 2)]
    stride = width + 2 * pad
    out = torch.zeros(flat.shape[0], src_y.numel(), dtype=x.dtype, device=x.device)
    for row, weight_y in zip(rows, wy, strict=True):
        for col, weight_x in zip(cols, wx, strict=True):
            taps = flat.index_select(1, (row * stride + col).reshape(-1))
            out.addcmul_(taps, weight_y * weight_x)
    return out.reshape(*lead, *src_y.shape)


def cubic_operator(
    src_y: torch.Tensor | np.ndarray,
    src_x: torch.Tensor | np.ndarray,
    height: int,
    width: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """:func:`cubic_sample` at these positions on a ``height x width`` grid as a sparse CSR
    matrix ``(h w, H W)`` (CPU, ``dtype``): each output cell's 16 taps that fall on the grid,
    weighted as :func:`cubic_sample` weights them (the product of the two axes' weights, each
    rounded to ``dtype``), in row-major order. None for a dtype sparse products do not take on
    the CPU (half precision: the gathers serve)."""
    if dtype not in (torch.float32, torch.float64):
        return None
    src_y = torch.as_tensor(src_y, dtype=torch.float64).reshape(-1)
    src_x = torch.as_tensor(src_x, dtype=torch.float64).reshape(-1)
    y0, x0 = torch.floor(src_y), torch.floor(src_x)
    wy, wx = _keys_weights(src_y - y0), _keys_weights(src_x - x0)
    cells = torch.arange(src_y.numel())
    rows, cols, values = [], [], []
    for ky, weight_y in zip((-1, 0, 1, 2), wy, strict=True):
        for kx, weight_x in zip((-1, 0, 1, 2), wx, strict=True):
            r, c = (y0 + ky).long(), (x0 + kx).long()
            on = (r >= 0) & (r < height) & (c >= 0) & (c < width)
            rows.append(cells[on])
            cols.append((r * width + c)[on])
            values.append((weight_y.to(dtype) * weight_x.to(dtype))[on])
    row, col, value = torch.cat(rows), torch.cat(cols), torch.cat(values)
    order = torch.argsort(row * (height * width) + col)  # row-major: each cell's taps in order
    counts = torch.bincount(row, minlength=src_y.numel())
    crow = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    with warnings.catch_warnings():  # ("sparse CSR support is in beta")
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, col[order], value[order], (src_y.numel(), height * width), check_invariants=False
        )


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate ``(B, C, H, W)`` counter-clockwise about the grid centre; cubic (Keys, Catmull-Rom),
    zero fill."""
    height, width = x.shape[-2:]
    theta = math.radians(degrees)
    src_y, src_x = _rotation_sources(height, width, theta, x.device)
    operator = rotation_operator(height, width, theta, x.dtype) if x.device.type == "cpu" else None
    return cubic_sample(x, src_y, src_x, operator)


def _rotation_sources(
    height: int, width: int, theta: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input positions ``(src_y, src_x)`` that :func:`rotate` samples for each pixel."""
    cos, sin = math.cos(theta), math.sin(theta)
    # Output pixel (i, j) samples the input at R(-theta) applied to its offset from the centre.
    # Pixel units, with y pointing down: a counter-clockwise turn on screen is clockwise in (x, y).
    cy, cx = (height - 1) / 2, (width - 1) / 2
    ii = torch.arange(height, dtype=torch.float64, device=device)[:, None] - cy
    jj = torch.arange(width, dtype=torch.float64, device=device)[None, :] - cx
    src_x = (cos * jj - sin * ii + cx).expand(height, width)
    src_y = (sin * jj + cos * ii + cy).expand(height, width)
    return src_y, src_x


@functools.lru_cache(maxsize=8)
def rotation_operator(
    height: int, width: int, theta: float, dtype: torch.dtype
) -> torch.Tensor | None:
    """:func:`cubic_operator` of :func:`rotate`'s positions, made once per size and angle (an
    audit clears the cache when it ends: ``rotation_operator.cache_clear()``)."""
    return cubic_operator(*_rotation_sources(height, width, theta), height, width, dtype)


class Rotation(Transform):
    """Rotation by an arbitrary angle; resampled, so compared inside a central disk."""

    family = "rot"
    exact = False

    def __init__(self, degrees: float) -> None:
        self.degrees = float(degrees)
        self.name = f"rot{self.degrees:g}"

    def apply_image(self, source: torch.Tensor, margin: int) -> torch.Tensor:
        # Rotating the larger source fills the corners with real content when a margin exists.
        return center_crop(rotate(source, self.degrees), margin)

    def inverse(self) -> Rotation:
        return Rotation(-self.degrees)

    def point_map(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        theta = math.radians(self.degrees)
        cos, sin = math.cos(theta), math.sin(theta)
        # Counter-clockwise on screen is (y, x) -> (cos y - sin x, sin y + cos x): rot90 at 90.
        return _about_centre(np.array([[cos, -sin], [sin, cos]]), height, width)

    def feature_action(
        self, fmap: torch.Tensor, stride: tuple[float, float] | None
    ) -> FeatureAction:
        height, width = fmap.shape[-2:]
        if min(height, width) < 5:
            raise NotMeasurable(f"feature map {height}x{width} is too small to resample")
        return FeatureAction(
            rotate(fmap, self.degrees), _disk_mask(height, width, DISK_FRACTION, fmap.device)
        )

    def image_floor(self, identity: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor | None:
        height, width = identity.shape[-2:]
        back = rotate(transformed, -self.degrees)
        mask = _disk_mask(height, width, DISK_FRACTION, identity.device)
        return relative_error(back, identity, mask)

    def feature_floor(self, fmap: torch.Tensor) -> torch.Tensor | None:
        height, width = fmap.shape[-2:]
        if min(height, width) < 5:
            return None
        back = rotate(rotate(fmap, self.degrees), -self.degrees)
        return relative_error(back, fmap, _disk_mask(height, width, DISK_FRACTION, fmap.device))

    def to_dict(self) -> dict:
        return {**super().to_dict(), "degrees": self.degrees}
