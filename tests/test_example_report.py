"""The example report committed under reports/demo/ must match what `eqaudit demo` produces.

When this fails after a change to the engine, the demo or the report, regenerate the example from
the repository root with `eqaudit demo` and commit reports/demo/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from eqaudit.audit import audit
from eqaudit.demo.run import demo_config, demo_model

EXAMPLE = Path(__file__).resolve().parents[1] / "reports" / "demo"
STALE = "reports/demo is stale: regenerate it with `eqaudit demo` from the repository root"


@pytest.fixture(scope="module")
def committed() -> dict:
    path = EXAMPLE / "summary.json"
    assert path.is_file(), f"{STALE} (summary.json is missing)"
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def fresh():
    return audit(demo_model("onnx"), config=demo_config("onnx"))


def test_example_report_files_are_committed(committed):
    for name in ("summary.json", "outputs.csv", "layers.csv", "predictions.csv", "report.html"):
        assert (EXAMPLE / name).is_file(), f"{STALE} ({name} is missing)"
    html = (EXAMPLE / "report.html").read_text(encoding="utf-8")
    assert f"{committed['scores']['robustness_score']:.1f}" in html, STALE
    # Reports are shared: no path of the machine that made them.
    text = (EXAMPLE / "summary.json").read_text(encoding="utf-8")
    assert committed["model"]["path"] == "eqaudit/demo/assets/demo_cnn.onnx"
    assert "/home/" not in text and "/root/" not in text and "/tmp/" not in text


def test_example_report_matches_a_fresh_demo_run(committed, fresh):
    summary = fresh.summary
    assert summary["schema_version"] == committed["schema_version"], STALE
    for key in ("transforms", "label_action", "preprocessing", "seed"):
        assert summary[key] == committed[key], f"{STALE} ({key} differs)"
    assert summary["data"]["count"] == committed["data"]["count"], STALE
    assert [r["transform"] for r in summary["outputs"]] == [
        r["transform"] for r in committed["outputs"]
    ], STALE
    for new, old in zip(summary["outputs"], committed["outputs"], strict=True):
        assert new["agreement"] == old["agreement"], f"{STALE} ({new['transform']})"
        assert new["js_divergence"] == pytest.approx(old["js_divergence"], abs=1e-6), STALE
    assert summary["scores"]["robustness_score"] == pytest.approx(
        committed["scores"]["robustness_score"], abs=1e-4
    ), STALE
    assert [(r["layer"], r["transform"]) for r in summary["layers"]] == [
        (r["layer"], r["transform"]) for r in committed["layers"]
    ], STALE
    for new, old in zip(summary["layers"], committed["layers"], strict=True):
        if old["relative_error"] is None:
            assert new["relative_error"] is None, STALE
        else:
            assert new["relative_error"] == pytest.approx(old["relative_error"], abs=1e-5), STALE
    predictions = pd.read_csv(EXAMPLE / "predictions.csv")
    assert list(predictions["image"]) == list(fresh.predictions["image"]), STALE
    assert list(predictions["top1"]) == list(fresh.predictions["top1"]), STALE
