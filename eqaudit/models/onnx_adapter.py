"""ONNX backend: validate with onnx's checker, run with onnxruntime.

Per-layer activations are captured by exposing intermediate float tensors as extra graph outputs
(one session per set of requested layers, cached). Candidate layers are the outputs of nodes that
depend on the image input, in the graph's (topological) node order.

The geometry of every tensor comes from :func:`eqaudit.grids.onnx_grid_graph`: the layout of
rank-4 maps (a ``Transpose`` with ``perm=[0,3,1,2]`` turns NHWC into NCHW and back) and the sampling
grid (cells, stride, offset) of spatial maps from ``Conv``/pooling/padding/resize attributes. Ops
whose geometry is not understood give an unknown grid rather than a guess.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, numpy_helper

from eqaudit.data.prefetch import cpu_limit, physical_cpus
from eqaudit.errors import ModelLoadError, UnsupportedModelError, UsageError, cause_line
from eqaudit.grids import GridGraph, inferred_dims, onnx_grid_graph
from eqaudit.models.base import (
    InputSpec,
    ModelAdapter,
    batch_agrees,
    detect_layout,
    layout_option,
    looks_out_of_memory,
    sha256_file,
)

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
# Ops never worth auditing as a layer (shape arithmetic, constants).
_SKIP_OPS = {
    "Constant",
    "ConstantOfShape",
    "Shape",
    "Size",
    "Range",
    "NonZero",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Slice",
    "Concat",
    "Cast",
    "Identity",
    "Reshape",
    "Flatten",
    "Dropout",
}
_NP_TYPES = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64,
    # 0-255 pixels, as TF and TFLite conversions take them: fed rounded (see _feed)
    TensorProto.UINT8: np.uint8,
}


def _feed(batch: torch.Tensor, dtype: str) -> np.ndarray:
    """A canonical batch as the graph's input dtype: uint8 pixels are the batch rounded to the
    nearest integer and clipped to 0-255 (after the transforms, which interpolate in float)."""
    array = batch.numpy()
    if dtype == "uint8":
        return np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return array.astype(dtype, copy=False)


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    shape = value_info.type.tensor_type.shape
    dims: list[int | str | None] = []
    for d in shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def _ort_message(exc: Exception) -> str:
    """First line of an onnxruntime error, without its status prefix and C++ source location."""
    first = cause_line(exc)
    # "[ONNXRuntimeError] : 1 : FAIL : Fatal error: " says nothing to a user.
    # (Also where a provider's error is quoted inside another.)
    first = re.sub(r"\[ONNXRuntimeError\]( : \w+)* : (Fatal error: )?", "", first)
    # ".../reshape_helper.h:84 onnxruntime::ReshapeHelper::...(...) size != 0 was false. Why"
    first = re.sub(r"\S*onnxruntime_src\S*:\d+ .*? was false\. ", "", first)
    # "Status Message: concatbase.h:135 PrepareForComputeImpl Non concat axis ...": a run-time
    # error's C++ file and function
    first = re.sub(r"(Status Message: )\S+\.(?:h|cc|cpp):\d+ \S+ ", r"\1", first)
    # "Load model from /a/m.onnx failed:/onnxruntime_src/.../model.cc:202 onnxruntime::Model::
    # Model(onnx::ModelProto&&, ...) Unsupported model IR version: 14, ..." (onnxruntime 1.30):
    # the path is the user's own, the C++ location and signature nobody's; the cause is last.
    first = re.sub(r"^Load model from .*? failed:\s*", "", first)
    # The signature may have a return type ("void onnxruntime::...Validate(...)", "onnxruntime::
    # Provider& ...Get()") and parentheses one deep inside its arguments.
    return re.sub(r"\S*onnxruntime_src\S*:\d+ [^(]*\((?:[^()]|\([^()]*\))*\)\s*", "", first)


def _shortened(text: str, limit: int = 300) -> str:
    """``text`` cut to about ``limit`` characters in the middle: onnxruntime states the cause
    last, its context first."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half].rstrip()} … {text[-half:].lstrip()}"


#: onnxruntime's words for a model newer than it reads (core/graph/model.cc, stable since 1.x).
_NEWER_IR = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")
#: ... and for an opset newer than it supports (core/graph/model_load_utils.h).
_NEWER_OPSET = re.compile(
    r"Opset (\d+) is under development.*Current official support for domain (\S+) is till "
    r"opset (\d+)"
)


#: Where the output scale and zero point of a quantized op's integer output are among its
#: inputs (QuantizeLinear, and the QOperator ops onnxruntime's quantizer writes).
_OUTPUT_QUANTIZATION = {
    "QuantizeLinear": (1, 2),
    "QLinearConv": (6, 7),
    "QLinearMatMul": (6, 7),
    "QGemm": (7, 8),
    "QLinearAdd": (6, 7),
    "QLinearMul": (6, 7),
    "QLinearGlobalAveragePool": (3, 4),
    "QLinearAveragePool": (3, 4),
    "QLinearLeakyRelu": (3, 4),
    "QLinearSigmoid": (3, 4),
    "QLinearConcat": (0, 1),
}
#: Ops that hand an integer input's values on with its quantization (a max pool of uint8 cells).
_KEEPS_QUANTIZATION = {"MaxPool", "Relu", "Transpose", "Pad"}


