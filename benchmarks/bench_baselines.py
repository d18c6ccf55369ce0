"""Speed of ``eqaudit.audit`` against what users write today, on the benchmark ResNet-18.

Same model (``bench_audit.build_model``, random weights from a fixed seed), same synthetic images
and the same 8 D4 elements as ``bench_audit.py``; every case computes the same numbers as the
audit it is timed against, and the script prints how far apart they are.

* **Outputs** (goal: eqaudit >= 10x faster): the loop a user writes today, per image and per
  element: transform, normalise, ``model(x[None])`` (PyTorch, under ``torch.no_grad``) or
  ``session.run`` on one image (onnxruntime), softmax, then top-1 agreement with the identity and
  the JS divergence (log base 2) per element, against ``eqaudit.audit(..., layers=False)``.
* **Layers**: every intermediate tensor from Polygraphy's ONNX "mark all" (``ModifyOutputs`` with
  ``outputs=constants.MARK_ALL``, run by ``OnnxrtRunner`` over ``SessionFromOnnx``), one call per
  element and chunk of images, then per (tensor, element) the naive relative error
  ``||a - b|| / (||a|| + ||b||)`` and cosine distance in numpy, ``b`` = the element applied to the
  identity's map on the map's own grid (``np.rot90``, ``np.flip``, ...), against
  ``eqaudit.audit(...)`` with all layers. Needs ``pip install polygraphy`` (benchmark environment
  only: ``pip install -r benchmarks/requirements.txt``); the row is skipped without it.

Both sides are timed end to end: model loading, image preparation (transforms, normalisation),
inference and metrics. The synthetic images themselves are drawn once before timing and handed
to both sides (the audit reads them as an in-memory array).
Run ``python benchmarks/bench_baselines.py --help`` for options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_audit sits beside this file

from bench_audit import (
    PRESET,
    SEED,
    TRANSFORMS,
    audited_layer_names,
    build_model,
    export_onnx,
    run_audit,
)

import eqaudit
from eqaudit.data import make_preprocessing, synthetic_images
from eqaudit.transforms import parse_transforms

GOAL_SPEEDUP = 10.0
#: ImageNet normalisation, as a user types it (checked against eqaudit's ``imagenet`` preset).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# The D4 elements as a user writes them. Convention (eqaudit's): rot90 is counter-clockwise,
# torch.rot90(x, 1, (-2, -1)); flip_h mirrors left-right; transpose swaps H and W.
TORCH_D4: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "id": lambda x: x,
    "rot90": lambda x: torch.rot90(x, 1, (-2, -1)),
    "rot180": lambda x: torch.rot90(x, 2, (-2, -1)),
    "rot270": lambda x: torch.rot90(x, 3, (-2, -1)),
    "flip_h": lambda x: torch.flip(x, (-1,)),
    "flip_v": lambda x: torch.flip(x, (-2,)),
    "transpose": lambda x: x.transpose(-2, -1),
    "antitranspose": lambda x: torch.rot90(x, 2, (-2, -1)).transpose(-2, -1),
}
NUMPY_D4: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "id": lambda x: x,
    "rot90": lambda x: np.rot90(x, 1, axes=(-2, -1)),
    "rot180": lambda x: np.rot90(x, 2, axes=(-2, -1)),
    "rot270": lambda x: np.rot90(x, 3, axes=(-2, -1)),
    "flip_h": lambda x: np.flip(x, -1),
    "flip_v": lambda x: np.flip(x, -2),
    "transpose": lambda x: np.swapaxes(x, -2, -1),
    "antitranspose": lambda x: np.swapaxes(np.rot90(x, 2, axes=(-2, -1)), -2, -1),
}


# -- the plain metrics ------------------------------------------------------------------------------
def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """``KL(p || m) / 2 + KL(q || m) / 2``, ``m = (p + q) / 2``, log base 2, ``0 log 0 = 0``."""
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        keep = a > 0
        return float(np.sum(a[keep] * np.log2(a[keep] / m[keep])))

    return 0.5 * kl(p) + 0.5 * kl(q)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max()
    e = np.exp(z)
    return e / e.sum()


Metrics = dict[str, tuple[float, float]]  # element -> (agreement, mean JS)


def summarise(top1: dict[str, list[bool]], js: dict[str, list[float]]) -> Metrics:
    return {name: (float(np.mean(top1[name])), float(np.mean(js[name]))) for name in top1}


# -- (a) the per-image, per-element loops -----------------------------------------------------------
def naive_torch(
    model: nn.Module, pixels: torch.Tensor, names: list[str], device: str = "cpu"
) -> Metrics:
    """For each image, for each element: transform, normalise, ``model(x[None])``, softmax
    (on ``device``: the image is moved there, the probabilities come back)."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    model = model.to(device)
    top1: dict[str, list[bool]] = defaultdict(list)
    js: dict[str, list[float]] = defaultdict(list)
    with torch.no_grad():
        for image in pixels:
            probs = {}
            for name in names:
                x = (TORCH_D4[name](image) - mean) / std
                logits = model(x[None].to(device))
                probs[name] = torch.softmax(logits.double(), dim=1)[0].cpu().numpy()
            reference = probs["id"]
            for name in names:
                top1[name].append(bool(probs[name].argmax() == reference.argmax()))
                js[name].append(js_divergence(reference, probs[name]))
    return summarise(top1, js)


