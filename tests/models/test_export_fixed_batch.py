"""torch.export archives fixed at batch 1 (``torch.export.export`` without ``dynamic_shapes``,
its default) run on whole batches once checked (``TorchAdapter.batch_dynamically``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from models_zoo import ConvHead, SmallCNN, Sqrt, calibrate_
from torch import nn

import eqaudit
from eqaudit.models import load_model
from eqaudit.models.torch_adapter import TorchAdapter

SIZE = 17


def export(model: nn.Module, path: Path, batch: int | None = 1, nhwc: bool = False) -> Path:
    """``model`` as a .pt2 fixed at ``batch`` (None: a dynamic batch)."""
    shape = (batch or 2, SIZE, SIZE, 3) if nhwc else (batch or 2, 3, SIZE, SIZE)
    shapes = None if batch else ({0: torch.export.Dim("batch")},)
    program = torch.export.export(model.eval(), (torch.zeros(shape),), dynamic_shapes=shapes)
    torch.export.save(program, path)
    return path


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return calibrate_(SmallCNN(), SIZE).eval()


def forward_batches(monkeypatch) -> list[int]:
    """The batch sizes the adapter's forward passes see, from now on."""
    sizes: list[int] = []
    original = TorchAdapter._forward

    def spy(adapter, batch):
        sizes.append(batch.shape[0])
        return original(adapter, batch)

    monkeypatch.setattr(TorchAdapter, "_forward", spy)
    return sizes


def test_a_batch_1_program_is_audited_in_batches_with_the_dynamic_exports_numbers(
    model, tmp_path, monkeypatch
) -> None:
    fixed = export(model, tmp_path / "fixed.pt2")
    dynamic = export(model, tmp_path / "dynamic.pt2", batch=None)
    options = dict(num_images=6, seed=1, lie=False, batch_size=24)
    sizes = forward_batches(monkeypatch)
    result = eqaudit.audit(fixed, "d4", **options)
    assert result.summary["model"]["fixed_batch"] == {"size": 1, "run": "batched"}
    assert result.summary["model"]["input"]["batch"] is None
    assert max(sizes) == 24  # 3 images x 8 elements per forward, not one image each
    reference = eqaudit.audit(dynamic, "d4", **options)
    for a, b in zip(result.outputs, reference.outputs, strict=True):
        assert a["agreement"] == b["agreement"]
        assert a["js_divergence"] == pytest.approx(b["js_divergence"], abs=1e-9)
    for a, b in zip(result.layers, reference.layers, strict=True):
        assert (a["layer"], a["transform"]) == (b["layer"], b["transform"])
        assert a["relative_error"] == pytest.approx(b["relative_error"], rel=1e-6, abs=1e-9)


class Baked(nn.Module):
    """``x.view(1, -1)``: the batch of 1 written into the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * SIZE * SIZE, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).view(1, -1))


def test_a_program_that_holds_its_batch_of_1_runs_one_image_at_a_time(
    tmp_path, monkeypatch
) -> None:
    torch.manual_seed(0)
    path = export(Baked(), tmp_path / "baked.pt2")
    adapter = load_model(path)
    record = adapter.describe()["fixed_batch"]
    assert record["run"] == "one image at a time"
    assert record["why"].startswith("the program does not run on 2 images: ")
    assert adapter.input_spec.batch == 1
    sizes = forward_batches(monkeypatch)
    result = eqaudit.audit(path, "flips", num_images=3, lie=False)
    # The check's one forward of 2 probe images, then one image per forward: the program's
    # input checks are back on (a batch of 2 would fail them).
    assert sizes.count(2) == 1 and set(sizes) == {1, 2}
    assert result.outputs[1]["n"] == 3


class NHWCTwoHeads(nn.Module):
    """Channels-last images in; an auxiliary head first, the class scores second."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.aux = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.body(x.permute(0, 3, 1, 2))
        return self.aux(scores), scores


def test_the_check_runs_in_the_models_layout_on_the_picked_output(model, tmp_path) -> None:
    path = export(NHWCTwoHeads(model), tmp_path / "nhwc.pt2", nhwc=True)
    with pytest.raises(eqaudit.errors.UsageError, match="--output-name"):
        eqaudit.audit(path, "flips", num_images=2, lie=False)  # not checked without it
    result = eqaudit.audit(path, "flips", num_images=4, lie=False, output_name="1")
    assert result.summary["model"]["fixed_batch"] == {"size": 1, "run": "batched"}
    assert result.summary["model"]["input"]["layout"] == "NHWC"
    assert result.summary["model"]["num_classes"] == 5


@pytest.mark.parametrize("build", ["unflatten", "module"])
def test_the_input_checks_go_off_and_come_back_on_either_kind_of_module(model, build) -> None:
    # eqaudit runs torch.export.unflatten's module, or ExportedProgram.module() when unflatten
    # fails; each refuses a batch of 2 in its own way.
    from eqaudit.models.torch_adapter import _unguarded

    program = torch.export.export(model, (torch.zeros(1, 3, SIZE, SIZE),))
    with warnings.catch_warnings():  # torch's own deprecation notes inside unflatten
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.export.unflatten(program) if build == "unflatten" else program.module()
    two = torch.rand(2, 3, SIZE, SIZE)
    with pytest.raises(Exception, match="1"):
        module(two)
    assert _unguarded(module)
    torch.testing.assert_close(module(two), model(two))
    assert _unguarded(module, restore=True)
    with pytest.raises(Exception, match="1"):
        module(two)


