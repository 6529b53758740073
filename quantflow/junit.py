"""JUnit XML of `quantflow gate --junit FILE`: one testsuite, one testcase per metric, so CI
systems (GitHub, GitLab, Jenkins) show which metric regressed, against what and by which rule.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from quantflow.regress import Check

SUITE = "quantflow.gate"


def to_xml(checks: Sequence[Check], *, name: str, baseline: str) -> ET.Element:
    """<testsuite> with a <testcase> per check: <failure> when it regressed, <skipped> when it
    could not be compared; every case's <system-out> holds the rule and the baseline."""
    suite = ET.Element("testsuite", name=SUITE, tests=str(len(checks)),
                       failures=str(sum(c.status == "fail" for c in checks)),
                       skipped=str(sum(c.status == "skip" for c in checks)), errors="0")
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname=f"{SUITE}.{name}", name=c.metric)
        if c.status == "fail":
            failure = ET.SubElement(
                case, "failure", type="regression",
                message=f"{c.metric} regressed: {c.message} (baseline {_num(c.baseline)}, "
                        f"candidate {_num(c.candidate)}, threshold {c.threshold}; rule: "
                        f"{c.rule})")
            failure.text = f"baseline: {baseline}"
        elif c.status == "skip":
            ET.SubElement(case, "skipped", message=c.message)
        out = ET.SubElement(case, "system-out")
        out.text = f"{c.message}\nrule: {c.rule}\nbaseline: {baseline}"
    return suite


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.6g}"


def write(path: Path, checks: Sequence[Check], *, name: str, baseline: str) -> None:
    """Write the JUnit file (whole or not at all: written beside it, then renamed)."""
    tree = ET.ElementTree(to_xml(checks, name=name, baseline=baseline))
    ET.indent(tree)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tree.write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, path)
