"""The command line through typer's CliRunner, and once as a real subprocess of the installed script."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from models_zoo import export_onnx, symmetric_cnn
from PIL import Image
from typer.testing import CliRunner

from eqaudit.cli import app
from eqaudit.errors import EXIT_MODEL

SIZE = 33
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
REPORT = ("summary.json", "outputs.csv", "layers.csv", "predictions.csv")
OUTPUT_COLUMNS = [
    "transform",
    "agreement",
    "agreement_low",
    "agreement_high",
    "js_divergence",
    "logit_error",
    "accuracy",
]
LAYER_COLUMNS = [
    "layer",
    "op",
    "transform",
    "shape",
    "stride",
    "relative_error",
    "relative_error_p95",
    "cosine_distance",
    "measurable",
]
D4 = {"id", "rot90", "rot180", "rot270", "flip_h", "flip_v", "transpose", "antitranspose"}

runner = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The D4-symmetrised CNN (DESIGN.md section 6) exported to ONNX at the aligned size 33."""
    root = tmp_path_factory.mktemp("cli_model")
    return export_onnx(symmetric_cnn(size=SIZE), root / "symmetric.onnx", SIZE)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 40x40 RGB PNGs: blobs on a gradient, so that images differ in structure."""
    root = tmp_path_factory.mktemp("cli_images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40] / 39.0
    for i in range(6):
        cy, cx = rng.uniform(8, 32, 2)
        blob = np.exp(-((yy * 39 - cy) ** 2 + (xx * 39 - cx) ** 2) / 40.0)
        rgb = np.stack([blob, xx * rng.uniform(), yy * rng.uniform()], axis=-1)
        Image.fromarray((255 * rgb.clip(0, 1)).astype(np.uint8)).save(root / f"img_{i}.png")
    return root


def clean(text: str) -> str:
    return ANSI.sub("", text)


def assert_report(out: Path, names: tuple[str, ...] = REPORT) -> dict:
    for name in names:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    pd.read_csv(out / "predictions.csv")
    return summary


def test_check_with_data(model: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["check", str(model), "--data", str(images), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "SYNTHETIC" not in result.output
    summary = assert_report(out)
    assert summary["data"]["synthetic"] is False
    assert summary["data"]["count"] == 6

    outputs = pd.read_csv(out / "outputs.csv")
    assert set(OUTPUT_COLUMNS) <= set(outputs.columns)
    assert len(outputs) == 8
    assert set(outputs["transform"]) == D4
    # The symmetrised CNN at an aligned size is exactly D4-invariant.
    assert (outputs["agreement"] == 1.0).all()
    assert outputs["js_divergence"].max() < 1e-6

    layers = pd.read_csv(out / "layers.csv")
    assert set(LAYER_COLUMNS) <= set(layers.columns)
    assert set(layers["transform"]) == D4
    assert "/conv1/Conv_output_0" in set(layers["layer"])
    measured = layers[layers["measurable"]]
    assert len(measured) > 0
    assert measured["relative_error"].max() < 1e-5
    # Scores and the report folder are shown on stdout.
    assert "Robustness score" in clean(result.stdout)


def test_check_without_data_warns_loudly(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["check", str(model), "-n", "4", "--no-layers", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "warning: SYNTHETIC INPUTS" in clean(result.stderr)
    summary = assert_report(out, ("summary.json", "outputs.csv", "predictions.csv"))
    assert summary["data"]["synthetic"] is True
    assert any("SYNTHETIC INPUTS" in w for w in summary["warnings"])


@pytest.mark.parametrize("width", [80, 120])  # a standard terminal (and pytest-xdist's COLUMNS)
def test_inspect(model: Path, width: int, monkeypatch) -> None:
    from eqaudit.reports import console

    monkeypatch.setattr(console.stdout, "width", width)
    result = runner.invoke(app, ["inspect", str(model)])
    assert result.exit_code == 0, result.output
    text = clean(result.stdout)
    assert "input 'image': NCHW" in text
    assert "3 channels, size 33x33" in text
    assert "5 classes" in text
    assert max(len(line) for line in text.splitlines()) <= width
    # Each row whole: the name --layers takes, its shape and its sampling grid.
    for name, op, shape, grid in [
        ("/conv1/Conv_output_0", "Conv", "8x33x33", "1x1 @ 0,0 (33x33)"),
        ("/relu2/Relu_output_0", "Relu", "16x17x17", "2x2 @ 0,0 (17x17)"),
        ("/conv3/Conv_output_0", "Conv", "16x9x9", "4x4 @ 0,0 (9x9)"),
    ]:
        row = rf"{re.escape(name)} +{op} +spatial +{shape} +{re.escape(grid)}"
        assert re.search(row, text), (row, text)


def test_transforms_lists_every_family() -> None:
    result = runner.invoke(app, ["transforms"])
    assert result.exit_code == 0, result.output
    families = {line.split()[1] for line in clean(result.stdout).splitlines() if "│" in line}
    assert {"d4", "c4", "flips", "rot", "shift"} <= families


@pytest.mark.parametrize("args", [["--help"], ["check", "--help"], ["inspect", "--help"]])
def test_help(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Usage" in clean(result.output)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_demo(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--backend", backend, "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = assert_report(out)
    assert summary["model"]["backend"] == backend
    assert summary["data"]["synthetic"] is False
    assert summary["model"]["layers_audited"] > 0
    assert len(pd.read_csv(out / "layers.csv")) > 0


def test_demo_writes_reports_demo_by_default(tmp_path: Path, monkeypatch) -> None:
    # README's `make demo` runs `eqaudit demo` with no --out: its default goes through the same
    # parser as a typed folder (it once failed there on a Path, with a traceback).
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    assert_report(tmp_path / "reports" / "demo")


def test_demo_summary_reads_whole_in_an_80_column_terminal(tmp_path: Path, monkeypatch) -> None:
    from eqaudit.reports import console

    monkeypatch.setattr(console.stdout, "width", 80)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    text = clean(result.stdout)
    wide = [line for line in text.splitlines() if len(line) > 80]
    assert len(wide) == 1 and wide[0].startswith("Report written to")  # a path, never folded
    # Every output row whole, its confidence interval included; the resampling note below.
    for transform in ("antitranspose", "rot30", "shift_y-2"):
        row = rf"^ ?{transform} +\d+\.\d% +\d+\.\d%–\d+\.\d% +[\d.e-]+ +[\d.e-]+ +\d+\.\d% *$"
        assert re.search(row, text, re.MULTILINE), (transform, text)
    assert re.search(r"^note: rot30 resampled: interpolation floor 0\.0\d+$", text, re.MULTILINE)
    # Layer rows keep their numbers whole; a long name folds onto the next line.
    assert re.search(r"Relu +rot180 +0\.\d+ +0\.\d+ +0\.\d+ *$", text, re.MULTILINE), text


def test_demo_summary_folds_rather_than_cuts_in_a_60_column_terminal(
    tmp_path: Path, monkeypatch
) -> None:
    from eqaudit.reports import console

    monkeypatch.setattr(console.stdout, "width", 60)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    text = clean(result.stdout)
    wide = [line for line in text.splitlines() if len(line) > 60]
    assert all(line.startswith("Report written to") for line in wide), wide
    assert "…" not in text  # nothing cut with an ellipsis, numbers least of all
    assert re.search(r"rel err +p95 +cos dist *$", text, re.MULTILINE), text  # no column lost


def _script() -> list[str]:
    script = shutil.which("eqaudit")
    if script is None:  # not on PATH (a venv that is not activated): its own bin folder
        candidate = Path(sys.executable).with_name("eqaudit")
        script = str(candidate) if candidate.is_file() else None
    return [script] if script else [sys.executable, "-m", "eqaudit"]


def test_installed_script_as_subprocess(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07not really onnx" * 50)
    out = tmp_path / "out"
    proc = subprocess.run(
        [*_script(), "check", str(bad), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == EXIT_MODEL, proc.stderr
    stderr = clean(proc.stderr)
    assert "Traceback" not in stderr + proc.stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert not out.exists()

    module = subprocess.run(
        [sys.executable, "-m", "eqaudit", "transforms"], capture_output=True, text=True, timeout=120
    )
    assert module.returncode == 0, module.stderr
    assert "d4" in module.stdout


def test_messages_with_brackets_print_as_written(capsys) -> None:
    # Names and advice carry brackets: rich must not read them as markup and drop them.
    from eqaudit.reports import console

    console.error("pip install 'eqaudit[ray]': agreement[rot90] failed")
    console.warn("layer [bold]x[/] of blocks[0]")
    err = capsys.readouterr().err
    assert "pip install 'eqaudit[ray]': agreement[rot90] failed" in err
    assert "layer [bold]x[/] of blocks[0]" in err


class Bracketed(torch.nn.Module):
    """Module names with brackets (legal ModuleDict keys), which ONNX names keep."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stages = torch.nn.ModuleDict(
            {"stage[/]1": torch.nn.Conv2d(3, 4, 3, padding=1), "x[bold]2": torch.nn.ReLU()}
        )
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stages["x[bold]2"](self.stages["stage[/]1"](x))
        return self.fc(y[..., 1:, :].mean((2, 3)))  # not invariant: the layers are listed


