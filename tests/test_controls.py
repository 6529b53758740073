"""Compile controls (issue 16): --keep-float, --bits-for, --seed, --options FILE, --print-config.

Real compiles on ONNX Runtime: zoo:resnet_fmnist on Fashion-MNIST through the CLI (options
from a TOML file, flags overriding it), and a small CNN through the Python API for the
mixed-precision search (the search is the slow part; a 4-layer net keeps it to seconds).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from nets import SmallCNN

from quantflow.cli import main
from quantflow.config import CompileConfig
from quantflow.dataset import Dataset
from quantflow.pipeline import compile
from quantflow.search.quantune import Budget, candidate_pool, random_feasible, seeds, uniform
from quantflow.search.space import OPTIONS, SearchSpace, global_configs, size_table

ZOO = "zoo:resnet_fmnist"
#: resnet_fmnist's fx names: layer2.0.conv1 is conv2d_5, layer3.0's convs 10-12, fc linear
KEPT = {"conv2d_5", "linear"}
W4 = {"conv2d_10", "conv2d_11", "conv2d_12"}
A16 = {"conv2d_4"}  # layer1.1.conv2


def _float_weighted(model: Path) -> set[str]:
    """Conv/Gemm nodes of an ONNX model whose weight is a float initializer (no DQ before it)
    and whose data input is not a DequantizeLinear output: what runs in float."""
    m = onnx.load(str(model))
    producer = {o: n.op_type for n in m.graph.node for o in n.output}
    inits = {i.name for i in m.graph.initializer}
    out = set()
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits:
            assert producer.get(n.input[0]) != "DequantizeLinear", n.name
            out.add(n.name.removeprefix("node_"))
    return out


@pytest.mark.usefixtures("one_thread")
def test_keep_float_and_bits_for_from_an_options_file(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    opts = tmp_path / "quantflow.toml"
    opts.write_text(f'model = "{ZOO}"\noutput = "{tmp_path / "out"}"\ncalibrator = "minmax"\n'
                    'equalize = "off"\ncalib-samples = 64\neval_samples = 64\n'
                    'profile_runs = 50\nkeep_float = ["layer2.0.conv1", "f?"]\n'
                    'bits_for = ["layer3.0.*=W4A8", "layer1.1.conv2=W8A16"]\n')
    # flags given override the file (profile runs); flags not given never hide it
    assert main(["compile", "--options", str(opts), "--profile-runs", "3", "--seed", "7",
                 "-q"]) == 0
    out = tmp_path / "out"
    r = json.loads((out / "report.json").read_text())
    cfg = r["config"]
    assert cfg["profile_runs"] == 3 and cfg["seed"] == 7 and cfg["calibrator"] == "minmax"
    assert cfg["keep_float"] == ["layer2.0.conv1", "f?"]
    assert cfg["bits_for"] == ["layer3.0.*=W4A8", "layer1.1.conv2=W8A16"]
    plans = {row["name"]: row for row in r["layers"]}
    assert {n for n, row in plans.items() if row["plan"] == "FP32"} == KEPT
    assert {n for n, row in plans.items() if row["weight_bits"] == 4} == W4
    assert {n for n, row in plans.items() if row["plan"] == "W8A16"} == A16
    # kept-float layers run in float in ORT, every other conv as QLinearConv
    assert {n for n, row in plans.items() if not row["runs_integer"]} >= KEPT
    assert KEPT <= set(r["runtime"]["float_compute_ops"])
    assert not KEPT & set(r["runtime"]["quantized_layers"])
    convs = {n for n, row in plans.items() if row["op"] == "conv2d"}
    integer = {n for n in convs if plans[n]["runs_integer"]}
    # ORT has no int16 conv: the W8A16 layer runs in float between its Q/DQ, and so does
    # conv2d_3, whose output it reads as int16; every other conv is a QLinearConv
    assert integer == convs - {"conv2d_3", "conv2d_4", "conv2d_5"}
    assert r["runtime"]["integer_ops"]["QLinearConv"] == len(integer)
    assert _float_weighted(out / "model.onnx") == KEPT
    assert r["parity"]["passed"]
    compiled = json.loads((out / "plan.json").read_text())["compiled"]["overrides"]
    assert compiled["linear"] == {"option": "FP32", "by": "--keep-float f?"}
    assert {n for n, v in compiled.items() if v["option"] == "W4A8"} == W4


def test_fixed_layers_and_free_options_bind_every_candidate() -> None:
    """SearchSpace.fix: a fixed layer keeps its option in every seed, draw and mutation, the
    other layers never take an option outside `free`, and budgets count the fixed ones."""
    rng = np.random.default_rng(0)
    names = [f"l{i}" for i in range(8)]
    numels = [int(n) for n in rng.integers(100, 5000, size=8)]
    sens = {g.scheme_key: rng.random((8, len(OPTIONS))) for g in global_configs()}
    space = SearchSpace(names, OPTIONS, global_configs(), sens, size_table(numels, OPTIONS))
    int8 = space.int8_size()
    space.fix({"l2": "W8A16", "l5": "FP32", "add": "FP32"}, ("W8A8", "W4A8", "FP32"))
    assert space.int8_size() == int8  # --max-size RATIOx stays relative to uniform INT8
    budget = Budget(max_size_ratio=0.9)
    start = seeds(space, budget)
    pool = candidate_pool(space, budget, start, 200, rng)
    pool += [random_feasible(space, budget, rng) for _ in range(50)]
    pool.append(uniform(space, "W8A8"))
    for c in pool:
        assert c.options[2] == "W8A16" and c.options[5] == "FP32", c
        assert "W8A16" not in c.options[:2] + c.options[3:], c
        assert space.size_bytes(c) == sum(n * {"W8A8": 1, "W8A16": 1, "W4A8": 0.5,
                                               "FP32": 4}[o] for n, o in zip(numels, c.options))
    assert space.plan(pool[0]).layers["add"].is_float  # a fixed non-weighted node too
    assert all(space.size_bytes(c) <= 0.9 * int8 * (1 + 1e-9) for c in start)


def _small(tmp: Path, out: str, **kw: object) -> tuple[dict, Path]:
    torch.manual_seed(0)
    m = SmallCNN().eval()
    x = torch.randn(96, 1, 16, 16)
    with torch.no_grad():
        y = m(x).argmax(1)
    cfg = CompileConfig(bits="mixed", calibrator="minmax", equalize="off", profile_runs=3,
                        keep_float=("body.10",), bits_for=("body.3=W4A8",), **kw)
    compile(m, (x[:1],), Dataset(x[:64], None, "calib"), Dataset(x[64:], y[64:], "eval"),
            tmp / out, cfg)
    return json.loads((tmp / out / "report.json").read_text()), tmp / out


@pytest.mark.usefixtures("one_thread")
def test_mixed_search_keeps_fixed_layers_and_a_seed_reproduces_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    r1, o1 = _small(tmp_path, "a", seed=5)
    plans = {row["name"]: row["plan"] for row in r1["layers"]}
    assert plans["conv2d_1"] == "W4A8" and plans["linear"] == "FP32"  # body.3, body.10
    search = json.loads((o1 / "search.json").read_text())
    assert search["real_evaluations"] >= 5
    for t in search["trials"]:  # the search never changed them
        opts = json.loads(t["key"])["o"]
        assert opts[1] == "W4A8" and opts[3] == "FP32", t
    assert r1["parity"]["passed"] and "linear" in r1["runtime"]["float_compute_ops"]
    # the same seed again, every evaluation redone (the latency table is a measurement:
    # it stays cached, as between two compiles of one model on one machine)
    (tmp_path / "cache" / "quantflow" / "search.sqlite").unlink()
    r2, o2 = _small(tmp_path, "b", seed=5)
    assert json.loads((o2 / "search.json").read_text())["reused_evaluations"] == 0
    assert (o1 / "plan.json").read_text() == (o2 / "plan.json").read_text()
    assert (o1 / "model.onnx").read_bytes() == (o2 / "model.onnx").read_bytes()
    assert r2["config"]["seed"] == 5


def test_print_config_merges_file_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "o.yaml").write_text("model: zoo:resnet_fmnist\ncalib_samples: 64\n"
                                     "keep-float: fc\nmax-size: 0.5x\nseed: 3\n")
    assert main(["compile", "--options", "o.yaml", "--print-config", "--seed", "9",
                 "--bits-for", "layer1.*=w8a16"]) == 0
    text = capsys.readouterr().out
    got = tomllib.loads(text)
    assert got["model"] == ZOO and got["calib_samples"] == 64 and got["seed"] == 9
    assert got["keep_float"] == ["fc"] and got["bits_for"] == ["layer1.*=w8a16"]
    assert got["max_size_ratio"] == 0.5 and got["target"] == "ort"
    # the printed TOML is itself an options file giving the same options;
    # ./quantflow.toml is read without --options, and said so
    (tmp_path / "quantflow.toml").write_text(text)
    assert main(["compile", "--print-config"]) == 0
    again = capsys.readouterr()
    assert tomllib.loads(again.out) == got
    assert "using options from ./quantflow.toml" in again.err


@pytest.mark.parametrize(("content", "suffix", "needle"), [
    ("calib_sample = 3\n", ".toml", "unknown key 'calib_sample'; did you mean 'calib_samples'"),
    ('calib_samples = "3"\n', ".toml", "key 'calib_samples' must be an integer"),
    ("target: foo\n", ".yaml", "key 'target' must be one of ort, tvm, trt"),
    ('bits_for = ["x=W3"]\n', ".toml", "key 'bits_for': --bits-for 'x=W3': unknown option"),
    ("keep_float = 3\n", ".toml", "key 'keep_float' must be a list of strings"),
    ("a = [\n", ".toml", "not valid TOML"),
])
def test_options_file_errors_name_file_and_key(tmp_path: Path, content: str, suffix: str,
                                               needle: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / f"o{suffix}"
    f.write_text(content)
    assert main(["compile", ZOO, "-o", str(tmp_path / "o"), "--options", str(f)]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and needle in err, err


@pytest.mark.parametrize(("flags", "needle"), [
    (["--bits-for", "conv1=W9"], "unknown option 'W9'; fix: use one of W8A8, W8A16"),
    (["--bits-for", "conv1"], "write PATTERN=OPTION"),
    (["--keep-float", "nohead.*"], ("--keep-float 'nohead.*' matches no quantizable layer; "
                                   "fix: use a glob over the layer names (conv2d, conv2d_1")),
    (["--bits-for", "avgpool=W4A8"], "matches no weighted layer"),
    (["--keep-float", "layer1.*", "--bits-for", "layer1.0.conv1=W4A8"],
     "layer conv2d_1 is chosen by both --keep-float layer1.* and --bits-for"),
    (["--bits-for", "layer1.*=W4A8", "--bits-for", "layer1.0.*=W8A16"],
     "layer conv2d_1 is chosen by both"),
    (["--seed", "-1"], "seed (--seed) must be >= 0"),
])
def test_control_errors_are_usage_errors(tmp_path: Path, flags: list[str], needle: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", ZOO, "-q", "--calib-samples", "8", "--eval-samples", "8",
                 "-o", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_keep_float_holds_in_the_tvm_artifact(tmp_path: Path) -> None:
    """The same controls on TVM: kept layers are float kernels, the rest integer."""
    pytest.importorskip("tvm")
    out = tmp_path / "tvm"
    assert main(["compile", ZOO, "--target", "tvm", "--calibrator", "minmax", "--equalize",
                 "off", "--calib-samples", "64", "--eval-samples", "64", "--profile-runs", "3",
                 "--keep-float", "layer2.0.conv1", "--keep-float", "fc", "--bits-for",
                 "layer3.0.*=W4A8", "-q", "-o", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    assert set(r["runtime"]["float_layers"]) == KEPT
    convs = {row["name"] for row in r["layers"] if row["op"] == "conv2d"}
    assert set(r["runtime"]["int_layers"]) == convs - KEPT
    assert {row["name"] for row in r["layers"] if row["weight_bits"] == 4} == W4
