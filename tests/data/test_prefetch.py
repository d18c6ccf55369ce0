"""Batches loaded ahead on threads: same batches as loading in order, bounded, stoppable."""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eqaudit.data import (
    PREFETCH_BATCHES,
    DataDescription,
    ImageBatch,
    ImageSource,
    default_load_workers,
    open_images,
    prefetch,
    synthetic_images,
)
from eqaudit.data.prefetch import MAX_CHUNK, chunks, load_ahead
from eqaudit.data.sources import _Geometry
from eqaudit.errors import DataError, UsageError

SHARDS = [(0, None), (3, 17), (5, 6), (20, 40)]


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("eqaudit-load")]


def take(batches: Iterator[ImageBatch]) -> list[ImageBatch]:
    return list(batches)


def assert_same_batches(got: list[ImageBatch], expected: list[ImageBatch]) -> None:
    """Equal batch by batch: pixel bits, dtype, labels, ids."""
    assert [b.ids for b in got] == [b.ids for b in expected]
    for a, b in zip(got, expected, strict=True):
        assert a.pixels.dtype == b.pixels.dtype == torch.float32
        assert a.pixels.shape == b.pixels.shape
        assert torch.equal(a.pixels.view(torch.int32), b.pixels.view(torch.int32))
        assert (a.labels is None) == (b.labels is None)
        if a.labels is not None:
            assert torch.equal(a.labels, b.labels)


class RecordingSource(ImageSource):
    """Image ``i`` is a 1x2x2 image of value ``i``; records which positions started loading."""

    def __init__(self, count: int, delay: float = 0.0, fail_at: tuple[int, ...] = ()) -> None:
        super().__init__(
            geometry=_Geometry((2, 2), 0, 1, "crop"),
            description=DataDescription("array", None, count, synthetic=False, labelled=True),
            ids=[f"img{i}" for i in range(count)],
            labels=torch.arange(count) % 3,
            class_names=None,
        )
        self.delay = delay
        self.fail_at = fail_at
        self.started: list[int] = []
        self._lock = threading.Lock()

    def _load_into(self, positions: range, out: np.ndarray) -> None:
        for i, position in enumerate(positions):
            with self._lock:
                self.started.append(position)
            time.sleep(self.delay)
            if position in self.fail_at:
                raise DataError(f"image {position} is broken")
            out[i] = position

    def settled(self, timeout: float = 5.0) -> list[int]:
        """Sorted started positions, once no new load has started for 0.2 s."""
        deadline = time.monotonic() + timeout
        seen = -1
        while time.monotonic() < deadline and seen != len(self.started):
            seen = len(self.started)
            time.sleep(0.2)
        return sorted(self.started)


# -- the plan -------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_cpu_limit(monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> None:
    """The CPU counts below are this module's, not a container's that runs the tests."""
    monkeypatch.setattr(prefetch, "CGROUP_ROOT", tmp_path_factory.mktemp("no-cgroup"))


def test_default_workers_is_usable_cpus_capped_at_8(monkeypatch: pytest.MonkeyPatch) -> None:
    for cpus, expected in [(1, 1), (2, 2), (5, 5), (8, 8), (64, 8)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _, n=cpus: set(range(n)), raising=False)
        assert default_load_workers() == expected


def test_physical_cpus_count_hyperthread_siblings_once(monkeypatch, tmp_path) -> None:
    # Four usable CPUs, two cores of two hyperthreads each, as Linux describes them.
    for cpu, siblings in enumerate(["0,2", "1,3", "0,2", "1,3"]):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(siblings + "\n")
    monkeypatch.setattr(prefetch, "SYSFS_CPUS", tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    assert prefetch.physical_cpus() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 2}, raising=False)  # one core
    assert prefetch.physical_cpus() == 1
    # A CPU whose topology cannot be read: every usable CPU counts.
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3, 4}, raising=False)
    assert prefetch.physical_cpus() == 5


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2, docker --cpus 1.5: rounded up
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, None),  # no limit
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),  # not in a cgroup that says anything
    ],
)
def test_cpu_limit_is_read_from_the_cgroup(monkeypatch, tmp_path, files, limit) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(prefetch, "CGROUP_ROOT", tmp_path)
    assert prefetch.cpu_limit() == limit


