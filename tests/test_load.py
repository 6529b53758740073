"""quantflow.load: every supported format round-trips exactly; every bad input is named.

The architecture lives in a helper module written to a temporary folder and put on sys.path,
which is what `--arch module:factory` does with a user's model file (and what pickling a
whole module needs: the class must be importable by name).
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from quantflow.errors import CaptureError, InputError, UnsafeInputError
from quantflow.ir import capture
from quantflow.load import LoadedModel, load_model, resolve_example_inputs

aten = torch.ops.aten
HELPER = "qf_test_load_arch"
SHAPE = (1, 3, 8, 8)

HELPER_SRC = textwrap.dedent(
    """
    import torch
    from torch import nn


    class TinyNet(nn.Module):
        def __init__(self, classes: int = 5) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn(self.conv(x)))
            return self.fc(y.mean((2, 3)))


    def tiny_net():
        return TinyNet()


    def wide_net():
        return TinyNet(classes=7)


    def broken():
        raise RuntimeError("boom in factory")


    def not_a_module():
        return 42
    """
)


class Files(types.SimpleNamespace):
    net: nn.Module
    x: torch.Tensor
    dir: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Files]:
    root = tmp_path_factory.mktemp("load")
    (root / f"{HELPER}.py").write_text(HELPER_SRC)
    sys.path.insert(0, str(root))
    helper: Any = importlib.import_module(HELPER)
    torch.manual_seed(0)
    net = helper.TinyNet().eval()
    with torch.no_grad():  # non-trivial BN statistics, so a lost buffer changes the output
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(SHAPE)
    torch.export.save(torch.export.export(net, (x,)), root / "model.pt2")
    ep_dyn = torch.export.export(net, (x.repeat(4, 1, 1, 1),), dynamic_shapes=({0: batch_dim()},))
    torch.export.save(ep_dyn, root / "dynamic.pt2")
    torch.jit.script(net).save(str(root / "scripted.pt"))
    torch.jit.trace(net, (x,)).save(str(root / "traced.pt"))
    torch.save(net.state_dict(), root / "weights.pth")
    torch.save(net, root / "whole.pt")
    yield Files(net=net, x=x, dir=root)
    sys.path.remove(str(root))
    sys.modules.pop(HELPER, None)


def _expect_same(loaded: LoadedModel, f: Files) -> None:
    """Same outputs as the original, bit for bit, before and after torch.export capture."""
    assert not loaded.module.training
    with torch.no_grad():
        want = f.net(f.x)
        assert torch.equal(loaded.module(f.x), want)
        gm = capture(loaded.module, resolve_example_inputs(loaded, None, f.x))
        assert torch.equal(gm(f.x), want)


# ---------------------------------------------------------------- formats


def test_exported_program(files: Files) -> None:
    path = str(files.dir / "model.pt2")
    loaded = load_model(path)
    assert (loaded.source, loaded.name, loaded.path) == ("exported-program", "model", path)
    assert loaded.example_inputs is not None
    assert [tuple(t.shape) for t in loaded.example_inputs] == [SHAPE]
    assert loaded.example_inputs[0].dtype == torch.float32
    _expect_same(loaded, files)


def batch_dim() -> Any:
    return torch.export.Dim("batch", max=64)


def test_exported_program_dynamic_dims(files: Files, tmp_path: Path) -> None:
    loaded = load_model(str(files.dir / "dynamic.pt2"))
    assert loaded.example_inputs is not None
    assert tuple(loaded.example_inputs[0].shape) == SHAPE
    x3 = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.module(x3), files.net(x3))
    _expect_same(loaded, files)
    # a dynamic non-batch dim takes its export-time hint, clamped into its declared range
    h = torch.export.Dim("h", min=9)
    ep = torch.export.export(
        files.net, (torch.randn(2, 3, 12, 8),), dynamic_shapes=({0: batch_dim(), 2: h},)
    )
    path = tmp_path / "hw.pt2"
    torch.export.save(ep, path)
    hw = load_model(str(path))
    assert hw.example_inputs is not None
    assert tuple(hw.example_inputs[0].shape) == (1, 3, 12, 8)


def test_exported_program_in_training_mode_is_refused(files: Files, tmp_path: Path) -> None:
    train_net = importlib.import_module(HELPER).TinyNet().train()
    path = tmp_path / "train.pt2"
    torch.export.save(torch.export.export(train_net, (files.x.repeat(2, 1, 1, 1),)), path)
    with pytest.raises(InputError, match="training mode") as exc:
        load_model(str(path))
    assert str(path) in str(exc.value) and "model.eval()" in str(exc.value)


@pytest.mark.parametrize("kind", ["scripted", "traced"])
def test_torchscript_converted_with_input_shape(files: Files, kind: str) -> None:
    path = str(files.dir / f"{kind}.pt")
    loaded = load_model(path, input_shape=SHAPE)
    assert (loaded.source, loaded.name) == ("torchscript", kind)
    assert loaded.example_inputs is not None
    assert tuple(loaded.example_inputs[0].shape) == SHAPE
    # the converter emits aten.convolution for traced convs; load canonicalizes it
    assert isinstance(loaded.module, torch.fx.GraphModule)
    targets = [n.target for n in loaded.module.graph.nodes if n.op == "call_function"]
    assert aten.conv2d.default in targets
    assert aten.convolution.default not in targets
    _expect_same(loaded, files)


@pytest.mark.parametrize("kind", ["scripted", "traced"])
def test_torchscript_without_input_shape_exports_through_interpreter(
    files: Files, kind: str
) -> None:
    loaded = load_model(str(files.dir / f"{kind}.pt"))
    assert loaded.source == "torchscript" and loaded.example_inputs is None
    _expect_same(loaded, files)


def test_state_dict_with_arch(files: Files) -> None:
    path = str(files.dir / "weights.pth")
    loaded = load_model(path, arch=f"{HELPER}:tiny_net")
    assert (loaded.source, loaded.name, loaded.example_inputs) == ("state-dict", "weights", None)
    _expect_same(loaded, files)
    shaped = load_model(path, arch=f"{HELPER}:TinyNet", input_shape=(2, 3, 8, 8))
    assert shaped.example_inputs is not None
    assert tuple(shaped.example_inputs[0].shape) == (2, 3, 8, 8)


def test_arch_module_in_working_directory(
    files: Files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A console script has no working directory on sys.path; load adds it for the import."""
    (tmp_path / "qf_cwd_arch.py").write_text(f"from {HELPER} import tiny_net as build\n")
    monkeypatch.chdir(tmp_path)
    path_before = [p for p in sys.path if p not in ("", str(tmp_path))]
    monkeypatch.setattr(sys, "path", list(path_before))
    importlib.invalidate_caches()
    loaded = load_model(str(files.dir / "weights.pth"), arch="qf_cwd_arch:build")
    sys.modules.pop("qf_cwd_arch", None)
    assert sys.path == path_before  # the working directory was added only for the import
    _expect_same(loaded, files)