def _quantized_outputs(graph: onnx.GraphProto) -> dict[str, tuple[float, float]]:
    """Integer tensors of a quantized (QOperator) graph whose real values are known:
    ``name -> (scale, zero point)``, constant per tensor, so ``(q - zero point) * scale`` is
    the float map the quantized op stands for. Per-channel or computed scales are left out."""
    # The tensors, not their values: only the scales and zero points read below are converted
    # (converting every initializer copied all of a model's weights at every load).
    tensors = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t

    def constant(name: str) -> np.ndarray | None:
        tensor = tensors.get(name)
        return numpy_helper.to_array(tensor) if tensor is not None else None

    found: dict[str, tuple[float, float]] = {}
    for node in graph.node:
        if node.op_type in _KEEPS_QUANTIZATION and node.input and node.input[0] in found:
            found[node.output[0]] = found[node.input[0]]
            continue
        at = _OUTPUT_QUANTIZATION.get(node.op_type)
        if at is None or len(node.input) <= at[0] or not node.output:
            continue
        scale = constant(node.input[at[0]])
        zero = constant(node.input[at[1]]) if len(node.input) > at[1] else np.zeros(())
        if scale is None or zero is None or scale.size != 1 or zero.size != 1:
            continue
        if zero.dtype.kind not in "iu":  # (QGemm without y_scale gives floats)
            continue
        found[node.output[0]] = (float(scale.reshape(())), float(zero.reshape(())))
    return found


def _check_external_data(model: onnx.ModelProto, folder: Path) -> list[str]:
    """The files the model's tensors keep their data in (relative to its folder, sorted), each
    refused when it lies outside that folder."""
    root = folder.resolve()
    locations: set[str] = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        linked = not Path(location).is_absolute() and (folder / location).is_symlink()
        if linked and root not in target.parents:
            raise ModelLoadError(
                f"tensor '{tensor.name}' stores its data in '{location}', a link to '{target}' "
                "outside the model's folder (as a Hugging Face cache stores files): refusing to "
                "follow it; copy the model and its data into one folder (e.g. huggingface-cli "
                "download --local-dir DIR)"
            )
        if Path(location).is_absolute() or root not in target.parents:
            raise ModelLoadError(
                f"tensor '{tensor.name}' stores its data at '{location}', outside the model's "
                "folder: refusing to read it (move the data file next to the model)"
            )
        locations.add(location)
    return sorted(locations)


#: What onnxruntime says when its CUDA provider, not the graph, is what failed.
_CUDA_WORDS = re.compile(r"cuda|cudnn|cublas|cufft|curand|gpu|provider|device", re.IGNORECASE)


