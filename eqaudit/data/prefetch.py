"""Loading image batches ahead of their consumer, on threads, in parallel within each batch.

The engine spends its time in the model (GPU kernels or torch's own CPU threads) while decoding
JPEGs or drawing synthetic scenes is numpy and Pillow work that releases the GIL. So a small pool
of threads loads batch ``k + 1 .. k + ahead`` while the consumer works on batch ``k``, each batch
split into chunks of consecutive positions that the threads take in order.

Guarantees:

* Same batches as loading them one after the other: each chunk writes its own slice of the
  batch's preallocated array, so the pixels are bit-identical whatever the worker count, and
  batches are handed out in order.
* Bounded memory: while the consumer holds batch ``k``, only batches ``k + 1 .. k + ahead`` are
  loading or loaded (``ahead`` = :data:`PREFETCH_BATCHES` by default).
* Errors in place: an exception raised while loading batch ``k`` is raised to the consumer when
  it asks for batch ``k`` (the first failing chunk's, which is the first failing position's),
  never earlier; the batches before it are handed out first.
* Prompt stop: closing the iterator (``.close()``, leaving a ``for`` loop by an exception, or the
  iterator being garbage-collected) cancels the chunks not yet started and joins the threads
  before it returns; at most one chunk per thread (:data:`MAX_CHUNK` images) is finished first.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

PREFETCH_BATCHES = 2  # batches loaded ahead of the one the consumer holds
MAX_DEFAULT_WORKERS = 8
MAX_CHUNK = 8  # images per task at most: bounds the wait when the consumer stops early
_CHUNKS_PER_WORKER = 4  # tasks per thread and batch, so that uneven images balance out
SYSFS_CPUS = Path("/sys/devices/system/cpu")  # Linux: each CPU's topology
CGROUP_ROOT = Path("/sys/fs/cgroup")  # Linux: this process's cgroup (a container's own)

LoadInto = Callable[[range, np.ndarray], None]
Allocate = Callable[[tuple[int, ...]], Any]  # shape -> a float32 buffer that np.asarray views


def cpu_limit() -> int | None:
    """The CPU time this process's cgroup may use, in CPUs rounded up: a container's CPU limit
    (``docker run --cpus``, Kubernetes ``limits.cpu``; cgroup v2 ``cpu.max``, else v1
    ``cpu.cfs_quota_us / cpu.cfs_period_us``). None without a limit.

    A limit is not a CPU set: the process still sees every core of the machine, and runtimes
    that start a thread per core are throttled to a crawl. :func:`usable_cpus` and
    :func:`physical_cpus` count it."""
    candidates = [
        ("cpu.max", None),
        ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us"),
        ("cpu,cpuacct/cpu.cfs_quota_us", "cpu,cpuacct/cpu.cfs_period_us"),
    ]
    for quota_file, period_file in candidates:
        try:
            fields = (CGROUP_ROOT / quota_file).read_text().split()
            if period_file is not None:
                fields.append((CGROUP_ROOT / period_file).read_text().strip())
            quota, period = fields[0], int(fields[1])
            if quota in ("max", "-1") or period <= 0:
                return None
            return max(1, math.ceil(int(quota) / period))
        except (OSError, ValueError, IndexError):
            continue
    return None


def _capped(count: int) -> int:
    limit = cpu_limit()
    return max(1, min(count, limit) if limit is not None else count)


def usable_cpus() -> int:
    """The CPUs this process may run on (``taskset`` and container CPU sets count), no more
    than its CPU limit (:func:`cpu_limit`)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return _capped(cpus)


