"""Sharded audits: audit a deterministic slice of the images, save the engine's state, merge.

``eqaudit check ... --shard I/N -o DIR`` audits the I-th of N contiguous slices of the image set
(the same images, in the same order, as a single run would see; positions ``floor((I-1) n / N)``
to ``floor(I n / N) - 1``) and writes, beside the slice's own report, its state:

* ``shard-state.json``: format and version, the shard, the run's *context* (every part of the
  summary that does not come from the images: model, preprocessing, transforms, data, options),
  and the engine's accumulators (exact sums, counts, histograms, maxima; see
  :mod:`eqaudit.metrics.accumulators`), gallery candidates and notes;
* ``shard-state.npz``: the per-image predictions and the channel-map moment matrices, as plain
  arrays (read with ``allow_pickle=False``: a state file never runs code).

``eqaudit merge DIR...`` checks that the shards belong to one audit (same context apart from the
run, every index 1..N exactly once), adds their states and builds the result with the same code
as a single run (:func:`eqaudit.audit.build_result`). Sums are exact and the gallery, the
channel-map split and the order of predictions depend on image positions only, so the merged
summary (apart from its ``run`` block), CSVs and gallery equal a single run's, bit for bit. The
one exception: channel-map moments (``--channel-map``) are float64 matrix sums that differ in the
last bits when batches are grouped differently, and the ridge solve (condition number up to
``1 + C / ridge``) amplifies that: fitted errors agree to ~1e-9 relative, not bit for bit.
"""

from __future__ import annotations

import json
import time
import zipfile
import zlib
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from eqaudit.errors import DataError, UsageError
from eqaudit.results import AuditResult, json_ready

if TYPE_CHECKING:
    from eqaudit.audit import Engine

STATE_JSON = "shard-state.json"
STATE_NPZ = "shard-state.npz"
FORMAT = "eqaudit-shard"
VERSION = 1


