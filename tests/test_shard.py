"""Sharded audits: N shards merged give the single run's summary, CSVs and gallery, bit for bit."""

from __future__ import annotations

import copy
import filecmp
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from models_zoo import SmallCNN, calibrate_, export_onnx
from torch import nn
from typer.testing import CliRunner

import eqaudit
from eqaudit.cli import app
from eqaudit.errors import DataError, UsageError
from eqaudit.metrics import LayerStats, OutputStats
from eqaudit.metrics.exact import SCALE_BITS, ExactSum
from eqaudit.reports import write_report
from eqaudit.shard import merge_shards, shard_range

FILES = ("outputs.csv", "layers.csv", "predictions.csv", "gallery.json")
#: float64 matrix sums whose rounding the ridge solve amplifies (documented in eqaudit.shard):
#: equal to ~1e-9 relative, not bit for bit
CHANNEL_COLUMNS = ("fitted_relative_error", "pooled_relative_error")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return calibrate_(SmallCNN(), 17).eval()


def _run_all(
    source, tmp: Path, shards: int, **options
) -> tuple[eqaudit.AuditResult, eqaudit.AuditResult]:
    single = eqaudit.audit(source, **options)
    write_report(single, tmp / "single")
    folders = []
    for index in range(1, shards + 1):
        part = eqaudit.audit(source, shard=(index, shards), **options)
        write_report(part, tmp / f"shard{index}")
        folders.append(tmp / f"shard{index}")
    merged = merge_shards(folders[::-1])  # any order
    write_report(merged, tmp / "merged")
    return single, merged


def _without_run(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "run"}


def test_exact_sum_is_exact_and_order_free() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.random(3000) * 10.0 ** rng.integers(-30, 8, 3000), [5e-324, -2.5]])
    whole = ExactSum()
    whole.add(values)
    assert Fraction(whole.total, 2**SCALE_BITS) == sum(Fraction(v) for v in values)
    parts = [ExactSum() for _ in range(3)]
    for part, chunk in zip(parts, np.array_split(rng.permutation(values), 3), strict=True):
        part.add(chunk)
    assert (parts[2] + parts[0] + parts[1]).total == whole.total
    assert whole.value == math.fsum(values)  # both correctly rounded
    assert ExactSum.from_json(whole.to_json()) == whole


def test_accumulator_states_round_trip_through_json() -> None:
    stats = LayerStats()
    stats.update(torch.tensor([0.1, 0.02, 1e-9]), torch.tensor([0.3, 0.1, 0.0]))
    again = LayerStats.from_state(json.loads(json.dumps(stats.to_state())))
    assert again.compute() == stats.compute()
    out = OutputStats()
    out.update(torch.tensor([True, False]), torch.tensor([0.01, 0.2]), torch.tensor([0.1, 0.5]))
    assert OutputStats.from_state(json.loads(json.dumps(out.to_state()))).compute() == out.compute()


def test_layer_stats_leave_out_and_count_nonfinite_images() -> None:
    relative = np.array([[0.1, np.nan, 0.3], [0.2, 0.4, 0.6]])
    cosine = np.array([[0.01, 0.02, np.inf], [0.1, 0.2, 0.3]])
    rows = [LayerStats(), LayerStats()]
    LayerStats.update_rows(rows, relative, cosine)
    assert rows[0].n == 1 and rows[0].nonfinite == 2  # only the first image is finite in both
    assert rows[0].compute()["relative_error"] == 0.1
    assert rows[1].n == 3 and rows[1].nonfinite == 0
    assert rows[1].compute()["relative_error"] == pytest.approx(0.4, rel=1e-15)
    merged = rows[0].merge(rows[1])
    assert (merged.n, merged.nonfinite) == (4, 2)
    # A state written before ``nonfinite`` existed loads with none.
    old = {k: v for k, v in rows[1].to_state().items() if k != "nonfinite"}
    assert LayerStats.from_state(old).compute() == rows[1].compute()
    assert LayerStats.from_state(old).nonfinite == 0