class FlatScores(nn.Module):
    """Returns (K,) scores: two images give (2K,), the shape of two rows of K joined."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3)).flatten()


class AuxBatchStats(nn.Module):
    """Scores second; the auxiliary head normalises with the batch's own statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.aux_bn = nn.BatchNorm2d(4, track_running_stats=False)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return self.aux_bn(y).mean((2, 3)), self.fc(y.mean((2, 3)))


class PositionMap(ConvHead):
    """A learned map of batch 1 added to the features: a layer with no batch axis."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Conv2d(1, 4, 1)
        self.register_buffer("grid", torch.rand(1, 1, SIZE, SIZE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x) + self.pos(self.grid))


class Observer(ConvHead):
    """Updates a buffer every forward (as a quantisation observer does)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.copy_(torch.maximum(self.seen, x.abs().max()))
        return self.head(self.conv(x / self.seen))


class Gated(ConvHead):
    """Branches on the image's brightness: noise probes all take one branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cond(
            x.mean() < 0.3, lambda t: (t * 3.0).clamp(max=1.0), lambda t: t.clone(), (x,)
        )
        return self.head(torch.relu(self.conv(x)))


@pytest.mark.parametrize(
    ("build", "why"),
    [
        (Sqrt, "its output 0 is not finite on noise images, so the check cannot tell"),
        (FlatScores, "its output 0 of shape [5] for one image has no batch axis"),
        (AuxBatchStats, "its output 0 differs for images run together"),
        (PositionMap, "its layer pos differs for images run together"),
        (Observer, "the program updates its buffers as it runs (seen)"),
        (Gated, "the program branches on the data (torch.cond)"),
    ],
)
def test_programs_that_batching_would_change_run_one_image_at_a_time(tmp_path, build, why) -> None:
    # Each audited fine one image at a time and, batched, either crashed (NaN probes, (K,)
    # scores) or changed its numbers without a word (batch statistics in a head the scores do
    # not use, a layer of batch 1, a buffer the probes moved, a branch taken for the batch).
    torch.manual_seed(0)
    module = build().eval()
    path = export(module, tmp_path / "m.pt2")
    adapter = load_model(path, output_name="1" if build is AuxBatchStats else None)
    assert adapter.fixed_batch["run"] == "one image at a time"
    assert adapter.fixed_batch["why"].startswith(why), adapter.fixed_batch
    assert adapter.input_spec.batch == 1
    if build is Observer:  # the probes' update is undone: the buffer is the exported one
        assert float(dict(adapter.module.named_buffers())["seen"]) == 1.0
    pixels = torch.rand(4, SIZE, SIZE, 3).mul(255).to(torch.uint8).numpy()
    options = dict(lie=False, output_name="1" if build is AuxBatchStats else None)
    result = eqaudit.audit(path, "flips", pixels, **options)  # layers on: no crash
    assert result.outputs[1]["n"] == 4
    if build is Gated:  # the branches' subgraphs run for some images only: not layers
        assert {row["layer"] for row in result.layers} == {"conv"}
        assert "branches of data-dependent control flow" in result.summary["model"]["layers_note"]


def test_a_program_with_a_dynamic_image_size_is_checked_once_the_size_is_chosen(
    model, tmp_path
) -> None:
    # Batch fixed at 1, height and width dynamic: --input-size aligned:N sets the size after
    # loading, and the batch is checked then.
    dims = {2: torch.export.Dim("h", min=8, max=64), 3: torch.export.Dim("w", min=8, max=64)}
    program = torch.export.export(model, (torch.zeros(1, 3, SIZE, SIZE),), dynamic_shapes=(dims,))
    torch.export.save(program, tmp_path / "hw.pt2")
    result = eqaudit.audit(tmp_path / "hw.pt2", "flips", num_images=2, input_size="aligned:17")
    assert result.summary["model"]["fixed_batch"] == {"size": 1, "run": "batched"}


def test_a_program_whose_unflatten_fails_moves_to_another_device(model, tmp_path, monkeypatch):
    # ExportedProgram.module() refuses .eval() (torch 2.13): moving it crashed --device cuda.
    # "elsewhere" makes to_device take the move path on a CPU-only machine.
    path = export(model, tmp_path / "fixed.pt2")

    def refuse(*_args, **_kwargs):
        raise RuntimeError("no unflatten")

    monkeypatch.setattr(torch.export, "unflatten", refuse)
    adapter = load_model(path)
    assert adapter.fixed_batch == {"size": 1, "run": "batched"}
    adapter.device = "elsewhere"
    adapter.to_device("cpu")
    assert adapter.run(torch.rand(3, 3, SIZE, SIZE)).scores.shape == (3, 5)


def test_a_program_that_fails_on_the_noise_probes_says_so(model, tmp_path, monkeypatch) -> None:
    path = export(model, tmp_path / "fixed.pt2")

    def refuse(_adapter, _batch):
        raise RuntimeError("values must be in [0, 1]")

    monkeypatch.setattr(TorchAdapter, "_probe", refuse)
    record = load_model(path).fixed_batch
    assert record == {
        "size": 1,
        "run": "one image at a time",
        "why": "the program does not run on noise images: values must be in [0, 1]",
    }
