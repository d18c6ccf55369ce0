"""What changed, in pictures: thumbnails kept during an audit for the report.

The engine offers every (image, element) pair; the gallery keeps, with bounded memory,

* ``flips``: the pairs whose top-1 class changed, worst first (largest JS divergence), at most
  ``max_flips``, each with the thumbnail of the original and of the transformed image;
* ``orbits``: the first ``orbit_images`` images under every element of the battery.

Thumbnails are the pixel-space images (after resizing, before normalisation) as small PNG data
URIs, so a report can be rendered later from ``gallery.json`` without re-running the model.
"""

from __future__ import annotations

import base64
import heapq
import io
import itertools

import numpy as np
import torch
from PIL import Image

THUMB_SIZE = 96


def thumbnail(image: torch.Tensor, size: int = THUMB_SIZE) -> Image.Image:
    """``(C, H, W)`` in [0, 1] -> a Pillow image no larger than ``size`` pixels a side."""
    array = (image.detach().clamp(0, 1).mul(255).round().to(torch.uint8)).cpu().numpy()
    pil = (
        Image.fromarray(array[0], "L")
        if array.shape[0] == 1
        else Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), "RGB")
    )
    if max(pil.size) > size:
        pil.thumbnail((size, size), Image.Resampling.LANCZOS)
    # Small images stay at their size: the report scales them up with pixelated rendering.
    return pil


def png_uri(pil: Image.Image) -> str:
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail_uri(image: torch.Tensor, size: int = THUMB_SIZE) -> str:
    """``(C, H, W)`` in [0, 1] -> a PNG data URI no larger than ``size`` pixels a side."""
    return png_uri(thumbnail(image, size))


class Gallery:
    """Bounded collection of thumbnails (see the module docstring)."""

    def __init__(self, max_flips: int = 24, orbit_images: int = 3) -> None:
        self.max_flips = max_flips
        self.orbit_images = orbit_images
        self._heap: list[tuple[float, int, dict]] = []
        self._counter = itertools.count()
        self.orbits: list[dict] = []

    def update(
        self,
        ids: list[str],
        names: list[str],
        images: list[torch.Tensor],
        top1: torch.Tensor,
        confidence: torch.Tensor,
        js: torch.Tensor,
        agree: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> None:
        """``images[g]`` is ``(B, C, H, W)`` for element ``g`` (0 = identity); ``top1``,
        ``confidence``, ``js`` and ``agree`` (top-1 as the declared label action expects) are
        ``(G, B)``. Thumbnails are kept as small images and encoded once, in :meth:`to_dict`."""
        originals: dict[int, Image.Image] = {}

        def original(b: int) -> Image.Image:
            if b not in originals:
                originals[b] = thumbnail(images[0][b])
            return originals[b]

        for b, image_id in enumerate(ids):
            label = int(labels[b]) if labels is not None else -1
            if len(self.orbits) < self.orbit_images:
                self.orbits.append(
                    {
                        "image": image_id,
                        "label": label,
                        "elements": [
                            {
                                "transform": name,
                                "top1": int(top1[g, b]),
                                "confidence": float(confidence[g, b]),
                                "thumbnail": original(b) if g == 0 else thumbnail(images[g][b]),
                            }
                            for g, name in enumerate(names)
                        ],
                    }
                )
            for g in range(1, len(names)):
                if agree[g, b]:
                    continue
                key = float(js[g, b])
                if len(self._heap) >= self.max_flips and key <= self._heap[0][0]:
                    continue
                entry = {
                    "image": image_id,
                    "transform": names[g],
                    "label": label,
                    "js_divergence": key,
                    "original": {
                        "top1": int(top1[0, b]),
                        "confidence": float(confidence[0, b]),
                        "thumbnail": original(b),
                    },
                    "transformed": {
                        "top1": int(top1[g, b]),
                        "confidence": float(confidence[g, b]),
                        "thumbnail": thumbnail(images[g][b]),
                    },
                }
                item = (key, next(self._counter), entry)
                if len(self._heap) < self.max_flips:
                    heapq.heappush(self._heap, item)
                else:
                    heapq.heapreplace(self._heap, item)

    def to_dict(self) -> dict:
        """The kept thumbnails as PNG data URIs (see the module docstring)."""
        encoded: dict[int, str] = {}

        def uri(pil: Image.Image) -> str:
            if id(pil) not in encoded:  # an original shared by several flips: encode it once
                encoded[id(pil)] = png_uri(pil)
            return encoded[id(pil)]

        flips = []
        for _, _, entry in sorted(self._heap, key=lambda t: (-t[0], t[1])):
            flips.append(
                {
                    **entry,
                    "original": {
                        **entry["original"],
                        "thumbnail": uri(entry["original"]["thumbnail"]),
                    },
                    "transformed": {
                        **entry["transformed"],
                        "thumbnail": uri(entry["transformed"]["thumbnail"]),
                    },
                }
            )
        orbits = [
            {
                **orbit,
                "elements": [{**e, "thumbnail": uri(e["thumbnail"])} for e in orbit["elements"]],
            }
            for orbit in self.orbits
        ]
        return {"flips": flips, "orbits": orbits}
