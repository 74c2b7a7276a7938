"""Cost of recording per-token image maps: plain SDPA generate vs fused capture vs reference capture.

The model is a random LLaVA-1.5 (``pixfound.models.tiny.build_random_llava``) with LLaVA-1.5's
576 image tokens (336 px images, 14 px patches); every mode runs the same model, images and
prompt, greedy, with exactly ``new_tokens`` generated tokens (the random LM head never picks EOS).

* time: ``pytest benchmarks/test_capture_bench.py`` (pytest-benchmark) times ``adapter.generate``
  per mode in this process; ``extra_info`` holds the wall time per generation step (one token
  for every sample of the batch) and per generated token.
* memory: every (mode, batch, new tokens) point runs in a fresh subprocess, because peak RSS
  only grows within a process. CPU: the process's peak resident set (VmHWM, reset through
  ``/proc/self/clear_refs`` just before ``generate``; ``ru_maxrss`` where that is not allowed;
  ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the RSS);
  GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. The test prints the
  table and the ratios (run with ``-s``) and checks that all modes generated the same tokens.

Configurations (``PIXFOUND_BENCH_CONFIG`` or ``--config``):

CPU runs use ``PIXFOUND_BENCH_THREADS`` torch threads (default 1, see :func:`set_cpu_threads`).

* ``ci`` (default, about a minute on one CPU core): 2 layers x 4 heads x 128 hidden, batch 2,
  8 new tokens; memory curve over batch 1, 2, 4 and, at batch 2, a prompt 512 tokens longer.
* ``full``, the issue's setting: 8 layers x 8 heads x 512 hidden, batch 4, 64 new tokens;
  memory curve over batch 1, 2, 4, 8 and, at batch 4, prompts 512 and 1024 tokens longer.

``python benchmarks/test_capture_bench.py --config full`` prints both tables without pytest.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Optional

import numpy as np
import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from pipeline_bench import current_rss_bytes, peak_rss_bytes, reset_peak_rss  # noqa: E402

MODES = ("plain", "fused", "reference")
PROMPT = "describe the image in detail ."
# Repeated to lengthen the prompt for the sequence axis of the memory curve (8 tokens a time).
PROMPT_FILLER = " the red car is on the table ."


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    name: str
    layers: int
    heads: int
    kv_heads: int
    hidden: int
    batch: int
    new_tokens: int
    memory_batches: tuple[int, ...]
    memory_extra_prompt_tokens: tuple[int, ...]  # sequence axis of the memory curve, at batch = `batch`
    image_size: int = 336  # with 14 px patches: 24 x 24 = 576 image tokens, as LLaVA-1.5
    patch_size: int = 14
    rounds: int = 3


CONFIGS = {
    "ci": BenchConfig("ci", layers=2, heads=4, kv_heads=4, hidden=128, batch=2, new_tokens=8,
                      memory_batches=(1, 2, 4), memory_extra_prompt_tokens=(512,)),
    "full": BenchConfig("full", layers=8, heads=8, kv_heads=8, hidden=512, batch=4, new_tokens=64,
                        memory_batches=(1, 2, 4, 8), memory_extra_prompt_tokens=(512, 1024), rounds=3),
}


def set_cpu_threads() -> int:
    """Pin torch's CPU threads (``PIXFOUND_BENCH_THREADS``, default 1).

    On a shared machine, OpenMP regions whose threads get descheduled stall for milliseconds,
    which swamps the small per-layer ops being compared; one thread gives repeatable numbers.
    """
    threads = int(os.environ.get("PIXFOUND_BENCH_THREADS", "1"))
    if threads < 1:
        raise ValueError(f"PIXFOUND_BENCH_THREADS must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def selected_config() -> BenchConfig:
    name = os.environ.get("PIXFOUND_BENCH_CONFIG", "ci")
    if name not in CONFIGS:
        raise ValueError(f"PIXFOUND_BENCH_CONFIG must be one of {sorted(CONFIGS)}, got {name!r}")
    return CONFIGS[name]


class _BenchSample:
    """A fixed random RGB image (``Sample`` duck type: ``id`` and ``load_image``)."""

    def __init__(self, index: int, size: int) -> None:
        from PIL import Image

        rng = np.random.default_rng(index)
        self.id = f"bench{index}"
        self._image = Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))

    def load_image(self):
        return self._image


def build_adapter(config: BenchConfig, device: str) -> Any:
    from pixfound.models.tiny import build_random_llava

    adapter = build_random_llava(
        0,
        text_layers=config.layers,
        hidden_size=config.hidden,
        num_heads=config.heads,
        num_kv_heads=config.kv_heads,
        intermediate_size=4 * config.hidden,
        image_size=config.image_size,
        patch_size=config.patch_size,
        name=f"random-llava-{config.name}",
    )
    dtype = torch.float16 if device == "cuda" else torch.float32
    adapter.model.to(device=device, dtype=dtype)
    return adapter


def make_prompt(extra_tokens: int = 0) -> str:
    """The benchmark prompt, lengthened by about ``extra_tokens`` text tokens."""
    return PROMPT + PROMPT_FILLER * (extra_tokens // 8)


def run_generate(adapter: Any, mode: str, batch: int, new_tokens: int, image_size: int, extra_tokens: int = 0) -> list:
    samples = [_BenchSample(i, image_size) for i in range(batch)]
    capture = None if mode == "plain" else mode
    # On the CPU the C++ capture path runs, as in `pixfound eval` (the Triton interpreter is for tests, not timing).
    backend = "auto" if adapter.device.type == "cuda" else "cpp"
    return adapter.generate(samples, [make_prompt(extra_tokens)] * batch, max_new_tokens=new_tokens, capture=capture,
                            batch_size=batch, backend=backend)


# ------------------------------------------------------------------------------------------------
# memory: one subprocess per point
# ------------------------------------------------------------------------------------------------
def worker(config_name: str, mode: str, batch: int, extra_tokens: int, device: str) -> dict:
    """Build the model, run one generate, report peak memory (runs in its own process)."""
    import resource

    if device == "cpu":
        set_cpu_threads()
    config = CONFIGS[config_name]
    adapter = build_adapter(config, device)
    new_tokens = config.new_tokens
    probe_batch = adapter.prepare([_BenchSample(0, config.image_size).load_image()], [make_prompt(extra_tokens)])
    result: dict[str, Any] = dict(config=config_name, mode=mode, batch=batch, extra_tokens=extra_tokens, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        exact = reset_peak_rss()
        before = current_rss_bytes()
        if before is None:
            raise RuntimeError("no VmRSS in /proc/self/status")
    started = time.perf_counter()
    generations = run_generate(adapter, mode, batch, new_tokens, config.image_size, extra_tokens)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        result["measure"] = "torch.cuda.max_memory_allocated"
    else:
        hwm = peak_rss_bytes()
        if exact and hwm is not None:
            peak = hwm
            result["measure"] = "VmHWM after clear_refs reset"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            result["measure"] = "ru_maxrss (whole process)"
    result.update(
        wall_s=time.perf_counter() - started,
        prompt_tokens=probe_batch.prompt_len,
        before_bytes=before,
        peak_bytes=peak,
        generate_bytes=peak - before,
        token_ids=[g.token_ids for g in generations],
    )
    return result


def measure_memory(config: BenchConfig, mode: str, batch: int, extra_tokens: int, device: str) -> dict:
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker",
               json.dumps(dict(config_name=config.name, mode=mode, batch=batch, extra_tokens=extra_tokens,
                               device=device))]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Blocks of 64 KiB and up go straight to mmap and back to the OS when freed, so the peak RSS
    # follows the live tensors instead of what glibc's heap happens to keep (same for all modes).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker failed ({' '.join(command[-2:])}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_table(config: BenchConfig, device: str) -> list[dict]:
    points = [(b, 0) for b in config.memory_batches]
    points += [(config.batch, extra) for extra in config.memory_extra_prompt_tokens]
    rows = []
    for batch, extra in points:
        row: dict[str, Any] = dict(batch=batch, extra_tokens=extra, new_tokens=config.new_tokens)
        for mode in MODES:
            row[mode] = measure_memory(config, mode, batch, extra, device)
        row["prompt_tokens"] = row["plain"]["prompt_tokens"]
        rows.append(row)
    return rows


def format_memory(rows: list[dict]) -> str:
    mib = 1024 * 1024
    lines = [
        "| batch | prompt tokens | new tokens | plain peak MiB (+gen) | fused peak MiB (+gen) "
        "| reference peak MiB (+gen) "
        "| fused / plain | reference / fused | reference / fused (+gen) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        p, f, r = row["plain"], row["fused"], row["reference"]
        cell = lambda m: f"{m['peak_bytes'] / mib:.0f} (+{m['generate_bytes'] / mib:.0f})"  # noqa: E731
        gen_ratio = r["generate_bytes"] / max(f["generate_bytes"], 1)
        lines.append(
            f"| {row['batch']} | {row['prompt_tokens']} | {row['new_tokens']} | {cell(p)} | {cell(f)} | {cell(r)} "
            f"| {f['peak_bytes'] / p['peak_bytes']:.3f} | {r['peak_bytes'] / f['peak_bytes']:.2f} | {gen_ratio:.1f} |"
        )
    lines.append(
        f"measured with: {rows[0]['plain']['measure']}; '+gen' is the growth during generate over the memory "
        "held before it (model, inputs)"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# pytest
# ------------------------------------------------------------------------------------------------
def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def bench_adapter():
    if _device() == "cpu":
        set_cpu_threads()
    return build_adapter(selected_config(), _device())


@pytest.mark.benchmark(group="capture-time")
@pytest.mark.parametrize("mode", MODES)
def test_capture_time(benchmark, bench_adapter, mode):
    config = selected_config()

    def run():
        out = run_generate(bench_adapter, mode, config.batch, config.new_tokens, config.image_size)
        if bench_adapter.device.type == "cuda":
            torch.cuda.synchronize()
        return out

    generations = benchmark.pedantic(run, rounds=config.rounds, warmup_rounds=1, iterations=1)
    assert [len(g.token_ids) for g in generations] == [config.new_tokens] * config.batch
    if mode != "plain":
        assert all(g.maps.shape == (config.new_tokens, 24, 24) for g in generations)
    if benchmark.stats is None:  # --benchmark-disable: the run above was the check
        return
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        config=config.name, device=str(bench_adapter.device), batch=config.batch, new_tokens=config.new_tokens,
        image_tokens=(config.image_size // config.patch_size) ** 2,
        ms_per_step=1000 * mean / config.new_tokens,
        ms_per_generated_token=1000 * mean / (config.new_tokens * config.batch),
    )


def test_capture_peak_memory(record_property):
    config = selected_config()
    rows = memory_table(config, _device())
    print(f"\npeak memory, config {config.name} on {_device()}\n" + format_memory(rows))
    for row in rows:
        tokens = {mode: row[mode]["token_ids"] for mode in MODES}
        assert tokens["fused"] == tokens["plain"] == tokens["reference"]
        assert all(row[mode]["peak_bytes"] > 0 for mode in MODES)
        record_property(
            f"memory_b{row['batch']}_t{row['new_tokens']}",
            {mode: row[mode]["peak_bytes"] for mode in MODES},
        )


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _time_table(config: BenchConfig, device: str) -> str:
    """Best-of-rounds wall time per mode, rounds interleaved across modes so load spikes hit all alike.

    Besides the whole ``generate`` it reports the decode cost per step, from the difference to a
    1-token run (prefill only): ``(t(new_tokens) - t(1)) / (new_tokens - 1)``.
    """
    adapter = build_adapter(config, device)

    def timed(mode: str, tokens: int) -> float:
        started = time.perf_counter()
        run_generate(adapter, mode, config.batch, tokens, config.image_size)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for mode in MODES:
        timed(mode, 2)  # warm-up
    full = {mode: float("inf") for mode in MODES}
    prefill = dict(full)
    for _ in range(config.rounds):
        for mode in MODES:
            full[mode] = min(full[mode], timed(mode, config.new_tokens))
            prefill[mode] = min(prefill[mode], timed(mode, 1))
    lines = [
        "| mode | generate s | ms / step | ms / generated token | x plain | decode ms / step | decode x plain |",
        "|---|---|---|---|---|---|---|",
    ]
    decode = {mode: (full[mode] - prefill[mode]) / (config.new_tokens - 1) for mode in MODES}
    for mode in MODES:
        step = 1000 * full[mode] / config.new_tokens
        lines.append(
            f"| {mode} | {full[mode]:.2f} | {step:.1f} | {step / config.batch:.2f} | {full[mode] / full['plain']:.3f} "
            f"| {1000 * decode[mode]:.1f} | {decode[mode] / decode['plain']:.3f} |"
        )
    lines.append(
        f"(best of {config.rounds} interleaved rounds; batch {config.batch}, {config.new_tokens} new tokens, "
        f"{(config.image_size // config.patch_size) ** 2} image tokens; a step generates one token per sample)"
    )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="ci")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return
    config, device = CONFIGS[args.config], _device()
    if device == "cpu":
        set_cpu_threads()
    print(f"config {config}\ndevice {device}, torch threads {torch.get_num_threads()}")
    if not args.skip_time:
        print("\nwall time\n" + _time_table(config, device))
    if not args.skip_memory:
        print("\npeak memory\n" + format_memory(memory_table(config, device)))


if __name__ == "__main__":
    main()
