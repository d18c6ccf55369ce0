"""The host's own work in an all-layers GPU audit, measured without a GPU.

On a GPU an all-layers audit can be host-bound: the device waits while Python hooks each layer,
queues its comparison, and adds the per-image numbers of every (layer, element) to their
accumulators. This script times that host work on the CPU, alone: a stack of cheap 1x1
convolutions at a small input size (the forward costs little), every layer taken through the
whole-layer path a GPU audit takes (``Engine._whole_layers`` forced on) with its comparison
replaced by fixed norms (no kernel: what is left is the engine's Python and small ops). Audits
with and without layers alternate; the fastest of each is kept.

It prints, per audit: the two times; the layers' set-up before the first batch (the grid
graph's ``torch.export``, the probe forward: a fixed cost); and per batch the rest of the
difference, of which the accumulator updates (``Engine._add_records``).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_host.py [--layers 60] [--images 2048]
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

import eqaudit

engine = importlib.import_module("eqaudit.audit")  # the module (eqaudit.audit is the function)


def build(layers: int) -> nn.Module:
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 1, 1)] + [nn.Conv2d(1, 1, 1) for _ in range(layers - 1)]
    return nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 10)).eval()


def stub_comparisons() -> None:
    """Every layer through the whole-layer path, its D4 comparison replaced by fixed norms."""
    fixed: dict[tuple[int, int], torch.Tensor] = {}

    def norms(act: torch.Tensor, index: torch.Tensor, fused: bool = False) -> torch.Tensor:
        g, b = act.shape[:2]
        if (g, b) not in fixed:
            fixed[g, b] = torch.rand(3, g - 1, b, dtype=torch.float64) + 0.5
        return fixed[g, b]

    engine.Engine._whole_layers = staticmethod(lambda act: True)
    engine.d4_orbit_norms = norms


def timed(owner: Any, name: str, totals: dict[str, float]) -> None:
    """Add the wall time of ``owner.name``'s calls to ``totals[name]``."""
    original = owner.__dict__[name]
    function: Callable = original.__func__ if isinstance(original, staticmethod) else original

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    setattr(owner, name, staticmethod(wrapper) if isinstance(original, staticmethod) else wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=60, help="1x1 convs (default 60)")
    parser.add_argument("--images", type=int, default=2048, help="images (default 2048)")
    parser.add_argument("--size", type=int, default=8, help="input size (default 8)")
    parser.add_argument("--batch-size", type=int, default=512, help="forward images per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build(args.layers)
    stub_comparisons()
    totals: dict[str, float] = defaultdict(float)
    timed(engine.Engine, "setup", totals)
    timed(engine.Engine, "_add_records", totals)
    data = np.random.default_rng(0).random((args.images, 3, args.size, args.size), np.float32)

    def run(layers: bool) -> tuple[float, dict[str, float]]:
        totals.clear()
        start = time.perf_counter()
        eqaudit.audit(
            model, "d4", data=data, input_size=args.size, batch_size=args.batch_size,
            layers=layers, seed=0,
        )  # fmt: skip
        return time.perf_counter() - start, dict(totals)

    run(True)  # warm-up: imports, torch.export's first trace
    best: dict[bool, tuple[float, dict[str, float]]] = {}
    for _ in range(args.repeats):
        for layers in (False, True):
            result = run(layers)
            if layers not in best or result[0] < best[layers][0]:
                best[layers] = result
    batches = -(-args.images * 8 // args.batch_size)
    (plain, plain_parts), (full, parts) = best[False], best[True]
    setup = parts["setup"] - plain_parts["setup"]
    per_batch = (full - plain - setup) / batches
    print(f"{args.layers} layers, {args.images} images at {args.size} px, D4, {batches} batches")
    print(f"fastest of {args.repeats}: no layers {plain:.3f} s, all layers {full:.3f} s")
    print(f"layers' set-up (grid graph, probe): {setup:.3f} s per audit")
    print(f"the rest, per batch: {per_batch * 1e3:.2f} ms, of which the accumulators "
          f"(_add_records) {parts['_add_records'] / batches * 1e3:.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