def test_layer_names_with_brackets_print_as_written(tmp_path: Path) -> None:
    # '[/]' in a layer name crashed the summary (rich markup) after the report was written.
    path = export_onnx(Bracketed().eval(), tmp_path / "bracketed.onnx", 9)
    result = runner.invoke(app, ["check", str(path), "-n", "4", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    text = clean(result.stdout)
    assert "/stage[/]1/Conv_output_0" in text
    assert "/x[bold]2/Relu_output_0" in text
    inspected = runner.invoke(app, ["inspect", str(path)])
    assert inspected.exit_code == 0, inspected.output
    assert "/stage[/]1/Conv_output_0" in clean(inspected.stdout)


def test_inspect_marks_off_centre_grids_where_80_columns_cannot_cut_the_mark(
    monkeypatch, capsys
) -> None:
    from eqaudit.inspect import inspect_model
    from eqaudit.reports import console

    monkeypatch.setattr(console.stdout, "width", 80)
    info = inspect_model(symmetric_cnn(size=32), input_size=(32, 32))  # even: strided off-centre
    console.print_inspection(info)
    text = clean(capsys.readouterr().out)
    assert max(len(line) for line in text.splitlines()) <= 80
    marks = {
        "conv2": "2x2 @ 0,0 (16x16)*",
        "conv3": "4x4 @ 0,0 (8x8)*",
        "conv1": "1x1 @ 0,0 (32x32) ",
    }
    for layer, grid in marks.items():
        assert re.search(rf"^ ?\d+ +{layer} .*{re.escape(grid)}", text + " ", re.MULTILINE), text
    assert "*: off-centre" in text
    # (by default such pairs are compared on the map's own grid, not resampled)
    assert "no exact comparison" in " ".join(text.split()) and "resampled" not in text
    assert text.startswith("<module> (torch)\n")  # not the module's repr, nor an empty digest


def test_the_misaligned_note_suggests_resampling_only_when_it_is_not_on(tmp_path: Path) -> None:
    # At an even size the strided grids are not centred: their rows are flagged.
    path = export_onnx(symmetric_cnn(size=32), tmp_path / "even.onnx", 32)
    plain = runner.invoke(app, ["check", str(path), "-n", "2", "-o", str(tmp_path / "a")])
    assert plain.exit_code == 0, plain.output
    text = " ".join(clean(plain.output).split())
    assert "flagged and kept out of the layer scores (try --input-size aligned, or" in text
    resampled = runner.invoke(
        app,
        ["check", str(path), "-n", "2", "--misaligned", "resample", "-o", str(tmp_path / "b")],
    )
    assert resampled.exit_code == 0, resampled.output
    text = " ".join(clean(resampled.output).split())
    assert "compared by resampling (approximate)" in text
    assert "--misaligned resample)" not in text


def test_version_prints_the_installed_version_and_exits() -> None:
    import eqaudit

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"eqaudit {eqaudit.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", eqaudit.__version__)