def test_layer_stats_keep_the_largest_map_norm_and_merge_it() -> None:
    rows = [LayerStats(), LayerStats()]
    zeros = np.zeros((2, 3))
    LayerStats.update_rows(rows, zeros, zeros, np.array([[0.0, 0.0, 0.0], [0.0, 2.5, 0.5]]))
    assert (rows[0].norm_max, rows[1].norm_max) == (0.0, 2.5)
    assert rows[0].merge(rows[1]).norm_max == 2.5
    again = LayerStats.from_state(json.loads(json.dumps(rows[0].to_state())))
    assert again.norm_max == 0.0
    # A shard of an older eqaudit did not measure the norms: not known to be zero.
    old = {k: v for k, v in rows[0].to_state().items() if k != "norm_max"}
    assert LayerStats.from_state(old).norm_max == math.inf


def test_a_layer_zero_on_every_image_is_said_and_left_out_of_the_scores() -> None:
    # A dead ReLU's maps are 0 under every transform: its relative errors read 0 (the
    # formula's eps), which counted as a perfectly equivariant layer in the score (review).
    import eqaudit

    class Dead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(7, 3)
            with torch.no_grad():
                self.conv.bias.fill_(-100.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.cat([self.relu(self.conv(x)).mean((2, 3)), x.mean((2, 3))], 1))

    torch.manual_seed(0)
    model = Dead().eval()
    result = eqaudit.audit(model, "flips", input_size=9, num_images=4)
    rows = result.to_frame("layers")
    dead = rows[rows["layer"] == "relu"]
    assert (dead["relative_error"] == 0).all() and not dead["scored"].any()
    live = rows[(rows["layer"] == "conv") & (rows["transform"] != "id")]
    assert live["scored"].all()
    assert result.scores["layer_relative_error"] == pytest.approx(live["relative_error"].mean())
    [said] = [w for w in result.warnings if "zero on every image" in w]
    assert "(relu)" in said


def test_shard_ranges_cover_the_images_once() -> None:
    for count in (0, 1, 7, 13, 100):
        for total in (1, 2, 3, 8):
            ranges = [shard_range(count, i, total) for i in range(1, total + 1)]
            assert [p for r in ranges for p in r] == list(range(count))


@pytest.mark.parametrize("shards", [2, 3])
def test_merged_shards_equal_a_single_run(model, tmp_path, shards) -> None:
    options = dict(
        transforms="d4,rot:20,shift:1",
        input_size=17,
        num_images=13,
        seed=4,
        batch_size=24,  # 3 images per step: shard edges fall inside the single run's batches
        lie=True,
        channel_map=True,
        label_action=("flip_h=swap:0,1", "rot90=id"),
    )
    single, merged = _run_all(model, tmp_path, shards, **options)
    a, b = _without_run(single.summary), _without_run(merged.summary)
    layers_a, layers_b = a.pop("layers"), b.pop("layers")
    assert a == b
    for row_a, row_b in zip(layers_a, layers_b, strict=True):
        for column in CHANNEL_COLUMNS:
            x, y = row_a.pop(column), row_b.pop(column)
            assert (x is None and y is None) or y == pytest.approx(x, rel=1e-7, abs=1e-12)
        assert row_a == row_b
    for name in ("outputs.csv", "predictions.csv", "gallery.json"):
        assert filecmp.cmp(tmp_path / "single" / name, tmp_path / "merged" / name, shallow=False)
    assert merged.predictions.equals(single.predictions)
    assert merged.summary["run"]["notes"][-1].startswith(
        f"merged from {shards} shards by eqaudit merge"
    )


def test_merged_onnx_shards_equal_a_single_run_bit_for_bit(model, tmp_path) -> None:
    path = export_onnx(model, tmp_path / "m.onnx", 17)
    # (a rotation by another angle too: its resampling must not depend on the batch's size)
    single, merged = _run_all(
        path, tmp_path, 3, transforms="d4,rot:30", num_images=10, batch_size=18
    )
    assert _without_run(single.summary) == _without_run(merged.summary)
    for name in FILES:
        assert filecmp.cmp(tmp_path / "single" / name, tmp_path / "merged" / name, shallow=False)


