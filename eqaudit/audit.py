"""The audit engine: batches x transform elements -> adapter -> accumulators -> AuditResult.

For each batch of images (pixel space, with a margin for crop-shifts) the engine applies every
element, normalises, and runs all ``G x B`` transformed images in one adapter call (the batch
size bounds ``G x B``). It then compares each element with the identity, image by image:

* outputs: top-1 agreement, JS divergence, normalised logit error, accuracy (DESIGN.md section 3);
* layers: ``a = h(T_g x)`` against ``b = T'_g h(x)`` on the feature map's grid, or plain
  invariance for flat features (DESIGN.md section 4).

Accumulators take per-image values and the activations are dropped before the next batch, so
memory does not grow with the number of images. A layer is compared as soon as the adapter hands
it over: a PyTorch forward hands each module output over while it runs (nothing is cloned or kept
beyond the forward's own tensors); an ONNX session hands out every requested output at its end.

Each batch goes through two steps. :meth:`Engine.launch` transforms and normalises the images
beside the model (on a GPU, only the source images cross the bus), runs the forward, reduces the
layers to per-image norms and the scores to per-image output comparisons (top-1, confidence, JS,
logit error, all on the scores' device), and starts copying those small arrays to the host
without waiting (pinned memory and a CUDA event). Only the first batch makes the host wait for
the device inside ``launch``: it decides logits or probabilities and checks determinism.
:meth:`Engine.finish` does the host's bookkeeping: errors from norms, exact sums, accumulators,
predictions, gallery, Lie derivatives. The loop launches batch ``k + 1`` before it finishes batch
``k``, so on a GPU the bookkeeping overlaps the next forward. Meanwhile loader threads draw or
decode the images after it (:mod:`eqaudit.data.prefetch`). Every result is independent of this
order and of the batching: sums are exact, and predictions are ordered by position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import itertools
import math
import os
import platform
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from eqaudit.config import AuditConfig
from eqaudit.data import (
    ImageSource,
    Preprocessing,
    make_preprocessing,
    open_images,
    probe_image,
)
from eqaudit.data.prefetch import cpu_limit, default_load_workers, usable_cpus
from eqaudit.data.sources import array_image_size, repeated_names
from eqaudit.device import free_memory, host_threads, ieee_float32, place, torch_threads
from eqaudit.errors import DataError, UsageError, cause_line
from eqaudit.gallery import Gallery
from eqaudit.lie import GENERATORS as LIE_GENERATORS
from eqaudit.lie import LieAccumulator, lie_batch
from eqaudit.metrics import (
    LayerStats,
    OrbitStats,
    OutputStats,
    errors_from_norms,
    image_norms,
    js_divergence,
    looks_like_probabilities,
    map_norms,
    normalised_logit_error,
    probabilities,
    robustness_score,
    triton_d4,
    two_classes,
    wide,
)
from eqaudit.models import LayerInfo, ModelAdapter, load_model
from eqaudit.models.base import check_layout_option, kept_as_given, nonfinite_scores
from eqaudit.results import (
    PREDICTION_COLUMNS,
    AuditResult,
    is_flagged,
    make_summary,
    skipped_images_warning,
)
from eqaudit.shard import shard_range
from eqaudit.transforms import (
    D4Element,
    NotMeasurable,
    Transform,
    parse_transforms,
    quarter_turns_exact,
)
from eqaudit.transforms.elements import center_crop, d4_apply, d4_cell_index, d4_view
from eqaudit.transforms.geometry import (
    NO_FREE_CELLS,
    SizeChoice,
    aligned,
    alignment_elements,
    choose_aligned_size,
    compare_on_grid,
    comparison_plan,
    drop_device_plans,
    misaligned_reason,
    misaligned_tensors,
    resampled_floor,
    search_reach,
)
from eqaudit.transforms.labels import (
    LabelAction,
    build_label_action,
    invert,
)

if TYPE_CHECKING:
    from eqaudit.grids import GridGraph


def estimate_stride(size: int, cells: int) -> float | None:
    """Cumulative stride of a map of ``cells`` cells over an input axis of ``size`` pixels.

    A stride-``s`` stack gives ``ceil(size / s)`` or ``floor(size / s)`` cells (depending on its
    padding), so several strides can fit when ``s`` is large; powers of two are preferred, as in
    almost every CNN, then the smallest. None when the map is larger than the input.
    """
    if cells > size:
        return None
    fits = [s for s in range(1, size + 1) if cells in (math.ceil(size / s), size // s)]
    if not fits:
        return None
    powers = [s for s in fits if s & (s - 1) == 0]
    return float(powers[0] if powers else fits[0])


#: How the first batch's determinism warning begins (a merge keeps the first shard's only).
NOT_DETERMINISTIC = "the model is not deterministic"


@dataclass
class LayerState:
    """One audited layer's accumulators and geometry, per transform element (the engine's
    state; eqaudit.shard saves and rebuilds it)."""

    info: LayerInfo
    stride: tuple[float, float] | None
    stride_source: str
    stats: list[LayerStats]
    reasons: list[str | None]
    #: the sampling grid (eqaudit.grids.Grid) when the graph gives it; None: unknown
    grid: Any = None
    grid_note: str | None = None
    #: per element: does it map the grid onto itself (None: unknown grid / flat layer)
    aligned: list[bool | None] = field(default_factory=list)
    #: per element: exact | resampled | naive | invariance (set by the first comparison)
    comparison: list[str | None] = field(default_factory=list)
    channel_maps: list[Any] | None = None
    #: per element: a D4 action on the map's own grid without a mask (the fast path)
    own_grid: list[bool] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "spatial" if self.info.spatial else "flat"

    @property
    def zero(self) -> bool:
        """Are the layer's maps zero on every image under every measured element (a dead ReLU,
        an unused branch)? Its relative errors are then 0 by the formula's eps, not because
        the layer is equivariant (the identity's row, compared with itself, does not count)."""
        measured = [s for s in self.stats[1:] if s.n]
        return bool(measured) and all(s.norm_max == 0 for s in measured)

    def scored(self, gi: int, element: Transform) -> bool:
        """Does this (layer, element) row enter the layer scores? Measured, and exact, or a
        resampled element (a rotation by another angle, a sub-pixel shift) compared about a
        known grid, or a flat layer (invariance). Not a misaligned D4 or integer-shift pair
        resampled under ``--misaligned resample``: half-cell resampling cannot undo what the
        stride aliased, so on detailed images its error stays near the naive one (0.21 against
        0.245 on noise, for a D4-symmetric stack), a property of the grid, not of the model.
        Not a row left without images (every one's maps not finite), though it is measurable.
        Not a D4 element on a grid off-centre by whole cells: compared exactly, but only on the
        cells that land on the map, it leaves out the border where the asymmetry is (DESIGN.md
        section 4: misaligned layers are flagged and kept out of scores)."""
        if self.reasons[gi] is not None or self.comparison[gi] is None:
            return False
        if self.stats[gi].n == 0 and self.stats[gi].nonfinite:
            return False
        if self.zero:  # errors of 0 that measure nothing
            return False
        comparison = self.comparison[gi]
        if comparison == "exact":
            return self.aligned[gi] is not False
        if comparison == "invariance":
            return True
        return comparison == "resampled" and not element.exact


def shown_path(path: str | Path | None) -> str | None:
    """How a path is recorded in a report: relative to the working folder when inside it, as
    ``eqaudit/...`` for the package's own files (the demo), else as the user gave it. Reports
    are shared; they should not carry the layout of the machine that made them."""
    if path is None:
        return None
    given = Path(path)
    try:
        resolved = given.resolve()
    except OSError:
        return str(path)
    package = Path(__file__).resolve().parent
    for root, prefix in ((package, Path("eqaudit")), (Path.cwd().resolve(), Path())):
        if resolved.is_relative_to(root):
            return (prefix / resolved.relative_to(root)).as_posix()
    return str(path)


def _libc_trim() -> Callable[[], None]:
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return lambda: None
    return lambda: trim(0)


#: Give the memory freed by a batch back to the system. Each batch allocates and frees large
#: activation tensors; glibc keeps the freed blocks fragmented in its heap, so without this the
#: resident size creeps up with the number of batches although nothing is kept (measured: 0.95 GiB
#: at 16 images, 1.8 GiB at 128 for a ResNet-18 with all layers; flat with it).
release_freed_memory = _libc_trim()


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_available() -> int | None:
    """Room left under the process's cgroup memory limit (v2, else v1): a container's limit,
    which MemAvailable (the host's) does not show."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            return max(limit - usage, 0)
    return None


def _address_space_available() -> int | None:
    """Room left under RLIMIT_AS (ulimit -v), from the process's current virtual size."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY or soft < 0:
            return None
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmSize:"):
                    return max(soft - int(line.split()[1]) * 1024, 0)
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int | None:
    """Bytes of memory this process may still use: the least of the system's MemAvailable, the
    room under its cgroup's limit (containers, Kubernetes) and under ``ulimit -v``. None when
    none of them is known."""
    known = [
        v
        for v in (_meminfo_available(), _cgroup_available(), _address_space_available())
        if v is not None
    ]
    return min(known) if known else None


def _versions() -> dict[str, str]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {
        "version": version("eqaudit"),
        "torch": torch.__version__,
        "onnx": version("onnx"),
        "onnxruntime": version("onnxruntime"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _select_layers(
    layers: list[LayerInfo],
    patterns: tuple[str, ...],
    why_none: str | None = None,
    not_layers: dict[str, str] | None = None,
) -> list[LayerInfo]:
    """The layers ``--layers`` patterns pick; ``why_none``: why the model has no layers at all
    (the adapter's ``layers_note``, e.g. TorchScript), for the error when it has none;
    ``not_layers``: names that are not layers, and why, for the error when they are named."""
    if not patterns:
        return layers
    chosen = [la for la in layers if any(fnmatch.fnmatchcase(la.name, p) for p in patterns)]
    if not chosen and not layers:
        raise UsageError(
            f"--layers {','.join(patterns)}: this model has no layers to audit"
            + (f" ({why_none})" if why_none else "")
            + "; drop --layers (the outputs are audited)"
        )
    named = [n for n in (not_layers or {}) if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen and named:
        raise UsageError(
            f"--layers {','.join(patterns)} names '{named[0]}', which is not a layer: "
            f"{(not_layers or {})[named[0]]}; run 'eqaudit inspect MODEL' to list the layers"
        )
    if not chosen:
        sample = ", ".join(la.name for la in layers[:5])
        raise UsageError(
            f"--layers {','.join(patterns)} matches no layer (first layers: {sample}): "
            "run 'eqaudit inspect MODEL' to list them"
        )
    return chosen


#: The largest held-out error at which a matched channel permutation counts as one
#: (``channel_map_permutation``); float32 exact relations read ~1e-7.
PERMUTATION_ERROR = 1e-3

#: Channels of the images each ``--channels`` feeds.
CHANNEL_COUNTS = {"rgb": 3, "bgr": 3, "gray": 1}


def _resolve_channels(adapter: ModelAdapter, config: AuditConfig, notes: list[str]) -> str | None:
    model_channels = adapter.input_spec.channels
    if model_channels not in (1, 3):
        guess = adapter.channels_guess() if config.channels is None else None
        if guess is not None:
            raise UsageError(
                f"eqaudit guessed {model_channels}-channel inputs from {guess} (the first "
                "defined, which need not be the first called): if the model takes images, "
                "say how many channels with --channels rgb, bgr or gray"
            )
        check_layout_option(adapter.input_spec)  # --layout read another axis as the channels
        raise UsageError(
            f"the model takes {model_channels}-channel inputs; eqaudit feeds RGB, BGR or gray "
            "images (1 or 3 channels)"
        )
    wanted = config.channels
    if wanted is None and model_channels == 1:
        guess = adapter.channels_guess()
        source = f" (guessed from {guess}; --channels overrides it)" if guess else ""
        notes.append(f"the model takes 1 channel{source}: images are fed as grayscale")
        return "gray"
    if wanted is not None:
        pixel = CHANNEL_COUNTS[wanted]
        if pixel != model_channels:
            raise UsageError(
                f"--channels {wanted} gives {pixel}-channel images but the model takes "
                f"{model_channels}: use --channels {'gray' if model_channels == 1 else 'rgb or bgr'}"
            )
    return wanted


def _integer_pixels(
    adapter: ModelAdapter, config: AuditConfig, preprocessing: Preprocessing, notes: list[str]
) -> Preprocessing:
    """A model that takes uint8 pixels normalises them itself: it is fed 0-255 values (scale
    255, no mean or std), rounded after each transform. Options that would normalise them
    anyway, or that need float inputs (``--lie``: its derivatives are finite differences of a
    fraction of a pixel, which rounding erases), are refused."""
    if adapter.input_spec.dtype != "uint8":
        return preprocessing
    given = [
        option
        for option, value in (
            ("--preset", config.preset),
            ("--mean", config.mean),
            ("--std", config.std),
            ("--scale", None if config.scale in (None, 255) else config.scale),
        )
        if value is not None
    ]
    if given:
        raise UsageError(
            f"the model takes uint8 pixels (0-255) and normalises them itself: drop "
            f"{' and '.join(given)}"
        )
    if config.lie:
        raise UsageError(
            "--lie needs a float input: the model takes uint8 pixels, and rounding them erases "
            "the sub-pixel differences its derivatives are made of; drop --lie"
        )
    notes.append(
        "the model takes uint8 pixels: images are fed as 0-255, rounded after each transform"
    )
    return replace(preprocessing, scale=255.0, mean=(0.0,), std=(1.0,))


def _scales_pixels_itself(
    adapter: ModelAdapter, config: AuditConfig, preprocessing: Preprocessing
) -> str | None:
    """A warning when the model divides its input by ~255 first (it expects 0-255 pixels) and
    is fed pixels in [0, 1]: its numbers would be those of nearly black images. Read from the
    grid graph: an ONNX graph's or a .pt2 program's always (cheap), a module's only when its
    layers are audited (the export is made for them anyway)."""
    if preprocessing.scale > 2:
        return None
    exported = adapter.backend != "torch" or getattr(adapter, "_program", None) is not None
    if not (exported or config.layers):
        return None
    try:
        graph = adapter.grid_graph()
    except Exception:
        return None
    divisor = getattr(graph, "input_divisor", None)
    if divisor is None or not 127 <= divisor <= 256:
        return None
    fed = "scaled to [0, 1]" + (
        " and normalised" if preprocessing.mean != (0.0,) or preprocessing.std != (1.0,) else ""
    )
    return (
        f"the model divides its input by {divisor:g} first (it expects 0-{divisor:g} pixels) but "
        f"is fed pixels {fed}: it sees nearly black images; pass --preset raw255 (or --scale "
        "255 --mean 0 --std 1) to feed the pixels it expects"
    )


class _Record(NamedTuple):
    """One (layer, element)'s per-image numbers of a batch, added to ``stats`` when the batch is
    finished: the norms ``(||a||, ||b||, ||a - b||)`` and, for resampled comparisons, the
    interpolation floor; the identity has no norms, only its image count (its errors are
    exactly zero, nothing to copy)."""

    stats: LayerStats
    norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    floor: torch.Tensor | None = None
    images: int = 0


class _Block(NamedTuple):
    """The non-identity elements of one layer compared at once
    (:meth:`Engine._own_grid_d4_layer`): their accumulators in element order, and their norms
    ``(||a||, ||b||, ||a - b||)`` as one ``(3, E, B)`` tensor."""

    stats: list[LayerStats]
    norms: torch.Tensor


def _record_tensors(records: list[_Record | _Block]) -> list[torch.Tensor]:
    """The tensors of a batch's records, in order: each one's norms, then its floor if any."""
    tensors: list[torch.Tensor] = []
    for record in records:
        if isinstance(record, _Block):
            tensors.append(record.norms)
        elif record.norms is not None:
            tensors.extend(t for t in (*record.norms, record.floor) if t is not None)
    return tensors


def _to_host(
    outputs: torch.Tensor, parts: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """Start bringing a batch's compared outputs (:meth:`Engine._output_rows`) and its
    per-image layer norms and floors (concatenated, float64) to the host: from a GPU into pinned
    memory without waiting, with the CUDA event that marks their arrival (None when nothing was
    on a GPU)."""
    norms = None
    if parts:
        device = next((t.device for t in parts if t.device.type != "cpu"), torch.device("cpu"))
        # One concatenation (float32 norms promote exactly), then one conversion: not a
        # conversion kernel per (layer, element).
        norms = torch.cat([t.reshape(-1).to(device) for t in parts]).to(torch.float64)
    on_gpu = [t for t in (outputs, norms) if t is not None and t.device.type == "cuda"]
    if not on_gpu:
        return outputs, norms, None

    def start(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or t.device.type != "cuda":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    outputs, norms = start(outputs), start(norms)
    arrived = torch.cuda.Event()  # recorded after the copies: it completes when they have
    arrived.record(torch.cuda.current_stream(on_gpu[0].device))
    return outputs, norms, arrived


def d4_orbit_norms(act: torch.Tensor, index: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """The norms :meth:`Engine._own_grid_d4_layer` records for a layer: ``act`` holds its
    activations for every D4 element of a batch, ``(G, B, C, H, W)`` with the identity first;
    ``index`` ``(G, H W)`` the cells each element reads (:meth:`Engine._d4_index`, the
    identity's row first). Returns ``(3, G - 1, B)`` float64: ``||a||``, ``||b||`` and ``||T'b
    - a||`` for ``b = act[0]``, ``a = act[g]``.

    ``fused``: one Triton kernel reads each activation once and sums squares per plane
    (:mod:`eqaudit.metrics.triton_d4`; the caller checks :func:`~eqaudit.metrics.triton_d4.usable`);
    the planes of an image are added in float64. Otherwise torch ops: one gather moves ``b``
    under every element at once, laid out element-major ``(G - 1, B C, H W)`` (the index is
    broadcast over the batch and channels, not copied), so that the subtraction and the norms
    run on contiguous tensors. Gathered in ``(B, C, G - 1, H W)`` order instead, the
    subtraction wrote through a strided view: not vectorised on a GPU (0.27 s of device time per
    1024 images of a ResNet-18 on an H100), and 2.2x slower on the CPU
    (``benchmarks/bench_compare_kernels.py`` times the variants)."""
    g, b = act.shape[0], act.shape[1]
    if fused:
        sums = triton_d4.d4_plane_sums(act, index)  # (3, G - 1, B C) float32
        return sums.view(3, g - 1, b, -1).sum(dim=-1, dtype=torch.float64).sqrt_()
    flat = act.flatten(-2).flatten(1, 2)  # (G, B C, H W)
    rows, cells = flat.shape[1:]
    source = flat[0].expand(g - 1, rows, cells)
    moved = torch.gather(source, 2, index[1:].view(g - 1, 1, cells).expand(g - 1, rows, cells))
    difference = wide(moved).sub_(flat[1:]).view(g - 1, *act.shape[1:])  # T'b - a, as one by one
    na = image_norms(act, start=2)
    nd = image_norms(difference, start=2)
    return torch.stack([na[1:], na[0].expand(g - 1, b), nd])


class _D4Images:
    """A D4 element's images of a CPU batch, not made: :meth:`view` is a numpy view of the
    batch's float32 pixels; ``[b]`` makes image ``b`` as ``element.apply_image`` does (the
    same pixels: D4 only moves them)."""

    def __init__(self, element: D4Element, pixels: torch.Tensor, margin: int) -> None:
        self.element, self.pixels, self.margin = element, pixels, margin
        self.shape = center_crop(pixels, margin).shape  # square when k is odd (checked before)

    def view(self) -> np.ndarray:
        values = center_crop(self.pixels, self.margin).numpy()
        return d4_view(values, self.element.k, self.element.flip)

    def __getitem__(self, b: int) -> torch.Tensor:
        return self.element.apply_image(self.pixels[b : b + 1], self.margin)[0]


@dataclass
class _Launched:
    """A batch whose forward and layer reductions are queued (:meth:`Engine.launch`) and whose
    host bookkeeping is still to do (:meth:`Engine.finish`)."""

    labels: torch.Tensor | None
    ids: list[str]
    positions: list[int]
    transformed: list[torch.Tensor | _D4Images]  # the images under each element
    pixels: torch.Tensor  # the source images on the host (Lie derivatives)
    outputs: torch.Tensor  # (rows, G, B) float64: Engine._output_rows, then finite scores (1/0)
    records: list[_Record | _Block]
    norms: torch.Tensor | None  # the records' tensors, then the floors, float64, flat
    floor_sizes: list[int | None]  # per element: its image floors' count (None: exact)
    arrived: Any = None  # a CUDA event: the copies to the host are complete

    def floors(self) -> list[np.ndarray | None]:
        """Per element, the interpolation floor per image (None for exact elements), from
        the end of ``norms``."""
        sizes = [n for n in self.floor_sizes if n is not None]
        values = iter(torch.split(self.norms[-sum(sizes) :], sizes) if sizes else ())
        return [None if n is None else next(values).numpy() for n in self.floor_sizes]

    def wait(self) -> None:
        if self.arrived is not None:
            self.arrived.synchronize()


def _unit_interval(scores: torch.Tensor) -> bool:
    """Whether every score lies in [0, 1] (and they are not all equal: a constant model)."""
    return bool(scores.min() >= 0 and scores.max() <= 1 and scores.max() > scores.min())


class Engine:
    """One audit of one model; see the module docstring."""

    def __init__(
        self,
        adapter: ModelAdapter,
        elements: list[Transform],
        preprocessing: Preprocessing,
        config: AuditConfig,
    ) -> None:
        self.adapter = adapter
        self.config = config
        self.preprocessing = preprocessing
        height, width = adapter.input_spec.size
        elements = quarter_turns_exact(elements, height, width)
        self.skipped = {e.name: e.skip_reason(height, width) for e in elements}
        self.all_elements = elements
        self.elements = [e for e in elements if self.skipped[e.name] is None]
        if len(self.elements) < 2:
            reasons = "; ".join(r for r in self.skipped.values() if r)
            raise UsageError(f"no transform applies to this model's input: {reasons}")
        self.margin = max(e.margin() for e in self.elements)
        self.output_stats = [OutputStats() for _ in self.elements]
        self.orbit = OrbitStats()
        self.orbit_correct = OrbitStats()
        self.layer_states: list[LayerState] = []
        self.output_kind: str | None = None if config.outputs == "auto" else config.outputs
        self.output_kind_source = "auto" if config.outputs == "auto" else "option"
        #: a model with one score per image: "logits" (z, read as scores [0, z]) or "probs"
        #: (p, read as [1 - p, p]); None for two classes or more (see _binary_kind)
        self.binary: str | None = None
        self.warnings: list[str] = []
        self.predictions: list[pd.DataFrame] = []
        self.num_classes: int | None = None
        #: where ``class_names`` came from: "labels" (--labels, the data) or "model" (metadata)
        self.class_names_from = "labels"
        self.gallery = Gallery()
        self.class_names: list[str] | None = None
        self.label_action: LabelAction | None = None
        self.run_notes: list[str] = []
        self.not_audited: list[str] = []  # candidate layers of neither kind (see _setup_layers)
        self._score_low: torch.Tensor | None = None
        self._score_high: torch.Tensor | None = None
        self.input_size = (height, width)
        self.geometry_notes: list[str] = []
        self.images_seen = 0
        self.lie: LieAccumulator | None = LieAccumulator() if config.lie else None
        self.lie_steps: dict[str, float] = {}
        self._input_buffer: torch.Tensor | None = None
        # Where the images are transformed and normalised: beside the model. On a GPU only the
        # batch's source images cross the bus, not its G transformed copies.
        self.device = torch.device(getattr(adapter, "device", "cpu"))
        self._difference_buffers: dict[int, np.ndarray] = {}  # by thread, see _own_grid_d4_norms
        self._d4_indices: dict[tuple[int, int, str], torch.Tensor] = {}  # see _d4_index
        self._fused_failed = False  # the Triton comparison did not build: torch ops (_orbit_norms)
        # This batch's per-image layer norms; the comparison workers append too (atomic).
        self._records: list[_Record | _Block] = []
        self._launched = 0  # batches launched so far (the first one sets up the outputs)
        self._pool: ThreadPoolExecutor | None = None  # layer comparisons, see _update_layers
        self._pool_workers = 0

    # -- set-up ------------------------------------------------------------------------------
    def _layer_grids(self) -> tuple[Any, dict[str, Any], str | None]:
        """The adapter's grid graph and the grids at this input size (empty when unknown), and
        the note that says why they are unknown."""
        try:
            graph = self.adapter.grid_graph()
            grids = graph.grids(*self.input_size) if graph is not None else {}
        except Exception as exc:  # geometry is a help; the audit goes on without it
            first = cause_line(exc, 200)
            return (
                None,
                {},
                f"sampling grids unavailable ({type(exc).__name__}: {first}); per-layer "
                "alignment is unknown",
            )
        if graph is None:
            note = self.adapter.grid_graph_note
            return (
                None,
                {},
                f"sampling grids unavailable ({note}): per-layer alignment is unknown, and such "
                "layers are compared on their own grid and kept out of the layer scores"
                if note
                else "sampling grids unavailable: per-layer alignment is unknown",
            )
        return graph, grids, None

    def _setup_layers(self, first: torch.Tensor) -> None:
        if not self.config.layers:
            return
        # The grids first: the graph also tells which captured maps are channels-last.
        graph, grids, grid_note = self._layer_grids()
        hooked = bool(self.adapter.layers())
        probed = self.adapter.probe_layers(first)
        why_none = self.adapter.describe().get("layers_note") if not probed else None
        if hooked and grid_note:
            self.geometry_notes.append(grid_note)
        elif not hooked and why_none:
            # (TorchScript: no hooks at all; its grid note would speak of layers it has not.)
            self.geometry_notes.append(f"no layer is audited: {why_none}")
        sequences = {
            layer.name: layout
            for layer in probed
            if (layout := self.adapter.token_layout(layer.name)) is not None
        }
        if sequences:
            self.geometry_notes.append(_sequences_note(sequences))
        skipped = self.adapter.unauditable
        self.not_audited = list(skipped)
        if skipped:
            shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            count = f"{len(skipped)} layers are" if len(skipped) > 1 else "1 layer is"
            self.geometry_notes.append(
                f"{count} not audited: outputs that are neither image maps (batch, C, H, W) nor "
                f"flat features (batch, D), such as a transformer's attention scores and token "
                f"sequences whose tokens the grid walk cannot follow ({shown})"
            )
        height, width = self.input_size
        g = len(self.elements)
        not_layers = getattr(self.adapter, "not_layers", {})
        for info in _select_layers(probed, self.config.layer_patterns, why_none, not_layers):
            grid, note = grids.get(info.name), None
            if grid == "flat" and info.spatial:
                note = (
                    "constant over its cells (a 1x1 feature resized or expanded to a map): no "
                    "grid of its own"
                )
            if isinstance(grid, str) or not info.spatial:
                grid = None
            elif grid is not None and (grid.h.n, grid.w.n) != tuple(info.shape[1:]):
                note = (
                    f"graph grid {grid.h.n}x{grid.w.n} does not match the map "
                    f"{info.shape[1]}x{info.shape[2]}: grid treated as unknown"
                )
                grid = None
            elif grid is None and graph is not None:
                note = graph.unknown_reason(info.name)
            stride, source = info.stride, "graph"
            if grid is not None:
                stride = (float(grid.h.stride), float(grid.w.stride))
            elif info.spatial and stride is None:
                sh = estimate_stride(height, info.shape[1])
                sw = estimate_stride(width, info.shape[2])
                stride = (sh, sw) if sh is not None and sw is not None else None
                source = "shape" if stride is not None else "unknown"
            if not info.spatial:
                stride, source = None, "n/a"
            state = LayerState(
                info, stride, source, [LayerStats() for _ in range(g)], [None] * g, grid, note
            )
            state.aligned = [
                None
                if not info.spatial or grid is None
                else (True if e.is_identity else aligned(e, grid, self.input_size))
                for e in self.elements
            ]
            # D4 pairs compared on the map's own grid, without a mask (aligned: exact; or
            # misaligned under --misaligned flag, or an unknown grid: naive) are known before the
            # first batch, and take the fast path of _own_grid_d4_norms on every batch.
            square = info.spatial and info.shape[1] == info.shape[2]
            state.comparison, state.own_grid = [None] * g, [False] * g
            for gi, e in enumerate(self.elements):
                if not info.spatial or not isinstance(e, D4Element) or e.is_identity:
                    continue
                if e.k % 2 and not square:
                    continue  # not measurable: the first batch records why
                if state.aligned[gi] is True:
                    state.comparison[gi], state.own_grid[gi] = "exact", True
                elif state.aligned[gi] is None or self.config.misaligned == "flag":
                    on_cells = (
                        grid is not None
                        and comparison_plan(e, grid, self.input_size)[1] != "off-cells"
                    )
                    if not on_cells:  # (off-centre by whole cells: compared on the overlap)
                        state.comparison[gi], state.own_grid[gi] = "naive", True
            if self.config.channel_map:
                state.channel_maps = self._channel_maps(info)
            self.layer_states.append(state)

    def setup(self) -> None:
        """Learn the layers' shapes from one image (:func:`~eqaudit.data.probe_image`) before
        the first batch."""
        height, width = self.adapter.input_spec.size
        image = probe_image(self.preprocessing.pixel_channels, height, width)
        self._setup_layers(self.preprocessing.normalise(image))

    def _layer_bytes(self) -> list[int]:
        """Bytes of each selected layer's activation for one image under one element."""
        return [4 * math.prod(s.info.shape or ()) for s in self.layer_states]

    def activation_bytes_per_image(self) -> int:
        """Bytes of the selected layers' activations for one image under one element."""
        return sum(self._layer_bytes())

    def held_bytes_per_image(self, streams: bool) -> int:
        """What the engine holds for one image under one element while comparing layers.

        Handed out together (ONNX, fixed-size chunks): every layer, held by the runtime and by
        the engine and compared in float64 one layer at a time: three copies of them all.
        Streamed (PyTorch hooks): one layer at a time, the forward's own tensor plus the
        comparison's work (a transformed reference, the difference, a mask, float64 moments for
        channel maps; on a GPU every element's moved reference at once, about one copy): four
        copies of the largest layer."""
        if streams:
            return 4 * max(self._layer_bytes(), default=0)
        return 3 * self.activation_bytes_per_image()

    def images_per_step(
        self,
        batch_size: int | None,
        available: int | None,
        forward_bytes: int = 0,
    ) -> int:
        """Images per forward call so that ``G x B`` images fit ``batch_size`` and, with what
        the comparisons hold (:meth:`held_bytes_per_image`), half of the available memory (the
        memory guard). ``batch_size`` None: 64 forward images, or (``forward_bytes`` known: the
        model's own peak memory per forward image on a GPU) as many as half the free device
        memory holds, at most 4096."""
        g = len(self.elements)
        if batch_size is None and forward_bytes and available:
            # A run sized here is one chunk whenever the model's batch is dynamic.
            per_forward = forward_bytes + self.held_bytes_per_image(self.adapter.streams(None))
            batch_size = int(min(4096, max(g, (available // 2) // max(per_forward, 1))))
        wanted = max(1, (batch_size or 64) // g)
        per_image = self.held_bytes_per_image(self.adapter.streams(wanted * g)) * g
        if available is None or per_image == 0:
            return wanted
        budget = available // 2
        fits = budget // per_image
        if fits < 1:
            raise UsageError(
                f"one image under the {g} transform elements needs {per_image / 2**30:.1f} GiB "
                f"of activations for the {len(self.layer_states)} audited layers, more than half "
                f"of the {available / 2**30:.1f} GiB available: select fewer layers with --layers "
                "or audit outputs only with --no-layers"
            )
        if fits < wanted:
            self.run_notes.append(
                f"batch shrunk from {wanted} to {fits} images per step so that activations fit "
                "in memory"
            )
        return int(min(wanted, fits))

    def _track_spread(self, reference: torch.Tensor) -> None:
        """Keep the range of the identity scores, to tell a model that ignores its input
        (on the scores' device: nothing reaches the host per batch)."""
        low, high = torch.aminmax(reference.double(), dim=0)
        if self._score_low is None:
            self._score_low, self._score_high = low, high
        else:
            self._score_low = torch.minimum(self._score_low, low)
            self._score_high = torch.maximum(self._score_high, high)

    def constant_output_warning(self, count: int) -> str | None:
        """A warning when every image got the same scores: invariance is then trivial."""
        if self._score_low is None or count < 2:
            return None
        spread = float((self._score_high - self._score_low).max())
        scale = float(torch.maximum(self._score_high.abs(), self._score_low.abs()).max())
        if spread > 1e-6 * max(scale, 1e-12):
            return None
        return (
            f"the model's scores are constant across all {count} images (spread {spread:.2g}): "
            "its outputs do not depend on the input, so its perfect invariance means nothing; "
            "check the preprocessing (--scale, --mean, --std) and the model"
        )

    def _binary_kind(self, scores: torch.Tensor) -> None:
        """A binary classifier with one score per image (a sigmoid head): agreement, JS and the
        logit error of one class are 1, 0 and 0/0 whatever the model does. Its score is read
        as two classes: a logit ``z`` as scores ``[0, z]`` (softmax gives ``[1 - sigmoid(z),
        sigmoid(z)]``), a probability ``p`` as ``[1 - p, p]``. Probabilities when
        ``--outputs probs`` says so, or (auto) when every score of the first batch lies in
        [0, 1]."""
        host = scores.detach().cpu()
        finite = host[torch.isfinite(host)]
        if self.config.outputs == "auto":
            unit = finite.numel() > 0 and bool((finite >= 0).all() and (finite <= 1).all())
            self.binary = "probs" if unit else "logits"
        else:
            self.binary = self.config.outputs

    def binary_note(self) -> str | None:
        """How a binary model's one score was read (:meth:`_binary_kind`), for the notes."""
        if self.binary is None:
            return None
        read = (
            "probability p: scores [1 - p, p]"
            if self.binary == "probs"
            else "logit z: scores [0, z] (softmax: [1 - sigmoid(z), sigmoid(z)])"
        )
        source = "as --outputs says" if self.config.outputs != "auto" else "--outputs overrides"
        return (
            f"the model gives one score per image, read as a binary classifier's {read}; class "
            f"1 is the positive class ({source})"
        )

    def _two_classes(self, scores: torch.Tensor) -> torch.Tensor:
        """A binary model's ``(..., 1)`` scores as two classes (:meth:`_binary_kind`)."""
        if self.binary is None or scores.shape[-1] != 1:
            return scores
        return two_classes(scores, self.binary)

    def _check_determinism(self, images: torch.Tensor, in_batch: torch.Tensor) -> None:
        """Warn when the scores of ``images`` are random (two runs of them alike in every way
        differ by more than 1e-5 of their scale: dropout) or depend on the rest of the batch
        (``in_batch``, their scores inside the first batch, differ from theirs alone by more than
        1e-2: batch-norm in training mode). Rounding alone moves scores by less than 1e-2 but
        can exceed 1e-5 between unlike runs: onnxruntime rounds a graph that hands out its
        layers differently (lost Conv + Add fusions: 2e-4 of a ResNet's logits), and oneDNN a
        batch of 64 differently from one of 2."""
        alone = self._two_classes(self.adapter.run(images).scores).double()
        again = self._two_classes(self.adapter.run(images).scores).double()
        if images.shape[0] > 1:
            # One image alone too: the adapter refuses a model whose number of classes differs
            # from the batches' (an output sliced by batch size).
            self.adapter.run(images[:1])
        scale = max(alone.abs().max().item(), 1e-12)
        spread = (again - alone).abs().max().item()
        mixed = (in_batch.double() - alone).abs().max().item()
        if spread > 1e-5 * scale:
            self.warnings.append(
                f"{NOT_DETERMINISTIC}: two runs of the same images differ by {spread:.3g} "
                "(dropout left on?); the identity is no longer an exact reference"
            )
        elif mixed > 1e-2 * scale:
            self.warnings.append(
                f"{NOT_DETERMINISTIC}: an image's scores depend on the other images of its batch "
                f"(by {mixed:.3g}: batch-norm left in training mode?); the identity is no longer "
                "an exact reference"
            )

    # -- one batch ---------------------------------------------------------------------------
    def launch(
        self, pixels: torch.Tensor, labels: torch.Tensor | None, ids: list[str]
    ) -> _Launched:
        """Transform, run and reduce one batch's layers; the scores and per-image layer norms
        are copied towards the host without waiting. On a GPU the device is still working when
        this returns: the caller launches the next batch, then finishes this one, so the host's
        bookkeeping (:meth:`finish`) overlaps the next forward instead of idling the device."""
        g, b = len(self.elements), pixels.shape[0]
        # Places in the whole audited set (a shard starts further on): they decide the gallery,
        # the channel-map split and the order of predictions.csv, never the batching.
        positions = list(range(self.images_seen, self.images_seen + b))
        self.images_seen += b
        first = self._launched == 0
        self._launched += 1
        # From pinned memory (the loader's, beside a GPU) the copy waits for nothing queued.
        host_pixels, pixels = pixels, pixels.to(self.device, non_blocking=True)
        transformed = self._assemble(pixels)
        # Interpolation floors of the resampled elements (None for exact ones), queued now so
        # that they reach the host with the outputs, in the same copy.
        identity = self.elements[0].apply_image(pixels, self.margin)
        floors = [
            None if isinstance(t, _D4Images) else e.image_floor(identity, t)
            for e, t in zip(self.elements, transformed, strict=True)
        ]
        floors = [None if f is None else f.detach() for f in floors]
        model_in = self.preprocessing.normalise(self._input_buffer, inplace=True)
        # Channel maps are fitted on the images of even position and evaluated on the others
        # (a host mask: the halves are picked as strided views, nothing goes to the device).
        fit = torch.arange(positions[0], positions[0] + b) % 2 == 0
        states = {s.info.name: s for s in self.layer_states}
        handed_out: list[tuple[LayerState, torch.Tensor]] = []
        streams = self.adapter.streams(g * b)

        def reduce(name: str, act: torch.Tensor) -> None:
            # Called with each layer's activations as the forward computes them (PyTorch
            # hooks): reduced at once to per-image numbers, never kept. Handed out after the
            # run (ONNX): compared below, several layers at a time.
            act = act.reshape(g, b, *act.shape[1:])
            if streams:
                self._update_layer(states[name], act, fit)
            else:
                handed_out.append((states[name], act))

        out = self.adapter.run(
            model_in, list(states), sink=reduce if states else None, host_scores=False
        )
        self._update_layers(handed_out, fit)
        records, self._records = self._records, []
        scores = out.scores.reshape(g, b, -1)
        if first and scores.shape[-1] == 1:
            self._binary_kind(scores)
        scores = self._two_classes(scores)
        if first:
            self._first_batch(scores, model_in[: min(b, 2)])
        self._track_spread(scores[0])
        parts = _record_tensors(records) + [f for f in floors if f is not None]
        outputs, norms, arrived = _to_host(self._output_rows(scores), parts)
        return _Launched(
            labels,
            ids,
            positions,
            transformed,
            host_pixels,
            outputs,
            records,
            norms,
            [None if f is None else f.numel() for f in floors],
            arrived,
        )

    def _assemble(self, pixels: torch.Tensor) -> list[torch.Tensor | _D4Images]:
        """Write the batch under every element, in element order, into the model-input buffer
        (pixel space, float32; reused across batches: fresh pages for every batch cost more
        than the copies; on a GPU the next batch's writes queue behind this batch's forward).
        Returns each element's images, for the floors and the gallery.

        On the CPU a D4 element is a numpy view of the pixels (negative strides rotate and flip
        without a copy), copied once, into the buffer; its images are made again only for the
        few the gallery keeps (:class:`_D4Images`). Elsewhere each element's images are made
        and copied in."""
        b = pixels.shape[0]
        views = pixels.device.type == "cpu" and pixels.dtype == torch.float32
        images: list[torch.Tensor | _D4Images] = [
            _D4Images(e, pixels, self.margin)
            if views and isinstance(e, D4Element)
            else e.apply_image(pixels, self.margin)
            for e in self.elements
        ]
        shape = (len(images) * b, *images[0].shape[1:])
        if self._input_buffer is None or tuple(self._input_buffer.shape) != shape:
            self._input_buffer = torch.empty(shape, dtype=torch.float32, device=self.device)
        for gi, element_images in enumerate(images):
            out = self._input_buffer[gi * b : (gi + 1) * b]
            if isinstance(element_images, _D4Images):
                np.copyto(out.numpy(), element_images.view())
            else:
                out.copy_(element_images)  # (cast to float32)
        return images

    def _first_batch(self, scores: torch.Tensor, few: torch.Tensor) -> None:
        """What the first batch decides before any output is compared (the host waits for the
        device here, once): finite scores, determinism (``few`` model inputs run twice more: two
        images are enough to see dropout or batch statistics left on), the classes'
        permutations, and whether the model gives logits or probabilities (from the
        untransformed images)."""
        host = scores.cpu()
        bad = ~torch.isfinite(host).all(dim=-1)  # (G, B)
        if bad.any():
            raise nonfinite_scores(int(bad.sum()), bad.numel(), self._under(bad.numpy()))
        self.num_classes = host.shape[-1]
        names = len(self.class_names or ())
        if names > self.num_classes and self.class_names_from == "model":
            # (TF's extra 'background' class): which name goes with which score is unknown.
            self.warnings.append(
                f"the model's metadata names {names} classes but it gives {self.num_classes} "
                "class scores: its names are not used (pass --labels to name the classes)"
            )
            self.class_names, names = None, 0
        if names > self.num_classes:
            raise DataError(
                f"the labels name {names} classes but the model gives {self.num_classes} class "
                "scores: give the labels file of this model (one name per class, in its order)"
            )
        if self.binary is not None and names == 1:
            self.warnings.append(
                "the labels name 1 class of this binary model's 2 (its one score read as two "
                "classes, 0 negative, 1 positive): the name goes to class 0; give both names, "
                "negative first"
            )
        elif names and names < self.num_classes:
            self.warnings.append(
                f"the labels name {names} classes and the model gives {self.num_classes} class "
                f"scores: classes {names} to {self.num_classes - 1} have no name"
            )
        self._check_determinism(few, host[0][: few.shape[0]])
        self._setup_label_action(self.num_classes)
        looks_like_probs = looks_like_probabilities(host[0])
        if self.output_kind is None:
            self.output_kind = "probs" if looks_like_probs else "logits"
            if not looks_like_probs and self.num_classes > 1 and _unit_interval(host):
                self.warnings.append(
                    "the outputs all lie in [0, 1] but do not sum to 1 per image: independent "
                    "(sigmoid) probabilities of a multi-label model? They are read as logits: "
                    "top-1 agreement holds, but the JS divergences and logit errors are those of "
                    "softmax(outputs); pass --outputs logits to silence this"
                )
        elif self.output_kind == "logits" and looks_like_probs:
            self.warnings.append(
                "--outputs logits was given but the outputs look like probabilities "
                "(non-negative rows summing to 1): softmax will be applied on top of them"
            )
        elif self.output_kind == "probs" and not looks_like_probs:
            self.warnings.append(
                "--outputs probs was given but the outputs are not probabilities (negative "
                "values, or rows not summing to 1): they are clipped at 0 and renormalised, "
                "which makes the JS divergences meaningless for logits; check --outputs"
            )

    def _under(self, bad: np.ndarray) -> list[str]:
        """The elements (rows of a ``(G, B)`` mask) with a bad entry, for an error line."""
        return [e.name for e, row in zip(self.elements, bad, strict=True) if row.any()]

    def finish(self, batch: _Launched) -> None:
        """The host's part of a launched batch: layer errors into their accumulators, then the
        outputs (agreement, JS, predictions, gallery) and the Lie derivatives."""
        batch.wait()
        outputs = batch.outputs.numpy()
        finite = outputs[-1] == 1.0  # (G, B)
        if not finite.all():
            raise nonfinite_scores(int((~finite).sum()), finite.size, self._under(~finite))
        self._add_records(batch.records, batch.norms)
        self._update_outputs(
            outputs[:-1],
            batch.labels,
            batch.ids,
            batch.transformed,
            batch.positions,
            batch.floors(),
        )
        if self.lie is not None:
            self._update_lie(center_crop(batch.pixels, self.margin))

    def _update_lie(self, pixels: torch.Tensor) -> None:
        """Lie derivatives of this batch's outputs (and, for PyTorch modules, each audited
        layer's contribution). Forward-mode AD needs autograd: inference mode is lifted here."""
        layers = []
        for state in self.layer_states:
            if state.info.spatial and state.grid is None:
                self.lie.skipped.setdefault(  # type: ignore[union-attr]
                    state.info.name, "sampling grid unknown: the generator's action is undefined"
                )
                continue
            layers.append((state.info.name, state.grid if state.info.spatial else None))
        with torch.inference_mode(False):
            batch = lie_batch(
                self.adapter,
                pixels.clone(),
                self.preprocessing,
                self.output_kind or "logits",
                layers=layers,
            )
        self.lie_steps = self.lie_steps or dict(batch.steps)
        self.lie.update(batch)  # type: ignore[union-attr]

    def lie_summary(self) -> dict | None:
        """summary.lie: output derivatives per generator, per-layer contributions, method."""
        if self.lie is None:
            return None
        return {
            "method": self.lie.method,
            "steps": self.lie_steps,
            "outputs": self.lie.output_rows(),
            "layers": self.lie.layer_rows(),
        }

    def _lie_columns(self, layer: str) -> dict[str, float | None]:
        """Per layer: the mean normalised contribution to the output Lie derivative per
        generator (None when not computed for this layer)."""
        per_generator = self.lie.layers.get(layer, {}) if self.lie is not None else {}
        return {
            f"lie_{g}": per_generator[g].compute()["mean"] if g in per_generator else None
            for g in LIE_GENERATORS
        }

    def _setup_label_action(self, num_classes: int) -> None:
        """Permutations P_g of the classes (identity everywhere unless declared), as ``(G, K)``
        tables, so that a batch is compared under every element at once: ``_perms[g, c] =
        P_g(c)`` on the host (expected classes), ``_inverse[g] = P_g^-1`` on the scores'
        device (moving the reference scores)."""
        self.label_action = build_label_action(
            self.config.label_action, num_classes, self.class_names, needed=self.elements
        )
        perms = [tuple(self.label_action.of(e)) for e in self.elements]
        self._perms = np.asarray(perms, dtype=np.int64).reshape(len(perms), num_classes)
        self._inverse = torch.tensor([invert(p) for p in perms], dtype=torch.int64)
        self._moves_labels = any(p != tuple(range(num_classes)) for p in perms)
        self._element_names = np.asarray([e.name for e in self.elements], dtype=object)
        self._confusion = [Counter() for _ in self.elements]

    def _output_rows(self, scores: torch.Tensor) -> torch.Tensor:
        """Compare every element with the identity under the declared label action:
        ``f(g x)`` against ``P_g f(x)`` (``P_g`` = identity for invariance), on the scores'
        device, for ``(G, B, K)`` scores.

        All elements at once: probabilities, top-1, JS divergence and logit error are computed
        on ``(G x B, K)`` rows (each row exactly as a per-element comparison computes it).
        Returns them as ``(rows, G, B)`` float64 (top-1, confidence, JS, then the logit error
        for logits), and last whether each image's scores were all finite (1 or 0): only these
        reach the host, in the batch's one copy (:meth:`_update_outputs` does the rest)."""
        kind = self.output_kind or "logits"
        g, b, k = scores.shape
        rows = scores.reshape(g * b, k)
        probs = probabilities(rows, kind)
        inverse = self._inverse
        if self._moves_labels and inverse.device != scores.device:
            inverse = self._inverse = inverse.to(scores.device)

        def reference(first: torch.Tensor) -> torch.Tensor:
            """``(B, K)`` identity rows -> ``(G x B, K)``: row ``(g, b)`` is ``P_g`` applied to
            row ``b``; ``(P_g p)[j] = p[P_g^-1(j)]`` moves the scores the way the labels
            should move."""
            if not self._moves_labels:
                return first.expand(g, b, k).reshape(g * b, k)
            return first[:, inverse].transpose(0, 1).reshape(g * b, k)

        on_device = [
            probs.argmax(dim=1).to(torch.float64),  # class indices, exact in float64
            probs.amax(dim=1),
            js_divergence(reference(probs[:b]), probs),
        ]
        if kind == "logits":
            on_device.append(normalised_logit_error(reference(rows[:b]), rows))
        on_device.append(torch.isfinite(rows).all(dim=1).to(torch.float64))
        return torch.stack(on_device).reshape(len(on_device), g, b)

    def _label_out_of_range(self, index: int) -> DataError:
        """The error for an image labelled with a class the model has no score for."""
        k = self._perms.shape[1]
        name = (
            self.class_names[index] if self.class_names and index < len(self.class_names) else None
        )
        named = f" ('{name}')" if name else ""
        return DataError(
            f"an image is labelled class {index}{named} but the model gives {k} class scores "
            f"(0 to {k - 1}): give the labels file of this model, in its class order"
        )

    def _update_outputs(
        self,
        host: np.ndarray,
        labels: torch.Tensor | None,
        ids: list[str],
        transformed: list[torch.Tensor | _D4Images],
        positions: list[int],
        floors: list[np.ndarray | None],
    ) -> None:
        """The bookkeeping of a batch's compared outputs (:meth:`_output_rows`, on the host
        without the finite row): accumulators, confusion counts, one predictions frame per
        batch, the gallery."""
        kind = self.output_kind or "logits"
        g, b = host.shape[1:]
        top1 = host[0].astype(np.int64)
        confidence, js = host[1], host[2]
        logit = host[3] if kind == "logits" else None
        element_rows = np.arange(g)[:, None]
        expected = self._perms[element_rows, top1[0]]  # (G, B): P_g of the reference's top-1
        agree = top1 == expected
        label = labels.cpu().numpy() if labels is not None else None
        if label is not None and label.size and int(label.max()) >= self._perms.shape[1]:
            raise self._label_out_of_range(int(label.max()))
        mask = label >= 0 if label is not None else None
        labelled = mask is not None and bool(mask.any())
        correct = top1 == self._perms[element_rows, np.maximum(label, 0)] if labelled else None
        OutputStats.update_rows(
            self.output_stats,
            agree,
            js,
            logit,
            correct[:, mask] if correct is not None else None,
            floors,
        )
        reference_top1 = top1[0].tolist()
        for counts, top1_g in zip(self._confusion, top1.tolist(), strict=True):
            counts.update(zip(reference_top1, top1_g, strict=True))
        # One frame per batch, rows image-major (image, then element): the audited order.
        self.predictions.append(
            pd.DataFrame(
                {
                    "image": np.repeat(np.asarray(ids, dtype=object), g),
                    "transform": np.tile(self._element_names, b),
                    "top1": top1.T.ravel(),
                    "expected": expected.T.ravel(),
                    "confidence": confidence.T.ravel(),
                    "label": np.repeat(label, g)
                    if label is not None
                    else np.full(g * b, -1, dtype=np.int64),
                    "agrees": agree.T.ravel(),
                    "js_divergence": js.T.ravel(),
                    "_order": (
                        np.asarray(positions, dtype=np.int64)[:, None] * g + np.arange(g)
                    ).ravel(),
                },
                columns=[*PREDICTION_COLUMNS, "_order"],
            )
        )
        self.gallery.update(
            ids,
            [e.name for e in self.elements],
            transformed,
            top1,
            confidence,
            js,
            agree,
            label,
            positions,
        )
        self.orbit.update(torch.from_numpy(agree.all(axis=0)))
        if labelled:
            self.orbit_correct.update(torch.from_numpy(correct.all(axis=0)[mask]))

    def predictions_frame(self) -> pd.DataFrame:
        """predictions.csv: one row per (image, element), images in audited order, elements in
        battery order (independent of batching and sharding)."""
        if not self.predictions:
            return pd.DataFrame(columns=PREDICTION_COLUMNS)
        frame = pd.concat(self.predictions, ignore_index=True)
        frame = frame.sort_values("_order", kind="stable").drop(columns="_order")
        return frame.reset_index(drop=True)

    def suggested_label_action(self) -> dict:
        """Per D4 element, the class each reference top-1 class most often becomes: the action
        the model actually learned (a confusion between f(x) and f(g x))."""
        suggestions = {}
        k = self.num_classes or 0
        for gi, element in enumerate(self.elements):
            if not isinstance(element, D4Element) or element.is_identity:
                continue
            mapping, support, share = [-1] * k, [0] * k, [None] * k
            by_source: dict[int, Counter] = {}
            for (i, j), count in self._confusion[gi].items():
                by_source.setdefault(i, Counter())[j] += count
            for i, counter in by_source.items():
                (j, count), total = counter.most_common(1)[0], sum(counter.values())
                mapping[i], support[i], share[i] = j, total, count / total
            complete = -1 not in mapping and sorted(mapping) == list(range(k))
            suggestions[element.name] = {
                "mapping": mapping,
                "support": support,
                "share": share,
                "is_permutation": complete,
                "spec": f"{element.name}={','.join(map(str, mapping))}" if complete else None,
            }
        return suggestions

    def _own_grid_d4_norms(
        self, element: D4Element, reference: torch.Tensor, a: torch.Tensor, nb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(||a||, ||T'b||, ||a - T'b||)`` (float64, :func:`image_norms`) for a D4 element
        acting on the map's own grid without a mask; ``||T'b|| = ||b||`` (a permutation of cells) is computed once per layer.

        On the CPU the difference is one pass into a reused buffer: numpy views rotate and flip
        without copying (negative strides), which torch tensors cannot; elsewhere ``T'b`` is
        one copy that ``a`` is subtracted from in place."""
        na = image_norms(a)
        if reference.device.type == "cpu" and reference.dtype == torch.float32:
            # One flat buffer per thread (layers may be compared on several), as large as the
            # largest map so far and viewed in each map's shape: new pages per layer (page
            # faults, zeroing) would cost more than the subtraction.
            thread, size = threading.get_ident(), reference.numel()
            flat = self._difference_buffers.get(thread)
            if flat is None or flat.size < size:
                flat = self._difference_buffers[thread] = np.empty(size, dtype=np.float32)
            buffer = flat[:size].reshape(reference.shape)
            view = d4_view(reference.numpy(), element.k, element.flip)
            with np.errstate(invalid="ignore"):  # Inf - Inf: NaN, counted as nonfinite
                np.subtract(view, a.numpy(), out=buffer)
            difference = torch.from_numpy(buffer)
        else:
            difference = wide(d4_apply(reference, element.k, element.flip)).sub_(a)
        return na, nb, image_norms(difference)

    @staticmethod
    def _whole_layers(act: torch.Tensor) -> bool:
        """Compare a layer's D4 elements all at once (:meth:`_own_grid_d4_layer`)? Off the CPU:
        there a layer costs a few kernels instead of a few per element. On the CPU the
        per-element path's numpy views (no copy of the moved reference) are faster."""
        return act.device.type != "cpu" or act.dtype != torch.float32

    @staticmethod
    def _all_own_grid(state: LayerState) -> bool:
        """Is every element but the identity a D4 action on the layer's own grid, with nothing
        that needs it alone (no reason to skip it, no channel map)?"""
        return (
            len(state.own_grid) > 1
            and all(state.own_grid[1:])
            and all(reason is None for reason in state.reasons)
            and state.channel_maps is None
        )

    def _own_grid_d4_layer(self, state: LayerState, act: torch.Tensor) -> None:
        """:meth:`_own_grid_d4_norms` for every non-identity element of a layer at once, for a
        GPU (:func:`d4_orbit_norms`): one Triton kernel, or one gather that moves the reference
        ``b`` under all of them (it reads the cells that :func:`d4_apply` would: the same
        values), then one subtraction and two norms. So the kernels per layer do not grow with
        the number of elements, nor the records to copy."""
        height, width = act.shape[-2:]
        norms = self._orbit_norms(act, self._d4_index(height, width, act.device))
        state.comparison[0] = "exact"
        self._records.append(_Record(state.stats[0], None, images=act.shape[1]))
        self._records.append(_Block(state.stats[1:], norms))

    def _orbit_norms(self, act: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """:func:`d4_orbit_norms`, fused where :func:`triton_d4.usable`. A kernel that does not
        build for this GPU (Triton's own error) leaves the torch ops for the rest of the audit,
        with a warning in the summary: same numbers, more device time."""
        if not self._fused_failed and triton_d4.usable(act):
            try:
                return d4_orbit_norms(act, index, fused=True)
            except torch.cuda.OutOfMemoryError:
                raise  # the batch's memory, not the kernel: handled as any other
            except Exception as error:  # Triton's compile errors share no base class
                self._fused_failed = True
                self.warnings.append(
                    f"the Triton kernel that compares a layer's D4 elements failed on "
                    f"{act.device} ({cause_line(error, 200)}); layers were compared with torch ops "
                    "instead: the same numbers, more GPU time"
                )
        return d4_orbit_norms(act, index)

    def _d4_index(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """:func:`d4_cell_index` of the audit's elements (the identity's row first), made once
        per map size and device."""
        key = (height, width, str(device))
        index = self._d4_indices.get(key)
        if index is None:
            elements: list[D4Element] = self.elements  # type: ignore[assignment]
            index = self._d4_indices[key] = d4_cell_index(elements, height, width, device)
        return index

    def _update_layers(
        self, layers: list[tuple[LayerState, torch.Tensor]], fit: torch.Tensor
    ) -> None:
        """Compare layers handed out together, on as many threads as the runtime runs the model
        on (:meth:`~eqaudit.models.base.ModelAdapter.host_threads`: onnxruntime's own, not
        torch's, for an ONNX model).

        The comparisons are numpy and torch passes that release the GIL, and the runtime is
        idle meanwhile: layers go to that many workers, each on one thread (no nested intra-op
        teams), largest first. A layer's state is touched by one worker
        only and every sum is exact (:mod:`eqaudit.metrics.exact`), so the numbers do not depend
        on the schedule."""
        workers = min(self.adapter.host_threads(), len(layers))
        on_cpu = all(act.device.type == "cpu" for _, act in layers)
        if workers < 2 or not on_cpu:
            for state, act in layers:
                self._update_layer(state, act, fit)
            return
        layers = sorted(layers, key=lambda pair: -pair[1].numel())

        def work(pair: tuple[LayerState, torch.Tensor]) -> None:
            self._update_layer(*pair, fit)

        if self._pool is None or self._pool_workers != workers:
            self.close()
            self._pool = ThreadPoolExecutor(
                workers, "eqaudit-compare", initializer=torch.set_num_threads, initargs=(1,)
            )
            self._pool_workers = workers
        for _ in self._pool.map(work, layers):  # re-raises a worker's error here
            pass

    @staticmethod
    def _add_records(records: list[_Record | _Block], norms: torch.Tensor | None) -> None:
        """Add a batch's records (:class:`_Record`, :class:`_Block`; their tensors brought to
        the host in one copy by :func:`_to_host`) to their accumulators.

        One copy per batch, not per (layer, element): on a GPU a copy per pair would make the
        host wait for the device at every layer of the forward. The errors are computed for every
        pair at once (:func:`errors_from_norms` is elementwise: the same values as one call per
        pair) and added with one vectorised update (:meth:`LayerStats.update_rows`)."""
        if not records:
            return
        sizes = [t.numel() for t in _record_tensors(records)]
        # The records' values come first; the image floors that may follow are not theirs.
        values = iter(torch.split(norms[: sum(sizes)], sizes) if norms is not None else ())
        # Per image count (one, unless a layer sees another batch): the accumulators of the
        # rows, and their norms as (3, rows, images) blocks; single pairs are stacked together
        # at the end (a row's place does not matter: each row updates its own accumulator).
        groups: dict[int, tuple[list[LayerStats], list[torch.Tensor]]] = {}
        singles: dict[int, tuple[list[LayerStats], list[torch.Tensor]]] = {}
        for record in records:
            if isinstance(record, _Block):
                block = next(values).view(record.norms.shape)
                stats, blocks = groups.setdefault(block.shape[-1], ([], []))
                stats.extend(record.stats)
                blocks.append(block)
                continue
            if record.norms is None:  # the identity: ||a - a|| = 0, both errors exactly 0
                zeros = torch.zeros(record.images, dtype=torch.float64)
                norms3 = [zeros, zeros, zeros]
            else:
                norms3 = [next(values), next(values), next(values)]
                if record.floor is not None:
                    # Over the images the row counts: not those whose maps are not finite
                    # (LayerStats.update_rows leaves them out of the errors), nor a NaN floor.
                    floor_values = next(values)
                    kept = floor_values.isfinite()
                    for norm in norms3:
                        kept &= norm.isfinite()
                    floor_values = floor_values[kept]
                    record.stats.floor_n += int(floor_values.numel())
                    record.stats.floor_sum.add(floor_values)
            stats, columns = singles.setdefault(norms3[0].numel(), ([], []))
            stats.append(record.stats)
            columns.extend(norms3)
        for width, (stats, columns) in singles.items():
            rows = torch.stack(columns).view(-1, 3, width).transpose(0, 1)  # (3, rows, images)
            group_stats, blocks = groups.setdefault(width, ([], []))
            group_stats.extend(stats)
            blocks.append(rows)
        for stats, blocks in groups.values():
            na, nb, nd = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
            relative, cosine = errors_from_norms(na, nb, nd)
            largest = torch.maximum(na, nb).numpy()
            LayerStats.update_rows(stats, relative.numpy(), cosine.numpy(), largest)

    def close(self) -> None:
        """Stop the comparison workers and drop the difference buffers and the cell-map
        tensors made on the device (GPU memory the next audit would count as used)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._difference_buffers.clear()
        drop_device_plans()

    def _update_layer(self, state: LayerState, act: torch.Tensor, fit: torch.Tensor) -> None:
        if self._whole_layers(act) and self._all_own_grid(state):
            self._own_grid_d4_layer(state, act)
            return
        reference = act[0]
        reference_norm: torch.Tensor | None = None  # ||b||, shared by the exact D4 elements
        for gi, element in enumerate(self.elements):
            fast = (
                state.own_grid[gi]
                and state.reasons[gi] is None
                and (state.channel_maps is None or state.channel_maps[gi] is None)
            )
            if fast:  # the common case: a D4 element on the map's own grid, no mask
                a = act[gi]
                if reference_norm is None:
                    reference_norm = image_norms(reference)
                norms = self._own_grid_d4_norms(element, reference, a, reference_norm)
                self._records.append(_Record(state.stats[gi], norms))
                continue
            if state.reasons[gi] is not None:
                continue
            if gi == 0:  # the identity is the reference itself: exactly zero, no work
                self._records.append(_Record(state.stats[0], None, images=reference.shape[0]))
                state.comparison[0] = "exact" if state.info.spatial else "invariance"
                continue
            if not state.info.spatial:
                a, b, mask, comparison = act[gi], reference, None, "invariance"
            else:
                try:
                    found = compare_on_grid(
                        element,
                        reference,
                        state.grid,
                        self.input_size,
                        state.stride,
                        self.config.misaligned,
                        self.config.padding_border,
                    )
                except NotMeasurable as why:
                    state.reasons[gi] = str(why)
                    continue
                action, comparison = found.action, found.comparison
                a, b, mask = act[gi], action.transformed, action.mask
            state.comparison[gi] = comparison
            # (a rotation by another angle on a map of unknown grid: naive, resampled all the
            # same, about the map's own centre; its floor is still the interpolation's)
            resampled = comparison == "resampled" or (
                comparison == "naive" and state.grid is None and not element.exact
            )
            floor = (
                resampled_floor(
                    element, reference, state.grid, self.input_size, self.config.padding_border
                )
                if resampled
                else None
            )
            self._records.append(_Record(state.stats[gi], map_norms(a, b, mask), floor))
            if state.channel_maps is not None and state.channel_maps[gi] is not None:
                state.channel_maps[gi].update(a, b, fit, mask)

    def _channel_maps(self, info: LayerInfo) -> list[Any] | None:
        """One channel-map accumulator per element, or None (with a note) for a layer too wide
        to fit its C x C statistics."""
        from eqaudit.metrics.channel_map import DEFAULT_MAX_CHANNELS as MAX_CHANNELS
        from eqaudit.metrics.channel_map import ChannelMapStats

        channels = info.shape[0] if info.shape else 0
        if channels > MAX_CHANNELS:
            self.geometry_notes.append(
                f"--channel-map: {info.name} has {channels} channels (> {MAX_CHANNELS}): no "
                "channel map fitted for it"
            )
            return None
        return [None if e.is_identity else ChannelMapStats(channels) for e in self.elements]

    # -- results -----------------------------------------------------------------------------
    @staticmethod
    def _grid_columns(state: LayerState) -> dict[str, float | None]:
        grid = state.grid
        if grid is None:
            stride = state.stride
            return {
                "stride_h": stride[0] if stride else None,
                "stride_w": stride[1] if stride else None,
                "offset_h": None,
                "offset_w": None,
            }
        return {
            "stride_h": float(grid.h.stride),
            "stride_w": float(grid.w.stride),
            "offset_h": float(grid.h.offset),
            "offset_w": float(grid.w.offset),
        }

    def geometry(self, rows: list[dict], size_choice: dict | None) -> dict:
        """summary.geometry: how the per-layer comparisons relate to the sampling grids."""
        spatial = [r for r in rows if r["kind"] == "spatial" and r["transform"] != "id"]
        sources = sorted({s.stride_source for s in self.layer_states if s.info.spatial})
        notes = list(self.geometry_notes)
        padded = sorted({r["layer"] for r in spatial if NO_FREE_CELLS in (r["reason"] or "")})
        if padded:
            notes.append(
                f"rotations by other angles: {len(padded)} "
                + ("layer" if len(padded) == 1 else "layers")
                + " ("
                + ", ".join(padded[:3])
                + (", ..." if len(padded) > 3 else "")
                + f") with no cell {NO_FREE_CELLS} (or of the rotated image's zero fill) at "
                f"{self.input_size[0]}x{self.input_size[1]}: their receptive field is too wide, "
                "so the rotations are not compared there; --padding-border include compares "
                "them on the whole disk"
            )
        return {
            "input_size": list(self.input_size),
            "size_choice": size_choice,
            "misaligned_mode": self.config.misaligned,
            "padding_border": self.config.padding_border,
            "grid_source": sources,
            "aligned_pairs": sum(1 for r in spatial if r["aligned"] is True),
            # compared although the element does not map the grid onto itself
            "misaligned_pairs": sum(1 for r in spatial if is_flagged(r)),
            "unknown_pairs": sum(1 for r in spatial if r["aligned"] is None),
            "notes": notes,
            # every layer left out as neither an image map nor flat features (the note names 3)
            "not_audited": self.not_audited,
        }

    def _mode(self, element: Transform) -> str:
        if self.label_action is None or self.label_action.of(element) == tuple(
            range(self.label_action.num_classes)
        ):
            return "invariance"
        return "equivariance"

    def output_rows(self) -> list[dict]:
        rows = []
        computed = {
            e.name: s.compute() for e, s in zip(self.elements, self.output_stats, strict=True)
        }
        for element in self.all_elements:
            row: dict[str, Any] = {
                "transform": element.name,
                "family": element.family,
                "mode": self._mode(element),
                "exact": element.exact,
            }
            if element.name in computed:
                row.update(computed[element.name])
                row["skipped"] = None
            else:
                row.update(
                    {
                        k: None
                        for k in (
                            "n",
                            "agreement",
                            "agreement_low",
                            "agreement_high",
                            "js_divergence",
                            "logit_error",
                            "accuracy",
                            "interpolation_floor",
                        )
                    }
                )
                row["skipped"] = self.skipped[element.name]
            rows.append(row)
        return rows

    def settle_channel_maps(self) -> None:
        """Bring every channel map's sums made on a GPU to the host, in one copy."""
        from eqaudit.metrics.channel_map import settle_all

        settle_all(
            half
            for state in self.layer_states
            for stats in state.channel_maps or ()
            if stats is not None
            for half in (stats.fit, stats.eval)
            if half is not None
        )

    def zero_layers_warning(self) -> str | None:
        """One line for the layers whose maps are zero on every image (:attr:`LayerState.zero`),
        left out of the scores, or None."""
        zero = [state.info.name for state in self.layer_states if state.zero]
        if not zero:
            return None
        shown = ", ".join(zero[:3]) + (f" and {len(zero) - 3} more" if len(zero) > 3 else "")
        return (
            f"{len(zero)} layer(s) are zero on every image under every transform ({shown}): "
            "their errors of 0 measure nothing, and are left out of the scores (a dead ReLU or "
            "an unused branch?)"
        )

    def nonfinite_warning(self) -> str | None:
        """One line for the layers whose maps held NaN or Inf for some images (left out of
        their numbers, :class:`LayerStats`), or None."""
        hit = [
            (state.info.name, element.name, stats)
            for state in self.layer_states
            for element, stats in zip(self.elements, state.stats, strict=True)
            if stats.nonfinite
        ]
        if not hit:
            return None
        layers = list(dict.fromkeys(name for name, _, _ in hit))
        name, element, stats = hit[0]
        return (
            f"{len(layers)} layer(s) gave NaN or Inf activations, or norms past float range, for "
            f"some images (first: {name} under {element}, {stats.nonfinite} of "
            f"{stats.n + stats.nonfinite} images); those comparisons are left out of the "
            "layers' numbers (see the reason column): check the model's numerics there"
        )

    def layer_rows(self) -> list[dict]:
        self.settle_channel_maps()
        rows = []
        for state in self.layer_states:
            info = state.info
            for gi, element in enumerate(self.elements):
                base = {
                    "layer": info.name,
                    "op": info.op,
                    "index": info.index,
                    "kind": state.kind,
                    "transform": element.name,
                    "shape": "x".join(str(d) for d in info.shape or ()),
                    "stride": "x".join(f"{s:g}" for s in state.stride) if state.stride else None,
                    "stride_source": state.stride_source,
                    **self._grid_columns(state),
                    "aligned": state.aligned[gi],
                    "comparison": state.comparison[gi],
                    "scored": state.scored(gi, element),
                }
                reason = state.reasons[gi]
                if reason is None:
                    stats = state.stats[gi]
                    base.update(stats.compute(), measurable=stats.n > 0, reason=None)
                    del base["n"]
                    if state.aligned[gi] is False and state.comparison[gi] == "naive":
                        base["reason"] = (
                            "misaligned: "
                            + misaligned_reason(element, state.grid, self.input_size)
                            + "; compared on the map's own grid, kept out of layer scores"
                        )
                    elif state.comparison[gi] == "naive" and state.grid is None:
                        base["reason"] = "sampling grid unknown" + (
                            f" ({state.grid_note})" if state.grid_note else ""
                        )
                    if stats.nonfinite:
                        reasons = (base["reason"], _nonfinite_reason(stats))
                        base["reason"] = "; ".join(r for r in reasons if r)
                else:
                    base.update(
                        relative_error=None,
                        relative_error_p95=None,
                        relative_error_max=None,
                        cosine_distance=None,
                        interpolation_floor=None,
                        measurable=False,
                        reason=reason,
                    )
                if self.config.channel_map:
                    base.update(self._channel_columns(state, gi))
                if self.lie is not None:
                    base.update(self._lie_columns(info.name))
                rows.append(base)
        return rows

    @staticmethod
    def _channel_columns(state: LayerState, gi: int) -> dict[str, Any]:
        """--channel-map: the error after the fitted 1x1 channel map (held-out half), the naive
        error pooled over the same cells, and whether the fitted map is a channel permutation
        (each row's weight almost all on one channel, rows on distinct channels)."""
        stats = state.channel_maps[gi] if state.channel_maps is not None else None
        if stats is None or state.reasons[gi] is not None:
            return {
                "fitted_relative_error": None,
                "pooled_relative_error": None,
                "channel_map_permutation": None,
            }
        found = stats.compute()
        share = found.get("row_peak_share_min")
        fitted, matched = found.get("fitted_error"), found.get("permutation_error")
        # A permutation that explains the map, not one read into noise: the fitted map's rows
        # peak on distinct channels, and it fits (permutation_summary's docstring).
        permutes = (
            bool(found.get("is_permutation"))
            and share is not None
            and share >= 0.9
            and fitted is not None
            and fitted <= PERMUTATION_ERROR
        )
        if not permutes and fitted is not None and matched is not None:
            # A singular fit spreads a permutation's rows over collinear channels: the channels
            # permute when the matched permutation itself does as well as the fitted map, and
            # does well (unrelated noise: fitted 0.96, a chance pairing 0.70, 2x within).
            permutes = matched <= max(2.0 * fitted, 1e-6) and matched <= PERMUTATION_ERROR
        return {
            "fitted_relative_error": found.get("fitted_error"),
            "pooled_relative_error": found.get("naive_error"),
            "channel_map_permutation": permutes if found.get("fitted_error") is not None else None,
        }

    def scores(self, outputs: list[dict]) -> dict:
        measured = [r for r in outputs if r["skipped"] is None and r["transform"] != "id"]
        score = robustness_score(
            [r["agreement"] for r in measured], [r["js_divergence"] for r in measured]
        )
        worst = min(measured, key=lambda r: (r["agreement"] + 1 - r["js_divergence"]) / 2)
        accuracies = [r["accuracy"] for r in outputs if r.get("accuracy") is not None]
        identity = outputs[0]
        return {
            "robustness_score": score,
            "mean_agreement": float(np.mean([r["agreement"] for r in measured])),
            "mean_js_divergence": float(np.mean([r["js_divergence"] for r in measured])),
            "orbit_consistency": self.orbit.compute(),
            "worst_transform": worst["transform"],
            "worst_agreement": worst["agreement"],
            "clean_accuracy": identity.get("accuracy"),
            "worst_accuracy": min(accuracies) if accuracies else None,
            "orbit_accuracy": self.orbit_correct.compute() if self.orbit_correct.n else None,
            **self._layer_scores(),
        }

    def _layer_scores(self) -> dict:
        """Mean relative error over the scored (layer, element) rows, identity excluded:
        misaligned pairs and unknown grids are kept out (DESIGN.md section 4)."""
        values, worst = [], None
        for state in self.layer_states:
            for gi, element in enumerate(self.elements):
                if element.is_identity or not state.scored(gi, element):
                    continue
                error = state.stats[gi].compute()["relative_error"]
                values.append(error)
                if worst is None or error > worst[0]:
                    worst = (error, state.info.name, element.name)
        return {
            "layer_relative_error": float(np.mean(values)) if values else None,
            "worst_layer": {"layer": worst[1], "transform": worst[2], "relative_error": worst[0]}
            if worst
            else None,
        }


def _load_workers(engine: Engine) -> int:
    """Image loader threads: the default beside a GPU (the host is idle while the device runs
    the model); on the CPU only the cores the model's runtime leaves free, so that loading does
    not slow the model down (1: load each batch when it is needed, no threads)."""
    workers = default_load_workers()
    if engine.config.device.startswith("cuda"):  # (an ONNX model's activations come to the host)
        return workers
    return max(1, min(workers, usable_cpus() - engine.adapter.host_threads()))


def _images_per_step(
    engine: Engine, adapter: ModelAdapter, config: AuditConfig, preprocessing: Preprocessing
) -> int:
    """The memory guard, on the memory where the activations live: the host's, or the GPU's
    free memory for a PyTorch model on CUDA (then, without --batch-size, the batch is sized from
    one probe's peak memory per forward image); for an ONNX model on CUDA, the less of both."""
    if not (config.device.startswith("cuda") and adapter.backend == "torch"):
        available = available_memory()
        if config.device.startswith("cuda") and torch.cuda.is_available():
            # onnxruntime's CUDA provider holds the layers it hands out on the GPU too, until
            # the end of the run (free memory read through torch, when torch sees the GPU).
            gpu = free_memory(config.device)
            if gpu is not None:
                available = gpu if available is None else min(available, gpu)
        return engine.images_per_step(config.batch_size, available)
    if config.batch_size is not None:  # sized by the user: only the guard, no probe forward
        return engine.images_per_step(config.batch_size, free_memory(config.device))
    g = len(engine.elements)
    height, width = adapter.input_spec.size
    image = probe_image(preprocessing.pixel_channels, height, width)
    probe = preprocessing.normalise(image.expand(g, -1, -1, -1).contiguous())
    torch.cuda.synchronize(config.device)
    torch.cuda.reset_peak_memory_stats(config.device)
    before = torch.cuda.memory_allocated(config.device)
    with torch.inference_mode():
        adapter.run(probe)
    peak = torch.cuda.max_memory_allocated(config.device) - before
    return engine.images_per_step(
        config.batch_size, free_memory(config.device), forward_bytes=max(peak // g, 1)
    )


def _sequences_note(sequences: dict[str, Any]) -> str:
    """What the geometry notes say of the layers that are token sequences (TokenLayout's)."""
    names = list(sequences)
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    count = (
        f"{len(names)} layers are token sequences"
        if len(names) > 1
        else "1 layer is a token sequence"
    )
    prefixes = sorted({layout.prefix for layout in sequences.values()} - {0})
    many = sum(prefixes) > 1  # (distinct counts: several, or one of more than 1)
    left = (
        f"; the {' or '.join(map(str, prefixes))} token{'s' if many else ''} in front of the "
        f"patches (a class token, register tokens) {'are' if many else 'is'} left out"
        if prefixes
        else ""
    )
    return (
        f"{count} ({shown}): each is compared as the map of its patch tokens, on the patch "
        f"grid{left}"
    )


def _resize_to(adapter: ModelAdapter, size: tuple[int, int]) -> None:
    """Set a dynamic-size model's input size again (``with_input_size`` only fixes it once)."""
    adapter.input_spec = replace(adapter.input_spec, height=None, width=None)
    adapter.with_input_size(*size)


def _runs_at(adapter: ModelAdapter, requested: tuple[int, int]) -> Callable[[tuple], bool]:
    """``runs(size)``: does the model run one image at ``size`` (a zero image, once)? What
    ``--input-size aligned`` asks of a size before it picks it; the adapter is left at
    ``requested``."""

    def runs(size: tuple[int, int]) -> bool:
        _resize_to(adapter, size)
        try:
            with torch.inference_mode():
                adapter.run(torch.zeros(1, adapter.input_spec.channels, *size))
            return True
        except Exception:  # the model's own error at this size: not a size to pick
            return False
        finally:
            _resize_to(adapter, requested)

    return runs


def choose_input_size(
    adapter: ModelAdapter, config: AuditConfig, elements: list[Transform]
) -> SizeChoice:
    """``--input-size aligned[:N]``: fix the adapter at the nearest size where every layer's
    sampling grid is aligned under the battery's D4 elements; refuse with advice when the model
    cannot take another size or its grids are unknown."""
    spec = adapter.input_spec
    fixed = spec.height is not None and spec.width is not None
    requested = config.input_size or ((spec.height, spec.width) if fixed else None)
    if requested is None:
        raise UsageError(
            "--input-size aligned needs a size to start from for a model with dynamic H and W: "
            "write --input-size aligned:224 (or aligned:HxW)"
        )
    if fixed and requested != (spec.height, spec.width):
        raise UsageError(
            f"the model's input is fixed at {spec.height}x{spec.width}: it cannot take "
            f"{requested[0]}x{requested[1]}; use --input-size aligned alone"
        )
    adapter.with_input_size(*requested)
    graph, note = adapter.grid_graph(), adapter.grid_graph_note
    runs = _runs_at(adapter, requested)
    traced_at: Callable[[tuple[int, int]], GridGraph | None] | None = None
    if adapter.traced_per_size and not fixed:
        traced_at = _traces(adapter, requested, graph)
        if graph is None and not runs(requested):
            # A module that cannot run at the requested size (an HRNet's branches at 60) is
            # traced at the nearest size it runs at.
            graph = _traced_near(traced_at, requested)
    if graph is None:
        why = note or "TorchScript, or a module torch.export cannot trace"
        raise UsageError(
            "--input-size aligned needs the model's sampling grids, and this model's graph does "
            f"not give them ({why}): pass a size with --input-size N"
        )
    grids = graph.grids(*requested)
    layers = [grids.get(layer.name) for layer in adapter.layers()]
    if not any(g is not None and not isinstance(g, str) for g in layers):
        first = next(iter(adapter.layers()), None)
        reason = first and graph.unknown_reason(first.name, *requested)
        stop = f"the first layer's is unknown: {reason}" if reason else "see 'eqaudit inspect'"
        raise UsageError(
            "--input-size aligned needs the model's sampling grids, and no map of this model's "
            f"graph has a known one ({stop}): pass a size with --input-size N"
        )
    if fixed:  # nothing to choose: say which layers cannot be compared exactly
        return replace(choose_aligned_size(graph, requested, elements, max_distance=0), fixed=True)
    judge = None if traced_at is None else _python_sizes(graph, traced_at, requested)
    choice = choose_aligned_size(graph, requested, elements, runs=runs, graph_at=judge)
    if traced_at is not None and judge is None and choice.chosen not in (None, requested):
        # (the audit's own trace at the size picked must agree, or every size is traced)
        needed = alignment_elements(elements, requested[0] == requested[1])
        traced = traced_at(choice.chosen)
        if traced is None or misaligned_tensors(traced, choice.chosen, needed) != []:
            choice = choose_aligned_size(graph, requested, elements, runs=runs, graph_at=traced_at)
    if choice.chosen is not None and choice.chosen != requested:
        _resize_to(adapter, choice.chosen)
    return choice


def _traces(
    adapter: ModelAdapter, requested: tuple[int, int], graph: GridGraph | None
) -> Callable[[tuple[int, int]], GridGraph | None]:
    """``traced_at(size)``: a module's grid graph traced at ``size`` (cached; ``graph``: its
    trace at ``requested``, where the adapter is left)."""
    traces: dict[tuple[int, int], GridGraph | None] = {requested: graph}

    def traced_at(size: tuple[int, int]) -> GridGraph | None:
        if size not in traces:
            _resize_to(adapter, size)
            try:
                traces[size] = adapter.grid_graph()
            finally:
                _resize_to(adapter, requested)
        return traces[size]

    return traced_at


def _traced_near(
    traced_at: Callable[[tuple[int, int]], GridGraph | None], requested: tuple[int, int]
) -> GridGraph | None:
    """A module's trace at the nearest size to ``requested`` where it traces (within the
    aligned search's reach)."""
    for d in range(1, search_reach(requested) + 1):
        for step in (d, -d):
            size = (requested[0] + step, requested[1] + step)
            graph = traced_at(size) if min(size) >= 1 else None
            if graph is not None:
                return graph
    return None


def _python_sizes(
    graph: GridGraph,
    traced_at: Callable[[tuple[int, int]], GridGraph | None],
    requested: tuple[int, int],
) -> Callable[[tuple[int, int]], GridGraph | None] | None:
    """``traced_at`` when a module computes sizes in Python (TF-style "same" pads, a U-Net's
    crop), which its trace freezes: its traces at the sizes beside the requested one differ
    from the replay of ``graph`` there, so each size the aligned search weighs must be judged
    on its own trace (a size picked by the replay alone was audited on grids that were not the
    model's: exact rows, scored, at 0.1). None when they agree: the replay serves."""
    for step in (1, -1):
        size = (requested[0] + step, requested[1] + step)
        traced = traced_at(size) if min(size) >= 1 else None
        if traced is not None and traced.grids(*size) != graph.grids(*size):
            return traced_at
    return None


def audit(
    model: str | Path | Any,
    transforms: str = "d4",
    data: str | Path | np.ndarray | None = None,
    *,
    config: AuditConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> AuditResult:
    """Audit a classifier and return the result object the CLI writes.

    ``model`` is a path (.onnx, .pt2, TorchScript, state dict with ``factory=``), an
    ``nn.Module`` or an ``onnx.ModelProto``; ``data`` a folder, a .npy/.npz file, an array
    ``(N, H, W, C)``/``(N, C, H, W)``, or None for synthetic images. ``options`` are the fields of
    :class:`~eqaudit.config.AuditConfig` (``input_size=224``, ``preset="imagenet"``, ...).
    ``progress(done, total)`` is called after each batch.

    An ``nn.Module`` is audited in eval mode on ``device`` and handed back as it came: each
    submodule's train/eval mode and each tensor's device are restored, also after an error. One
    whose weights are not all float32 is audited as a float32 copy, so its own weights are not
    rounded.
    """
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if config is not None and (options or transforms != "d4"):
        given = ", ".join([*(["transforms"] if transforms != "d4" else []), *options])
        raise UsageError(
            f"audit() takes the options in config= or as keyword arguments, not both: {given} "
            "would be ignored; put them in the AuditConfig (dataclasses.replace(config, ...))"
        )
    fields = [f.name for f in dataclasses.fields(AuditConfig)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        # (--no-layers is layers=False: no spelling of it is close to a field's name)
        hint = "layers=False" if unknown[0] == "no_layers" else (close[0] if close else None)
        raise UsageError(
            f"audit() has no option {unknown[0]!r}"
            + (f": did you mean {hint}?" if hint else f"; its options: {', '.join(fields)}")
        )
    if config is None:  # (AuditConfig takes the command line's text and Python values)
        config = AuditConfig(
            transforms=transforms,
            data=None if data is None or isinstance(data, np.ndarray) else str(data),
            **options,
        )
    threads, limit = config.threads, cpu_limit()
    if threads is None and limit is not None and torch.get_num_threads() > limit:
        # A container's CPU limit: torch's default, a thread per core of the machine, would be
        # throttled (onnxruntime's adapter keeps to the limit the same way).
        threads = limit
    with torch_threads(threads), kept_as_given(model), _kept_random_state(config.device):
        return _audit(model, config, data, progress, started, started_at)


def _with_note(block: dict, note: str | None) -> dict:
    """``block`` with ``note`` added to its notes (a note the engine decided in the run, which
    the context, compared between shards, does not hold: an empty shard never decides it)."""
    return {**block, "notes": [*block.get("notes", []), note]} if note else block


def _repeated_class_names(names: list[str]) -> str | None:
    """``'crane' (classes 134 and 517)`` for each name given to several classes (three at most
    named), or None."""
    repeated = repeated_names(names, range(len(names)), "class")
    if not repeated:
        return None
    shown = [f"'{name}' ({where})" for name, where in list(repeated.items())[:3]]
    return ", ".join(shown) + (f" and {len(repeated) - 3} more" if len(repeated) > 3 else "")


@contextlib.contextmanager
def _kept_random_state(device: str) -> Iterator[None]:
    """torch's random state as the caller left it, after the audit seeded it (the seed drives
    any randomness in the model): a training loop that audits its checkpoints keeps its own
    stream. The CPU generator's, and that of the CUDA device the audit runs on."""
    cpu = torch.random.get_rng_state()
    cuda: tuple[int, torch.Tensor] | None = None
    if device.startswith("cuda"):
        with contextlib.suppress(Exception):  # (no CUDA here: the audit says so itself)
            index = torch.device(device).index
            index = torch.cuda.current_device() if index is None else index
            cuda = (index, torch.cuda.get_rng_state(index))
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            with contextlib.suppress(Exception):
                torch.cuda.set_rng_state(cuda[1], cuda[0])


def _audit(
    model: str | Path | Any,
    config: AuditConfig,
    data: str | Path | np.ndarray | None,
    progress: Callable[[int, int], None] | None,
    started: float,
    started_at: str,
) -> AuditResult:
    """:func:`audit` once its options are an :class:`~eqaudit.config.AuditConfig`."""
    elements = parse_transforms(config.transforms, config.shift_mode)
    preprocessing = make_preprocessing(
        preset=config.preset,
        channels=config.channels,
        scale=config.scale,
        mean=config.mean,
        std=config.std,
        resize=config.resize,
    )
    adapter = load_model(
        model,
        factory=config.factory,
        trust_pickle=config.trust_pickle,
        input_name=config.input_name,
        output_name=config.output_name,
        layout=config.layout,
        providers=config.providers,
        threads=config.threads,
        channels=CHANNEL_COUNTS.get(config.channels or ""),  # for a model that does not say
        # --input-size aligned:N starts a search at N; the size is fixed once it is chosen.
        input_size=None if config.align_input else config.input_size,
    )
    size_choice = None
    notes: list[str] = list(adapter.load_notes)
    if config.align_input:
        size_choice = choose_input_size(adapter, config, elements)
    elif config.input_size is not None:
        adapter.with_input_size(*config.input_size)
    elif None in (adapter.input_spec.height, adapter.input_spec.width):
        size = array_image_size(data)
        if size is not None:  # (from Python: an array's images fix the size a module takes)
            adapter.with_input_size(*size)
            notes.append(
                f"input size {size[0]}x{size[1]}: the array's images (input_size= sets it)"
            )
    place(adapter, config.device)
    channels = _resolve_channels(adapter, config, notes)
    if channels != preprocessing.channels and channels is not None:
        preprocessing = replace(preprocessing, channels=channels)
    preprocessing = _integer_pixels(adapter, config, preprocessing, notes)
    engine = Engine(adapter, elements, preprocessing, config)
    divides = _scales_pixels_itself(adapter, config, preprocessing)
    if divides:
        engine.warnings.append(divides)
    if engine.margin and preprocessing.resize != "center":  # (center: the same pixels)
        notes.append(
            f"the shifts cut their windows from images resized to their size plus "
            f"{2 * engine.margin} pixels (--shift-mode crop): every element's numbers, the "
            "identity's included, differ slightly from a battery without shifts"
        )
    if config.threads is not None and config.threads > usable_cpus():
        engine.warnings.append(
            f"--threads {config.threads} is more than the {usable_cpus()} CPUs this process may "
            "use: the runtimes' threads will take turns and the audit will be slow; use "
            f"--threads {usable_cpus()} or fewer"
        )
    size = adapter.input_spec.size
    source_data = data if data is not None else config.data
    source: ImageSource = open_images(
        source_data,
        size=size,
        margin=engine.margin,
        channels=preprocessing.pixel_channels,
        resize=preprocessing.resize,
        num_images=config.num_images,
        seed=config.seed,
        labels=config.labels,
    )
    engine.class_names = source.class_names or getattr(adapter, "class_names", None)
    engine.class_names_from = "labels" if source.class_names else "model"
    repeated = _repeated_class_names(engine.class_names or [])
    if repeated:
        # Allowed where no name has to pick a class (ImageNet's usual lists name two classes
        # 'crane'): said, since the report then shows two classes under one name.
        engine.warnings.append(
            f"the class names repeat {repeated}: the report shows those classes under one name"
        )
    engine.setup()
    layers_note = getattr(adapter, "layers_note", lambda: None)()
    if engine.layer_states and layers_note:
        notes.append(layers_note)
    images_per_step = _images_per_step(engine, adapter, config, preprocessing)
    positions = range(len(source))
    if config.shard is not None:
        positions = shard_range(len(source), *config.shard)
        engine.images_seen = positions.start
    total, done = len(positions), 0
    # The CPU generator and the audit's own device's, not torch.manual_seed's every device:
    # a caller training on cuda:0 while auditing on the CPU keeps its stream (restored after
    # the audit, see _kept_random_state).
    torch.random.default_generator.manual_seed(config.seed)
    if engine.device.type == "cuda":
        with torch.cuda.device(engine.device):
            torch.cuda.manual_seed(config.seed)
    # no_grad, not inference_mode: inference tensors have no version counter, which the torch
    # adapter reads to know which captured activations a forward overwrites in place.
    try:
        with (
            torch.no_grad(),
            ieee_float32(config.device),
            host_threads(str(engine.device)),  # only where the activations live on a GPU
            contextlib.ExitStack() as stack,
        ):
            # Batch k + 1 is launched before batch k is finished: on a GPU the host's
            # bookkeeping of k overlaps the device's forward of k + 1 (on the CPU the order
            # changes nothing). Images load ahead on threads (eqaudit.data.prefetch).
            cpu_threads = adapter.host_threads()  # as they run (1 beside a GPU: host_threads)
            pending: _Launched | None = None
            batches = source.iter_batches(
                images_per_step,
                positions.start,
                positions.stop,
                workers=_load_workers(engine),
                pin=engine.device.type == "cuda",
            )
            stack.callback(batches.close)  # stops the loader threads, also on an error
            for batch in itertools.chain(batches, [None]):  # None: finish the last one
                launched = engine.launch(batch.pixels, batch.labels, batch.ids) if batch else None
                if pending is not None:
                    engine.finish(pending)
                    if engine.layer_states:  # only activations are large enough to fragment
                        release_freed_memory()
                    done += len(pending.ids)
                    if progress is not None:
                        progress(done, total)
                pending = launched
    finally:
        engine.close()

    description = source.description
    spec = adapter.input_spec
    context = {
        "eqaudit": _versions(),
        "model": {
            "path": shown_path(adapter.path),
            "name": adapter.path.name,
            "sha256": adapter.sha256,
            "backend": adapter.backend,
            **adapter.describe(),
            "input": spec.to_dict(),
        },
        "preprocessing": {**preprocessing.to_dict(), "notes": notes},
        "transforms": {
            "spec": config.transforms,
            "shift_mode": config.shift_mode,
            "margin": engine.margin,
            "elements": [
                {**e.to_dict(), "skipped": engine.skipped[e.name]} for e in engine.all_elements
            ],
        },
        "data": {**description.to_dict(), "path": shown_path(description.path)},
        "seed": config.seed,
        "options": {
            **config.to_dict(),
            "data": shown_path(config.data),
            "labels": shown_path(config.labels),
            "shard": None,
        },
        "size_choice": size_choice.to_dict() if size_choice else None,
        "run": {
            "started_at": started_at,
            "host": platform.node(),
            "images_per_step": images_per_step,
            # the model's runtime's threads (torch's or onnxruntime's); the comparisons' too
            "cpu_threads": cpu_threads,
            "argv": sys.argv[1:] if sys.argv and Path(sys.argv[0]).name == "eqaudit" else None,
        },
    }
    from eqaudit.shard import empty_shard_result, shard_result

    if config.shard is not None and not len(positions):  # more shards than images
        return empty_shard_result(engine, context, config.shard, positions)
    result = build_result(engine, context, time.perf_counter() - started, len(positions))
    if config.shard is None:
        return result
    return shard_result(result, engine, context, config.shard, positions)


def _nonfinite_reason(stats: LayerStats) -> str:
    total = stats.n + stats.nonfinite
    return (
        f"{stats.nonfinite} of {total} images gave NaN or Inf activations (or norms past "
        "float range) and are left out"
    )


def build_result(
    engine: Engine, context: dict, duration: float, audited: int | None = None
) -> AuditResult:
    """The AuditResult of an engine's accumulated state and the run's context (everything in
    the summary that does not come from the images): a single run and merged shards both end
    here, which is what makes a merge equal to a single run. ``audited``: the images this
    engine saw, when fewer than the data's (a shard)."""
    data = context["data"]
    warnings = list(engine.warnings)
    seen = int(data["count"]) if audited is None else audited
    predictions = engine.predictions_frame()
    constant = engine.constant_output_warning(seen)
    one_class = one_class_warning(predictions, engine.elements[0].name, engine.class_names)
    if constant or one_class:
        warnings.append(constant or one_class)
    nonfinite = engine.nonfinite_warning()
    if nonfinite:
        warnings.append(nonfinite)
    zero = engine.zero_layers_warning()
    if zero:
        warnings.append(zero)
    skipped = skipped_images_warning(data)
    if skipped:
        warnings.append(skipped)
    if data.get("synthetic"):
        warnings.insert(
            0,
            "SYNTHETIC INPUTS: no --data was given, so these numbers come from generated images "
            "and do not reflect the model's behaviour on real inputs; pass --data DIR",
        )
    outputs = engine.output_rows()
    layer_rows = engine.layer_rows()
    size_choice = context.get("size_choice")
    notes = list(engine.run_notes)
    if size_choice is not None:
        notes.insert(0, size_choice["note"])
    summary = make_summary(
        eqaudit=context["eqaudit"],
        model={
            **context["model"],
            "output_kind": engine.output_kind,
            "output_kind_source": engine.output_kind_source,
            **({"binary": engine.binary} if engine.binary else {}),
            "num_classes": engine.num_classes,
            "class_names": engine.class_names,
            "layers_audited": len(engine.layer_states),
        },
        preprocessing=_with_note(context["preprocessing"], engine.binary_note()),
        transforms=context["transforms"],
        data=data,
        seed=context["seed"],
        options=context["options"],
        warnings=warnings,
        label_action={
            **engine.label_action.to_dict(),
            "suggested": engine.suggested_label_action(),
        },
        scores=engine.scores(outputs),
        outputs=outputs,
        layers=layer_rows,
        geometry=engine.geometry(layer_rows, size_choice),
        **({"lie": engine.lie_summary()} if engine.lie is not None else {}),
        run={
            "started_at": context["run"]["started_at"],
            "duration_s": round(duration, 3),
            "host": context["run"]["host"],
            "images_per_step": context["run"]["images_per_step"],
            "cpu_threads": context["run"].get("cpu_threads"),
            "notes": notes,
            "argv": context["run"]["argv"],
        },
    )
    return AuditResult(summary=summary, predictions=predictions, gallery=engine.gallery.to_dict())


#: Fewer images than this may well share one class: no warning.
ONE_CLASS_MIN_IMAGES = 8


def one_class_warning(
    predictions: pd.DataFrame, identity: str, class_names: list[str] | None
) -> str | None:
    """A warning when every image's top-1 class is the same, unless the labels say that the
    images are all of that one class: agreement is then near certain whatever the model does
    to the images, the usual sign of wrong preprocessing or a broken model (the scores vary,
    so the constant-output warning does not fire)."""
    rows = predictions[predictions["transform"] == identity]
    classes = rows["top1"].unique()
    if len(rows) < ONE_CLASS_MIN_IMAGES or len(classes) != 1:
        return None
    labels = rows.loc[rows["label"] >= 0, "label"].unique()
    if len(labels) == 1:
        return None  # (one class audited on purpose)
    k = int(classes[0])
    name = f"{k} '{class_names[k]}'" if class_names and k < len(class_names) else str(k)
    why = (
        f"though the labels span {len(labels)} classes"
        if len(labels) > 1
        else "if the images span several classes, this is wrong"
    )
    return (
        f"all {len(rows)} images get the same top-1 class ({name}; {why}): agreement is near "
        "certain whatever the transforms do, so the scores say little; check the "
        "preprocessing (--preset, --scale, --mean, --std) and the model"
    )
