"""The release gate: each threshold passes and fails where it should, on the numbers of a real audit;
baselines; junit.xml and summary.md; the exit code and last line of ``eqaudit check``."""

from __future__ import annotations

import json
import re
import stat
import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from models_zoo import PositionalBias, export_onnx, symmetric_cnn
from PIL import Image
from typer.testing import CliRunner

import eqaudit
from eqaudit.cli import app
from eqaudit.config import GateConfig
from eqaudit.errors import EXIT_GATE_FAILED, EXIT_USAGE, ConfigError, UsageError
from eqaudit.gate import (
    FAILED,
    PASSED,
    SKIPPED,
    Check,
    _compare,
    assign,
    baseline_json,
    evaluate_gate,
    load_baseline,
    save_baseline,
    shown,
)
from eqaudit.reports.markdown import MAX_BYTES, fit, render_audit
from eqaudit.stats import wilson_bounds

SIZE = 33
NUM_IMAGES = 16
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No config file, EQAUDIT_* variable or GitHub summary from the machine running the tests."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in __import__("os").environ if n.startswith("EQAUDIT_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def write_images(root: Path, count: int) -> Path:
    """``count`` 40x40 RGB PNGs: blobs on gradients, so that images differ in structure."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40] / 39.0
    for i in range(count):
        cy, cx = rng.uniform(8, 32, 2)
        blob = np.exp(-((yy * 39 - cy) ** 2 + (xx * 39 - cx) ** 2) / 40.0)
        rgb = np.stack([blob, xx * rng.uniform(), yy * rng.uniform()], axis=-1)
        Image.fromarray((255 * rgb.clip(0, 1)).astype(np.uint8)).save(root / f"img_{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gate")
    sym = symmetric_cnn(size=SIZE)
    images = root / "images"
    images.mkdir()
    return {
        "images": write_images(images, NUM_IMAGES),
        "sym": export_onnx(sym, root / "sym.onnx", SIZE),
        "biased": export_onnx(PositionalBias(sym, SIZE).eval(), root / "biased.onnx", SIZE),
    }


@pytest.fixture(scope="module")
def biased(files: dict[str, Path]) -> eqaudit.AuditResult:
    """A model that is clearly not invariant: its numbers are the known values of the tests."""
    return eqaudit.audit(files["biased"], "d4", data=files["images"])


@pytest.fixture(scope="module")
def sym(files: dict[str, Path]) -> eqaudit.AuditResult:
    return eqaudit.audit(files["sym"], "d4", data=files["images"])


def step(text: str) -> Decimal:
    """One unit in the last of the 4 printed significant figures."""
    return Decimal(1).scaleb(Decimal(text).adjusted() - 3)


def above(value: float) -> float:
    text = shown(value)
    return float(Decimal(text) + step(text))


def below(value: float) -> float:
    text = shown(value)
    return float(Decimal(text) - step(text))


def statuses(report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def clean(text: str) -> str:
    return ANSI.sub("", text)


# -- the comparison rule ---------------------------------------------------------------------------
def test_printed_value_is_compared_inclusively() -> None:
    # Exactly the threshold passes both ways.
    assert _compare("x", "--o", "", 0.9, ">=", 0.9).status == PASSED
    assert _compare("x", "--o", "", 0.9, "<=", 0.9).status == PASSED
    # 0.89996 is printed 0.9000: shown as passing, so it passes.
    check = _compare("x", "--o", "", 0.89996, ">=", 0.9)
    assert (check.shown, check.status) == ("0.9000", PASSED)
    # 0.89994 is printed 0.8999: below 0.9, and fails.
    check = _compare("x", "--o", "", 0.89994, ">=", 0.9)
    assert (check.shown, check.status) == ("0.8999", FAILED)
    assert "0.8999, needs >= 0.9" in check.message
    # Small numbers keep 4 significant figures.
    assert _compare("x", "--o", "", 1.23449e-7, "<=", 1.2345e-7).shown == "1.234e-07"
    assert _compare("x", "--o", "", None, "<=", 1.0).status == SKIPPED


def test_most_specific_pattern_wins() -> None:
    thresholds = [("*", 0.5), ("rot*", 0.7), ("rot90", 0.9), ("flip*", 0.6)]
    chosen = assign(thresholds, ["rot90", "rot180", "flip_h", "transpose"])
    assert {k: v[1] for k, v in chosen.items()} == {
        "rot90": 0.9,
        "rot180": 0.7,
        "flip_h": 0.6,
        "transpose": 0.5,
    }
    # Equally specific globs: the one given last wins.
    assert assign([("r*", 0.1), ("*0", 0.2)], ["rot90"])["rot90"][1] == 0.2
    assert assign([("rot90", 0.3)], ["flip_h"]) == {}


def test_a_glob_given_again_on_one_command_line_is_the_last_given() -> None:
    # 'rot*' given again after 'rot9?' kept its first place, so 'rot9?' won the tie (review).
    from eqaudit.config import resolve_config

    cli = {"min_agreement": ["rot*=0.19", "rot9?=0.1", "rot*=0.19"]}
    gate = resolve_config(cli, environ={}, config_file=None).gate
    assert gate.min_agreement == (("rot9?", 0.1), ("rot*", 0.19))
    assert assign(gate.min_agreement, ["rot90"])["rot90"] == ("rot*", 0.19)


# -- each option on a real audit -------------------------------------------------------------------
def test_fail_under(biased) -> None:
    score = biased.score
    assert 40 < score < 95  # the positional bias costs invariance
    assert statuses(evaluate_gate(biased, GateConfig(fail_under=below(score))))["score"] == PASSED
    exact = float(shown(score))
    assert statuses(evaluate_gate(biased, GateConfig(fail_under=exact)))["score"] == PASSED
    report = evaluate_gate(biased, GateConfig(fail_under=above(score)))
    assert statuses(report)["score"] == FAILED and not report.passed


def test_min_agreement_global_and_per_element(biased) -> None:
    rows = {r["transform"]: r for r in biased.outputs if r["transform"] != "id"}
    worst = min(rows, key=lambda g: rows[g]["agreement"])
    best = max(rows, key=lambda g: rows[g]["agreement"])
    assert rows[worst]["agreement"] < rows[best]["agreement"]
    threshold = rows[worst]["agreement"]  # exactly k/n: inclusive, so it passes
    report = evaluate_gate(biased, GateConfig(min_agreement=(("*", threshold),)))
    assert set(statuses(report)) == {f"agreement[{g}]" for g in rows}
    assert report.passed
    # One notch higher fails every element at the minimum, and only those.
    report = evaluate_gate(biased, GateConfig(min_agreement=(("*", above(threshold)),)))
    failed = {c.name for c in report.failures}
    assert failed == {f"agreement[{g}]" for g in rows if rows[g]["agreement"] == threshold}
    # A per-element value overrides the global one.
    report = evaluate_gate(
        biased, GateConfig(min_agreement=(("*", 1.0), (worst, rows[worst]["agreement"])))
    )
    expected = {f"agreement[{g}]" for g in rows if rows[g]["agreement"] < 1 and g != worst}
    assert expected and {c.name for c in report.failures} == expected


def test_confidence_gates_on_the_wilson_lower_bound(biased) -> None:
    row = next(r for r in biased.outputs if r["transform"] != "id" and r["agreement"] < 1)
    name = f"agreement[{row['transform']}]"
    middle = (row["agreement_low"] + row["agreement"]) / 2
    plain = evaluate_gate(biased, GateConfig(min_agreement=((row["transform"], middle),)))
    assert statuses(plain)[name] == PASSED
    strict = evaluate_gate(
        biased, GateConfig(min_agreement=((row["transform"], middle),), confidence=0.95)
    )
    check = strict.checks[0]
    assert check.status == FAILED
    # At 95% the bound is the summary's own agreement_low (same Wilson interval).
    assert check.value == pytest.approx(row["agreement_low"], abs=1e-12)
    assert "95% Wilson interval" in check.description
    # Another level is recomputed from the counts.
    k = round(row["agreement"] * row["n"])
    loose = evaluate_gate(
        biased, GateConfig(min_agreement=((row["transform"], 0.0),), confidence=0.5)
    )
    assert loose.checks[0].value == pytest.approx(wilson_bounds(k, row["n"], 0.5)[0])
    assert row["agreement_low"] < loose.checks[0].value < row["agreement"]


def test_max_js(biased) -> None:
    row = max(biased.outputs[1:], key=lambda r: r["js_divergence"])
    name = f"js[{row['transform']}]"
    js = row["js_divergence"]
    assert js > 0.01
    ok = evaluate_gate(biased, GateConfig(max_js=((row["transform"], float(shown(js))),)))
    assert statuses(ok)[name] == PASSED
    bad = evaluate_gate(biased, GateConfig(max_js=(("*", below(js)),)))
    assert statuses(bad)[name] == FAILED
    assert all(c.status == PASSED for c in bad.checks if c.name != name) or len(bad.failures) > 1


def test_max_layer_error(biased, sym) -> None:
    conv = [
        r
        for r in biased.layers
        if "/conv" in r["layer"] and r["transform"] == "rot90" and r["measurable"]
    ]
    worst = max(r["relative_error"] for r in conv)
    assert worst > 0.01
    gate = GateConfig(max_layer_error=(("*/conv*", float(shown(worst))),))
    assert statuses(evaluate_gate(biased, gate))["layer_error[*/conv*][rot90]"] == PASSED
    gate = GateConfig(max_layer_error=(("*/conv*", below(worst)),))
    report = evaluate_gate(biased, gate)
    assert statuses(report)["layer_error[*/conv*][rot90]"] == FAILED
    assert any("at /inner/conv" in c.description for c in report.failures)
    # The symmetric network is equivariant at every conv layer: a tight threshold passes.
    assert evaluate_gate(sym, GateConfig(max_layer_error=(("*/conv*", 1e-4),))).passed


@pytest.mark.parametrize(
    "gate",
    [
        GateConfig(min_agreement=(("rot45", 0.9),)),
        GateConfig(max_js=(("flipp*", 0.1),)),
        GateConfig(max_layer_error=(("layer9.*", 0.1),)),
    ],
    ids=["element", "glob", "layer"],
)
def test_pattern_that_matches_nothing_is_a_usage_error(biased, gate) -> None:
    with pytest.raises(UsageError, match="matches"):
        evaluate_gate(biased, gate)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fail_under": 101}, "score from 0 to 100"),
        ({"min_agreement": (("*", 1.5),)}, "must be 0 to 1"),
        ({"max_js": (("*", -0.1),)}, "must be 0 to 1"),
        ({"min_agreement": (("*", 0.9),), "confidence": 95}, "level between 0 and 1"),
        ({"max_regression": 0.1}, "needs --baseline"),
        # NaN passed a "< 0" check and crashed the gate after the audit (exit 4); inf and
        # values above 1 turned the regression gate off without a word (review).
        ({"max_regression": float("nan"), "baseline": "b.json"}, "from 0 to 1, not nan"),
        ({"max_regression": float("inf"), "baseline": "b.json"}, "from 0 to 1, not inf"),
        ({"max_regression": 1.5, "baseline": "b.json"}, "from 0 to 1, not 1.5"),
        # It changes --min-agreement checks only: alone, it did nothing and said nothing.
        ({"confidence": 0.95}, "--confidence applies to --min-agreement checks"),
    ],
)
def test_gate_config_refuses_impossible_values(kwargs, message) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        GateConfig(**kwargs)


# -- baselines -------------------------------------------------------------------------------------
def test_baseline_is_small_sorted_and_deterministic(sym, files, tmp_path) -> None:
    again = eqaudit.audit(files["sym"], "d4", data=files["images"])
    assert baseline_json(sym) == baseline_json(again)
    from eqaudit.reports.files import _UMASK

    path = save_baseline(sym, tmp_path / "base" / "sym.json")
    # mkstemp's 0600 kept it from another CI user or container (review): a plain file's mode.
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_UMASK != 0o600
    assert [p.name for p in path.parent.iterdir()] == ["sym.json"]  # no temporary left
    text = path.read_text()
    assert len(text) < 8_000
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    fingerprint = data["fingerprint"]
    assert fingerprint["transforms"][0] == "id" and len(fingerprint["transforms"]) == 8
    assert fingerprint["data"]["count"] == NUM_IMAGES
    assert fingerprint["input"] == {"channels": 3, "height": SIZE, "layout": "NCHW", "width": SIZE}
    assert str(tmp_path) not in text  # nothing machine-specific


def test_regression_against_a_baseline(sym, biased, tmp_path) -> None:
    path = save_baseline(sym, tmp_path / "sym.json")
    baseline = load_baseline(path)
    # The same model against its own baseline: no change, even with X = 0.
    same = evaluate_gate(sym, GateConfig(baseline=str(path), max_regression=0.0), baseline)
    assert same.passed
    assert {c.shown for c in same.checks if c.name.startswith("regression.agreement")} == {"0.000"}
    # The biased model (same images, elements, preprocessing) got worse.
    worse = evaluate_gate(biased, GateConfig(baseline=str(path), max_regression=0.05), baseline)
    failed = {c.name for c in worse.failures}
    assert "regression.score" in failed
    assert any(name.startswith("regression.agreement[") for name in failed)
    # ... and with a regression allowance larger than every change, it passes.
    assert evaluate_gate(
        biased, GateConfig(baseline=str(path), max_regression=1.0), baseline
    ).passed


def test_mismatched_baseline_is_refused(sym, files, tmp_path) -> None:
    path = save_baseline(sym, tmp_path / "sym.json")
    baseline = load_baseline(path)
    fewer = eqaudit.audit(files["sym"], "c4", data=files["images"], num_images=8, layers=False)
    with pytest.raises(ConfigError) as error:
        evaluate_gate(fewer, GateConfig(baseline=str(path)), baseline)
    message = str(error.value)
    # (It went on "; only this run has nothing more".)
    assert message.count("transforms: only the baseline has antitranspose,flip_h,flip_v,transpose.")
    assert "nothing more" not in message
    assert "data.count: baseline 16 vs this run 8" in message
    assert "image_ids_sha256" in message
    other = eqaudit.audit(files["sym"], "d4", data=files["images"], preset="imagenet")
    with pytest.raises(ConfigError, match=r"preprocessing\.mean") as error:
        evaluate_gate(other, GateConfig(baseline=str(path)), baseline)
    assert "made by eqaudit" not in str(error.value)
    # Made by another version: the options may be the same and the names or sample differ.
    older = {**baseline, "eqaudit": "0.0.9"}
    with pytest.raises(ConfigError) as error:
        evaluate_gate(other, GateConfig(baseline=str(path)), older)
    running = other.summary["eqaudit"]["version"]
    assert str(error.value).endswith(
        f"--save-baseline. It was made by eqaudit 0.0.9 and this is {running}: with the same "
        "options, a difference in element names or in the images sampled comes from the version"
    )


def test_a_baseline_ignores_element_order_and_the_seed_of_real_images(sym, files, tmp_path):
    # Both were refused, though every number is per element or a mean over them, and the
    # images a seed picks are fingerprinted by their ids (review).
    path = save_baseline(sym, tmp_path / "sym.json")
    baseline = load_baseline(path)
    reordered = eqaudit.audit(files["sym"], "flips,d4", data=files["images"])
    assert [e["name"] for e in reordered.summary["transforms"]["elements"]] != (
        baseline["fingerprint"]["transforms"]
    )
    assert evaluate_gate(reordered, GateConfig(baseline=str(path)), baseline).passed
    seeded = eqaudit.audit(files["sym"], "d4", data=files["images"], seed=7)
    assert evaluate_gate(seeded, GateConfig(baseline=str(path)), baseline).passed
    # Synthetic images are made from the seed: another seed, other images.
    synthetic = eqaudit.audit(files["sym"], "flips", num_images=4, seed=0)
    made = load_baseline(save_baseline(synthetic, tmp_path / "synthetic.json"))
    other = eqaudit.audit(files["sym"], "flips", num_images=4, seed=1)
    with pytest.raises(ConfigError, match="seed: baseline 0 vs this run 1"):
        evaluate_gate(other, GateConfig(baseline=str(tmp_path / "synthetic.json")), made)


def test_bad_baseline_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_baseline(tmp_path / "missing.json")
    # A folder was said not to exist.
    with pytest.raises(ConfigError, match=r"is a folder: give the baseline file, e\.g\. "):
        load_baseline(tmp_path)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        load_baseline(tmp_path / "junk.json")
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError, match="not an eqaudit baseline"):
        load_baseline(tmp_path / "other.json")


def _damaged(data: dict, edit: str) -> dict:
    """The baseline ``data`` damaged as ``edit`` says."""
    data = json.loads(json.dumps(data))
    metrics = data["metrics"]
    if edit == "string-metric":
        metrics["outputs"]["flip_h"]["agreement"] = "high"
    elif edit == "nan-metric":
        metrics["outputs"]["flip_h"]["js_divergence"] = float("nan")
    elif edit == "row-is-a-float":
        metrics["outputs"]["flip_h"] = 0.5
    elif edit == "outputs-is-a-list":
        metrics["outputs"] = []
    elif edit == "outputs-empty":
        metrics["outputs"] = {}
    elif edit == "score-out-of-range":
        metrics["robustness_score"] = 250
    elif edit == "score-missing":
        del metrics["orbit_consistency"]
    elif edit == "boolean-metric":
        metrics["outputs"]["flip_v"]["agreement"] = True
    elif edit == "unknown-element":
        metrics["outputs"]["rot45"] = {"agreement": 0.5, "js_divergence": 0.1}
    elif edit == "braced-element-lacks":  # (the name went through str.format: IndexError)
        metrics["outputs"]["rot{0}"] = {"agreement": 0.5}
    return data


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ("string-metric", 'metrics.outputs.flip_h.agreement is "high", not a number'),
        ("nan-metric", "metrics.outputs.flip_h.js_divergence is nan, not a number from 0 to 1"),
        ("row-is-a-float", "metrics.outputs.flip_h is 0.5, not an object"),
        ("outputs-is-a-list", "metrics.outputs is [], not an object of elements"),
        ("outputs-empty", "metrics.outputs is empty, so no element's agreement"),
        ("score-out-of-range", "metrics.robustness_score is 250, not a number from 0 to 100"),
        ("score-missing", "it lacks metrics.orbit_consistency"),
        ("boolean-metric", "metrics.outputs.flip_v.agreement is true, not a number"),
        ("unknown-element", "metrics.outputs has rot45, which its fingerprint's transforms"),
        ("braced-element-lacks", "metrics.outputs.rot{0} lacks 'js_divergence'"),
    ],
)
def test_a_damaged_baseline_is_refused_when_loaded_naming_the_entry(sym, tmp_path, edit, says):
    # They died after the audit (ValueError, decimal.InvalidOperation, AttributeError: exit 4),
    # or, for an empty outputs block, passed with every per-element check silently dropped.
    path = save_baseline(sym, tmp_path / "good.json")
    bad = tmp_path / f"{edit}.json"
    bad.write_text(json.dumps(_damaged(json.loads(path.read_text()), edit)))
    with pytest.raises(ConfigError) as error:
        load_baseline(bad)
    message = str(error.value)
    assert message.startswith(f"baseline '{bad}' is damaged: ") and says in message
    assert message.endswith("re-create it with --save-baseline")


def test_a_baseline_of_a_newer_format_says_to_upgrade(tmp_path) -> None:
    path = tmp_path / "future.json"
    path.write_text(json.dumps({"format": "eqaudit-baseline/2", "fingerprint": {}, "metrics": {}}))
    with pytest.raises(ConfigError, match=r"newer eqaudit \(format eqaudit-baseline/2, this"):
        load_baseline(path)


def test_an_element_the_baseline_has_no_number_for_is_a_skipped_check(sym, tmp_path) -> None:
    # An element missing from the baseline's outputs was dropped from the gate without a word.
    path = save_baseline(sym, tmp_path / "sym.json")
    data = json.loads(path.read_text())
    del data["metrics"]["outputs"]["rot90"]
    path.write_text(json.dumps(data))
    report = evaluate_gate(sym, GateConfig(baseline=str(path)), load_baseline(path))
    skipped = {c.name: c.reason for c in report.checks if c.status == SKIPPED}
    reason = "the baseline has no number for it (skipped when made)"
    assert skipped == {"regression.agreement[rot90]": reason, "regression.js[rot90]": reason}
    assert report.passed  # the other elements were compared


def test_a_damaged_baseline_fails_before_the_audit(files, tmp_path) -> None:
    good = tmp_path / "good.json"
    made = run_check(files, tmp_path / "a", "--save-baseline", str(good), model="sym")
    assert made.exit_code == 0, made.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_damaged(json.loads(good.read_text()), "string-metric")))
    out = tmp_path / "out"
    result = run_check(files, out, "--baseline", str(bad), model="sym")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "Traceback" not in result.output
    assert clean(result.stderr).strip().splitlines() == [
        f"error: baseline '{bad}' is damaged: metrics.outputs.flip_h.agreement is \"high\", not "
        "a number; re-create it with --save-baseline"
    ]
    assert not out.exists()


# -- the command line ------------------------------------------------------------------------------
def run_check(files, out: Path, *options: str, model: str = "biased"):
    argv = ["check", str(files[model]), "--data", str(files["images"]), "-o", str(out)]
    return runner.invoke(app, [*argv, *options])


def last_line(result) -> str:
    return clean(result.stdout).strip().splitlines()[-1]


def test_check_passes_and_prints_passed_last(files, biased, tmp_path, monkeypatch) -> None:
    summary_file = tmp_path / "step_summary.md"
    summary_file.write_text("# earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary_file))
    out = tmp_path / "out"
    result = run_check(files, out, "--fail-under", str(below(biased.score)), "--no-layers")
    assert result.exit_code == 0, result.output
    line = last_line(result)
    assert line.startswith("PASSED score ") and re.search(r"\(\d+\.\d s\)$", line), line
    assert shown(biased.score) in line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gate"]["passed"] is True
    # summary.md written, and appended to the GitHub step summary.
    markdown = (out / "summary.md").read_text()
    assert markdown.startswith("## eqaudit gate: PASSED")
    assert summary_file.read_text() == "# earlier step\n" + markdown
    root = ET.parse(out / "junit.xml").getroot()
    assert root.find("testsuite").get("failures") == "0"


def test_check_fails_with_exit_1_and_junit_names_the_failures(files, biased, tmp_path) -> None:
    rows = {r["transform"]: r for r in biased.outputs[1:]}
    worst = min(rows, key=lambda g: rows[g]["agreement"])
    out = tmp_path / "out"
    result = run_check(
        files,
        out,
        "--fail-under",
        "99",
        "--min-agreement",
        "0",
        "--min-agreement",
        f"{worst}={above(rows[worst]['agreement'])}",
        "--max-js",
        "1",
        "--max-layer-error",
        "*/conv1/*=0.9",
    )
    assert result.exit_code == EXIT_GATE_FAILED, result.output
    assert last_line(result).startswith("FAILED score ")
    assert "Traceback" not in result.output
    # The report is still written (CI keeps it as an artifact).
    assert (out / "summary.json").is_file() and (out / "report.html").is_file()
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    failures = {name for name, c in cases.items() if c.find("failure") is not None}
    assert failures == {"score", f"agreement[{worst}]"}
    assert int(suite.get("tests")) == len(cases) == 1 + 7 + 7 + 7
    assert suite.get("failures") == "2"
    message = cases["score"].find("failure").get("message")
    assert shown(biased.score) in message and ">= 99" in message
    # A passed case says what was measured too (it carried nothing).
    passed = cases["js[rot90]"].find("system-out").text
    assert passed.startswith("js[rot90] = ") and "<= 1 (" in passed
    markdown = (out / "summary.md").read_text()
    assert markdown.startswith("## eqaudit gate: FAILED")
    assert "❌ **FAIL** | score" in markdown
    # The report says so too (it showed no verdict at all; review).
    html = (out / "report.html").read_text(encoding="utf-8")
    verdict = html[html.index('id="gate"') :].split("</p>")[0]
    assert "<strong>Gate FAILED</strong>" in verdict and "2 failed" in verdict
    assert "score = " in verdict


def test_save_and_use_a_baseline_on_the_command_line(files, tmp_path) -> None:
    base = tmp_path / "baseline.json"
    first = run_check(files, tmp_path / "a", "--save-baseline", str(base), model="sym")
    assert first.exit_code == 0, first.output
    assert base.is_file()
    same = run_check(files, tmp_path / "b", "--baseline", str(base), model="sym")
    assert same.exit_code == 0, same.output
    worse = run_check(files, tmp_path / "c", "--baseline", str(base), "--max-regression", "0.02")
    assert worse.exit_code == EXIT_GATE_FAILED, worse.output
    assert "regression.score" in last_line(worse)
    out = tmp_path / "d"
    refused = run_check(files, out, "--baseline", str(base), "-t", "flips", model="sym")
    assert refused.exit_code == EXIT_USAGE, refused.output
    assert "error: baseline" in clean(refused.stderr) and "transforms" in clean(refused.stderr)
    assert not out.exists()


def test_usage_errors_exit_2_before_or_without_a_report(files, tmp_path) -> None:
    out = tmp_path / "out"
    for options in (
        ["--min-agreement", "rot45=0.9"],
        ["--max-layer-error", "conv=0.1", "--no-layers"],
        ["--min-agreement", "rot90=abc"],
        ["--confidence", "95"],
        ["--baseline", str(tmp_path / "missing.json")],
    ):
        result = run_check(files, out, *options, model="sym")
        assert result.exit_code == EXIT_USAGE, (options, result.output)
        assert clean(result.stderr).startswith("error:"), result.stderr
        assert not out.exists()


def test_summary_markdown_stays_small() -> None:
    rows = [
        {
            "transform": f"shift_x+{i}",
            "skipped": None,
            "agreement": 0.5,
            "agreement_low": 0.4,
            "agreement_high": 0.6,
            "js_divergence": 0.1,
        }
        for i in range(5000)
    ]
    summary = {
        "scores": {
            "robustness_score": 50.0,
            "mean_agreement": 0.5,
            "orbit_consistency": 0.1,
            "worst_transform": "shift_x+1",
        },
        "model": {"name": "m|<b>.onnx", "backend": "onnx", "input": {"height": 8, "width": 8}},
        "data": {"synthetic": False, "source": "folder", "count": 3},
        "transforms": {"spec": "shift:1"},
        "outputs": rows,
        "layers": [],
        "warnings": [],
    }
    text = render_audit(summary)
    assert len(text.encode()) < MAX_BYTES
    assert "m\\|&lt;b&gt;.onnx" in text  # table-safe, no raw HTML
    assert "4960 more elements" in text
    assert len(fit("x\n" * 10**6).encode()) <= MAX_BYTES


def test_a_gate_that_evaluated_nothing_does_not_read_as_passed_checks(biased, tmp_path) -> None:
    # Every check skipped read "PASSED ..., 0 checks passed", and a run with no gate at all
    # put "## eqaudit gate: PASSED" into the GitHub step summary (review).
    from eqaudit.gate import GateReport
    from eqaudit.reports.markdown import render_audit

    # Thresholds none of which applies gate nothing: a failure (exit 1), not a green CI run.
    skipped = Check("agreement[rot90]", "--min-agreement", SKIPPED, "", reason="not square")
    report = GateReport((skipped, skipped))
    assert not report.passed and report.nothing_evaluated
    verdict = report.verdict(90.0, 1.0)
    assert verdict.startswith(
        "FAILED score 90.00 / 100, no check evaluated (2 checks skipped: see junit.xml; drop "
    )
    summary = report.attach(biased).summary
    assert render_audit(summary).startswith(
        "## eqaudit gate: FAILED, no check evaluated (all skipped)\n"
    )
    passed = Check("score", "--fail-under", PASSED, "", value=90.0, shown="90", threshold=80.0)
    assert GateReport((skipped, passed)).passed  # one evaluated is enough
    from eqaudit.reports.junit import write_junit

    write_junit(report.attach(biased), tmp_path)
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert (suite.get("failures"), suite.get("skipped")) == ("1", "2")
    assert render_audit(GateReport(()).attach(biased).summary).startswith("## eqaudit audit\n")
    assert render_audit(biased.summary).startswith("## eqaudit audit\n")


def test_junit_without_gate_checks_holds_one_passing_case() -> None:
    # With no test cases, Jenkins' junit step fails the build (unless allowEmptyResults).
    from eqaudit.reports.junit import junit_xml

    root = ET.fromstring(junit_xml("eqaudit check m.onnx", []).split("\n", 1)[1])
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("1", "0", "0")
    (case,) = suite.findall("testcase")
    assert case.get("name") == "no gate checks configured"
    assert case.get("classname") == "eqaudit.gate.audit" and not list(case)


def test_max_layer_error_is_read_up_to_the_channel_map_when_one_is_fitted() -> None:
    # A C4 group-convolutional net permutes its channels under rot90: the naive layer error is
    # large, the error after the fitted channel map ~1e-7. With --channel-map the gate reads
    # the latter (it failed such a net, exactly equivariant, before).
    from models_group import c4_net

    gate = GateConfig(max_layer_error=(("gconv", 1e-4),))
    naive = eqaudit.audit(c4_net(0), "c4", input_size=17, num_images=12, seed=1)
    report = evaluate_gate(naive, gate)
    assert statuses(report)["layer_error[gconv][rot90]"] == FAILED
    mapped = eqaudit.audit(c4_net(0), "c4", input_size=17, num_images=12, seed=1, channel_map=True)
    row = mapped.layer("gconv", "rot90")
    assert row["relative_error"] > 0.3 and row["fitted_relative_error"] < 1e-5
    report = evaluate_gate(mapped, gate)
    assert {c.status for c in report.checks} == {PASSED}
    check = next(c for c in report.checks if c.name == "layer_error[gconv][rot90]")
    assert "at gconv (after the fitted channel map)" in check.description
    assert check.value == row["fitted_relative_error"]


def test_a_fitted_channel_map_that_is_no_permutation_does_not_pass_the_gate() -> None:
    # 32 filters of 3x3x3 span every patch: any rotation of them is a linear mix of them, so
    # the fitted 1x1 map explains a random conv's rotation (~1e-6) though it is no symmetry
    # (review). Only a permutation of the channels counts.
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = nn.Sequential(model, nn.Linear(32, 4)).eval()
    result = eqaudit.audit(model, "c4", input_size=33, num_images=8, channel_map=True)
    row = result.layer("0.0", "rot90")
    assert row["fitted_relative_error"] < 1e-4 < row["relative_error"]
    assert row["channel_map_permutation"] is False
    report = evaluate_gate(result, GateConfig(max_layer_error=(("0.0", 1e-3),)))
    assert statuses(report)["layer_error[0.0][rot90]"] == FAILED
