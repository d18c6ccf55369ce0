"""What changed, in pictures: thumbnails kept during an audit for the report.

The engine offers every (image, element) pair; the gallery keeps, with bounded memory,

* ``flips``: the pairs whose top-1 class changed, worst first (largest JS divergence), at most
  ``max_flips``, each with the thumbnail of the original and of the transformed image;
* ``orbits``: the first ``orbit_images`` images under every element of the battery.

Selection is a function of the whole image set, not of the batching: a flip's rank is
``(-JS, position * G + element)`` with ``position`` the image's place in the audited set, and
orbits are the images at positions ``0 .. orbit_images - 1``. So the galleries of shards merge
(:meth:`Gallery.merge` on their :meth:`Gallery.state`) into the gallery of a single run.

Thumbnails are the pixel-space images (after resizing, before normalisation) as small PNG data
URIs, so a report can be rendered later from ``gallery.json`` without re-running the model.
"""

from __future__ import annotations

import base64
import heapq
import io

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
        # Min-heap of (JS, -sequence, entry): the root is the flip to drop first (the smallest
        # JS; among equal JS the latest), so ties keep the earliest flips, whatever the batching.
        self._heap: list[tuple[float, int, dict]] = []
        self.orbits: list[dict] = []
        self._encoded: list[dict] | None = None  # flips merged from states: already encoded

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
        positions: list[int] | None = None,
    ) -> None:
        """``images[g]`` is ``(B, C, H, W)`` for element ``g`` (0 = identity); ``top1``,
        ``confidence``, ``js`` and ``agree`` (top-1 as the declared label action expects) are
        ``(G, B)``; ``positions`` are the images' places in the audited set (default: in order
        from 0). Thumbnails are kept as small images and encoded once, in :meth:`to_dict`."""
        if positions is None:
            positions = list(range(len(ids)))
        originals: dict[int, Image.Image] = {}

        def original(b: int) -> Image.Image:
            if b not in originals:
                originals[b] = thumbnail(images[0][b])
            return originals[b]

        for b, image_id in enumerate(ids):
            label = int(labels[b]) if labels is not None else -1
            if positions[b] < self.orbit_images:
                self.orbits.append(
                    {
                        "position": positions[b],
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
                rank = (key, -(positions[b] * len(names) + g))
                if len(self._heap) >= self.max_flips and rank <= self._heap[0][:2]:
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
                item = (*rank, entry)
                if len(self._heap) < self.max_flips:
                    heapq.heappush(self._heap, item)
                else:
                    heapq.heapreplace(self._heap, item)

    def to_dict(self) -> dict:
        """The kept thumbnails as PNG data URIs (see the module docstring)."""
        return self.state(with_rank=False)

    def state(self, with_rank: bool = True) -> dict:
        """JSON-able: flips worst first (with their rank keys when ``with_rank``), orbits in
        order; thumbnails as PNG data URIs."""
        encoded: dict[int, str] = {}

        def uri(pil: Image.Image | str) -> str:
            if isinstance(pil, str):  # merged from a state: already a data URI
                return pil
            if id(pil) not in encoded:  # an original shared by several flips: encode it once
                encoded[id(pil)] = png_uri(pil)
            return encoded[id(pil)]

        flips = []
        for js, negative_sequence, entry in sorted(self._heap, key=lambda t: (-t[0], -t[1])):
            flip = {
                **entry,
                "original": {**entry["original"], "thumbnail": uri(entry["original"]["thumbnail"])},
                "transformed": {
                    **entry["transformed"],
                    "thumbnail": uri(entry["transformed"]["thumbnail"]),
                },
            }
            if with_rank:
                flip["rank"] = [js, -negative_sequence]
            flips.append(flip)
        orbits = []
        for orbit in sorted(self.orbits, key=lambda o: o["position"]):
            kept = {k: v for k, v in orbit.items() if with_rank or k != "position"}
            kept["elements"] = [{**e, "thumbnail": uri(e["thumbnail"])} for e in orbit["elements"]]
            orbits.append(kept)
        return {"flips": flips, "orbits": orbits}

    @classmethod
    def merge(cls, states: list[dict], max_flips: int = 24, orbit_images: int = 3) -> Gallery:
        """The gallery of a single run over the union of the shards that gave ``states``."""
        gallery = cls(max_flips, orbit_images)
        for state in states:
            for flip in state["flips"]:
                js, sequence = flip["rank"]
                entry = {k: v for k, v in flip.items() if k != "rank"}
                gallery._heap.append((float(js), -int(sequence), entry))
            gallery.orbits.extend(state["orbits"])
        gallery._heap = sorted(gallery._heap, key=lambda t: (-t[0], -t[1]))[:max_flips]
        heapq.heapify(gallery._heap)
        gallery.orbits = sorted(gallery.orbits, key=lambda o: o["position"])[:orbit_images]
        return gallery