def test_a_cpu_limit_caps_every_cpu_count(monkeypatch, tmp_path) -> None:
    (tmp_path / "cpu.max").write_text("200000 100000\n")  # 2 CPUs of a 64-core machine
    monkeypatch.setattr(prefetch, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(64)), raising=False)
    assert prefetch.usable_cpus() == 2
    assert prefetch.physical_cpus() == 2
    assert default_load_workers() == 2


def test_chunks_cover_the_batch_in_order() -> None:
    for positions, workers in [(range(5, 305), 8), (range(0, 3), 8), (range(7, 40), 2)]:
        runs = chunks(positions, workers)
        assert [p for run in runs for p in run] == list(positions)
        assert all(1 <= len(run) <= MAX_CHUNK for run in runs)
    assert [len(run) for run in chunks(range(32), 2)] == [4] * 8  # 4 runs per worker
    assert [len(run) for run in chunks(range(3), 8)] == [1, 1, 1]
    # A source that draws runs together (synthetic: 8) gets runs of that length, the last shorter.
    assert [len(run) for run in chunks(range(32), 8, least=8)] == [8] * 4
    assert [len(run) for run in chunks(range(3, 23), 8, least=8)] == [8, 8, 4]
    assert open_images(None, size=(4, 4), num_images=2).run_length == 8


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_bad_worker_counts_are_usage_errors(workers: object) -> None:
    source = open_images(None, size=(4, 4), num_images=2)
    with pytest.raises(UsageError, match="loader workers must be a positive integer"):
        source.iter_batches(2, workers=workers)  # type: ignore[arg-type]


# -- same batches as loading in order -------------------------------------------------------------
@pytest.mark.parametrize("workers", [2, 3, 8])
@pytest.mark.parametrize("batch_size", [1, 5, 16, 64])
def test_synthetic_batches_match_the_generator(workers: int, batch_size: int) -> None:
    source = open_images(None, size=(12, 10), margin=2, num_images=23, seed=4)
    for start, stop in SHARDS:
        got = take(source.iter_batches(batch_size, start, stop, workers=workers))
        assert_same_batches(got, take(source.iter_batches(batch_size, start, stop, workers=1)))
        first, last = min(start, 23), min(stop or 23, 23)
        # Oracle: image i of the synthetic set depends on (seed, i) only.
        expected = synthetic_images(last - first, (16, 14), 3, seed=4, start=first)
        pixels = torch.cat([b.pixels for b in got]) if got else expected
        assert torch.equal(pixels, expected)
        assert [i for b in got for i in b.ids] == [f"synthetic[{i}]" for i in range(first, last)]


def _mixed_folder(root: Path) -> Path:
    """21 images of several sizes and kinds in two class folders (and one outside)."""
    rng = np.random.default_rng(0)
    for i in range(21):
        folder = root / ("cat", "dog", "misc")[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(6, 30, size=2))
        values = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        kind = i % 5
        if kind == 0:
            Image.fromarray(values).save(folder / f"{i:02d}.png")
        elif kind == 1:
            Image.fromarray(values).save(folder / f"{i:02d}.jpg", quality=85)
        elif kind == 2:
            Image.fromarray(values[..., 0]).save(folder / f"{i:02d}.png")
        elif kind == 3:
            rgba = np.concatenate([values, values[..., 1:2]], axis=-1)
            Image.fromarray(rgba, "RGBA").save(folder / f"{i:02d}.png")
        else:
            image = Image.fromarray(values)
            exif = image.getexif()
            exif[0x0112] = 6
            image.save(folder / f"{i:02d}.png", exif=exif)
    (root / "labels.txt").write_text("cat\ndog\n")
    return root


