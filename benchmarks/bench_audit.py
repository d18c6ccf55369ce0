"""Speed and memory benchmark of ``eqaudit.audit`` against plain batched inference.

A ResNet-18-sized classifier (written here in plain torch, random weights from a fixed seed) is
audited under D4 on synthetic images, with the ONNX backend (onnxruntime) and the PyTorch backend
(eager). For each backend, in one run and with the repeats interleaved, it times:

* ``plain``: batched inference of exactly the images the audit feeds the model (every image under
  the 8 D4 elements, normalised the same way, in calls of the audit's batch size) in the same
  runtime (``InferenceSession.run`` / the module under ``torch.inference_mode``);
* ``exposed``: the same inference with every layer that the all-layers audit compares handed out
  and nothing else done with it (ONNX: the layers appended as graph outputs, as eqaudit does;
  PyTorch: forward hooks that receive every module output, as eqaudit's do, and drop it).
  ``exposed / plain`` is
  what the runtime itself pays to expose the tensors (onnxruntime loses its Conv + Relu / Add
  fusions and copies the outputs); ``all-layers / exposed`` is eqaudit's own overhead;
* ``audit-no-layers``: ``eqaudit.audit(..., transforms="d4", layers=False)``, end to end (model
  load included);
* ``audit-all-layers``: ``eqaudit.audit(..., transforms="d4")`` with every layer; on cuda with
  Triton installed, also with the layers compared by torch ops instead of the Triton kernel
  (``all_layers_ops``), for the kernel's share of the time.

Goals (issue 8): no-layers / plain <= 1.15, all-layers / plain <= 1.6.

It then measures memory in fresh subprocesses: the peak RSS of audits of N and 8N images (the
engine streams, so the two peaks should be about equal), and an all-layers audit under an address
space cap (``RLIMIT_AS``) too small for one full batch of activations, where the engine should
take fewer images per step instead of dying.

Run ``python benchmarks/bench_audit.py --help`` for options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import dataclasses
import functools
import inspect
import io
import json
import math
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import eqaudit
from eqaudit.config import AuditConfig
from eqaudit.data import make_preprocessing, synthetic_images
from eqaudit.device import ieee_float32
from eqaudit.metrics import triton_d4
from eqaudit.transforms import parse_transforms

SEED = 0
PRESET = "imagenet"
TRANSFORMS = "d4"
GOAL_NO_LAYERS = 1.15
GOAL_ALL_LAYERS = 1.6


# -- the model --------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (ResNet v1)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18: 7x7/2 stem + 3x3/2 max pool, BasicBlock x [2, 2, 2, 2] (64-128-256-512),
    global average pool, fc to 1000 classes (11.7 M parameters)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(seed: int = SEED) -> nn.Module:
    """The benchmark model with random weights (He init) and non-trivial batch-norm statistics,
    deterministic for ``seed``, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    model = ResNet18()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                std = (2.0 / fan_in) ** 0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
            elif isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(1.0 + 0.1 * torch.randn(c, generator=generator))
                module.bias.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_var.copy_(1.0 + 0.1 * torch.rand(c, generator=generator))
            elif isinstance(module, nn.Linear):
                bound = 1.0 / module.in_features**0.5
                module.weight.copy_(
                    (torch.rand(module.weight.shape, generator=generator) * 2 - 1) * bound
                )
                module.bias.zero_()
    return model.eval()


def export_onnx(model: nn.Module, path: Path, size: int) -> Path:
    """ONNX (opset 17, TorchScript exporter) with a dynamic batch axis."""
    dummy = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


# -- devices ----------------------------------------------------------------------------------------
def audit_takes_device() -> bool:
    """Does this eqaudit's ``audit()`` accept ``device=`` (an AuditConfig field or a keyword)?"""
    fields = {f.name for f in dataclasses.fields(AuditConfig)}
    return "device" in fields or "device" in inspect.signature(eqaudit.audit).parameters


