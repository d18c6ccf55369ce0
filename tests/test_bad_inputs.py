"""Bad inputs end with a documented exit code, one ``error:`` line, no traceback and no report.

Exit codes (eqaudit/errors.py): 2 for usage, option and input-data errors, 3 for a model that
cannot be loaded or run. Every bad file is built here, in a temporary folder.

Some inputs are not errors: the right answer is to handle them with a visible note (grayscale
images fed to an RGB model are converted; one unreadable image among good ones is skipped and
counted). Those cases (:data:`HANDLED`) must write the report and show the note in it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from models_zoo import ConvHead, SmallCNN, export_onnx, symmetric_cnn
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


class InfScores(NaNScores):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * float("inf")


class ConstantScores(nn.Module):
    """Ignores its input: the same logits for every image (class 4 always wins)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)
        self.register_buffer("logits", torch.linspace(-1.0, 1.0, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(1, 2, 3))[:, None] * 0.0 + self.logits


class DenseMap(nn.Module):
    """Not a classifier: (N, C, H, W) -> (N, K, H, W), a score map per pixel (segmentation)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


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
    model = helper.make_model(graph, opset_imports=opsets)
    # Opset 17's own IR version, not the onnx package's newest (IR 14 with onnx 1.23, which
    # onnxruntime 1.30 refuses): the case must fail for its own reason on any onnxruntime.
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _float_input(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _png_folder(folder: Path, images: dict[str, Image.Image | bytes]) -> Path:
    folder.mkdir()
    for name, image in images.items():
        if isinstance(image, bytes):
            (folder / name).write_bytes(image)
        else:
            image.save(folder / name)
    return folder


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
    f["pt2_from_torch_save"] = root / "renamed.pt2"
    f["pt2_from_torch_save"].write_bytes(f["state_dict"].read_bytes())
    f["pt2_random"] = root / "random.pt2"
    f["pt2_random"].write_bytes(np.random.default_rng(2).bytes(4096))

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

    # -- graphs that are not image classifiers, or that fail ----------------------------------
    weights = helper.make_tensor("w", TensorProto.FLOAT, [8, 5], np.ones(40, np.float32))
    f["rank2_input"] = _save_graph(
        root / "rank2_input.onnx",
        [helper.make_node("MatMul", ["features", "w"], ["scores"])],
        [_float_input("features", ["N", 8])],
        [_float_input("scores", ["N", 5])],
        [weights],
    )
    f["rank5_input"] = _save_graph(
        root / "rank5_input.onnx",
        [helper.make_node("ReduceMean", ["video"], ["scores"], axes=[2, 3, 4], keepdims=0)],
        [_float_input("video", ["N", 3, 4, SIZE, SIZE])],
        [_float_input("scores", ["N", 3])],
    )
    f["dense_map"] = export_onnx(DenseMap().eval(), root / "segmenter.onnx", SIZE)
    f["inf"] = export_onnx(InfScores().eval(), root / "inf.onnx", SIZE)
    # Reshape (N, 3, 33, 33) to (5, -1): valid for the graph, impossible for a batch of one.
    target = helper.make_tensor("target", TensorProto.INT64, [2], np.array([5, -1], np.int64))
    f["runtime_failure"] = _save_graph(
        root / "reshape_fails.onnx",
        [helper.make_node("Reshape", ["image", "target"], ["scores"])],
        [_float_input("image", ["N", 3, SIZE, SIZE])],
        [_float_input("scores", [5, None])],
        [target],
    )
    f["two_outputs"] = _save_graph(
        root / "two_outputs.onnx",
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["scores"]),
            helper.make_node("Relu", ["scores"], ["more_scores"]),
        ],
        [_float_input("image", ["N", 3, SIZE, SIZE])],
        [_float_input("scores", ["N", 3]), _float_input("more_scores", ["N", 3])],
    )

    # -- arrays of the wrong dtype or rank ------------------------------------------------------
    for name, array in {
        "complex_npy": np.zeros((2, SIZE, SIZE, 3), np.complex64),
        "string_npy": np.full((2, SIZE, SIZE, 3), "a"),
        "rank1_npy": np.zeros(SIZE, np.float32),
        "rank5_npy": np.zeros((2, 2, SIZE, SIZE, 3), np.float32),
    }.items():
        f[name] = root / f"{name}.npy"
        np.save(f[name], array)
    # zips named .npz whose members are not .npy files (numpy hands those out as bytes)
    f["zip_of_text"] = root / "text_zip.npz"
    with zipfile.ZipFile(f["zip_of_text"], "w") as archive:
        archive.writestr("a.txt", "hello")
    f["zip_images_not_npy"] = root / "images_not_npy.npz"
    with zipfile.ZipFile(f["zip_images_not_npy"], "w") as archive:
        archive.writestr("images", "not an array")

    # -- inputs that are handled, with a note ----------------------------------------------------
    def rgb(side: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))

    good_png = (f["images"] / "0.png").read_bytes()
    f["wrong_declared_output"] = root / "declares_10_classes.onnx"
    declared = onnx.load(str(f["good"]))
    declared.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 10
    onnx.save(declared, str(f["wrong_declared_output"]))
    f["constant"] = export_onnx(ConstantScores().eval(), root / "constant.onnx", SIZE)
    torch.manual_seed(0)
    f["gray_model"] = export_onnx(SmallCNN(in_channels=1).eval(), root / "gray.onnx", SIZE, 1)
    gray = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    f["gray_images"] = _png_folder(
        root / "gray_images", {"a.png": Image.fromarray(gray), "b.png": Image.fromarray(gray.T)}
    )
    sixteen = Image.fromarray(rng.integers(0, 65536, (40, 40)).astype(np.uint16))
    assert sixteen.mode.startswith("I;16")
    f["sixteen_bit"] = _png_folder(root / "sixteen_bit", {"g16.png": sixteen})
    palette = rgb(40).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    f["palette"] = _png_folder(root / "palette", {"p.png": palette})
    f["small_images"] = _png_folder(root / "small_images", {"tiny.png": rgb(9)})
    f["one_unreadable"] = _png_folder(
        root / "one_unreadable", {"good.png": good_png, "broken.png": b"not a png at all"}
    )
    f["one_truncated"] = _png_folder(
        root / "one_truncated", {"good.png": good_png, "cut.png": good_png[: len(good_png) // 2]}
    )
    f["one_empty"] = _png_folder(root / "one_empty", {"good.png": good_png, "empty.png": b""})
    f["one_bomb"] = _png_folder(root / "one_bomb", {"good.png": good_png, "bomb.png": rgb(80)})
    f["root"] = root
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
    Case("pt2-random-bytes", args("pt2_random"), EXIT_MODEL, ("not a zip archive",)),
    Case(
        "pt2-is-a-torch-save-file",
        args("pt2_from_torch_save"),
        EXIT_MODEL,
        ("archive_format", "torch.export.save"),
    ),
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
    # torch.manual_seed overflowed past 2**64 - 1 (ValueError, exit 4)
    Case(
        "seed-past-int64",
        args("good", "--seed", "18446744073709551616"),
        EXIT_USAGE,
        ("--seed must be a whole number from 0 to 9223372036854775807 (2**63 - 1), not 1844",),
    ),
    Case(
        "seed-just-past-int64",
        args("good", "--seed", str(2**63)),
        EXIT_USAGE,
        (f"not {2**63}",),
    ),
    # data (exit 2)
    Case("data-without-images", args("good", data="empty_dir"), EXIT_USAGE, ("no images",)),
    Case("data-all-unreadable", args("good", data="unreadable_dir"), EXIT_USAGE, ("be read",)),
    Case("data-missing", args("good", data="missing_data"), EXIT_USAGE, ("does not exist",)),
    Case("npy-object-dtype", args("good", data="object_npy"), EXIT_USAGE, ("object",)),
    Case("npy-wrong-rank", args("good", data="rank2_npy"), EXIT_USAGE, ("(N,H,W",)),
    # more graphs that are not image classifiers, or fail (exit 3)
    Case("rank2-input", args("rank2_input"), EXIT_MODEL, ("rank 2", "(N, C, H, W)")),
    Case("rank5-input", args("rank5_input"), EXIT_MODEL, ("rank 5", "(N, C, H, W)")),
    Case("dense-map-output", args("dense_map"), EXIT_MODEL, ("(1, 5, 33, 33)", "classes")),
    Case("inf-scores", args("inf"), EXIT_MODEL, ("Inf",)),
    Case("runtime-failure", args("runtime_failure"), EXIT_MODEL, ("run time", "reshape")),
    Case("two-outputs", args("two_outputs"), EXIT_USAGE, ("2 outputs", "--output-name")),
    Case(
        "output-name-unknown",
        args("good", "--output-name", "logits"),
        EXIT_USAGE,
        ("'logits'", "scores"),
    ),
    # more data (exit 2)
    Case("npy-complex-dtype", args("good", data="complex_npy"), EXIT_USAGE, ("complex64",)),
    Case("npy-string-dtype", args("good", data="string_npy"), EXIT_USAGE, ("dtype <U1",)),
    Case("npy-rank1", args("good", data="rank1_npy"), EXIT_USAGE, ("(N,H,W",)),
    Case("npy-rank5", args("good", data="rank5_npy"), EXIT_USAGE, ("(N,H,W",)),
    # a zip whose members are not .npy files: an AttributeError on bytes (exit 4)
    Case("npz-of-text-files", args("good", data="zip_of_text"), EXIT_USAGE, ("no image array",)),
    Case(
        "npz-images-not-npy",
        args("good", data="zip_images_not_npy"),
        EXIT_USAGE,
        ("'images' in", "is not a .npy array"),
    ),
    Case(
        "labels-file-missing",
        args("good", "--labels", "nowhere.txt"),
        EXIT_USAGE,
        ("nowhere.txt",),
    ),
    # more unknown options (exit 2)
    Case("preset-unknown", args("good", "--preset", "vgg"), EXIT_USAGE, ("vgg", "caffe")),
    Case("resize-unknown", args("good", "--resize", "squash"), EXIT_USAGE, ("squash", "crop")),
    Case("channels-unknown", args("good", "--channels", "cmyk"), EXIT_USAGE, ("cmyk", "bgr")),
    Case("layout-unknown", args("good", "--layout", "NWHC"), EXIT_USAGE, ("NWHC", "NHWC")),
    Case(  # it said that the model takes 33-channel inputs, not that --layout read it so
        "layout-contradicts-the-shape",
        args("good", "--layout", "NHWC"),
        EXIT_USAGE,
        ("--layout NHWC reads the model's input as 33-channel images: check --layout",),
    ),
    Case("outputs-unknown", args("good", "--outputs", "scores"), EXIT_USAGE, ("scores", "probs")),
    Case("mean-not-numbers", args("good", "--mean", "0.5,a"), EXIT_USAGE, ("--mean",)),
    Case("mean-wrong-length", args("good", "--mean", "0.1,0.2"), EXIT_USAGE, ("2 values",)),
    Case("std-zero", args("good", "--std", "0"), EXIT_USAGE, ("--std", "positive")),
    Case("scale-negative", args("good", "--scale", "-1"), EXIT_USAGE, ("--scale",)),
    Case("transform-rot-inf", args("good", "-t", "rot:inf"), EXIT_USAGE, ("finite",)),
    Case("shift-negative", args("good", "-t", "shift:-2"), EXIT_USAGE, ("positive",)),
    Case("shift-beyond-input", args("good", "-t", "shift:1e9"), EXIT_USAGE, ("out of view",)),
    Case(
        "label-action-not-a-permutation",
        args("good", "--label-action", "rot90=1,1,2,3,4"),
        EXIT_USAGE,
        ("permutation",),
    ),
    # conflicting options (exit 2)
    Case(
        "layers-and-no-layers",
        args("good", "--layers", "x", "--no-layers"),
        EXIT_USAGE,
        ("--layers", "--no-layers"),
    ),
    Case(
        "factory-with-onnx",
        args("good", "--factory", "build.py:build"),
        EXIT_USAGE,
        ("--factory", "ONNX"),
    ),
    Case("trust-pickle-with-onnx", args("good", "--trust-pickle"), EXIT_USAGE, ("--trust-pickle",)),
    Case(
        "input-name-with-pytorch",
        args("state_dict", "--input-name", "image"),
        EXIT_USAGE,
        ("--input-name", "ONNX"),
    ),
    Case(
        "layout-unknown-with-pytorch", args("state_dict", "--layout", "CHW"), EXIT_USAGE, ("CHW",)
    ),
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


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of everything under ``folder``: proof that nothing was added or changed."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current folder, so that a stray relative write (or a config file) shows."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(
    case: Case, files: Files, tmp_path: Path, workdir: Path, capfd: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    before = snapshot(files["root"])
    capfd.readouterr()
    result = runner.invoke(app, ["check", *case.args(files), "--out", str(out)])
    assert result.exit_code == case.code, result.output
    line = error_line(result)
    for word in case.words:
        assert word in line
    assert_no_report(out)
    # Nothing else on disk changed: the input files, the current folder.
    assert snapshot(files["root"]) == before
    assert list(workdir.iterdir()) == []
    # Native libraries (onnxruntime, torch's logging) write to file descriptor 2 directly,
    # around the CliRunner: a second line there would break the one-line contract.
    native = capfd.readouterr()
    assert native.err == "" and native.out == "", native


@dataclass(frozen=True)
class Handled:
    """An input that is handled, not refused: the report is written and says what was done."""

    id: str
    args: Callable[[Files], list[str]]
    notes: tuple[str, ...] = ()  # each must appear in summary.json's data notes
    skipped: tuple[str, ...] = ()  # each must appear in summary.json's skipped files
    count: int | None = None  # images audited
    max_image_pixels: int | None = None  # PIL.Image.MAX_IMAGE_PIXELS for the run


HANDLED = [
    Handled("gray-images-for-rgb-model", args("good", data="gray_images"),
            ("2 grayscale images converted to RGB",), count=2),
    Handled("rgb-images-for-gray-model", args("gray_model"),
            ("2 colour images converted to grayscale",), count=2),
    Handled("sixteen-bit-png", args("good", data="sixteen_bit"),
            ("1 grayscale image converted to RGB",), count=1),
    Handled("palette-png", args("good", data="palette"), count=1),
    Handled("image-smaller-than-input", args("good", data="small_images"),
            ("smaller than 33x33 upscaled",), count=1),
    Handled("one-unreadable-image", args("good", data="one_unreadable"),
            skipped=("broken.png: cannot identify image file",), count=1),
    Handled("one-truncated-image", args("good", data="one_truncated"),
            skipped=("cut.png",), count=1),
    Handled("one-zero-byte-image", args("good", data="one_empty"),
            skipped=("empty.png: empty file (0 bytes)",), count=1),
    Handled("decompression-bomb", args("good", data="one_bomb"),
            skipped=("bomb.png", "decompression bomb"), count=1, max_image_pixels=40 * 40 * 2),
]  # fmt: skip


@pytest.mark.parametrize("case", HANDLED, ids=[c.id for c in HANDLED])
def test_handled_input(
    case: Handled, files: Files, tmp_path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if case.max_image_pixels is not None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", case.max_image_pixels)
    out = tmp_path / "out"
    before = snapshot(files["root"])
    result = runner.invoke(app, ["check", *case.args(files), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "error:" not in result.output
    summary = json.loads((out / "summary.json").read_text())
    data = summary["data"]
    notes, skipped = " | ".join(data["notes"]), " | ".join(data["skipped"])
    for note in case.notes:
        assert note in notes
    for reason in case.skipped:
        assert reason in skipped
    assert len(data["skipped"]) == (1 if case.skipped else 0)
    # Among the warnings too, so summary.md and a CI log show it (it was console-only).
    skip_warnings = [w for w in summary["warnings"] if "unreadable image(s) skipped" in w]
    assert len(skip_warnings) == (1 if case.skipped else 0)
    if case.count is not None:
        assert data["count"] == case.count
    # The report a person opens shows the notes too.
    html = (out / "report.html").read_text()
    for note in case.notes:
        assert note in html
    if case.skipped:
        assert "skipped" in html
    assert snapshot(files["root"]) == before
    assert list(workdir.iterdir()) == []


def test_wrong_declared_output_shape_uses_the_real_output(files: Files, tmp_path: Path) -> None:
    """The graph declares (N, 10) but produces (N, 5): the numbers come from the real output."""
    out = tmp_path / "out"
    declared = onnx.load(str(files["wrong_declared_output"])).graph.output[0]
    assert declared.type.tensor_type.shape.dim[1].dim_value == 10
    result = runner.invoke(app, ["check", *args("wrong_declared_output")(files), "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["num_classes"] == 5
    reference = json.loads(
        (_check(files, "good", tmp_path / "reference") / "summary.json").read_text()
    )
    assert summary["outputs"] == reference["outputs"]


def _check(files: Files, model: str, out: Path) -> Path:
    result = runner.invoke(app, ["check", *args(model)(files), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_constant_outputs_are_audited(files: Files, tmp_path: Path) -> None:
    """A model that ignores its input is trivially invariant: agreement 1 and JS 0 are the true
    numbers, so the audit runs and reports them (see the next test for the warning)."""
    summary = json.loads((_check(files, "constant", tmp_path) / "summary.json").read_text())
    measured = [r for r in summary["outputs"] if r["skipped"] is None]
    assert {r["agreement"] for r in measured} == {1.0}
    assert max(r["js_divergence"] for r in measured) < 1e-12


def test_constant_outputs_are_flagged(files: Files, tmp_path: Path) -> None:
    summary = json.loads((_check(files, "constant", tmp_path) / "summary.json").read_text())
    assert any("constant" in w.lower() for w in summary["warnings"]), summary["warnings"]


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


# onnxruntime 1.30's words for a model stamped with a newer ONNX IR than it reads (seen with onnx
# 1.23's default, IR 14), C++ signature and all; and for an opset newer than it supports (1.30
# and 1.32 alike), whose signature has a return type and nested parentheses.
NEWER_IR = (
    "[ONNXRuntimeError] : 1 : FAIL : Load model from /home/me/m.onnx failed:/onnxruntime_src/"
    "onnxruntime/core/graph/model.cc:202 onnxruntime::Model::Model(onnx::ModelProto&&, const "
    "onnxruntime::PathString&, const onnxruntime::IOnnxRuntimeOpSchemaRegistryList*, const "
    "onnxruntime::logging::Logger&, const onnxruntime::ModelOptions&) Unsupported model IR "
    "version: 14, max supported IR version: 13\n"
)
NEWER_OPSET = (
    "[ONNXRuntimeError] : 1 : FAIL : Load model from /m.onnx failed:/onnxruntime_src/onnxruntime/"
    "core/graph/model_load_utils.h:46 void onnxruntime::model_load_utils::ValidateOpsetForDomain("
    "const std::unordered_map<std::__cxx11::basic_string<char>, int>&, const onnxruntime::"
    "logging::Logger&, bool, const std::string&, int) ONNX Runtime only *guarantees* support for "
    "models stamped with official released onnx opset versions. Opset 27 is under development "
    "and support for this is limited. The operator schemas and or other functionality may change "
    "before next ONNX release and in this case ONNX Runtime will not guarantee backward "
    "compatibility. Current official support for domain ai.onnx is till opset 26."
)


@pytest.mark.parametrize(
    ("message", "says"),
    [
        (NEWER_IR, "'good.onnx' is ONNX IR version 14, newer than onnxruntime"),
        (NEWER_OPSET, "'good.onnx' uses opset 27 of ai.onnx, newer than onnxruntime"),
    ],
)
def test_a_model_newer_than_onnxruntime_says_to_upgrade_it(
    files: Files, monkeypatch, message: str, says: str
) -> None:
    import onnxruntime

    def refuse(*_args, **_kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    result = runner.invoke(app, ["check", str(files["good"]), "--transforms", "flips"])
    assert result.exit_code == EXIT_MODEL
    line = error_line(result)
    assert says in line and "pip install -U onnxruntime" in line
    assert re.search(r"\(up to (13|26)\)", line)


def test_onnxruntime_messages_keep_their_cause_without_the_cpp_noise() -> None:
    from eqaudit.models.onnx_adapter import _ort_message, _shortened

    assert _ort_message(RuntimeError(NEWER_IR.replace("Unsupported model IR", "Bad IR"))) == (
        "Bad IR version: 14, max supported IR version: 13"
    )
    opset = _ort_message(RuntimeError(NEWER_OPSET))
    assert opset.startswith("ONNX Runtime only *guarantees*") and "onnxruntime_src" not in opset
    # A provider's error quoted inside another, after a signature with a reference return type.
    quoted = _ort_message(
        RuntimeError(
            "[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/session/"
            "provider_bridge_ort.cc:1193 onnxruntime::Provider& onnxruntime::ProviderLibrary::"
            "Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library libonnxruntime_"
            "providers_cuda.so with error: libcublasLt.so.12: cannot open shared object file"
        )
    )
    assert quoted.startswith("Failed to load library libonnxruntime_providers_cuda.so")
    # A run-time error (onnxruntime 1.32) names its C++ file and function before the cause.
    ran = _ort_message(
        RuntimeError(
            "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Concat "
            "node. Name:'/Concat' Status Message: concatbase.h:135 PrepareForComputeImpl Non "
            "concat axis dimensions must match: Axis 0 has mismatched dimensions of 1 and 2"
        )
    )
    assert ran == (
        "Non-zero status code returned while running Concat node. Name:'/Concat' Status "
        "Message: Non concat axis dimensions must match: Axis 0 has mismatched dimensions of 1 "
        "and 2"
    )
    # Shortened in the middle: the cause, stated last, survives.
    short = _shortened(opset, 120)
    assert len(short) <= 123 and short.endswith("is till opset 26.")


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


class NaNForBrightImages(NaNScores):
    """NaN scores for images brighter than any synthetic one: only where a bright image is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = x.mean(dim=(1, 2, 3)) > 0.9  # the model sees raw [0, 1] pixels here
        return torch.where(bright[:, None], float("nan"), self.inner(x))


def test_nan_scores_in_a_later_batch_are_refused_with_their_count() -> None:
    # Batches of 2 images x 8 elements; the bright image is the third, so the first batch is
    # clean and the error comes from the second: its 8 transformed copies, of 16 inputs.
    import eqaudit
    from eqaudit.errors import ModelRunError

    images = np.random.default_rng(0).uniform(0.1, 0.6, size=(4, SIZE, SIZE, 3))
    images[2] = 1.0
    # Every element of the bright image: all eight are named (four, then "...").
    with pytest.raises(
        ModelRunError,
        match=r"NaN or Inf scores for 8 of 16 inputs \(under id, rot90, rot180, "
        r"rot270 \.\.\.\)",
    ):
        eqaudit.audit(
            NaNForBrightImages().eval(),
            "d4",
            data=images.astype(np.float32),
            input_size=SIZE,
            batch_size=16,
            preset="unit",
            layers=False,
        )


class InfWhereBright(nn.Module):
    """Its input, or Inf for the images brighter than 0.5 (mean pixel): a layer of its own."""

    def forward(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        bright = x.mean(dim=(1, 2, 3), keepdim=True) > 0.5  # raw [0, 1] pixels here
        return features * torch.where(bright, float("inf"), 1.0)


class InfLayerForBrightImages(ConvHead):
    """Layers ``conv``, ``blow`` (``conv``, or Inf for bright images) and ``fc``; its scores
    stay finite (the Infs are zeroed before the head)."""

    def __init__(self) -> None:
        super().__init__()
        self.blow = InfWhereBright()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nan_to_num(self.blow(self.conv(x), x), posinf=0.0, neginf=0.0))


def _two_bright_of_four() -> np.ndarray:
    """Four [0, 1] images, the second and third bright (Inf at ``blow``), the others dark."""
    images = np.random.default_rng(0).uniform(0.0, 0.4, size=(4, SIZE, SIZE, 3))
    images[[1, 2]] += 0.5
    return images.astype(np.float32)


def test_a_layer_with_inf_activations_for_some_images_leaves_them_out_and_says_so(tmp_path):
    # Used to die in the float64 accumulators ("ExactSum takes finite values only"), exit 4.
    import eqaudit

    torch.manual_seed(0)
    model = InfLayerForBrightImages().eval()
    images = _two_bright_of_four()
    options = dict(input_size=SIZE, batch_size=16, preset="unit", seed=0)
    result = eqaudit.audit(model, "d4", data=images, **options)
    rows = result.to_frame("layers").set_index(["layer", "transform"])
    blow = rows.loc["blow"].iloc[1:]  # the identity is exact whatever the maps
    assert (
        blow["reason"]
        .eq(
            "2 of 4 images gave NaN or Inf activations (or norms past float range) and are left out"
        )
        .all()
    )
    assert blow["measurable"].all()
    # The images left are the dark ones, whose ``blow`` maps are their ``conv`` maps: the same
    # numbers as ``conv`` in an audit of the dark images alone.
    alone = eqaudit.audit(model, "d4", data=images[[0, 3]], **options)
    conv = alone.to_frame("layers").set_index(["layer", "transform"]).loc["conv"].iloc[1:]
    columns = ["relative_error", "relative_error_p95", "relative_error_max", "cosine_distance"]
    assert blow[columns].equals(conv[columns])
    assert rows.loc["conv", "reason"].isna().all()  # the other layers see every image
    assert any(w.startswith("1 layer(s) gave NaN or Inf activations") for w in result.warnings)


def test_lie_derivatives_and_channel_maps_leave_out_a_layers_nonfinite_images():
    # Both died: the Lie sums in ExactSum, the channel map in numpy's eigvalsh on NaN moments.
    import eqaudit

    torch.manual_seed(0)
    result = eqaudit.audit(
        InfLayerForBrightImages().eval(),
        "d4",
        data=_two_bright_of_four(),
        input_size=SIZE,
        preset="unit",
        lie=True,
        channel_map=True,
    )
    rows = result.to_frame("layers").set_index(["layer", "transform"])
    fitted = rows.loc["blow", "fitted_relative_error"].iloc[1:]
    assert fitted.notna().all() and (fitted > 0).all()  # fitted on the two dark images
    assert rows.loc["conv", [c for c in rows.columns if c.startswith("lie_")]].notna().all().all()


class HeadFirst(nn.Module):
    """Defines its 16 -> 5 head before its 3 -> 16 stem: the first Conv2d defined is not the
    first called."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(16, 5, 1)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x)).mean((2, 3))


@pytest.mark.parametrize("fmt", ["module", "torchscript"])
def test_a_wrong_channel_guess_says_where_it_came_from_and_channels_overrides_it(tmp_path, fmt):
    import eqaudit
    from eqaudit.errors import UsageError

    torch.manual_seed(0)
    model: nn.Module = HeadFirst().eval()
    if fmt == "torchscript":
        path = tmp_path / "m.pt"
        torch.jit.save(torch.jit.script(HeadFirst().eval()), path)
        model = path  # type: ignore[assignment]
    options = dict(input_size=SIZE, num_images=2, layers=False)
    with pytest.raises(
        UsageError,
        match=r"guessed 16-channel inputs from its first Conv2d, "
        r"'head' .* --channels rgb, bgr or gray$",
    ):
        eqaudit.audit(model, "flips", **options)
    result = eqaudit.audit(model, "flips", channels="rgb", **options)
    assert result.summary["preprocessing"]["channels"] == "rgb"
    assert [row["n"] for row in result.outputs] == [2, 2, 2]


def _five_classes() -> nn.Module:
    torch.manual_seed(0)

    class Five(ConvHead):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x))

    return Five().eval()


def test_a_label_beyond_the_models_classes_is_a_data_error(tmp_path):
    # It died in the label permutations with an IndexError (exit 4).
    import eqaudit
    from eqaudit.errors import DataError

    images = np.random.default_rng(0).uniform(size=(3, SIZE, SIZE, 3)).astype(np.float32)
    np.savez(tmp_path / "data.npz", images=images, labels=np.array([0, 9, 1]))
    with pytest.raises(DataError, match=r"labelled class 9 but the model gives 5 class scores"):
        eqaudit.audit(_five_classes(), "flips", data=tmp_path / "data.npz", input_size=SIZE)


def test_a_labels_file_naming_more_classes_than_the_model_is_refused_and_fewer_warned(tmp_path):
    import eqaudit
    from eqaudit.errors import DataError

    folder = tmp_path / "images" / "owl"
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "0.png")
    seven = tmp_path / "seven.txt"
    seven.write_text("cat\ndog\nbird\nfish\nfrog\nowl\nbee\n")
    options = dict(data=tmp_path / "images", input_size=SIZE, layers=False)
    with pytest.raises(DataError, match=r"the labels name 7 classes but the model gives 5"):
        eqaudit.audit(_five_classes(), "flips", labels=seven, **options)
    two = tmp_path / "two.txt"
    two.write_text("cat\nowl\n")
    result = eqaudit.audit(_five_classes(), "flips", labels=two, **options)
    assert "the labels name 2 classes and the model gives 5 class scores: classes 2 to 4 " in (
        " ".join(result.warnings)
    )


def test_an_option_without_its_value_points_to_its_commands_help(monkeypatch, capsys):
    # It pointed to 'eqaudit --help', whose page does not list check's options.
    from eqaudit.cli import main

    monkeypatch.setattr("sys.argv", ["eqaudit", "check", "model.onnx", "-t"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Option '-t' requires an argument" in err and "(see 'eqaudit check --help')" in err


class NaNUnderRotation(NaNScores):
    """NaN scores where a rotation's zero fill leaves black corners: only under rot30."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[:, :, 0, 0].sum(dim=1) == 0  # black corner: the fill, raw [0, 1] pixels
        return torch.where(corner[:, None], float("nan"), self.inner(x))


def test_nan_scores_under_one_element_name_it() -> None:
    # It said "NaN or Inf scores for 4 of 16 inputs", not under which transform.
    import eqaudit
    from eqaudit.errors import ModelRunError

    images = np.random.default_rng(0).uniform(0.1, 0.6, size=(4, SIZE, SIZE, 3))
    with pytest.raises(ModelRunError, match=r"for 4 of 16 inputs \(under rot30\): check"):
        eqaudit.audit(
            NaNUnderRotation().eval(),
            "flips,rot:30",
            data=images.astype(np.float32),
            input_size=SIZE,
            preset="unit",
            layers=False,
        )


def test_class_names_in_the_models_metadata_that_do_not_fit_are_dropped_not_fatal(tmp_path):
    # A model naming one class more than it scores (TF's 'background') was refused (exit 2),
    # blaming a labels file nobody gave, by the check meant for --labels.
    import eqaudit

    path = export_onnx(_five_classes(), tmp_path / "m.onnx", SIZE)
    model = onnx.load(str(path))
    names = ["background", "a", "b", "c", "d", "e"]
    onnx.helper.set_model_props(model, {"class_names": json.dumps(names)})
    onnx.save(model, str(path))
    result = eqaudit.audit(str(path), "flips", num_images=2, layers=False)
    assert result.summary["model"]["class_names"] is None
    assert any("the model's metadata names 6 classes but it gives 5" in w for w in result.warnings)


class InfWhereDark(nn.Module):
    """Its input, or Inf for images darker than 0.5 (mean pixel): a rotation's black corners
    darken an image of mean 0.52-0.56 below that, so only the transformed maps are Inf."""

    def forward(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dark = x.mean(dim=(1, 2, 3), keepdim=True) < 0.5
        return features * torch.where(dark, float("inf"), 1.0)


class InfUnderRotation(InfLayerForBrightImages):
    def __init__(self) -> None:
        super().__init__()
        self.blow = InfWhereDark()


def test_the_interpolation_floor_leaves_out_the_images_the_row_leaves_out():
    # The floor (from the reference map alone, finite here) was averaged over the 4 images
    # whose errors the row had left out: a floor beside no error (found by review).
    import eqaudit

    torch.manual_seed(0)
    images = np.random.default_rng(0).uniform(0.52, 0.56, size=(4, SIZE, SIZE, 3))
    result = eqaudit.audit(
        InfUnderRotation().eval(),
        "rot:30",
        data=images.astype(np.float32),
        input_size=SIZE,
        preset="unit",
        # blow's cells read the image's mean, so none is padding-free: compare on the disk
        padding_border="include",
    )
    rows = result.to_frame("layers").set_index(["layer", "transform"])
    blow, conv = rows.loc[("blow", "rot30")], rows.loc[("conv", "rot30")]
    assert blow["reason"].startswith("4 of 4 images gave NaN or Inf activations")
    assert pd.isna(blow["relative_error"]) and pd.isna(blow["interpolation_floor"])
    assert not blow["scored"]  # no image left: out of the layer scores (it was scored)
    assert conv["interpolation_floor"] > 0  # the layer before it keeps its floor


class BatchShape(nn.Module):
    """5 class scores for one image, 3 for a batch: an output sliced by batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = symmetric_cnn(size=SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out if x.shape[0] == 1 else out[:, :3]


class FirstRowOnly(BatchShape):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[:1]


class EveryRowTwice(BatchShape):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return torch.cat([out, out])


class NoClasses(BatchShape):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[:, :0]


class OneScoreEach(BatchShape):
    """A sigmoid head squeezed to (B,): one score per image, a binary classifier."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[:, 0].sigmoid()


@pytest.mark.parametrize("layers", [True, False], ids=["layers", "no-layers"])
@pytest.mark.parametrize(
    ("model", "says"),
    [
        # It died in the engine's reshape (exit 4), or (no layers, no one-image probe)
        # audited 3 classes although one image alone gets 5.
        (
            BatchShape,
            r"^the model's number of classes changes with the batch: (5 for 1 image, "
            r"3 for \d+ images|3 for \d+ images, 5 for 1 image); its output must not depend",
        ),
        (FirstRowOnly, r"^the model returned 1 row of scores for \d+ images \(output shape "),
        # Accepted: 2N rows for N images were read as twice the images.
        (
            EveryRowTwice,
            r"^the model returned (2 rows of scores for 1 image|\d+ rows of scores "
            r"for \d+ images) \(output shape \(\d+, 5\)\): a classifier gives one row",
        ),
        (NoClasses, r"^the model returned 0 classes \(scores of shape \(\d+, 0\)\): it is not"),
    ],
)
def test_scores_that_are_not_one_row_per_image_of_a_fixed_number_of_classes_are_refused(
    model, says, layers
) -> None:
    import eqaudit
    from eqaudit.errors import ModelRunError

    torch.manual_seed(0)
    images = np.random.default_rng(0).uniform(size=(4, SIZE, SIZE, 3)).astype(np.float32)
    with pytest.raises(ModelRunError, match=says):
        eqaudit.audit(model().eval(), "flips", data=images, input_size=SIZE, layers=layers)


def test_one_score_per_image_is_still_read_as_a_binary_classifier() -> None:
    # The row check reads a (B,) output as B rows of one score (it was one row of B scores).
    import eqaudit

    images = np.random.default_rng(0).uniform(size=(4, SIZE, SIZE, 3)).astype(np.float32)
    result = eqaudit.audit(OneScoreEach().eval(), "flips", data=images, input_size=SIZE)
    assert result.summary["model"]["num_classes"] == 2
    assert result.summary["model"]["binary"] == "probs"
    assert [row["n"] for row in result.outputs] == [4, 4, 4]


def test_a_batch_dependent_model_on_the_command_line_is_exit_3_in_one_line(
    files: Files, tmp_path: Path
) -> None:
    factory = tmp_path / "batchshape.py"
    factory.write_text(
        "from test_bad_inputs import BatchShape\n\ndef build():\n    return BatchShape()\n"
    )
    weights = tmp_path / "w.pt"
    torch.manual_seed(0)
    torch.save(BatchShape().state_dict(), weights)
    out = tmp_path / "out"
    argv = ["check", str(weights), "--factory", f"{factory}:build", "--input-size", str(SIZE)]
    result = runner.invoke(app, [*argv, "--data", str(files["images"]), "-o", str(out)])
    assert result.exit_code == EXIT_MODEL, result.output
    assert error_line(result).startswith(
        "error: the model's number of classes changes with the batch: 5 for 1 image, 3 for "
    )
    assert_no_report(out)


def test_inspect_refuses_a_layout_that_contradicts_the_shape_as_check_does(files: Files) -> None:
    # inspect exited 0 with "33 channels, size 3x33" where check refused the same --layout.
    said = "error: --layout NHWC reads the model's input as 33-channel images: check --layout"
    lines = []
    for command in ("inspect", "check"):
        result = runner.invoke(app, [command, str(files["good"]), "--layout", "NHWC"])
        assert result.exit_code == EXIT_USAGE, (command, result.output)
        lines.append(error_line(result))
    assert lines[0] == lines[1] and lines[0].startswith(said)
    right = runner.invoke(app, ["inspect", str(files["good"]), "--layout", "NCHW"])
    assert right.exit_code == 0 and "NCHW (option), 3 channels" in right.output


def _class_folders(root: Path, names: list[str]) -> Path:
    pixels = np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    for name in names:
        (root / name).mkdir(parents=True)
        Image.fromarray(pixels).save(root / name / "0.png")
    return root


def test_a_class_name_listed_twice_is_refused_where_it_must_pick_a_class(tmp_path: Path) -> None:
    # 'circle' on lines 1 and 2 was accepted: circle/ images took class 0, and class 1 had
    # the same name in the report.
    import eqaudit
    from eqaudit.errors import DataError

    labels = tmp_path / "labels.txt"
    labels.write_text("circle\ncircle\n\ncross\nstar\nsquare\n")
    images = _class_folders(tmp_path / "images", ["circle", "cross"])
    options = dict(input_size=SIZE, layers=False, labels=labels)
    with pytest.raises(
        DataError,
        match=rf"^labels file '{re.escape(str(labels))}' lists 'circle' more than once \(lines "
        r"1 and 2\), so the images in 'circle/' have no single class: name each class once$",
    ):
        eqaudit.audit(symmetric_cnn(size=SIZE), "flips", data=images, **options)
    # A label action naming it cannot tell which class either.
    from eqaudit.errors import UsageError

    with pytest.raises(UsageError, match=r"the class name 'circle' is given to classes 0 and 1"):
        eqaudit.audit(
            symmetric_cnn(size=SIZE),
            "flips",
            num_images=2,
            label_action={"flip_h": "swap:circle,cross"},
            **options,
        )


def test_a_class_name_listed_twice_and_not_used_to_pick_a_class_is_a_warning(tmp_path) -> None:
    # ImageNet's usual lists name two classes 'crane' and two 'maillot': refusing them would
    # refuse the labels file of most ImageNet models.
    import eqaudit

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["crane", "owl", "crane", "kite", "bee"]))
    images = _class_folders(tmp_path / "images", ["owl", "kite"])
    result = eqaudit.audit(
        symmetric_cnn(size=SIZE), "flips", data=images, input_size=SIZE, labels=labels
    )
    assert (
        "the class names repeat 'crane' (classes 0 and 2): the report shows those classes under "
        "one name"
    ) in result.warnings
    assert result.summary["data"]["labelled"]


def test_a_quantized_models_state_dict_is_named_as_such(tmp_path: Path) -> None:
    # It was "holds a OrderedDict, not a model or a state dict" (helper-53): it is a state
    # dict, of packed quantized parameters that eqaudit does not load.
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    path = tmp_path / "q.pt"
    torch.save(quantized.state_dict(), path)
    result = runner.invoke(
        app, ["check", str(path), "--factory", "models_zoo:SmallCNN", "--input-size", "5"]
    )
    assert result.exit_code == EXIT_MODEL
    line = error_line(result)
    assert "state dict of a quantized model" in line and "export the quantized one" in line
    assert "UserWarning" not in result.output  # (torch's deprecations of what it loads)
