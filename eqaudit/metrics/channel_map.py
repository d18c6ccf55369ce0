"""Equivariance up to a fitted linear channel map (ridge regression), as a mergeable accumulator.

Why: DESIGN.md section 4 compares ``a = h(T_g x)`` with ``b = T'_g h(x)`` with the identity on
channels. A group-convolutional layer is equivariant with its channels *permuted* (a rotated input
moves each response to the channel of the rotated filter), so the naive error calls it broken. The
fitted mode asks instead: is there one linear 1x1 channel map ``W`` with ``a = W b``?

Definitions, for one layer and one element g:

- ``a``, ``b`` are ``(B, C, *spatial)`` (usually ``(B, C, H, W)``) with an optional bool cell mask
  broadcastable to ``(1, 1, *spatial)`` (the cells where the comparison is defined), or flat
  ``(B, C)``. Every kept cell (or flat row) is one sample of a pair of C-vectors ``(a_i, b_i)``.
- Each image belongs to the FIT or the EVAL half, given by the caller as a bool ``(B,)`` ``fit``
  mask (the engine uses the parity of the image's global index, so shards agree).
- Per half, the state is its second moments in float64: ``S_ab = sum a b^T``,
  ``S_bb = sum b b^T`` (C x C) and ``tr S_aa = sum ||a||^2``, plus image and cell counts. Sums merge
  exactly, so ``merge(first, second).compute() == whole.compute()`` up to float64 rounding.
- Fit (ridge regression, no bias): ``W = argmin sum_fit ||a - W b||^2 + lam ||W||_F^2
  = S_ab (S_bb + lam I)^-1`` with ``lam = ridge * tr(S_bb) / C`` (scale-free: ``ridge`` is a
  fraction of the mean eigenvalue of ``S_bb``, so rescaling the features changes nothing).
- Evaluate on the EVAL half from its moments alone:
  ``E = sum_eval ||a - W b||^2 = tr S_aa - 2 tr(W S_ba) + tr(W S_bb W^T)`` and
  ``fitted relative error = sqrt(E) / (sqrt(tr S_aa) + sqrt(tr(W S_bb W^T)))``: eqaudit's
  relative error ``||a - b|| / (||a|| + ||b||)`` with ``b`` replaced by ``W b``, pooled over all
  eval cells (one ratio of sums, not a mean of per-image ratios). The naive pooled error is the
  same formula with ``W = I`` on the same eval cells, reported beside it.

Reading the numbers: 0 is exact. Two unrelated maps of equal norm give naive ``sqrt(2)/2 ~ 0.71``
(no cross term), but *fitted* ``~1``: the best map from noise is ``W ~ 0``, so ``||W b||`` drops out
of the denominator. With ``c = C / fit_cells`` the overfit ``W`` of pure noise gives about
``sqrt(1 + c) / (1 + sqrt(c))`` (0.97 at c = 1e-3). So the fitted error can exceed the naive one
(a shrunk ``W`` shrinks the denominator too): it answers "is there a channel map?" when it is
small, and is no ranking of broken layers when it is large. Held-out evaluation makes
overfitting raise it, never hide it.

Ridge default (``DEFAULT_RIDGE = 1e-8``, not a "statistical" 1e-4): the held-out split already
guards against an optimistic fit, so the ridge is only there to keep the solve well posed (dead or
collinear channels make ``S_bb`` singular). Its price is a shrinkage bias: for an exact relation
``a = P b``, ``W = P S_bb (S_bb + lam I)^-1`` leaves ``E / tr S_aa ~ ridge^2 mean_k(l_mean / l_k)``
over the eigenvalues ``l_k >> lam`` of ``S_bb``, a fitted error of about ``ridge / 2`` for
well-conditioned features and more for skewed spectra. Measured on the exact C4 layers of
``tests/models_group.py``: ridge 1e-4 reports 0.9e-4..2.4e-4, 1e-6 reports 0.9e-6..2.4e-6, and
1e-8 reports the float32 floor of those layers (1.1e-7..1.9e-7; 1e-10 gives the same). So 1e-8
keeps the bias below the float32 resolution of model features, and the system stays far from
singular in float64: its condition number is at most ``1 + C / ridge`` (1e11 at C = 1000, against
1/eps = 4.5e15), and the solve's backward error (~eps tr S_bb) is ~1e6 times smaller than ``lam``.

Resolution floor: ``E`` is a difference of terms of size ``tr S_aa`` whose float64 rounding grows
like ``k eps tr S_aa`` (eps = 2.2e-16, k with the number of summed cells), so ``E`` is clamped at
0 and fitted errors below ``~sqrt(eps) = 1.5e-8`` are not resolved (measured 0.7e-8..1.9e-8 for
exact channel permutations of float32 and float64 features, C = 8..256). Model features in
float32 sit higher, at ~1e-7 (the rotated input's convolution rounds differently): read fitted
errors below ~1e-6 as exact.

Memory and time per (layer, element): four C x C float64 matrices, ``bytes_for(C) = 32 C^2`` bytes
(2 MiB at C = 256, 8 MiB at 512, 32 MiB at 1024); each update costs ``O(cells C^2)`` and
``compute`` ``O(C^3)``. The engine should skip layers wider than ``DEFAULT_MAX_CHANNELS`` (512)
with a stated reason, unless the user raises the limit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: Ridge as a fraction of the mean eigenvalue of ``S_bb`` (see the module docstring).
DEFAULT_RIDGE = 1e-8
#: Widest layer the engine should fit by default: 8 MiB of state per (layer, element).
DEFAULT_MAX_CHANNELS = 512
#: Same convention as :data:`eqaudit.metrics.functional.EPS`: two zero maps compare as equal.
EPS = 1e-12
#: Rows per float64 chunk in :func:`second_moments` (bounds the temporary float64 copies).
_CHUNK_ELEMENTS = 1 << 22


#: Devices whose samples are summed where they are, read back once at the end (a test adds
#: "cpu" to run that path here).
DEVICE_SUMS = {"cuda"}


def on_device(x: torch.Tensor) -> bool:
    return x.device.type in DEVICE_SUMS


def channel_samples(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept cells of ``a`` and ``b`` as per-image samples ``(B, N, C)`` (in their dtype); on
    a device whose sums stay there (:data:`DEVICE_SUMS`), every cell, the masked ones zeroed.

    ``a``, ``b``: ``(B, C, *spatial)`` or ``(B, C)``; ``mask``: bool, broadcastable to
    ``(1, 1, *spatial)`` (a per-image mask is not supported: the engine's masks are per element).
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {b.shape}")
    if a.ndim < 2:
        raise ValueError(f"expected (B, C, ...) features, got shape {tuple(a.shape)}")
    batch, channels = a.shape[:2]
    spatial = a.shape[2:]
    a_cells = a.reshape(batch, channels, -1).transpose(1, 2)
    b_cells = b.reshape(batch, channels, -1).transpose(1, 2)
    if mask is not None:
        keep = torch.broadcast_to(mask.to(torch.bool), (1, 1, *spatial)).reshape(-1)
        if on_device(a):
            # Selecting the kept cells would make the host wait for the device (their count
            # sizes the result): they are zeroed instead, which adds nothing to the moments.
            # ChannelMoments counts them from the mask.
            keep = keep[None, :, None]
            return torch.where(keep, a_cells, 0), torch.where(keep, b_cells, 0)
        a_cells, b_cells = a_cells[:, keep], b_cells[:, keep]
    return a_cells, b_cells


def second_moments_on_device(
    a_rows: torch.Tensor, b_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`second_moments` as float64 tensors on the rows' device (CUDA) or the CPU, not
    read back: on a GPU, reading them would make the host wait for the device."""
    channels = a_rows.shape[-1]
    device = a_rows.device if a_rows.device.type == "cuda" else torch.device("cpu")
    trace_aa = torch.zeros((), dtype=torch.float64, device=device)
    s_ab = torch.zeros(channels, channels, dtype=torch.float64, device=device)
    s_bb = torch.zeros(channels, channels, dtype=torch.float64, device=device)
    step = max(1, _CHUNK_ELEMENTS // max(channels, 1))
    for start in range(0, a_rows.shape[0], step):
        ac = a_rows[start : start + step].detach().to(device=device, dtype=torch.float64)
        bc = b_rows[start : start + step].detach().to(device=device, dtype=torch.float64)
        trace_aa += (ac * ac).sum()
        s_ab += ac.T @ bc
        s_bb += bc.T @ bc
    return trace_aa, s_ab, s_bb


def second_moments(
    a_rows: torch.Tensor, b_rows: torch.Tensor
) -> tuple[float, np.ndarray, np.ndarray]:
    """``(tr S_aa, S_ab, S_bb)`` in float64 for samples ``(N, C)``: ``S_ab = sum_i a_i b_i^T``.

    Rows are promoted to float64 in chunks: products of float32 values are exact in float64,
    so only the sums round (a float32 Gram matrix would put a ~1e-4 floor under the fitted
    error, the square root of float32's 1e-7). CUDA tensors are reduced on their device.
    """
    trace_aa, s_ab, s_bb = second_moments_on_device(a_rows, b_rows)
    return float(trace_aa), s_ab.cpu().numpy(), s_bb.cpu().numpy()


def fit_channel_map(
    s_ab: np.ndarray, s_bb: np.ndarray, ridge: float = DEFAULT_RIDGE
) -> np.ndarray | None:
    """Ridge solution ``W = S_ab (S_bb + lam I)^-1``, ``lam = ridge tr(S_bb) / C``; ``None`` when
    ``tr S_bb = 0`` (the reference is zero on every fit cell: nothing to fit)."""
    channels = s_bb.shape[0]
    trace_bb = float(np.trace(s_bb))
    if not trace_bb > 0.0:
        return None
    lam = ridge * trace_bb / channels
    system = s_bb + lam * np.eye(channels)
    # (S_bb + lam I) is symmetric positive definite: W^T = system^-1 S_ab^T.
    return np.linalg.solve(system, s_ab.T).T


def pooled_error(
    trace_aa: float, s_ab: np.ndarray, s_bb: np.ndarray, w: np.ndarray | None = None
) -> float:
    """``sqrt(E) / (sqrt(tr S_aa) + sqrt(tr(W S_bb W^T)) + eps)`` with
    ``E = tr S_aa - 2 tr(W S_ba) + tr(W S_bb W^T)`` clamped at 0; ``w = None`` is the identity."""
    if w is None:
        cross, trace_wb = float(np.trace(s_ab)), float(np.trace(s_bb))
    else:
        cross = float(np.sum(w * s_ab))  # tr(W S_ba) = sum_ij W_ij (S_ab)_ij
        trace_wb = float(np.sum((w @ s_bb) * w))
    trace_wb = max(trace_wb, 0.0)
    # Rounding can push E of an exact relation a hair below 0 (module docstring).
    residual = max(trace_aa - 2.0 * cross + trace_wb, 0.0)
    return math.sqrt(residual) / (math.sqrt(max(trace_aa, 0.0)) + math.sqrt(trace_wb) + EPS)


def permutation_summary(w: np.ndarray) -> dict[str, Any]:
    """How far ``W`` is from a (signed) channel permutation.

    ``row_peak_share`` = ``max_j W_ij^2 / sum_j W_ij^2`` per row (1 for a permutation row; a row of
    zeros counts 0), reported as its mean and minimum. ``permutation``: the row argmaxes of
    ``|W|`` when they form a permutation (``a[:, i] ~ +-b[:, permutation[i]]``), else ``None``.
    Reading it needs both, and a small fitted error: argmaxes form a permutation by chance when
    shares are low (measured: the C4 lifting layer + ReLU under flip_h gives a "permutation" with
    shares 0.57 min / 0.70 mean and a fitted error of 0.15). Say "channels permute" only when
    the fitted error is small and ``row_peak_share_min`` is near 1.
    """
    energy = w * w
    totals = energy.sum(axis=1)
    peaks = energy.max(axis=1)
    share = np.divide(peaks, totals, out=np.zeros_like(peaks), where=totals > 0)
    argmax = np.abs(w).argmax(axis=1)
    is_permutation = bool(
        (totals > 0).all() and np.array_equal(np.sort(argmax), np.arange(w.shape[0]))
    )
    return {
        "row_peak_share_mean": float(share.mean()),
        "row_peak_share_min": float(share.min()),
        "is_permutation": is_permutation,
        "permutation": [int(j) for j in argmax] if is_permutation else None,
    }


def matched_permutation(s_ab: np.ndarray, s_bb: np.ndarray) -> np.ndarray | None:
    """The signed permutation matrix ``P`` that pairs each channel ``i`` of ``a`` with the
    channel ``j`` of ``b`` best explaining it alone, ``argmax_j |S_ab[i, j]| / sqrt(S_bb[j, j])``
    (Cauchy-Schwarz: ``||b_j||`` exactly when ``a_i = +-b_j``), when those ``j`` are all
    different; else None. Channels dead in both (all zero) pair among themselves.

    The ridge fit cannot show a permutation when ``S_bb`` is singular (more channels than the
    values they are made from, as a lifting convolution's copies of a 3x3 filter on one input
    channel: rank 9 for 12 channels): among the maps that fit, it picks the one of least norm,
    which spreads each row over collinear channels. ``P``'s own held-out error tells whether
    channels permute (:meth:`ChannelMapStats.compute`, ``permutation_error``)."""
    norms = np.sqrt(np.clip(np.diag(s_bb), 0.0, None))
    live = norms > 0
    score = np.abs(s_ab) / np.where(live, norms, 1.0)[None, :]
    score[:, ~live] = -1.0  # (a dead channel of b explains nothing)
    pick = score.argmax(axis=1)
    # Channels of a that meet no live channel of b (dead in both: a ReLU that never fires) pair
    # with b's dead ones, in order: 0 = +-0 whichever way.
    silent = ~(np.abs(s_ab[:, live]) > 0).any(axis=1)
    spare = np.flatnonzero(~live)
    if silent.sum() != len(spare):
        return None
    pick[silent] = spare
    if len(set(pick.tolist())) != len(pick):
        return None
    p = np.zeros_like(s_ab)
    rows = np.arange(len(pick))
    p[rows, pick] = np.where(silent, 1.0, np.sign(s_ab[rows, pick]))
    return p


def _rows(chosen: torch.Tensor) -> slice | torch.Tensor | None:
    """The rows where the CPU bool ``chosen`` is True, as a slice when they are evenly spaced
    (the engine's halves alternate: a view, nothing copied to a device), else as indices; None
    when there are none."""
    where = torch.nonzero(chosen).flatten()
    if where.numel() == 0:
        return None
    first = int(where[0])
    if where.numel() == 1:
        return slice(first, first + 1)
    step = int(where[1] - where[0])
    if bool((where.diff() == step).all()):
        return slice(first, int(where[-1]) + 1, step)
    return where


@dataclass
class ChannelMoments:
    """Second moments of one half (FIT or EVAL): ``tr S_aa``, ``S_ab``, ``S_bb`` and counts.

    Samples on a GPU are summed there (``pending``: ``tr S_aa``, ``S_ab``, ``S_bb``, the
    cell and image counts as device tensors) and brought to the host by :meth:`settle`, once, at the end:
    reading them back per batch would make the host wait for the device at every layer. Without
    a mask the sums are the same float64 additions in the same order as on the host; with one,
    the zeroed cells change the chunks (differences of ~1e-13, relative)."""

    images: int
    cells: int
    trace_aa: float
    s_ab: np.ndarray
    s_bb: np.ndarray
    pending: list[torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def zeros(cls, channels: int) -> ChannelMoments:
        shape = (channels, channels)
        return cls(0, 0, 0.0, np.zeros(shape), np.zeros(shape))

    def add(
        self,
        a_cells: torch.Tensor,
        b_cells: torch.Tensor,
        kept: torch.Tensor | None = None,
        counted: torch.Tensor | None = None,
    ) -> None:
        """Add per-image samples ``(B, N, C)``; ``kept``: how many of the ``N`` cells count (a
        device tensor, for cells zeroed by :func:`channel_samples` on a GPU), else all;
        ``counted``: which images count (a device bool ``(B,)``, for the images zeroed on a GPU
        because their maps are not finite), else all."""
        channels = self.s_ab.shape[0]
        images, cells = int(a_cells.shape[0]), int(a_cells.shape[0] * a_cells.shape[1])
        rows = (a_cells.reshape(-1, channels), b_cells.reshape(-1, channels))
        if not on_device(a_cells):
            self.images += images
            self.cells += cells
            trace_aa, s_ab, s_bb = second_moments(*rows)
            self.trace_aa += trace_aa
            self.s_ab = self.s_ab + s_ab
            self.s_bb = self.s_bb + s_bb
            return
        sums = list(second_moments_on_device(*rows))
        # Counts made on the device: torch.tensor(n, device=...) copies from host memory and
        # makes the host wait for the device's queue, at every layer, element and batch.
        if counted is None:
            seen = torch.full((), images, dtype=torch.int64, device=a_cells.device)
        else:
            seen = counted.sum(dtype=torch.int64)
        per_image = a_cells.shape[1] if kept is None else kept.to(torch.int64)
        sums.append(seen * per_image)
        sums.append(seen)
        if self.pending is None:
            self.pending = sums
        else:
            for total, value in zip(self.pending, sums, strict=True):
                total += value

    def settle(self) -> None:
        """Bring the sums made on a GPU to the host (the host waits for the device here)."""
        settle_all([self])

    def _add_settled(self, values: np.ndarray) -> None:
        """Add the pending sums, read back as one float64 vector: trace, S_ab, S_bb, cells,
        images."""
        c = self.s_ab.shape[0]
        self.pending = None
        self.trace_aa += float(values[0])
        self.s_ab = self.s_ab + values[1 : 1 + c * c].reshape(c, c)
        self.s_bb = self.s_bb + values[1 + c * c : 1 + 2 * c * c].reshape(c, c)
        self.cells += int(values[-2])
        self.images += int(values[-1])

    def merge(self, other: ChannelMoments) -> ChannelMoments:
        self.settle()
        other.settle()
        return ChannelMoments(
            self.images + other.images,
            self.cells + other.cells,
            self.trace_aa + other.trace_aa,
            self.s_ab + other.s_ab,
            self.s_bb + other.s_bb,
        )


def settle_all(moments: Iterable[ChannelMoments]) -> None:
    """:meth:`ChannelMoments.settle` for many at once: the pending sums of each device go to
    the host in one copy. Four reads per (layer, element) made the host wait about 3,700 times
    at the end of a ResNet-18 ``--channel-map`` audit on an H100 (``find_syncs.py``). The cell
    counts travel as float64, exact below 2**53."""
    waiting: dict[torch.device, list[ChannelMoments]] = {}
    for m in moments:
        if m.pending is not None:
            waiting.setdefault(m.pending[0].device, []).append(m)
    for group in waiting.values():
        flat = torch.cat(
            [t.reshape(-1).to(torch.float64) for m in group for t in m.pending]  # type: ignore[union-attr]
        )
        values, start = flat.cpu().numpy(), 0
        for m in group:
            size = 3 + 2 * m.s_ab.size
            m._add_settled(values[start : start + size])
            start += size


@dataclass
class ChannelMapStats:
    """Per (layer, element): naive (``W = I``) and fitted (ridge ``W``) pooled relative errors.

    ``channels`` may be left ``None``: it is then taken from the first update. State: one
    :class:`ChannelMoments` per half, ``bytes_for(channels)`` bytes in all. The module docstring
    gives the formulas, the choice of ridge and the resolution floor.
    """

    channels: int | None = None
    ridge: float = DEFAULT_RIDGE
    fit: ChannelMoments | None = None
    eval: ChannelMoments | None = None

    def __post_init__(self) -> None:
        if not self.ridge > 0.0:
            raise ValueError(
                f"ridge must be positive (it keeps the solve defined), got {self.ridge}"
            )
        if self.channels is not None:
            self.fit = self.fit if self.fit is not None else ChannelMoments.zeros(self.channels)
            self.eval = self.eval if self.eval is not None else ChannelMoments.zeros(self.channels)

    @staticmethod
    def bytes_for(channels: int) -> int:
        """State size for a layer of ``channels`` channels: four C x C float64 matrices."""
        return 4 * channels * channels * 8

    def _unsettled_halves(self) -> tuple[ChannelMoments, ChannelMoments]:
        channels = self.channels or 0
        fit = self.fit if self.fit is not None else ChannelMoments.zeros(channels)
        held = self.eval if self.eval is not None else ChannelMoments.zeros(channels)
        return fit, held

    def _halves(self) -> tuple[ChannelMoments, ChannelMoments]:
        """Both halves, with any sums made on a GPU brought to the host first."""
        halves = self._unsettled_halves()
        for half in halves:
            half.settle()
        return halves

    def settle(self) -> None:
        """Bring sums made on a GPU to the host (:meth:`ChannelMoments.settle`): call it before
        reading ``fit`` or ``eval`` directly; the methods here do."""
        self._halves()

    def update(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        fit: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: ``a = h(T_g x)``, ``b = T'_g h(x)`` ``(B, C, ...)``, ``fit`` bool ``(B,)``
        (True: the image is in the FIT half), ``mask`` bool broadcastable to ``(1, 1, ...)``."""
        a_cells, b_cells = channel_samples(a, b, mask)
        channels = int(a.shape[1])
        if self.channels is None:
            self.channels = channels
            self.__post_init__()
        if channels != self.channels:
            raise ValueError(f"expected {self.channels} channels, got shape {tuple(a.shape)}")
        # The halves are picked on the host (a mask on a GPU is read back once, here): a bool
        # index on the device would wait for it to count the rows.
        fit = fit.detach().to(device="cpu", dtype=torch.bool).reshape(-1)
        if fit.numel() != a.shape[0]:
            raise ValueError(f"fit mask has {fit.numel()} entries for a batch of {a.shape[0]}")
        # Images whose maps hold NaN or Inf are left out (the engine counts them in the
        # layer's ``nonfinite``): dropped on the host, zeroed on a device (a bool index there
        # would make the host wait), which adds nothing to the moments.
        finite = a_cells.isfinite().all(dim=(1, 2)) & b_cells.isfinite().all(dim=(1, 2))
        kept = counted = None
        if on_device(a):
            if mask is not None:  # cells zeroed, not dropped
                kept = torch.broadcast_to(mask.to(torch.bool), (1, 1, *a.shape[2:])).sum()
            counted = finite
            a_cells = torch.where(finite[:, None, None], a_cells, 0)
            b_cells = torch.where(finite[:, None, None], b_cells, 0)
        for half, rows in zip(self._unsettled_halves(), (fit, ~fit), strict=True):
            if counted is None:
                rows = rows & finite
            picked = _rows(rows)
            if picked is not None:
                half.add(
                    a_cells[picked],
                    b_cells[picked],
                    kept,
                    None if counted is None else counted[picked],
                )

    def merge(self, other: ChannelMapStats) -> ChannelMapStats:
        """Exact merge (sums of moments and counts) into a new object; an empty side (no
        channels yet) counts as zero."""
        if self.ridge != other.ridge:
            raise ValueError(f"cannot merge ridge {self.ridge} with ridge {other.ridge}")
        channels = self.channels if self.channels is not None else other.channels
        if channels is None:
            return ChannelMapStats(ridge=self.ridge)
        if other.channels not in (None, channels):
            raise ValueError(f"cannot merge {channels} channels with {other.channels}")
        zero = ChannelMapStats(channels, self.ridge)
        mine = self if self.channels is not None else zero
        theirs = other if other.channels is not None else zero
        (fit_a, eval_a), (fit_b, eval_b) = mine._halves(), theirs._halves()
        return ChannelMapStats(channels, self.ridge, fit_a.merge(fit_b), eval_a.merge(eval_b))

    def channel_map(self) -> np.ndarray | None:
        """The fitted ``W`` (C x C, ``a ~ W b``), or ``None`` when it cannot be fitted."""
        fit, _ = self._halves()
        if fit.cells == 0:
            return None
        return fit_channel_map(fit.s_ab, fit.s_bb, self.ridge)

    def compute(self) -> dict[str, Any]:
        """The naive and fitted pooled errors on the EVAL half, with counts and diagnostics.

        Keys: ``channels``, ``ridge``, ``fit_images``, ``fit_cells``, ``eval_images``,
        ``eval_cells``; ``naive_error`` (``W = I``) and ``fitted_error`` on the eval cells;
        ``fit_residual`` (the fitted error in-sample, on the fit cells: far below
        ``fitted_error`` means overfitting); ``fit_rank`` (eigenvalues of the fit ``S_bb``
        above ``lam``: fewer than ``channels`` means dead or collinear reference channels, whose
        columns of ``W`` the ridge sets to ~0); ``row_peak_share_mean``, ``row_peak_share_min``,
        ``is_permutation``, ``permutation`` (see :func:`permutation_summary`);
        ``permutation_error``: the held-out error of :func:`matched_permutation`'s ``P`` (None
        when the channels pair up with no bijection); ``reason``.

        ``None`` values: every error when the eval half is empty; the fitted fields when the
        fit half is empty or its reference is identically zero (``tr S_bb = 0``); ``reason``
        says which (else it is ``None``). ``fit_cells < channels`` is not refused (the ridge
        keeps the solve defined and held-out evaluation shows the overfit); ``fit_rank`` shows it.
        """
        fit, held = self._halves()
        out: dict[str, Any] = {
            "channels": self.channels,
            "ridge": self.ridge,
            "fit_images": fit.images,
            "fit_cells": fit.cells,
            "eval_images": held.images,
            "eval_cells": held.cells,
            "naive_error": None,
            "fitted_error": None,
            "fit_residual": None,
            "fit_rank": None,
            "row_peak_share_mean": None,
            "row_peak_share_min": None,
            "is_permutation": None,
            "permutation": None,
            "permutation_error": None,
            "reason": None,
        }
        if held.cells:
            out["naive_error"] = pooled_error(held.trace_aa, held.s_ab, held.s_bb)
        else:
            out["reason"] = "no eval images"
        w = self.channel_map()
        if w is None:
            out["reason"] = (
                "no fit images" if fit.cells == 0 else "the reference is zero on every fit cell"
            )
            return out
        lam = self.ridge * float(np.trace(fit.s_bb)) / w.shape[0]
        out["fit_rank"] = int((np.linalg.eigvalsh(fit.s_bb) > lam).sum())
        out["fit_residual"] = pooled_error(fit.trace_aa, fit.s_ab, fit.s_bb, w)
        out.update(permutation_summary(w))
        if held.cells:
            out["fitted_error"] = pooled_error(held.trace_aa, held.s_ab, held.s_bb, w)
            candidate = matched_permutation(fit.s_ab, fit.s_bb)
            if candidate is not None:
                out["permutation_error"] = pooled_error(
                    held.trace_aa, held.s_ab, held.s_bb, candidate
                )
        return out


def fitted_channel_error(
    a: torch.Tensor,
    b: torch.Tensor,
    fit: torch.Tensor,
    mask: torch.Tensor | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> dict[str, Any]:
    """One-shot :meth:`ChannelMapStats.compute` for a single batch (same code path)."""
    stats = ChannelMapStats(ridge=ridge)
    stats.update(a, b, fit, mask)
    return stats.compute()
