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
Only the images a selection keeps at the end of a batch are copied to the host, as uint8
``round(255 x)`` at their own size (less memory than one batch of model inputs), in one transfer
per batch; from the next batch on each kept image holds its own array, so memory is bounded by
the pictures kept. They are scaled down and encoded once, when the gallery is written, so a flip
that a worse one later replaces costs no Pillow work.
"""

from __future__ import annotations

import base64
import heapq
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from eqaudit.data.prefetch import default_load_workers

THUMB_SIZE = 96
_SIDES = ("original", "transformed")  # the two pictures of a flip


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``(..., C, H, W)`` in [0, 1] -> uint8 ``round(255 x)``, on the images' own device."""
    return images.detach().clamp(0, 1).mul_(255).round_().to(torch.uint8)


def thumbnail_of_array(array: np.ndarray, size: int = THUMB_SIZE) -> Image.Image:
    """uint8 ``(C, H, W)`` -> a Pillow image no larger than ``size`` pixels a side."""
    pil = (
        Image.fromarray(array[0], "L")
        if array.shape[0] == 1
        else Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), "RGB")
    )
    if max(pil.size) > size:
        pil.thumbnail((size, size), Image.Resampling.LANCZOS)
    # Small images stay at their size: the report scales them up with pixelated rendering.
    return pil


def thumbnail(image: torch.Tensor, size: int = THUMB_SIZE) -> Image.Image:
    """``(C, H, W)`` in [0, 1] -> a Pillow image no larger than ``size`` pixels a side."""
    return thumbnail_of_array(to_uint8(image).cpu().numpy(), size)


def png_uri(pil: Image.Image) -> str:
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail_uri(image: torch.Tensor, size: int = THUMB_SIZE) -> str:
    """``(C, H, W)`` in [0, 1] -> a PNG data URI no larger than ``size`` pixels a side."""
    return png_uri(thumbnail(image, size))


class _Arrival:
    """The uint8 pixels of one batch's kept pictures, rows in order, on the host or on their way
    there: a copy from a GPU into pinned memory with the CUDA event that marks its end (None
    when the pixels are already on the host)."""

    __slots__ = ("event", "rows")

    def __init__(self, rows: torch.Tensor, event: torch.cuda.Event | None) -> None:
        self.rows, self.event = rows, event

    def row(self, i: int) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.rows[i].numpy()


class _Picture:
    """One kept image: element ``g``'s image ``b`` of the batch that offered it; its uint8
    pixels (row ``row`` of an :class:`_Arrival`) are copied at the end of that batch without
    waiting for the device, then (:meth:`settle`) into an array of its own, its data URI made
    when the gallery is first written. An original shared by several flips (and its orbit) is
    one picture, encoded once."""

    __slots__ = ("arrival", "b", "g", "pixels", "row", "uri")

    def __init__(self, g: int, b: int) -> None:
        self.g, self.b = g, b
        self.arrival: _Arrival | None = None
        self.row = 0
        self.pixels: np.ndarray | None = None
        self.uri: str | None = None

    def settle(self) -> None:
        """Own its pixels, so that the batch's other rows can be freed."""
        if self.arrival is not None:
            self.pixels = self.arrival.row(self.row).copy()
            self.arrival = None

    def data_uri(self) -> str:
        if self.uri is None:
            self.settle()
            self.uri = png_uri(thumbnail_of_array(self.pixels))  # type: ignore[arg-type]
            self.pixels = None
        return self.uri


class Images(Protocol):
    """One element's images of a batch: ``[b]`` is image ``b``, ``(C, H, W)``."""

    def __getitem__(self, b: int) -> torch.Tensor: ...


def _uri(thumb: _Picture | str) -> str:
    return thumb if isinstance(thumb, str) else thumb.data_uri()  # str: merged from a state


