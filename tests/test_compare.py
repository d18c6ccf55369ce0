"""eqaudit compare: the statistics (exact McNemar, paired bootstrap, Holm), layer matching, and
real model pairs: a degraded checkpoint is a significant regression, an identical pair is not, and
an ONNX export compares as equal to its PyTorch module."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from models_zoo import PositionalBias, export_onnx, symmetric_cnn
from PIL import Image
from typer.testing import CliRunner

from eqaudit.cli import app
from eqaudit.compare import compare, exported_module_path, holm, match_layers
from eqaudit.errors import EXIT_GATE_FAILED, EXIT_USAGE, UsageError
from eqaudit.stats import mcnemar_exact, paired_bootstrap_interval

SIZE = 33
NUM_IMAGES = 24
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("EQAUDIT_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def clean(text: str) -> str:
    return ANSI.sub("", text)


# -- statistics ------------------------------------------------------------------------------------
def test_mcnemar_exact_known_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 2**5)  # 0.0625
    assert mcnemar_exact(0, 8) == pytest.approx(2 / 2**8)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 2**10)
    assert mcnemar_exact(1000, 1000) == 1.0
    assert 0 <= mcnemar_exact(0, 3000) < 1e-300  # exact integers: no overflow, no NaN


@pytest.mark.parametrize("b", range(0, 12))
@pytest.mark.parametrize("c", [0, 1, 4, 11])
def test_mcnemar_is_the_two_sided_binomial_test(b: int, c: int) -> None:
    n = b + c
    if n == 0:
        return
    pmf = [math.comb(n, k) / 2**n for k in range(n + 1)]
    observed = pmf[b]
    brute = sum(p for p in pmf if p <= observed * (1 + 1e-12))  # symmetric: same as doubling
    assert mcnemar_exact(b, c) == pytest.approx(min(1.0, brute))


def test_paired_bootstrap_interval() -> None:
    same = np.array([True, False, True, True])
    assert paired_bootstrap_interval(same, same) == (0.0, 0.0)
    rng = np.random.default_rng(1)
    a = rng.random(200) < 0.9
    b = a & (rng.random(200) < 0.8)  # B loses ~20% of A's agreements
    low, high = paired_bootstrap_interval(a, b, seed=3)
    assert (low, high) == paired_bootstrap_interval(a, b, seed=3)  # seeded
    observed = b.mean() - a.mean()
    assert low < observed < high < 0
    # Same distribution as resampling image indices (checked against the naive bootstrap).
    idx = rng.integers(0, 200, size=(4000, 200))
    naive = np.quantile(b[idx].mean(1) - a[idx].mean(1), [0.025, 0.975])
    assert low == pytest.approx(naive[0], abs=0.01)
    assert high == pytest.approx(naive[1], abs=0.01)


def test_holm_adjustment() -> None:
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([]) == []
    assert holm([0.3, 0.9]) == pytest.approx([0.6, 0.9])


def test_layers_match_by_name_then_by_order_and_shape() -> None:
    def layers(*items: tuple[str, str]) -> list[dict]:
        return [{"name": n, "shape": s, "index": i} for i, (n, s) in enumerate(items)]

    a = layers(("conv1", "8x9x9"), ("relu1", "8x9x9"), ("pool", "8"), ("fc", "5"))
    b = layers(("/c1/Conv", "8x9x9"), ("relu1", "8x9x9"), ("/gap", "8"), ("/extra", "3"))
    pairs, only_a, only_b = match_layers(a, b)
    assert pairs == [
        ("conv1", "/c1/Conv", "order+shape"),
        ("relu1", "relu1", "name"),
        ("pool", "/gap", "order+shape"),
    ]
    assert only_a == ["fc"] and only_b == ["/extra"]


def test_an_onnx_export_pairs_with_its_modules_by_the_paths_in_its_tensor_names() -> None:
    # A ConvNeXt block's .pt2 against its ONNX export (names as torch.onnx writes them): by
    # order and shape, dwconv paired with the downsampling LayerNorm's Transpose and the block
    # with a MatMul inside it (helper-51); each module's output is the last tensor under it.
    def layers(*items: tuple[str, str]) -> list[dict]:
        return [{"name": n, "shape": s, "index": i} for i, (n, s) in enumerate(items)]

    m = "24x16x16"
    a = layers(
        ("downsample_layers.0.0", m), ("downsample_layers.0.1", m), ("stages.0.0.dwconv", m),
        ("stages.0.0.act", "96x16x16"), ("stages.0.0.pwconv2", m), ("stages.0.0", m),
        ("head", "5"),
    )  # fmt: skip
    block = "/stages.0/stages.0.0"
    b = layers(
        ("/downsample_layers.0/downsample_layers.0.0/Conv_output_0", m),
        ("/downsample_layers.0/downsample_layers.0.1/Transpose_output_0", m),
        ("/downsample_layers.0/downsample_layers.0.1/Transpose_1_output_0", m),
        (f"{block}/dwconv/Conv_output_0", m),
        (f"{block}/Transpose_output_0", m),
        (f"{block}/act/Erf_output_0", "96x16x16"),
        (f"{block}/act/Mul_1_output_0", "96x16x16"),
        (f"{block}/pwconv2/MatMul_output_0", m),
        (f"{block}/pwconv2/Add_output_0", m),
        (f"{block}/Add_output_0", m),
        ("/head/Gemm_output_0", "5"),
    )
    pairs, only_a, only_b = match_layers(a, b)
    assert pairs == [
        ("downsample_layers.0.0", b[0]["name"], "module"),
        ("downsample_layers.0.1", b[2]["name"], "module"),
        ("stages.0.0.dwconv", b[3]["name"], "module"),
        ("stages.0.0.act", b[6]["name"], "module"),
        ("stages.0.0.pwconv2", b[8]["name"], "module"),
        ("stages.0.0", b[9]["name"], "module"),
        ("head", b[10]["name"], "module"),
    ]
    assert only_a == [] and len(only_b) == 4
    # the other way round, A the ONNX graph: the same pairs
    back, _, _ = match_layers(b, a)
    assert sorted((y, x) for x, y, _ in back) == sorted((x, y) for x, y, _ in pairs)
    # The exporter names a module's second call as it would name a module "act_1": a path whose
    # tensors are not together is not matched by it (act_1 took act's second ReLU, review).
    a = layers(*((n, m) for n in ("a", "act_1", "b", "act", "c", "act@1")))
    b = layers(
        *(
            (f"/{n}_output_0", m)
            for n in ("a/Conv", "act_1/Sigmoid", "b/Conv", "act/Relu", "c/Conv", "act_1/Relu")
        )
    )
    pairs, _, _ = match_layers(a, b)
    assert [(x, y) for x, y, _ in pairs] == [
        (x["name"], y["name"]) for x, y in zip(a, b, strict=True)
    ]
    assert [how for *_, how in pairs] == ["module", "order+shape"] + ["module"] * 3 + [
        "order+shape"
    ]
    # A pair by order goes after the pairs before it, those by module path included: a BN that
    # the export folded into its Conv paired with a tensor before that Conv (review).
    a = layers(("conv", m), ("bn", m), ("relu", m))
    b = layers(("/stem/Mul_output_0", m), ("/conv/Conv_output_0", m), ("/relu/Relu_output_0", m))
    pairs, only_a, _ = match_layers(a, b)
    assert [how for *_, how in pairs] == ["module", "module"] and only_a == ["bn"]
    assert exported_module_path("/layer1/layer1.0/conv1/Conv_output_0") == "layer1.0.conv1"
    assert exported_module_path("/Add_output_0") is None
    assert exported_module_path("conv1") is None


# -- real model pairs ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:40, 0:40] / 39.0
    for i in range(NUM_IMAGES):
        cy, cx = rng.uniform(8, 32, 2)
        blob = np.exp(-((yy * 39 - cy) ** 2 + (xx * 39 - cx) ** 2) / 40.0)
        rgb = np.stack([blob, xx * rng.uniform(), yy * rng.uniform()], axis=-1)
        Image.fromarray((255 * rgb.clip(0, 1)).astype(np.uint8)).save(images / f"im{i:02d}.png")
    sym = symmetric_cnn(size=SIZE)
    torch.save(sym.state_dict(), root / "sym.pt")
    return {
        "images": images,
        "sym_module": sym,
        "biased_module": PositionalBias(sym, SIZE, strength=1.0).eval(),
        "sym": export_onnx(sym, root / "sym.onnx", SIZE),
        "sym_pt": root / "sym.pt",
        "biased": export_onnx(
            PositionalBias(sym, SIZE, strength=1.0).eval(), root / "b.onnx", SIZE
        ),
    }


def test_degraded_checkpoint_is_a_significant_regression(files) -> None:
    comparison, _, _ = compare(
        files["sym_module"],
        files["biased_module"],
        data=str(files["images"]),
        input_size=SIZE,
        fail_on_regression=True,
    )
    data = comparison.data
    assert comparison.regressions and not comparison.passed
    assert data["scores"]["robustness_score_b"] < data["scores"]["robustness_score_a"] - 5
    for row in data["outputs"]:
        assert row["agreement_a"] == 1.0  # the symmetric model is exactly invariant
        assert row["agreement_b"] <= 1.0 and row["only_b"] == 0
        if row["verdict"] == "B worse":
            assert row["holm_p"] < 0.05 and row["mcnemar_p"] <= row["holm_p"]
            assert row["difference_high"] < 0  # the bootstrap interval excludes 0 too
            assert row["js_difference"] > 0
    failed = {c.name for c in comparison.checks if c.status == "failed"}
    assert failed == {f"regression[{g}]" for g in comparison.regressions}


def test_identical_pair_is_not_a_regression(files) -> None:
    comparison, _, _ = compare(
        files["sym_module"],
        files["sym_module"],
        data=str(files["images"]),
        input_size=SIZE,
        fail_on_regression=True,
    )
    data = comparison.data
    assert comparison.passed and not comparison.regressions
    assert data["top1_agreement"] == {"untransformed": 1.0, "same": NUM_IMAGES, "n": NUM_IMAGES}
    for row in data["outputs"]:
        assert row["mcnemar_p"] == 1.0 and row["holm_p"] == 1.0
        assert (row["difference_low"], row["difference_high"]) == (0.0, 0.0)
        assert row["agreement_difference"] == 0.0 and row["top1_agreement"] == 1.0
    assert data["layer_matching"]["matched_by_order"] == 0
    assert not data["layer_matching"]["unmatched_a"] and not data["layer_matching"]["unmatched_b"]
    assert not [n for n in data["notes"] if "matched by order" in n]
    assert all(r["relative_error_difference"] == 0.0 for r in data["layers"])


def test_the_console_names_the_bootstrap_level_it_used(files) -> None:
    from rich.console import Console

    from eqaudit.compare import compare_results

    _, a, b = compare(
        files["sym_module"],
        files["biased_module"],
        data=str(files["images"]),
        input_size=SIZE,
        transforms="c4",
    )
    console = Console(width=100, record=True)
    for line in compare_results(a, b, confidence=0.9).lines():
        console.print(line)
    text = console.export_text()
    assert "paired bootstrap 90% interval" in text and "90% interval" in text
    assert "95%" not in text and "not adjusted" in text
    with pytest.raises(UsageError, match="between 0 and 1"):
        compare_results(a, b, confidence=95)


def run_compare(files, a: str, b: str, out: Path, *options: str):
    argv = ["compare", str(files[a]), str(files[b]), "--data", str(files["images"])]
    return runner.invoke(app, [*argv, "-o", str(out), *options])


def test_cli_flags_the_degraded_onnx_model(files, tmp_path) -> None:
    out = tmp_path / "cmp"
    result = run_compare(files, "sym", "biased", out, "--fail-on-regression")
    assert result.exit_code == EXIT_GATE_FAILED, result.output
    last = clean(result.stdout).strip().splitlines()[-1]
    assert last.startswith("FAILED B is significantly less invariant than A"), last
    for name in ("compare.json", "compare.csv", "summary.md", "junit.xml"):
        assert (out / name).is_file(), name
    data = json.loads((out / "compare.json").read_text())
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    failures = {c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None}
    assert failures == {f"regression[{g}]" for g in data["regressions"]} and failures
    table = pd.read_csv(out / "compare.csv")
    assert set(table["section"]) == {"output", "layer"}
    assert len(table[table["section"] == "output"]) == 7
    # Image counts are written as counts ("16", not "16.0"; review).
    first = (out / "compare.csv").read_text().splitlines()[1].split(",")
    header = (out / "compare.csv").read_text().splitlines()[0].split(",")
    assert first[header.index("n")] == str(data["outputs"][0]["n"])
    assert (out / "summary.md").read_text().startswith("## eqaudit compare: FAILED")
    # Not gated: the same finding, exit 0, and junit marks it skipped rather than failed.
    plain = run_compare(files, "sym", "biased", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    assert "not gated" in clean(plain.stdout).strip().splitlines()[-1]
    suite = ET.parse(tmp_path / "plain" / "junit.xml").getroot().find("testsuite")
    assert suite.get("failures") == "0" and int(suite.get("skipped")) == len(data["regressions"])

    # The two audits are kept; comparing the saved folders gives the same numbers.
    again = runner.invoke(
        app, ["compare", str(out / "a"), str(out / "b"), "-o", str(tmp_path / "saved")]
    )
    assert again.exit_code == 0, again.output
    saved = json.loads((tmp_path / "saved" / "compare.json").read_text())
    assert saved["outputs"] == data["outputs"]
    assert saved["top1_agreement"] == data["top1_agreement"]


def test_onnx_export_compares_as_equal_to_its_pytorch_module(files, tmp_path) -> None:
    out = tmp_path / "cmp"
    result = run_compare(
        files,
        "sym",
        "sym_pt",
        out,
        "--factory",
        "models_zoo:SmallCNN",
        "--input-size",
        str(SIZE),
        "--fail-on-regression",
    )
    assert result.exit_code == 0, result.output
    assert clean(result.stdout).strip().splitlines()[-1].startswith("PASSED")
    data = json.loads((out / "compare.json").read_text())
    assert data["a"]["backend"] == "onnx" and data["b"]["backend"] == "torch"
    assert data["top1_agreement"]["untransformed"] == 1.0
    for row in data["outputs"]:
        assert row["verdict"] == "no significant difference"
        assert row["mcnemar_p"] == 1.0 and row["top1_agreement"] == 1.0
        assert abs(row["js_difference"]) < 1e-6
    # ONNX tensor names differ from module paths; the exporter writes the module's path in them.
    pairs = {(r["layer_a"], r["layer_b"], r["match"]) for r in data["layers"]}
    assert ("/conv1/Conv_output_0", "conv1", "module") in pairs
    assert ("/conv3/Conv_output_0", "conv3", "module") in pairs
    conv = [r for r in data["layers"] if r["layer_b"].startswith("conv")]
    assert all(abs(r["relative_error_difference"]) < 1e-5 for r in conv)
    # ... which the comparison says, since an exporter's folds shift such pairs.
    [note] = [n for n in data["notes"] if "matched by other than their names" in n]
    assert note.startswith("A is an ONNX graph and B a PyTorch state dict: 8 layer pairs are")
    assert data["layer_matching"]["matched_by_module"] == 8, data["layer_matching"]
    assert "0 matched by name, 8 by exported module path" in clean(result.stdout)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "8 by the module path in the exported tensor names" in page
    assert "<td>module path</td>" in page and "<td>order + shape</td>" not in page


def test_unpaired_inputs_are_refused(files, tmp_path) -> None:
    def check(out: Path, *options: str) -> Path:
        argv = ["check", str(files["sym"]), "--data", str(files["images"]), "-o", str(out)]
        result = runner.invoke(app, [*argv, "--no-layers", *options])
        assert result.exit_code == 0, result.output
        return out

    full = check(tmp_path / "full")
    fewer = check(tmp_path / "fewer", "-n", "12")
    flips = check(tmp_path / "flips", "-t", "flips")
    # The same model with and without a declared label action: it failed the gate (exit 1),
    # "significantly less invariant", with the difference only in a note.
    swapped = check(
        tmp_path / "swapped", "--label-action", "flip_h=swap:0,1", "--label-action", "rot90=id"
    )
    # A comparison's folder passed as an audit: it said "not one of each" of two folders.
    compared = tmp_path / "compared"
    assert runner.invoke(app, ["compare", str(full), str(full), "-o", str(compared)]).exit_code == 0
    cases = [
        ([str(full), str(compared)], "holds a comparison (compare.json), not an audit"),
        ([str(full), str(fewer)], "different images"),
        ([str(full), str(flips / "summary.json")], "different transform elements"),
        (
            [str(full), str(swapped), "--fail-on-regression"],
            "different label actions (under flip_h, transpose, flip_v",
        ),
        ([str(full), str(files["sym"])], "not one of each"),
        ([str(full), str(full), "-t", "c4"], "do not apply"),
    ]
    for args, words in cases:
        out = tmp_path / "cmp"
        result = runner.invoke(app, ["compare", *args, "-o", str(out)])
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert words in clean(result.stderr), result.stderr
        assert not (out / "compare.json").exists()


def test_a_check_and_a_compare_into_one_folder_leave_only_the_last_report(files, tmp_path) -> None:
    # compare into a check folder kept the check's summary.json and CSVs beside its own
    # report.html, and 'eqaudit report' then re-rendered the check report over it; a check
    # into a compare folder kept compare.* and the a/, b/ audits (review).
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    check = ["check", str(files["sym"]), "--data", str(files["images"]), "--no-layers"]
    assert runner.invoke(app, [*check, "-o", str(out)]).exit_code == 0
    assert (out / "summary.json").is_file()
    assert run_compare(files, "sym", "biased", out, "--no-layers").exit_code == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"compare.json", "compare.csv", "report.html", "summary.md", "junit.xml"} | {
        "a",
        "b",
        "notes.txt",
    }
    (out / "a" / "mine.txt").write_text("a user's file")  # a folder with other files stays
    assert runner.invoke(app, [*check, "-o", str(out)]).exit_code == 0
    names = {p.name for p in out.iterdir()}
    assert not names & {"compare.json", "compare.csv", "b"}
    assert {"summary.json", "report.html", "a", "notes.txt"} <= names


def test_a_compare_of_saved_audits_removes_an_earlier_comparisons_audits(files, tmp_path):
    # compare A B -o out, then compare of two saved folders -o out: the first run's a/ and b/
    # stayed beside a compare.json of other audits (review).
    out = tmp_path / "out"
    assert run_compare(files, "sym", "biased", out, "--no-layers").exit_code == 0
    assert (out / "a" / "summary.json").is_file()
    check = ["check", "--data", str(files["images"]), "--no-layers"]
    for name in ("sym", "biased"):
        args = [*check[:1], str(files[name]), *check[1:], "-o", str(tmp_path / name)]
        assert runner.invoke(app, args).exit_code == 0
    saved = [str(tmp_path / "sym"), str(tmp_path / "biased")]
    assert runner.invoke(app, ["compare", *saved, "-o", str(out)]).exit_code == 0
    assert not (out / "a").exists() and not (out / "b").exists()
    # ... and a compare of models writes its own a/ and b/, kept.
    assert run_compare(files, "sym", "biased", out, "--no-layers").exit_code == 0
    assert (out / "a" / "summary.json").is_file() and (out / "b" / "summary.json").is_file()
    # Comparing the kept audits again into their folder keeps them (it deleted both).
    again = runner.invoke(app, ["compare", str(out / "a"), str(out / "b"), "-o", str(out)])
    assert again.exit_code == 0, again.output
    assert (out / "a" / "summary.json").is_file() and (out / "b" / "summary.json").is_file()


def test_the_console_table_fits_an_80_column_terminal(files, tmp_path, monkeypatch) -> None:
    # It was 119 characters of plain text, wrapped by the terminal into unreadable rows.
    from eqaudit.reports import console

    monkeypatch.setattr(console.stdout, "width", 80)
    result = run_compare(files, "sym", "biased", tmp_path / "out", "--no-layers")
    assert result.exit_code == 0, result.output
    rows = [line for line in clean(result.stdout).splitlines() if "B worse" in line]
    assert rows and all(len(line) <= 80 for line in rows)
    assert len(rows) == 6 and all(line.rstrip().endswith("B worse") for line in rows)


def test_report_cleanup_never_takes_a_users_audits(files, tmp_path) -> None:
    # Review: 'merge out/a out/b -o out' deleted the two shard folders (a/, b/ of a folder that
    # held no comparison), and 'compare new old -o new' deleted audit A.
    check = ["check", str(files["sym"]), "--data", str(files["images"]), "--no-layers"]
    out = tmp_path / "out"
    for index, name in ((1, "a"), (2, "b")):
        args = [*check, "--shard", f"{index}/2", "-o", str(out / name)]
        assert runner.invoke(app, args).exit_code == 0
    merged = runner.invoke(app, ["merge", str(out / "a"), str(out / "b"), "-o", str(out)])
    assert merged.exit_code == 0, merged.output
    assert (out / "a" / "shard-state.json").is_file() and (out / "b" / "shard-state.json").is_file()
    other = tmp_path / "other"
    assert runner.invoke(app, [*check, "-o", str(other)]).exit_code == 0
    refused = runner.invoke(app, ["compare", str(out), str(other), "-o", str(out)])
    assert refused.exit_code == EXIT_USAGE
    assert "holds one of the audits being compared" in clean(refused.stderr)
    assert (out / "summary.json").is_file()


# -- damaged saved audits --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(files, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved audit of sym (flips, outputs only), to copy and damage."""
    out = tmp_path_factory.mktemp("saved") / "sym"
    argv = ["check", str(files["sym"]), "--data", str(files["images"]), "-t", "flips"]
    result = runner.invoke(app, [*argv, "--no-layers", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def damaged_copy(saved: Path, where: Path, **summary: object) -> Path:
    """A copy of ``saved`` with the summary.json keys given replaced (None: removed)."""
    shutil.copytree(saved, where)
    data = json.loads((where / "summary.json").read_text())
    for key, value in summary.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    (where / "summary.json").write_text(json.dumps(data))
    return where


def compare_error(a: Path, b: Path, out: Path) -> str:
    """The one error line of a refused compare (exit 2) that wrote nothing."""
    result = runner.invoke(app, ["compare", str(a), str(b), "-o", str(out)])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "Traceback" not in result.output
    lines = clean(result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize(
    ("version", "says"),
    [
        ("9.0", "was written by a newer eqaudit (schema 9.0, this one reads 1."),
        (999, "was written by a newer eqaudit (schema 999, this one reads 1."),
        ("abc", 'has schema_version "abc", not MAJOR.MINOR'),
        (None, "has no schema_version"),
        ("0.9", "has schema 0.9, older than this eqaudit reads"),
    ],
)
def test_a_saved_audit_of_another_schema_is_refused(saved, tmp_path, version, says) -> None:
    # A summary.json of schema "999" or "9.0" was compared as if this eqaudit could read it.
    future = damaged_copy(saved, tmp_path / "future", schema_version=version)
    line = compare_error(saved, future, tmp_path / "out")
    assert line.startswith(f"error: '{future / 'summary.json'}' ") and says in line
    # ... and the same file re-rendered by eqaudit report.
    result = runner.invoke(app, ["report", str(future)])
    assert result.exit_code == EXIT_USAGE and clean(result.stderr).strip() == line


def _damage_predictions(frame: pd.DataFrame, edit: str) -> pd.DataFrame:
    if edit == "renamed-column":
        return frame.rename(columns={"top1": "pred"})
    if edit == "no-image-column":
        return frame.drop(columns=["image"])
    if edit == "duplicate-rows":
        return pd.concat([frame, frame.iloc[[2]]])
    if edit == "header-only":
        return frame.iloc[:0]
    if edit == "top1-not-a-class":
        return frame.assign(top1=["cat", *frame["top1"].iloc[1:]])
    if edit == "top1-past-the-classes":
        return frame.assign(top1=[99, *frame["top1"].iloc[1:]])
    if edit == "agrees-not-a-boolean":
        return frame.assign(agrees=["maybe", *frame["agrees"].iloc[1:]])
    if edit == "one-row-missing":
        return frame.iloc[:-1]
    raise AssertionError(edit)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ("renamed-column", "predictions.csv' lacks the column(s) top1 (it has: image, "),
        ("no-image-column", "predictions.csv' lacks the column(s) image (it has: transform, "),
        ("duplicate-rows", "predictions.csv' lists image 'im00.png' under flip_v more than once"),
        ("header-only", "predictions.csv' has a header but no rows"),  # it said "is missing"
        ("top1-not-a-class", "predictions.csv' has top1 'cat' on row 1, not a class index"),
        ("top1-past-the-classes", "predictions.csv' has top1 '99' on row 1, not a class index"),
        ("agrees-not-a-boolean", "predictions.csv' has agrees 'maybe' on row 1, not True or"),
        ("one-row-missing", "the predictions of A and B do not pair row for row (72 rows in A, 71"),
    ],
)
def test_a_damaged_predictions_csv_is_refused_naming_it(saved, tmp_path, edit, says) -> None:
    # A renamed or missing column (KeyError), a repeated row (pandas MergeError): exit 4; a
    # class name for top1 or an unknown agrees value went into the statistics as 'changed'.
    damaged = damaged_copy(saved, tmp_path / "damaged")
    frame = pd.read_csv(saved / "predictions.csv")
    assert len(frame) == NUM_IMAGES * 3 and list(frame["image"][:3]) == ["im00.png"] * 3
    _damage_predictions(frame, edit).to_csv(damaged / "predictions.csv", index=False)
    line = compare_error(saved, damaged, tmp_path / "out")
    assert says in line, line
    if "predictions.csv" in says:
        assert line.startswith(f"error: '{damaged / 'predictions.csv'}' ")


def test_saved_audits_compared_into_a_folder_whose_a_is_a_link(saved, tmp_path) -> None:
    # Saved audits write no a/ or b/: a link (or file) named so was refused all the same, after
    # the pre-audit check of the report's names learnt about a/ and b/ (review).
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").symlink_to(saved, target_is_directory=True)
    (out / "b").write_text("mine")
    result = runner.invoke(app, ["compare", str(out / "a"), str(saved), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "compare.json").is_file() and (out / "b").read_text() == "mine"


def test_a_predictions_csv_without_js_divergences_still_pairs(saved, tmp_path) -> None:
    # JS divergences come from summary.json; the per-image column was selected all the same
    # and its absence died with a KeyError (exit 4, review).
    trimmed = damaged_copy(saved, tmp_path / "trimmed")
    frame = pd.read_csv(saved / "predictions.csv").drop(columns=["js_divergence"])
    frame.to_csv(trimmed / "predictions.csv", index=False)
    result = runner.invoke(app, ["compare", str(saved), str(trimmed), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert all(row["mcnemar_p"] == 1.0 for row in data["outputs"])


def test_models_with_different_classes_are_refused(files, tmp_path) -> None:
    # A 5-class and a 7-class model were compared (exit 0, "top-1 agreement of A and B 0.18")
    # without a word, though class 3 of one is not class 3 of the other.
    seven = export_onnx(symmetric_cnn(size=SIZE, classes=7), tmp_path / "seven.onnx", SIZE)
    files = {**files, "seven": seven}
    out = tmp_path / "out"
    result = run_compare(files, "sym", "seven", out, "-t", "flips", "--no-layers", "-n", "4")
    assert result.exit_code == EXIT_USAGE, result.output
    assert clean(result.stderr).strip().splitlines() == [
        "error: A gives 5 class scores and B 7: compare pairs their top-1 classes image by image, "
        "which is meaningless across different class sets; compare two checkpoints of one "
        "classifier (the same classes), or audit each with eqaudit check"
    ]
    assert not out.exists()