@pytest.mark.parametrize("workers", [2, 3, 8])
@pytest.mark.parametrize(("resize", "channels"), [("crop", 3), ("letterbox", 1), ("stretch", 3)])
def test_folder_batches_match_loading_in_order(
    tmp_path: Path, workers: int, resize: str, channels: int
) -> None:
    root = _mixed_folder(tmp_path)
    source = open_images(
        root, size=(9, 11), margin=1, resize=resize, channels=channels, labels=root / "labels.txt"
    )
    assert len(source) == 21 and source.labels is not None
    for batch_size in (1, 4, 64):
        for start, stop in SHARDS:
            assert_same_batches(
                take(source.iter_batches(batch_size, start, stop, workers=workers)),
                take(source.iter_batches(batch_size, start, stop, workers=1)),
            )


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_array_batches_match_loading_in_order(tmp_path: Path, workers: int) -> None:
    rng = np.random.default_rng(1)
    np.save(tmp_path / "a.npy", rng.integers(0, 256, (25, 13, 15, 3), dtype=np.uint8))
    images = rng.random((22, 4, 12, 12)).astype(np.float32)  # RGBA, composited
    np.savez(tmp_path / "b.npz", images=images, labels=rng.integers(0, 5, 22))
    sources = [
        open_images(tmp_path / "a.npy", size=(10, 10), margin=2),  # memory-mapped
        open_images(tmp_path / "a.npy", size=(8, 8), channels=1, num_images=17, seed=3),
        open_images(tmp_path / "b.npz", size=(14, 14), resize="letterbox"),
    ]
    for source in sources:
        for batch_size in (1, 6, 64):
            for start, stop in SHARDS:
                assert_same_batches(
                    take(source.iter_batches(batch_size, start, stop, workers=workers)),
                    take(source.iter_batches(batch_size, start, stop, workers=1)),
                )


def test_labels_and_pixels_follow_positions() -> None:
    source = RecordingSource(10)
    batches = take(source.iter_batches(4, 1, 9, workers=3))
    assert [b.ids for b in batches] == [[f"img{i}" for i in r] for r in (range(1, 5), range(5, 9))]
    for batch, first in zip(batches, (1, 5), strict=True):
        positions = torch.arange(first, first + 4, dtype=torch.float32)
        assert torch.equal(batch.pixels[:, 0, 0, 0], positions)
        assert torch.equal(batch.labels, torch.arange(first, first + 4) % 3)


# -- bounded, stoppable ---------------------------------------------------------------------------
def test_at_most_two_batches_are_loaded_ahead() -> None:
    assert PREFETCH_BATCHES == 2
    source = RecordingSource(40)
    batches = source.iter_batches(4, workers=2)
    time.sleep(0.1)
    assert source.started == [] and loader_threads() == []  # nothing before the first batch
    next(batches)
    assert source.settled() == list(range(12))  # batch 0 handed out, batches 1 and 2 ahead
    next(batches)
    assert source.settled() == list(range(16))
    batches.close()  # type: ignore[attr-defined]
    assert loader_threads() == []


@pytest.mark.parametrize("how", ["close", "break", "exception", "interrupt"])
def test_stopping_early_stops_the_threads_at_once(how: str) -> None:
    source = RecordingSource(400, delay=0.02)
    started = time.monotonic()
    if how == "close":
        batches = source.iter_batches(4, workers=2)
        next(batches)
        batches.close()  # type: ignore[attr-defined]
    elif how == "break":
        for _ in source.iter_batches(4, workers=2):
            break
    else:
        error = ValueError if how == "exception" else KeyboardInterrupt
        with pytest.raises(error):
            for _ in source.iter_batches(4, workers=2):
                raise error("the engine failed")
    assert time.monotonic() - started < 2.0  # one image per thread at most is finished
    assert loader_threads() == []
    loaded = len(source.started)
    assert loaded <= (1 + PREFETCH_BATCHES) * 4
    time.sleep(0.2)
    assert len(source.started) == loaded  # no work goes on in the background


