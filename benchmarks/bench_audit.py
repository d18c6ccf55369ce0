"""Speed and memory benchmark of ``eqaudit.audit`` against plain batched inference.

A ResNet-18-sized classifier (written here in plain torch, random weights from a fixed seed) is
audited under D4 on synthetic images, with the ONNX backend (onnxruntime, CPU) and the PyTorch
backend (eager, CPU). For each backend, in one run and with the repeats interleaved, it times:

* ``plain``: batched inference of exactly the images the audit feeds the model (every image under
  the 8 D4 elements, normalised the same way, in calls of the audit's batch size) in the same
  runtime (``InferenceSession.run`` / the module under ``torch.inference_mode``);
* ``audit-no-layers``: ``eqaudit.audit(..., transforms="d4", layers=False)``, end to end (model
  load included);
* ``audit-all-layers``: ``eqaudit.audit(..., transforms="d4")`` with every layer.

It then measures the peak RSS of fresh subprocesses that audit N and 8N images (output-only and
with layers): the engine streams, so the two peaks should be about equal.

Run ``python benchmarks/bench_audit.py --help`` for options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
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
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from torch import nn

import eqaudit
from eqaudit.data import make_preprocessing, synthetic_images
from eqaudit.transforms import parse_transforms

SEED = 0
PRESET = "imagenet"
TRANSFORMS = "d4"
GOAL_NO_LAYERS = 1.3
GOAL_ALL_LAYERS = 2.0


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


def make_plain(backend: str, model: nn.Module, onnx_path: Path, batches: list[torch.Tensor]):
    """A no-argument callable running every batch once in the backend's own runtime."""
    if backend == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        feeds = [b.numpy() for b in batches]

        def run_onnx() -> None:
            for feed in feeds:
                session.run(["logits"], {"input": feed})

        return run_onnx

    def run_torch() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(batch)

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
) -> eqaudit.AuditResult:
    target = str(onnx_path) if backend == "onnx" else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return eqaudit.audit(
            target,
            transforms=TRANSFORMS,
            data=None,
            num_images=images,
            seed=SEED,
            input_size=size,
            preset=PRESET,
            layers=layers,
            batch_size=batch_size,
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
    return {"maxrss_mib": maxrss_mib, "peak_mib": hwm if hwm is not None else maxrss_mib}


def child_main(args: argparse.Namespace) -> None:
    """Audit and print the peak RSS (MiB) as JSON on the last line of stdout."""
    torch.set_num_threads(args.threads)
    model = build_model()
    before = _proc_status("VmRSS")
    result = run_audit(
        args.backend,
        model,
        Path(args.onnx) if args.onnx else Path(),
        images=args.images,
        size=args.size,
        layers=args.layers == "all",
        batch_size=args.batch_size,
    )
    print(
        json.dumps(
            {
                **peak_memory(),
                "before_mib": before,
                "images": result.summary["data"]["count"],
                "layers": result.summary["model"]["layers_audited"],
            }
        )
    )


def child_peak(
    backend: str, onnx_path: Path, images: int, size: int, layers: bool, args: argparse.Namespace
) -> dict:
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
        "all" if layers else "none",
    ]
    if backend == "onnx":
        command += ["--onnx", str(onnx_path)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"memory child failed ({' '.join(command[2:])}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- profile ----------------------------------------------------------------------------------------
def profile_audit(
    backend: str, model: nn.Module, onnx_path: Path, args: argparse.Namespace
) -> None:
    """cProfile of one audit with all layers: the functions where its time goes."""
    profiler = cProfile.Profile()
    profiler.enable()
    run_audit(
        backend,
        model,
        onnx_path,
        images=args.images,
        size=args.size,
        layers=True,
        batch_size=args.batch_size,
    )
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("cumulative").print_stats(r"eqaudit|onnxruntime|torch/nn/modules/module", 30)
    stats.sort_stats("tottime").print_stats(25)
    print(f"\n== profile: {backend} audit, all layers ==")
    print(stream.getvalue())


# -- main -------------------------------------------------------------------------------------------
def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base > 0 else "n/a"


def main(argv: list[str] | None = None) -> None:
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
        "--memory",
        default=None,
        help="N,8N,SIZE for the memory check (default 16,128,112); 'off' to skip",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 8 images at 64 px, 1 repeat, small memory"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also cProfile one all-layers audit per backend"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layers", choices=("all", "none"), default="all", help=argparse.SUPPRESS)
    parser.add_argument("--onnx", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        child_main(args)
        return
    defaults = {"images": 32, "size": 224, "repeats": 3, "memory": "16,128,112"}
    if args.quick:
        defaults = {"images": 8, "size": 64, "repeats": 1, "memory": "8,64,64"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    backends = ("onnx", "torch") if args.backend == "both" else (args.backend,)
    torch.set_num_threads(args.threads)

    import onnxruntime

    print(
        f"eqaudit benchmark, {date.today().isoformat()}: {platform.platform()}, "
        f"{os.cpu_count()} cores ({args.threads} torch threads), python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, eqaudit {eqaudit.__version__}"
    )
    print(
        f"model: ResNet-18 (random weights, seed {SEED}); {args.images} synthetic images at "
        f"{args.size}x{args.size}, transforms {TRANSFORMS} -> {8 * args.images} forward images, "
        f"batch size {args.batch_size} ({max(1, args.batch_size // 8)} images x 8 elements per call)"
    )

    with tempfile.TemporaryDirectory(prefix="eqaudit-bench-") as tmp:
        model = build_model()
        onnx_path = export_onnx(model, Path(tmp) / "resnet18.onnx", args.size)
        batches = plain_batches(args.images, args.size, args.batch_size)
        cases: dict[tuple[str, str], Callable[[], object]] = {}
        for backend in backends:
            cases[backend, "plain"] = make_plain(backend, model, onnx_path, batches)
            for mode, layers in (("no_layers", False), ("all_layers", True)):
                cases[backend, mode] = lambda b=backend, la=layers: run_audit(
                    b,
                    model,
                    onnx_path,
                    images=args.images,
                    size=args.size,
                    layers=la,
                    batch_size=args.batch_size,
                )

        # Warm-up: every case once (one-time costs: thread pools, kernel selection, lazy
        # imports); the audits on one batch of images only, which exercises every code path.
        layer_counts = {}
        for backend in backends:
            cases[backend, "plain"]()
            for layers in (False, True):
                result = run_audit(
                    backend,
                    model,
                    onnx_path,
                    images=min(args.images, max(1, args.batch_size // 8)),
                    size=args.size,
                    layers=layers,
                    batch_size=args.batch_size,
                )
            layer_counts[backend] = result.summary["model"]["layers_audited"]
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
                f"\n{label} of {args.repeats} repeat(s), seconds; ratio = audit / plain"
                + (" (the least disturbed run of each case)" if label == "fastest" else "")
            )
            header = (
                f"{'backend':<8} {'plain s':>8} {'no-layers s':>12} {'ratio':>6} "
                f"{'all-layers s':>13} {'ratio':>6} {'layers':>7}"
            )
            print(header)
            print("-" * len(header))
            for backend in backends:
                plain = pick(times[backend, "plain"])
                bare = pick(times[backend, "no_layers"])
                full = pick(times[backend, "all_layers"])
                print(
                    f"{backend:<8} {plain:>8.2f} {bare:>12.2f} {_ratio(bare, plain):>6} "
                    f"{full:>13.2f} {_ratio(full, plain):>6} {layer_counts[backend]:>7}"
                )
        print(f"goals: no-layers ratio <= {GOAL_NO_LAYERS}, all-layers ratio <= {GOAL_ALL_LAYERS}")

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
                mem_onnx = onnx_path
                if backend == "onnx" and msize != args.size:
                    mem_onnx = export_onnx(model, Path(tmp) / f"resnet18_{msize}.onnx", msize)
                for layers in (False, True):
                    a = child_peak(backend, mem_onnx, small, msize, layers, args)
                    b = child_peak(backend, mem_onnx, large, msize, layers, args)
                    rise_a = a["peak_mib"] - (a["before_mib"] or 0)
                    rise_b = b["peak_mib"] - (b["before_mib"] or 0)
                    print(
                        f"{backend:<8} {'all' if layers else 'none':<7} {a['peak_mib']:>8.0f} "
                        f"{b['peak_mib']:>8.0f} {_ratio(b['peak_mib'], a['peak_mib']):>6} "
                        f"{rise_a:>9.0f} {rise_b:>9.0f}",
                        flush=True,
                    )
            print("goal: flat (ratio ~1)")

        if args.profile:
            for backend in backends:
                with contextlib.redirect_stderr(io.StringIO()):
                    profile_audit(backend, model, onnx_path, args)


if __name__ == "__main__":
    main()
