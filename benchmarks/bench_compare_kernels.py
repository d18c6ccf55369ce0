"""Ways of computing one layer's D4 comparison, timed side by side on one device.

On a GPU an all-layers audit is device-bound (RESULTS.md, "Where the all-layers time goes"): the
comparison kernels took ~0.63 s of device time per 1024 images against ~0.70 s for the model.
For a layer whose every D4 element acts on its own grid, the engine computes, for the batch's
activations ``act`` of shape ``(G, B, C, H, W)`` (identity first, ``b = act[0]``, ``a =
act[g]``), the norms ``||a||``, ``||b||`` and ``||T'b - a||`` of every pair at once
(:func:`eqaudit.audit.d4_orbit_norms`). This script times that function beside alternatives that
compute the same norms, over the layer shapes of the benchmark's ResNet-18, and checks that each
alternative gives the torch ops' numbers:

* ``torch``: :func:`~eqaudit.audit.d4_orbit_norms` with torch ops (the engine's path without
  Triton, and off CUDA): one ``torch.gather`` lays ``T'b`` out element-major, ``(G - 1, B C, H
  W)`` (the index broadcast over the batch and channels), so that the subtraction and the norms
  run on contiguous tensors;
* ``fused`` (CUDA with Triton: the engine's path there): one Triton kernel per layer that reads
  each activation once (:mod:`eqaudit.metrics.triton_d4`);
* ``strided``: the engine before session 9: ``index_select`` gathers ``T'b`` in ``(B, C, G - 1,
  H W)`` order and the subtraction writes through a ``movedim`` view (strided: not vectorised on
  a GPU, where it took 0.27 s of device time per 1024 images on an H100);
* ``compiled``: ``torch`` under ``torch.compile`` (on a GPU, inductor fuses the gather,
  subtraction and squared sums into generated Triton kernels; on the CPU, C++). Its one-off
  compile time per layer shape is printed apart;
* ``per-element`` (CPU, float32 only): the path the engine takes there, one element at a time,
  ``T'b`` a numpy view (negative strides, no copy) subtracted into one buffer.

Per variant it prints the summed time over the layers of one batch (fastest of ``--repeats``,
repeats interleaved), its ratio to ``torch``, and the largest relative difference of its norms
from ``torch``'s. It asserts nothing: the verdict is read from the table.

Usage::

    python benchmarks/bench_compare_kernels.py --device cuda [--images 64] [--size 224]
    python benchmarks/bench_compare_kernels.py --device cpu --images 4 --size 96  # a dry run
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_audit sits beside this file

from bench_audit import build_model

from eqaudit.audit import d4_orbit_norms
from eqaudit.metrics import image_norms, triton_d4
from eqaudit.transforms import parse_transforms
from eqaudit.transforms.elements import d4_cell_index, d4_view

D4_ELEMENTS: list[Any] = parse_transforms("d4")  # D4Element, identity first
Variant = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def layer_shapes(size: int) -> Counter[tuple[int, int, int]]:
    """``(C, H, W)`` of every 4-d module output of the benchmark's ResNet-18 at ``size``, with
    how many layers have it (the modules an all-layers audit of it compares)."""
    model = build_model()
    shapes: Counter[tuple[int, int, int]] = Counter()

    def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4:
            shapes[tuple(output.shape[1:])] += 1  # type: ignore[index]

    handles = [m.register_forward_hook(hook) for _, m in model.named_modules() if _ != ""]
    with torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    for handle in handles:
        handle.remove()
    return shapes


def fused(act: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return d4_orbit_norms(act, index, fused=True)


def strided(act: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """:func:`d4_orbit_norms` as the engine had it before 2026-11-26 (session 9): ``T'b``
    gathered in ``(B, C, G - 1, H W)`` order, the subtraction written through a ``movedim``
    view."""
    g, b = act.shape[0], act.shape[1]
    height, width = act.shape[-2:]
    flat = act.flatten(-2)  # (G, B, C, H W)
    moved = flat[0].index_select(-1, index[1:].flatten()).unflatten(-1, (g - 1, height * width))
    difference = moved.movedim(-2, 0).sub_(flat[1:])  # T'b - a
    na = image_norms(act, start=2)
    nd = image_norms(difference.unflatten(-1, (height, width)), start=2)
    return torch.stack([na[1:], na[0].expand(g - 1, b), nd])


def per_element(act: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The engine's CPU float32 path (``Engine._own_grid_d4_norms``), one element at a time:
    ``T'b`` is a numpy view of ``b`` (negative strides, no copy), subtracted into one buffer."""
    del index
    b = act[0]
    nb = image_norms(b)
    buffer = np.empty(b.shape, dtype=np.float32)
    rows = []
    for gi, element in enumerate(D4_ELEMENTS[1:], start=1):
        a = act[gi]
        np.subtract(d4_view(b.numpy(), element.k, element.flip), a.numpy(), out=buffer)
        rows.append(torch.stack([image_norms(a), nb, image_norms(torch.from_numpy(buffer))]))
    return torch.stack(rows, dim=1)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=64, help="images per batch (x 8 elements)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_compare_kernels.py: torch.cuda.is_available() is False; try --device cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    shapes = layer_shapes(args.size)
    layers = {
        shape: (
            torch.randn(8, args.images, *shape, device=device, dtype=dtype),
            d4_cell_index(D4_ELEMENTS, shape[1], shape[2], device),
        )
        for shape in shapes
    }
    variants: dict[str, Variant] = {"torch": d4_orbit_norms, "strided": strided}
    example = next(iter(layers.values()))[0]
    if triton_d4.usable(example):
        started = time.perf_counter()
        for act, index in layers.values():
            fused(act, index)
        synchronise(device)
        print(f"fused: {time.perf_counter() - started:.1f} s to build the kernel (once)")
        variants["fused"] = fused
    if device.type == "cpu" and dtype == torch.float32:
        variants["per-element"] = per_element
    if not args.no_compile:
        compiled = torch.compile(d4_orbit_norms, dynamic=False)
        compile_s = 0.0
        for act, index in layers.values():
            started = time.perf_counter()
            compiled(act, index)
            synchronise(device)
            compile_s += time.perf_counter() - started
        print(f"compiled: {compile_s:.1f} s to compile {len(layers)} layer shapes (once)")
        variants["compiled"] = compiled

    reference = {
        shape: d4_orbit_norms(act, index).double() for shape, (act, index) in layers.items()
    }
    best = {name: float("inf") for name in variants}
    for _ in range(args.repeats):
        for name, variant in variants.items():
            synchronise(device)
            started = time.perf_counter()
            for shape, count in shapes.items():
                act, index = layers[shape]
                for _ in range(count):
                    variant(act, index)
            synchronise(device)
            best[name] = min(best[name], time.perf_counter() - started)
    layer_count = sum(shapes.values())
    print(
        f"\n{layer_count} layers of the ResNet-18 at {args.size} px, {args.images} images x 8"
        f" elements, {args.dtype} on {device}; fastest of {args.repeats}"
    )
    print(f"{'variant':<15}{'s per batch':>12}{'vs torch':>11}{'max rel. diff':>15}")
    for name, variant in variants.items():
        worst = 0.0
        for shape, (act, index) in layers.items():
            got = variant(act, index).double()
            scale = reference[shape].abs().clamp_min(1e-30)
            worst = max(worst, float(((got - reference[shape]).abs() / scale).max()))
        ratio = best[name] / best["torch"]
        print(f"{name:<15}{best[name]:>12.4f}{ratio:>11.2f}{worst:>15.2e}")


if __name__ == "__main__":
    main()
