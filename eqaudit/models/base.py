"""The model adapter interface: one contract for every backend.

Design
------
The engine asks a model exactly one thing: *run this batch; return the class scores and the named
intermediate activations I asked for*. Everything backend-specific (how a file is loaded, how
activations are captured, the graph's memory layout, a batch size fixed at 1) lives behind that
question, in a subclass that implements a few small ``_impl`` methods. The base class does the
parts every backend needs done the same way, Polygraphy-style:

* validates the batch (rank, channels, spatial size) against the :class:`InputSpec`;
* converts the canonical layout to the model's (NCHW -> NHWC where the graph wants it);
* splits the batch when the model accepts a fixed batch size (padding the last chunk);
* brings scores to a ``(B, K)`` float tensor and refuses non-classifier outputs;
* brings activations to canonical form: spatial maps ``(B, C, H, W)``, flat features ``(B, D)``
  (a ``1 x 1`` map after global pooling is flat: it has no spatial axes to transform);
* raises :class:`~eqaudit.errors.ModelRunError` (exit code 3) for runtime failures and for
  NaN/Inf scores, with a message that says what to do.

Canonical batch: a ``torch.float32`` tensor ``(B, C, H, W)``, already normalised (mean/std,
channel order, pixel scale) by the data pipeline; transforms act *before* normalisation.

Layers: :meth:`ModelAdapter.layers` lists the auditable intermediate tensors in execution order
(ONNX: float node outputs; PyTorch: module outputs named by module path). Their shapes are learnt
from a probe run (:meth:`ModelAdapter.probe_layers`), because many graphs do not declare them.
Their sampling grids (where each cell sits in the input) come from the graph, replayable at any
input size: :meth:`ModelAdapter.grid_graph` (see :mod:`eqaudit.grids`).

Streaming: ``run(batch, layers, sink=f)`` hands each canonical activation to ``f(name, tensor)``
instead of returning it. A backend that can (``streams_activations``: PyTorch forward hooks) calls
the sink *while the forward runs*, with the live tensor: the engine reduces a layer to a few
numbers per image before a later in-place op overwrites it, so nothing is cloned or kept, and the
memory held is the forward's own. The tensor is valid only during the call. Other backends (an
ONNX session hands out every output at the end), and batches split into fixed-size chunks, call
the sink after the run, once per layer, with the whole batch.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from eqaudit.errors import ModelRunError, UnsupportedModelError, UsageError, cause_line

if TYPE_CHECKING:
    from eqaudit.grids import GridGraph, TokenLayout

LAYOUTS = ("NCHW", "NHWC")


def layout_option(layout: str | None) -> str | None:
    """``--layout`` upper-cased, refused unless it is NCHW or NHWC (None: not given)."""
    if layout is None:
        return None
    if layout.upper() not in LAYOUTS:
        raise UsageError(f"unknown --layout '{layout.upper()}': use NCHW or NHWC")
    return layout.upper()


def check_layout_option(spec: InputSpec) -> None:
    """Refuse a ``--layout`` that reads another axis of the model's input as its channels (an
    NCHW model of 3 x 33 x 33 read as NHWC takes "33-channel images of 3 x 33"): an image has
    1, 3 or 4 channels. ``check`` and ``inspect`` alike."""
    if spec.layout_source == "option" and spec.channels not in (1, 3, 4):
        raise UsageError(
            f"--layout {spec.layout} reads the model's input as {spec.channels}-channel "
            "images: check --layout (eqaudit feeds 1 or 3 channels)"
        )


def detect_layout(dims: Sequence[Any]) -> tuple[str, int]:
    """(layout, channels) of a rank-4 image input from its dims (ints where known): the
    channel axis is the one of size 1, 3 or 4 (gray, RGB, RGBA); NCHW when undecidable."""
    second, last = dims[1], dims[3]
    small = (1, 3, 4)
    if (
        isinstance(second, int)
        and second in small
        and not (isinstance(last, int) and last in small)
    ):
        return "NCHW", second
    if (
        isinstance(last, int)
        and last in small
        and not (isinstance(second, int) and second in small)
    ):
        return "NHWC", last
    if isinstance(second, int) and second in small:
        return "NCHW", second
    return "NCHW", 3


def batch_agrees(alone: torch.Tensor, together: torch.Tensor, half: bool) -> bool | None:
    """Whether ``together`` (probe images run as one batch) is ``alone`` (the same images run
    one at a time, joined): the same shape and values within 1e-4 of their scale (1e-2 for a
    half-precision model). None when ``alone`` is not finite, where no tolerance can tell. The
    check of both adapters before they run a model fixed at batch 1 on whole batches."""
    expected = alone.float()
    if not bool(torch.isfinite(expected).all()):
        return None
    tolerance = 1e-2 if half else 1e-4
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return together.shape == expected.shape and torch.allclose(
        together.float(), expected, rtol=tolerance, atol=tolerance * (scale or 1.0)
    )


@dataclass(frozen=True)
class InputSpec:
    """What the model's image input looks like.

    ``height``/``width`` are ``None`` when the graph leaves them dynamic and the user has not given
    ``--input-size``; ``batch`` is ``None`` for a dynamic batch, else the fixed batch size.
    """

    name: str
    layout: str  # "NCHW" or "NHWC": where the channel axis is in the model's own input
    channels: int
    height: int | None
    width: int | None
    batch: int | None
    dtype: str = "float32"
    layout_source: str = "detected"  # "detected", "option" or "default"

    @property
    def size(self) -> tuple[int, int]:
        if self.height is None or self.width is None:
            raise UsageError(
                f"the model's input '{self.name}' has a dynamic height/width: "
                "pass --input-size N or --input-size HxW"
            )
        return (self.height, self.width)

    def model_shape(self, batch: int) -> tuple[int, int, int, int]:
        """The shape of ``batch`` images in the model's own layout (the size must be known)."""
        h, w = self.size
        if self.layout == "NHWC":
            return (batch, h, w, self.channels)
        return (batch, self.channels, h, w)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "layout": self.layout,
            "layout_source": self.layout_source,
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "batch": self.batch,
            "dtype": self.dtype,
        }