def test_shards_of_one_model_file_staged_at_other_paths_merge(model, tmp_path) -> None:
    # Slurm/Kubernetes nodes stage the model where they like: the same bytes (SHA-256) at
    # another path or name were "run differently" (review). Another model is still refused.
    path = export_onnx(model, tmp_path / "m.onnx", 17)
    (tmp_path / "node2").mkdir()
    staged = tmp_path / "node2" / "model-copy.onnx"
    staged.write_bytes(path.read_bytes())
    options = {"transforms": "flips", "num_images": 6}
    single = eqaudit.audit(path, **options)
    for index, where in ((1, path), (2, staged)):
        write_report(eqaudit.audit(where, shard=(index, 2), **options), tmp_path / f"s{index}")
    merged = merge_shards([tmp_path / "s1", tmp_path / "s2"])
    assert merged.outputs == single.outputs and merged.summary["model"]["name"] == "m.onnx"
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).add_(0.01)
    other = export_onnx(changed, tmp_path / "node2" / "m.onnx", 17)
    write_report(eqaudit.audit(other, shard=(2, 2), **options), tmp_path / "o2")
    with pytest.raises(UsageError, match=r"run differently from shard 1 \(model.sha256: "):
        merge_shards([tmp_path / "s1", tmp_path / "o2"])


def test_a_shard_report_says_what_it_covers(model, tmp_path) -> None:
    part = eqaudit.audit(model, "flips", input_size=17, num_images=10, shard=(2, 3))
    assert part.summary["shard"] == {"index": 2, "total": 3, "start": 3, "stop": 6, "images": 3}
    assert part.summary["data"]["count"] == 3 and part.summary["data"]["count_all"] == 10
    assert part.summary["warnings"][0].startswith("SHARD 2/3")
    assert part.outputs[1]["n"] == 3


def test_merge_refuses_incomplete_repeated_or_mismatched_shards(model, tmp_path) -> None:
    for i in (1, 2):
        write_report(
            eqaudit.audit(model, "flips", input_size=17, num_images=6, shard=(i, 2)),
            tmp_path / f"s{i}",
        )
    write_report(
        eqaudit.audit(model, "flips", input_size=17, num_images=6, seed=9, shard=(2, 2)),
        tmp_path / "other",
    )
    with pytest.raises(UsageError, match=r"missing: \[2\]"):
        merge_shards([tmp_path / "s1"])
    with pytest.raises(UsageError, match=r"repeated: \[1\]"):
        merge_shards([tmp_path / "s1", tmp_path / "s1", tmp_path / "s2"])
    with pytest.raises(UsageError, match=r"run differently from shard 1 \(seed: 0 vs 9\)"):
        merge_shards([tmp_path / "s1", tmp_path / "other"])
    state = tmp_path / "s2" / "shard-state.json"
    payload = json.loads(state.read_text())
    numpy_version = payload["context"]["eqaudit"]["numpy"]
    payload["context"]["eqaudit"]["numpy"] = "1.26.4"  # as if shard 2 ran on another machine
    state.write_text(json.dumps(payload))
    with pytest.raises(UsageError, match=rf"other software .*numpy: {numpy_version} vs 1\.26\.4\)"):
        merge_shards([tmp_path / "s1", tmp_path / "s2"])
    with pytest.raises(UsageError, match=r"holds no shard-state\.json"):
        merge_shards([tmp_path])
    (tmp_path / "s2" / "shard-state.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="cannot read the shard state"):
        merge_shards([tmp_path / "s1", tmp_path / "s2"])


def test_state_files_hold_no_pickles(model, tmp_path) -> None:
    write_report(
        eqaudit.audit(model, "flips", input_size=17, num_images=4, shard=(1, 1)), tmp_path / "s"
    )
    with np.load(tmp_path / "s" / "shard-state.npz", allow_pickle=False) as npz:
        assert "predictions/image" in npz.files


def test_cli_shards_then_merge_with_a_gate(model, tmp_path) -> None:
    path = export_onnx(model, tmp_path / "m.onnx", 17)
    runner = CliRunner()
    common = [str(path), "-t", "flips", "-n", "6"]
    for i in (1, 2):
        result = runner.invoke(
            app, ["check", *common, "--shard", f"{i}/2", "-o", str(tmp_path / f"s{i}")]
        )
        assert result.exit_code == 0, result.output
        assert f"Shard {i}/2 state written" in result.output
    gated = runner.invoke(app, ["check", *common, "--shard", "1/2", "--fail-under", "50"])
    assert gated.exit_code == 2 and "pass them to eqaudit merge" in gated.output
    merged = runner.invoke(
        app,
        [
            "merge",
            str(tmp_path / "s1"),
            str(tmp_path / "s2"),
            "-o",
            str(tmp_path / "m"),
            "--fail-under",
            "0",
        ],
    )
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "m" / "report.html").is_file()
    assert json.loads((tmp_path / "m" / "summary.json").read_text())["data"]["count"] == 6
    bad = runner.invoke(app, ["check", *common, "--shard", "3/2"])
    assert bad.exit_code == 2 and "I must be between 1 and N" in bad.output