@pytest.mark.parametrize("wrap", ["checkpoint", "data-parallel", "legacy-format"])
def test_state_dict_variants(files: Files, tmp_path: Path, wrap: str) -> None:
    sd = files.net.state_dict()
    obj: dict[str, Any] = (
        {"epoch": 3, "state_dict": sd}
        if wrap == "checkpoint"
        else {f"module.{k}": v for k, v in sd.items()}
        if wrap == "data-parallel"
        else sd
    )
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=wrap != "legacy-format")
    _expect_same(load_model(str(path), arch=f"{HELPER}:tiny_net"), files)


def test_pickled_module_refused_without_trust(files: Files) -> None:
    path = str(files.dir / "whole.pt")
    with pytest.raises(UnsafeInputError) as exc:
        load_model(path)
    msg = str(exc.value)
    assert path in msg and "--trust-pickle" in msg and "state_dict" in msg
    assert f"{HELPER}.TinyNet" in msg  # read from the pickle opcodes, without unpickling


def test_pickled_module_with_trust(files: Files) -> None:
    loaded = load_model(str(files.dir / "whole.pt"), trust_pickle=True)
    assert loaded.source == "pickle"
    _expect_same(loaded, files)


def test_zoo_uses_registry_and_input_shape(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    def get_model(name: str, pretrained: bool = True) -> nn.Module:
        if name != "tiny":
            raise KeyError(f"unknown zoo model {name!r}; known models: tiny")
        return files.net.train()  # load_model must put it back in eval mode

    fake = types.SimpleNamespace(
        get_model=get_model, MODELS={"tiny": types.SimpleNamespace(input_shape=SHAPE[1:])}
    )
    monkeypatch.setitem(sys.modules, "quantflow.zoo", fake)
    loaded = load_model("zoo:tiny")
    assert (loaded.source, loaded.name, loaded.path) == ("zoo", "tiny", "zoo:tiny")
    assert loaded.example_inputs is not None
    assert tuple(loaded.example_inputs[0].shape) == SHAPE
    _expect_same(loaded, files)
    with pytest.raises(InputError, match="zoo:nope.*known models: tiny"):
        load_model("zoo:nope")


def test_real_zoo_unknown_name() -> None:
    with pytest.raises(InputError, match="zoo:definitely_not_a_model"):
        load_model("zoo:definitely_not_a_model")


# ---------------------------------------------------------------- errors


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _foreign_zip(tmp_path: Path) -> Path:
    path = tmp_path / "notes.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    return path


def _truncated(files: Files, tmp_path: Path, name: str) -> Path:
    data = (files.dir / name).read_bytes()
    return _write(tmp_path, f"cut_{name}", data[: len(data) // 2])


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing", "does not exist"),
        ("directory", "is a directory"),
        ("empty", "empty"),
        ("random-bytes", "not a PyTorch file"),
        ("foreign-zip", "zip archive but not a PyTorch file"),
        ("truncated-state-dict", "corrupt or truncated"),
        ("truncated-pt2", "corrupt or truncated"),
        ("tensor", "holds a torch.Tensor, not a model"),
        ("list", "holds a builtins.list, not a model"),
        ("dict-not-state-dict", "not a state dict.*'epoch': int"),
    ],
)
def test_bad_files(files: Files, tmp_path: Path, case: str, match: str) -> None:
    if case == "missing":
        path = tmp_path / "nope.pt"
    elif case == "directory":
        path = tmp_path
    elif case == "empty":
        path = _write(tmp_path, "empty.pt", b"")
    elif case == "random-bytes":
        path = _write(tmp_path, "noise.pt", bytes(range(7, 256)) * 3)
    elif case == "foreign-zip":
        path = _foreign_zip(tmp_path)
    elif case == "truncated-state-dict":
        path = _truncated(files, tmp_path, "weights.pth")
    elif case == "truncated-pt2":
        path = _truncated(files, tmp_path, "model.pt2")
    else:
        path = tmp_path / f"{case}.pt"
        obj = {"tensor": torch.ones(3), "list": [1, 2], "dict-not-state-dict": {"epoch": 3}}
        torch.save(obj[case], path)
    with pytest.raises(InputError, match=match) as exc:
        load_model(str(path), arch=f"{HELPER}:tiny_net")
    assert type(exc.value) is InputError  # not the unsafe-pickle class
    assert str(path) in str(exc.value)


@pytest.mark.parametrize(
    ("arch", "match"),
    [
        (None, "pass --arch module:factory"),
        ("no_such_module_qf:make", "cannot import module 'no_such_module_qf'"),
        (f"{HELPER}:nope", f"module '{HELPER}' has no callable 'nope'"),
        ("no-colon", "not of the form module:factory"),
        (f"{HELPER}:broken", "failed when called with no arguments.*boom in factory"),
        (f"{HELPER}:not_a_module", "returned a int, not an nn.Module"),
        (f"{HELPER}:wide_net", r"fc\.weight: file \(5, 4\) vs model \(7, 4\)"),
    ],
)
def test_bad_arch(files: Files, arch: str | None, match: str) -> None:
    path = str(files.dir / "weights.pth")
    with pytest.raises(InputError, match=match) as exc:
        load_model(path, arch=arch)
    assert path in str(exc.value)


def test_state_dict_key_mismatch_lists_missing_and_unexpected(files: Files, tmp_path: Path) -> None:
    sd = dict(files.net.state_dict())
    sd["head.weight"] = sd.pop("fc.weight")
    path = tmp_path / "renamed.pt"
    torch.save(sd, path)
    with pytest.raises(InputError) as exc:
        load_model(str(path), arch=f"{HELPER}:tiny_net")
    msg = str(exc.value)
    assert str(path) in msg
    assert "missing in file (1): fc.weight" in msg
    assert "unexpected in file (1): head.weight" in msg


def test_torchscript_conversion_failure_is_a_capture_error(files: Files) -> None:
    path = str(files.dir / "scripted.pt")
    with pytest.raises(CaptureError, match=r"\[\(1, 5, 8, 8\)\]") as exc:
        load_model(path, input_shape=(1, 5, 8, 8))  # conv expects 3 channels
    assert path in str(exc.value)


# ---------------------------------------------------------------- example inputs


def _loaded(example: tuple[torch.Tensor, ...] | None) -> LoadedModel:
    return LoadedModel(nn.Identity(), example, "pickle", "m.pt", "m")


def test_example_inputs_priority() -> None:
    known = (torch.zeros(1, 3, 4, 4, dtype=torch.float64),)
    calib = torch.randn(10, 3, 6, 6)
    explicit = resolve_example_inputs(_loaded(known), (2, 3, 5, 5), calib)
    assert tuple(explicit[0].shape) == (2, 3, 5, 5)
    assert explicit[0].dtype == torch.float64  # the model's known input dtype is kept
    assert resolve_example_inputs(_loaded(known), None, calib) is known
    from_calib = resolve_example_inputs(_loaded(None), None, calib)
    assert len(from_calib) == 1 and torch.equal(from_calib[0], calib[:1])


@pytest.mark.parametrize(
    ("shape", "calib", "match"),
    [
        (None, None, "pass --input-shape 1,3,224,224"),
        ((1, 0, 8), None, r"input shape \(1, 0, 8\) is invalid"),
        (None, torch.zeros(0, 3, 8, 8), "no sample"),
    ],
)
def test_example_inputs_errors(
    shape: tuple[int, ...] | None, calib: torch.Tensor | None, match: str
) -> None:
    with pytest.raises(InputError, match=match) as exc:
        resolve_example_inputs(_loaded(None), shape, calib)
    assert "m.pt" in str(exc.value)