def shard_range(count: int, index: int, total: int) -> range:
    """Positions of the ``index``-th (1-based) of ``total`` contiguous slices of ``count``."""
    return range((index - 1) * count // total, index * count // total)


def _axis_grid(saved: dict) -> Any:
    """A saved :class:`eqaudit.grids.AxisGrid` (``free`` absent from older shards: unknown)."""
    from eqaudit.grids import AxisGrid

    free = saved.get("free")
    return AxisGrid(saved["n"], saved["stride"], saved["offset"], tuple(free) if free else None)


# -- saving ----------------------------------------------------------------------------------------
def _grid_state(grid: Any) -> dict | None:
    if grid is None:
        return None
    return {
        axis: {
            "n": g.n,
            "stride": g.stride,
            "offset": g.offset,
            "free": None if g.free is None else list(g.free),
        }
        for axis, g in (("h", grid.h), ("w", grid.w))
    }


def engine_state(engine: Engine) -> tuple[dict, dict[str, np.ndarray]]:
    """The engine's mergeable state: a JSON-able dict and named arrays."""
    arrays: dict[str, np.ndarray] = {}
    frame = pd.concat(engine.predictions, ignore_index=True) if engine.predictions else None
    if frame is not None:
        for column in frame.columns:
            values = frame[column].to_numpy()
            arrays[f"predictions/{column}"] = (
                values.astype(str) if values.dtype == object else values
            )
    engine.settle_channel_maps()
    layers = []
    for li, state in enumerate(engine.layer_states):
        channel = None
        if state.channel_maps is not None:
            channel = []
            for gi, stats in enumerate(state.channel_maps):
                if stats is None or stats.channels is None:
                    channel.append(None)
                    continue
                stats.settle()  # (sums made on a GPU come to the host)
                halves = {}
                for half in ("fit", "eval"):
                    moments = getattr(stats, half)
                    key = f"channel/{li}/{gi}/{half}"
                    arrays[f"{key}/s_ab"], arrays[f"{key}/s_bb"] = moments.s_ab, moments.s_bb
                    halves[half] = {
                        "images": moments.images,
                        "cells": moments.cells,
                        "trace_aa": moments.trace_aa,
                    }
                channel.append({"channels": stats.channels, "ridge": stats.ridge, **halves})
        info = state.info
        layers.append(
            {
                "info": {
                    "name": info.name,
                    "op": info.op,
                    "index": info.index,
                    "shape": list(info.shape) if info.shape else None,
                    "stride": list(info.stride) if info.stride else None,
                },
                "stride": list(state.stride) if state.stride else None,
                "stride_source": state.stride_source,
                "grid": _grid_state(state.grid),
                "grid_note": state.grid_note,
                "aligned": state.aligned,
                "comparison": state.comparison,
                "reasons": state.reasons,
                "stats": [s.to_state() for s in state.stats],
                "channel": channel,
            }
        )
    lie = None
    if engine.lie is not None:
        lie = {
            "method": engine.lie.method,
            "steps": engine.lie_steps,
            "output": {g: s.to_state() for g, s in engine.lie.output.items()},
            "layers": {
                name: {g: s.to_state() for g, s in per.items()}
                for name, per in engine.lie.layers.items()
            },
            "skipped": engine.lie.skipped,
        }
    state = {
        "output_stats": [s.to_state() for s in engine.output_stats],
        "orbit": engine.orbit.to_state(),
        "orbit_correct": engine.orbit_correct.to_state(),
        "confusion": [
            [[i, j, n] for (i, j), n in c.items()] for c in getattr(engine, "_confusion", [])
        ],
        "score_low": None if engine._score_low is None else engine._score_low.tolist(),
        "score_high": None if engine._score_high is None else engine._score_high.tolist(),
        "warnings": engine.warnings,
        "run_notes": engine.run_notes,
        "geometry_notes": engine.geometry_notes,
        "not_audited": engine.not_audited,
        "output_kind": engine.output_kind,
        "output_kind_source": engine.output_kind_source,
        "binary": engine.binary,
        "num_classes": engine.num_classes,
        "class_names": engine.class_names,
        "images": engine.images_seen,
        "layers": layers,
        "lie": lie,
        "gallery": engine.gallery.state(),
    }
    return state, arrays


def shard_result(
    result: AuditResult,
    engine: Engine,
    context: dict,
    shard: tuple[int, int],
    positions: range,
) -> AuditResult:
    """A shard's own (partial) result, carrying the state that ``eqaudit merge`` reads."""
    state, arrays = engine_state(engine)
    index, total = shard
    info = {
        "index": index,
        "total": total,
        "start": positions.start,
        "stop": positions.stop,
        "images": len(positions),
    }
    summary = dict(result.summary)
    summary["shard"] = info
    summary["data"] = {
        **summary["data"],
        "count": len(positions),
        "count_all": context["data"]["count"],
    }
    summary["warnings"] = [
        f"SHARD {index}/{total}: these numbers cover images {positions.start}..{positions.stop - 1} "
        f"of {context['data']['count']} only; merge the shards with eqaudit merge",
        *summary["warnings"],
    ]
    return AuditResult(
        summary=summary,
        predictions=result.predictions,
        gallery=result.gallery,
        shard_state=(_payload(info, context, state), arrays),
    )


def _payload(info: dict, context: dict, state: dict) -> dict:
    """shard-state.json: what eqaudit merge reads."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "shard": info,
        "context": json_ready(context),
        "engine": json_ready(state),
    }


def empty_shard_result(
    engine: Engine, context: dict, shard: tuple[int, int], positions: range
) -> AuditResult:
    """A shard with no images (more shards than images): nothing to report, an empty state
    that merges as zero."""
    state, arrays = engine_state(engine)
    index, total = shard
    info = {"index": index, "total": total, "start": positions.start, "stop": positions.stop}
    info["images"] = 0
    return AuditResult(
        summary={"shard": info, "warnings": []},
        shard_state=(_payload(info, context, state), arrays),
    )


def write_state(folder: Path, state: tuple[dict, dict[str, np.ndarray]]) -> list[str]:
    """Write ``shard-state.json`` and ``shard-state.npz`` into ``folder``."""
    payload, arrays = state
    (folder / STATE_JSON).write_text(json.dumps(payload, allow_nan=False) + "\n", encoding="utf-8")
    with open(folder / STATE_NPZ, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return [STATE_JSON, STATE_NPZ]


# -- merging ---------------------------------------------------------------------------------------
def _load(given: Path) -> tuple[dict, dict[str, np.ndarray]]:
    path = given / STATE_JSON if given.is_dir() else given
    folder = path.parent
    if not given.exists():
        raise UsageError(f"'{given}' does not exist: check the shard folders given to merge")
    if not path.is_file():
        raise UsageError(
            f"'{given}' holds no {STATE_JSON}: pass the folders written by "
            "eqaudit check --shard I/N"
        )
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        with np.load(folder / STATE_NPZ, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(
            f"cannot read the shard state in '{folder}' ({exc}): re-run that shard"
        ) from None
    if not isinstance(payload, dict):
        raise DataError(f"'{path}' is not an eqaudit shard state: re-run that shard")
    if payload.get("format") != FORMAT or payload.get("version") != VERSION:
        raise DataError(
            f"'{path}' is not an eqaudit shard state of version {VERSION}: re-run that shard "
            "with this eqaudit"
        )
    return payload, arrays


def _fingerprint(context: dict) -> dict:
    """What must agree between shards of one audit: the context minus the run block (the
    versions of eqaudit and its libraries included). A model file is known by its SHA-256:
    nodes that stage it at other paths (or names) run the same model."""
    found = {k: v for k, v in context.items() if k not in ("run",)}
    model = found.get("model")
    if isinstance(model, dict) and model.get("sha256"):
        found["model"] = {k: v for k, v in model.items() if k not in ("path", "name")}
    return found


def _differences(first: Any, other: Any, shown: int = 3) -> str:
    """Where two contexts differ, as ``key.sub: value vs value`` for the first few keys (nested
    dictionaries are followed, long values cut; a value recorded twice, like the seed, once)."""

    def walk(a: Any, b: Any, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any, Any]]:
        if isinstance(a, dict) and isinstance(b, dict):
            found = []
            for key in sorted(a.keys() | b.keys(), key=str):
                if a.get(key) != b.get(key):
                    found += walk(a.get(key), b.get(key), (*path, str(key)))
            return found
        return [(path, a, b)]

    lines, seen = [], set()
    for path, a, b in sorted(walk(first, other, ()), key=lambda item: len(item[0])):
        said = (path[-1:], _short(a), _short(b))  # the same key and values: said once
        if said not in seen:
            seen.add(said)
            lines.append(f"{'.'.join(path)}: {_short(a)} vs {_short(b)}")
    more = f", and {len(lines) - shown} more" if len(lines) > shown else ""
    return "; ".join(lines[:shown]) + more


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def merge_shards(folders: list[Path]) -> AuditResult:
    """The result a single run would give, from the states of all N shards of one audit."""
    if not folders:
        raise UsageError("eqaudit merge needs the shard folders: eqaudit merge DIR1 DIR2 ...")
    loaded = [_load(Path(f)) for f in folders]
    try:
        return merge_states(loaded)
    except (KeyError, TypeError, IndexError, AttributeError) as exc:  # (format checked above)
        raise DataError(
            f"a shard state is incomplete or damaged ({type(exc).__name__}: {exc}): re-run "
            "the shards"
        ) from None


def merge_states(
    loaded: list[tuple[dict, dict[str, np.ndarray]]],
    note: str | None = None,
    started: float | None = None,
) -> AuditResult:
    """:func:`merge_shards` on states already in memory (from ``AuditResult.shard_state``).
    ``note``: the run note saying how the shards were made (default: by ``eqaudit merge`` of
    their reports); ``started``: ``time.perf_counter()`` when the whole run began (``--ray``:
    the run time is then the run's, not the merge's)."""
    loaded = list(loaded)
    loaded.sort(key=lambda item: item[0]["shard"]["index"])
    total = loaded[0][0]["shard"]["total"]
    indices = [p["shard"]["index"] for p, _ in loaded]
    if sorted(indices) != list(range(1, total + 1)) or any(
        p["shard"]["total"] != total for p, _ in loaded
    ):
        missing = sorted(set(range(1, total + 1)) - set(indices))
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        raise UsageError(
            f"the shards do not make one {total}-way audit (missing: {missing or 'none'}, "
            f"repeated: {repeated or 'none'}, totals seen: "
            f"{sorted({p['shard']['total'] for p, _ in loaded})}): pass each shard once"
        )
    reference = _fingerprint(loaded[0][0]["context"])
    for payload, _ in loaded[1:]:
        other = _fingerprint(payload["context"])
        if other != reference:
            index = payload["shard"]["index"]
            if other.get("eqaudit") != reference.get("eqaudit"):
                raise UsageError(
                    f"shard {index} ran on other software than shard 1 "
                    f"({_differences(reference['eqaudit'], other['eqaudit'])}): the last digits "
                    "of the numbers depend on these versions; re-run the shards in one "
                    "environment (the same eqaudit, torch, onnxruntime, numpy and Python)"
                )
            raise UsageError(
                f"shard {index} was run differently from shard 1 "
                f"({_differences(reference, other)}): every shard must use the same model, "
                "data and options"
            )
    return _merged_result([p for p, _ in loaded], [a for _, a in loaded], note, started)


def _merged_result(
    payloads: list[dict],
    arrays: list[dict[str, np.ndarray]],
    note: str | None = None,
    started: float | None = None,
) -> AuditResult:
    started = time.perf_counter() if started is None else started
    from eqaudit.audit import NOT_DETERMINISTIC, Engine, build_result
    from eqaudit.config import AuditConfig
    from eqaudit.data import make_preprocessing
    from eqaudit.gallery import Gallery
    from eqaudit.lie import LieAccumulator, LieStats
    from eqaudit.metrics import OrbitStats, OutputStats
    from eqaudit.models.base import InputSpec
    from eqaudit.transforms import parse_transforms

    context = payloads[0]["context"]
    with_images = [p for p in payloads if p["shard"]["images"]]
    if not with_images:
        raise UsageError("none of the shards audited any image: check --data and --num-images")
    options = {f.name: context["options"].get(f.name) for f in fields(AuditConfig)}
    for key in ("input_size", "mean", "std", "providers", "layer_patterns"):
        if isinstance(options.get(key), list):
            options[key] = tuple(options[key])
    options["label_action"] = tuple((context["options"].get("label_action") or {}).items())
    options["shard"] = None
    config = AuditConfig(**options)
    spec = context["model"]["input"]
    preprocessing = make_preprocessing()  # unused offline: the context holds the record

    class _Offline:  # the engine needs the input spec only; the model is not run again
        input_spec = InputSpec(
            **{
                k: spec[k]
                for k in (
                    "name",
                    "layout",
                    "channels",
                    "height",
                    "width",
                    "batch",
                    "dtype",
                    "layout_source",
                )
            }
        )

    elements = parse_transforms(config.transforms, config.shift_mode)
    engine = Engine(_Offline(), elements, preprocessing, config)  # type: ignore[arg-type]
    first = with_images[0]["engine"]
    kinds = sorted({str(p["engine"]["output_kind"]) for p in with_images})
    if len(kinds) > 1:  # decided per shard from its first batch (--outputs auto)
        raise UsageError(
            f"the shards took the model's outputs for different things ({' and '.join(kinds)}), "
            "so their numbers do not add up: re-run them with --outputs logits or --outputs probs"
        )
    engine.output_kind = first["output_kind"]
    engine.output_kind_source = first["output_kind_source"]
    engine.binary = first.get("binary")  # (states from before binary models were read)
    engine.not_audited = list(first.get("not_audited") or [])
    engine.num_classes = first["num_classes"]
    engine.class_names = first["class_names"]
    engine._setup_label_action(engine.num_classes)

    def merged(states: list[dict], kind: type) -> Any:
        total = kind.from_state(states[0])
        for state in states[1:]:
            total = total.merge(kind.from_state(state))
        return total

    shards = [p["engine"] for p in with_images]
    arrays = [a for p, a in zip(payloads, arrays, strict=True) if p["shard"]["images"]]
    engine.output_stats = [
        merged([s["output_stats"][gi] for s in shards], OutputStats)
        for gi in range(len(engine.elements))
    ]
    engine.orbit = merged([s["orbit"] for s in shards], OrbitStats)
    engine.orbit_correct = merged([s["orbit_correct"] for s in shards], OrbitStats)
    for gi in range(len(engine.elements)):
        for s in shards:
            for i, j, n in s["confusion"][gi]:
                engine._confusion[gi][(i, j)] += n
    lows = [torch.tensor(s["score_low"], dtype=torch.float64) for s in shards if s["score_low"]]
    highs = [torch.tensor(s["score_high"], dtype=torch.float64) for s in shards if s["score_high"]]
    if lows:
        engine._score_low = torch.stack(lows).min(dim=0).values
        engine._score_high = torch.stack(highs).max(dim=0).values
    for key, target in (
        ("warnings", engine.warnings),
        ("run_notes", engine.run_notes),
        ("geometry_notes", engine.geometry_notes),
    ):
        for n, s in enumerate(shards):
            # Each shard checks determinism on its own first batch; a single run, on the first
            # shard's first images: its warning alone is kept, as the single run's.
            if key == "warnings" and n:
                fresh = [w for w in s[key] if not w.startswith(NOT_DETERMINISTIC)]
            else:
                fresh = s[key]
            target.extend(w for w in fresh if w not in target)
    engine.images_seen = sum(p["shard"]["images"] for p in payloads)
    _merge_layers(engine, shards, arrays)
    if first["lie"] is not None:
        lie = LieAccumulator(method=first["lie"]["method"])
        engine.lie_steps = first["lie"]["steps"]
        for s in shards:
            part = LieAccumulator(
                method=s["lie"]["method"],
                output={g: LieStats.from_state(v) for g, v in s["lie"]["output"].items()},
                layers={
                    name: {g: LieStats.from_state(v) for g, v in per.items()}
                    for name, per in s["lie"]["layers"].items()
                },
                skipped=s["lie"]["skipped"],
            )
            lie = lie.merge(part)
        engine.lie = lie
    engine.gallery = Gallery.merge([s["gallery"] for s in shards])
    for a in arrays:
        columns = {k.split("/", 1)[1]: v for k, v in a.items() if k.startswith("predictions/")}
        if columns:
            engine.predictions.append(pd.DataFrame(columns))
    engine.run_notes.append(
        note
        or f"merged from {len(payloads)} shards by eqaudit merge (each shard's own run time "
        "and command are in its report)"
    )
    import sys
    from datetime import datetime, timezone

    run = {
        **context["run"],
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if sys.argv and Path(sys.argv[0]).name == "eqaudit" else None,
    }
    return build_result(engine, {**context, "run": run}, time.perf_counter() - started)


def _merge_layers(engine: Engine, shards: list[dict], arrays: list[dict[str, np.ndarray]]) -> None:
    """Rebuild the engine's per-layer states from the shards' (same layers, in order)."""
    from eqaudit.audit import LayerState
    from eqaudit.grids import Grid
    from eqaudit.metrics import LayerStats
    from eqaudit.metrics.channel_map import ChannelMapStats, ChannelMoments
    from eqaudit.models.base import LayerInfo

    g = len(engine.elements)
    for li, layer in enumerate(shards[0]["layers"]):
        info = layer["info"]
        grid = layer["grid"]
        state = LayerState(
            LayerInfo(
                name=info["name"],
                op=info["op"],
                index=info["index"],
                shape=tuple(info["shape"]) if info["shape"] else None,
                stride=tuple(info["stride"]) if info["stride"] else None,
            ),
            tuple(layer["stride"]) if layer["stride"] else None,
            layer["stride_source"],
            [LayerStats() for _ in range(g)],
            [None] * g,
            Grid(_axis_grid(grid["h"]), _axis_grid(grid["w"])) if grid else None,
            layer["grid_note"],
        )
        state.aligned = list(layer["aligned"])
        state.comparison = [None] * g
        for s in shards:
            mine = s["layers"][li]
            if mine["info"]["name"] != info["name"]:
                raise UsageError("the shards audited different layers: re-run them with one config")
            for gi in range(g):
                state.stats[gi] = state.stats[gi].merge(LayerStats.from_state(mine["stats"][gi]))
                state.reasons[gi] = state.reasons[gi] or mine["reasons"][gi]
                state.comparison[gi] = state.comparison[gi] or mine["comparison"][gi]
        if layer["channel"] is not None:
            state.channel_maps = []
            for gi in range(g):
                total = None
                for si, s in enumerate(shards):
                    entry = s["layers"][li]["channel"][gi]
                    if entry is None:
                        continue
                    halves = {}
                    for half in ("fit", "eval"):
                        key = f"channel/{li}/{gi}/{half}"
                        halves[half] = ChannelMoments(
                            entry[half]["images"],
                            entry[half]["cells"],
                            entry[half]["trace_aa"],
                            arrays[si][f"{key}/s_ab"],
                            arrays[si][f"{key}/s_bb"],
                        )
                    part = ChannelMapStats(entry["channels"], entry["ridge"], **halves)
                    total = part if total is None else total.merge(part)
                state.channel_maps.append(total)
        engine.layer_states.append(state)