def ort_providers(device: str | None) -> list[str]:
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def check_device(device: str | None, backends: Sequence[str]) -> None:
    """Exit with one line when ``--device`` cannot be honoured here."""
    if device is None:
        return
    if device == "cuda":
        import onnxruntime as ort

        if "torch" in backends and not torch.cuda.is_available():
            raise SystemExit(
                f"--device cuda: torch {torch.__version__} sees no CUDA device here "
                "(torch.cuda.is_available() is False); use --device cpu or --backend onnx"
            )
        available = ort.get_available_providers()
        if "onnx" in backends and "CUDAExecutionProvider" not in available:
            raise SystemExit(
                "--device cuda: onnxruntime has no CUDAExecutionProvider here (providers: "
                f"{', '.join(available)}; install onnxruntime-gpu); use --backend torch"
            )
    if not audit_takes_device():
        raise SystemExit(
            f"--device {device}: this eqaudit's audit() takes no device= (GPU audits need an "
            "eqaudit with `eqaudit check --device`); run without --device for CPU numbers"
        )


def audit_options(device: str | None) -> dict[str, Any]:
    """Extra ``eqaudit.audit`` options for ``--device``: none without it, so that an eqaudit
    without device support still runs the CPU benchmark. eqaudit picks onnxruntime's CUDA
    provider itself for ``device="cuda"``."""
    return {} if device is None else {"device": device}


def synchronise(device: str | None) -> None:
    """Wait for queued CUDA work, so that a timer sees it finished."""
    if device == "cuda":
        torch.cuda.synchronize()