@pytest.mark.parametrize("workers", [1, 2, 8])
def test_a_load_error_surfaces_at_its_own_batch(workers: int) -> None:
    source = RecordingSource(40, fail_at=(9, 10))  # batch 2 of size 4: positions 8..11
    received = []
    with pytest.raises(DataError) as caught:
        for batch in source.iter_batches(4, workers=workers):
            received.append(batch.ids)
            time.sleep(0.05)  # the threads reach batch 2 while batch 0 is in use
    assert received == [[f"img{i}" for i in range(j, j + 4)] for j in (0, 4)]
    assert str(caught.value) == "image 9 is broken"  # the first failing position
    assert loader_threads() == []
    assert max(source.started) < 20  # never more than two batches past the failing one


def test_a_file_gone_bad_fails_at_its_batch_as_before(tmp_path: Path) -> None:
    for i in range(12):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"{i:02d}.png")
    source = open_images(tmp_path, size=(8, 8))
    (tmp_path / "07.png").write_bytes(b"not an image any more")

    def run(workers: int) -> tuple[list[list[str]], DataError]:
        received = []
        with pytest.raises(DataError) as caught:
            for batch in source.iter_batches(3, workers=workers):
                received.append(batch.ids)
        return received, caught.value

    ids, error = run(1)
    assert ids == [["00.png", "01.png", "02.png"], ["03.png", "04.png", "05.png"]]
    assert str(error) == (
        "'07.png' can no longer be read (cannot identify image file): "
        "do not change the data folder during an audit"
    )
    for workers in (2, 8):
        threaded_ids, threaded_error = run(workers)
        assert threaded_ids == ids
        assert type(threaded_error) is DataError and str(threaded_error) == str(error)
        assert threaded_error.__cause__ is None and threaded_error.__suppress_context__
        assert loader_threads() == []


def test_bomb_warning_stays_ignored_on_loader_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(8):
        Image.fromarray(np.full((40, 40, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
    source = open_images(tmp_path, size=(8, 8))
    # 1600 pixels between the limit and twice the limit: Pillow warns, our own check refuses.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError, match=r"'0.png' can no longer be read \(40x40 pixels"):
            take(source.iter_batches(2, workers=4))
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []
    assert warnings.filters == filters  # restored once the threads are gone
    assert loader_threads() == []


def test_load_ahead_alone_yields_filled_arrays_in_order() -> None:
    def load_into(positions: range, out: np.ndarray) -> None:
        out[:] = np.asarray(positions, dtype=np.float32)[:, None]

    batches = [range(0, 5), range(5, 7), range(7, 20)]
    arrays = list(load_ahead(batches, load_into, (2,), workers=3, ahead=1))
    assert [a.shape for a in arrays] == [(5, 2), (2, 2), (13, 2)]
    assert np.array_equal(np.concatenate(arrays)[:, 1], np.arange(20, dtype=np.float32))
    with pytest.raises(ValueError, match="workers >= 1"):
        next(load_ahead(batches, load_into, (2,), workers=0))


def test_load_ahead_fills_and_yields_the_buffers_allocate_makes() -> None:
    def load_into(positions: range, out: np.ndarray) -> None:
        out[:] = np.asarray(positions, dtype=np.float32)[:, None]

    made: list[torch.Tensor] = []

    def allocate(shape: tuple[int, ...]) -> torch.Tensor:
        made.append(torch.full(shape, -1.0))
        return made[-1]

    batches = [range(0, 5), range(5, 7), range(7, 20)]
    got = list(load_ahead(batches, load_into, (2,), workers=3, ahead=1, allocate=allocate))
    assert [g is m for g, m in zip(got, made, strict=True)] == [True] * 3  # the same objects
    assert torch.equal(torch.cat(got)[:, 1], torch.arange(20, dtype=torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
@pytest.mark.parametrize("workers", [1, 3])
def test_pinned_batches_are_pinned_and_the_same(workers: int) -> None:
    source = open_images(None, size=(12, 10), margin=2, num_images=13, seed=4)
    pinned = take(source.iter_batches(4, workers=workers, pin=True))
    assert all(b.pixels.is_pinned() for b in pinned)
    assert_same_batches(pinned, take(source.iter_batches(4, workers=1)))
