#!/usr/bin/env bash
# Checks a built wheel as users get it: installed (not editable) into a fresh virtual environment
# outside the source tree, then the offline smoke eval and the kernel, ops, CLI and packaging tests
# run against that install with no compiler on PATH.
#
#   bash scripts/check_wheel.sh dist/pixfound-*.whl
#
# The names of compilers and build tools (gcc, cc, c++, cmake, ...) resolve only to stubs that
# record the call and fail: the check fails if anything tried to compile. TORCH_SPEC (default: the
# README's pin) says which torch to install first; KEEP_ENV=1 keeps the temporary folder.
set -euo pipefail

if [ "$#" -ne 1 ] || [ ! -f "$1" ]; then
  echo "usage: bash scripts/check_wheel.sh PATH/TO/pixfound-*.whl (exactly one wheel)" >&2
  exit 2
fi
wheel="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
repo="$(cd "$(dirname "$0")/.." && pwd)"
torch_spec="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
tmp="$(mktemp -d)"
case "$tmp" in "$repo"/*) echo "temporary folder $tmp is inside the source tree" >&2; exit 2 ;; esac
[ "${KEEP_ENV:-0}" = 1 ] || trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/tools" "$tmp/work" "$tmp/home" "$tmp/triton-cache"

# A PATH of the venv's bin and a few plain tools; compilers and build tools are tripwires.
for tool in sh bash env uname cat ls mkdir rm cp mv ln find grep sed head tail sort wc dirname basename mktemp; do
  ln -s "$(command -v "$tool")" "$tmp/tools/$tool"
done
calls="$tmp/compiler-calls.log"
: >"$calls"
for tool in cc c++ gcc g++ clang clang++ cpp ld as cmake ninja make nvcc; do
  printf '#!%s\necho "$0 $*" >>"%s"\necho "no compiler here: $0" >&2\nexit 1\n' "$(command -v sh)" "$calls" >"$tmp/tools/$tool"
  chmod +x "$tmp/tools/$tool"
done

# Run with a clean environment: no CC/CXX, no PYTHONPATH, no user site; HOME and caches in $tmp.
# Only pip's own settings, proxies and certificate paths pass through (how this machine reaches PyPI).
passed=()
while IFS= read -r -d '' var; do
  case "${var%%=*}" in
    PIP_* | http_proxy | https_proxy | no_proxy | HTTP_PROXY | HTTPS_PROXY | NO_PROXY | SSL_CERT_* | REQUESTS_CA_BUNDLE)
      passed+=("$var") ;;
  esac
done < <(env -0)
in_env() {
  (cd "$tmp/work" && env -i "${passed[@]}" HOME="$tmp/home" PATH="$tmp/venv/bin:$tmp/tools" LANG=C.UTF-8 \
    TMPDIR="$tmp" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 TRITON_CACHE_DIR="$tmp/triton-cache" \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIXFOUND_TEST_INSTALLED=1 "$@")
}

# Every tracked package file is in the wheel, and no build output or cache (needs git).
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
  python3 "$repo/scripts/dist_files.py" wheel "$wheel"
fi

python3 -m venv "$tmp/venv"
# torch first (as the README says), then the wheel with its test extras; pip runs without a compiler too.
in_env pip install --disable-pip-version-check -q $torch_spec
in_env pip install --disable-pip-version-check -q "$wheel[test]"

for tool in gcc cc c++ cmake; do
  [ "$(in_env sh -c "command -v $tool")" = "$tmp/tools/$tool" ] || { echo "a real $tool is on PATH" >&2; exit 1; }
done
in_env python - "$tmp/venv" <<'EOF'
import pathlib, sys
import pixfound, pixfound._C
venv = pathlib.Path(sys.argv[1]).resolve()
for module in (pixfound, pixfound._C):
    where = pathlib.Path(module.__file__).resolve()
    assert venv in where.parents and "site-packages" in where.parts, f"{module.__name__} comes from {where}"
assert not pixfound._C.openmp, "the compiled core must not link an OpenMP runtime"
print(f"installed package: {pathlib.Path(pixfound.__file__).parent}")
EOF
# What a repaired wheel vendors: nothing, since the core needs only the C and C++ runtimes.
in_env python - "$wheel" <<'EOF'
import sys, zipfile
vendored = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if ".libs/" in n]
assert vendored == [], f"the wheel vendors shared libraries: {vendored}"
EOF

in_env pixfound eval --fused --output "$tmp/smoke"
in_env python - "$tmp/smoke" <<'EOF'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
summary = json.loads((run / "summary.json").read_text())
records = (run / "samples.jsonl").read_text().splitlines()
assert records and summary["counts"]["samples"] > 0, summary["counts"]
print(f"smoke eval: {len(records)} records, {summary['counts']['samples']} samples")
EOF

# The tests of the source tree, importing the installed package (pytest runs from $tmp/work; the
# tests folder has no __init__.py, so only tests/ itself goes on sys.path, never the repository).
in_env python -m pytest -q -p no:cacheprovider \
  "$repo/tests/test_packaging.py" "$repo/tests/test_ops.py" "$repo/tests/test_image_attention.py" \
  "$repo/tests/test_upsample_peak.py" "$repo/tests/test_kernel_compile.py" "$repo/tests/test_cli.py"

if [ -s "$calls" ]; then
  echo "something tried to compile:" >&2
  cat "$calls" >&2
  exit 1
fi
built="$(find "$tmp/triton-cache" "$tmp/home" -name '*.so' | head -5)"
[ -z "$built" ] || { echo "shared objects were built at run time: $built" >&2; exit 1; }
echo "wheel check passed: $(basename "$wheel")"