# -- the workloads ----------------------------------------------------------------------------------
def plain_batches(images: int, size: int, batch_size: int) -> list[torch.Tensor]:
    """The model inputs the audit produces: each batch of ``batch_size // 8`` images under all
    D4 elements, normalised, as one ``(8 * k, 3, size, size)`` tensor per model call."""
    elements = parse_transforms(TRANSFORMS, "crop")
    preprocessing = make_preprocessing(preset=PRESET)
    pixels = synthetic_images(images, (size, size), 3, seed=SEED)
    per_call = max(1, batch_size // len(elements))
    batches = []
    for start in range(0, images, per_call):
        part = pixels[start : start + per_call]
        batch = torch.cat([e.apply_image(part, 0) for e in elements])
        batches.append(preprocessing.normalise(batch).contiguous())
    return batches


@functools.cache
def memory_images(images: int, size: int) -> np.ndarray:
    """``--data memory``: the benchmark's synthetic images as one ``(N, 3, S, S)`` array, drawn
    once (the images ``plain_batches`` and eqaudit's own synthetic source produce)."""
    return synthetic_images(images, (size, size), 3, seed=SEED).numpy()


def audit_data(args: argparse.Namespace) -> np.ndarray | None:
    return memory_images(args.images, args.size) if args.data == "memory" else None


def audited_layer_names(result: eqaudit.AuditResult) -> list[str]:
    """The layers an audit compared, in its order (ONNX tensor names / module paths)."""
    return list(dict.fromkeys(row["layer"] for row in result.summary["layers"]))


def onnx_session(onnx_path: Path, layers: Sequence[str], device: str | None):
    """An onnxruntime session of the model with ``layers`` appended as graph outputs, created
    the way eqaudit creates its own (default graph optimisations, errors-only logging, no memory
    pattern when layers are exposed)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source: str | bytes = str(onnx_path)
    if layers:
        options.enable_mem_pattern = False  # as eqaudit's layer sessions (OnnxAdapter._session)
        model = onnx.load(str(onnx_path))
        known = {o.name for o in model.graph.output}
        for name in layers:
            if name not in known:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        source = model.SerializeToString()
    return ort.InferenceSession(source, sess_options=options, providers=ort_providers(device))


def capture_hooks(model: nn.Module, names: Sequence[str]) -> Counter[str]:
    """Forward hooks on ``model`` that receive the outputs of the named modules, named like
    eqaudit names them (``path`` for a module's first call in a forward, ``path:i`` for its i-th
    later call), as eqaudit's hooks do: the live tensor, neither cloned nor kept (eqaudit reduces
    it inside the hook). The returned counter tells how many tensors were handed over."""
    wanted = set(names)
    paths = {name.split(":")[0] for name in names}
    handed: Counter[str] = Counter()
    calls: dict[str, int] = {}

    def make_hook(path: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            index = calls.get(path, 0)
            calls[path] = index + 1
            name = path if index == 0 else f"{path}:{index}"
            if name in wanted and isinstance(output, torch.Tensor):
                handed[name] += output.detach().ndim > 0

        return hook

    model.register_forward_pre_hook(lambda *_: calls.clear())  # a new forward: count afresh
    for path, module in model.named_modules():
        if path in paths:
            module.register_forward_hook(make_hook(path))
    return handed


def make_plain(
    backend: str,
    model: nn.Module,
    onnx_path: Path,
    batches: list[torch.Tensor],
    device: str | None,
    layers: Sequence[str] = (),
) -> Callable[[], None]:
    """A no-argument callable running every batch once in the backend's own runtime; with
    ``layers``, the runtime also hands out those layers' outputs (which are then dropped): for
    ONNX on the CPU into arrays reused from one call to the next of the same batch shape, as
    eqaudit's adapter binds them (freeing and faulting 1.4 GB per call would also slow whatever
    runs next in this process)."""
    if backend == "onnx":
        session = onnx_session(onnx_path, layers, device)
        feeds = [b.numpy() for b in batches]
        wanted = ["logits", *layers]
        reused: dict[tuple[int, ...], list[np.ndarray]] = {}

        def run_onnx() -> None:
            for feed in feeds:
                buffers = reused.get(feed.shape)
                if not layers or device not in (None, "cpu") or buffers is None:
                    outputs = session.run(wanted, {"input": feed})
                    if layers and device in (None, "cpu"):
                        reused[feed.shape] = [np.asarray(o) for o in outputs]
                    continue
                binding = session.io_binding()
                binding.bind_cpu_input("input", feed)
                for name, buffer in zip(wanted, buffers, strict=True):
                    binding.bind_output(
                        name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data
                    )
                session.run_with_iobinding(binding)

        return run_onnx

    target = device or "cpu"
    module = copy.deepcopy(model).to(target)
    if layers:
        capture_hooks(module, layers)
    # On a GPU the batches wait on the device before the clock starts: plain is the forward
    # passes alone, the floor. (The audit copies its source images to the device and transforms
    # them there, inside its time.)
    staged = [batch.to(target) for batch in batches]

    def run_torch() -> None:
        # IEEE float32 as the audit runs (on a GPU cuDNN would otherwise take TF32 convolutions).
        with torch.inference_mode(), ieee_float32(target):
            for batch in staged:
                module(batch)
        synchronise(device)

    return run_torch


def run_audit(
    backend: str,
    model: nn.Module,
    onnx_path: Path,
    *,
    images: int,
    size: int,
    layers: bool,
    batch_size: int,
    device: str | None = None,
    data: np.ndarray | None = None,
) -> eqaudit.AuditResult:
    """One audit; ``data=None``: eqaudit draws its synthetic images itself, else the audit reads
    the first ``images`` of ``data`` (the same images, handed over in memory)."""
    target = str(onnx_path) if backend == "onnx" else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = eqaudit.audit(
            target,
            transforms=TRANSFORMS,
            data=None if data is None else data[:images],
            num_images=images,
            seed=SEED,
            input_size=size,
            preset=PRESET,
            layers=layers,
            batch_size=batch_size,
            **audit_options(device),
        )
    synchronise(device)
    return result


def with_torch_ops(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with the engine's Triton comparison kernel off (its torch ops instead), to
    time both side by side on a GPU."""
    usable = triton_d4.usable
    triton_d4.usable = lambda act: False
    try:
        return fn(*args)
    finally:
        triton_d4.usable = usable


