"""`quantflow compile --options FILE`: every compile option from a TOML or YAML file.

Keys are CompileConfig / DataOptions field names or flag names without the dashes
(`calib_samples`, `calib-samples`, `eval`, `max-drop`, ...), plus `model`, `output` (-o),
`arch`, `input_shape` and `max_size`. Precedence: the flags given on the command line, then
the file, then the defaults; the compile parser's flag defaults are argparse.SUPPRESS so that
a flag left out never hides a file value. Without --options, ./quantflow.toml is read when it
exists (said on stderr). `--print-config` prints the merged, validated options as TOML.
A file error is a usage error (exit 2) naming the file and the key (and, for an unknown key,
the closest valid one).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from quantflow.config import CompileConfig, DataOptions, Flag, flags
from quantflow.errors import UsageError
from quantflow.overrides import check_patterns

DEFAULT_FILE = "quantflow.toml"
#: keys that are not options of a dataclass: key -> (args dest, kind)
EXTRA = {"model": ("model", "value"), "output": ("out", "value"), "out": ("out", "value"),
         "arch": ("arch", "value"), "input_shape": ("input_shape", "shape"),
         "max_size": ("max_size", "size")}
#: CompileConfig fields without a flag (the API's): field -> kind
UNFLAGGED = {"calib_batch": "int", "profile_warmup": "int", "max_size_mb": "float",
             "max_size_ratio": "float"}
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _keys() -> dict[str, tuple[str, str, Flag | None]]:
    """Every accepted key -> (args dest or field name, kind, flag)."""
    out: dict[str, tuple[str, str, Flag | None]] = {}
    for cls in (CompileConfig, DataOptions):
        for f, spec in flags(cls):
            flag = spec.name.lstrip("-")
            for k in (f.name, flag, flag.replace("-", "_")):
                out[k] = (f.name, spec.kind, spec)
    for k, (dest, kind) in EXTRA.items():
        out[k] = out[k.replace("_", "-")] = (dest, kind, None)
    for k, kind in UNFLAGGED.items():
        out[k] = (k, kind, None)
    return out


def read(path: Path) -> dict[str, Any]:
    """The file's top-level table (TOML, or YAML by suffix)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--options {path}: cannot read it ({exc}); fix: pass a readable "
                         ".toml, .yaml or .yml file") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml  # type: ignore[import-untyped]

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"--options {path}: not valid YAML ({exc})") from None
        data = {} if data is None else data
    elif path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"--options {path}: not valid TOML ({exc})") from None
    else:
        raise UsageError(f"--options {path}: unknown format {path.suffix!r}; fix: use a "
                         ".toml, .yaml or .yml file")
    if not isinstance(data, dict):
        raise UsageError(f"--options {path}: the file must hold a table of options (key = "
                         f"value), not a {type(data).__name__}")
    return data


def _bad(path: Path, key: str, want: str, value: Any) -> UsageError:
    return UsageError(f"--options {path}: key {key!r} must be {want}, got {value!r}; fix the "
                      "value in the file (or pass the flag, which overrides it)")