class OnnxAdapter(ModelAdapter):
    backend = "onnx"
    #: The files beside the model that hold its external tensor data (relative paths, sorted)
    external_data: tuple[str, ...] = ()

    @property
    def sha256(self) -> str:
        """The model file's SHA-256; with external data, that of the file's digest and each data
        file's name and digest, so that new weights in the same graph file are a new model."""
        if not hasattr(self, "_sha256"):
            if not self.external_data:
                return super().sha256
            digest = hashlib.sha256(sha256_file(self.path).encode())
            for location in self.external_data:
                digest.update(f"\n{location}\n".encode())
                digest.update(sha256_file(self.path.parent / location).encode())
            self._sha256 = digest.hexdigest()
        return self._sha256

    def __init__(
        self,
        model: onnx.ModelProto,
        *,
        path: Path,
        input_name: str | None = None,
        output_name: str | None = None,
        layout: str | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        self.model = model
        #: onnxruntime's intra-op threads (None: its default, one per physical core). Under a
        #: CPU limit, the physical cores within it: onnxruntime's default counts the machine's.
        self.threads = threads or (physical_cpus() if cpu_limit() is not None else None)
        # What onnxruntime runs on either way (read once: sysfs and the cgroup, not per batch).
        self._host_threads = self.threads or physical_cpus()
        graph = model.graph
        initializers = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        spec_input = self._pick_input(inputs, input_name)
        super().__init__(path, self._input_spec(spec_input, layout))
        self.output_name = self._pick_output(list(graph.output), output_name)
        self.providers = self._providers(providers)
        self._sessions: dict[tuple[str, ...], ort.InferenceSession] = {}
        #: (session, layers, batch shape) -> the last run's output arrays, written again by the
        #: next run with the same key: activations handed out are valid until that next run
        self._reuse: dict[tuple, list[np.ndarray]] = {}
        #: per-image output shapes of a (session, outputs, image shape), from its last run
        self._per_image: dict[tuple, list[tuple[int, ...] | None]] = {}
        # The graph walk (shape inference included) is only needed for per-layer audits.
        self._candidates: list[tuple[str, str]] | None = None
        #: integer (quantized) layers -> (scale, zero point), found with the candidates
        self._quantized: dict[str, tuple[float, float]] = {}
        self._inferred: onnx.ModelProto | None = None
        meta = {p.key: p.value for p in model.metadata_props}
        self.class_names: list[str] | None = None
        if "class_names" in meta:
            try:
                names = json.loads(meta["class_names"])
                if isinstance(names, list):
                    self.class_names = [str(n) for n in names]
            except json.JSONDecodeError:
                pass
        #: Is ``self.model`` the file's graph (its plain session loads from the file)?
        self._from_file = True
        self._session(())  # fail early (unsupported op, custom domain) at load time
        #: For a graph fixed at batch 1: how it is run (``describe()["fixed_batch"]``).
        self.fixed_batch: dict[str, Any] | None = None
        self._declared_checked = False  # a declared dynamic batch checked (_check_declared_batch)
        self._batch_dynamically()

    # -- spec --------------------------------------------------------------------------------
    @staticmethod
    def _pick_input(inputs: list[onnx.ValueInfoProto], name: str | None) -> onnx.ValueInfoProto:
        names = [i.name for i in inputs]
        if name is not None:
            if name not in names:
                raise UsageError(
                    f"--input-name '{name}' is not an input of the graph: use one of {names}"
                )
            if len(inputs) > 1:
                raise UnsupportedModelError(
                    f"the graph has {len(inputs)} inputs ({', '.join(names)}); eqaudit feeds one "
                    "image tensor: export the model with a single image input"
                )
            return inputs[0]
        if len(inputs) != 1:
            raise UnsupportedModelError(
                f"the graph has {len(inputs)} inputs ({', '.join(names) or 'none'}); eqaudit feeds "
                "one image tensor: export a single-input classifier (or pick it with --input-name)"
            )
        return inputs[0]

    @staticmethod
    def _input_spec(value: onnx.ValueInfoProto, layout: str | None) -> InputSpec:
        elem = value.type.tensor_type.elem_type
        if elem not in _NP_TYPES:
            dtype = TensorProto.DataType.Name(elem).lower()
            raise UnsupportedModelError(
                f"input '{value.name}' is {dtype}: eqaudit feeds image batches (N, C, H, W) or "
                "(N, H, W, C) as float32, float16, float64 or uint8 pixels; export the model "
                "with one of those inputs"
            )
        dims = _dims(value)
        if len(dims) != 4:
            raise UnsupportedModelError(
                f"input '{value.name}' has rank {len(dims)} ({dims}); an image classifier takes "
                "a rank-4 batch (N, C, H, W) or (N, H, W, C)"
            )
        layout = layout_option(layout)
        if layout is not None:
            c_axis = 1 if layout == "NCHW" else 3
            channels = dims[c_axis] if isinstance(dims[c_axis], int) else 3
            source = "option"
        else:
            layout, channels = detect_layout(dims)
            source = "detected"
        h_axis, w_axis = (2, 3) if layout == "NCHW" else (1, 2)
        height = dims[h_axis] if isinstance(dims[h_axis], int) else None
        width = dims[w_axis] if isinstance(dims[w_axis], int) else None
        batch = dims[0] if isinstance(dims[0], int) else None
        return InputSpec(
            name=value.name,
            layout=layout,
            channels=int(channels),
            height=height,
            width=width,
            batch=batch,
            dtype=np.dtype(_NP_TYPES[elem]).name,
            layout_source=source,
        )

    @staticmethod
    def _pick_output(outputs: list[onnx.ValueInfoProto], name: str | None) -> str:
        names = [o.name for o in outputs]
        if name is not None:
            if name not in names:
                raise UsageError(
                    f"--output-name '{name}' is not an output of the graph: use one of {names}"
                )
            return name
        if len(outputs) != 1:
            raise UsageError(
                f"the graph has {len(outputs)} outputs ({', '.join(names)}): pick the class "
                "scores with --output-name"
            )
        return outputs[0].name

    def _wants_cuda(self) -> bool:
        names = (p[0] if isinstance(p, tuple) else p for p in self.providers)
        return "CUDAExecutionProvider" in names

    def use_providers(self, providers: Sequence[Any]) -> None:
        """Run on ``providers`` from now on (``--device cuda``: onnxruntime's CUDA provider).
        The sessions made for the previous ones are dropped, with the arrays and shapes kept
        per session, and the plain session is made again: a graph the new provider cannot run
        fails here, at load."""
        self.providers = list(providers)
        self._sessions.clear()
        self._reuse.clear()
        self._per_image.clear()
        self._session(())

    @staticmethod
    def _providers(providers: Sequence[str] | None) -> list[str]:
        available = ort.get_available_providers()
        chosen = list(providers) if providers else ["CPUExecutionProvider"]
        for p in chosen:
            if p not in available:
                raise UsageError(
                    f"onnxruntime provider '{p}' is not available here: use one of {', '.join(available)}"
                )
        return chosen

    def host_threads(self) -> int:
        """onnxruntime's intra-op threads, whatever torch's setting: ``threads`` (--threads), else
        onnxruntime's default, one per physical core (:func:`~eqaudit.data.prefetch.physical_cpus`)."""
        return self._host_threads

    # -- a graph fixed at batch 1 -------------------------------------------------------------
    def with_input_size(self, height: int, width: int) -> None:
        super().with_input_size(height, width)
        self._batch_dynamically()  # a graph with a dynamic image size: checked once it is known

    def _batch_dynamically(self) -> None:
        """Run a graph fixed at batch 1 (what ``torch.onnx.export`` writes without
        ``dynamic_axes``) on whole batches when a copy with a dynamic batch
        (:func:`_dynamic_batch`) gives, for two probe images run together, the outputs the
        graph gives for each alone. One image per run costs a ResNet-18's all-layers audit 1.5x
        on 2 CPU cores (47 outputs bound per run; its output-only audit about the same time),
        and far more on a GPU, where one image cannot fill the device. The check costs one
        more session, two single-image runs and one of both (0.15-0.2 s for that ResNet), and
        where the copy gives a Reshape a -1 (heads merged with the batch), two more sessions
        to compare the tensors it rewrote (:meth:`_mixed_inside`). A graph that fails it (a
        batch of 1 written into an ``Expand``, a ``Squeeze`` of the batch axis) keeps running
        one image at a time, and ``fixed_batch`` says why."""
        spec = self.input_spec
        if self.fixed_batch is not None or None in (spec.height, spec.width):
            return
        if spec.batch is None:
            self._check_declared_batch()
            return
        if spec.batch != 1:
            return
        record: dict[str, Any] = {"size": 1, "run": "one image at a time"}
        self.fixed_batch = record
        probe = self._probe_images()
        alone = self._alone(probe, record)
        if alone is None:
            return
        try:
            model, changed = _dynamic_batch(self.model, spec.name, self._inferred_model())
            session = self._new_session(model.SerializeToString(), exposed=False)
            together = session.run([self.output_name], {spec.name: probe})[0]
        except Exception as exc:
            # onnxruntime's own words (not the loader's guess at a missing operator: the graph
            # loaded as exported), the cause kept, which it states last
            cause = _ort_message(exc.__cause__ if exc.__cause__ is not None else exc)
            record["why"] = (
                "a copy with a dynamic batch does not run (the batch of 1 is written elsewhere "
                f"in the graph, such as a Reshape's target shape): {_shortened(cause, 200)}"
            )
            return
        agrees = batch_agrees(
            torch.from_numpy(alone), torch.from_numpy(together), spec.dtype == "float16"
        )
        if agrees is None:
            record["why"] = "its output is not finite on noise images, so the check cannot tell"
            return
        if not agrees:
            record["why"] = (
                "a copy with a dynamic batch gives other outputs for images run together "
                f"(shape {list(together.shape)} for {list(alone.shape)})"
            )
            return
        # (a graph's other outputs are layers, read from the copy as well)
        others = [o.name for o in self.model.graph.output if o.name != self.output_name]
        try:
            mixed = self._mixed_inside(model, changed, probe, others)
        except Exception as exc:
            record["why"] = (
                "the tensors a copy with a dynamic batch rewrites could not be compared: "
                f"{_shortened(_ort_message(exc), 200)}"
            )
            return
        if mixed is not None:
            record["why"] = (
                f"a copy with a dynamic batch gives another '{mixed}' for images run together "
                "(its outputs agree: the layers would not)"
            )
            return
        self.model, self._from_file = model, False
        self._sessions, self._reuse, self._per_image = {(): session}, {}, {}
        self._inferred, self._candidates = None, None
        self.input_spec = replace(spec, batch=None)
        record["run"] = "batched"

    def _mixed_inside(
        self,
        batched: onnx.ModelProto,
        changed: Sequence[str],
        probe: np.ndarray,
        others: Sequence[str] = (),
    ) -> str | None:
        """The first of ``changed`` (the tensors whose nodes the dynamic-batch copy rewrote)
        and ``others`` (the graph's outputs beside the scores, read as layers) that the copy
        computes otherwise for the probe images run together than the graph does for each
        alone, or None. The output alone can agree where a layer does not: a
        rewritten Reshape that puts the batch on another axis, a later one that puts it back,
        a layer norm between that cancels the images' mixing (every layer audited from the copy
        would be wrong). Costs two sessions, only where a Reshape was given a -1 (a 0 that
        keeps the first axis, the batch at the start of this copy, cannot move it) or the
        graph has outputs beside the scores."""
        wanted = [*changed, *others]
        if not wanted:
            return None
        name = self.input_spec.name
        exposed = [
            self._new_session(_with_outputs(graph, wanted).SerializeToString(), exposed=True)
            for graph in (self.model, batched)
        ]
        singles = [exposed[0].run(wanted, {name: image[None]}) for image in probe]
        together = exposed[1].run(wanted, {name: probe})
        half = self.input_spec.dtype == "float16"
        for k, tensor in enumerate(wanted):
            pieces = [np.asarray(single[k]) for single in singles]
            if tensor in others and any(p.ndim == 0 or p.shape[0] != 1 for p in pieces):
                continue  # (an output without a batch axis: no layer either)
            if not _same_values(np.concatenate(pieces), together[k], half):
                return tensor
        return None

    def _check_declared_batch(self) -> None:
        """A graph that declares a dynamic batch may still hold the batch size it was traced at
        (a Swin's window reverse reshapes to ``(1, H, W, C)`` with the 1 written in): two
        probe images run together then fail, or silently mix. Run them together and alone
        (three small runs, once: a batch written into the graph does not depend on the image
        size); on a failure or a difference the graph runs one image at a time, and
        ``fixed_batch`` says why."""
        if self._declared_checked:
            return
        self._declared_checked = True
        spec = self.input_spec
        record: dict[str, Any] = {"size": 1, "run": "one image at a time"}
        probe = self._probe_images()
        alone = self._alone(probe, record)
        if alone is None:
            return  # (not even on noise: the audit's own run says why)
        declared = "the graph declares a dynamic batch, but"
        try:
            together = self._session(()).run([self.output_name], {spec.name: probe})[0]
        except Exception as exc:
            record["why"] = f"{declared} two images run together fail: {_ort_message(exc)[:160]}"
        else:
            agrees = batch_agrees(
                torch.from_numpy(alone), torch.from_numpy(together), spec.dtype == "float16"
            )
            if agrees is not False:
                return  # (None: not finite on noise; the audit's own checks say so)
            shapes = (
                f"shape {list(together.shape)} for {list(alone.shape)}"
                if together.shape != alone.shape
                else "a batch size written into it, batch statistics or randomness"
            )
            record["why"] = (
                f"{declared} two images run together give other outputs than each alone ({shapes})"
            )
        self.fixed_batch = record
        self.input_spec = replace(spec, batch=1)

    def _probe_images(self) -> np.ndarray:
        """Two noise images in the graph's input dtype, for the batch checks."""
        spec = self.input_spec
        rng = np.random.default_rng(0)
        if spec.dtype == "uint8":
            return rng.integers(0, 256, spec.model_shape(2)).astype(np.uint8)
        return rng.standard_normal(spec.model_shape(2)).astype(spec.dtype)

    def _alone(self, probe: np.ndarray, record: dict[str, Any]) -> np.ndarray | None:
        """The scores of each probe image run alone, stacked; None (and ``record["why"]``) when
        the graph does not run on them or its output has no batch axis."""
        spec = self.input_spec
        plain = self._session(())
        try:
            singles = [
                plain.run([self.output_name], {spec.name: image[None]})[0] for image in probe
            ]
        except Exception as exc:  # not even on noise: the audit's own run will say why it fails
            record["why"] = f"the graph does not run on noise images: {_ort_message(exc)[:160]}"
            return None
        if any(single.ndim < 2 or single.shape[0] != 1 for single in singles):
            # (K,) scores: a copy would give (2K,) for two images, which no check can tell
            # from two rows of K.
            record["why"] = f"its output of shape {list(singles[0].shape)} has no batch axis"
            return None
        return np.concatenate(singles)

    # -- graph walk --------------------------------------------------------------------------
    def _inferred_model(self) -> onnx.ModelProto:
        """The graph after shape inference (the model itself when inference fails). Inferred on
        a copy whose large weights are declared inputs of the same type and shape: inference
        reads their shapes, not their values, and copying 46 MB of weights costs 0.1 s. Only the
        inferred types and shapes are read from it, never its initializers."""
        if self._inferred is None:
            try:
                # data_prop: a Reshape's target computed from Shape (an exporter's flatten(2))
                # gives its output's static sizes, a token sequence's channel count among them
                self._inferred = onnx.shape_inference.infer_shapes(
                    _without_large_weights(self.model), strict_mode=False, data_prop=True
                )
            except Exception:  # shape inference is a help, not a requirement
                self._inferred = self.model
        return self._inferred

    def _walk_graph(self) -> list[tuple[str, str]]:
        """Candidate layers: float outputs of nodes that depend on the image, in node order."""
        graph = self.model.graph
        inferred = self._inferred_model().graph
        types = {
            v.name: v.type.tensor_type.elem_type
            for v in [*inferred.value_info, *inferred.output]
            if v.type.HasField("tensor_type")
        }
        scalars = {
            v.name
            for v in [*inferred.value_info, *inferred.output]
            if v.type.HasField("tensor_type")
            and v.type.tensor_type.HasField("shape")
            and not v.type.tensor_type.shape.dim
        }
        consumers: dict[str, set[str]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, set()).add(node.op_type)
        # A quantized graph's integer maps are layers too, read as the floats they stand for.
        self._quantized = quantized = _quantized_outputs(graph)
        candidates: list[tuple[str, str]] = []
        dependent = {self.input_spec.name}
        for node in _image_nodes(graph, self.input_spec.name, content=True):
            dependent.update(node.output)
            for out in node.output:
                if not out:
                    continue
                if out == self.output_name or node.op_type in _SKIP_OPS:
                    # (The class scores are audited as outputs; a model's other outputs, a
                    # second head or features, are layers, as a PyTorch module's are.)
                    continue
                if (
                    node.op_type in ("Add", "Sum")
                    and consumers.get(out, set()) <= {"Add", "Sum"}
                    and all(i in dependent for i in node.input if i)
                ):
                    # A partial sum, read only by further additions: the dynamo exporter writes
                    # an adaptive pooling that does not divide its input as ~100 chained Adds of
                    # gathered cells (seen with AdaptiveAvgPool2d(7) on a 66-cell map). The sum
                    # is compared once it is whole, where something other than an Add reads it.
                    # (A bias added to a branch's output before a residual sum, a ViT's
                    # attention or MLP output, is a layer.)
                    continue
                if out in types and types[out] not in _FLOAT_TYPES and out not in quantized:
                    continue
                if out in scalars:  # one number per batch (a quantization scale): no layer
                    continue
                if node.op_type == "QuantizeLinear" or (
                    out in quantized and "DequantizeLinear" in consumers.get(out, set())
                ):
                    # A float tensor rounded (the float one is the layer, or is the image), or
                    # an integer one about to be read back as floats (the layer, once).
                    continue
                candidates.append((out, node.op_type))
        return candidates

    def _grid_graph_impl(self) -> tuple[GridGraph | None, str | None]:
        spec = self.input_spec
        graph = onnx_grid_graph(self.model, spec.name, spec.layout, inferred=self._inferred_model())
        return graph, None

    def _walked(self) -> list[tuple[str, str]]:
        if self._candidates is None:
            self._candidates = self._walk_graph()
        return self._candidates

    def _layers_impl(self) -> list[tuple[str, str]]:
        return list(self._walked())

    def _geometry_size(self) -> tuple[int, int] | None:
        spec = self.input_spec
        return (spec.height, spec.width) if spec.height and spec.width else None

    def _layer_stride(self, name: str) -> tuple[float, float] | None:
        """Cumulative stride from the layer's sampling grid at the model's input size (None for
        flat layers, unknown grids, or while the input size is unknown)."""
        size, graph = self._geometry_size(), self.grid_graph()
        if size is None or graph is None:
            return None
        grid = graph.grids(*size).get(name)
        if grid is None or isinstance(grid, str):
            return None
        return (grid.h.stride, grid.w.stride)

    def channels_last(self, name: str) -> bool:
        graph = self.grid_graph()
        if graph is not None:
            # Layouts do not depend on the input size: any size serves while it is unknown.
            layout = graph.layouts(*(self._geometry_size() or (224, 224))).get(name)
            if layout == "NHWC":
                return True
        return super().channels_last(name)

    # -- running -----------------------------------------------------------------------------
    def _session(self, layers: tuple[str, ...]) -> ort.InferenceSession:
        if layers in self._sessions:
            return self._sessions[layers]
        # The probe's session (every candidate exposed) serves a run of nearly the same layers:
        # building another copy of a large model costs more than the few extra outputs.
        for exposed, session in self._sessions.items():
            if layers and set(layers) <= set(exposed) and len(exposed) <= 1.25 * len(layers):
                return session
        model = _with_outputs(self.model, layers) if layers else self.model
        # The plain model loads from its (already validated) file: no serialised copy.
        from_file = not layers and self._from_file and self.path.is_file()
        session = self._new_session(
            str(self.path) if from_file else model.SerializeToString(), exposed=bool(layers)
        )
        # Keep one layer session at a time: each holds its own copy of the weights.
        for key in [k for k in self._sessions if k]:
            del self._sessions[key]
        self._sessions[layers] = session
        return session

    def _new_session(self, source: str | bytes, *, exposed: bool) -> ort.InferenceSession:
        """An onnxruntime session of ``source`` (a path or a serialised model) on this adapter's
        providers and threads; ``exposed``: it hands out layers."""
        options = ort.SessionOptions()
        # Fatal only: onnxruntime logs straight to the process's stderr, which would add lines
        # beside eqaudit's one error line; its errors reach us as exceptions anyway.
        options.log_severity_level = 4
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        if exposed:
            # onnxruntime's memory pattern, planned after a first run, allocates a second block
            # as large as every exposed output (1.4 GB for ResNet-18 at 224 x 64): fresh pages
            # on the second batch that cost more than the planning saves (the outputs are bound
            # to the adapter's own arrays, and a plain session keeps the pattern).
            options.enable_mem_pattern = False
        try:
            session = ort.InferenceSession(source, sess_options=options, providers=self.providers)
        except Exception as exc:
            first = _ort_message(exc)
            if looks_out_of_memory(str(exc)):
                raise MemoryError(first) from exc
            if self._wants_cuda() and _CUDA_WORDS.search(first):
                raise UsageError(
                    f"onnxruntime cannot start '{self.path.name}' on its CUDA provider: "
                    f"{_shortened(first)} (check the GPU index of --device cuda:N and the CUDA and cuDNN "
                    "libraries onnxruntime-gpu needs, or use --device cpu)"
                ) from exc
            newer = _NEWER_IR.search(first)
            if newer:
                raise ModelLoadError(
                    f"'{self.path.name}' is ONNX IR version {newer[1]}, newer than onnxruntime "
                    f"{ort.__version__} reads (up to {newer[2]}): pip install -U onnxruntime, or "
                    "re-export the model with an older onnx package"
                ) from exc
            opset = _NEWER_OPSET.search(first)
            if opset:
                raise ModelLoadError(
                    f"'{self.path.name}' uses opset {opset[1]} of {opset[2]}, newer than "
                    f"onnxruntime {ort.__version__} supports (up to {opset[3]}): pip install -U "
                    f"onnxruntime, or re-export the model at opset {opset[3]} or lower"
                ) from exc
            raise ModelLoadError(
                f"onnxruntime cannot load '{self.path.name}': {_shortened(first)} (an operator this "
                f"onnxruntime {ort.__version__} lacks, or a custom one? pip install -U "
                "onnxruntime, or re-export the model with standard ONNX ops)"
            ) from exc
        if self._wants_cuda():
            # onnxruntime falls back to the CPU, with a log line at most, when its CUDA provider
            # cannot start (a missing CUDA or cuDNN library): the audit would run on the CPU
            # under a CUDA label. After the session is made, a failing run raises instead.
            if "CUDAExecutionProvider" not in session.get_providers():
                raise UsageError(
                    "onnxruntime could not start its CUDA provider (a CUDA or cuDNN library "
                    "that onnxruntime-gpu needs is missing, or there is no such GPU) and would "
                    "run on the CPU: fix the GPU set-up, or use --device cpu"
                )
            session.disable_fallback()
        return session

    def _run_impl(
        self,
        batch: torch.Tensor,
        layers: Sequence[str],
        emit: Callable[[str, torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # One session.run hands every output out at its end: activations are returned
        # (streams_activations is False, so emit is never given).
        names = tuple(layers)
        session = self._session(names)
        feed = _feed(batch, self.input_spec.dtype)
        outputs = [self.output_name, *names]
        key = (id(session), names, feed.shape)
        reused = self._reuse.get(key) if names else None
        try:
            if reused is not None:
                results = self._run_into(session, feed, outputs, reused)
            else:
                results = self._run_new_shape(session, feed, outputs, names)
        except Exception as exc:  # the base class turns it into a ModelRunError
            raise RuntimeError(_ort_message(exc)) from exc
        arrays = [np.asarray(value) for value in results]
        if names:
            rows = feed.shape[0]
            self._per_image[id(session), names, feed.shape[1:]] = [
                a.shape[1:] if a.ndim and a.shape[0] == rows and a.dtype == np.float32 else None
                for a in arrays
            ]
        if names and all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays):
            # The next run of the same layers and batch size writes into these arrays instead
            # of new ones: handing out every layer allocates hundreds of MB per batch, and
            # fresh pages (page faults, zeroing) cost more than the copies themselves.
            self._reuse.pop(key, None)
            self._reuse[key] = arrays
            while len(self._reuse) > 2:  # the batch size and one other (a check, the last batch)
                self._reuse.pop(next(iter(self._reuse)))
        scores = torch.from_numpy(arrays[0].copy())  # scores outlive the next run (Lie, checks)
        acts: dict[str, torch.Tensor] = {}
        for name, array in zip(names, arrays[1:], strict=True):
            if array.dtype.kind == "f":
                acts[name] = torch.from_numpy(array.astype(np.float32, copy=False))
            elif name in self._quantized and array.dtype.kind in "iu":
                scale, zero = self._quantized[name]
                values = (array.astype(np.float32) - np.float32(zero)) * np.float32(scale)
                acts[name] = torch.from_numpy(values)
        return scores, acts

    def _run_new_shape(
        self,
        session: ort.InferenceSession,
        feed: np.ndarray,
        outputs: list[str],
        names: tuple[str, ...],
    ) -> list[np.ndarray]:
        """A run without arrays to reuse. With layers, the outputs go into arrays allocated here
        (their per-image shapes are known from an earlier run), not into onnxruntime's own: its
        allocation plan for a bound run differs, and switching later costs a second set of
        pages. Without known shapes, or for a graph whose binding fails, a plain run."""
        buffers = self._fresh_buffers(session, names, feed.shape) if names else None
        if buffers is not None:
            with contextlib.suppress(Exception):  # an unusual graph: run it unbound below
                return self._run_into(session, feed, outputs, buffers)
        return session.run(outputs, {self.input_spec.name: feed})

    def _fresh_buffers(
        self, session: ort.InferenceSession, names: tuple[str, ...], feed: tuple[int, ...]
    ) -> list[np.ndarray] | None:
        """New float32 output arrays for a batch of input shape ``feed``, or None while a
        per-image output shape is unknown (no run of these outputs at this image size yet) or
        an output is not batch-major float32."""
        shapes = self._per_image.get((id(session), names, feed[1:]))
        if shapes is None or any(shape is None for shape in shapes):
            return None
        return [np.empty((feed[0], *shape), dtype=np.float32) for shape in shapes]

    def _run_into(
        self,
        session: ort.InferenceSession,
        feed: np.ndarray,
        outputs: list[str],
        buffers: list[np.ndarray],
    ) -> list[np.ndarray]:
        """``session.run`` writing every output into the given (previous run's) arrays."""
        binding = session.io_binding()
        binding.bind_cpu_input(self.input_spec.name, feed)
        for name, buffer in zip(outputs, buffers, strict=True):
            binding.bind_output(name, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
        session.run_with_iobinding(binding)
        return buffers

    def layers_note(self) -> str | None:
        """What exposing this graph's layers changes in how onnxruntime runs it: a QDQ graph's
        QuantizeLinear -> DequantizeLinear pairs are fused into integer kernels only when their
        tensors stay inside the graph."""
        produced = {out: n.op_type for n in self.model.graph.node for out in n.output}
        if not any(
            n.op_type == "DequantizeLinear" and produced.get(n.input[0]) == "QuantizeLinear"
            for n in self.model.graph.node
        ):
            return None
        return (
            "a QDQ-quantized graph: with its layers handed out, onnxruntime runs its quantize / "
            "dequantize pairs as float kernels on the quantized values instead of fusing them "
            "into integer ones, so the output numbers may differ slightly from the deployed "
            "graph's (--no-layers runs it fused)"
        )

    def describe(self) -> dict:
        opset = {o.domain or "ai.onnx": o.version for o in self.model.opset_import}
        return {
            "format": "onnx",
            "opset": opset,
            "producer": f"{self.model.producer_name} {self.model.producer_version}".strip(),
            "output": self.output_name,
            "providers": self.providers,
            **({"fixed_batch": self.fixed_batch} if self.fixed_batch else {}),
        }


def _image_nodes(
    graph: onnx.GraphProto, input_name: str, *, content: bool = False
) -> Iterator[onnx.NodeProto]:
    """The nodes that depend on the image input, in graph order (not the constant subgraphs
    that shape arithmetic and weights form); ``content``: on its values, not only on its shape
    (not a Shape, nor the arithmetic on its sizes: a ViT's ``sqrt(head_dim)``, its class token
    expanded to the batch)."""
    dependent = {input_name}
    for node in graph.node:
        if any(i in dependent for i in node.input if i):
            if content and node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx"):
                continue
            dependent.update(o for o in node.output if o)
            yield node


def _same_values(alone: np.ndarray, together: np.ndarray, half: bool) -> bool:
    """Whether a tensor of probe images run together is the same images' run alone, joined
    (:func:`batch_agrees`), non-finite entries included: the same ones at the same places (a
    mask of -inf before a softmax)."""
    if alone.shape != together.shape:
        return False
    a, t = np.asarray(alone, np.float64), np.asarray(together, np.float64)
    finite = np.isfinite(a)
    if not np.array_equal(finite, np.isfinite(t)):
        return False
    if not np.array_equal(a[~finite], t[~finite], equal_nan=True):
        return False
    agrees = batch_agrees(
        torch.from_numpy(np.where(finite, a, 0.0)), torch.from_numpy(np.where(finite, t, 0.0)), half
    )
    return bool(agrees)


def _dynamic_batch(
    model: onnx.ModelProto, input_name: str, inferred: onnx.ModelProto
) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of a graph fixed at batch 1 whose batch is dynamic: the image input's first axis
    and every graph output's that is 1 become ``batch``, the recorded intermediate shapes
    (``value_info``) are dropped, each ``Reshape`` of an image-dependent tensor to a constant
    shape that starts with 1 gets a copy of that shape starting with 0 (keep the input's first
    axis: the batch; ``allowzero`` cleared where no 0 of the target needs it), one that merges
    the batch of 1 with the next axis (``(1, heads, N, d) -> (heads, N, d)``) or splits it
    back out gets -1 there, and a constant of batch 1 concatenated to an image tensor (a
    class token) is expanded to its batch (:func:`_expand_constant_batches`). ``inferred``:
    ``model`` after shape inference. Also returned: the tensors of the nodes given a -1,
    which a 0 does not need. Whether the copy computes the same (at the output, and at those
    tensors) is for the caller to check."""
    batched = onnx.ModelProto()
    batched.CopyFrom(model)
    graph = batched.graph
    for value in [*(i for i in graph.input if i.name == input_name), *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_value == 1:
            dims[0].dim_param = "batch"  # (a oneof: clears dim_value)
    del graph.value_info[:]
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            value = node.attribute[0]
            if value.name == "value":
                constants[node.output[0]] = value.t
            elif value.name == "value_ints":
                constants[node.output[0]] = numpy_helper.from_array(np.array(value.ints))
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    dims = inferred_dims(model, inferred)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    _expand_constant_batches(graph, opset, input_name, taken, dims)
    changed: list[str] = []
    for node in _image_nodes(graph, input_name):
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue  # (before opset 5 the shape is an attribute: left as it is)
        allow_zero = any(a.name == "allowzero" and a.i for a in node.attribute)
        shape = numpy_helper.to_array(constants[node.input[1]])
        if shape.ndim != 1 or not shape.size:
            continue
        data = dims.get(node.input[0]) or []
        unmerges = len(shape) >= 2 and shape[0] == 1 and data[:1] == [shape[1]] != [1]
        if shape[0] == 1 and not unmerges and not (allow_zero and 0 in shape):
            # keep the input's first axis: 0 copies it (allowzero cleared where the dynamo
            # exporter set it, which no 0 of this target needs)
            first = 0
            for attribute in [a for a in node.attribute if a.name == "allowzero"]:
                node.attribute.remove(attribute)
        elif -1 in shape[1:] or 0 in shape:
            continue  # (-1 is taken; a 0 that copies a size, or is one)
        elif shape[0] == 1:
            first = -1  # the batch merged with the heads, split back out: -> (1, heads, N, d)
        elif len(data) >= 2 and data[0] == 1 and shape[0] == data[1] != 1:
            first = -1  # the batch merged with the next axis (the heads of an attention)
        else:
            continue
        name = f"{node.input[1]}_batch"
        while name in taken:
            name += "_"
        taken.add(name)
        graph.initializer.append(
            numpy_helper.from_array(np.concatenate([[first], shape[1:]]).astype(shape.dtype), name)
        )
        node.input[1] = name
        if first == -1:
            changed.append(node.output[0])
    return batched, changed


def _expand_constant_batches(
    graph: onnx.GraphProto,
    opset: int,
    input_name: str,
    taken: set[str],
    dims: dict[str, list[int | None]],
) -> None:
    """In ``graph`` (a copy of ``model``'s being made batch-dynamic), expand each constant of
    batch 1 concatenated to an image tensor along another axis (a ViT's class token, expanded
    to the batch the graph was traced at) to that tensor's batch: ``Expand(constant,
    Concat(Shape(image)[0:1], its other sizes))``, inserted before the Concat."""
    dependent = {input_name} | {o for n in _image_nodes(graph, input_name) for o in n.output}
    wanted = [
        node
        for node in graph.node
        if node.op_type == "Concat"
        and node.domain in ("", "ai.onnx")
        and any(i in dependent for i in node.input)
        and not all(i in dependent for i in node.input if i)
    ]
    if not wanted or opset < 10 or not dims:
        return

    def fresh(stem: str) -> str:
        name = stem
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    def constant(values: Sequence[int], stem: str) -> str:
        name = fresh(stem)
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def sliced(tensor: str, start: int, end: int, stem: str) -> list[onnx.NodeProto]:
        """Nodes computing ``Shape(tensor)[start:end]`` into ``stem``."""
        sizes = fresh(f"{stem}_shape")
        bounds = [sizes, constant([start], f"{stem}_start"), constant([end], f"{stem}_end")]
        return [
            onnx.helper.make_node("Shape", [tensor], [sizes]),
            onnx.helper.make_node("Slice", bounds, [stem]),
        ]

    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node in wanted:
            image = next(i for i in node.input if i in dependent)
            known = len(dims.get(image) or dims.get(node.output[0]) or ())
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            for k, name in enumerate(node.input):
                shape = dims.get(name)
                # (the constant's rank where the image tensor's is not inferred: opset 11)
                rank = known or len(shape or ())
                # (sizes left to run time: inference may not fold the Expand a class token is)
                if name in dependent or rank < 2 or axis % rank == 0:
                    continue
                if shape is not None and (len(shape) != rank or shape[0] not in (1, None)):
                    continue
                batch, rest = fresh(f"{name}_batch"), fresh(f"{name}_rest")
                target, expanded = fresh(f"{name}_target"), fresh(f"{name}_expanded")
                nodes += [
                    *sliced(image, 0, 1, batch),
                    *sliced(name, 1, 2**62, rest),
                    onnx.helper.make_node("Concat", [batch, rest], [target], axis=0),
                    onnx.helper.make_node("Expand", [name, target], [expanded]),
                ]
                node.input[k] = expanded
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also hands out the tensors ``names``."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(
        onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in known
    )
    return exposed


def _without_large_weights(model: onnx.ModelProto, limit: int = 4096) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers over ``limit`` bytes are graph inputs of the same
    type and shape (small ones, which shape inference may read as values: a Reshape's shape, a
    Resize's scales, are kept)."""
    light = onnx.ModelProto()
    _copy_fields(light, model, skip=("graph",))
    _copy_fields(light.graph, model.graph, skip=("initializer",))
    declared = {i.name for i in model.graph.input}
    for tensor in model.graph.initializer:
        if tensor.ByteSize() <= limit:
            light.graph.initializer.append(tensor)
        elif tensor.name not in declared:
            light.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
    return light


def _copy_fields(target: Any, source: Any, skip: tuple[str, ...]) -> None:
    """Copy the set fields of protobuf message ``source`` into ``target``, except ``skip``."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(target, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):  # a message
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def load_onnx(
    path: Path,
    *,
    input_name: str | None = None,
    output_name: str | None = None,
    layout: str | None = None,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> OnnxAdapter:
    """Load and validate an ONNX classifier (see :class:`OnnxAdapter`)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot read '{path}' as ONNX: the file is corrupt, truncated or not an ONNX model; "
            "re-export or re-download it"
        ) from exc
    if not model.graph.node and not model.graph.input:
        raise ModelLoadError(
            f"'{path}' holds no ONNX graph: the file is empty or not an ONNX model"
        )
    external = _check_external_data(model, path.parent)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise ModelLoadError(f"cannot read the external data of '{path}': {exc}") from exc
    try:
        # From the file when there is one: checking the in-memory model serialises it first
        # (0.07 s for a 46 MB model), while the checker reads the file as fast.
        onnx.checker.check_model(str(path) if path.is_file() else model)
    except Exception as exc:
        raise ModelLoadError(f"'{path}' is not a valid ONNX model: {cause_line(exc, 300)}") from exc
    adapter = OnnxAdapter(
        model,
        path=path,
        input_name=input_name,
        output_name=output_name,
        layout=layout,
        providers=providers,
        threads=threads,
    )
    adapter.external_data = tuple(external)
    return adapter
