"""Models, images and names from outside the team are untrusted input (issue 7, security).

* Pickles: a file that would run code when unpickled is refused without ``--trust-pickle``, and a
  payload proves that nothing ran: plain ``torch.save`` files, raw pickles, and ``.pt2`` archives
  whose weights or constants are pickled (torch unpickles those with ``weights_only=False``).
* ONNX external data whose location escapes the model's folder is refused before it is read.
* CSV cells that a spreadsheet would run as a formula are neutralised; HTML and JUnit XML escape
  model- and user-controlled names.
* No network access at run time.

Every payload only creates a marker file in a temporary folder.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import re
import runpy
import socket
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from models_zoo import export_onnx, symmetric_cnn
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from eqaudit.cli import app
from eqaudit.errors import EXIT_MODEL

SIZE = 33
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
runner = CliRunner()


def invoke(*argv: str | Path):
    result = runner.invoke(app, [str(a) for a in argv])
    assert "Traceback" not in result.output, result.output
    return result


def one_error_line(result) -> str:
    lines = ANSI.sub("", result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("security_images")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


# -- pickles -------------------------------------------------------------------------------------
class Payload:
    """Unpickling this object creates ``marker`` (a stand-in for any code an attacker wants)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


class ShellPayload(Payload):
    def __reduce__(self) -> tuple:
        return (os.system, (f"touch '{self.marker}'",))


def _torch_save(obj: object, path: Path) -> None:
    torch.save(obj, path)


def _raw_pickle(protocol: int):  # type: ignore[no-untyped-def]
    return lambda marker, path: path.write_bytes(pickle.dumps(Payload(marker), protocol=protocol))


PICKLE_FILES = {
    "torch-save.pt": lambda m, p: _torch_save(Payload(m), p),
    "torch-save-shell.pth": lambda m, p: _torch_save(ShellPayload(m), p),
    "torch-save-wrapped.ckpt": lambda m, p: _torch_save({"model": Payload(m)}, p),
    "torch-save-legacy.bin": lambda m, p: torch.save(
        Payload(m), p, _use_new_zipfile_serialization=False
    ),
    **{f"raw-pickle-protocol-{n}.pt": _raw_pickle(n) for n in (0, 2, pickle.HIGHEST_PROTOCOL)},
}


def test_the_payload_works(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("name", list(PICKLE_FILES))
def test_pickled_model_is_refused_and_never_unpickled(name: str, tmp_path: Path, images: Path):
    marker = tmp_path / "pickle_ran"
    model = tmp_path / name
    PICKLE_FILES[name](marker, model)
    for argv in (
        ("check", model, "--data", images, "--out", tmp_path / "out"),
        ("inspect", model),
    ):
        result = invoke(*argv)
        assert result.exit_code == EXIT_MODEL, result.output
        line = one_error_line(result)
        assert "--trust-pickle" in line and "arbitrary code" in line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def _evil_pt2(good: Path, evil: Path, marker: Path, where: str) -> Path:
    """A real torch.export archive with one pickled payload: a weight marked ``use_pickle`` (read
    with ``torch.load(weights_only=False)``) or an opaque constant (read with ``pickle.loads``)."""
    from torch.export.pt2_archive.constants import OPAQUE_OBJ_FILENAME_PREFIX

    with zipfile.ZipFile(good) as source:
        members = {item.filename: source.read(item.filename) for item in source.infolist()}
    top = next(iter(members)).split("/")[0]
    if where == "weight":
        config_name = f"{top}/data/weights/model_weights_config.json"
        config = json.loads(members[config_name])
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        buffer = io.BytesIO()
        torch.save(Payload(marker), buffer)
        members[f"{top}/data/weights/{first['path_name']}"] = buffer.getvalue()
    else:
        config_name = f"{top}/data/constants/model_constants_config.json"
        constant = OPAQUE_OBJ_FILENAME_PREFIX + "0"
        config = {
            "config": {
                "payload": {
                    "path_name": constant,
                    "is_param": False,
                    "use_pickle": True,
                    "tensor_meta": None,
                }
            }
        }
        members[f"{top}/data/constants/{constant}"] = pickle.dumps(Payload(marker))
    members[config_name] = json.dumps(config).encode()
    with zipfile.ZipFile(evil, "w") as target:
        for name, data in members.items():
            target.writestr(name, data)
    return evil


@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch.export.pt2_archive.constants")
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )
    program = torch.export.export(model.eval(), (torch.zeros(1, 3, 8, 8),))
    path = tmp_path_factory.mktemp("pt2") / "good.pt2"
    torch.export.save(program, path)
    return path