@dataclass(frozen=True)
class LayerInfo:
    """An auditable intermediate tensor, in execution order.

    ``shape`` is the per-image canonical shape (``(C, H, W)`` for spatial maps, ``(D,)`` for flat
    features), filled in by :meth:`ModelAdapter.probe_layers`. ``stride`` is the cumulative stride
    of the map relative to the input, per axis, when the backend knows it from the graph
    (``None`` when it must be estimated from shapes).
    """

    name: str
    op: str
    index: int
    shape: tuple[int, ...] | None = None
    stride: tuple[float, float] | None = None

    @property
    def spatial(self) -> bool:
        return self.shape is not None and len(self.shape) == 3


#: ``sink(name, activation)``: receives a canonical activation of the whole batch.
Sink = Callable[[str, torch.Tensor], None]


class _SinkFailed(Exception):
    """The caller's sink raised inside the model's forward: re-raised as itself by
    :meth:`ModelAdapter.run`, never blamed on the model."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


#: Ops whose rank-4 output is channels-first by definition (PyTorch modules, ONNX ops).
_CHANNELS_FIRST_OPS = frozenset(
    {
        *("Conv1d", "Conv2d", "ConvTranspose2d", "BatchNorm2d", "InstanceNorm2d", "GroupNorm"),
        *("MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "LPPool2d"),
        *("Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization"),
        *("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool"),
    }
)


@dataclass
class RunOutput:
    """Scores ``(B, K)`` float32 and canonical activations by layer name."""

    scores: torch.Tensor
    activations: dict[str, torch.Tensor] = field(default_factory=dict)


_OUT_OF_MEMORY = (
    "bad_alloc",
    "can't allocate memory",
    "out of memory",
    "Failed to allocate memory",
    "not enough memory",
)


#: torch's words for tensors of one op on different devices (a model only partly moved).
_DEVICE_MISMATCH = re.compile(
    r"same device|is not on the expected device|Expected all tensors to be on the same"
)


def looks_out_of_memory(message: str) -> bool:
    """Does a runtime's error say it ran out of memory? (onnxruntime: std::bad_alloc, torch:
    DefaultCPUAllocator: can't allocate memory, CUDA out of memory.)"""
    lowered = message.lower()
    return any(marker.lower() in lowered for marker in _OUT_OF_MEMORY)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_scores(scores: torch.Tensor) -> None:
    """Refuse (ModelRunError) scores with NaN or Inf in any row."""
    bad = ~torch.isfinite(scores).all(dim=1)
    if bad.any():
        raise nonfinite_scores(int(bad.sum()), len(bad))


