"""The PyTorch backend: ``torch.export`` programs, TorchScript archives, state dicts, pickles.

Formats, sniffed from the file itself (the extension only decides ``.pt2``):

* ``.pt2`` (or a zip with ``archive_format``): ``torch.export.load``. The input spec is read from
  the program's single user input (channels, H, W when static; the batch is fixed when its
  dimension is a plain int). An archive may hold pickled weights or constants, which torch
  unpickles with ``weights_only=False``: without ``--trust-pickle`` they are refused (see
  :func:`_refuse_pickled_code`). Per-layer activations come from forward hooks on
  ``torch.export.unflatten(program)``, whose submodules carry the original module paths.
* TorchScript (a zip with ``constants.pkl`` and ``code/``): ``torch.jit.load``. TorchScript refuses
  Python hooks, so a TorchScript model is audited on its outputs only.
* anything else: ``torch.load(weights_only=True)``. A state dict (bare, or wrapped in
  ``{"state_dict": ...}`` / ``{"model": ...}``) needs ``--factory`` to build the module. A fully
  pickled object is refused unless ``--trust-pickle``: unpickling runs code from the file.

Layers are module outputs named by module path (``features.0``, ``layer1.0.conv1``), in execution
order (learnt from one dummy forward when the input size is known). A module called several times
in one forward (a shared ReLU) yields ``name``, ``name:1``, ``name:2`` ... one per call. Containers
(``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``) are skipped: a Sequential's output is its
last child's. Hooks are registered for the requested layers of one run only, so a plain run has no
overhead. The engine's runs stream (``streams_activations``): each hook hands its live output to
the engine, which reduces it before the forward goes on, so nothing is cloned or kept. When the
activations are returned instead (the probe, a batch split into fixed-size chunks), outputs that
a later in-place op overwrites (``ReLU(inplace=True)``, ``out += identity``) are cloned; which
ones is learnt on the probe from the tensors' version counters.

Sampling grids (:meth:`~eqaudit.models.base.ModelAdapter.grid_graph`) are read from the graph: a
``.pt2`` archive's own program; a module (pickle, state dict + factory, in memory) is exported
once with ``torch.export`` on a zeros batch at the model's input size, only when asked;
TorchScript gives none.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import logging
import pickle
import pickletools
import re
import sys
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eqaudit.errors import ModelLoadError, UnsupportedModelError, UsageError, cause_line
from eqaudit.grids import GridGraph, export_grid_graph, torch_grid_graph
from eqaudit.models.base import (
    InputSpec,
    ModelAdapter,
    batch_agrees,
    detect_layout,
    kept_as_given,
    layout_option,
)

__all__ = ["TorchAdapter", "load_torch"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_CONTAINER_TYPE_NAMES = {f"torch.nn.modules.container.{cls.__name__}" for cls in _CONTAINERS}
_CONTAINER_OP = "<container>"  # op name marking an exported container module (skipped)
_FACTORY_FORM = "pass --factory path/to/file.py:build or package.module:build"
_TORCHSCRIPT_NOTE = (
    "TorchScript archives expose no per-layer hooks: export with torch.export for per-layer results"
)
_HOOKS_NOTE = "module outputs named by module path, captured with forward hooks"
_EXPORT_NOTE = (
    "module outputs of torch.export.unflatten(program), named by the original module path, "
    "captured with forward hooks"
)
# Keys under which training scripts commonly wrap a state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def _first_line(exc: BaseException, limit: int = 200) -> str:
    return cause_line(exc, limit)


def _same_values(tensor: torch.Tensor, earlier: torch.Tensor, version: int) -> bool:
    """Does ``tensor`` hold ``earlier``'s values (recorded at ``version``), maybe under another
    shape: the same memory read in the same order (the same shape and strides, as a channels_last
    model's maps; or both contiguous: a permuted view is another layout), as many elements, and
    ``earlier`` not written in place since (an in-place ReLU returns its input's memory with new
    values)?"""
    same_order = (tensor.shape == earlier.shape and tensor.stride() == earlier.stride()) or (
        tensor.is_contiguous() and earlier.is_contiguous()
    )
    return (
        tensor.data_ptr() == earlier.data_ptr()
        and tensor.numel() == earlier.numel()
        and tensor.dtype == earlier.dtype
        and earlier._version == version
        and same_order
    )


def _dynamically_quantized(module: nn.Module) -> str | None:
    """The path of a dynamically quantized submodule (torch.ao's ``quantize_dynamic``), or
    None."""
    if isinstance(module, torch.jit.ScriptModule):
        return None
    for name, sub in module.named_modules():
        if type(sub).__module__.startswith("torch.ao.nn.quantized.dynamic"):
            return name or type(sub).__name__
    return None


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a module output stands for: itself, or the first tensor of a tuple/list."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    return None


def _scores_of(output: Any, pick: str | None = None) -> torch.Tensor:
    """Class scores from a model output (:func:`pick_scores`), detached."""
    return pick_scores(output, pick).detach()


def picked_part(output: Any) -> str | None:
    """Which part of a model output :func:`pick_scores` takes without ``--output-name``: a key,
    field or attribute name, or a tuple index; None for a tensor."""
    if isinstance(output, torch.Tensor):
        return None
    items = _named_items(output)
    if items is not None:
        tensors = [key for key, item in items.items() if isinstance(item, torch.Tensor)]
        return "logits" if "logits" in tensors else (str(tensors[0]) if tensors else None)
    if isinstance(output, (tuple, list)):
        return next((str(i) for i, v in enumerate(output) if isinstance(v, torch.Tensor)), None)
    return "logits" if isinstance(getattr(output, "logits", None), torch.Tensor) else None


def pick_scores(output: Any, pick: str | None = None) -> torch.Tensor:
    """The class-score tensor of a model output: a tensor; the one tensor of a tuple or list;
    the ``logits`` entry, or the one tensor, of a dict, named tuple or dataclass (``transformers``'
    ``ModelOutput`` is a dict); an object's ``logits`` attribute. ``pick`` (``--output-name``)
    chooses among several: a tuple's index, a key, a field or an attribute name. Several
    tensors and no pick are refused: taking the first would audit an auxiliary head without a
    word."""
    value = output
    items = _named_items(value)
    if pick is not None:
        value = _picked(output, pick)
    elif items is not None:
        tensors = {key: item for key, item in items.items() if isinstance(item, torch.Tensor)}
        if "logits" in tensors:
            value = tensors["logits"]
        elif len(tensors) == 1:
            value = next(iter(tensors.values()))
        else:
            raise UsageError(
                f"the model returns {len(tensors)} tensors under the keys "
                f"{', '.join(map(str, tensors))[:120]}: pick the class scores with "
                "--output-name KEY"
            )
    elif isinstance(value, (tuple, list)):
        tensors = [i for i, item in enumerate(value) if isinstance(item, torch.Tensor)]
        if len(tensors) > 1:
            shapes = ", ".join(f"{i}: {tuple(value[i].shape)}" for i in tensors[:6])
            raise UsageError(
                f"the model returns a {type(value).__name__} of {len(tensors)} tensors ({shapes}): "
                "pick the class scores with --output-name INDEX"
            )
        value = value[tensors[0]] if tensors else value
    elif isinstance(getattr(value, "logits", None), torch.Tensor):
        value = value.logits
    if not isinstance(value, torch.Tensor):
        raise UnsupportedModelError(
            f"the model returns {type(output).__name__}, not a tensor of class scores: wrap it "
            "so that forward returns the (batch, classes) scores, or name the attribute that "
            "holds them with --output-name"
        )
    return value


def _named_items(value: Any) -> dict[str, Any] | None:
    """The named parts of a dict, named tuple or dataclass instance; None for anything else."""
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "_fields"):
        return value._asdict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return None


def _picked(output: Any, pick: str) -> Any:
    """The item ``pick`` of a model output (see :func:`pick_scores`)."""
    items = _named_items(output)
    if items is not None and pick in items:
        return items[pick]
    if items is not None and not isinstance(output, tuple):  # (a named tuple takes indices)
        keys = ", ".join(map(str, items))[:120]
        raise UsageError(
            f"--output-name '{pick}' is not a key of the model's output: use one of {keys}"
        )
    if isinstance(output, (tuple, list)):
        if pick.isdigit() and int(pick) < len(output):
            return output[int(pick)]
        raise UsageError(
            f"--output-name '{pick}' is not an index of the model's {len(output)} outputs: "
            f"use 0 to {len(output) - 1}"
        )
    if not isinstance(output, torch.Tensor) and isinstance(
        getattr(output, pick, None), torch.Tensor
    ):
        return getattr(output, pick)
    raise UsageError(
        f"--output-name '{pick}': the model returns one {type(output).__name__}, nothing to pick "
        "from: drop --output-name"
    )


def _call_name(path: str, index: int) -> str:
    """A module's ``index``-th call in one forward, as a layer name: ``path``, ``path:1``, ...
    (:func:`_split_call_name` reads it back)."""
    return path if index == 0 else f"{path}:{index}"


def _split_call_name(name: str, bases: Mapping[str, Any]) -> tuple[str, int]:
    """``layer1.relu:2`` -> (``layer1.relu``, 2); a plain module path -> (path, 0)."""
    if name in bases:
        return name, 0
    base, sep, index = name.rpartition(":")
    if sep and index.isdigit():
        return base, int(index)
    return name, 0


class TorchAdapter(ModelAdapter):
    """A PyTorch model run on CPU in float32, with per-layer capture by forward hooks."""

    backend = "torch"
    streams_activations = True

    def __init__(
        self,
        path: Path,
        input_spec: InputSpec,
        module: nn.Module,
        *,
        fmt: str,
        factory: str | None = None,
        op_names: Mapping[str, str] | None = None,
        layers_note: str | None = None,
        input_dtype: torch.dtype = torch.float32,
        hookable: bool = True,
        program: torch.export.ExportedProgram | None = None,
    ) -> None:
        super().__init__(path, input_spec)
        self.module = module
        self.device = "cpu"
        #: which of several outputs holds the class scores (``--output-name``: an index, a key)
        self.output_name: str | None = None
        self._picked: str | None = None  # the part of a dict/tuple output taken as the scores
        #: captured outputs that the forward later modifies in place (learnt on the first run
        #: with layers, see _run_impl); None until then: every capture is cloned
        self._overwritten: set[str] | None = None
        self._program = program
        #: module outputs the graph shows in NHWC (a Linear over channels-last maps, as in
        #: ConvNeXt): permuted to canonical NCHW when captured
        self._channels_last: set[str] = set()
        self._format = fmt
        self._factory = factory
        self._input_dtype = input_dtype
        self._layers_note = layers_note or _HOOKS_NOTE
        self._op_names, self._hookable = dict(op_names or {}), hookable
        #: the program's data-dependent control flow (its first operator, or None) and the
        #: subgraph modules it runs: not layers, since they run for some images and not others
        self._flow, self._branches = (
            _control_flow(program) if program is not None else (None, set())
        )
        if self._branches:
            self._layers_note += (
                f"; the branches of data-dependent control flow ({', '.join(sorted(self._branches))}) "
                "are not audited: they run for some images only"
            )
        self._candidates = self._hookable_modules(self._op_names) if hookable else {}
        #: For a torch.export program fixed at batch 1: how it is run (``describe()``).
        self.fixed_batch: dict[str, Any] | None = None
        self._batching_ready = False  # batch_dynamically has been called (the loader's last step)
        self._script_checked = False  # a TorchScript module's batch checked (_check_script_batch)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        input_spec: InputSpec,
        path: Path | None = None,
        fmt: str = "module",
    ) -> TorchAdapter:
        """Wrap an in-memory module (set to eval mode, float32, CPU). A caller's module whose
        weights are not all float32 is converted as a copy: its own weights are not rounded."""
        if any(t.is_floating_point() and t.dtype != torch.float32 for t in _tensors(module)):
            module = copy.deepcopy(module)
        return _adapter_of(
            Path(path) if path is not None else Path("<module>"),
            module,
            fmt,
            input_spec=input_spec,
            layers_note=_TORCHSCRIPT_NOTE if isinstance(module, torch.jit.ScriptModule) else None,
        )

    def describe(self) -> dict:
        described = {"format": self._format, "factory": self._factory}
        if self.output_name is not None or self._picked is not None:
            described["output"] = self.output_name or self._picked  # (given, or taken)
        if self.fixed_batch is not None:
            described["fixed_batch"] = self.fixed_batch
        return {**described, "layers_note": self._layers_note}

    def _scores(self, output: Any) -> torch.Tensor:
        """The class scores of a forward's output; the part taken is recorded (describe)."""
        if self.output_name is None and self._picked is None:
            self._picked = picked_part(output)
        return _scores_of(output, self.output_name)

    def channels_guess(self) -> str | None:
        if self._program is not None:  # a .pt2 program declares its input
            return None
        _, name = guess_channels(self.module)
        return f"its first Conv2d, '{name}'" if name is not None else "a default (no Conv2d)"

    def batch_dynamically(self) -> None:
        """Run a torch.export program fixed at batch 1 (what ``torch.export.export`` writes
        without ``dynamic_shapes``, its default) on whole batches, once the module without
        torch.export's input checks (:func:`_unguarded`) gives, for two probe images run
        together, what it gives for each alone: every output tensor and every layer the audit
        can hook, to 1e-4 of their scale. The ONNX adapter does the same for graphs fixed at
        batch 1 (``OnnxAdapter._batch_dynamically``): one image per forward leaves a GPU nearly
        idle and costs an all-layers audit 3x on 2 CPU cores (benchmarks/RESULTS.md).

        It stays one image at a time, and ``fixed_batch`` says why, for a program that:
        branches on the data (``torch.cond``, loops: noise would take one branch for all), holds
        its batch of 1 (``x.view(1, -1)``; an output or a layer without a batch axis), updates
        its buffers as it runs (an observer: batching would change what each image sees), or
        gives on noise what cannot be compared (NaN). The probes' effect on the module (its
        buffers) is undone. Called once the scores' output is known (``--output-name``), and
        again when the input size is set later (``--input-size aligned:N``)."""
        self._batching_ready = True
        spec = self.input_spec
        if isinstance(self.module, torch.jit.ScriptModule):
            self._check_script_batch()
            return
        dynamic = _dynamically_quantized(self.module)
        if dynamic is not None and spec.batch is None and self.fixed_batch is None:
            # Its activations are quantized with scales taken from each batch: an image's
            # numbers would depend on the images beside it (and shards on their batches).
            self.fixed_batch = {
                "size": 1,
                "run": "one image at a time",
                "why": f"module '{dynamic}' is dynamically quantized: it scales the activations "
                "of each batch by the batch, so an image's numbers would depend on its batch",
            }
            self.input_spec = replace(spec, batch=1)
            return
        if (
            self._program is None
            or spec.batch != 1
            or self.fixed_batch is not None
            or None in (spec.height, spec.width)
        ):
            return
        record: dict[str, Any] = {"size": 1, "run": "one image at a time"}
        self.fixed_batch = record
        if self._flow is not None:
            record["why"] = f"the program branches on the data ({self._flow})"
            return
        probe = self._noise_probes()
        with kept_as_given(self.module) as changed_buffers:  # the probes' writes are undone
            try:
                alone = [self._probe(image[None]) for image in probe]
            except Exception as exc:  # not even on noise: the audit's own run will say why
                record["why"] = f"the program does not run on noise images: {_first_line(exc, 160)}"
                return
            changed = changed_buffers()
            if changed:
                record["why"] = f"the program updates its buffers as it runs ({changed[0]})"
                return
            if not _unguarded(self.module):
                record["why"] = "torch.export's input checks could not be turned off"
                return
            why = self._together_differs(alone, probe)
        if why is not None:
            _unguarded(self.module, restore=True)
            record["why"] = why
            return
        self.input_spec = replace(spec, batch=None)
        record["run"] = "batched"

    def _check_script_batch(self) -> None:
        """A TorchScript archive declares no batch size, but a traced one may have recorded the
        batch it was traced with (``torch.jit.trace`` turns ``x.shape[0]`` into a constant: a
        Swin's window partition traced at batch 1 then mixes the images of a batch, with no
        error). Once the input size is known, two noise probes run together must give what
        each gives alone (:func:`_batch_differs`), else the archive is run one image at a time
        and ``fixed_batch`` says why."""
        spec = self.input_spec
        if self._script_checked or spec.batch is not None or None in (spec.height, spec.width):
            return
        self._script_checked = True
        probe = self._noise_probes()
        with kept_as_given(self.module):
            try:
                alone = [self._probe(image[None]) for image in probe]
            except Exception:  # not even one noise image: the audit's own run will say why
                return
            why = self._together_differs(alone, probe)
        if why is None:
            return
        why = why.replace("the program", "the module", 1)
        if "differs" in why:
            why += (
                " (a trace keeps the batch size it was traced at; dynamic quantization scales "
                "each batch by the batch)"
            )
        self.fixed_batch = {"size": 1, "run": "one image at a time", "why": why}
        self.input_spec = replace(spec, batch=1)

    def _noise_probes(self) -> torch.Tensor:
        """Two seeded noise images in the model's layout for the batch checks (0-255 pixels
        for a uint8 input); :meth:`_forward` moves them to the device."""
        probe = torch.randn(
            self.input_spec.model_shape(2), generator=torch.Generator().manual_seed(0)
        )
        return probe.mul(64).add(128) if self._input_dtype == torch.uint8 else probe

    def _together_differs(
        self, alone: list[tuple[list[torch.Tensor], dict[str, torch.Tensor]]], probe: torch.Tensor
    ) -> str | None:
        """:func:`_batch_differs` of the probes run together against ``alone``, or why they do
        not run together at all."""
        try:
            return _batch_differs(alone, self._probe(probe), self._input_dtype)
        except Exception as exc:
            return f"the program does not run on 2 images: {_first_line(exc, 160)}"

    def _probe(self, batch: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """A forward's float output tensors (in order) and every hookable layer's output."""
        captured: dict[str, torch.Tensor] = {}

        def keep(path: str, index: int, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None and tensor.is_floating_point():
                captured[_call_name(path, index)] = tensor.detach().clone()

        with torch.no_grad(), self._hooks(self._candidates, keep):
            output = self._forward(batch)
        leaves = torch.utils._pytree.tree_leaves(output)
        outputs = [t.detach() for t in leaves if torch.is_tensor(t) and t.is_floating_point()]
        return outputs, captured

    @property
    def traced_per_size(self) -> bool:
        return self._program is None and not isinstance(self.module, torch.jit.ScriptModule)

    def with_input_size(self, height: int, width: int) -> None:
        before = (self.input_spec.height, self.input_spec.width)
        super().with_input_size(height, width)
        if self.traced_per_size and before != (height, width):
            self._grid_graph = None  # traced at the old size: traced again when next asked
        if self._batching_ready:  # (before that, --output-name is not known yet)
            self.batch_dynamically()

    def _grid_graph_impl(self) -> tuple[GridGraph | None, str | None]:
        graph, note = self._build_grid_graph()
        spec = self.input_spec
        if graph is not None and spec.height is not None and spec.width is not None:
            layouts = graph.layouts(spec.height, spec.width)
            self._channels_last = {name for name, lay in layouts.items() if lay == "NHWC"}
        return graph, note

    def channels_last(self, name: str) -> bool:
        return name in self._channels_last or super().channels_last(name)

    def _build_grid_graph(self) -> tuple[GridGraph | None, str | None]:
        """A .pt2 archive's own program; a module is exported once (``torch.export``, on a zeros
        batch at the model's input size); TorchScript has no graph to read."""
        if self._program is not None:
            try:
                return torch_grid_graph(self._program, self.input_spec.layout), None
            except Exception as exc:
                return None, f"the program's graph could not be walked ({_first_line(exc)})"
        if isinstance(self.module, torch.jit.ScriptModule):
            return None, "TorchScript archives are not read for sampling grids: use torch.export"
        spec = self.input_spec
        if spec.height is None or spec.width is None:
            return None, "the input size is unknown: sampling grids need an export at that size"
        # On the module's device: an export that mixes a CPU example with CUDA weights fails,
        # and the grids would then be guessed instead of read.
        example = torch.zeros(
            spec.model_shape(spec.batch or 1), dtype=self._input_dtype, device=self.device
        )
        return export_grid_graph(self.module, example, spec.layout)

    # -- layers ----------------------------------------------------------------------------------
    def _hookable_modules(
        self, op_names: Mapping[str, str]
    ) -> dict[str, tuple[list[nn.Module], str]]:
        """Module path -> (modules, op) for every submodule that can carry a forward hook.

        Usually one module per path; ``torch.export.unflatten`` may give a module's later call
        sites their own copies (``relu@1``), which share the path and its call counter.
        """
        if isinstance(self.module, torch.jit.ScriptModule):
            return {}  # torch refuses Python hooks on ScriptModules
        found: dict[str, tuple[list[nn.Module], str]] = {}
        for name, sub in self.module.named_modules():
            if not name or isinstance(sub, (*_CONTAINERS, nn.Identity)):
                # (An Identity, timm's drop-path or norm placeholder, hands out its input: the
                # previous layer's numbers again, under a name the graph does not hold.)
                if isinstance(sub, nn.Identity):
                    self.not_layers[name] = "an nn.Identity hands out its input unchanged"
                continue
            if self._branches & set(name.split(".")):
                continue
            path = re.sub(r"@\d+$", "", name)
            op = op_names.get(path) or getattr(sub, "original_name", None) or type(sub).__name__
            if op == _CONTAINER_OP:
                continue
            found.setdefault(path, ([], op))[0].append(sub)
        return found

    def _layers_impl(self) -> list[tuple[str, str]]:
        if not self._candidates:
            return []
        order = self._execution_order()
        if order is None:  # size unknown or the dummy run failed: registration order
            return [(name, op) for name, (_, op) in self._candidates.items()]
        return [
            (name, self._candidates[_split_call_name(name, self._candidates)[0]][1])
            for name in order
        ]

    def _execution_order(self) -> list[str] | None:
        spec = self.input_spec
        if spec.height is None or spec.width is None:
            return None
        shape = spec.model_shape(spec.batch or 1)
        order: list[str] = []
        seen: dict[str, torch.Tensor] = {}
        versions: dict[str, int] = {}

        def record(name: str, index: int, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is None or not tensor.is_floating_point():
                return
            key = _call_name(name, index)
            same = next((k for k, e in seen.items() if _same_values(tensor, e, versions[k])), None)
            if same is not None:
                # A layer already recorded, again: a block handing out its last ReLU's output
                # (named by the block), an eval-mode Dropout, a Flatten, or a module handing out
                # several tensors, the first a layer's (dropped). Counted once, as an ONNX graph
                # holds it once (both loaders give the same rows).
                block = _split_call_name(same, self._candidates)[0].startswith(name + ".")
                if block and isinstance(output, torch.Tensor):
                    order[order.index(same)] = key
                    del seen[same], versions[same]
                    seen[key], versions[key] = tensor, tensor._version
                    self.not_layers[same] = f"its output is its block's, audited as '{key}'"
                else:
                    self.not_layers[key] = f"it hands out the values of '{same}' again"
                return
            order.append(key)
            seen[key] = tensor
            versions[key] = tensor._version

        try:
            # Not in inference mode, whatever the caller's: its tensors keep no version counter,
            # which tells a view of a layer (the same values) from an in-place ReLU's output.
            with (
                torch.inference_mode(False),
                torch.no_grad(),
                self._hooks(self._candidates, record),
            ):
                scores = self._scores(self._forward(torch.zeros(shape)))
        except Exception:  # the real run reports the model's failure properly
            return None
        # A module whose output is the scores tensor itself (the last Linear) is the model's
        # output, which the output metrics audit: not a layer, as an ONNX graph's outputs are
        # not (both loaders of one model give the same layer rows).
        output = {
            key
            for key, tensor in seen.items()
            if tensor.data_ptr() == scores.data_ptr() and tensor.shape == scores.shape
        }
        for key in output:
            self.not_layers[key] = "it gives the class scores, audited as the outputs"
        return [key for key in order if key not in output]

    @contextmanager
    def _hooks(
        self,
        modules: Mapping[str, tuple[list[nn.Module], str]],
        callback: Callable[[str, int, Any], None],
    ) -> Iterator[None]:
        """Forward hooks calling ``callback(path, call_index, output)``, removed on exit."""
        calls: dict[str, int] = {}
        handles = []

        def make_hook(path: str) -> Callable[..., None]:
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                index = calls.get(path, 0)
                calls[path] = index + 1
                callback(path, index, output)

            return hook

        try:
            for path, (subs, _) in modules.items():
                hook = make_hook(path)
                handles.extend(sub.register_forward_hook(hook) for sub in subs)
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -- running ---------------------------------------------------------------------------------
    def to_device(self, device: str) -> None:
        """Run the module on ``device`` (``cpu``, ``cuda``, ``cuda:N``); activations stay there
        (the engine reduces them in place), scores come back to the CPU.

        A torch.export program is moved as a program, then unflattened again: ``Module.to``
        would leave its lifted tensor constants (plain attributes, not buffers) and the devices
        written into its factory ops (``arange``, ``zeros``, ...) on the CPU."""
        try:
            from torch.export.passes import move_to_device_pass as move
        except ImportError:  # an older torch: Module.to, as for any module
            move = None
        if self._program is None or move is None or device == self.device:
            self.module = self.module.to(device)
        else:
            self.grid_graph()  # read from the program as loaded, before it moves
            try:
                program = move(self._program, device)
                with _quiet_torch_warnings():
                    hookable = self._hookable
                    module = torch.export.unflatten(program) if hookable else program.module()
            except Exception:  # a program the pass cannot take: move the module as it is
                self.module = self.module.to(device)
            else:
                # ExportedProgram.module() is in eval mode already and refuses .eval()
                # ("Calling eval() is not supported yet", torch 2.13).
                self.module, self._program = module.eval() if hookable else module, program
                self._candidates = self._hookable_modules(self._op_names) if hookable else {}
                self._overwritten = None  # learnt again, on the new module
                if self.fixed_batch is not None and self.fixed_batch["run"] == "batched":
                    _unguarded(self.module)  # the rebuilt module checks the batch of 1 again
        self.device = device

    def _forward(self, batch: torch.Tensor) -> Any:
        batch = batch.to(self.device)
        if self._input_dtype == torch.uint8:  # 0-255 pixels: rounded after the transforms
            batch = batch.round().clamp_(0, 255)
        with torch.no_grad():
            return self.module(batch.to(self._input_dtype))

    def _run_impl(
        self,
        batch: torch.Tensor,
        layers: Sequence[str],
        emit: Callable[[str, torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        wanted = set(layers)
        captured: dict[str, torch.Tensor] = {}
        paths = {_split_call_name(name, self._candidates)[0] for name in wanted}
        modules = {path: entry for path, entry in self._candidates.items() if path in paths}
        if not modules:
            return self._scores(self._forward(batch)), captured
        if emit is not None:
            return self._stream(batch, wanted, modules, emit), captured

        originals: dict[str, tuple[torch.Tensor, int]] = {}
        learning = self._overwritten is None

        def keep(path: str, index: int, output: Any) -> None:
            name = _call_name(path, index)
            if name not in wanted:
                return
            tensor = _first_tensor(output)
            if tensor is None or not tensor.is_floating_point():
                return
            tensor = tensor.detach()  # shares storage and version counter with the output
            version = _version(tensor)
            if version is not None:
                originals[name] = (tensor, version)
            if learning or name in self._overwritten or version is None:  # type: ignore[operator]
                # clone: an in-place op later in the forward overwrites this buffer
                captured[name] = tensor.clone()
            else:
                captured[name] = tensor

        with self._hooks(modules, keep):
            output = self._forward(batch)
        overwritten = {
            name for name, (tensor, version) in originals.items() if _version(tensor) != version
        }
        if learning:
            # Learnt once, with every candidate layer exposed (the probe): which outputs are
            # modified in place later in the forward (a ReLU(inplace=True) after a batch norm,
            # `out += identity`). Only those are cloned from now on: a copy of every activation
            # is the largest cost of capturing them.
            self._overwritten = overwritten
        elif overwritten - self._overwritten:  # type: ignore[operator]
            # A forward that writes in place where the probe's did not (data-dependent code):
            # the uncloned captures are stale; learn and run this batch again.
            self._overwritten |= overwritten  # type: ignore[operator]
            return self._run_impl(batch, layers)
        return self._scores(output), captured

    def _stream(
        self,
        batch: torch.Tensor,
        wanted: set[str],
        modules: Mapping[str, tuple[list[nn.Module], str]],
        emit: Callable[[str, torch.Tensor], None],
    ) -> torch.Tensor:
        """One forward whose hooks hand each wanted output to ``emit`` as it is computed: the
        engine reduces it before any later op can overwrite it in place, so nothing is cloned."""

        def hand_over(path: str, index: int, output: Any) -> None:
            name = _call_name(path, index)
            tensor = _first_tensor(output) if name in wanted else None
            if tensor is not None and tensor.is_floating_point():
                emit(name, tensor.detach())

        with self._hooks(modules, hand_over):
            output = self._forward(batch)
        return self._scores(output)


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter (None for inference tensors, which have none)."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return None


# -- loading ---------------------------------------------------------------------------------------
def load_torch(
    path: Path,
    *,
    factory: str | None = None,
    trust_pickle: bool = False,
    input_size: tuple[int, int] | None = None,
    channels: int | None = None,
    layout: str | None = None,
) -> TorchAdapter:
    """Load a PyTorch model file into a :class:`TorchAdapter` (see the module docstring).
    ``layout`` (``--layout``): NHWC for a model that permutes channels-last images inside its
    forward (a torch.export archive's is read from its input shape)."""
    layout = layout_option(layout)
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file '{path}' does not exist: check the path")
    if path.is_dir():
        raise ModelLoadError(
            f"'{path}' is a directory, not a model file: pass the model file itself"
        )
    kind = _sniff(path)
    if factory is not None and kind in ("export", "torchscript"):
        raise UsageError(
            f"'{path}' is a {'torch.export' if kind == 'export' else 'TorchScript'} archive that "
            "holds its own module: drop --factory (it is for state dicts)"
        )
    if kind == "export":
        adapter = _load_export(path, channels, trust_pickle, layout)
    else:
        if kind == "torchscript":
            adapter = _load_torchscript(path, channels)
        else:
            adapter = _load_checkpoint(path, factory, trust_pickle, channels)
        if layout is not None:
            adapter.input_spec = replace(adapter.input_spec, layout=layout, layout_source="option")
    if input_size is not None:
        adapter.with_input_size(*input_size)
    return adapter


def _sniff(path: Path) -> str:
    """The file's kind: ``export``, ``torchscript`` or ``checkpoint`` (torch.save output, or
    something unreadable that torch.load then rejects)."""
    if path.suffix.lower() == ".pt2":
        return "export"
    return _sniff_zip(path)


def _sniff_zip(path: Path) -> str:
    """``export`` or ``torchscript`` from a zip's member names, else ``checkpoint``."""
    try:
        if not zipfile.is_zipfile(path):
            return "checkpoint"
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return "checkpoint"
    # Members sit under one top folder ('<name>/data.pkl'); compare what follows it.
    inner = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "archive_format" in inner:
        return "export"
    if "constants.pkl" in inner and any(name.startswith("code/") for name in inner):
        return "torchscript"
    return "checkpoint"


def _module_spec(module: nn.Module, channels: int | None) -> InputSpec:
    """NCHW, channels from the option or the first Conv2d (:func:`guess_channels`), size
    unknown, dynamic batch."""
    if channels is None:
        channels, _ = guess_channels(module)
    return InputSpec(
        name=_input_name(module),
        layout="NCHW",
        channels=channels,
        height=None,
        width=None,
        batch=None,
        layout_source="default",  # PyTorch convention; nothing in a module declares it
    )


def guess_channels(module: nn.Module) -> tuple[int, str | None]:
    """The input channels of a module that does not declare them (an ``nn.Module``, a
    TorchScript archive): those of its first ``Conv2d`` in registration order, with that
    module's path; 3 and None when it has none. Registration order is not call order: a model
    that defines its head before its stem, or lifts images with a layer of its own, misleads
    it, and ``--channels`` overrides it (:meth:`TorchAdapter.channels_guess` says so)."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d):
            return int(sub.in_channels), name
        if getattr(sub, "original_name", None) == "Conv2d":  # a TorchScript Conv2d
            in_channels = getattr(sub, "in_channels", None)
            if isinstance(in_channels, int):
                return in_channels, name
            weight = getattr(sub, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.ndim == 4:
                return int(weight.shape[1]) * int(getattr(sub, "groups", 1)), name
    return 3, None


def _input_name(module: nn.Module) -> str:
    try:
        if isinstance(module, torch.jit.ScriptModule):
            return module.forward.schema.arguments[1].name
        params = list(inspect.signature(module.forward).parameters)
        return params[0] if params else "input"
    except Exception:  # a signature is a nicety, never a reason to fail
        return "input"


def _prepare(module: nn.Module) -> tuple[nn.Module, str | None]:
    """The module in eval mode, float32, on the CPU, and a note when its weights were not
    float32: eager float16 runs slowly or not at all on a CPU, so a module is audited in float32
    (a ``.pt2`` or ONNX file runs in its own precision)."""
    dtypes = sorted(
        {
            str(t.dtype).removeprefix("torch.")
            for t in _tensors(module)
            if t.is_floating_point() and t.dtype != torch.float32
        }
    )
    note = None
    if dtypes:
        note = (
            f"the module's weights are {' and '.join(dtypes)}: audited in float32; to audit it "
            "in its own precision, export it (torch.export .pt2 or ONNX)"
        )
    return module.float().cpu().eval(), note


def _adapter_of(
    path: Path,
    module: nn.Module,
    fmt: str,
    *,
    channels: str | None = None,
    input_spec: InputSpec | None = None,
    **kwargs: Any,
) -> TorchAdapter:
    """A :class:`TorchAdapter` of a module, prepared by :func:`_prepare` (its note kept in
    ``load_notes``); its input spec as given, else read from the module
    (:func:`_module_spec`)."""
    module, note = _prepare(module)
    spec = input_spec if input_spec is not None else _module_spec(module, channels)
    adapter = TorchAdapter(path, spec, module, fmt=fmt, **kwargs)
    adapter.load_notes += [note] if note else []
    return adapter


def _control_flow(program: torch.export.ExportedProgram) -> tuple[str | None, set[str]]:
    """The program's data-dependent control flow: the first such operator (``torch.cond``,
    ``while_loop``, ``map``, ``scan``), or None, and the attribute names of the subgraphs these
    operators run (``true_graph_0``, ``body_graph_0``, ...), wherever they sit."""
    first: str | None = None
    branches: set[str] = set()
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            name = getattr(node.target, "__name__", "")
            if node.op != "call_function" or name not in _CONTROL_FLOW:
                continue
            first = first or (f"torch.{name}" if name == "cond" else name)
            for arg in torch.utils._pytree.tree_leaves((node.args, node.kwargs)):
                if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                    branches.add(str(arg.target).rsplit(".", 1)[-1])
    return first, branches


_CONTROL_FLOW = {"cond", "while_loop", "map", "map_impl", "scan", "associative_scan"}


def _batch_differs(
    alone: list[tuple[list[torch.Tensor], dict[str, torch.Tensor]]],
    together: tuple[list[torch.Tensor], dict[str, torch.Tensor]],
    dtype: torch.dtype,
) -> str | None:
    """Why two probe images run together (``together``) do not give what each gives alone
    (``alone``: outputs and layers per image), or None when they do."""
    half = dtype in (torch.float16, torch.bfloat16)
    if any(len(a[0]) != len(together[0]) for a in alone):
        return "the program gives other outputs for images run together"
    pairs = [(f"output {i}", [a[0][i] for a in alone], t) for i, t in enumerate(together[0])]
    for name, tensor in together[1].items():
        if any(name not in a[1] for a in alone):
            return f"layer {name} runs only for images run together"
        pairs.append((f"layer {name}", [a[1][name] for a in alone], tensor))
    if any(set(a[1]) - set(together[1]) for a in alone):
        return "a layer runs only for an image alone"
    for name, singles, both in pairs:
        if any(s.ndim == 0 or s.shape[0] != 1 for s in singles):
            shape = list(singles[0].shape)
            return f"its {name} of shape {shape} for one image has no batch axis"
        expected = torch.cat(singles)
        agrees = batch_agrees(expected, both, half)
        if agrees is None:
            return f"its {name} is not finite on noise images, so the check cannot tell"
        if not agrees:
            return (
                f"its {name} differs for images run together "
                f"(shape {list(both.shape)} for {list(expected.shape)})"
            )
    return None


class _NoGuards(nn.Module):
    """Stands in for the ``_guards_fn`` submodule of ``ExportedProgram.module()``."""

    def forward(self, *args: Any, **kwargs: Any) -> None:
        return None


def _unguarded(module: nn.Module, restore: bool = False) -> bool:
    """Turn off (``restore``: on again) the checks with which a torch.export module refuses
    inputs of another shape than exported: ``check_input_constraints`` of an unflattened
    module; the input-constraint pre-hook and the ``_guards_fn`` call of
    ``ExportedProgram.module()``. Whether the module had checks this knows how to turn off."""
    if hasattr(module, "check_input_constraints"):  # torch.export.unflatten
        module.check_input_constraints = restore
        return True
    if restore:
        saved = module.__dict__.pop("_eqaudit_guards", None)
        if saved is None:
            return False
        hooks, guards = saved
        module._forward_pre_hooks.update(hooks)
        if guards is not None:
            module._guards_fn = guards
        return True
    hooks = {
        key: hook
        for key, hook in module._forward_pre_hooks.items()
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook"
    }
    guards = getattr(module, "_guards_fn", None)
    if not hooks and guards is None:
        return False
    for key in hooks:
        del module._forward_pre_hooks[key]
    if guards is not None:
        module._guards_fn = _NoGuards()
    module.__dict__["_eqaudit_guards"] = (hooks, guards)
    return True


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


_EXPORT_LOG_LOCK = threading.RLock()


@contextmanager
def _quiet_torch_warnings() -> Iterator[list[BaseException]]:
    """Silence torch's notes about its own internals while loading; they mean nothing to users
    (FutureWarnings from torch.export.load, torch.jit's deprecation, pickle protocol notes).

    torch.export.load *logs* the error that made a file fail to deserialise, with its
    traceback, and then raises a generic "check the warnings above". Those logged exceptions
    are kept, not printed, in the list this yields: the cause for the one error line."""
    export_log = logging.getLogger("torch.export")
    logged: list[BaseException] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and record.exc_info[1] is not None:
                logged.append(record.exc_info[1])

    # torch gives the logger a stderr handler of its own: it is set aside too. The logger is
    # global: loads in other threads wait (a second swap would save the first's handlers).
    _EXPORT_LOG_LOCK.acquire()
    saved = (export_log.handlers[:], export_log.propagate, export_log.level)
    export_log.handlers = [Keep(logging.WARNING)]
    export_log.propagate = False
    export_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=r"`torch\.jit", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # (a quantized state dict's storages and quantized tensors: torch's deprecations)
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")
            yield logged
    finally:
        export_log.handlers, export_log.propagate = saved[0], saved[1]
        export_log.setLevel(saved[2])
        _EXPORT_LOG_LOCK.release()


# -- torch.export -------------------------------------------------------------------------------
class _PickleRefused(pickle.UnpicklingError):
    """A pickled object inside a .pt2 archive, refused without --trust-pickle."""


class _NoPickle:
    """Stands in for the ``pickle`` module inside torch's archive reader: ``load(s)`` refused."""

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)

    @staticmethod
    def loads(*args: Any, **kwargs: Any) -> Any:
        raise _PickleRefused("pickled object")

    load = loads


@contextmanager
def _refuse_pickled_code(trust_pickle: bool) -> Iterator[None]:
    """While torch.export.load runs, unless the user trusts the file: every ``torch.load`` is
    ``weights_only=True`` and the archive reader's ``pickle.loads`` is refused.

    torch unpickles a .pt2 archive's pickled weights and constants (and the state dict of older
    archive formats, after a failed weights-only attempt) with ``weights_only=False``: a crafted
    archive would run code on load. Both patches only make loading stricter.
    """
    if trust_pickle:
        yield
        return
    real_load = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return real_load(*args, **kwargs)
        except pickle.UnpicklingError as exc:
            raise _PickleRefused(str(exc)) from exc

    package = None
    with contextlib.suppress(ImportError):
        from torch.export.pt2_archive import _package as package  # torch >= 2.6
    torch.load = weights_only_load  # type: ignore[assignment]
    if package is not None and hasattr(package, "pickle"):
        package.pickle = _NoPickle()  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = real_load  # type: ignore[assignment]
        if package is not None and hasattr(package, "pickle"):
            package.pickle = pickle  # type: ignore[assignment]


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


#: torch.export.load's cause for a program whose output type is a registered pytree node.
_UNREGISTERED = re.compile(r"Deserializing (?P<type>\S+) in pytree is not registered")


def _load_export(
    path: Path, channels: int | None, trust_pickle: bool = False, layout: str | None = None
) -> TorchAdapter:
    logged: list[BaseException] = []
    try:
        with _quiet_torch_warnings() as logged, _refuse_pickled_code(trust_pickle):
            program = torch.export.load(path)
    except Exception as exc:
        if _caused_by(exc, _PickleRefused) or any(_caused_by(e, _PickleRefused) for e in logged):
            raise ModelLoadError(
                f"'{path}' is a torch.export archive that holds pickled Python objects; loading "
                "them runs arbitrary code from the file. Pass --trust-pickle only if you trust "
                "its source, or save the model again with torch.export.save"
            ) from exc
        reason = _first_line(logged[-1] if logged else exc)
        if not zipfile.is_zipfile(path):
            reason = "not a zip archive"
        elif _sniff_zip(path) != "export":
            reason = "a zip archive without 'archive_format': not written by torch.export.save"
        unregistered = _UNREGISTERED.search(reason)
        if unregistered:
            raise ModelLoadError(
                f"cannot read '{path}': its program returns an object of type "
                f"{unregistered['type']}, registered with torch's pytree by code that is not "
                "imported here; export a "
                "wrapper whose forward returns the scores tensor (or a tuple or dict of tensors)"
            ) from exc
        raise ModelLoadError(
            f"cannot read '{path}' as a torch.export archive ({reason}): "
            f"save it with torch.export.save under torch {torch.__version__.split('+')[0]}"
        ) from exc
    spec, dtype = _export_spec(path, program, channels, layout)
    try:
        with _quiet_torch_warnings():
            module: nn.Module = torch.export.unflatten(program)
    except Exception as exc:  # scores still work through the flat graph module
        note = (
            f"torch.export.unflatten failed on this program ({_first_line(exc, 120)}): "
            "per-layer results are not available"
        )
        try:
            flat = program.module()
        except Exception as flat_exc:
            raise ModelLoadError(
                f"cannot build a module from the torch.export archive '{path}' "
                f"({_first_line(flat_exc)}): save it again with torch.export.save"
            ) from flat_exc
        return TorchAdapter(
            path,
            spec,
            flat,
            fmt="export",
            layers_note=note,
            input_dtype=dtype,
            hookable=False,
            program=program,
        )
    module.eval()
    return TorchAdapter(
        path,
        spec,
        module,
        fmt="export",
        op_names=_export_op_names(program),
        layers_note=_EXPORT_NOTE,
        input_dtype=dtype,
        program=program,
    )


def _export_spec(
    path: Path,
    program: torch.export.ExportedProgram,
    channels: int | None,
    layout: str | None = None,
) -> tuple[InputSpec, torch.dtype]:
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise UnsupportedModelError(
            f"'{path}' takes {len(user_inputs)} inputs {user_inputs[:4]}; eqaudit audits image "
            "classifiers with a single image input: export a wrapper that takes one image tensor"
        )
    node = next(
        n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0]
    )
    value = node.meta.get("val")
    shape = tuple(getattr(value, "shape", ()))
    if len(shape) != 4:
        raise UnsupportedModelError(
            f"the program's input '{node.name}' has shape {shape}, not (batch, channels, H, W): "
            "eqaudit audits image classifiers"
        )
    dims = [dim if isinstance(dim, int) else None for dim in shape]  # SymInt: dynamic
    if layout is not None:
        source = "option"
    else:
        # The channel axis from the shape, as for ONNX: a model that permutes NHWC images
        # inside forward was exported with (1, H, W, 3).
        layout, _ = detect_layout(dims)
        source = "detected" if layout == "NHWC" else "default"
    c_axis, h_axis, w_axis = (1, 2, 3) if layout == "NCHW" else (3, 1, 2)
    if channels is not None and dims[c_axis] is not None and channels != dims[c_axis]:
        raise UsageError(
            f"the model's input '{node.name}' has {dims[c_axis]} channels and --channels gives "
            f"{channels}-channel images: drop --channels (the program declares its input)"
        )
    dtype = getattr(value, "dtype", torch.float32)
    if not dtype.is_floating_point and dtype != torch.uint8:
        raise UnsupportedModelError(
            f"the program's input '{node.name}' is {dtype}: eqaudit feeds image batches as "
            "float or uint8 pixels; export the model with one of those inputs"
        )
    spec = InputSpec(
        name=node.name,
        layout=layout,
        channels=dims[c_axis] if dims[c_axis] is not None else (channels or 3),
        height=dims[h_axis],
        width=dims[w_axis],
        batch=dims[0],
        dtype=str(dtype).removeprefix("torch."),
        layout_source=source,
    )
    return spec, dtype


def _export_op_names(program: torch.export.ExportedProgram) -> dict[str, str]:
    """Module path -> original class name, from the graph's ``nn_module_stack`` metadata."""
    ops: dict[str, str] = {}
    for node in program.graph.nodes:
        for entry in (node.meta.get("nn_module_stack") or {}).values():
            path, type_name = entry[0], entry[1]
            if not isinstance(type_name, str):
                type_name = f"{type_name.__module__}.{type_name.__qualname__}"
            path = re.sub(r"@\d+$", "", str(path))
            ops.setdefault(
                path, _CONTAINER_OP if _is_container(type_name) else type_name.rsplit(".", 1)[-1]
            )
    return ops


def _is_container(type_name: str) -> bool:
    if type_name in _CONTAINER_TYPE_NAMES:
        return True
    # A Sequential subclass (torchvision's Conv2dNormActivation): resolve it only when its module
    # is already imported, so reading a program never imports code named in the file.
    module_name, _, qualname = type_name.rpartition(".")
    cls = getattr(sys.modules.get(module_name), qualname, None)
    return isinstance(cls, type) and issubclass(cls, _CONTAINERS)


# -- TorchScript --------------------------------------------------------------------------------
def _load_torchscript(path: Path, channels: int | None) -> TorchAdapter:
    try:
        with _quiet_torch_warnings():
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(
            f"cannot read '{path}' as a TorchScript archive ({_first_line(exc)}): "
            "save it again with torch.jit.save"
        ) from exc
    return _adapter_of(
        path, module, "torchscript", channels=channels, layers_note=_TORCHSCRIPT_NOTE
    )


# -- torch.save checkpoints ---------------------------------------------------------------------
def _load_checkpoint(
    path: Path, factory: str | None, trust_pickle: bool, channels: int | None
) -> TorchAdapter:
    try:
        with _quiet_torch_warnings():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _holds_pickle(path):
            raise _not_an_archive(path, "neither a zip archive nor a pickle stream") from exc
        if not trust_pickle:
            raise ModelLoadError(
                f"'{path}' is a pickled Python object; loading it runs arbitrary code from the "
                "file. Pass --trust-pickle only if you trust its source, or save a state dict / "
                "torch.export archive instead"
            ) from exc
        obj = _load_trusted(path)
    except EOFError as exc:
        raise _not_an_archive(path, "the file is empty or truncated") from exc
    except Exception as exc:
        raise _not_an_archive(path, _first_line(exc).split(". ")[0]) from exc

    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), nn.Module):
                obj = obj[key]
                break
    if isinstance(obj, nn.Module):
        return _adapter_of(path, obj, "pickle", channels=channels)

    state = _state_dict_of(obj)
    if state is None and isinstance(obj, Mapping) and any("_packed_params" in str(k) for k in obj):
        raise ModelLoadError(
            f"'{path}' is the state dict of a quantized model (packed parameters): eqaudit "
            "reads float state dicts; audit the float model, or export the quantized one to "
            "TorchScript or ONNX"
        )
    if state is None:
        raise ModelLoadError(
            f"'{path}' holds a {type(obj).__name__}, not a model or a state dict: save the "
            "model's state_dict(), a TorchScript archive or a torch.export archive"
        )
    if factory is None:
        raise UsageError(
            f"'{path}' is a state dict (weights without the model's code): {_FACTORY_FORM}, "
            "a function that builds the model"
        )
    module = _build(factory)
    _load_state(path, module, state, factory)
    return _adapter_of(path, module, "state_dict", channels=channels, factory=factory)


def _not_an_archive(path: Path, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"cannot read '{path}': not a PyTorch archive ({reason}): pass a state dict saved with "
        "torch.save, a TorchScript archive or a torch.export .pt2 file"
    )


def _holds_pickle(path: Path) -> bool:
    """Whether the file is a torch.save zip or a pickle stream, checked without unpickling."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("data.pkl") for name in archive.namelist())
        with open(path, "rb") as handle:
            first = None
            has_global = False
            # genops only parses opcodes; nothing is imported or called.
            for opcode, _, _ in pickletools.genops(handle):
                first = first or opcode.name
                has_global |= opcode.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ")
                if opcode.name == "STOP":
                    return first == "PROTO" or has_global
    except Exception:  # a parse error: not a pickle
        return False
    return False


def _load_trusted(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(
            f"unpickling '{path}' failed ({_first_line(exc)}): the classes it refers to must be "
            "importable; or save a state dict and pass --factory"
        ) from exc


def _state_dict_of(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """The state dict in ``obj`` (bare, or under a wrapper key), else None."""

    def is_state(value: Any) -> bool:
        return (
            isinstance(value, Mapping)
            and any(isinstance(item, torch.Tensor) for item in value.values())
            and all(
                isinstance(item, torch.Tensor) or str(key).endswith("_extra_state")
                for key, item in value.items()
            )
        )

    if is_state(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if is_state(obj.get(key)):
                return obj[key]
    return None


# -- factories ------------------------------------------------------------------------------------
@contextmanager
def _no_exit(what: str) -> Iterator[None]:
    """Run a factory's code (its import, its call) so that ``sys.exit`` or an ``argparse`` of
    its command line at import time is the model's failure (exit 3), not an exit of eqaudit
    with the code it chose (2 read as a usage error, 1 as a failed gate). Its stderr is left
    alone (a factory may enable faulthandler or bind a logging handler to it): what argparse
    printed stays above the error line."""
    try:
        yield
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) or exc.code is None else f"'{exc.code}'"
        raise ModelLoadError(
            f"{what} exited (SystemExit {code}): does it parse the command line or call "
            "sys.exit when imported? build the model in a function that does not"
        ) from None


def _build(factory: str) -> nn.Module:
    builder, directory = _import_factory(factory)
    try:
        with _on_sys_path(directory), _no_exit(f"the factory '{factory}'"):
            module = builder()
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"the factory '{factory}' raised {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    if not isinstance(module, nn.Module):
        raise UsageError(
            f"the factory '{factory}' returned a {type(module).__name__}, not a torch.nn.Module: "
            "make it return the model"
        )
    return module


def _import_factory(factory: str) -> tuple[Callable[[], Any], Path | None]:
    target, sep, attr = factory.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise UsageError(f"--factory '{factory}' is not of the right form: {_FACTORY_FORM}")
    directory = None
    if target.endswith(".py") or "/" in target or "\\" in target:
        file = Path(target)
        if not file.is_file():
            raise UsageError(f"the factory file '{file}' does not exist: check --factory")
        directory = file.resolve().parent
        digest = hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]
        name = f"_eqaudit_factory_{digest}"
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise UsageError(f"the factory file '{file}' is not a Python file: check --factory")
        source = importlib.util.module_from_spec(spec)
        sys.modules[name] = source  # dataclasses and pickling look the module up here
        try:
            with _on_sys_path(directory), _no_exit(f"importing the factory file '{file}'"):
                spec.loader.exec_module(source)
        except ModelLoadError:
            del sys.modules[name]
            raise
        except Exception as exc:
            del sys.modules[name]
            raise ModelLoadError(
                f"importing the factory file '{file}' failed with {type(exc).__name__}: "
                f"{_first_line(exc)}"
            ) from exc
        where = f"the factory file '{file}'"
    else:
        try:
            with _no_exit(f"importing the factory module '{target}'"):
                source, directory = _import_module_or_from_cwd(target)
        except ModelLoadError:
            raise
        except ModuleNotFoundError as exc:
            if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
                raise UsageError(
                    f"the factory module '{target}' cannot be found: check --factory, and that "
                    "its package is installed, on PYTHONPATH or in the current directory"
                ) from exc
            raise ModelLoadError(
                f"importing the factory module '{target}' failed: {_first_line(exc)}"
            ) from exc
        except Exception as exc:
            raise ModelLoadError(
                f"importing the factory module '{target}' failed with {type(exc).__name__}: "
                f"{_first_line(exc)}"
            ) from exc
        where = f"the factory module '{target}'"
    builder = getattr(source, attr, None)
    if builder is None:
        raise UsageError(f"{where} has no '{attr}': check --factory")
    if not callable(builder):
        raise UsageError(f"'{attr}' in {where} is not callable: check --factory")
    return builder, directory


def _import_module_or_from_cwd(target: str) -> tuple[Any, Path | None]:
    """``importlib.import_module(target)``; when its top package is not found, again with the
    current directory on ``sys.path``, as ``python -m`` would find it (a console script's path
    does not hold the directory it runs in). Returns the module and that directory, if used."""
    try:
        return importlib.import_module(target), None
    except ModuleNotFoundError as exc:
        top = target.split(".")[0]
        cwd = Path.cwd()
        if exc.name != top or str(cwd) in sys.path or "" in sys.path:
            raise
        if not ((cwd / f"{top}.py").is_file() or (cwd / top).is_dir()):
            raise
    with _on_sys_path(cwd):
        return importlib.import_module(target), cwd


@contextmanager
def _on_sys_path(directory: Path | None) -> Iterator[None]:
    """Let a factory file import its sibling modules while it is imported and called."""
    if directory is None or str(directory) in sys.path:
        yield
        return
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        sys.path.remove(str(directory))


def _load_state(
    path: Path, module: nn.Module, state: Mapping[str, torch.Tensor], factory: str
) -> None:
    expected = module.state_dict()
    keys = set(state)
    # DataParallel checkpoints prefix every key with 'module.', a torch.compile'd module's
    # with '_orig_mod.'; nested, with both, in either order.
    stripped = True
    while stripped:
        stripped = False
        for prefix in ("module.", "_orig_mod."):
            if (
                keys
                and all(k.startswith(prefix) for k in keys)
                and not any(k.startswith(prefix) for k in expected)
            ):
                state = {k.removeprefix(prefix): v for k, v in state.items()}
                keys, stripped = set(state), True
    missing = [k for k in expected if k not in keys]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} in the file vs {tuple(expected[k].shape)} in the module"
        for k in expected
        if k in keys and isinstance(state[k], torch.Tensor) and state[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
            problems.append(f"{label}: {', '.join(items[:4])}{more}")
    if problems:
        raise ModelLoadError(
            f"the state dict in '{path}' does not fit the module built by '{factory}' "
            f"({'; '.join(problems)}): check --factory builds the same architecture"
        )
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelLoadError(
            f"loading the state dict in '{path}' into the module built by '{factory}' failed: "
            f"{_first_line(exc)}"
        ) from exc
