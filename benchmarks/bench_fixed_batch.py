"""What a model fixed at batch 1 costs: the same ResNet-18 as ``bench_audit.py``, exported twice
(without a dynamic batch, the exporters' default, and with one), audited under D4 in one process
with the repeats interleaved:

* ``dynamic``: the dynamic-batch export (the reference);
* ``fixed, batched``: the batch-1 export as eqaudit runs it (ONNX: on its checked dynamic-batch
  copy; ``--format pt2``: the torch.export module with its input checks off, once checked);
* ``fixed, one at a time``: the batch-1 export with that turned off (one image per run, as
  before).

``--format onnx`` (default) exports with ``torch.onnx.export``, ``--format pt2`` with
``torch.export.export``. ``--model vit``: a ViT of 6 blocks (width 192, 3 heads, 16 px patches,
a class token and a position embedding), whose class token a batch-1 export expands to a batch
of 1. The three audits give the same numbers (checked here); only the time
differs. Run it from the repository root:
``OMP_NUM_THREADS=1 python benchmarks/bench_fixed_batch.py --threads 1 [--format pt2]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_audit import PRESET, SEED, build_model, export_onnx
from torch import nn

import eqaudit
from eqaudit.models.onnx_adapter import OnnxAdapter
from eqaudit.models.torch_adapter import TorchAdapter


class Block(nn.Module):
    """A ViT block as timm writes it (fused qkv, scaled dot-product attention, GELU MLP)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, size: int, dim: int = 192, depth: int = 6, heads: int = 3) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 16, 16)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + (size // 16) ** 2, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def export_fixed(model: torch.nn.Module, path: Path, size: int) -> Path:
    """ONNX (opset 17, TorchScript exporter) fixed at batch 1: no ``dynamic_axes``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, size, size),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
        )
    return path


def export_pt2(model: torch.nn.Module, path: Path, size: int, dynamic: bool) -> Path:
    """A torch.export archive, its batch fixed at 1 (the default) or dynamic."""
    example = torch.zeros(2 if dynamic else 1, 3, size, size)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=shapes), path)
    return path


@contextlib.contextmanager
def one_image_at_a_time(fmt: str) -> Iterator[None]:
    """eqaudit as it was: a batch-1 model is not given a dynamic batch."""
    owner, name = (
        (OnnxAdapter, "_batch_dynamically")
        if fmt == "onnx"
        else (TorchAdapter, "batch_dynamically")
    )
    original = getattr(owner, name)
    setattr(owner, name, lambda self: None)
    try:
        yield
    finally:
        setattr(owner, name, original)


def audit(path: Path, args: argparse.Namespace, layers: bool) -> eqaudit.AuditResult:
    return eqaudit.audit(
        str(path),
        transforms="d4",
        num_images=args.images,
        seed=SEED,
        preset=PRESET,
        layers=layers,
        batch_size=args.batch_size,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images to audit (default 16)")
    parser.add_argument("--size", type=int, default=224, help="input size (default 224)")
    parser.add_argument("--batch-size", type=int, default=64, help="audit batch size (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--layers", action="store_true", help="all layers (default: outputs only)")
    parser.add_argument("--format", choices=("onnx", "pt2"), default="onnx", help="export format")
    parser.add_argument(
        "--model", choices=("resnet18", "vit"), default="resnet18", help="the model exported"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(SEED)
        model = build_model() if args.model == "resnet18" else ViT(args.size).eval()
        if args.format == "onnx":
            fixed = export_fixed(model, Path(tmp) / "fixed.onnx", args.size)
            dynamic = export_onnx(model, Path(tmp) / "dynamic.onnx", args.size)
        else:
            fixed = export_pt2(model, Path(tmp) / "fixed.pt2", args.size, dynamic=False)
            dynamic = export_pt2(model, Path(tmp) / "dynamic.pt2", args.size, dynamic=True)
        cases = {
            "dynamic": lambda: audit(dynamic, args, args.layers),
            "fixed, batched": lambda: audit(fixed, args, args.layers),
            "fixed, one at a time": lambda: _unbatched(fixed, args),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        results: dict[str, eqaudit.AuditResult] = {}
        for name, case in cases.items():  # warm-up, and the results to compare
            results[name] = case()
        for _ in range(args.repeats):
            for name, case in cases.items():
                start = time.perf_counter()
                case()
                times[name].append(time.perf_counter() - start)
    reference = results["dynamic"]
    for name, result in results.items():
        same = result.to_frame("outputs").equals(reference.to_frame("outputs"))
        if args.layers:
            same = same and result.to_frame("layers").equals(reference.to_frame("layers"))
        # PyTorch rounds a batch of 1 differently from a batch of many (oneDNN's kernels):
        # the largest difference says whether "not the same" is more than that.
        js = max(
            abs(a["js_divergence"] - b["js_divergence"])
            for a, b in zip(result.outputs, reference.outputs, strict=True)
        )
        agree = all(
            a["agreement"] == b["agreement"]
            for a, b in zip(result.outputs, reference.outputs, strict=True)
        )
        print(
            f"{name:22s} fixed_batch={result.summary['model'].get('fixed_batch')} "
            f"same={same} (agreements equal: {agree}, largest |JS difference| {js:.1e})"
        )
    base = min(times["dynamic"])
    what = "all layers" if args.layers else "outputs only"
    print(
        f"\n{args.model}, {args.format}: {args.images} images, {args.size} px, d4, {what}, "
        f"fastest of {args.repeats}"
    )
    print(f"{'case':22s} {'s':>7s} {'/ dynamic':>10s}  all runs")
    for name, runs in times.items():
        best = min(runs)
        spread = ", ".join(f"{t:.2f}" for t in runs)
        print(
            f"{name:22s} {best:7.2f} {best / base:10.2f}  {spread} (median {statistics.median(runs):.2f})"
        )


def _unbatched(path: Path, args: argparse.Namespace) -> eqaudit.AuditResult:
    with one_image_at_a_time(args.format):
        return audit(path, args, args.layers)


if __name__ == "__main__":
    main()