def audit_as_asked(
    args: argparse.Namespace,
    backend: str,
    model: nn.Module,
    onnx_path: Path,
    layers: bool,
    images: int | None = None,
) -> eqaudit.AuditResult:
    """:func:`run_audit` with the command line's size, batch size, device and data
    (``images``: default ``--images``)."""
    return run_audit(
        backend,
        model,
        onnx_path,
        images=args.images if images is None else images,
        size=args.size,
        layers=layers,
        batch_size=args.batch_size,
        device=args.device,
        data=audit_data(args),
    )


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- memory: one audit in a fresh process -----------------------------------------------------------
def _proc_status(field: str) -> float | None:
    """A ``/proc/self/status`` memory field in MiB (Linux), else None."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def peak_memory() -> dict[str, float | None]:
    """Peak resident memory of this process in MiB: ``ru_maxrss`` and, on Linux, ``VmHWM``.

    On Linux ``ru_maxrss`` of a freshly exec'd child starts at the RSS its parent had when it
    forked (the kernel keeps the old address space's high-water mark across ``execve``), so a child
    started from a big benchmark process reports the parent's size. ``VmHWM`` is the high-water
    mark of the current address space only, i.e. of what this process did since ``execve``.
    """
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    maxrss_mib = maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    hwm = _proc_status("VmHWM")
    return {
        "maxrss_mib": maxrss_mib,
        "peak_mib": hwm if hwm is not None else maxrss_mib,
        "vm_peak_mib": _proc_status("VmPeak"),
    }


def layer_bytes(result: eqaudit.AuditResult) -> list[int]:
    """Bytes of each audited layer's float32 activations for one image under one element."""
    shapes = {row["layer"]: row["shape"] for row in result.summary["layers"]}
    return [4 * math.prod(int(d) for d in s.split("x")) for s in shapes.values() if s]


def held_bytes(result: eqaudit.AuditResult, backend: str) -> int:
    """What the engine's rule (``Engine.held_bytes_per_image``) says the comparisons hold for
    one image under one element: three copies of every layer when the runtime hands them out
    together (ONNX), four of the largest when they stream (PyTorch hooks)."""
    sizes = layer_bytes(result) or [0]
    return 3 * sum(sizes) if backend == "onnx" else 4 * max(sizes)


def engine_available_memory() -> int | None:
    """The bytes the engine believes are free (``eqaudit.audit.available_memory``), None when
    unknown or when this eqaudit has no such function."""
    import importlib

    engine = importlib.import_module("eqaudit.audit")  # the module; eqaudit.audit is the function
    probe = getattr(engine, "available_memory", None)
    return probe() if callable(probe) else None


def child_main(args: argparse.Namespace) -> None:
    """Audit and print the peak memory (MiB) and the engine's choices as JSON on the last line of
    stdout; a failure of the audit is reported in the JSON too (exit status 1)."""
    torch.set_num_threads(args.threads)
    model = build_model()
    before, vm_before = _proc_status("VmRSS"), _proc_status("VmSize")
    available = engine_available_memory()
    report: dict[str, Any] = {"before_mib": before, "vm_before_mib": vm_before}
    report["available_gib"] = None if available is None else available / 2**30
    audit = functools.partial(
        run_audit,
        args.backend,
        model,
        Path(args.onnx) if args.onnx else Path(),
        size=args.size,
        layers=args.layers == "all",
        batch_size=args.batch_size,
    )
    if args.layers == "plain":  # the plain case alone in this process, warmed up the same way
        onnx_path = Path(args.onnx) if args.onnx else Path()
        batches = plain_batches(args.images, args.size, args.batch_size)
        plain = make_plain(args.backend, model, onnx_path, batches, None)
        plain()
        report["plain_s"] = timed(plain)
        print(json.dumps(report), flush=True)
        return
    try:
        if args.timed:  # as the in-process cases: one batch of images first, untimed
            audit(images=min(args.images, max(1, args.batch_size // 8)))
        start = time.perf_counter()
        result = audit(images=args.images)
        report["audit_s"] = time.perf_counter() - start
    except BaseException as exc:  # MemoryError, the engine's own errors, a runtime's bad_alloc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        report.update(peak_memory(), error=f"{type(exc).__name__}: {first[:300]}")
        print(json.dumps(report), flush=True)
        sys.exit(1)
    run = result.summary["run"]
    report.update(
        peak_memory(),
        images=result.summary["data"]["count"],
        layers=result.summary["model"]["layers_audited"],
        images_per_step=run["images_per_step"],
        notes=run["notes"],
        activation_bytes=sum(layer_bytes(result)) if args.layers == "all" else 0,
        held_bytes=held_bytes(result, args.backend) if args.layers == "all" else 0,
    )
    print(json.dumps(report), flush=True)


def run_child(
    backend: str,
    onnx_path: Path,
    images: int,
    size: int,
    layers: bool | str,
    args: argparse.Namespace,
    address_space: int | None = None,
    timed: bool = False,
) -> dict[str, Any]:
    """Run one audit in a fresh process (optionally under ``RLIMIT_AS = address_space`` bytes,
    set before ``exec``; ``timed``: after a one-batch warm-up audit) and return its report, with
    ``rc`` and, on failure, ``error``."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--backend",
        backend,
        "--images",
        str(images),
        "--size",
        str(size),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--layers",
        layers if isinstance(layers, str) else "all" if layers else "none",
    ]
    if backend == "onnx":
        command += ["--onnx", str(onnx_path)]
    if timed:
        command.append("--timed")

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=cap if address_space is not None else None,
    )
    report: dict[str, Any] = {"rc": done.returncode}
    lines = done.stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        report.update(json.loads(lines[-1]))
    if done.returncode != 0 and "error" not in report:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()]
        died = f"killed by signal {-done.returncode}" if done.returncode < 0 else "exit"
        report["error"] = f"{died} {done.returncode}: " + (tail[-1][:300] if tail else "no output")
    return report


def child_peak(
    backend: str, onnx_path: Path, images: int, size: int, layers: bool, args: argparse.Namespace
) -> dict[str, Any]:
    report = run_child(backend, onnx_path, images, size, layers, args)
    if report["rc"] != 0:
        raise SystemExit(f"memory child failed ({backend}, {images} images): {report['error']}")
    return report


def memory_cap_case(
    backend: str, onnx_path: Path, images: int, size: int, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """An all-layers audit under an address-space cap too small for one full batch.

    Two uncapped children first report their virtual size just before ``eqaudit.audit``
    (``VmSize``) and their virtual peak (``VmPeak``): an outputs-only audit (its rise = what
    loading the model and the rest cost without activations) and an all-layers audit (which also
    reports the activation bytes per image). The cap is the starting size + the outputs-only rise
    + the smaller of (a) half of what the engine's own rule says a full step of activations needs
    (for ``G x k`` images, ``k = batch_size // G``: 3 copies of every layer for ONNX, whose
    session hands every output out at once; 4 of the largest for PyTorch, whose hooks stream
    them) and (b) half of the
    all-layers run's extra rise: a run that keeps full batches cannot fit; one that takes a
    fraction of a batch per step can. Returns (uncapped all-layers report, capped report, cap).
    """
    reports = {}
    for layers in (False, True):
        reports[layers] = run_child(backend, onnx_path, images, size, layers, args)
        if reports[layers]["rc"] != 0:
            raise SystemExit(
                f"uncapped memory child failed ({backend}): {reports[layers]['error']}"
            )
    bare, free = reports[False], reports[True]
    fixed = (bare["vm_peak_mib"] - bare["vm_before_mib"]) * 2**20
    elements = len(parse_transforms(TRANSFORMS, "crop"))
    per_call = max(1, args.batch_size // elements)
    full_step = elements * per_call * free["held_bytes"]  # the engine's rule
    extra = (free["vm_peak_mib"] - free["vm_before_mib"]) * 2**20 - fixed
    headroom = fixed + min(full_step / 2, extra / 2)
    limit = int(free["vm_before_mib"] * 2**20 + headroom)
    capped = run_child(backend, onnx_path, images, size, True, args, address_space=limit)
    capped["headroom_mib"] = headroom / 2**20
    capped["full_step_mib"] = full_step / 2**20
    return free, capped, limit


# -- profile ----------------------------------------------------------------------------------------
def profile_audit(
    backend: str, model: nn.Module, onnx_path: Path, args: argparse.Namespace
) -> None:
    """cProfile of one audit without layers and one with all layers: where their time goes."""
    for layers in (False, True):
        profiler = cProfile.Profile()
        profiler.enable()
        audit_as_asked(args, backend, model, onnx_path, layers)
        profiler.disable()
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream)
        stats.sort_stats("cumulative").print_stats(
            r"eqaudit|onnxruntime|torch/nn/modules/module", 30
        )
        stats.sort_stats("tottime").print_stats(25)
        print(f"\n== profile: {backend} audit, {'all layers' if layers else 'no layers'} ==")
        print(stream.getvalue())


# -- main -------------------------------------------------------------------------------------------
def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base > 0 else "n/a"


def environment_line(args: argparse.Namespace) -> str:
    import onnxruntime

    return (
        f"eqaudit benchmark, {date.today().isoformat()}: {platform.platform()}, "
        f"{os.cpu_count()} cores ({args.threads} torch threads), python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, eqaudit {eqaudit.__version__}, device {args.device or 'cpu'}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("onnx", "torch", "both"), default="both")
    parser.add_argument("--images", type=int, default=None, help="images to audit (default 32)")
    parser.add_argument("--size", type=int, default=None, help="input size (default 224)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="audit batch size (default 64)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: cores)"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="run the model there (torch: the module; ONNX: CUDAExecutionProvider) and pass "
        "device= to eqaudit.audit; default: CPU, without passing device=",
    )
    parser.add_argument(
        "--data",
        choices=("synthetic", "memory"),
        default="synthetic",
        help="synthetic: eqaudit draws its synthetic images (their drawing is timed); memory: "
        "the same images handed over as an in-memory array, as the plain cases get them",
    )
    parser.add_argument(
        "--memory",
        default=None,
        help="N,8N,SIZE for the memory check (default 16,128,112); 'off' to skip",
    )
    parser.add_argument(
        "--cap",
        default=None,
        help="N,SIZE for the all-layers audit under an address-space cap too small for a full "
        "batch (default 16,224); 'off' to skip",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 8 images at 64 px, 1 repeat, small memory checks",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also cProfile one no-layers and one all-layers audit per backend",
    )
    parser.add_argument(
        "--fresh",
        type=int,
        default=None,
        help="also time each audit in N fresh processes, as a CLI run (default: --repeats; 0 "
        "to skip)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--timed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--layers", choices=("all", "none", "plain"), default="all", help=argparse.SUPPRESS
    )
    parser.add_argument("--onnx", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = {"images": 32, "size": 224, "repeats": 3, "memory": "16,128,112", "cap": "16,224"}
    if args.quick:
        defaults = {"images": 8, "size": 64, "repeats": 1, "memory": "8,64,64", "cap": "8,64"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.fresh is None:
        args.fresh = args.repeats
    return args


def time_cases(
    args: argparse.Namespace, backends: Sequence[str], model: nn.Module, onnx_path: Path
) -> None:
    """Warm up, time every case interleaved, print the repeats and the median/fastest tables."""
    batches = plain_batches(args.images, args.size, args.batch_size)
    # Warm-up: the audits on one batch of images (every code path, one-time costs: thread pools,
    # kernel selection, lazy imports); the all-layers one also names the layers to expose.
    layer_names: dict[str, list[str]] = {}
    for backend in backends:
        for layers in (False, True):
            warm_up = min(args.images, max(1, args.batch_size // 8))
            result = audit_as_asked(args, backend, model, onnx_path, layers, warm_up)
        layer_names[backend] = audited_layer_names(result)

    cases: dict[tuple[str, str], Callable[[], object]] = {}
    for backend in backends:
        cases[backend, "plain"] = make_plain(backend, model, onnx_path, batches, args.device)
        cases[backend, "exposed"] = make_plain(
            backend, model, onnx_path, batches, args.device, layer_names[backend]
        )
        for mode, layers in (("no_layers", False), ("all_layers", True)):
            cases[backend, mode] = lambda b=backend, la=layers: audit_as_asked(
                args, b, model, onnx_path, la
            )
        if args.device == "cuda" and triton_d4.triton_installed():
            cases[backend, "all_layers_ops"] = lambda b=backend: with_torch_ops(
                audit_as_asked, args, b, model, onnx_path, True
            )
        cases[backend, "plain"]()
        cases[backend, "exposed"]()

    load_before, cpu_before, wall_before = os.getloadavg()[0], os.times(), time.perf_counter()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
    for repeat in range(args.repeats):
        for key, fn in cases.items():  # interleaved: backend by backend, case by case
            times[key].append(timed(fn))
        print(
            f"  repeat {repeat + 1}/{args.repeats}: "
            + ", ".join(f"{b}/{m} {times[b, m][-1]:.2f}s" for b, m in cases),
            flush=True,
        )

    cpu_after, wall = os.times(), time.perf_counter() - wall_before
    busy = (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system) / wall
    print(
        f"load average (1 min) {load_before:.1f} before the timed repeats, "
        f"{os.getloadavg()[0]:.1f} after; this process used {busy:.2f} of "
        f"{os.cpu_count()} cores on average"
    )
    if max(load_before, os.getloadavg()[0]) > (os.cpu_count() or 1) + 0.5:
        print("warning: other processes compete for the cores; timings are noisy")

    for label, pick in (("median", statistics.median), ("fastest", min)):
        print(
            f"\n{label} of {args.repeats} repeat(s), seconds; ratio = audit / plain; runtime = "
            "exposed / plain (the runtime's cost of handing out every layer); own = all-layers / "
            "exposed (eqaudit's own per-layer cost)"
            + (" (the least disturbed run of each case)" if label == "fastest" else "")
        )
        header = (
            f"{'backend':<8} {'plain s':>8} {'no-layers s':>12} {'ratio':>6} "
            f"{'all-layers s':>13} {'ratio':>6} {'exposed s':>10} {'runtime':>8} {'own':>6} "
            f"{'layers':>7}"
        )
        print(header)
        print("-" * len(header))
        for backend in backends:
            plain = pick(times[backend, "plain"])
            exposed = pick(times[backend, "exposed"])
            bare = pick(times[backend, "no_layers"])
            full = pick(times[backend, "all_layers"])
            print(
                f"{backend:<8} {plain:>8.2f} {bare:>12.2f} {_ratio(bare, plain):>6} "
                f"{full:>13.2f} {_ratio(full, plain):>6} {exposed:>10.2f} "
                f"{_ratio(exposed, plain):>8} {_ratio(full, exposed):>6} "
                f"{len(layer_names[backend]):>7}"
            )
            if (backend, "all_layers_ops") in times:
                ops = pick(times[backend, "all_layers_ops"])
                print(
                    f"{'':<8} all layers with torch ops instead of the Triton kernel: "
                    f"{ops:.2f} s, ratio {_ratio(ops, plain)}"
                )
    print(f"goals: no-layers ratio <= {GOAL_NO_LAYERS}, all-layers ratio <= {GOAL_ALL_LAYERS}")
    if args.fresh > 0 and args.device is None:
        fresh_audits(args, backends, onnx_path)


def fresh_audits(args: argparse.Namespace, backends: Sequence[str], onnx_path: Path) -> None:
    """Each case alone in a fresh process, as a CLI run is: plain inference, and each audit
    after a one-batch warm-up audit. One process that ran other large cases first can make an
    audit slower than it is alone: on this project's VM, an ONNX all-layers audit right after
    the 'exposed' case spent 5-7 s more in the kernel on the same page faults."""
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.fresh):
        for backend in backends:
            for mode in ("plain", "none", "all"):
                report = run_child(
                    backend, onnx_path, args.images, args.size, mode, args, timed=True
                )
                if report["rc"] != 0:
                    raise SystemExit(f"fresh {mode} run failed ({backend}): {report.get('error')}")
                value = report["plain_s" if mode == "plain" else "audit_s"]
                times.setdefault((backend, mode), []).append(value)
    print(
        f"\nfresh processes: fastest of {args.fresh}, each case alone in a new process after a "
        "one-batch warm-up; ratio = audit / plain"
    )
    header = f"{'backend':<8} {'plain s':>8} {'no-layers s':>12} {'ratio':>6} "
    header += f"{'all-layers s':>13} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for backend in backends:
        plain, bare, full = (min(times[backend, mode]) for mode in ("plain", "none", "all"))
        print(
            f"{backend:<8} {plain:>8.2f} {bare:>12.2f} {_ratio(bare, plain):>6} "
            f"{full:>13.2f} {_ratio(full, plain):>6}"
        )


def memory_tables(
    args: argparse.Namespace, backends: Sequence[str], model: nn.Module, tmp: Path
) -> None:
    """Peak RSS at N and 8N images, then the audit under an address-space cap (CPU only)."""
    exported: dict[int, Path] = {}

    def onnx_at(size: int) -> Path:
        if size not in exported:
            exported[size] = export_onnx(model, tmp / f"resnet18_{size}.onnx", size)
        return exported[size]

    if args.memory != "off":
        small, large, msize = (int(v) for v in args.memory.split(","))
        print(
            f"\npeak RSS (VmHWM) of a fresh process auditing N images at {msize}x{msize}, MiB; "
            "'rise' = peak minus the RSS just before eqaudit.audit (model built, imports done)"
        )
        header = (
            f"{'backend':<8} {'layers':<7} {f'N={small}':>8} {f'N={large}':>8} {'ratio':>6} "
            f"{f'rise {small}':>9} {f'rise {large}':>9}"
        )
        print(header)
        print("-" * len(header))
        for backend in backends:
            for layers in (False, True):
                a = child_peak(backend, onnx_at(msize), small, msize, layers, args)
                b = child_peak(backend, onnx_at(msize), large, msize, layers, args)
                rise_a = a["peak_mib"] - (a["before_mib"] or 0)
                rise_b = b["peak_mib"] - (b["before_mib"] or 0)
                print(
                    f"{backend:<8} {'all' if layers else 'none':<7} {a['peak_mib']:>8.0f} "
                    f"{b['peak_mib']:>8.0f} {_ratio(b['peak_mib'], a['peak_mib']):>6} "
                    f"{rise_a:>9.0f} {rise_b:>9.0f}",
                    flush=True,
                )
        print("goal: flat (ratio ~1)")

    if args.cap != "off":
        images, csize = (int(v) for v in args.cap.split(","))
        print(
            f"\nall layers, {images} images at {csize}x{csize}, under RLIMIT_AS = the child's "
            "virtual size before eqaudit.audit + 'headroom' (what an outputs-only audit needs + "
            "at most half of one full step of activations); MiB; images/step: the engine's "
            "choice (uncapped -> capped); avail: what the engine saw as available under the cap"
        )
        header = (
            f"{'backend':<8} {'full step':>9} {'headroom':>9} {'completed':>9} "
            f"{'images/step':>11} {'avail GiB':>9} {'peak RSS':>8}  notes / error"
        )
        print(header)
        print("-" * len(header))
        for backend in backends:
            free, capped, _ = memory_cap_case(backend, onnx_at(csize), images, csize, args)
            done = capped["rc"] == 0
            steps = f"{free['images_per_step']} -> {capped.get('images_per_step', '-')}"
            avail = capped.get("available_gib")
            peak = capped.get("peak_mib")
            detail = "; ".join(capped.get("notes") or []) if done else capped["error"]
            print(
                f"{backend:<8} {capped['full_step_mib']:>9.0f} {capped['headroom_mib']:>9.0f} "
                f"{'yes' if done else 'NO':>9} {steps:>11} "
                f"{(f'{avail:.1f}' if avail is not None else '-'):>9} "
                f"{(f'{peak:.0f}' if peak is not None else '-'):>8}  {detail or '-'}",
                flush=True,
            )
        print("goal: completed, with fewer images per step (the batch adapts; the process lives)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    backends = ("onnx", "torch") if args.backend == "both" else (args.backend,)
    check_device(args.device, backends)
    torch.set_num_threads(args.threads)
    print(environment_line(args))
    print(
        f"model: ResNet-18 (random weights, seed {SEED}); {args.images} synthetic images at "
        f"{args.size}x{args.size}, transforms {TRANSFORMS} -> {8 * args.images} forward images, "
        f"batch size {args.batch_size} ({max(1, args.batch_size // 8)} images x 8 elements per call)"
        + (
            "; the audits read the images from an in-memory array (--data memory)"
            if args.data == "memory"
            else "; the audits draw the images themselves (--data synthetic)"
        )
    )
    with tempfile.TemporaryDirectory(prefix="eqaudit-bench-") as tmp:
        model = build_model()
        onnx_path = export_onnx(model, Path(tmp) / "resnet18.onnx", args.size)
        time_cases(args, backends, model, onnx_path)
        memory_tables(args, backends, model, Path(tmp))
        if args.profile:
            for backend in backends:
                with contextlib.redirect_stderr(io.StringIO()):
                    profile_audit(backend, model, onnx_path, args)


if __name__ == "__main__":
    main()
