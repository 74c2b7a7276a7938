#!/usr/bin/env bash
# Without a GPU: run the whole test suite on the GPU image's Python stack (torch 2.11, Triton 3.6,
# transformers 5.17), then compile every kernel for sm_90 with Triton 3.6's own ptxas. CI tests newer
# versions (torch 2.14, Triton 3.8, the newest transformers); this catches API drift between the two
# before a GPU run.
#
#   benchmarks/gpu/device_stack_check.sh        # the committed HEAD, in a throwaway clone
#
# Downloads about 4.5 GB into a venv (torch 2.11's CUDA wheels from PyPI; DEVICE_STACK_VENV, default
# /tmp/pixfound-device-stack, is reused if present). NumPy stays below 2.4: Triton 3.6's interpreter,
# which the tests use without a GPU, cannot run loops with a newer one (pixfound says so).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${DEVICE_STACK_VENV:-/tmp/pixfound-device-stack}
STACK=(torch==2.11.0 torchvision==0.26.0 triton==3.6.0 transformers==5.17.0 "numpy<2.4")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$REPO" "$work/pixfound"
if [[ -d $REPO/../shared ]]; then ln -s "$(cd "$REPO/../shared" && pwd)" "$work/shared"; fi

[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "${STACK[@]}"
"$VENV/bin/pip" install -q -e "$work/pixfound[test]" "${STACK[@]}"
"$VENV/bin/python" -c 'import torch, triton, transformers, numpy; print("stack: torch", torch.__version__, "| triton", triton.__version__, "| transformers", transformers.__version__, "| numpy", numpy.__version__)'

cd "$work/pixfound"
export PATH="$VENV/bin:$PATH"  # as an activated venv: the tests look for the console script
status=0
python -m pytest -q -p no:cacheprovider || status=$?
# The table for the record; tests/test_kernel_compile.py above judges it (Triton 3.6 spills 16
# bytes in the tiny model's fp32 row block, which it tolerates, so this exit code is not used).
python tools/compile_check.py --arch 90 || true
echo "device stack check: pytest exit $status"
exit "$status"
