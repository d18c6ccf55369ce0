"""report.html of eqaudit compare: written by the command on real model pairs (a degraded pair
highlights its regressions, an identical pair none), safe with hostile names, and the same bytes
for the same compare.json."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from markupsafe import escape
from models_zoo import PositionalBias, export_onnx, symmetric_cnn
from PIL import Image
from typer.testing import CliRunner

from eqaudit.cli import app
from eqaudit.reports.charts import compare_curve_svg, pair_grid
from eqaudit.reports.compare_html import render_compare_html
from eqaudit.reports.html import breakable

from . import HOSTILE_CLASS, HOSTILE_LAYER
from .test_html import section, tags

SIZE = 33
NUM_IMAGES = 24
runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``eqaudit compare`` run twice: symmetric vs positionally biased, symmetric vs itself."""
    root = tmp_path_factory.mktemp("compare_html")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:40, 0:40]
    for i in range(NUM_IMAGES):
        cy, cx = rng.uniform(8, 32, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0)
        rgb = np.stack([blob, xx / 39 * rng.uniform(), yy / 39 * rng.uniform()], axis=-1)
        Image.fromarray((255 * rgb.clip(0, 1)).astype(np.uint8)).save(images / f"im{i:02d}.png")
    sym = symmetric_cnn(size=SIZE)
    a = export_onnx(sym, root / "sym.onnx", SIZE)
    b = export_onnx(PositionalBias(sym, SIZE, strength=1.0).eval(), root / "biased.onnx", SIZE)
    out = {}
    for name, (first, second) in {"degraded": (a, b), "identical": (a, a)}.items():
        out[name] = root / name
        argv = ["compare", str(first), str(second), "--data", str(images), "-o", str(out[name])]
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, result.output
    return out


def page_of(folder: Path) -> str:
    return (folder / "report.html").read_text(encoding="utf-8")


def data_of(folder: Path) -> dict:
    return json.loads((folder / "compare.json").read_text(encoding="utf-8"))


def highlighted(page: str) -> list[str]:
    """The transforms of the rows marked as B significantly worse."""
    table = section(page, "outputs-table")
    return re.findall(r'<tr class="worse">\s*<td class="name">([^<]*)</td>', table)


# -- what the page shows ---------------------------------------------------------------------------
def test_degraded_pair_highlights_its_regressions(folders: dict[str, Path]) -> None:
    page, data = page_of(folders["degraded"]), data_of(folders["degraded"])
    assert data["regressions"], "the biased model should regress somewhere"
    assert highlighted(page) == data["regressions"]
    verdict = section(page, "verdict")
    assert f"Yes, on {len(data['regressions'])} of {len(data['outputs'])} elements" in verdict
    assert all(g in verdict for g in data["regressions"]) and "alpha 0.05" in verdict
    top1 = data["top1_agreement"]
    assert f"same top-1 class on {top1['same']} of {top1['n']} images" in verdict
    table = section(page, "outputs-table")
    assert table.count("<tr") == 1 + len(data["outputs"])
    assert table.count("B worse") == len(data["regressions"])
    for row in data["outputs"]:
        assert f"{100 * row['agreement_b']:.1f}%" in table
    # Header: both models, with hash and backend; the shared elements and images.
    run = section(page, "run")
    for side in ("a", "b"):
        for key in ("model", "sha256", "backend"):
            assert data[side][key] in run, (side, key)
    assert ", ".join(data["data"]["elements"]) in run and f"{NUM_IMAGES} images" in run
    # Both curves overlaid, and the layer of B that has no partner in A listed.
    curve = section(page, "layer-curves")
    assert "<svg" in curve and "A solid and B dashed" in curve and "log scale" in curve
    assert "stroke-dasharray" in curve  # B's dashed lines
    assert f"A: {data['a']['model']}" in curve and f"B: {data['b']['model']}" in curve
    only_b = data["layer_matching"]["unmatched_b"]
    assert only_b and all(breakable(name) in section(page, "unmatched-b") for name in only_b)
    assert "order + shape" in section(page, "layer-changes")
    assert "McNemar" in section(page, "methods") and "Holm" in section(page, "methods")


def test_identical_pair_highlights_nothing(folders: dict[str, Path]) -> None:
    page, data = page_of(folders["identical"]), data_of(folders["identical"])
    assert not data["regressions"]
    assert highlighted(page) == [] and 'class="worse"' not in page
    assert '<div class="value" id="regressed">No</div>' in page
    assert "same file" in section(page, "run")
    assert "None: every audited layer of A was matched" in section(page, "unmatched")
    assert 'id="no-changes"' in page  # no layer's error grew