@pytest.mark.parametrize("where", ["weight", "constant"])
def test_pt2_archive_with_pickled_payload_is_refused(
    where: str, good_pt2: Path, tmp_path: Path, images: Path
) -> None:
    marker = tmp_path / "pt2_ran"
    evil = _evil_pt2(good_pt2, tmp_path / "evil.pt2", marker, where)
    # The control: torch itself runs the payload (so the refusal below is not vacuous).
    with contextlib.suppress(Exception):
        torch.export.load(evil)
    if not marker.exists():
        pytest.skip("this torch version does not unpickle this archive member")
    marker.unlink()

    for argv in (
        ("check", evil, "--data", images, "--input-size", "8", "--out", tmp_path / "out"),
        ("inspect", evil),
    ):
        result = invoke(*argv)
        assert result.exit_code == EXIT_MODEL, result.output
        line = one_error_line(result)
        assert "--trust-pickle" in line and "arbitrary code" in line
        assert not marker.exists()
    # torch.load and the archive reader are themselves again afterwards.
    assert torch.load.__module__ == "torch.serialization"
    assert invoke("inspect", good_pt2).exit_code == 0


# -- ONNX external data --------------------------------------------------------------------------
WEIGHTS = np.arange(15, dtype=np.float32).reshape(3, 5) / 10


def _external_data_model(folder: Path, location: str) -> Path:
    """(N, 3, 8, 8) -> global average pool -> (N, 3) @ W (3, 5); W stored at ``location``."""
    weight = numpy_helper.from_array(WEIGHTS, "W")
    set_external_data(weight, location=location, offset=0, length=WEIGHTS.nbytes)
    weight.ClearField("raw_data")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "W"], ["scores"]),
        ],
        "external",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 5])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # opset 17's, which every supported onnxruntime reads
    path = folder / "model.onnx"
    # Written by hand: onnx.save would itself write the external data to the location.
    path.write_bytes(model.SerializeToString())
    return path


def _age_access_time(path: Path) -> None:
    """Set the access time far in the past: any read, native code's included (onnx reads
    external data in C++), then moves it on a relatime or strictatime filesystem."""
    os.utime(path, ns=(0, path.stat().st_mtime_ns))


def _was_read(path: Path) -> bool:
    return path.stat().st_atime_ns != 0


@pytest.fixture
def reads_are_visible(tmp_path: Path) -> None:
    """Skip where the filesystem does not record reads (noatime): the proof would be empty."""
    probe = tmp_path / "atime_probe"
    probe.write_bytes(b"x")
    _age_access_time(probe)
    probe.read_bytes()
    if not _was_read(probe):
        pytest.skip("this filesystem does not record file reads (noatime)")


@pytest.mark.parametrize("escape", ["parent", "absolute", "dotdot-inside", "symlink", "dir-link"])
def test_external_data_outside_the_model_folder_is_refused_unread(
    escape: str, tmp_path: Path, images: Path, reads_are_visible: None
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(WEIGHTS.tobytes())
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "sub").mkdir()
    location = {
        "parent": "../outside/secret.bin",
        "absolute": str(secret),
        "dotdot-inside": "sub/../../outside/secret.bin",
        "symlink": "link.bin",
        "dir-link": "linked/secret.bin",
    }[escape]
    (folder / "link.bin").symlink_to(secret)
    (folder / "linked").symlink_to(outside, target_is_directory=True)
    model = _external_data_model(folder, location)
    _age_access_time(secret)

    for argv in (
        ("check", model, "--data", images, "--out", tmp_path / "out"),
        ("inspect", model),
    ):
        result = invoke(*argv)
        assert result.exit_code == EXIT_MODEL, result.output
        line = one_error_line(result)
        assert "outside the model's folder" in line and location in line
        if escape == "symlink":  # (as a Hugging Face cache links its blobs)
            assert f"a link to '{secret}'" in line and "--local-dir" in line
    assert not _was_read(secret)
    assert not (tmp_path / "out").exists()


