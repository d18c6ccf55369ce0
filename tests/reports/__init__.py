"""Shared inputs of the report tests: one real demo audit per test session, and hand-built results.

``demo_result`` audits the bundled demo ONNX model (a seeded sample of its images, to keep the
suite quick) once per process and is shared by the HTML and browser tests. ``built_result``
assembles a result in the schema of :mod:`eqaudit.results` without running a model: any number of
layers and elements, hostile names, synthetic inputs, and a full default gallery of
photograph-like thumbnails (the size-bound case).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from eqaudit.data.synthetic import synthetic_images
from eqaudit.gallery import THUMB_SIZE, thumbnail_uri
from eqaudit.results import SCHEMA_VERSION, AuditResult, make_summary

#: Images of the demo audited by the tests: 4 of each of the 7 classes on average.
DEMO_IMAGES = 28
HOSTILE_LAYER = "<script>alert(1)</script>"
HOSTILE_CLASS = "<img src=x onerror=alert(1)>"
D4 = ["id", "rot90", "rot180", "rot270", "flip_h", "flip_v", "transpose", "antitranspose"]


@functools.lru_cache(maxsize=1)
def demo_result() -> AuditResult:
    from eqaudit.audit import audit
    from eqaudit.demo.run import demo_config, demo_model

    config = dataclasses.replace(demo_config("onnx"), num_images=DEMO_IMAGES)
    return audit(demo_model("onnx"), config=config)


@functools.lru_cache(maxsize=4)
def _thumbnails(count: int, seed: int) -> tuple[str, ...]:
    """Photograph-like thumbnails (structured scenes plus sensor grain) at the gallery's size:
    grain makes PNGs large, so these are a harsh case for the page-size bound."""
    images = synthetic_images(count, (THUMB_SIZE, THUMB_SIZE), seed=seed)
    grain = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return tuple(thumbnail_uri(image) for image in (images + 0.03 * grain).clamp(0, 1))


def built_result(
    num_layers: int = 200,
    elements: list[str] | None = None,
    *,
    synthetic: bool = False,
    hostile: bool = False,
    gallery: bool = True,
    started_at: str = "2026-01-02T03:04:05+00:00",
) -> AuditResult:
    """A result with ``num_layers`` layers x ``elements`` (D4 by default), made up but plausible:
    errors grow with depth, every fifth layer is not measurable under the reflections, the last
    layers are flat. ``hostile`` names one layer and one class with HTML."""
    elements = elements or D4
    rng = np.random.default_rng(0)
    class_names = [f"class_{i}" for i in range(10)]
    if hostile:
        class_names[3] = HOSTILE_CLASS
    layer_names = [f"backbone.stage{i // 20}.block{i % 20}.conv" for i in range(num_layers)]
    if hostile:
        layer_names[num_layers // 2] = HOSTILE_LAYER
    layers = []
    for index, name in enumerate(layer_names):
        flat = index >= num_layers - 3
        for e, element in enumerate(elements):
            identity = element == "id"
            unmeasurable = not identity and not flat and index % 5 == 4 and "flip" in element
            error = 0.0 if identity else float(0.02 + 0.5 * index / num_layers * (1 + 0.04 * e))
            error *= float(rng.uniform(0.8, 1.2))
            layers.append(
                {
                    "layer": name,
                    "op": "Gemm" if flat else "Conv",
                    "index": index,
                    "kind": "flat" if flat else "spatial",
                    "transform": element,
                    "shape": "512" if flat else "64x14x14",
                    "stride": None if flat else "16x16",
                    "stride_source": "n/a" if flat else "graph",
                    "relative_error": None if unmeasurable else error,
                    "relative_error_p95": None if unmeasurable else 1.3 * error,
                    "relative_error_max": None if unmeasurable else 1.6 * error,
                    "cosine_distance": None if unmeasurable else error**2,
                    "interpolation_floor": None,
                    "measurable": not unmeasurable,
                    "reason": "a made-up reason: half a cell at stride 16"
                    if unmeasurable
                    else None,
                }
            )
    outputs = []
    for e, element in enumerate(elements):
        agreement = 1.0 if element == "id" else 0.97 - 0.05 * e
        outputs.append(
            {
                "transform": element,
                "family": "d4",
                "mode": "invariance",
                "exact": True,
                "n": 500,
                "agreement": agreement,
                "agreement_low": max(0.0, agreement - 0.04),
                "agreement_high": min(1.0, agreement + 0.03),
                "js_divergence": 0.0 if element == "id" else 0.02 * e,
                "logit_error": 0.0 if element == "id" else 0.1 * e,
                "accuracy": 0.8 * agreement,
                "interpolation_floor": None,
                "skipped": None,
            }
        )
    measured = outputs[1:]
    mean_agreement = float(np.mean([r["agreement"] for r in measured]))
    mean_js = float(np.mean([r["js_divergence"] for r in measured]))
    summary = make_summary(
        eqaudit={"version": "0.1.0", "torch": "2.13.0", "python": "3.11"},
        model={
            "path": "models/resnet_like.onnx",
            "name": "resnet_like.onnx",
            "sha256": "0" * 64,
            "backend": "onnx",
            "format": "onnx",
            "input": {
                "name": "input",
                "layout": "NCHW",
                "layout_source": "detected",
                "channels": 3,
                "height": 224,
                "width": 224,
                "batch": None,
                "dtype": "float32",
            },
            "output_kind": "logits",
            "output_kind_source": "auto",
            "num_classes": len(class_names),
            "class_names": class_names,
            "layers_audited": num_layers,
        },
        preprocessing={
            "preset": "imagenet",
            "resize": "crop",
            "channels": "rgb",
            "scale": 1.0,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "notes": [],
        },
        transforms={
            "spec": "d4",
            "shift_mode": "crop",
            "margin": 0,
            "elements": [
                {"name": e, "family": "d4", "exact": True, "skipped": None} for e in elements
            ],
        },
        label_action={"mode": "invariance", "declared": {}, "permutations": {}, "suggested": {}},
        data={
            "source": "synthetic" if synthetic else "folder",
            "path": None if synthetic else "images",
            "count": 500,
            "synthetic": synthetic,
            "labelled": True,
            "skipped": [],
            "notes": [],
        },
        seed=0,
        options={},
        warnings=(
            ["SYNTHETIC INPUTS: no --data was given, so these numbers mean little"]
            if synthetic
            else []
        )
        + ["an ordinary warning that the page must list"],
        scores={
            "robustness_score": 100 * (mean_agreement + 1 - mean_js) / 2,
            "mean_agreement": mean_agreement,
            "mean_js_divergence": mean_js,
            "orbit_consistency": 0.61,
            "worst_transform": elements[-1],
            "worst_agreement": measured[-1]["agreement"],
            "clean_accuracy": 0.8,
            "worst_accuracy": 0.5,
            "orbit_accuracy": 0.45,
        },
        outputs=outputs,
        layers=layers,
        run={"started_at": started_at, "duration_s": 12.5, "host": "test", "argv": None},
    )
    assert summary["schema_version"] == SCHEMA_VERSION
    return AuditResult(
        summary=summary, gallery=_gallery(elements) if gallery else {"flips": [], "orbits": []}
    )


def _gallery(elements: list[str], max_flips: int = 24, orbit_images: int = 3) -> dict:
    """The default gallery's size: ``max_flips`` flips and ``orbit_images`` full orbits."""
    thumbs = iter(_thumbnails(2 * max_flips + orbit_images * len(elements), seed=1))
    flips = [
        {
            "image": f"images/img_{i:03d}.jpg",
            "transform": elements[1 + i % (len(elements) - 1)],
            "label": 3,
            "js_divergence": 0.9 - 0.01 * i,
            "original": {"top1": 3, "confidence": 0.91, "thumbnail": next(thumbs)},
            "transformed": {"top1": (4 + i) % 10, "confidence": 0.55, "thumbnail": next(thumbs)},
        }
        for i in range(max_flips)
    ]
    orbits = [
        {
            "image": f"images/img_{i:03d}.jpg",
            "label": 3,
            "elements": [
                {
                    "transform": element,
                    "top1": 3 if e % 3 else 7,
                    "confidence": 0.8,
                    "thumbnail": next(thumbs),
                }
                for e, element in enumerate(elements)
            ],
        }
        for i in range(orbit_images)
    ]
    return {"flips": flips, "orbits": orbits}
