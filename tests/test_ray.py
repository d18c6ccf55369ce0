"""--ray: the shards of an audit as tasks on a local Ray instance, merged on the driver."""

from __future__ import annotations

import pytest
import torch
from models_zoo import SmallCNN, calibrate_, export_onnx

import eqaudit
from eqaudit.config import AuditConfig
from eqaudit.data.prefetch import usable_cpus
from eqaudit.errors import UsageError

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'eqaudit[ray]')")


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    torch.manual_seed(0)
    model = calibrate_(SmallCNN(), 17).eval()
    return export_onnx(model, tmp_path_factory.mktemp("ray") / "m.onnx", 17)


def test_ray_shards_merge_into_the_single_run(onnx_model) -> None:
    from eqaudit.distributed import audit_on_ray

    config = AuditConfig(transforms="d4,shift:1", num_images=9, seed=2, batch_size=16)
    single = eqaudit.audit(onnx_model, config=config)
    calls: list[tuple[int, int | None]] = []
    merged = audit_on_ray(onnx_model, config, shards=4, progress=lambda *c: calls.append(c))
    # Progress counts images over all shards (not finished shards: 4/4), never going back.
    assert calls[-1] == (9, 9)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert {t for _, t in calls} <= {None, 9}
    assert {k: v for k, v in merged.summary.items() if k != "run"} == {
        k: v for k, v in single.summary.items() if k != "run"
    }
    assert merged.predictions.equals(single.predictions)
    assert merged.gallery == single.gallery
    # Each task asked Ray for its share of the CPUs and onnxruntime ran on as many threads, not
    # one per core of the node (4 tasks on this machine's CPUs: one each).
    share = max(1, usable_cpus() // 4)
    assert merged.summary["run"]["cpu_threads"] == share
    # The run block is the whole run's (it said "ran 0.0 s", the merge's alone), and the note
    # says how the shards were made (it pointed to shard reports Ray never writes).
    assert merged.summary["run"]["duration_s"] > single.summary["run"]["duration_s"] / 4
    assert merged.summary["run"]["notes"][-1].startswith("merged from 4 shards run as Ray tasks")


def test_progress_counts_finished_shards_from_their_states() -> None:
    from eqaudit.distributed import _images_done

    # Shard 2 has not reported yet: the total is unknown. Shard 1's last report (2 of 3) may
    # arrive after its state: the state counts.
    assert _images_done(3, {1: (2, 3), 3: (1, 4)}, {1: 3}) == (4, None)
    assert _images_done(3, {1: (2, 3), 2: (0, 3), 3: (1, 4)}, {1: 3}) == (4, 10)
    assert _images_done(2, {}, {1: 3, 2: 0}) == (3, 3)  # a shard with no image


def test_more_shards_than_images_still_merge(onnx_model) -> None:
    from eqaudit.distributed import audit_on_ray

    config = AuditConfig(transforms="flips", num_images=2, layers=False)
    merged = audit_on_ray(onnx_model, config, shards=3)
    assert merged.summary["data"]["count"] == 2 and merged.outputs[1]["n"] == 2


def test_ray_refuses_what_it_cannot_do(onnx_model) -> None:
    from eqaudit.distributed import audit_on_ray

    with pytest.raises(UsageError, match="drop --shard"):
        audit_on_ray(onnx_model, AuditConfig(shard=(1, 2)))
    with pytest.raises(UsageError, match="pass its path"):
        audit_on_ray(torch.nn.Linear(2, 2), AuditConfig())  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"--threads 4096 asks more CPUs per task than a Ray node"):
        audit_on_ray(onnx_model, AuditConfig(threads=4096, num_images=2))


def test_a_task_that_fails_says_why_in_one_line(tmp_path) -> None:
    from eqaudit.distributed import audit_on_ray
    from eqaudit.errors import ModelLoadError

    broken = tmp_path / "bad.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(ModelLoadError, match=r"cannot read .*bad\.onnx") as raised:
        audit_on_ray(broken, AuditConfig(num_images=2), shards=2)
    # The task's own error, not Ray's wrapper whose text carries the remote traceback.
    assert type(raised.value) is ModelLoadError and "\n" not in str(raised.value)
