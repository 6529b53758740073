"""quantflow's corpus of malicious and broken inputs: one case per kind the issue lists.

`write(root)` writes every file under `root`; `CASES` says, for each, the command line, the
exit code it must end with and a piece of the one-line error. Every code payload writes
`root/PWNED` when it runs. tests/test_corpus.py runs each case through `quantflow.cli.main`
and checks: that exit code, no marker, no traceback, `-o` exactly as it was before.

    python tests/corpus/make_corpus.py DIR     # write the files and list the cases
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import payloads as pl

MARKER = "PWNED"
FAST = ("--calibrator", "minmax", "--equalize", "off", "--profile-runs", "2")


@dataclass(frozen=True)
class Case:
    """One bad input. `argv` holds {root} (the corpus folder) and {out} (the -o folder)."""

    name: str
    kind: str
    argv: tuple[str, ...]
    code: int
    expect: str
    #: -o before the run: absent | prior (an earlier output) | file | foreign | symlink | readonly
    out: str = "prior"
    env: tuple[tuple[str, str], ...] = ()


def _compile(model: str, *extra: str, calib: str = "calib.npy") -> tuple[str, ...]:
    return ("compile", f"{{root}}/{model}", "--calib", f"{{root}}/{calib}", *FAST, *extra,
            "-o", "{out}")


def _optimize(model: str, *extra: str) -> tuple[str, ...]:
    return ("optimize", f"{{root}}/{model}", *extra, "-o", "{out}")


CODE = "code execution"
KEPT = "kept safe (.pt/.pth/TorchScript/legacy/data pickles)"
BROKEN = "broken model file"
NONFINITE = "non-finite numbers"
SHAPES = "shapes and memory"
DATA = "data"
FLAGS = "flags and config"
OUTPUT = "output folder"
PROFILE = "profile"

_EVIL_PT2 = ("sample_inputs", "pickled_weight", "pickled_constant", "opaque_object",
             "custom_object", "sympy_expr", "graph_target", "aotinductor", "legacy_weights",
             "old_layout", "stray_pickle")
_MEM = (("QUANTFLOW_MAX_MEMORY", "24M"),)

CASES: tuple[Case, ...] = (
    *(Case(f"pt2-{n}", CODE, _compile(f"{n}.pt2"), 3, "refused") for n in _EVIL_PT2),
    *(Case(f"optimize-pt2-{n}", CODE, _optimize(f"{n}.pt2"), 3, "refused")
      for n in ("sample_inputs", "sympy_expr", "opaque_object", "pickled_weight")),
    Case("pickled-module", KEPT, _compile("whole_module.pt"), 3, "--trust-pickle"),
    Case("legacy-pickled-module", KEPT, _compile("legacy_module.pt"), 3, "--trust-pickle"),
    Case("torchscript-payload", KEPT, _compile("torchscript_payload.pt"), 3, "TorchScript"),
    Case("data-pt-payload", KEPT, _compile("net.pt2", calib="payload_data.pt"), 3,
         "payload_data.pt"),
    Case("data-npy-objects", KEPT, _compile("net.pt2", calib="objects.npy"), 3, "objects.npy"),
    Case("data-npz-objects", KEPT, _compile("net.pt2", calib="objects.npz"), 3, "objects.npz"),
    Case("pt2-noise", BROKEN, _compile("noise.pt2"), 3, "noise.pt2"),
    Case("pt2-truncated", BROKEN, _compile("truncated.pt2"), 3, "truncated.pt2"),
    Case("pt2-empty", BROKEN, _compile("empty.pt2"), 3, "empty"),
    Case("pt2-foreign-zip", BROKEN, _compile("foreign.pt2"), 3, "not a PyTorch file"),
    Case("pt2-graph-not-json", BROKEN, _compile("graph_not_json.pt2"), 3, "not valid JSON"),
    Case("pt2-graph-empty-json", BROKEN, _compile("graph_empty.pt2"), 3, "ExportedProgram"),
    Case("pt2-archive-version", BROKEN, _optimize("version.pt2"), 3, "archive version"),
    Case("nan-weight", NONFINITE, _compile("nan_weight.pt2"), 3, "NaN"),
    Case("optimize-nan-weight", NONFINITE, _optimize("nan_weight.pt2"), 3, "NaN"),
    Case("inf-buffer", NONFINITE, _compile("inf_buffer.pt2"), 3, "infinite"),
    Case("nan-activations", NONFINITE, _compile("log_net.pt2"), 3, "calibration: node"),
    Case("optimize-nan-outputs", NONFINITE, _optimize("log_net.pt2"), 3, "NaN or Inf"),
    Case("calib-nan", NONFINITE, _compile("net.pt2", calib="calib_nan.npy"), 3, "samples 5, 9"),
    Case("eval-inf", NONFINITE, _compile("net.pt2", "--eval", "{root}/eval_inf.npz"), 3,
         "sample(s) hold NaN or Inf"),
    Case("two-inputs", SHAPES, _compile("two_inputs.pt2"), 4, "(image, mask)"),
    Case("optimize-two-inputs", SHAPES, _optimize("two_inputs.pt2"), 4, "2 inputs"),
    Case("declared-huge-input", SHAPES, _compile("huge_input.pt2"), 8, "GiB"),
    Case("optimize-declared-huge-input", SHAPES, _optimize("huge_input.pt2"), 8, "GiB"),
    Case("absurd-input-shape", SHAPES,
         _compile("net.pt2", "--input-shape", "1,3,100000,100000"), 8, "--input-shape"),
    Case("input-shape-zero", SHAPES, _compile("net.pt2", "--input-shape", "0,3,8,8"), 2,
         "bad shape"),
    Case("input-shape-junk", SHAPES, _compile("net.pt2", "--input-shape", "1,3,x"), 2,
         "bad shape"),
    Case("optimize-activations-too-big", SHAPES, _optimize("wide.pt2"), 8, "needs", env=_MEM),
    Case("compile-activations-too-big", SHAPES, _compile("wide.pt2", calib="calib_wide.npy"),
         8, "batches of", env=(("QUANTFLOW_MAX_MEMORY", "96M"),)),
    Case("labels-too-large", DATA, _compile("net.pt2", "--eval", "{root}/labels_1000.npz"), 3,
         "outside the model's 10 classes"),
    Case("labels-negative", DATA, _compile("net.pt2", "--eval", "{root}/labels_neg.npz"), 3,
         "y[0] = -1"),
    Case("calib-samples-0", DATA, _compile("net.pt2", "--calib-samples", "0"), 2,
         "--calib-samples"),
    Case("eval-samples-0", DATA, _compile("net.pt2", "--eval-samples", "0"), 2,
         "--eval-samples"),
    Case("npz-bomb", DATA, _compile("net.pt2", calib="bomb.npz"), 8, "uncompressed",
         env=(("QUANTFLOW_MAX_MEMORY", "48M"),)),
    Case("png-bomb", DATA, _compile("net.pt2", calib="bomb.png"), 3, "DecompressionBomb"),
    Case("data-garbage", DATA, _compile("net.pt2", calib="garbage.npy"), 3, "garbage.npy"),
    Case("data-integers", DATA, _compile("net.pt2", calib="ints.npy"), 3, "floating-point"),
    *(Case(f"max-drop-{v}", FLAGS, _compile("net.pt2", "--max-drop", v), 2, "--max-drop")
      for v in ("-1", "nan", "inf", "101")),
    *(Case(f"compile-{flag[2:]}-{v}", FLAGS, _compile("net.pt2", flag, v), 2, what)
      for flag, v, what in (("--max-latency", "nan", "max_latency_ms"),
                            ("--max-latency", "0", "max_latency_ms"),
                            ("--max-size", "nanx", "max_size_ratio"),
                            ("--max-size", "-1", "max_size_mb"),
                            ("--profile-runs", "0", "profile_runs"),
                            ("--threads", "0", "--threads"))),
    Case("tune-trials-negative", FLAGS,
         _compile("net.pt2", "--target", "tvm", "--tune-trials", "-1"), 2, "tune"),
    *(Case(f"config-{n}", FLAGS, _compile("net.pt2", "--config", f"{{root}}/{n}.json"), 2,
           what)
      for n, what in (("not_json", "not valid JSON"), ("wrong_types", "equalize"),
                      ("ghost_layers", "ghost_conv"), ("binary", "not a text file"),
                      ("nested", "nested too deeply"), ("missing", "cannot read"),
                      ("not_a_plan", "not a quantflow plan"))),
    Case("out-is-file", OUTPUT, _compile("net.pt2"), 2, "not a folder", out="file"),
    Case("optimize-out-is-file", OUTPUT, _optimize("net.pt2"), 2, "not a folder", out="file"),
    Case("out-read-only", OUTPUT, _compile("net.pt2"), 2, "cannot write", out="readonly"),
    Case("optimize-out-read-only", OUTPUT, _optimize("net.pt2"), 2, "cannot write",
         out="readonly"),
    Case("out-foreign-folder", OUTPUT, _compile("net.pt2"), 2, "did not write", out="foreign"),
    Case("out-symlink", OUTPUT, _optimize("net.pt2"), 2, "symbolic link", out="symlink"),
    *(Case(f"profile-{n}", PROFILE, ("profile", f"{{root}}/{n}.onnx"), 3, "not a valid ONNX",
           out="absent") for n in ("corrupt", "truncated", "invalid_graph")),
    Case("profile-runs-0", PROFILE, ("profile", "{root}/net.onnx", "--runs", "0"), 2,
         "--runs", out="absent"),
    Case("profile-warmup-negative", PROFILE,
         ("profile", "{root}/net.onnx", "--warmup", "-1"), 2, "--warmup", out="absent"),
)


def _onnx_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def write(root: Path) -> None:
    """Write every file the cases use under `root` (a few seconds: five small exports)."""
    marker = root / MARKER
    example = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    base = pl.pt2(pl.net(), example)
    files: dict[str, bytes] = {
        "net.pt2": base,
        "sample_inputs.pt2": pl.pt2_sample_inputs(base, marker),
        "pickled_weight.pt2": pl.pt2_pickled_weight(base, marker),
        "pickled_constant.pt2": pl.pt2_constant(base, marker, "tensor_9",
                                                pl.torch_bytes(pl.Payload(marker))),
        "opaque_object.pt2": pl.pt2_constant(base, marker, "opaque_obj_0",
                                             pickle.dumps(pl.Payload(marker))),
        "custom_object.pt2": pl.pt2_constant(base, marker, "custom_obj_0",
                                             pickle.dumps(pl.Payload(marker))),
        "sympy_expr.pt2": pl.pt2_sympy(base, marker),
        "graph_target.pt2": pl.pt2_target(base, marker),
        "aotinductor.pt2": pl.pt2_aotinductor(base),
        "legacy_weights.pt2": pl.pt2_legacy_weights(base, marker),
        "old_layout.pt2": pl.pt2_old_layout(base, marker),
        "stray_pickle.pt2": pl.pt2_stray_pickle(base, marker),
        "whole_module.pt": pl.torch_bytes(pl.Payload(marker)),
        "legacy_module.pt": pl.torch_bytes(pl.Payload(marker), zip_format=False),
        "torchscript_payload.pt": pl.torchscript_payload(pl.net(), marker),
        "payload_data.pt": pl.torch_bytes({"x": pl.Payload(marker)}),
        "noise.pt2": bytes(range(7, 256)) * 4,
        "truncated.pt2": base[: len(base) // 2],
        "empty.pt2": b"",
        "foreign.pt2": pl.zip_bytes({"readme.txt": b"hello"}),
        "graph_not_json.pt2": pl.pt2_json(base, b"{not json"),
        "graph_empty.pt2": pl.pt2_json(base, b"{}"),
        "version.pt2": pl.pt2_version(base),
        "huge_input.pt2": pl.pt2_huge_input(base),
        "log_net.pt2": pl.pt2(pl.net(cls=pl.LogNet), example),
        "two_inputs.pt2": pl.pt2(pl.net(cls=pl.TwoInputs), example, example),
        "wide.pt2": pl.pt2(pl.net(cls=pl.Wide), torch.randn(1, 3, 256, 256)),
        "bomb.npz": pl.npz_bomb(64),
        "bomb.png": pl.png_bomb(),
        "garbage.npy": b"\x93NUMPY garbage" * 8,
        "not_json.json": b"{not json",
        "binary.json": bytes(range(256)),
        "nested.json": b"[" * 100_000 + b"]" * 100_000,
        "not_a_plan.json": b'{"hello": 1}',
        "corrupt.onnx": b"\x08\x07garbage" * 10,
        "invalid_graph.onnx": helper.make_model(helper.make_graph(
            [helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])).SerializeToString(),
    }
    good_onnx = _onnx_model().SerializeToString()
    files["net.onnx"] = good_onnx
    files["truncated.onnx"] = good_onnx[: len(good_onnx) // 2]
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    _write_weights(root, example)
    _write_data(root, marker)
    _write_plans(root)


def _write_weights(root: Path, example: torch.Tensor) -> None:
    bad = pl.net()
    with torch.no_grad():
        bad.c.weight[1, 2, 0, 0] = float("nan")
    (root / "nan_weight.pt2").write_bytes(pl.pt2(bad, example))
    with_bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        with_bn[1].running_var[2] = float("inf")
    (root / "inf_buffer.pt2").write_bytes(pl.pt2(with_bn, example))


def _write_data(root: Path, marker: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    np.save(root / "calib.npy", x)
    bad = x.copy()
    bad[5, 0, 1, 2], bad[9, 2, 0, 0] = np.nan, np.inf
    np.save(root / "calib_nan.npy", bad)
    np.savez(root / "eval_inf.npz", x=bad[:12], y=np.zeros(12, np.int64))
    np.savez(root / "labels_1000.npz", x=x[:16], y=np.full(16, 1000))
    np.savez(root / "labels_neg.npz", x=x[:16], y=np.full(16, -1))
    np.save(root / "ints.npy", (x * 10).astype(np.int32))
    np.save(root / "calib_wide.npy", rng.standard_normal((32, 3, 256, 256)).astype(np.float32))
    objects = np.empty(2, dtype=object)
    objects[0] = pl.Payload(marker)
    np.save(root / "objects.npy", objects, allow_pickle=True)
    np.savez(root / "objects.npz", x=objects)


def _write_plans(root: Path) -> None:
    import json

    from quantflow.spec import LayerPlan, int8_plan

    plan = int8_plan().to_dict()
    (root / "wrong_types.json").write_text(json.dumps({**plan, "equalize": "yes"}))
    ghost = int8_plan().with_layer("ghost_conv", LayerPlan())
    ghost.save(root / "ghost_layers.json")


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "corpus_out").resolve()
    write(out)
    for c in CASES:
        print(f"{c.name:34s} exit {c.code}  {c.kind}")
    print(f"{len(CASES)} cases; files in {out}")