def test_merge_applies_every_gate_of_check(model, tmp_path, monkeypatch) -> None:
    # A shard run ignores the gates of the config file and the environment (they judge the
    # whole audit); merge applies them, the baseline included, as check would on a single run.
    path = export_onnx(model, tmp_path / "m.onnx", 17)
    runner = CliRunner()
    common = [str(path), "-t", "flips", "-n", "6"]
    monkeypatch.chdir(tmp_path)
    single = runner.invoke(app, ["check", *common, "-o", "one", "--save-baseline", "base.json"])
    assert single.exit_code == 0, single.output
    five = [str(path), "-t", "flips", "-n", "5", "-o", "five", "--save-baseline", "five.json"]
    assert runner.invoke(app, ["check", *five]).exit_code == 0  # other images: not comparable
    (tmp_path / "eqaudit.toml").write_text('baseline = "base.json"\nfail-under = 0\n')
    for i in (1, 2):
        shard = runner.invoke(app, ["check", *common, "--shard", f"{i}/2", "-o", f"s{i}"])
        assert shard.exit_code == 0, shard.output  # the file's gates wait for the merge
    passed = runner.invoke(app, ["merge", "s1", "s2", "-o", "merged"])
    assert passed.exit_code == 0, passed.output
    assert 'name="regression.score"' in (tmp_path / "merged" / "junit.xml").read_text()
    # A threshold on the command line, and a baseline from another set of images, fail it.
    strict = runner.invoke(app, ["merge", "s1", "s2", "-o", "strict", "--min-agreement", "1"])
    assert strict.exit_code == 1 and "agreement[" in strict.output, strict.output
    refused = runner.invoke(app, ["merge", "s1", "s2", "-o", "x", "--baseline", "five.json"])
    assert refused.exit_code == 2 and "not comparable" in refused.output, refused.output


def two_cli_shards(model, tmp_path: Path) -> list[str]:
    """``eqaudit check --shard 1/2`` and ``2/2`` of the model (as ONNX, 4 images, flips) into
    ``tmp_path/s1`` and ``s2``; their folders."""
    path = export_onnx(model, tmp_path / "m.onnx", 17)
    folders = [str(tmp_path / f"s{i}") for i in (1, 2)]
    for i, folder in enumerate(folders, 1):
        args = ["check", str(path), "-t", "flips", "-n", "4", "--shard", f"{i}/2", "-o", folder]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    return folders


def test_merge_refuses_to_write_into_a_shard_folder(model, tmp_path) -> None:
    runner, shards = CliRunner(), two_cli_shards(model, tmp_path)
    result = runner.invoke(app, ["merge", *shards, "-o", str(tmp_path / "s1")])
    assert result.exit_code == 2 and "is one of the shard folders" in result.output
    assert runner.invoke(app, ["merge", *shards, "-o", str(tmp_path / "m")]).exit_code == 0


