"""torch.export archives fixed at batch 1 (``torch.export.export`` without ``dynamic_shapes``,
its default) run on whole batches once checked (``TorchAdapter.batch_dynamically``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from models_zoo import SmallCNN, calibrate_
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
    with pytest.raises(eqaudit.errors.UnsupportedModelError, match="--output-name"):
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