def physical_cpus() -> int:
    """The physical cores among the CPUs this process may run on (hyperthread siblings count
    once), which is how many threads onnxruntime and PyTorch run a model on by default, no more
    than its CPU limit (:func:`cpu_limit`); the usable CPUs where the topology is not readable."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not on Linux
        return usable_cpus()
    cores = set()
    for cpu in cpus:
        try:
            siblings = SYSFS_CPUS / f"cpu{cpu}" / "topology" / "thread_siblings_list"
            cores.add(siblings.read_text().strip())
        except OSError:
            return usable_cpus()
    return _capped(len(cores))


def default_load_workers() -> int:
    """``min(usable CPUs, 8)``: one loader thread per core the process may run on.

    Beyond about 8 threads the Python-level part of each image (Pillow calls, numpy dispatch,
    held under the GIL) and the engine's own thread limit the gain; on one core, 1 (no threads).
    """
    return max(1, min(usable_cpus(), MAX_DEFAULT_WORKERS))


def chunks(positions: range, workers: int, least: int = 1) -> list[range]:
    """``positions`` cut into consecutive runs: about ``4 x workers`` of them, each of ``least``
    (a source that draws runs of images together asks for longer ones) to :data:`MAX_CHUNK`
    positions."""
    per_task = math.ceil(len(positions) / (workers * _CHUNKS_PER_WORKER))
    size = min(MAX_CHUNK, max(1, least, per_task))
    return [
        range(start, min(positions.stop, start + size))
        for start in range(positions.start, positions.stop, size)
    ]


def load_ahead(
    batches: Sequence[range],
    load_into: LoadInto,
    image_shape: tuple[int, ...],
    workers: int,
    ahead: int = PREFETCH_BATCHES,
    least: int = 1,
    allocate: Allocate | None = None,
) -> Iterator[Any]:
    """Yield, for each range of positions in ``batches``, a float32 array
    ``(len(positions), *image_shape)`` filled by ``load_into(chunk, out)`` calls on ``workers``
    threads; see the module docstring for order, memory, error and shutdown guarantees.

    ``allocate(shape)`` makes each batch's buffer (default ``np.empty`` float32): what it
    returns is what is yielded, and ``np.asarray`` of it must be a writable float32 view of its
    memory (a CPU tensor in page-locked memory, for a GPU to copy from without waiting).

    ``load_into(chunk, out)`` writes the images at the positions ``chunk`` into ``out`` (shape
    ``(len(chunk), *image_shape)``). It runs on several threads at once, for disjoint chunks, so
    it must not touch shared mutable state, including the process-global ``warnings`` filters
    (``warnings.catch_warnings`` is not thread-safe: the owner sets filters around the whole
    iteration instead). It should avoid torch kernels: every thread that enters torch's OpenMP
    parallel regions gets its own team of threads.

    ``least``: the shortest run worth one task (see :func:`chunks`).

    Nothing starts until the first batch is asked for. Use it under ``contextlib.closing`` (or
    close it) when the caller needs the threads stopped at a given point.
    """
    if workers < 1 or ahead < 0:
        raise ValueError(f"need workers >= 1 and ahead >= 0, got {workers} and {ahead}")
    upcoming = iter(batches)
    pending: deque[tuple[Any, list[Future[None]]]] = deque()
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eqaudit-load")

    def submit_next() -> None:
        positions = next(upcoming, None)
        if positions is None:
            return
        shape = (len(positions), *image_shape)
        out = allocate(shape) if allocate else np.empty(shape, dtype=np.float32)
        view, offset = np.asarray(out), positions.start
        futures = [
            executor.submit(load_into, chunk, view[chunk.start - offset : chunk.stop - offset])
            for chunk in chunks(positions, workers, least)
        ]
        pending.append((out, futures))

    try:
        for _ in range(ahead + 1):
            submit_next()
        while pending:
            out, futures = pending.popleft()
            for future in futures:
                future.result()  # re-raises the chunk's exception, as the consumer's error
            del futures
            yield out
            del out  # the consumer owns it now; do not keep it alive during the next wait
            submit_next()
    finally:
        # Queued chunks are dropped; the ones running finish; then every thread is joined.
        executor.shutdown(wait=True, cancel_futures=True)