def test_damaged_shard_states_are_one_line_data_errors(model, tmp_path) -> None:
    runner, shards = CliRunner(), two_cli_shards(model, tmp_path)
    npz, state = tmp_path / "s2" / "shard-state.npz", tmp_path / "s2" / "shard-state.json"
    kept_npz, kept_state = npz.read_bytes(), state.read_text()
    for damage in ("truncated npz", "json list", "json without its engine"):
        npz.write_bytes(kept_npz)
        state.write_text(kept_state)
        if damage == "truncated npz":
            npz.write_bytes(kept_npz[: len(kept_npz) // 2])
        elif damage == "json list":
            state.write_text("[1, 2]\n")
        else:
            payload = json.loads(kept_state)
            del payload["engine"]
            state.write_text(json.dumps(payload))
        result = runner.invoke(app, ["merge", *shards, "-o", str(tmp_path / "m")])
        assert result.exit_code == 2, (damage, result.output)
        assert "re-run th" in result.output and "Traceback" not in result.output, damage
    missing = runner.invoke(app, ["merge", shards[0], "nowhere", "-o", str(tmp_path / "m")])
    assert missing.exit_code == 2 and "'nowhere' does not exist" in missing.output


def test_more_shards_than_images_still_merge_from_folders(model, tmp_path) -> None:
    # A fixed Slurm array of 4 on 3 images: the empty shard writes its state, exit 0, and the
    # merge of all 4 folders is the single run.
    path = export_onnx(model, tmp_path / "m.onnx", 17)
    runner = CliRunner()
    common = [str(path), "-t", "flips", "-n", "3"]
    empty = []
    for i in range(1, 5):
        out = tmp_path / f"s{i}"
        shard = runner.invoke(app, ["check", *common, "--shard", f"{i}/4", "-o", str(out)])
        assert shard.exit_code == 0, shard.output
        if f"shard {i}/4 has no images" in shard.output:
            empty.append(sorted(p.name for p in out.iterdir()))
    assert empty == [["shard-state.json", "shard-state.npz"]]  # one shard, its state alone
    folders = [str(tmp_path / f"s{i}") for i in range(1, 5)]
    merged = runner.invoke(app, ["merge", *folders, "-o", str(tmp_path / "m")])
    assert merged.exit_code == 0, merged.output
    single = runner.invoke(app, ["check", *common, "-o", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    a = json.loads((tmp_path / "m" / "summary.json").read_text())
    b = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert {k: v for k, v in a.items() if k != "run"} == {k: v for k, v in b.items() if k != "run"}


def test_an_empty_shard_writes_its_state_through_the_python_api(model, tmp_path) -> None:
    # write_report on a shard with no images raised KeyError 'outputs'; the CLI had its own path.
    from eqaudit.reports import write_report
    from eqaudit.shard import merge_shards

    folders = []
    for i in range(1, 4):
        part = eqaudit.audit(model, "flips", input_size=17, num_images=2, shard=(i, 3), lie=False)
        write_report(part, tmp_path / str(i))
        folders.append(tmp_path / str(i))
    listed = [sorted(p.name for p in folder.iterdir()) for folder in folders]
    assert listed.count(["shard-state.json", "shard-state.npz"]) == 1  # the empty one
    merged = merge_shards(folders).summary
    single = eqaudit.audit(model, "flips", input_size=17, num_images=2, lie=False).summary
    assert merged["scores"] == single["scores"] and merged["outputs"] == single["outputs"]


def test_shards_that_read_the_outputs_differently_are_not_merged(model, tmp_path) -> None:
    # --outputs auto decides logits or probabilities from each shard's first batch: two shards
    # that decided differently would mix two definitions of the JS divergence.
    runner, shards = CliRunner(), two_cli_shards(model, tmp_path)
    state = tmp_path / "s2" / "shard-state.json"
    payload = json.loads(state.read_text())
    payload["engine"]["output_kind"] = "probs"  # as if its first batch had looked like them
    state.write_text(json.dumps(payload))
    result = runner.invoke(app, ["merge", *shards, "-o", str(tmp_path / "m")])
    assert result.exit_code == 2 and "re-run them with --outputs logits" in result.output


def test_a_one_image_shard_does_not_call_its_scores_constant(model) -> None:
    # The constant-output check counts the images the shard saw, not the whole data's.
    result = eqaudit.audit(model, "flips", input_size=17, num_images=5, shard=(5, 5))
    assert result.summary["shard"]["images"] == 1
    assert not any("constant across" in w for w in result.warnings)


def test_a_merge_keeps_one_determinism_warning_as_a_single_run(tmp_path) -> None:
    # Each shard checks determinism on its own first batch and words its spread; the merged
    # warnings keep the first shard's only, as a single run has one.
    from torch import nn

    from eqaudit.audit import NOT_DETERMINISTIC
    from eqaudit.shard import merge_states

    class Noisy(nn.Module):  # randomness that eval() does not switch off, through a ReLU
        def __init__(self) -> None:
            super().__init__()
            conv = nn.Conv2d(3, 4, 3, padding=1)
            self.body = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(324, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x + 0.5 * torch.randn_like(x))

    torch.manual_seed(0)
    noisy = Noisy()
    options = dict(input_size=9, num_images=6, layers=False)
    parts = [eqaudit.audit(noisy, "flips", shard=(i, 3), **options) for i in (1, 2, 3)]
    said = [[w for w in p.warnings if w.startswith(NOT_DETERMINISTIC)] for p in parts]
    assert all(len(s) == 1 for s in said) and len({s[0] for s in said}) == 3
    merged = merge_states([p.shard_state for p in reversed(parts)])
    assert [w for w in merged.warnings if w.startswith(NOT_DETERMINISTIC)] == said[0]