class Gallery:
    """Bounded collection of thumbnails (see the module docstring)."""

    def __init__(self, max_flips: int = 24, orbit_images: int = 3) -> None:
        self.max_flips = max_flips
        self.orbit_images = orbit_images
        # Min-heap of (JS, -sequence, entry): the root is the flip to drop first (the smallest
        # JS; among equal JS the latest), so ties keep the earliest flips, whatever the batching.
        self._heap: list[tuple[float, int, dict]] = []
        self.orbits: list[dict] = []
        self._arrived: list[_Picture] = []  # the last batch's pictures, still sharing its rows

    def update(
        self,
        ids: list[str],
        names: list[str],
        images: Sequence[Images],
        top1: np.ndarray | torch.Tensor,
        confidence: np.ndarray | torch.Tensor,
        js: np.ndarray | torch.Tensor,
        agree: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor | None,
        positions: list[int] | np.ndarray | None = None,
    ) -> None:
        """``images[g][b]`` is image ``b`` under element ``g`` (0 = identity), ``(C, H, W)`` on
        any device (``images[g]`` a ``(B, C, H, W)`` tensor, or anything indexed alike);
        ``top1``, ``confidence``, ``js`` and ``agree`` (top-1 as the declared label action
        expects) are ``(G, B)`` host arrays (or CPU tensors); ``positions`` are the images'
        places in the audited set (default: in order from 0).

        The flips kept after a batch are the ``max_flips`` best ranks among those kept before
        and this batch's, whatever order they are offered in: the batch's candidates are
        screened against the heap's root at once, and only the best few are pushed."""
        top1, confidence, js, agree = (np.asarray(a) for a in (top1, confidence, js, agree))
        g = len(names)
        where = np.arange(len(ids)) if positions is None else np.asarray(positions)
        label = np.asarray(labels).tolist() if labels is not None else [-1] * len(ids)
        pictures: dict[tuple[int, int], _Picture] = {}

        def picture(gi: int, b: int) -> _Picture:
            if (gi, b) not in pictures:
                pictures[gi, b] = _Picture(gi, b)
            return pictures[gi, b]

        new_orbits = []
        for b in np.flatnonzero(where < self.orbit_images).tolist():
            new_orbits.append(
                {
                    "position": int(where[b]),
                    "image": ids[b],
                    "label": int(label[b]),
                    "elements": [
                        {
                            "transform": name,
                            "top1": int(top1[gi, b]),
                            "confidence": float(confidence[gi, b]),
                            "thumbnail": picture(gi, b),
                        }
                        for gi, name in enumerate(names)
                    ],
                }
            )
        self.orbits.extend(new_orbits)

        flip_g, flip_b = np.nonzero(~agree[1:g].astype(bool))
        flip_g = flip_g + 1
        key = js[flip_g, flip_b].astype(np.float64)
        sequence = where[flip_b].astype(np.int64) * g + flip_g
        if len(self._heap) >= self.max_flips and key.size:
            # rank = (JS, -sequence) must beat the root's to enter a full heap
            root_key, root_negative = self._heap[0][:2]
            beats = (key > root_key) | ((key == root_key) & (-sequence > root_negative))
            flip_g, flip_b, key, sequence = (a[beats] for a in (flip_g, flip_b, key, sequence))
        best = np.lexsort((sequence, -key))[: self.max_flips]  # best rank first
        for i in best.tolist():
            gi, b = int(flip_g[i]), int(flip_b[i])
            rank = (float(key[i]), -int(sequence[i]))
            if len(self._heap) >= self.max_flips and rank <= self._heap[0][:2]:
                break  # the rest rank lower still
            entry = {
                "image": ids[b],
                "transform": names[gi],
                "label": int(label[b]),
                "js_divergence": rank[0],
                "original": {
                    "top1": int(top1[0, b]),
                    "confidence": float(confidence[0, b]),
                    "thumbnail": picture(0, b),
                },
                "transformed": {
                    "top1": int(top1[gi, b]),
                    "confidence": float(confidence[gi, b]),
                    "thumbnail": picture(gi, b),
                },
            }
            if len(self._heap) < self.max_flips:
                heapq.heappush(self._heap, (*rank, entry))
            else:
                heapq.heapreplace(self._heap, (*rank, entry))
        self._fetch(images, pictures, new_orbits)

    def _fetch(
        self, images: Sequence[Images], pictures: dict[tuple[int, int], _Picture], orbits: list
    ) -> None:
        """Copy to the host the pixels of this batch's ``pictures`` that are still kept (by a
        flip in the heap or a new orbit): gathered and converted to uint8 on the images' device
        in one kernel each, then one transfer, which on a GPU does not wait for the work queued
        before it (the next batch's forward): the pictures read it when they are encoded."""
        # The previous batch's pictures take their own copies (its transfer was queued a batch
        # ago: it is done), so that a batch's rows do not stay in memory for the one picture
        # that outlives the others.
        for picture in self._arrived:
            picture.settle()
        self._arrived = []
        kept = {id(t) for t in self._thumbnails(orbits)}
        chosen = sorted((p for p in pictures.values() if id(p) in kept), key=lambda p: (p.g, p.b))
        if not chosen:
            return
        # Views stacked, not an index tensor: a tensor made from a list on a GPU is a copy that
        # waits for the device.
        rows = to_uint8(torch.stack([images[p.g][p.b] for p in chosen]))
        event = None
        if rows.device.type == "cuda":
            stream = torch.cuda.current_stream(rows.device)  # where the copy runs, on any GPU
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            rows = host.copy_(rows, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        arrival = _Arrival(rows.cpu(), event)
        for i, p in enumerate(chosen):
            p.arrival, p.row = arrival, i
        self._arrived = chosen

    def to_dict(self) -> dict:
        """The kept thumbnails as PNG data URIs (see the module docstring)."""
        return self.state(with_rank=False)

    def _thumbnails(self, orbits: list[dict]) -> list[_Picture | str]:
        """The thumbnails of the flips in the heap and of ``orbits`` (a picture shared by
        several places comes once per place)."""
        thumbs = [e[side]["thumbnail"] for *_, e in self._heap for side in _SIDES]
        return thumbs + [e["thumbnail"] for orbit in orbits for e in orbit["elements"]]

    def _encode_pending(self) -> None:
        """Encode every kept picture not encoded yet, on threads: Pillow's resampling and PNG
        encoder release the GIL, and each picture is its own (the same bytes as one by one)."""
        pending = list(
            {
                id(t): t
                for t in self._thumbnails(self.orbits)
                if isinstance(t, _Picture) and t.uri is None
            }.values()
        )
        workers = min(len(pending), default_load_workers())
        if workers < 2:
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="eqaudit-png") as pool:
            for _ in pool.map(_Picture.data_uri, pending):
                pass

    def state(self, with_rank: bool = True) -> dict:
        """JSON-able: flips worst first (with their rank keys when ``with_rank``), orbits in
        order; thumbnails as PNG data URIs."""
        self._encode_pending()
        flips = []
        for js, negative_sequence, entry in sorted(self._heap, key=lambda t: (-t[0], -t[1])):
            flip = {
                **entry,
                "original": {
                    **entry["original"],
                    "thumbnail": _uri(entry["original"]["thumbnail"]),
                },
                "transformed": {
                    **entry["transformed"],
                    "thumbnail": _uri(entry["transformed"]["thumbnail"]),
                },
            }
            if with_rank:
                flip["rank"] = [js, -negative_sequence]
            flips.append(flip)
        orbits = []
        for orbit in sorted(self.orbits, key=lambda o: o["position"]):
            kept = {k: v for k, v in orbit.items() if with_rank or k != "position"}
            kept["elements"] = [{**e, "thumbnail": _uri(e["thumbnail"])} for e in orbit["elements"]]
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
