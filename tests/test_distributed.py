"""``torchrun --nproc-per-node 2 -m pixfound eval`` on CPU (gloo): shards by rank, rank 0 merges."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from pixfound.eval.config import EvalConfig

from pixfound.eval.records import read_jsonl

from pixfound.eval.runner import run_evaluation

REPO = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--limit", "6", "--protocol", "2,3", "--select", "oracle", "--max-new-tokens", "6", "--kernel-backend", "reference",
        "--device", "cpu", "--batch-size", "2"]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_torchrun_two_cpu_processes_shard_and_merge(tmp_path, monkeypatch):
    pytest.importorskip("torch.distributed.run")
    output = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "pixfound", "-q", "eval", *ARGS, "--output", str(output)]
    result = subprocess.run(command, env=_env(), capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()[-4000:]
    # only rank 0 prints the table
    assert result.stdout.decode().count("tiny-llava") == 1

    records = read_jsonl(output / "samples.jsonl")[0]
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)), "a record appears twice"
    ranks = {r["worker"]["rank"] for r in records}
    assert ranks == {0, 1}
    for record in records:
        assert record["worker"] == {"rank": record["index"] % 2, "world": 2}, record["key"]
    assert not list(output.glob("shards/*.jsonl")), "shard files were not merged away"
    summary = json.loads((output / "summary.json").read_text())
    assert summary["counts"]["missing_records"] == 0
    assert summary["counts"]["samples"] == 6

    # the same evaluation in one process gives the same summary
    import pixfound.triton_kernels.image_attention  # noqa: F401 - decorate under TRITON_INTERPRET before unsetting it
    import pixfound.triton_kernels.upsample_peak  # noqa: F401

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    single = run_evaluation(EvalConfig(
        model="tiny-llava", limit=6, protocols=(2, 3), selects=("oracle",), max_new_tokens=6, kernel_backend="reference",
        device="cpu", batch_size=2, output=str(tmp_path / "single"), progress=False))
    strip = lambda s: {k: v for k, v in s.items() if k not in ("timings", "run")}  # noqa: E731
    assert strip(summary) == strip(single)
    single_records = read_jsonl(tmp_path / "single" / "samples.jsonl")[0]
    assert [r["key"] for r in single_records] == keys
    assert [r["answer"] for r in single_records] == [r["answer"] for r in records]
