"""Bad inputs end with a documented exit code, one ``error:`` line, no traceback and no report.

Exit codes (eqaudit/errors.py): 2 for usage, option and input-data errors, 3 for a model that
cannot be loaded or run. Every bad file is built here, in a temporary folder.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from models_zoo import export_onnx, symmetric_cnn
from onnx import TensorProto, helper
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from eqaudit.cli import app
from eqaudit.errors import EXIT_MODEL, EXIT_USAGE

SIZE = 33
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

runner = CliRunner()
Files = dict[str, Path]


class CreatesFile:
    """Unpickling this object creates ``path``: proof that a file was (or was not) unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


class NaNScores(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = symmetric_cnn(size=SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * float("nan")


class TokenMap(nn.Module):
    """Not a classifier: (N, C, H, W) -> (N, H*W, K), a sequence of per-pixel scores."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).transpose(1, 2)


def _save_graph(path: Path, nodes, inputs, outputs, initializers=(), domains=()) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in domains]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def _float_input(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    """Every bad (and one good) input, built once for the module."""
    root = tmp_path_factory.mktemp("bad_inputs")
    f: Files = {"missing_model": root / "nope.onnx", "missing_data": root / "nowhere"}
    f["good"] = export_onnx(symmetric_cnn(size=SIZE), root / "good.onnx", SIZE)
    good_bytes = f["good"].read_bytes()

    f["empty"] = root / "empty.onnx"
    f["empty"].write_bytes(b"")
    f["truncated"] = root / "truncated.onnx"
    f["truncated"].write_bytes(good_bytes[: len(good_bytes) // 2])
    f["random"] = root / "random.onnx"
    f["random"].write_bytes(np.random.default_rng(0).bytes(4096))

    f["two_inputs"] = _save_graph(
        root / "two_inputs.onnx",
        [helper.make_node("Add", ["a", "b"], ["sum"])],
        [_float_input("a", [1, 3, 8, 8]), _float_input("b", [1, 3, 8, 8])],
        [_float_input("sum", [1, 3, 8, 8])],
    )
    embedding = helper.make_tensor(
        "embedding", TensorProto.FLOAT, [100, 8], np.linspace(0, 1, 800, dtype=np.float32)
    )
    f["int64"] = _save_graph(
        root / "sequence.onnx",
        [
            helper.make_node("Gather", ["embedding", "tokens"], ["embedded"]),
            helper.make_node("ReduceMean", ["embedded"], ["pooled"], axes=[1], keepdims=0),
        ],
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["N", 16])],
        [_float_input("pooled", ["N", 8])],
        [embedding],
    )
    f["rank3_output"] = export_onnx(TokenMap().eval(), root / "tokens.onnx", 16)
    f["custom_op"] = _save_graph(
        root / "custom_op.onnx",
        [helper.make_node("MadeUpOp", ["image"], ["scores"], domain="com.example")],
        [_float_input("image", [1, 3, 8, 8])],
        [_float_input("scores", [1, 5])],
        domains=["com.example"],
    )
    f["nan"] = export_onnx(NaNScores().eval(), root / "nan.onnx", SIZE)
    f["dynamic"] = root / "dynamic.onnx"
    torch.onnx.export(
        symmetric_cnn(size=SIZE),
        (torch.zeros(1, 3, SIZE, SIZE),),
        str(f["dynamic"]),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["scores"],
        dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "scores": {0: "batch"}},
    )

    f["pickle_marker"] = root / "pickle_ran"
    f["pickle"] = root / "model.pt"
    torch.save(CreatesFile(f["pickle_marker"]), f["pickle"])
    f["state_dict"] = root / "weights.pt"
    torch.save(symmetric_cnn(size=SIZE).state_dict(), f["state_dict"])

    f["npy_marker"] = root / "npy_unpickled"
    f["object_npy"] = root / "objects.npy"
    np.save(f["object_npy"], np.array([CreatesFile(f["npy_marker"])], dtype=object))
    f["rank2_npy"] = root / "one_image.npy"
    np.save(f["rank2_npy"], np.zeros((SIZE, SIZE), np.float32))

    f["empty_dir"] = root / "no_images"
    f["empty_dir"].mkdir()
    (f["empty_dir"] / "notes.txt").write_text("not an image")
    f["unreadable_dir"] = root / "unreadable"
    f["unreadable_dir"].mkdir()
    (f["unreadable_dir"] / "a.png").write_bytes(b"this is not a png")
    (f["unreadable_dir"] / "b.jpg").write_bytes(b"")
    f["images"] = root / "images"
    f["images"].mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(f["images"] / f"{i}.png")
    f["a_file"] = root / "a_file.txt"
    f["a_file"].write_text("keep me")
    return f


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Files], list[str]]
    code: int
    words: tuple[str, ...] = ()  # the error line must contain each of these


def args(model: str, *options: str, data: str | None = "images") -> Callable[[Files], list[str]]:
    """Command-line arguments after ``check``, naming files of the fixture by key."""
    return lambda f: [str(f[model]), *(["--data", str(f[data])] if data else []), *options]


CASES = [
    # model files (exit 3, except a state dict that only lacks its --factory)
    Case("missing-model", args("missing_model"), EXIT_MODEL, ("does not exist",)),
    Case("directory-as-model", args("images"), EXIT_MODEL, ("directory",)),
    Case("empty-onnx", args("empty"), EXIT_MODEL, ("empty",)),
    Case("truncated-onnx", args("truncated"), EXIT_MODEL, ("re-export",)),
    Case("random-bytes-onnx", args("random"), EXIT_MODEL, ("re-export",)),
    Case("two-inputs", args("two_inputs"), EXIT_MODEL, ("2 inputs",)),
    Case("int64-sequence-model", args("int64"), EXIT_MODEL, ("int64",)),
    Case("rank3-output", args("rank3_output"), EXIT_MODEL, ("not (batch, classes)",)),
    Case("custom-domain-op", args("custom_op"), EXIT_MODEL, ("MadeUpOp",)),
    Case("nan-scores", args("nan"), EXIT_MODEL, ("NaN",)),
    Case("pickle-refused", args("pickle"), EXIT_MODEL, ("--trust-pickle",)),
    Case("state-dict-without-factory", args("state_dict"), EXIT_USAGE, ("--factory",)),
    # options (exit 2)
    Case("transform-d5", args("good", "--transforms", "d5"), EXIT_USAGE, ("d5",)),
    Case("transform-rot-abc", args("good", "-t", "rot:abc"), EXIT_USAGE, ("abc",)),
    Case("transform-shift-empty", args("good", "-t", "shift:"), EXIT_USAGE, ("shift",)),
    Case(
        "shift-mode", args("good", "-t", "shift:2", "--shift-mode", "wrap"), EXIT_USAGE, ("wrap",)
    ),
    Case("preset", args("good", "--preset", "imagenett"), EXIT_USAGE, ("imagenet",)),
    Case("input-size-garbage", args("good", "--input-size", "big"), EXIT_USAGE, ("HxW",)),
    Case("input-size-contradicts", args("good", "--input-size", "64"), EXIT_USAGE, ("33x33",)),
    Case("dynamic-size", args("dynamic"), EXIT_USAGE, ("pass --input-size",)),
    Case("channels-gray-for-rgb", args("good", "--channels", "gray"), EXIT_USAGE, ("--channels",)),
    Case("layers-match-nothing", args("good", "--layers", "nomatch*"), EXIT_USAGE, ("inspect",)),
    Case("num-images-0", args("good", "--num-images", "0"), EXIT_USAGE, ("--num-images",)),
    Case("batch-size-0", args("good", "--batch-size", "0"), EXIT_USAGE, ("--batch-size",)),
    # data (exit 2)
    Case("data-without-images", args("good", data="empty_dir"), EXIT_USAGE, ("no images",)),
    Case("data-all-unreadable", args("good", data="unreadable_dir"), EXIT_USAGE, ("be read",)),
    Case("data-missing", args("good", data="missing_data"), EXIT_USAGE, ("does not exist",)),
    Case("npy-object-dtype", args("good", data="object_npy"), EXIT_USAGE, ("object",)),
    Case("npy-wrong-rank", args("good", data="rank2_npy"), EXIT_USAGE, ("(N,H,W",)),
]


def error_line(result) -> str:
    """The single ``error:`` line of a failed run; fails the test on anything else."""
    output, stderr = ANSI.sub("", result.output), ANSI.sub("", result.stderr)
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    # Nothing else on stderr: no warnings, no progress bar, no second line.
    assert stderr.strip().splitlines() == errors, stderr
    return errors[0]


def assert_no_report(out: Path) -> None:
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, files: Files, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["check", *case.args(files), "--out", str(out)])
    assert result.exit_code == case.code, result.output
    line = error_line(result)
    for word in case.words:
        assert word in line
    assert_no_report(out)


def test_pickle_and_object_array_are_never_unpickled(files: Files, tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(CreatesFile(probe)))
    assert probe.exists()  # the marker works: unpickling would create it

    runs = (
        ["check", str(files["pickle"]), "--out", str(tmp_path / "out")],
        ["inspect", str(files["pickle"])],
        ["check", *args("good", data="object_npy")(files), "--out", str(tmp_path / "out")],
    )
    for argv in runs:
        result = runner.invoke(app, argv)
        assert result.exit_code in (EXIT_USAGE, EXIT_MODEL), result.output
        error_line(result)
    assert not files["pickle_marker"].exists()
    assert not files["npy_marker"].exists()


def test_custom_op_fails_at_load(files: Files) -> None:
    result = runner.invoke(app, ["inspect", str(files["custom_op"])])
    assert result.exit_code == EXIT_MODEL
    assert "MadeUpOp" in error_line(result)


def test_bad_input_leaves_an_existing_report_alone(files: Files, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    result = runner.invoke(app, ["check", str(files["truncated"]), "--out", str(out)])
    assert result.exit_code == EXIT_MODEL
    error_line(result)
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
    assert (out / "summary.json").read_text() == "{}"


def test_out_is_a_file(files: Files) -> None:
    for out in (files["a_file"], files["a_file"] / "sub"):
        result = runner.invoke(app, ["check", *args("good")(files), "--out", str(out)])
        assert result.exit_code == EXIT_USAGE
        assert "file" in error_line(result)
    assert files["a_file"].read_text() == "keep me"


def test_out_not_writable(files: Files, tmp_path: Path) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running with privileges that ignore directory permissions (root?)")
        out = parent / "out"
        result = runner.invoke(app, ["check", *args("good")(files), "--out", str(out)])
        assert result.exit_code == EXIT_USAGE
        assert "--out" in error_line(result)
        assert not out.exists()
    finally:
        parent.chmod(0o700)
