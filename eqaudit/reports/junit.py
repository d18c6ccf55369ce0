"""junit.xml: one test case per gate check, for the test reporters of CI systems.

A failed check carries a ``<failure>`` whose message names the check, the measured value (as
printed, the value that was compared) and the threshold; a passed one the same line as its
``<system-out>``; a check that could not be evaluated is ``<skipped>`` with the reason. Built with :mod:`xml.etree.ElementTree`, so every name taken from
a model (layer names, element names) is escaped; characters XML 1.0 forbids are dropped.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from eqaudit.gate import evaluated_nothing
from eqaudit.results import AuditResult

FILE_NAME = "junit.xml"

_ILLEGAL_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _text(value: object) -> str:
    return _ILLEGAL_XML.sub("", str(value))


def _kind(check_name: str) -> str:
    """``agreement[rot90]`` -> ``agreement``; ``regression.js[rot90]`` -> ``regression.js``."""
    return check_name.split("[", 1)[0]


def junit_xml(
    suite: str,
    checks: list[dict],
    *,
    classname: str = "eqaudit.gate",
    time_s: float | None = None,
    properties: dict[str, object] | None = None,
) -> str:
    """The XML document for one suite of checks (dicts as written by ``Check.to_dict``).

    Without checks the suite holds one passing case, ``no gate checks configured``: a report
    with no test cases fails Jenkins' ``junit`` step (unless ``allowEmptyResults``) and reads as
    a broken run in other CI systems, where the audit did run."""
    if not checks:
        checks = [{"name": "no gate checks configured", "status": "passed", "kind": "audit"}]
    failures = sum(1 for c in checks if c["status"] == "failed")
    skipped = sum(1 for c in checks if c["status"] == "skipped")
    counts = {
        "tests": str(len(checks)),
        "failures": str(failures),
        "errors": "0",
        "skipped": str(skipped),
        "time": f"{time_s or 0.0:.3f}",
    }
    root = ET.Element("testsuites", {"name": "eqaudit", **counts})
    element = ET.SubElement(root, "testsuite", {"name": _text(suite), **counts})
    if properties:
        props = ET.SubElement(element, "properties")
        for key, value in properties.items():
            if value is not None:
                ET.SubElement(props, "property", name=_text(key), value=_text(value))
    for check in checks:
        case = ET.SubElement(
            element,
            "testcase",
            classname=f"{classname}.{check.get('kind') or _kind(check['name'])}",
            name=_text(check["name"]),
            time="0",
        )
        if check["status"] == "failed":
            failure = ET.SubElement(
                case, "failure", message=_text(check["message"]), type="ThresholdNotMet"
            )
            failure.text = _text(
                f"measured: {check['shown']} (full precision {check['value']!r})\n"
                f"threshold: {check['comparison']} {check['threshold']!r} ({check['option']})\n"
                f"what: {check['description']}"
            )
        elif check["status"] == "skipped":
            ET.SubElement(case, "skipped", message=_text(check.get("reason") or "not evaluated"))
        elif check.get("message"):  # passed: the value and threshold, as CI viewers show output
            ET.SubElement(case, "system-out").text = _text(check["message"])
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def write_junit(result: AuditResult, folder: Path) -> list[str]:
    """junit.xml of the gate block of the result's summary (see :func:`junit_xml`)."""
    summary = result.summary
    gate = summary.get("gate") or {}
    model = summary["model"]
    checks = list(gate.get("checks", []))
    if evaluated_nothing(gate):
        # The gate failed for evaluating nothing: one failed case says so, beside the skips.
        message = "no check evaluated: every threshold was skipped for this model"
        checks.append(
            {
                "name": "gate",
                "kind": "gate",
                "status": "failed",
                "message": message,
                "shown": "0 checks",
                "value": 0,
                "comparison": ">=",
                "threshold": 1,
                "option": "the thresholds given",
                "description": "checks evaluated; drop thresholds that cannot apply",
            }
        )
    text = junit_xml(
        f"eqaudit check {model['name']}",
        checks,
        time_s=(summary.get("run") or {}).get("duration_s"),
        properties={
            "model": model["name"],
            "model_sha256": model.get("sha256"),
            "transforms": summary["transforms"]["spec"],
            "images": summary["data"]["count"],
            "robustness_score": summary["scores"]["robustness_score"],
        },
    )
    (Path(folder) / FILE_NAME).write_text(text, encoding="utf-8")
    return [FILE_NAME]