def nonfinite_scores(bad: int, rows: int, under: list[str] | None = None) -> ModelRunError:
    """The error for ``bad`` of ``rows`` score rows holding NaN or Inf; ``under``: the transform
    elements whose inputs gave them, when known."""
    where = ""
    if under:
        where = f" (under {', '.join(under[:4])}{' ...' if len(under) > 4 else ''})"
    return ModelRunError(
        f"the model produced NaN or Inf scores for {bad} of {rows} inputs{where}: "
        "check the preprocessing (--scale, --mean, --std) or the model itself"
    )


class ModelAdapter(ABC):
    """One loaded model. Subclasses implement the ``_impl`` methods only."""

    backend: str = "?"
    #: ``_run_impl`` can hand activations to a sink during the forward (see the module docstring).
    streams_activations: bool = False
    #: Output declared by the model file as probabilities (``None``: unknown, detect from data).
    declared_output_kind: str | None = None
    #: (classes, images) of the first run: every later run must give as many classes
    _classes_seen: tuple[int, int] | None = None
    #: how the first run's flat output was read as rows, when it was (for the error above)
    _first_reading: str = ""

    def __init__(self, path: Path, input_spec: InputSpec) -> None:
        self.path = Path(path)
        self.input_spec = input_spec
        self._layers: list[LayerInfo] | None = None
        #: candidate layers the probe found neither maps nor flat features (a ViT's tokens)
        self.unauditable: list[str] = []
        #: names a user may give to --layers that are not layers, and why (a Flatten that
        #: hands out a layer's values again, an nn.Identity, the module giving the scores)
        self.not_layers: dict[str, str] = {}
        #: what loading changed that the user should know (shown with the preprocessing notes)
        self.load_notes: list[str] = []
        #: rank-4 layers of no known layout that the probe reads as channels-last by their
        #: shape (:meth:`_guess_channels_last`)
        self._channels_last_guess: set[str] = set()
        self.output_name: str = "output"
        self._grid_graph: tuple[GridGraph | None, str | None] | None = None
        self._token_layouts: tuple[tuple[Any, ...], dict[str, TokenLayout]] = ((), {})

    # -- what subclasses implement ---------------------------------------------------------------
    @abstractmethod
    def _layers_impl(self) -> list[tuple[str, str]]:
        """(name, op) of every candidate layer, in execution order."""

    @abstractmethod
    def _run_impl(
        self,
        batch: torch.Tensor,
        layers: Sequence[str],
        emit: Callable[[str, torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run one chunk in the model's own layout; return raw scores and raw activations.

        Raw activations are returned in the model's own layout; :meth:`_canonical_activation`
        brings them to canonical form. With ``emit`` (only when :attr:`streams_activations`),
        each raw activation goes to ``emit(name, raw)`` as soon as it is computed and is not
        returned (nor copied).
        """

    def channels_last(self, name: str) -> bool:
        """Does layer ``name`` hand out its rank-4 maps as ``(B, H, W, C)`` (brought to ``(B,
        C, H, W)`` by :meth:`_canonical_activation`)?"""
        return name in self._channels_last_guess

    def token_layout(self, name: str) -> TokenLayout | None:
        """Where layer ``name`` keeps its cells when it is a token sequence of known grid (a
        ViT's blocks: ``(B, 1 + H*W, C)``), at the current input size; None otherwise."""
        size = (self.input_spec.height, self.input_spec.width)
        graph = self._grid_graph[0] if self._grid_graph is not None else None
        if graph is None or None in size:
            return None  # (the graph is built before the probe, which learns the layers)
        if self._token_layouts[0] != size:
            try:
                self._token_layouts = (size, graph.token_layouts(*size))
            except Exception:  # geometry is a help, never a reason to fail
                self._token_layouts = (size, {})
        return self._token_layouts[1].get(name)

    def _canonical_activation(self, name: str, value: torch.Tensor) -> torch.Tensor | None:
        """Canonical form of a raw activation: (B, C, H, W), (B, D), or None (not auditable).
        A token sequence of known grid gives the map of its cells (:meth:`token_layout`)."""
        tokens = self.token_layout(name)
        if tokens is not None:
            return tokens.as_map(value)
        if value.ndim == 4:
            if self.channels_last(name):
                return value.permute(0, 3, 1, 2)
            return value
        if value.ndim == 2:
            return value
        return None

    def _layer_stride(self, name: str) -> tuple[float, float] | None:
        """Cumulative stride of a layer from the graph, when the backend knows it."""
        return None

    def _grid_graph_impl(self) -> tuple[GridGraph | None, str | None]:
        """The model's :class:`~eqaudit.grids.GridGraph`, or None with the reason."""
        return None, f"the {self.backend} backend does not expose its graph"

    def describe(self) -> dict:
        """Backend-specific facts for summary.json and ``eqaudit inspect``."""
        return {}

    def channels_guess(self) -> str | None:
        """Where ``input_spec.channels`` was guessed from, when the model file does not declare
        it (a PyTorch module: its first ``Conv2d``), else None."""
        return None

    # -- shared behaviour ------------------------------------------------------------------------
    @property
    def sha256(self) -> str:
        if not hasattr(self, "_sha256"):
            self._sha256 = sha256_file(self.path) if self.path.is_file() else ""
        return self._sha256

    def with_input_size(self, height: int, width: int) -> None:
        """Fix a dynamic (or confirm a fixed) input size."""
        spec = self.input_spec
        if (spec.height is not None and spec.height != height) or (
            spec.width is not None and spec.width != width
        ):
            raise UsageError(
                f"the model's input is fixed at {spec.height}x{spec.width}; "
                f"--input-size {height}x{width} does not match it: drop --input-size"
            )
        self.input_spec = replace(spec, height=height, width=width)
        self._layers = None  # execution order may only be learnt once the size is known
        if self._grid_graph is not None and self._grid_graph[0] is None:
            self._grid_graph = None  # a graph that needed the size may be built now

    @property
    def traced_per_size(self) -> bool:
        """Whether the grid graph is a trace at one input size (a PyTorch module's
        ``torch.export``), in which sizes computed in Python are frozen: another size needs
        another trace (:meth:`with_input_size` drops it)."""
        return False

    def grid_graph(self) -> GridGraph | None:
        """Sampling grids of the model's tensors, from its graph (see :mod:`eqaudit.grids`);
        None when the backend cannot give them (:attr:`grid_graph_note` says why). Built on first
        use (a PyTorch module is exported for it) and cached."""
        if self._grid_graph is None:
            self._grid_graph = self._grid_graph_impl()
        return self._grid_graph[0]

    @property
    def grid_graph_note(self) -> str | None:
        """Why :meth:`grid_graph` is None (None when it was not asked yet or is available)."""
        return self._grid_graph[1] if self._grid_graph is not None else None

    def layers(self) -> list[LayerInfo]:
        """Candidate layers in execution order (shapes known after :meth:`probe_layers`)."""
        if self._layers is None:
            self._layers = [
                LayerInfo(name=name, op=op, index=i, stride=self._layer_stride(name))
                for i, (name, op) in enumerate(self._layers_impl())
            ]
        return self._layers

    def probe_layers(self, example: torch.Tensor) -> list[LayerInfo]:
        """Run one image to learn each layer's canonical shape; drop layers that are not
        auditable (neither spatial maps nor flat features), and keep their names in
        :attr:`unauditable`."""
        from eqaudit.grids import Grid

        names = [layer.name for layer in self.layers()]
        size = tuple(example.shape[-2:])
        # Read before the run: a PyTorch module learns from the graph which maps it captures
        # channels-last.
        grids, layouts, tokens = self._layer_geometry(size)
        known = {(g.h.n, g.w.n) for g in grids.values() if isinstance(g, Grid)}
        self._channels_last_guess = set()
        out = self.run(example[:1], names)
        probed = []
        self.unauditable = [name for name in names if name not in out.activations]
        shapes = {name: tuple(value.shape[1:]) for name, value in out.activations.items()}
        sequences = {name for name in shapes if self.token_layout(name) is not None}
        guessed = self._guess_channels_last(shapes, size, known, layouts)
        self._channels_last_guess = guessed - sequences
        for name in self._channels_last_guess:
            height, width, channels = shapes[name]
            shapes[name] = (channels, height, width)
        not_maps = self._not_image_maps(shapes, known, grids, tokens)
        self.unauditable += [name for name in names if name in not_maps]
        for layer in self.layers():
            if layer.name not in shapes or layer.name in not_maps:
                continue
            probed.append(replace(layer, index=len(probed), shape=shapes[layer.name]))
        self._layers = probed
        return probed

    def _layer_geometry(self, size: tuple[int, ...]) -> tuple[dict, dict, set[str]]:
        """The grid graph's grids and layouts at ``size``, and its token descendants; empty
        when the backend has no graph (TorchScript, a failed export) or reading it fails:
        geometry is a help, never a reason to fail."""
        try:
            graph = self.grid_graph()
            if graph is None:
                return {}, {}, set()
            return graph.grids(*size), graph.layouts(*size), graph.token_descendants()
        except Exception:
            return {}, {}, set()

    def _guess_channels_last(
        self,
        shapes: dict[str, tuple[int, ...]],
        size: tuple[int, ...],
        known: set[tuple[int, int]],
        layouts: dict[str, str | None],
    ) -> set[str]:
        """Rank-4 layers whose layout the graph does not give (no graph: a module torch.export
        cannot trace; a map rebuilt from a token sequence: a Swin's window reverse) and whose
        shape reads as channels-last: ``(H, W, C)`` with ``H x W`` the size of a map of known
        layout (or the input's size at some stride: a Swin's patch merging makes a new one),
        where the channels-first reading ``(C, H, W)`` matches none. Maps of known
        layout: those with a grid (``known``, their sizes), and the outputs of ops that are
        channels-first by definition (convolutions, pooling, batch norm). Read as ``(C, H,
        W)``, ConvNeXt's channels-last LayerNorm on an 8x8 map of 16 channels was an 8-channel
        8x16 map, compared as such (review). A channels-first reading that is the input's size
        at one stride is left alone: on a 32x16 input, a 16-channel 8x4 map of a functional
        pool reads as channels-last of a known 16x8 map too."""
        ops = {layer.name: layer.op for layer in self.layers()}
        known = known | {
            shape[1:]
            for name, shape in shapes.items()
            if len(shape) == 3 and ops.get(name) in _CHANNELS_FIRST_OPS
        }

        def strided(h: int, w: int) -> bool:
            """Whether ``h x w`` is the input's size at some stride (to within a cell)."""
            return any(
                abs(h - size[0] / s) < 1 and abs(w - size[1] / s) < 1
                for s in range(1, max(size) + 1)
            )

        return {
            name
            for name, shape in shapes.items()
            if len(shape) == 3
            and layouts.get(name) is None
            and ops.get(name) not in _CHANNELS_FIRST_OPS
            and (shape[:2] in known or strided(shape[0], shape[1]))
            and shape[1:] not in known
            and not strided(shape[1], shape[2])
        }

    @staticmethod
    def _not_image_maps(
        shapes: dict[str, tuple[int, ...]],
        known: set[tuple[int, int]],
        grids: dict[str, Any],
        tokens: set[str],
    ) -> set[str]:
        """Layers of map shape ``(C, H, W)`` that are not image maps, left out of the audit: a
        ViT's attention scores ``(B, heads, tokens, tokens)`` and per-head features ``(B, heads,
        tokens, dim)``. They are rank-4 tensors computed from a token sequence (a rank-3 tensor
        that depends on the image, see :meth:`GridGraph.token_descendants`), whose grid is
        unknown and whose height x width no map of known grid (``known``) has. An ONNX graph
        hands out every tensor (a small ViT's 146 "layers" were 144 of these), and a PyTorch
        model's ``Softmax`` and ``Dropout`` modules hand out its scores; both were compared as
        if they were images.

        Tensors that never went through rank 3 stay, though a reshape lost their grid (a
        space-to-depth stem, ``PixelUnshuffle``: rank 6 and back), and so do maps of a known
        map's size (a Swin's windows reversed onto its patch grid, a non-local block's output).
        Without a graph (TorchScript, a failed export), none are left out."""
        return {
            name
            for name, shape in shapes.items()
            if len(shape) == 3
            and name in tokens
            and grids.get(name, "unknown") is None
            and tuple(shape[1:]) not in known
        }

    def run(
        self,
        batch: torch.Tensor,
        layers: Sequence[str] = (),
        sink: Sink | None = None,
        *,
        host_scores: bool = True,
    ) -> RunOutput:
        """Run a canonical ``(B, C, H, W)`` float32 batch; see the module docstring.

        Activations may share memory with the backend's next run of the same layers and batch
        size: use them before running again. With ``sink`` they are handed to it (streamed when
        the backend can) and not returned. Scores are always the caller's own: on the CPU and
        checked finite, or with ``host_scores=False`` left where the model wrote them (a GPU
        keeps running; the caller copies them when it needs them and calls
        :func:`check_scores`)."""
        spec = self.input_spec
        if batch.ndim != 4 or batch.shape[1] != spec.channels:
            raise UsageError(
                f"internal batch of shape {tuple(batch.shape)} does not match the model input "
                f"({spec.channels} channels): check --channels"
            )
        if (spec.height, spec.width) != (None, None) and tuple(batch.shape[2:]) != spec.size:
            raise UsageError(
                f"images of size {tuple(batch.shape[2:])} do not match the model input {spec.size}"
            )
        chunks = self._chunks(batch)
        emit = None
        if sink is not None and layers and self.streams(batch.shape[0]):
            emit = self._emitter(sink, batch.shape[0])
        scores_parts: list[torch.Tensor] = []
        acts_parts: dict[str, list[torch.Tensor]] = {}
        for chunk, keep in chunks:
            model_input = chunk.permute(0, 2, 3, 1) if spec.layout == "NHWC" else chunk
            model_input = model_input.contiguous()
            try:
                raw_scores, raw_acts = self._run_impl(model_input, layers, emit)
            except _SinkFailed as failed:  # the engine's own error, raised inside a hook
                if looks_out_of_memory(str(failed.error)):  # comparing a layer on a full GPU
                    raise MemoryError(cause_line(failed.error)) from failed.error
                raise failed.error from None
            except (UsageError, ModelRunError, UnsupportedModelError):
                raise
            except Exception as exc:  # the model's own failure, not ours
                first = cause_line(exc)
                if looks_out_of_memory(str(exc)):
                    # Not the model's fault: the CLI reports it as out of memory (exit 3).
                    raise MemoryError(first) from exc
                if _DEVICE_MISMATCH.search(str(exc)):
                    off_cpu = getattr(self, "device", "cpu") != "cpu"
                    raise ModelRunError(
                        f"the model failed on its device: {first[:300]} (it keeps tensors on "
                        "a device other than its input's, as a TorchScript trace with its devices "
                        "written into the graph does: save it with torch.export (.pt2)"
                        + (", or use --device cpu)" if off_cpu else ")")
                    ) from exc
                raise ModelRunError(
                    f"the model failed at run time: {first[:300]} "
                    "(check --input-size, --layout and --channels against what the model expects)"
                ) from exc
            # Scores are small: the engine reads them on the CPU (activations stay on the device).
            scores = self._scores_of(self._canonical_scores(raw_scores, chunk.shape[0]))[:keep]
            scores_parts.append(scores.cpu() if host_scores else scores)
            for name, value in raw_acts.items():
                canonical = self._auditable(name, value, chunk.shape[0])
                if canonical is not None:
                    part = canonical[:keep]
                    # A backend may write its next run into the same arrays (the ONNX adapter
                    # reuses them per batch shape): a chunk's part must survive the next chunk.
                    acts_parts.setdefault(name, []).append(
                        part.clone() if len(chunks) > 1 else part
                    )
        scores = scores_parts[0] if len(scores_parts) == 1 else torch.cat(scores_parts)
        if host_scores:
            check_scores(scores)
        activations = {
            name: parts[0] if len(parts) == 1 else torch.cat(parts)
            for name, parts in acts_parts.items()
        }
        if sink is not None:  # not streamed: handed over now, one layer at a time
            for name, value in activations.items():
                sink(name, value)
            activations = {}
        return RunOutput(scores=scores, activations=activations)

    def _auditable(self, name: str, value: torch.Tensor, rows: int) -> torch.Tensor | None:
        """The canonical activation, or None when it is not auditable."""
        canonical = self._canonical_activation(name, value)
        if canonical is not None and canonical.ndim == 4 and canonical.shape[2:] == (1, 1):
            canonical = canonical.flatten(1)  # globally pooled: no spatial axes left
        # A layer that sees another batch (a model looping over crops) is not auditable.
        if canonical is None or canonical.shape[0] != rows:
            return None
        return canonical

    def _emitter(self, sink: Sink, rows: int) -> Callable[[str, torch.Tensor], None]:
        """``emit(name, raw)`` for :meth:`_run_impl`: canonical form, then the sink; the sink's
        own errors are marked so that they are not reported as the model's."""

        def emit(name: str, raw: torch.Tensor) -> None:
            canonical = self._auditable(name, raw, rows)
            if canonical is None:
                return
            try:
                sink(name, canonical)
            except Exception as exc:
                raise _SinkFailed(exc) from exc

        return emit

    def host_threads(self) -> int:
        """How many CPU threads the runtime runs a forward pass on: PyTorch's intra-op threads
        (``torch.get_num_threads()``). The engine compares handed-out layers on as many threads
        (the runtime is idle meanwhile) and loads images only on the cores left over."""
        return torch.get_num_threads()

    def streams(self, rows: int | None) -> bool:
        """Does :meth:`run` stream the activations of a batch of ``rows`` images (None: of any
        size) to its sink? Only a backend that can, and only for a batch that
        :meth:`_chunks` leaves whole (a dynamic batch, or the model's fixed size)."""
        fixed = self.input_spec.batch
        return self.streams_activations and (fixed is None or fixed == rows)

    def _chunks(self, batch: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        fixed = self.input_spec.batch
        if fixed is None or fixed == batch.shape[0]:
            return [(batch, batch.shape[0])]
        chunks = []
        for start in range(0, batch.shape[0], fixed):
            part = batch[start : start + fixed]
            keep = part.shape[0]
            if keep < fixed:  # pad with copies of the last image; padded rows are dropped
                pad = part[-1:].expand(fixed - keep, *part.shape[1:])
                part = torch.cat([part, pad])
            chunks.append((part, keep))
        return chunks

    def _scores_of(self, scores: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` scores of a chunk of B images, checked against the first run's K: a model
        whose classes depend on the batch (slicing its output by batch size) would be audited
        on classes that one image alone does not get."""
        rows, classes = scores.shape
        if classes == 0:
            raise ModelRunError(
                f"the model returned 0 classes (scores of shape {tuple(scores.shape)}): it is "
                "not a classifier's output (if another output holds the class scores, pick it "
                "with --output-name)"
            )
        if self._classes_seen is None:
            self._classes_seen = (classes, rows)
        elif self._classes_seen[0] != classes:
            first, given = self._classes_seen
            raise ModelRunError(
                f"the model's number of classes changes with the batch: {first} for "
                f"{_images(given)}, "
                f"{classes} for {_images(rows)}; its output must not depend on how many "
                "images it is given (check its forward for batch-size-dependent slicing)"
                + self._first_reading
            )
        return scores

    def _canonical_scores(self, raw: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """``raw`` as ``(B, K)`` float scores for a chunk of ``rows`` images: a ``(B, K, 1, 1)``
        head is flattened, a ``(B,)`` output is one score per image, a ``(K,)`` output for one
        image its row; any other row count is refused (one row per image, in order)."""
        scores = raw
        if scores.ndim == 4 and scores.shape[2:] == (1, 1):  # (B, K, 1, 1) from a 1x1 conv head
            scores = scores.flatten(1)
        if scores.ndim == 0 and rows in (None, 1):
            scores = scores.reshape(1, 1)  # one score for one image (a squeezed binary head)
        if scores.ndim == 1:
            # (B,): one score per image (a sigmoid head); (B * K,): the rows flattened in order
            # (a forward ending in reshape(-1)); (K,) for one image: its batch axis dropped.
            many = rows is not None and rows > 1
            seen = self._classes_seen[0] if self._classes_seen is not None else None
            if many and scores.shape[0] == rows:
                scores = scores[:, None]
            elif many and scores.shape[0] % rows == 0 and seen in (None, scores.shape[0] // rows):
                # (once the classes are known, only rows of that many: K scores of the first
                # image alone, K a multiple of the batch, are not K / B classes of each)
                scores = scores.reshape(rows, -1)
                if seen is None:
                    self._first_reading = (
                        f" (its output of shape {tuple(raw.shape)} for {_images(rows)} was read "
                        f"as {rows} rows of {scores.shape[1]} scores: does it give one image's "
                        "scores only?)"
                    )
            else:
                scores = scores[None]
        if scores.ndim == 2 and rows is not None and scores.shape[0] != rows:
            raise ModelRunError(
                f"the model returned {_count(scores.shape[0], 'row')} of scores for "
                f"{_images(rows)} "
                f"(output shape {tuple(raw.shape)}): a classifier gives one row of class scores "
                "per image, in order (check that its forward keeps the batch axis first and "
                "neither drops nor adds images)"
            )
        if scores.ndim != 2:
            raise UnsupportedModelError(
                f"the model's output has shape {tuple(raw.shape)}, not (batch, classes): eqaudit "
                "audits image classifiers (if another output holds the class scores, pick it "
                "with --output-name)"
            )
        if not scores.is_floating_point():
            raise UnsupportedModelError(
                f"the model's output is {scores.dtype}, not class scores: "
                "pick the float score output with --output-name"
            )
        return scores.float()


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _images(count: int) -> str:
    return _count(count, "image")


@contextmanager
def kept_as_given(model: Any) -> Iterator[Callable[[], list[str]]]:
    """A caller's ``nn.Module`` comes back from the block as it went in: each module's train or
    eval mode, each parameter's (and its gradient's) device, and each buffer, the object and its
    values. The audit puts the model in eval mode on the CPU, then on ``--device``; a model
    audited between training steps must not resume training with dropout and batch statistics
    off, on another device, or with gradients elsewhere than their parameters (the next
    optimiser step fails). Buffers are restored by value too: a forward may update some even in
    eval mode (the range observers of quantisation-aware training would be recalibrated on the
    audit's transformed images). Anything that is not a module passes through.

    The block gets a function that names the buffers whose values differ from the entry's, so
    far (a program that updates its buffers as it runs is not batched)."""
    if not isinstance(model, nn.Module):
        yield list
        return
    modes = [(m, m.training) for m in model.modules()]
    parameters = [(p, p.device) for p in model.parameters()]
    buffers = [
        (f"{prefix}.{name}" if prefix else name, m, name, b, b.detach().clone())
        for prefix, m in model.named_modules()
        for name, b in m._buffers.items()
        if b is not None
    ]

    def unchanged(now: torch.Tensor | None, values: torch.Tensor) -> bool:
        return (
            now is not None
            and now.shape == values.shape
            and torch.equal(now.to(values.device), values)
        )

    def changed() -> list[str]:
        return [
            path for path, m, name, _, values in buffers if not unchanged(m._buffers[name], values)
        ]

    try:
        yield changed
    finally:
        with torch.no_grad():
            for p, device in parameters:
                if p.device != device:  # in place, as Module.to does: the object is kept
                    p.data = p.data.to(device)
                if p.grad is not None and p.grad.device != device:
                    p.grad = p.grad.to(device)
            for _, m, name, original, values in buffers:
                m._buffers[name] = original  # not the copy a move to the device made
                if not unchanged(original, values):
                    original.data = values
        for m, training in modes:
            m.training = training