def test_external_data_next_to_the_model_loads(
    tmp_path: Path, images: Path, reads_are_visible: None
) -> None:
    """The control: the same model with its data file beside it audits normally, and the
    access-time check used above does see the read."""
    weights = tmp_path / "weights.bin"
    weights.write_bytes(WEIGHTS.tobytes())
    model = _external_data_model(tmp_path, "weights.bin")
    _age_access_time(weights)
    result = invoke("check", model, "--data", images, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert _was_read(weights)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"]["num_classes"] == 5


def test_external_data_is_part_of_the_model_hash(tmp_path: Path) -> None:
    """New weights in the same graph file are a new model (merge, compare and baselines pair
    audits by this hash); the same files staged elsewhere are the same model."""
    from eqaudit.models import load_model, sha256_file

    hashes = []
    for name, weights in (("a", WEIGHTS), ("b", WEIGHTS), ("c", WEIGHTS + 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.bin").write_bytes(weights.tobytes())
        model = _external_data_model(tmp_path / name, "weights.bin")
        hashes.append(load_model(model).sha256)
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (
        tmp_path / "c" / "model.onnx"
    ).read_bytes()
    assert hashes[0] == hashes[1] != hashes[2]
    assert hashes[0] != sha256_file(tmp_path / "a" / "model.onnx")


# -- formula injection and escaping --------------------------------------------------------------
FACTORY = '''
import torch
from torch import nn


class Hostile(nn.Module):
    """Module names chosen by whoever wrote the model: formulas and markup."""

    def __init__(self):
        super().__init__()
        self.add_module('=HYPERLINK("http://x")', nn.Conv2d(3, 4, 3, padding=1))
        self.add_module("+cmd", nn.ReLU())
        self.add_module("<script>alert(1)</script>", nn.Identity())
        self.add_module("@SUM(1)", nn.Sigmoid())
        self.add_module("-2", nn.AdaptiveAvgPool2d(1))
        self.add_module("flat", nn.Flatten())
        self.add_module("fc", nn.Linear(4, 5))

    def forward(self, x):
        for module in self.children():
            x = module(x)
        return x


def build():
    torch.manual_seed(0)
    return Hostile()
'''
HOSTILE_IMAGES = ("=cmd", "+1", "-2", "@SUM(1)", "<img src=x onerror=alert(1)>", "a&b")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    factory = root / "hostile.py"
    factory.write_text(FACTORY)
    weights = root / "weights.pt"
    torch.save(runpy.run_path(str(factory))["build"]().state_dict(), weights)
    data = root / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name in HOSTILE_IMAGES:
        pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / f"{name}.png")
    out = root / "out"
    result = invoke(
        "check", weights, "--factory", f"{factory}:build", "--input-size", str(SIZE),
        "--data", data, "-t", "flips", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def _cells(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_csv_text_cells_are_neutralised(hostile_report: Path) -> None:
    tables = {name: _cells(hostile_report / name) for name in ("layers.csv", "predictions.csv")}
    tables["outputs.csv"] = _cells(hostile_report / "outputs.csv")
    for name, rows in tables.items():
        for row in rows:
            for column, cell in row.items():
                if cell.startswith(FORMULA_START):
                    assert _is_number(cell), (name, column, cell)  # e.g. label -1

    layers = {row["layer"] for row in tables["layers.csv"]}
    assert {'\'=HYPERLINK("http://x")', "'+cmd", "'-2", "'@SUM(1)"} <= layers
    images = {row["image"] for row in tables["predictions.csv"]}
    assert {"'=cmd.png", "'+1.png", "'-2.png", "'@SUM(1).png", "a&b.png"} <= images


def test_csv_numbers_are_not_neutralised(hostile_report: Path) -> None:
    predictions = _cells(hostile_report / "predictions.csv")
    assert {row["label"] for row in predictions} == {"-1"}  # unlabelled: a number, kept
    for row in _cells(hostile_report / "outputs.csv"):
        for column in ("n", "agreement", "js_divergence"):
            assert _is_number(row[column]), (column, row[column])
    for row in _cells(hostile_report / "layers.csv"):
        if row["measurable"] == "True":
            assert _is_number(row["relative_error"]) and _is_number(row["cosine_distance"])


def test_names_are_escaped_in_html_and_xml(hostile_report: Path) -> None:
    html = (hostile_report / "report.html").read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in html
    assert "<img src=x onerror=alert(1)>" not in html
    junit = hostile_report / "junit.xml"
    if junit.exists():
        ET.parse(junit)  # well-formed despite '<' and '&' in names


# -- no network ----------------------------------------------------------------------------------
def test_audit_makes_no_network_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, images: Path
) -> None:
    calls: list[str] = []

    def refuse(name: str):  # type: ignore[no-untyped-def]
        def blocked(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(name)
            raise OSError(f"network access during an audit: socket.{name}{args[1:]!r}")

        return blocked

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse(name))
    for name in ("create_connection", "getaddrinfo", "gethostbyname"):
        monkeypatch.setattr(socket, name, refuse(name))

    model = export_onnx(symmetric_cnn(size=SIZE), tmp_path / "model.onnx", SIZE)
    out = tmp_path / "out"
    result = invoke("check", model, "--data", images, "--out", out)
    assert result.exit_code == 0, result.output
    assert calls == []
    # The report opens offline too: nothing is fetched from elsewhere.
    html = (out / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.IGNORECASE)
    assert not re.search(r"url\(\s*[\"']?(https?:)?//|@import", html, re.IGNORECASE)