def test_report_is_listed_and_reproduced_by_compare_json(folders: dict[str, Path]) -> None:
    for folder in folders.values():
        written = (folder / "report.html").read_bytes()
        data = data_of(folder)
        assert render_compare_html(data).encode("utf-8") == written
        assert render_compare_html(data) == render_compare_html(copy.deepcopy(data))


# -- safety ----------------------------------------------------------------------------------------
def test_page_has_no_scripts_and_loads_nothing(folders: dict[str, Path]) -> None:
    page = page_of(folders["degraded"])
    lowered = page.lower()
    assert "<script" not in lowered and "javascript:" not in lowered
    assert "http://" not in lowered and "https://" not in lowered and "@import" not in lowered
    for tag, attrs in tags(page):
        assert tag not in {"script", "link", "iframe", "object", "embed", "base", "img"}, tag
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        for name in ("src", "href", "xlink:href"):
            value = attrs.get(name)
            assert value is None or value.startswith("#"), (tag, name, value)


def test_hostile_names_render_as_text(folders: dict[str, Path]) -> None:
    data = data_of(folders["degraded"])
    first = data["layers"][0]["layer_a"]
    for row in data["layers"]:
        if row["layer_a"] == first:
            row["layer_a"] = HOSTILE_LAYER
            row["layer_b"] = "cost $x^2 {$ & <b>"
    data["layer_matching"]["unmatched_a"] = [HOSTILE_LAYER + "2"]
    data["b"]["model"] = HOSTILE_CLASS
    data["outputs"][0]["transform"] = "<i>rot90</i>"
    page = render_compare_html(data)
    assert HOSTILE_LAYER not in page and HOSTILE_CLASS not in page and "<i>" not in page
    assert "<b>" not in page and "<script" not in page.lower()
    assert not any("onerror" in attrs for _, attrs in tags(page))
    curve = section(page, "layer-curves")
    assert f">{escape(HOSTILE_LAYER)}</text>" in curve  # a tick label, as text
    changes = section(page, "layer-changes")
    assert breakable(HOSTILE_LAYER) in changes  # escaped, with break opportunities after "/"
    assert "&lt;script&gt;alert(1)&lt;/<wbr>script&gt;" in changes
    assert "cost $x^2 {$ &amp; &lt;b&gt;" in changes
    assert breakable(HOSTILE_LAYER + "2") in section(page, "unmatched-a")
    assert str(escape(HOSTILE_CLASS)) in section(page, "run")
    assert "&lt;i&gt;rot90&lt;/i&gt;" in section(page, "outputs-table")


# -- inputs that change the page ------------------------------------------------------------------
def test_comparison_without_layers_has_no_chart(folders: dict[str, Path]) -> None:
    data = data_of(folders["degraded"])
    data["layers"] = []
    data["layer_matching"] = {
        "matched_by_name": 0,
        "matched_by_order": 0,
        "unmatched_a": [],
        "unmatched_b": [],
    }
    page = render_compare_html(data)
    assert 'id="layer-curves"' not in page and 'id="no-layers"' in page
    assert highlighted(page) == data["regressions"]
    assert not re.search(r"\bnan\b", page, re.IGNORECASE)


def test_curve_svg_orders_pairs_as_compare_json_and_is_deterministic(
    folders: dict[str, Path],
) -> None:
    data = data_of(folders["degraded"])
    grid = pair_grid(data["layers"], data["data"]["elements"])
    assert grid.names_a == list(dict.fromkeys(r["layer_a"] for r in data["layers"]))
    assert grid.elements == data["data"]["elements"]
    assert grid.error_a.shape == grid.error_b.shape == (len(grid.elements), len(grid.names_a))
    assert np.nanmax(grid.error_b) > 0.1 > np.nanmax(grid.error_a)  # B's bias shows per layer
    svg = compare_curve_svg(grid, "a", "b")
    assert svg == compare_curve_svg(grid, "a", "b")
    assert svg.startswith("<svg") and "<?xml" not in svg


def test_curve_svg_gives_every_element_its_own_colour_past_ten() -> None:
    # 12 elements in tab10: rot180 and shift_y-2 were one orange, and A is solid for both.
    import re

    from eqaudit.reports.charts import PairGrid

    elements = [f"e{i}" for i in range(12)]
    errors = np.linspace(0.01, 0.5, 12 * 3).reshape(12, 3)
    grid = PairGrid(["l0", "l1", "l2"], ["l0", "l1", "l2"], elements, errors, errors * 2)
    svg = compare_curve_svg(grid, "a", "b")
    strokes = set(re.findall(r"stroke: ?(#[0-9a-f]{6})", svg))
    legend = [c for c in strokes if c not in {"#344054", "#e4e7ec", "#000000", "#ffffff"}]
    assert len(legend) >= 12
