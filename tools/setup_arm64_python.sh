#!/usr/bin/env bash
# Assemble the aarch64 sysroot that targets/emulate.py runs onnxruntime's arm64 build from under
# qemu-aarch64: Debian bookworm's arm64 CPython 3.11 (from .deb files, unpacked, nothing installed
# on this machine) plus the aarch64 numpy and onnxruntime wheels of the versions in the venv.
#
#   tools/setup_arm64_python.sh [PYTHON]    (PYTHON: the venv's python; default .venv/bin/python)
#
# Lands in ${XDG_CACHE_HOME:-~/.cache}/quantflow/arm64-python (emulate.ARM64_ROOT). Idempotent:
# a stamp records what was built, so a re-run with unchanged versions returns at once. Built in a
# temporary directory and renamed into place, so an interrupted run never leaves a half sysroot.
# When something cannot be fetched it prints one warning and exits 0: setup never fails over
# arm64 emulation, the emulated tests skip instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${VENV:-.venv}/bin/python}
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/quantflow"
ROOT="$CACHE/arm64-python"
# bookworm, not the host's own suite: its CPython is 3.11, the ABI of the cp311 wheels the venv
# uses, and a private source list makes the result the same on any Debian/Ubuntu host
SUITE=bookworm
MIRROR=${QUANTFLOW_DEBIAN_MIRROR:-http://deb.debian.org}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# The interpreter and the shared libraries that it, numpy and onnxruntime load. libpython's other
# dependencies (readline, ncurses, sqlite, gdbm, nis) only serve stdlib modules nothing here imports.
DEBS=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libgcc-s1 libstdc++6
      zlib1g libexpat1 libssl3 libffi8 libbz2-1.0 liblzma5 libcrypt1 libuuid1)
LAYOUT=1  # bump when the layout below changes, so existing sysroots are rebuilt

warn() { echo "quantflow: warning: arm64 Python not set up ($*); arm64 emulation disabled" >&2; exit 0; }

versions=$("$PY" -c 'import importlib.metadata as m; print(m.version("numpy"), m.version("onnxruntime"))' \
  2>/dev/null) || warn "$PY cannot report its numpy/onnxruntime versions"
read -r NUMPY ORT <<<"$versions"
stamp="layout=$LAYOUT debian=$SUITE numpy=$NUMPY onnxruntime=$ORT debs=${DEBS[*]}"
if [ -x "$ROOT/usr/bin/python3" ] && [ "$(cat "$ROOT/.quantflow-stamp" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
for tool in qemu-aarch64 apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || warn "$tool not found"
done
[ -f "$KEYRING" ] || warn "$KEYRING missing (apt-get install debian-archive-keyring)"

mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/arm64-python.tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT
new="$work/root"
mkdir -p "$new" "$work/debs" "$work/wheels" "$work/apt/lists/partial" "$work/apt/cache/archives/partial"
: >"$work/apt/status"
{
  echo "deb [arch=arm64 signed-by=$KEYRING] $MIRROR/debian $SUITE main"
  echo "deb [arch=arm64 signed-by=$KEYRING] $MIRROR/debian $SUITE-updates main"
  echo "deb [arch=arm64 signed-by=$KEYRING] $MIRROR/debian-security $SUITE-security main"
} >"$work/apt/sources.list"
# A private apt state (lists, cache, empty dpkg status, arm64 only): no `dpkg --add-architecture`,
# nothing changes on the host, and no root is needed. As root apt would hand downloads to the _apt
# user, who cannot enter a 0700 cache directory; the packages are still signature-checked.
apt=(apt-get -q -o Debug::NoLocking=1 -o APT::Architecture=arm64 -o APT::Architectures::=arm64
     -o Dir::Etc::SourceList="$work/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
     -o Dir::State::Lists="$work/apt/lists" -o Dir::State::status="$work/apt/status"
     -o Dir::Cache="$work/apt/cache")
[ "$(id -u)" = 0 ] && apt+=(-o APT::Sandbox::User=root)
# apt-get update exits 0 when a source cannot be fetched (it only warns), so look for the lists
"${apt[@]}" update >"$work/apt.log" 2>&1 || true
compgen -G "$work/apt/lists/*_${SUITE}_main_binary-arm64_Packages*" >/dev/null \
  || warn "no arm64 package list from $MIRROR: $(grep -E '^(E|W):' "$work/apt.log" | head -n1)"
(cd "$work/debs" && "${apt[@]}" download "${DEBS[@]}" >>"$work/apt.log" 2>&1) \
  || warn "apt-get download of the arm64 debs failed: $(tail -n1 "$work/apt.log")"
for deb in "$work"/debs/*.deb; do
  dpkg-deb -x "$deb" "$new"
  dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb" >>"$new/.quantflow-debs"
done
ln -s python3.11 "$new/usr/bin/python3"
rm -rf "$new/usr/share/doc" "$new/usr/share/man" "$new/usr/share/lintian" "$new/usr/share/locale"
# qemu -L resolves a guest path inside the sysroot first and falls back to the host's file:
# empty loader files keep the host's x86 ld.so.cache / ld.so.preload out of the aarch64 loader
mkdir -p "$new/etc"
: >"$new/etc/ld.so.cache"
: >"$new/etc/ld.so.preload"

# manylinux tags up to bookworm's glibc 2.36: pip does not widen an explicit --platform itself
platforms=(--platform manylinux2014_aarch64)
for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_aarch64"); done
constraints=()
[ -f constraints.txt ] && constraints=(-c constraints.txt)
# numpy and onnxruntime only: `import onnxruntime` and InferenceSession import none of
# onnxruntime's declared dependencies (flatbuffers, packaging, protobuf serve its tools)
"$PY" -m pip download -q --no-deps --only-binary=:all: "${platforms[@]}" --python-version 3.11 \
  --implementation cp --abi cp311 -d "$work/wheels" "${constraints[@]}" \
  "numpy==$NUMPY" "onnxruntime==$ORT" >"$work/pip.log" 2>&1 \
  || warn "pip download of the aarch64 numpy $NUMPY / onnxruntime $ORT wheels failed: $(tail -n1 "$work/pip.log")"
mkdir -p "$new/site-packages"
for whl in "$work"/wheels/*.whl; do
  "$PY" -m zipfile -e "$whl" "$new/site-packages"
done
# Bytecode for the stdlib and the wheels: the emulated interpreter would otherwise compile every
# imported module at each start (PYTHONDONTWRITEBYTECODE is common), ~1 s of every emulated run.
# Any CPython 3.11 writes the same .pyc format; the paths inside name the final location.
if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  "$PY" -m compileall -q -j0 -s "$new" -p "$ROOT" "$new/usr/lib/python3.11" "$new/site-packages" \
    >/dev/null 2>&1 || true
fi
echo "$stamp" >"$new/.quantflow-stamp"

rm -rf "$ROOT.old"
[ -e "$ROOT" ] && mv "$ROOT" "$ROOT.old"
mv "$new" "$ROOT"
rm -rf "$ROOT.old"
# The smoke test also writes the per-CPU /proc/cpuinfo views emulate.py needs (see _cpu_view)
if ! info=$("$PY" -c 'from quantflow.targets import emulate
print(emulate.runner_info("arm64"))' 2>&1); then
  rm -f "$ROOT/.quantflow-stamp"  # so the next setup tries again
  warn "the emulated Python cannot import onnxruntime: $(echo "$info" | tail -n1)"
fi
echo "quantflow: arm64 Python ready at $ROOT ($(du -sh "$ROOT" | cut -f1)): $info"
