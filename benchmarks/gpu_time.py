"""Where the GPU's time goes in an audit: the device's kernel time beside the wall-clock time.

An audit on a GPU is either device-bound (the kernels, the model's and the comparisons', fill
the wall-clock time) or host-bound (the GPU idles while Python launches the next work). The
wall-clock ratio of ``bench_audit.py`` cannot tell the two apart; this script can. It runs the
benchmark's ResNet-18 (random weights) on one in-memory array under ``torch.profiler`` with CUDA
activity, for the plain forward passes of the audit's transformed batches, an output-only audit
and an all-layers audit, and prints for each: the wall-clock time, the summed kernel time on the
device, their ratio (device busy share) and the kernels that took the most device time.

Usage (needs a CUDA build of torch and a GPU)::

    python benchmarks/gpu_time.py [--images 512] [--size 224] [--batch-size 512] [--top 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_audit sits beside this file

from bench_audit import PRESET, build_model, memory_images, plain_batches

import eqaudit


def device_time(event) -> float:
    """An averaged profiler event's own time on the device, microseconds (renamed in torch 2.4)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def is_kernel(event) -> bool:
    """A kernel, copy or memset on the device's timeline. The ops that launched them (``aten::``)
    carry the same device time again, and CUPTI's "Command Buffer Full" marks the host waiting
    for room in the launch queue (the device is the bottleneck then): neither is device work.
    The first GPU run of this script (2026-11-26, H100) summed all three: its "kernels" and
    "busy" figures double-count; the per-kernel lines are right."""
    if event.key == "Command Buffer Full" or device_time(event) <= 0:
        return False
    kind = getattr(event, "device_type", None)
    if kind is not None:
        return kind == torch.autograd.DeviceType.CUDA
    return not event.key.startswith("aten::")


def profiled(label: str, run, top: int, cuda: bool = True) -> None:
    sync = torch.cuda.synchronize if cuda else lambda: None
    run()  # warm: cuDNN's algorithm choice, the allocator's pool, eqaudit's cached plans
    sync()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        run()
        sync()
        wall = time.perf_counter() - started
    events = [e for e in prof.key_averages() if is_kernel(e)]
    waits = sum(e.count for e in prof.key_averages() if e.key == "Command Buffer Full")
    busy = sum(device_time(e) for e in events) / 1e6
    print(
        f"\n== {label}: wall {wall:.3f} s under the profiler, kernels {busy:.3f} s on the device "
        f"(busy {busy / wall:.0%}); the host found the launch queue full {waits} times"
    )
    for e in sorted(events, key=device_time, reverse=True)[:top]:
        print(f"  {device_time(e) / 1e6:8.3f} s  {e.count:7d}x  {e.key[:90]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        sys.exit("gpu_time.py needs a GPU: torch.cuda.is_available() is False")
    images = memory_images(args.images, args.size)  # (N, 3, S, S), as plain_batches draws
    model = build_model().eval().to(args.device)
    batches = [b.to(args.device) for b in plain_batches(args.images, args.size, args.batch_size)]

    def plain() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(batch)

    def audit(layers: bool) -> None:
        eqaudit.audit(
            model,
            "d4",
            images,
            input_size=args.size,
            preset=PRESET,
            device=args.device,
            batch_size=args.batch_size,
            layers=layers,
            lie=False,
        )

    # IEEE float32, as the audit runs (eqaudit.device.ieee_float32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    cuda = args.device != "cpu"
    profiled("plain forward passes", plain, args.top, cuda)
    profiled("audit, outputs only", lambda: audit(False), args.top, cuda)
    profiled("audit, all layers", lambda: audit(True), args.top, cuda)


if __name__ == "__main__":
    main()
