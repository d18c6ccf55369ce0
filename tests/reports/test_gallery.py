"""The gallery keeps the best-ranked flips and the first orbits whatever the batching, copies to
the host only the images it keeps, and encodes each kept image as its own thumbnail."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import eqaudit.gallery as gallery_module
from eqaudit.gallery import Gallery, thumbnail_uri

G, N = 4, 13  # elements (0 = identity), images


def _stream(seed: int = 0) -> dict:
    """Per-image values of an audit of N images under G elements, ties in JS included."""
    rng = np.random.default_rng(seed)
    js = np.round(rng.random((G, N)), 1)  # few distinct values: ties decide by position
    js[0] = 0.0
    agree = rng.random((G, N)) < 0.4
    agree[0] = True
    return {
        "ids": [f"img{i}" for i in range(N)],
        "names": ["id", "a", "b", "c"],
        "images": [
            torch.rand(N, 3, 5, 5, generator=torch.Generator().manual_seed(g)) for g in range(G)
        ],
        "top1": rng.integers(0, 9, (G, N)),
        "confidence": rng.random((G, N)),
        "js": js,
        "agree": agree,
        "labels": rng.integers(-1, 9, N),
    }


def _fed(s: dict, batch: int, max_flips: int = 5, start: int = 0, stop: int = N) -> Gallery:
    gallery = Gallery(max_flips=max_flips, orbit_images=2)
    for lo in range(start, stop, batch):
        b = slice(lo, min(lo + batch, stop))
        gallery.update(
            s["ids"][b],
            s["names"],
            [image[b] for image in s["images"]],
            s["top1"][:, b],
            s["confidence"][:, b],
            s["js"][:, b],
            s["agree"][:, b],
            torch.from_numpy(s["labels"][b]),
            list(range(b.start, b.stop)),
        )
    return gallery


def test_flips_are_the_best_ranks_and_orbits_the_first_images() -> None:
    s = _stream()
    candidates = [(g, b) for b in range(N) for g in range(1, G) if not s["agree"][g, b]]
    best = sorted(candidates, key=lambda gb: (-s["js"][gb], gb[1] * G + gb[0]))[:5]
    state = _fed(s, batch=3).state()
    assert [f["rank"] for f in state["flips"]] == [[s["js"][g, b], b * G + g] for g, b in best]
    assert [(f["image"], f["transform"]) for f in state["flips"]] == [
        (f"img{b}", s["names"][g]) for g, b in best
    ]
    assert [o["position"] for o in state["orbits"]] == [0, 1]
    for flip, (g, b) in zip(state["flips"], best, strict=True):
        assert flip["label"] == s["labels"][b]
        assert flip["original"]["top1"] == s["top1"][0, b]
        assert flip["transformed"]["confidence"] == s["confidence"][g, b]
        assert flip["original"]["thumbnail"] == thumbnail_uri(s["images"][0][b])
        assert flip["transformed"]["thumbnail"] == thumbnail_uri(s["images"][g][b])
    orbit = state["orbits"][1]
    assert [e["thumbnail"] for e in orbit["elements"]] == [
        thumbnail_uri(s["images"][g][1]) for g in range(G)
    ]


@pytest.mark.parametrize("max_flips", [1, 5, 100])
def test_the_batching_and_sharding_change_nothing(max_flips: int) -> None:
    s = _stream(1)
    whole = json.dumps(_fed(s, N, max_flips).state())
    for batch in (1, 2, 5):
        assert json.dumps(_fed(s, batch, max_flips).state()) == whole
    shards = [_fed(s, 2, max_flips, lo, hi).state() for lo, hi in ((0, 4), (4, 5), (5, N))]
    merged = Gallery.merge(shards, max_flips=max_flips, orbit_images=2)
    assert json.dumps(merged.state()) == whole
    assert merged.to_dict() == _fed(s, 3, max_flips).to_dict()


def test_only_the_kept_images_reach_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    converted: list[int] = []
    to_uint8 = gallery_module.to_uint8

    def counting(images: torch.Tensor) -> torch.Tensor:
        converted.append(images.shape[0])
        return to_uint8(images)

    monkeypatch.setattr(gallery_module, "to_uint8", counting)
    s = _stream(2)
    s["agree"][1:] = False  # every pair flips ...
    s["js"][1:] = np.linspace(0.9, 0.1, N)  # ... and the earlier images flip worse
    _fed(s, batch=4, max_flips=2)
    # Batch 1 keeps 2 flips of image 0 (its original and 2 transformed) and orbits 0 and 1
    # (G images each, sharing image 0's pictures); later batches rank lower: nothing copied.
    assert sum(converted) == 2 * G


def test_kept_pictures_stop_sharing_their_batchs_copy_after_it() -> None:
    # One transfer per batch; from the next batch on each kept picture owns its pixels, so one
    # surviving picture does not keep its whole batch's rows in memory.
    s = _stream(3)
    s["agree"][1, N - 1], s["js"][1, N - 1] = False, 1.0  # the last batch keeps a flip
    gallery = _fed(s, batch=2)
    thumbs = [
        e[side]["thumbnail"] for *_, e in gallery._heap for side in ("original", "transformed")
    ]
    thumbs += [e["thumbnail"] for orbit in gallery.orbits for e in orbit["elements"]]
    pictures = {id(p): p for p in thumbs}.values()
    last = {id(p) for p in gallery._arrived}
    assert last and len(pictures) > len(last)
    for p in pictures:
        if id(p) in last:
            assert p.arrival is gallery._arrived[0].arrival and p.pixels is None
        else:
            assert p.arrival is None and p.pixels.base is None and p.pixels.shape == (3, 5, 5)
