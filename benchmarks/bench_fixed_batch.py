"""What a graph fixed at batch 1 costs: the same ResNet-18 as ``bench_audit.py``, exported twice
(``torch.onnx.export`` without ``dynamic_axes``, the default, and with a dynamic batch), audited
under D4 in one process with the repeats interleaved:

* ``dynamic``: the dynamic-batch export (the reference);
* ``fixed, batched``: the batch-1 export as eqaudit runs it, on its checked dynamic-batch copy;
* ``fixed, one at a time``: the batch-1 export with that copy turned off (one image per
  onnxruntime run, as before).

The three audits give the same numbers (checked here); only the time differs. Run it from the
repository root: ``OMP_NUM_THREADS=1 python benchmarks/bench_fixed_batch.py --threads 1``.
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
from bench_audit import PRESET, SEED, build_model, export_onnx

import eqaudit
from eqaudit.models.onnx_adapter import OnnxAdapter


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


@contextlib.contextmanager
def one_image_at_a_time() -> Iterator[None]:
    """eqaudit as it was: a batch-1 graph is not given a dynamic batch."""
    original = OnnxAdapter._batch_dynamically
    OnnxAdapter._batch_dynamically = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        OnnxAdapter._batch_dynamically = original  # type: ignore[method-assign]


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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model()
        fixed = export_fixed(model, Path(tmp) / "fixed.onnx", args.size)
        dynamic = export_onnx(model, Path(tmp) / "dynamic.onnx", args.size)
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
        print(f"{name:22s} fixed_batch={result.summary['model'].get('fixed_batch')} same={same}")
    base = min(times["dynamic"])
    what = "all layers" if args.layers else "outputs only"
    print(f"\n{args.images} images, {args.size} px, d4, {what}, fastest of {args.repeats}")
    print(f"{'case':22s} {'s':>7s} {'/ dynamic':>10s}  all runs")
    for name, runs in times.items():
        best = min(runs)
        spread = ", ".join(f"{t:.2f}" for t in runs)
        print(
            f"{name:22s} {best:7.2f} {best / base:10.2f}  {spread} (median {statistics.median(runs):.2f})"
        )


def _unbatched(path: Path, args: argparse.Namespace) -> eqaudit.AuditResult:
    with one_image_at_a_time():
        return audit(path, args, args.layers)


if __name__ == "__main__":
    main()
