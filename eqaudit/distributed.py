"""Audits spread over a Ray cluster: the shards of :mod:`eqaudit.shard`, run as Ray tasks.

``eqaudit check MODEL --ray`` (``pip install 'eqaudit[ray]'``) connects to a Ray cluster
(``--ray-address``, else ``$RAY_ADDRESS``, else a local instance started for the run), splits the
images into N shards (``--shards N``; default one per GPU with ``--device cuda``, else one per
CPU of the cluster, at most one per image), runs ``eqaudit.audit(MODEL, shard=(i, N))`` in one
task per shard, and merges the returned states on the driver: the result equals a single run's
(:mod:`eqaudit.shard`). The model path and the data folder must be readable at the same paths on
every node (shared storage, or a local cluster). Ray's own scheduling, retries and object store
do the work; nothing here is a home-made scheduler.

The same shards run without Ray as independent jobs (a Slurm array, a Kubernetes indexed Job),
each writing its folder; ``eqaudit merge`` then combines them. See docs/scale-out.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from eqaudit.config import AuditConfig
from eqaudit.errors import EqauditError, UsageError, cause_line
from eqaudit.results import AuditResult


def _audit_shard(model: str, config: AuditConfig, tally: Any = None) -> tuple[dict, dict]:
    """One Ray task: audit one shard, return its mergeable state (runs on a worker). With a
    ``tally`` (a :class:`_Tally` actor), report the shard's images done after each batch."""
    from eqaudit.audit import audit

    def progress(done: int, total: int) -> None:
        tally.update.remote(config.shard[0], done, total)  # fire and forget: ordered per caller

    result = audit(model, config=config, progress=progress if tally is not None else None)
    assert result.shard_state is not None
    return result.shard_state


class _Tally:
    """Images done per shard, as the shards report them (a Ray actor on no CPU): progress by
    batch, not by whole shards, which on N equal workers all finish together at the end."""

    def __init__(self) -> None:
        self.shards: dict[int, tuple[int, int]] = {}

    def update(self, shard: int, done: int, total: int) -> None:
        self.shards[shard] = (done, total)

    def read(self) -> dict[int, tuple[int, int]]:
        return self.shards


def _images_done(
    count: int, reported: dict[int, tuple[int, int]], finished: dict[int, int]
) -> tuple[int, int | None]:
    """Images audited so far and in all (None until every shard has said how many it has);
    a finished shard counts from its state, not from a report that may not have arrived."""
    shards = {**reported, **{i: (n, n) for i, n in finished.items()}}
    done = sum(d for d, _ in shards.values())
    return done, sum(t for _, t in shards.values()) if len(shards) == count else None


def audit_on_ray(
    model: str | Path,
    config: AuditConfig,
    *,
    shards: int | None = None,
    address: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> AuditResult:
    """Run the audit of ``model`` with ``config`` as N Ray tasks and merge (module docstring).
    ``progress(done, total)`` gets the images audited over all shards, about twice a second;
    ``total`` is None until every shard has started."""
    started = time.perf_counter()
    try:
        import ray
    except ImportError:
        raise UsageError(
            "--ray needs Ray, which is not installed: pip install 'eqaudit[ray]' (or run the "
            "shards yourself with --shard I/N and eqaudit merge)"
        ) from None
    if not isinstance(model, (str, Path)):
        raise UsageError("--ray audits a model file that every Ray node can read: pass its path")
    if config.shard is not None:
        raise UsageError("--ray makes the shards itself: drop --shard")
    if shards is not None and shards < 1:
        raise UsageError(f"--shards must be at least 1, not {shards}")
    address = address or os.environ.get("RAY_ADDRESS")
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        except Exception as exc:
            first = cause_line(exc, 200)
            raise UsageError(
                f"cannot connect to the Ray cluster{f' at {address}' if address else ''} "
                f"({type(exc).__name__}: {first}): start it with 'ray start --head' or fix "
                "--ray-address"
            ) from None
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = max(1, int(resources.get("CPU", 1)))
        on_gpu = config.device.startswith("cuda")
        if on_gpu and gpus == 0:
            raise UsageError("--ray --device cuda: the Ray cluster has no GPU resources")
        count = shards or (gpus if on_gpu else cpus)
        # The CPUs a task asks Ray for are the threads its runtime runs on (torch's and
        # onnxruntime's: left alone, onnxruntime would take every core of the node in each task).
        threads = config.threads or (1 if on_gpu else max(1, cpus // count))
        # A task runs on one node: Ray would wait for ever for one that no node can hold.
        largest = max(
            (
                int(node["Resources"].get("CPU", 0))
                for node in ray.nodes()
                if node.get("Alive") and (not on_gpu or node["Resources"].get("GPU", 0))
            ),
            default=cpus,
        )
        if threads > largest:
            raise UsageError(
                f"--threads {threads} asks more CPUs per task than a Ray node has ({largest}): "
                f"use --threads {largest} or fewer"
            )
        task = ray.remote(num_cpus=threads, num_gpus=1 if on_gpu else 0)(_audit_shard)
        tally = ray.remote(num_cpus=0)(_Tally).remote() if progress is not None else None
        # Each task sees its own GPU as cuda:0 (Ray sets CUDA_VISIBLE_DEVICES).
        device = "cuda" if on_gpu else config.device
        remaining = [
            task.remote(
                str(model),
                replace(config, shard=(i, count), device=device, threads=threads),
                tally,
            )
            for i in range(1, count + 1)
        ]
        states: list[tuple[dict, dict]] = []
        finished: dict[int, int] = {}
        while remaining:
            done, remaining = ray.wait(remaining, num_returns=1, timeout=0.5)
            for ref in done:
                try:
                    states.append(ray.get(ref))
                except ray.exceptions.RayTaskError as exc:  # a task's own error, as one line
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, (EqauditError, MemoryError)):
                        raise cause from None
                    raise
                info = states[-1][0]["shard"]
                finished[info["index"]] = info["images"]
            if tally is not None:
                reported = ray.get(tally.read.remote()) if remaining else {}
                progress(*_images_done(count, reported, finished))
    finally:
        if started_here:
            ray.shutdown()
    from eqaudit.shard import merge_states

    count = len(states)
    return merge_states(
        states,
        note=f"merged from {count} shards run as Ray tasks (the run time is the whole run's)",
        started=started,
    )
