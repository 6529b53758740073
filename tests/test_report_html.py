"""report.html in a real browser: a compile of zoo:resnet_fmnist writes it; headless Chromium
loads it without console errors, renders every expected section (checked in the dumped DOM),
fits a phone's width without sideways scrolling, and the screenshots land in test-artifacts/;
`quantflow report OUT/` rebuilds it and `quantflow gate --record` redraws it with the history.

The "analysis" (the parity debugger's section, `quantflow debug`) and a mixed-precision
"search" are added to the real report by `_enrich`, following their schemas: a real mixed
search takes minutes, the debugger lands in a parallel branch.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tool_loader import load_tool

from quantflow import history, pipeline, report_html, svg_plots
from quantflow.cli import main

COMPILE = ["--calib-samples", "64", "--eval-samples", "200", "--profile-runs", "10", "-q"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
MAX_BYTES = 2 * 1024 * 1024
EVIL = '<script>alert("x")</script>&'
shot = load_tool("report_screenshot")
needs_chromium = pytest.mark.skipif(shot.chromium() is None, reason="chromium is not "
                                    "installed (tools/setup.sh installs Debian `chromium`)")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html") / "uniform"
    assert main(["compile", "zoo:resnet_fmnist", *COMPILE, "-o", str(out)]) == 0
    return out


def _enrich(report: dict[str, Any]) -> dict[str, Any]:
    """The real report plus an analysis and a search section in their schemas; the worst
    layer is given a hostile name to prove escaping."""
    r = json.loads(json.dumps(report))
    names = [row["name"] for row in r["layers"]]
    rng = np.random.default_rng(0)
    sim = {n: float(40 - 2 * i) for i, n in enumerate(names)}
    worst = names[-3:][::-1]
    layers = [{"name": n, "op": "conv2d", "bits": "W8A8", "sqnr_sim_db": sim[n],
               "local_sqnr_db": sim[n] + 3, "bound_db": 20.0, "sqnr_runtime_db": 50.0 - i,
               "runtime_steps": 1, "hessian_trace": 0.1 * (i + 1), "diverged": n == worst[0],
               "cause": EVIL if n == worst[0] else None,
               "fix": "keep float (--keep-float)" if n == worst[0] else None}
              for i, n in enumerate(names)]
    hists = {}
    for n in worst:
        w, a = rng.normal(0, 0.1, 5000), np.abs(rng.normal(0, 1.0, 5000))
        we, wc = np.histogram(w, 64)[1], np.histogram(w, 64)[0]
        ae, ac = np.histogram(a, 64)[1], np.histogram(a, 64)[0]
        hists[n] = {"weight": {"edges": we.tolist(), "counts": wc.tolist()},
                    "activation": {"edges": ae.tolist(), "counts": ac.tolist()},
                    "range": [0.0, float(np.quantile(a, 0.99))], "clipped": 0.01}
    r["analysis"] = {"samples": 8, "runtime": "ort", "isa": "x86-avx2", "device": "portable",
                     "runtime_skipped": None,
                     "first_divergent": worst[0], "worst": worst, "seconds": 1.5,
                     "layers": layers, "histograms": hists}
    params = {row["name"]: row["params"] for row in r["layers"]}

    def trial(k: int) -> dict[str, Any]:  # the k smallest layers in 4 bits
        four = sorted(params, key=params.__getitem__)[:k]
        size = sum(p * (4 if n in four else 8) // 8 for n, p in params.items())
        return {"config": f"W4x{k}", "key": f"k{k}", "quality": 92.5 - 0.3 * k,
                "drop": 0.3 * k, "size_bytes": size, "latency_ms": 0.2, "reused": False}

    trials = [trial(k) for k in range(0, len(names), 2)]
    r["bits"] = "mixed"
    r["search"] = {"best": trials[2], "satisfied": True, "reference_quality": 92.5,
                   "budget": {"max_drop": 1.0}, "real_evaluations": len(trials),
                   "reused_evaluations": 0, "seconds": 3.0, "pareto": trials[::2],
                   "trials": trials,
                   "layers": [{"layer": n, "trace_per_param": 0.01 * (i + 1), "act_bits": 8}
                              for i, n in enumerate(names)]}
    return r


@pytest.fixture(scope="module")
def rich(compiled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compile's output with the enriched report and a gate history of 3 runs, the last
    one failing; report.html drawn by `quantflow report OUT --history DIR`."""
    out = tmp_path_factory.mktemp("rich") / "out"
    shutil.copytree(compiled, out)
    hist = out.parent / "history"
    report = _enrich(json.loads((out / "report.json").read_text()))
    (out / "report.json").write_text(json.dumps(report))
    assert main(["gate", str(out / "report.json"), "--history", str(hist), "--record"]) == 0
    assert main(["gate", str(out / "report.json"), "--history", str(hist), "--record"]) == 0
    assert "2 run(s), 0 failing" in _sections((out / "report.html").read_text())["history"][
        "text"]  # gate --record redrew the page with the history
    bad = history.load(hist)[-1]
    bad["passed"], bad["metrics"]["quality"] = False, bad["metrics"]["quality"] - 5
    history.append(hist, bad)
    assert main(["report", str(out), "--history", str(hist), "-q"]) == 0
    return out