def _coerce(path: Path, key: str, kind: str, spec: Flag | None, value: Any) -> Any:
    """A file value as the flag's argparse type would give it; UsageError naming the key."""
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int":
        if not (isinstance(value, int) and not isinstance(value, bool)):
            raise _bad(path, key, "an integer", value)
    elif kind == "float":
        if not is_num:
            raise _bad(path, key, "a number", value)
        value = float(value)
    elif kind == "duration":
        value = _duration(path, key, value)
    elif kind in ("list", "append"):
        items = value.split(",") if kind == "list" and isinstance(value, str) else \
            [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise _bad(path, key, "a list of strings", value)
        value = tuple(i.strip() for i in items if i.strip())
    elif kind == "shape":
        value = _shape(path, key, value)
    elif kind == "size":
        value = _size(path, key, value)
    elif not isinstance(value, str):
        raise _bad(path, key, "a string", value)
    choices = spec.choices if spec else None
    for v in (value if kind == "list" else (value,) if choices else ()):
        if v not in (choices or ()):
            raise _bad(path, key, f"one of {', '.join(choices or ())}", v)
    return value


def _duration(path: Path, key: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    t = str(value).strip().lower()
    try:
        return float(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else float(t)
    except ValueError:
        raise _bad(path, key, "seconds or a duration like 300s, 5m, 1h", value) from None


def _shape(path: Path, key: str, value: Any) -> tuple[int, ...]:
    items = value.replace("x", ",").split(",") if isinstance(value, str) else value
    try:
        shape = tuple(int(v) for v in items)
    except (TypeError, ValueError):
        raise _bad(path, key, "a shape like [1, 3, 224, 224]", value) from None
    if not shape or any(d <= 0 for d in shape):
        raise _bad(path, key, "positive sizes, batch first", value)
    return shape


def _size(path: Path, key: str, value: Any) -> tuple[str, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ("mb", float(value))
    s = str(value).strip().lower()
    try:
        return ("ratio", float(s[:-1])) if s.endswith("x") else ("mb", float(s.removesuffix(
            "mb")))
    except ValueError:
        raise _bad(path, key, "MB (1.5) or a ratio to uniform INT8 ('0.75x')", value) from None


def load(path: Path) -> dict[str, Any]:
    """{dest: value} from the file, checked key by key."""
    keys = _keys()
    out: dict[str, Any] = {}
    for key, value in read(path).items():
        if key not in keys:
            close = difflib.get_close_matches(str(key), list(keys), n=1, cutoff=0.0)
            raise UsageError(f"--options {path}: unknown key {key!r}; did you mean "
                             f"{close[0]!r}? (keys: the flags of `quantflow compile --help` "
                             "without dashes, plus model and output)")
        dest, kind, spec = keys[key]
        out[dest] = _coerce(path, key, kind, spec, value)
        if dest in ("keep_float", "bits_for"):  # their syntax, here to name the file
            try:
                check_patterns(out[dest] if dest == "keep_float" else (),
                               out[dest] if dest == "bits_for" else ())
            except ValueError as exc:
                raise UsageError(f"--options {path}: key {key!r}: {exc}") from None
    return out


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """Fill `args` from the options file and the defaults under the flags given; returns the
    CompileConfig keywords that are not flags (max_size_mb/ratio, calib_batch, ...)."""
    path = Path(args.options) if getattr(args, "options", None) else None
    if path is None and Path(DEFAULT_FILE).is_file():
        path = Path(DEFAULT_FILE)
        print(f"quantflow: using options from ./{DEFAULT_FILE} (--options FILE picks another)",
              file=sys.stderr)
    values = load(path) if path is not None else {}
    args.options_source = str(path) if path is not None else None
    for cls in (CompileConfig, DataOptions):
        for f, _ in flags(cls):
            if not hasattr(args, f.name):  # not given: the file's value, else the default
                default = f.default if f.default is not MISSING else None
                setattr(args, f.name, values.get(f.name, default))
    for dest, _ in EXTRA.values():
        if getattr(args, dest, None) is None and dest in values:
            setattr(args, dest, values[dest])
    extra = {k: values[k] for k in UNFLAGGED if k in values}
    if args.max_size is not None:  # --max-size (either source) sets one of the two fields
        kind, size = args.max_size
        extra.pop("max_size_mb", None)
        extra.pop("max_size_ratio", None)
        extra["max_size_mb" if kind == "mb" else "max_size_ratio"] = size
    return extra


def render(args: argparse.Namespace, config: CompileConfig, data: DataOptions) -> str:
    """The merged options as TOML (an --options file that gives the same compile)."""
    source = args.options_source or "(no options file)"
    lines = [f"# quantflow compile options: defaults < {source} < command line"]
    for key, dest in (("model", "model"), ("output", "out"), ("arch", "arch"),
                      ("input_shape", "input_shape")):
        lines.append(_toml_line(key, getattr(args, dest, None)))
    for obj in (config, data):
        for f in fields(obj):
            spec = f.metadata.get("flag")
            key = f.name  # DataOptions by its flag: eval, not eval_data
            if isinstance(obj, DataOptions) and spec is not None:
                key = spec.name.lstrip("-").replace("-", "_")
            lines.append(_toml_line(key, getattr(obj, f.name)))
    return "\n".join(lines) + "\n"


def _toml_line(key: str, value: Any) -> str:
    if value is None:
        return f"# {key} = (not set)"
    return f"{key} = {_toml_value(value)}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's