def naive_onnxruntime(onnx_path: Path, pixels: np.ndarray, names: list[str]) -> Metrics:
    """The same loop with one ``session.run`` per image and element (the session is created
    inside: a user's script loads the model too, as the audit does)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    mean = np.array(MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.array(STD, dtype=np.float32).reshape(3, 1, 1)
    top1: dict[str, list[bool]] = defaultdict(list)
    js: dict[str, list[float]] = defaultdict(list)
    for image in pixels:
        probs = {}
        for name in names:
            x = np.ascontiguousarray((NUMPY_D4[name](image) - mean) / std, dtype=np.float32)
            logits = session.run(None, {"input": x[None]})[0][0]
            probs[name] = softmax(logits)
        reference = probs["id"]
        for name in names:
            top1[name].append(bool(probs[name].argmax() == reference.argmax()))
            js[name].append(js_divergence(reference, probs[name]))
    return summarise(top1, js)


def output_gap(naive: Metrics, result: eqaudit.AuditResult) -> tuple[float, float]:
    """Largest |difference| of agreement and of mean JS between a loop and the audit."""
    rows = {r["transform"]: r for r in result.summary["outputs"] if r["skipped"] is None}
    agreement = max(abs(naive[n][0] - rows[n]["agreement"]) for n in naive)
    js = max(abs(naive[n][1] - rows[n]["js_divergence"]) for n in naive)
    return agreement, js


# -- (b) Polygraphy mark-all + numpy ----------------------------------------------------------------
def polygraphy_available() -> bool:
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return False
    return True


LayerErrors = dict[tuple[str, str], float]  # (tensor, element) -> mean relative error


def polygraphy_layers(
    onnx_path: Path, pixels: np.ndarray, names: list[str], per_call: int
) -> tuple[LayerErrors, LayerErrors]:
    """Every tensor of the graph for every element (Polygraphy mark-all), compared in numpy.

    One ``runner.infer`` per element and chunk of ``per_call`` images. Per image, with
    ``a = h(T_g x)`` and ``b = T_g h(x)`` (the element applied to the identity's map on the
    map's own grid; flat tensors and 1x1 maps: ``b = h(x)``): relative error
    ``||a - b|| / (||a|| + ||b|| + 1e-12)`` and cosine distance ``1 - <a, b> / (||a|| ||b||)``.
    Returns the mean of each over the images, per (tensor, element).
    """
    from polygraphy import constants
    from polygraphy.backend.onnx import BytesFromOnnx, ModifyOutputs, OnnxFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    marked = ModifyOutputs(OnnxFromPath(str(onnx_path)), outputs=constants.MARK_ALL)
    session = SessionFromOnnx(BytesFromOnnx(marked))
    mean = np.array(MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(STD, dtype=np.float32).reshape(1, 3, 1, 1)
    relative: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    cosine: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    with OnnxrtRunner(session) as runner:
        for start in range(0, len(pixels), per_call):
            chunk = pixels[start : start + per_call]
            outputs = {}
            for name in names:
                x = np.ascontiguousarray((NUMPY_D4[name](chunk) - mean) / std, dtype=np.float32)
                outputs[name] = runner.infer({"input": x})
            for tensor, reference in outputs["id"].items():
                if reference.dtype.kind != "f" or reference.shape[:1] != (len(chunk),):
                    continue
                spatial = reference.ndim == 4 and reference.shape[-2:] != (1, 1)
                for name in names[1:]:
                    a = outputs[name][tensor]
                    b = NUMPY_D4[name](reference) if spatial else reference
                    if a.shape != b.shape:  # a non-square map under rot90: not comparable
                        continue
                    a = a.reshape(len(chunk), -1).astype(np.float64)
                    b = b.reshape(len(chunk), -1).astype(np.float64)
                    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
                    nd = np.linalg.norm(a - b, axis=1)
                    relative[tensor, name].append(nd / (na + nb + 1e-12))
                    dot = np.einsum("ij,ij->i", a, b)
                    cosine[tensor, name].append(1 - dot / np.maximum(na * nb, 1e-12))
    mean_of = {key: float(np.concatenate(v).mean()) for key, v in relative.items()}
    cosine_of = {key: float(np.concatenate(v).mean()) for key, v in cosine.items()}
    return mean_of, cosine_of


def layer_gap(errors: LayerErrors, result: eqaudit.AuditResult) -> tuple[float, int]:
    """Largest |difference| of the mean relative error over the (layer, element) rows that both
    compared, and how many there are."""
    gaps = []
    for row in result.summary["layers"]:
        key = (row["layer"], row["transform"])
        if key in errors and row.get("relative_error") is not None:
            gaps.append(abs(errors[key] - row["relative_error"]))
    return (max(gaps) if gaps else float("nan")), len(gaps)


# -- checks and main --------------------------------------------------------------------------------
def check_conventions(pixels: torch.Tensor, names: list[str]) -> None:
    """The hand-written elements and normalisation must be eqaudit's, or the comparison is
    meaningless: stop with a message when they are not."""
    preset = make_preprocessing(preset=PRESET)
    if not (np.allclose(preset.mean, MEAN) and np.allclose(preset.std, STD)):
        raise SystemExit(f"preset {PRESET!r} is not the ImageNet mean/std this script types in")
    for element in parse_transforms(TRANSFORMS, "crop"):
        ours = element.apply_image(pixels, 0)
        if not torch.equal(ours, TORCH_D4[element.name](pixels)) or not np.array_equal(
            ours.numpy(), NUMPY_D4[element.name](pixels.numpy())
        ):
            raise SystemExit(f"the hand-written {element.name} differs from eqaudit's")
    if names[0] != "id":
        raise SystemExit("eqaudit's d4 battery no longer starts with the identity")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="images (default 32)")
    parser.add_argument("--size", type=int, default=224, help="input size (default 224)")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats (default 1)")
    parser.add_argument("--batch-size", type=int, default=64, help="audit batch size (default 64)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: cores)"
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated cases to leave out: torch,onnx,polygraphy"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the PyTorch loop and audit run (cuda: leave out onnx and polygraphy)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 images at 64 px")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.size = 4, 64
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.device == "cuda" and not {"onnx", "polygraphy"} <= skip:
        raise SystemExit("--device cuda times the PyTorch cases only: add --skip onnx,polygraphy")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch {torch.__version__} sees no CUDA device here")
    torch.set_num_threads(args.threads)

    import onnxruntime

    have_polygraphy = polygraphy_available()
    print(
        f"eqaudit baselines, {date.today().isoformat()}: {platform.platform()}, "
        f"{os.cpu_count()} cores ({args.threads} torch threads), python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, eqaudit {eqaudit.__version__}, polygraphy "
        + (__import__("polygraphy").__version__ if have_polygraphy else "not installed")
    )
    print(
        f"model: ResNet-18 (random weights, seed {SEED}); {args.images} synthetic images at "
        f"{args.size}x{args.size}, transforms {TRANSFORMS}; audit batch size {args.batch_size}, "
        f"device {args.device}"
    )
    names = [e.name for e in parse_transforms(TRANSFORMS, "crop")]
    per_call = max(1, args.batch_size // len(names))
    pixels = synthetic_images(args.images, (args.size, args.size), 3, seed=SEED)
    check_conventions(pixels[:2], names)
    pixels_np = pixels.numpy()

    with tempfile.TemporaryDirectory(prefix="eqaudit-baselines-") as tmp:
        model = build_model()
        onnx_path = export_onnx(model, Path(tmp) / "resnet18.onnx", args.size)

        def audit(backend: str, layers: bool, images: int = args.images) -> eqaudit.AuditResult:
            return run_audit(
                backend,
                model,
                onnx_path,
                images=images,
                size=args.size,
                layers=layers,
                batch_size=args.batch_size,
                device=None if args.device == "cpu" else args.device,
                data=pixels_np,  # the images the loops get, drawn before timing as theirs are
            )

        cases: dict[str, Callable[[], object]] = {}
        if "torch" not in skip:
            cases["torch loop"] = lambda: naive_torch(model, pixels, names, args.device)
            cases["torch audit"] = lambda: audit("torch", False)
        if "onnx" not in skip:
            cases["onnx loop"] = lambda: naive_onnxruntime(onnx_path, pixels_np, names)
            cases["onnx audit"] = lambda: audit("onnx", False)
        if "polygraphy" not in skip and have_polygraphy:
            cases["polygraphy"] = lambda: polygraphy_layers(onnx_path, pixels_np, names, per_call)
            cases["onnx layers audit"] = lambda: audit("onnx", True)

        # Warm-up on one image / one batch (thread pools, kernel choice, lazy imports).
        naive_torch(model, pixels[:1], names, args.device)
        if "onnx" not in skip:
            naive_onnxruntime(onnx_path, pixels_np[:1], names)
        for key in [k for k in cases if "audit" in k]:
            audit(key.split()[0], "layers" in key, images=min(args.images, per_call))

        times: dict[str, list[float]] = {key: [] for key in cases}
        found: dict[str, object] = {}
        for repeat in range(args.repeats):
            for key, fn in cases.items():
                start = time.perf_counter()
                found[key] = fn()
                times[key].append(time.perf_counter() - start)
            print(
                f"  repeat {repeat + 1}/{args.repeats}: "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                flush=True,
            )
        print(f"load average (1 min) {os.getloadavg()[0]:.1f} after the timed repeats")
        best = {key: min(v) for key, v in times.items()}
        median = {key: statistics.median(v) for key, v in times.items()}
        note = "fastest" if args.repeats > 1 else "one run"

        print(
            f"\noutputs only ({note}, seconds): the per-image, per-element loop vs "
            "eqaudit.audit(layers=False); speed-up = loop / audit; gaps = largest |difference| "
            "of agreement and JS over the elements"
        )
        header = (
            f"{'runtime':<12} {'loop s':>8} {'audit s':>8} {'speed-up':>9} "
            f"{'agreement gap':>14} {'JS gap':>9}"
        )
        print(header)
        print("-" * len(header))
        for backend, label in (("torch", "PyTorch"), ("onnx", "onnxruntime")):
            if f"{backend} loop" not in cases:
                continue
            loop, audited = best[f"{backend} loop"], best[f"{backend} audit"]
            gap_a, gap_js = output_gap(found[f"{backend} loop"], found[f"{backend} audit"])
            print(
                f"{label:<12} {loop:>8.2f} {audited:>8.2f} {loop / audited:>8.2f}x "
                f"{gap_a:>14.2g} {gap_js:>9.2g}"
            )
        print(f"goal: speed-up >= {GOAL_SPEEDUP:g}x")

        print(
            f"\nper layer ({note}, seconds): Polygraphy mark-all outputs + numpy errors vs "
            "eqaudit.audit (all layers); gap = largest |difference| of the mean relative error "
            "over the (layer, element) rows both compared"
        )
        if "polygraphy" in skip:
            print("skipped (--skip polygraphy)")
        elif not have_polygraphy:
            print(
                "skipped: polygraphy is not installed; install it into the benchmark environment "
                "with `pip install polygraphy` (or `pip install -r benchmarks/requirements.txt`)"
            )
        else:
            errors, _ = found["polygraphy"]
            result = found["onnx layers audit"]
            tensors = len({tensor for tensor, _ in errors})
            gap, common = layer_gap(errors, result)
            header = (
                f"{'polygraphy s':>12} {'tensors':>8} {'audit s':>8} {'layers':>7} "
                f"{'speed-up':>9} {'gap':>9} {'rows':>5}"
            )
            print(header)
            print("-" * len(header))
            poly, audited = best["polygraphy"], best["onnx layers audit"]
            print(
                f"{poly:>12.2f} {tensors:>8} {audited:>8.2f} "
                f"{len(audited_layer_names(result)):>7} {poly / audited:>8.2f}x "
                f"{gap:>9.2g} {common:>5}"
            )
        if args.repeats > 1:
            print("medians: " + ", ".join(f"{k} {v:.2f}s" for k, v in median.items()))


if __name__ == "__main__":
    main()
