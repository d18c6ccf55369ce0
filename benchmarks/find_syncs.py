"""Where a CUDA audit makes the host wait for the GPU: every synchronising call, with its caller.

On a GPU the engine launches batch ``k + 1`` before it finishes batch ``k``, so that the host's
bookkeeping overlaps the device's forward (``eqaudit.audit``'s module docstring). Any call that
waits for the device in between (a ``.cpu()`` of a GPU tensor, a tensor made from a Python list on
the GPU, a copy from pageable host memory, an ``.item()``) drains the queue and idles the GPU
until the next launch. torch reports those calls under ``torch.cuda.set_sync_debug_mode``; this
script audits the benchmark's ResNet-18 (random weights) on synthetic images with that mode on
and prints, per audit, each distinct synchronising call site in eqaudit with how many times it
fired, so that a regression shows up as a new line.

Expected: the waits the pipeline is built on (the CUDA event of a finished batch's scores,
once per batch, does not show: events are not reported) and the one-off ones: model load, grid
discovery, the first batch's determinism check, one copy of the channel maps' sums at the end
(``settle_all``), and the caller's module moved back to its own device (``kept_as_given``, one
copy per tensor). Anything per batch beyond those is a bubble.

Usage (needs a CUDA build of torch and a GPU)::

    python benchmarks/find_syncs.py [--images 64] [--size 224] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_audit sits beside this file

from bench_audit import build_model

import eqaudit

CASES = {
    "output only, d4": {"transforms": "d4", "layers": False},
    "all layers, d4": {"transforms": "d4"},
    "output only, d4 + rot:20 + shift:0.5": {"transforms": "d4,rot:20,shift:0.5", "layers": False},
    # Layers compared by gathering, resampling or a Fourier shift (cell-map tensors cached per
    # device since 69ad37e), and the channel maps (moments summed on the device, read back at
    # the end): neither should show a line per batch.
    "all layers, d4 + rot:20 + shift:0.5": {"transforms": "d4,rot:20,shift:0.5"},
    "all layers, d4, --channel-map": {"transforms": "d4", "channel_map": True},
}


def eqaudit_frame(stack: list[traceback.FrameSummary]) -> str:
    """The innermost eqaudit frame of a stack, as ``file:line function``."""
    for frame in reversed(stack):
        if "/eqaudit/" in frame.filename.replace("\\", "/"):
            where = frame.filename.replace("\\", "/").split("/eqaudit/", 1)[1]
            return f"eqaudit/{where}:{frame.lineno} {frame.name}"
    return "outside eqaudit"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("find_syncs.py needs a GPU: torch.cuda.is_available() is False")
    model = build_model().eval()
    for name, options in CASES.items():
        sites: Counter[str] = Counter()

        def record(message, *_, sites: Counter[str] = sites, **__) -> None:
            if "synchroniz" in str(message):
                sites[eqaudit_frame(traceback.extract_stack()[:-1])] += 1

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record  # type: ignore[assignment]
            torch.cuda.set_sync_debug_mode("warn")
            try:
                eqaudit.audit(
                    model,
                    num_images=args.images,
                    seed=0,
                    input_size=args.size,
                    preset="imagenet",
                    device="cuda",
                    batch_size=args.batch_size,
                    **options,
                )
            finally:
                torch.cuda.set_sync_debug_mode(0)
        batches = -(-args.images * 8 // args.batch_size)
        print(f"\n== {name}: {args.images} images, about {batches} batches")
        for site, count in sites.most_common():
            print(f"{count:6d}  {site}")


if __name__ == "__main__":
    main()