class _Sections(HTMLParser):
    """section id -> {svg: count, table: count, text: all text}, from a (dumped) DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, dict[str, Any]] = {}
        self.cur: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "section":
            self.cur = dict(attrs).get("id") or "?"
            self.found[self.cur] = {"svg": 0, "table": 0, "fail": 0, "text": ""}
        elif self.cur and tag in ("svg", "table"):
            self.found[self.cur][tag] += 1
        elif self.cur and "fail" in (dict(attrs).get("class") or "").split():
            self.found[self.cur]["fail"] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self.cur = None

    def handle_data(self, data: str) -> None:
        if self.cur:
            self.found[self.cur]["text"] += data


def _sections(dom: str) -> dict[str, dict[str, Any]]:
    p = _Sections()
    p.feed(dom)
    return p.found


def _self_contained(page: str) -> None:
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert " src=" not in page and "<link" not in page  # nothing to fetch: opens offline


def test_compile_writes_html(compiled: Path) -> None:
    page = compiled / "report.html"
    text = page.read_text()
    assert page.stat().st_size < MAX_BYTES
    _self_contained(text)
    found = _sections(text)
    assert list(found) == ["summary", "layers", "ranges", "debug", "passes", "stages"]
    report = json.loads((compiled / "report.json").read_text())
    assert f"{report['size']['ratio']:.2f}x smaller" in found["summary"]["text"]
    assert report["host"]["isa_class"] in found["summary"]["text"]
    for row in report["layers"]:  # every layer in the table and in the bits plot
        assert found["layers"]["text"].count(row["name"]) >= 2, row["name"]
    # every compile's analysis (the analyze stage): healthy, so no divergent layer
    a = report["analysis"]
    assert "none: every layer within its bound" in found["debug"]["text"]
    assert all(n in found["debug"]["text"] for n in a["worst"])
    assert found["ranges"]["svg"] == 2 * len(a["histograms"]) == 6
    # bits, sensitivity (Hessian estimate), SQNR sim vs FP32, SQNR runtime vs sim, latency
    assert found["stages"]["svg"] == 1 and found["layers"]["svg"] == 5
    assert not [p for p in compiled.iterdir() if p.name.startswith(".report.html")]


def test_report_command_rebuilds(compiled: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    (out / "report.html").unlink()
    assert main(["report", str(out / "report.json")]) == 0
    assert (out / "report.html").read_text() == (compiled / "report.html").read_text()
    assert str(out / "report.html") in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 3
    assert "no report.json here" in capsys.readouterr().err


def test_rich_report_sections_and_escaping(rich: Path) -> None:
    text = (rich / "report.html").read_text()
    _self_contained(text)
    assert EVIL not in text and html_escaped(EVIL) in text
    found = _sections(text)
    assert list(found) == ["summary", "layers", "ranges", "debug", "pareto", "passes",
                           "stages", "history"]
    report = json.loads((rich / "report.json").read_text())
    a = report["analysis"]
    assert found["layers"]["svg"] == 5  # bits, sensitivity, SQNR sim, SQNR runtime, latency
    assert found["ranges"]["svg"] == 2 * len(a["worst"])
    assert a["first_divergent"] in found["debug"]["text"]
    assert "keep float (--keep-float)" in found["debug"]["text"]
    assert report["search"]["best"]["config"] in found["pareto"]["text"]
    assert text.count('class="chosen"') == 1
    assert found["history"]["svg"] == 3 and found["history"]["fail"] == 3  # 1 per plot
    assert "3 run(s), 1 failing" in found["history"]["text"]


def test_failed_analysis_says_so(compiled: Path) -> None:
    report = json.loads((compiled / "report.json").read_text())
    report["analysis"] = {"error": "runtime <crashed>"}
    found = _sections(report_html.render(report))
    for sid in ("ranges", "debug"):
        assert "not available: the analysis failed (runtime <crashed>)" in found[sid]["text"]
    assert "<crashed>" not in report_html.render(report)  # escaped


def html_escaped(s: str) -> str:
    return svg_plots.esc(s)


@needs_chromium
@pytest.mark.parametrize("which", ["compiled", "rich"])
def test_chromium_renders(which: str, request: pytest.FixtureRequest,
                          capsys: pytest.CaptureFixture[str]) -> None:
    out: Path = request.getfixturevalue(which)
    page = out / "report.html"
    loaded = shot.load(page)
    assert loaded.console == [], loaded.console  # no console errors (or anything else)
    found = _sections(loaded.dom)
    want = {"summary", "layers", "ranges", "debug", "passes", "stages"}
    assert want <= set(found) and (which == "compiled" or {"pareto", "history"} <= set(found))
    assert all(f["text"].strip() for f in found.values())
    assert sum(f["svg"] for f in found.values()) == page.read_text().count("<svg")
    assert _phone_overflow(page) <= 0, "the page scrolls sideways on a 390 px phone"
    png = shot.screenshot(page, ARTIFACTS / f"report_{which}.png", width=1280, height=2400)
    phone = shot.screenshot(page, ARTIFACTS / f"report_{which}_phone.png", width=390,
                            height=1600)
    assert png.stat().st_size > 20_000 and phone.stat().st_size > 10_000  # not blank
    with capsys.disabled():  # in the test output even when pytest captures it
        print(f"\n  report.html ({page.stat().st_size} bytes) screenshots: {png} {phone}")


def _phone_overflow(page: Path) -> int:
    """How many px the page is wider than a 390 px viewport (measured by the browser: a
    wrapper page frames it and writes scrollWidth - clientWidth into its own DOM)."""
    wrapper = page.parent / "phone.html"
    wrapper.write_text(
        '<!DOCTYPE html><html><body><iframe id="f" src="report.html" style="width:390px;'
        'height:800px;border:0"></iframe><script>document.getElementById("f").onload='
        'function(){var d=this.contentDocument.documentElement,p=document.createElement("pre");'
        'p.id="m";p.textContent="W"+(d.scrollWidth-d.clientWidth)+"W";'
        "document.body.appendChild(p);};</script></body></html>")
    shot.FLAGS += ("--allow-file-access-from-files",)  # the wrapper reads the frame's size
    try:
        dom = shot.load(wrapper).dom
    finally:
        shot.FLAGS = shot.FLAGS[:-1]
        wrapper.unlink()
    start = dom.index('<pre id="m">W') + len('<pre id="m">W')
    return int(dom[start:dom.index("W", start)])


def test_render_failure_does_not_fail_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    def boom(out: Path, **_: Any) -> Path:
        raise ValueError("a rendering bug")

    monkeypatch.setattr(report_html, "write_html", boom)
    with caplog.at_level(logging.WARNING, logger="quantflow"):
        pipeline._write_html(tmp_path)
    assert "a rendering bug" in caplog.text and "quantflow report" in caplog.text


def test_svg_plots_scale_and_escape() -> None:
    t = svg_plots.ticks(0.0, 37.0)
    assert t[0] <= 0.0 and t[-1] >= 37.0 and 3 <= len(t) <= 8
    assert all(abs((b - a) - (t[1] - t[0])) < 1e-9 for a, b in itertools.pairwise(t))
    fig = svg_plots.bar(["a<b", "c"], [1.0, None], title="t&", unit="ms")
    assert "a&lt;b" in fig and "t&amp;" in fig and "n/a" in fig and "a<b" not in fig
    assert "no data" in svg_plots.histogram([0, 1], [1, 2], title="h", xlabel="x")
    pts = [(1.0, 2.0, "p", "pt"), (2.0, 3.0, "f", "front"), (3.0, 4.0, "c", "chosen")]
    assert svg_plots.scatter(pts, title="s", xlabel="x", ylabel="y").count("<circle") == 3
    line = svg_plots.line(["r1", "r2"], {"q": [1.0, 2.0]}, title="l", ylabel="y", marked=[1])
    assert line.count('class="fail"') == 1 and line.count("<circle") == 1


@pytest.mark.slow
@needs_chromium
def test_mobilenet_v2_imagenet_report(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mnv2"
    assert main(["compile", "zoo:mobilenet_v2_imagenet", "--calib-samples", "32",
                 "--eval-samples", "32", "--profile-runs", "5", "-q", "-o", str(out)]) == 0
    page = out / "report.html"
    size = page.stat().st_size
    assert size < MAX_BYTES
    loaded = shot.load(page)
    assert loaded.console == [], loaded.console
    assert {"summary", "layers", "passes", "stages"} <= set(_sections(loaded.dom))
    png = shot.screenshot(page, ARTIFACTS / "report_mobilenet_v2_imagenet.png")
    with capsys.disabled():
        print(f"\n  report.html of zoo:mobilenet_v2_imagenet: {size} bytes; screenshot: {png}")


def test_summary_wording_when_quantized_is_worse(compiled: Path) -> None:
    """A slower or larger artifact says so (issue: 'x0.30 faster' read as a win)."""
    report = json.loads((compiled / "report.json").read_text())
    report["latency"]["speedup"] = 0.3
    report["size"]["ratio"] = 0.64
    text = _sections(report_html.render(report))["summary"]["text"]
    assert "3.33x slower" in text and "1.56x larger" in text
    report["latency"]["speedup"] = 1.5
    assert "1.50x faster" in _sections(report_html.render(report))["summary"]["text"]
