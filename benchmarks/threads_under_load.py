"""Per-stage times of the offline smoke eval under a busy loop, for several thread settings.

Runs ``python -m pixfound eval --fused`` (the installed package: it runs from a temporary
directory, never from the source tree) once per setting and repeat, interleaved, while a busy
loop pinned to the last CPU stands in for other work on the machine, and prints one JSON line
per run plus a median table. Also lists the OpenMP runtimes that one process loads after
``import torch, pixfound.ops``: the wheel must not bring a second one beside torch's.

    python benchmarks/threads_under_load.py --setting default --setting OMP_NUM_THREADS=1 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

STAGES = ("generate", "capture", "upsample_peak", "sam_decoder", "selection")

RUNTIMES = ("import torch, pixfound, pixfound.ops\n"
            "print(pixfound.__file__)\n"
            "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'omp' in l.rsplit('/', 1)[-1]}))\n")


def _busy(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    while True:
        pass


def _env(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    if setting != "default":
        for item in setting.split(","):
            key, value = item.split("=", 1)
            env[key] = value
    return env


def run_once(setting: str, workdir: str) -> dict:
    out = os.path.join(workdir, "run")  # eval refuses an existing output without --resume
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pixfound", "eval", "--fused", "--output", out], cwd=workdir,
                          env=_env(setting), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"pixfound eval failed ({setting}):\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        totals = json.load(f)["timings"]["total_s"]
    shutil.rmtree(out)
    return {"setting": setting, "wall_s": round(wall, 2), **{s: round(totals[s], 3) for s in STAGES},
            "loadavg_1m": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", action="append", default=[],
                        help="'default' or comma-separated VAR=VALUE pairs (repeatable)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-load", action="store_true", help="no busy loop")
    args = parser.parse_args()
    settings = args.setting or ["default", "OMP_NUM_THREADS=1"]
    with tempfile.TemporaryDirectory() as workdir:
        probe = subprocess.run([sys.executable, "-c", RUNTIMES], cwd=workdir, check=True, capture_output=True,
                               text=True).stdout.split("\n")
        print(json.dumps({"package": probe[0], "openmp_runtimes": json.loads(probe[1].replace("'", '"'))}))
        load = None
        if not args.no_load:
            load = multiprocessing.Process(target=_busy, args=(os.cpu_count() - 1,), daemon=True)
            load.start()
        try:
            runs = []
            for _ in range(args.repeats):
                for setting in settings:
                    runs.append(run_once(setting, workdir))
                    print(json.dumps(runs[-1]), flush=True)
        finally:
            if load is not None:
                load.terminate()
                load.join()
    print(f"| setting | runs | wall s | {' | '.join(s + ' s' for s in STAGES)} |")
    print("|---|---|---|" + "---|" * len(STAGES))
    for setting in settings:
        mine = [r for r in runs if r["setting"] == setting]
        cells = [statistics.median(r[k] for r in mine) for k in ("wall_s", *STAGES)]
        print(f"| {setting} | {len(mine)} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
