"""One GPU run: the native kernel tests, then the capture, upsample + peak and end-to-end comparisons.

Made to finish in under ten minutes on one H100 or H200 (``--budget-s``), and to run on the CPU
with ``--device cpu --small`` in about half a minute (what tests/test_gpu_bench.py runs);
``--size``, ``--batches``, ``--new-tokens`` and ``--rounds`` set the capture comparison by hand,
e.g. on the CPU ``--device cpu --sections capture --size medium --batches 4 --rounds 3``. Each
section has a share of the budget, stops starting new points when it is spent, catches its own
errors and prints its table when done; the JSON and Markdown outputs are rewritten after every
section, so a run cut short still leaves its numbers.

1. ``tests``: tests/test_image_attention.py, tests/test_upsample_peak.py and tests/test_probe.py
   in a subprocess, from a temporary folder so that they import the installed pixfound and its
   compiled core; on CUDA the Triton kernels run natively.
2. ``capture``: ``generate`` with the fused capture, with the reference capture (eager attention
   with ``output_attentions``) and without capture (plain SDPA generation, the limit) on the text
   model of LLaVA-1.5-7B (32 layers × 32 heads × 4096, random fp16 weights, 576 image tokens) at
   batch 1, 8 and 32 with 64 new tokens: time per step, peak memory, ratios to plain, the largest
   map difference between fused and reference; then both captures at batch 80, where the
   reference runs out of memory on an 80 GB card.
3. ``upsample``: the fused upsample + peak (Triton) against its torch reference, 32 maps of 24 × 24
   to a 1024 × 768 image: median time (CUDA events) and the memory allocated above the start.
4. ``e2e``: the pipelines of ``e2e.py`` on the same model with a random SAM ViT-H: the published
   recipe (batch 1), pixfound with the reference and the fused capture, plain generation, and the
   fused variants (SAM in bf16, grounding overlapped with generation), 32 images at batch 32.

The random models come from ``pixfound.models.tiny.build_random_llava`` (``_helpers.build_llava``);
the 7B text model is built in float32 on the host (about 28 GB) and then moved to the GPU.

    python benchmarks/gpu_bench.py --out gpu-results            # JSON, Markdown and the kernel tests' log
    python benchmarks/gpu_bench.py --device cpu --small --out /tmp/gpu-bench
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import _helpers
import e2e
from _helpers import CAPTURE_IMAGE_HW, CAPTURE_MODES, GIB, MIB, LLAVA_SIZES, cell, markdown_table, ratio

REPO = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = ("tests", "capture", "upsample", "e2e")
KERNEL_TEST_FILES = ("tests/test_image_attention.py", "tests/test_upsample_peak.py", "tests/test_probe.py")
# Shares of the budget, from the H100 run of 2026-11-26 (kernel tests about 60 s with 8 workers,
# capture about 75 s, end to end about 90 s); what a section leaves goes to the later ones.
SECTION_WEIGHTS = {"tests": 70.0, "capture": 100.0, "upsample": 5.0, "e2e": 110.0}
DEFAULT_BUDGET_S = 540.0


@dataclasses.dataclass(frozen=True)
class RunSizes:
    size: str                          # the model: a key of _helpers.LLAVA_SIZES
    batches: tuple[int, ...]           # capture
    new_tokens: int
    rounds: int                        # capture: interleaved rounds, the best time counts
    warmup_tokens: int                 # capture: long enough to meet the kernels' specialisations
    oom_batch: Optional[int]           # capture: both captures once more at this batch
    upsample_maps: int
    upsample_size: tuple[int, int]     # (H, W)
    upsample_repeats: int
    e2e_images: int
    e2e_batch: int
    e2e_new_tokens: int
    e2e_image_hw: tuple[int, int]
    e2e_sam: str
    e2e_sam_batch: int
    e2e_protocols: tuple[int, ...]
    published_images: int              # the batch-1 published recipe runs on fewer images
    test_filter: Optional[str]         # pytest -k for the kernel tests; None: all of them


def sizes_for(device: str, small: bool) -> RunSizes:
    if small:
        return RunSizes(size="tiny", batches=(1, 2), new_tokens=6, rounds=1, warmup_tokens=2, oom_batch=None,
                        upsample_maps=2, upsample_size=(48, 64), upsample_repeats=2, e2e_images=2, e2e_batch=2,
                        e2e_new_tokens=4, e2e_image_hw=(96, 128), e2e_sam="tiny", e2e_sam_batch=2,
                        e2e_protocols=(3,), published_images=2, test_filter="bad_input")
    return RunSizes(size="llava-1.5-7b", batches=(1, 8, 32), new_tokens=64, rounds=2, warmup_tokens=17,
                    oom_batch=80 if device == "cuda" else None, upsample_maps=32, upsample_size=(768, 1024),
                    upsample_repeats=50, e2e_images=32, e2e_batch=32, e2e_new_tokens=64, e2e_image_hw=(480, 640),
                    e2e_sam="vit_h", e2e_sam_batch=4, e2e_protocols=(1, 3), published_images=4, test_filter=None)


class Budget:
    """Seconds left until a deadline."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.deadline = time.perf_counter() + self.seconds

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def allows(self, needed_s: float) -> bool:
        return self.remaining() >= needed_s


@dataclasses.dataclass
class Context:
    device: str
    sizes: RunSizes
    results: dict
    out: Optional[pathlib.Path]
    _adapter: Any = None

    @property
    def dtype(self) -> str:
        return "float16" if self.device == "cuda" else "float32"

    def adapter(self) -> Any:
        """The benchmark LLaVA, built once for the capture and end-to-end sections."""
        if self._adapter is None:
            started = time.perf_counter()
            self._adapter = _helpers.build_llava(self.sizes.size, device=self.device, dtype=self.dtype)
            built_s = time.perf_counter() - started
            parameters = _helpers.parameter_count(self._adapter.model)
            self.results["meta"]["model"] = dict(size=self.sizes.size, describe=LLAVA_SIZES[self.sizes.size].describe(),
                                                 parameters=parameters, dtype=self.dtype, build_s=round(built_s, 1))
            log(f"built {LLAVA_SIZES[self.sizes.size].describe()}: {parameters / 1e6:.1f} M parameters in "
                f"{built_s:.0f} s")
        return self._adapter


def log(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------------------
# 1. kernel tests
# ------------------------------------------------------------------------------------------------
_SUMMARY_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")
_VERBOSE_OUTCOME = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_OUTCOME_KEYS = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "errors",
                 "XFAIL": "xfailed", "XPASS": "xpassed"}


def parse_pytest_summary(output: str) -> dict[str, int]:
    """Counts from pytest's last summary line ("3 passed, 1 skipped in 2.0s"); {} when there is none."""
    for line in reversed(output.strip().splitlines()):
        if re.search(r"\bin [0-9.]+s\b", line) and _SUMMARY_COUNT.search(line):
            counts: dict[str, int] = {}
            for number, kind in _SUMMARY_COUNT.findall(line):
                counts["errors" if kind.startswith("error") else kind] = int(number)
            return counts
    return {}


def count_verbose_outcomes(output: str) -> dict[str, int]:
    """Outcome counts from ``pytest -v`` result lines: what finished before a run was cut off."""
    counts: dict[str, int] = {}
    for line in output.splitlines():
        # Result lines name a test id; the short summary's "FAILED tests/..." lines repeat them.
        if "::" not in line or line.startswith(tuple(_OUTCOME_KEYS)):
            continue
        found = _VERBOSE_OUTCOME.search(line)
        if found:
            key = _OUTCOME_KEYS[found.group(1)]
            counts[key] = counts.get(key, 0) + 1
    return counts


def run_capped(command: Sequence[str], *, cwd: str, timeout_s: float) -> tuple[str, Optional[int]]:
    """Run ``command`` (stdout and stderr together); at ``timeout_s`` kill its whole process group.

    Returns the output so far and the exit code (None after a timeout). The group matters for
    pytest-xdist, whose workers would otherwise outlive a killed pytest and keep the GPU busy.
    """
    process = subprocess.Popen(list(command), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
        return output, process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return output, None


def section_tests(ctx: Context, budget: Budget) -> dict:
    import importlib.util

    # pytest-xdist spreads Triton's compilations over the CPU cores.
    workers = 8 if ctx.device == "cuda" and importlib.util.find_spec("xdist") is not None else 1
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--rootdir", str(REPO),
               "-o", "console_output_style=classic", *(str(REPO / name) for name in KERNEL_TEST_FILES)]
    if ctx.sizes.test_filter:
        command += ["-k", ctx.sizes.test_filter]
    if workers > 1:
        command += ["-n", str(workers)]
    timeout = max(10.0, budget.remaining())
    log(f"$ {' '.join(command)}   (cap {timeout:.0f} s)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:  # not the checkout: the installed pixfound is tested
        output, returncode = run_capped(command, cwd=cwd, timeout_s=timeout)
    if ctx.out is not None:
        (ctx.out / "kernel_tests.log").write_text(output)
    counts = (parse_pytest_summary(output) if returncode is not None else {}) or count_verbose_outcomes(output)
    failures = [line.strip() for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))][:40]
    row = dict(returncode=returncode, timed_out=returncode is None, wall_s=round(time.perf_counter() - started, 1),
               filter=ctx.sizes.test_filter, workers=workers, failures=failures,
               **{key: counts.get(key, 0) for key in ("passed", "failed", "skipped", "errors", "deselected")})
    label = ", ".join(pathlib.Path(name).name for name in KERNEL_TEST_FILES)
    if ctx.sizes.test_filter:
        label += f" (-k {ctx.sizes.test_filter!r})"
    exit_cell = f"timeout ({timeout:.0f} s)" if returncode is None else returncode
    table = markdown_table(["tests", "passed", "failed", "errors", "skipped", "deselected", "exit", "s"],
                           [[label, row["passed"], row["failed"], row["errors"], row["skipped"], row["deselected"],
                             exit_cell, row["wall_s"]]])
    table += "".join(f"\n- {line}" for line in failures)
    return dict(status="ok" if returncode == 0 and row["passed"] > 0 else "failed", rows=[row], table=table)


# ------------------------------------------------------------------------------------------------
# 2. capture
# ------------------------------------------------------------------------------------------------
def measure_generate(adapter: Any, mode: str, samples: Sequence[Any], new_tokens: int, device: str) -> tuple[dict, Any]:
    """One ``generate``: time and peak memory, or ``status="OOM"`` with the memory in use when it failed."""
    record: dict[str, Any] = dict(mode=mode, batch=len(samples), status="ok")
    generations = None
    try:
        with _helpers.PeakMemory(device) as memory:
            record["wall_s"], generations = _helpers.seconds(
                lambda: _helpers.run_generate(adapter, mode, samples, new_tokens), device)
    except Exception as error:  # only running out of memory is a result; anything else is a failure
        if not _helpers.is_out_of_memory(error):
            raise
        record.update(status="OOM", error=str(error).strip().splitlines()[0][:300])
        _free(device)
    record.update(before_bytes=memory.before_bytes, peak_bytes=memory.peak_bytes)
    if generations is not None:
        record["steps"] = max(len(g.token_ids) for g in generations)
        record["tokens"] = sum(len(g.token_ids) for g in generations)
        record["ms_per_step"] = 1000 * record["wall_s"] / max(record["steps"], 1)
    return record, generations


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def same_tokens_share(first: Optional[list], second: Optional[list]) -> Optional[float]:
    if not first or not second:
        return None
    return sum(a.token_ids == b.token_ids for a, b in zip(first, second)) / len(first)


def max_map_difference(first: Optional[list], second: Optional[list]) -> Optional[float]:
    """Largest |map difference| over the samples whose two runs generated the same tokens."""
    differences = [float((a.maps - b.maps).abs().max()) for a, b in zip(first or [], second or [])
                   if a.token_ids == b.token_ids and a.maps is not None and b.maps is not None and a.maps.numel()]
    return max(differences) if differences else None


def section_capture(ctx: Context, budget: Budget) -> dict:
    sizes = ctx.sizes
    adapter = ctx.adapter()
    batches = sizes.batches + ((sizes.oom_batch,) if sizes.oom_batch else ())
    samples = _helpers.synthetic_samples(max(batches), CAPTURE_IMAGE_HW)
    for mode in CAPTURE_MODES:  # Triton compiles one variant per specialisation (e.g. key lengths % 16)
        _helpers.run_generate(adapter, mode, samples[:1], sizes.warmup_tokens)
    rows: list[dict] = []
    for batch in sizes.batches:
        best: dict[str, dict] = {}
        outputs: dict[str, list] = {}
        for _round in range(sizes.rounds):  # interleaved: a slow spell of the machine hits every mode alike
            for mode in CAPTURE_MODES:
                if not budget.allows(2 * best[mode]["wall_s"] if mode in best else 5.0):
                    continue
                record, generations = measure_generate(adapter, mode, samples[:batch], sizes.new_tokens, ctx.device)
                log(f"  batch {batch:>3} {mode:<9} {record['status']:<4} {cell(record.get('wall_s'), '{:.2f}')} s, "
                    f"peak {cell(record['peak_bytes'] and record['peak_bytes'] / GIB, '{:.2f}')} GiB")
                if mode not in best:  # memory and tokens of the first round, the best time
                    best[mode], outputs[mode] = record, generations
                elif record["status"] == "ok" and record["wall_s"] < best[mode]["wall_s"]:
                    best[mode].update(wall_s=record["wall_s"], ms_per_step=record["ms_per_step"])
        for mode in CAPTURE_MODES:
            record = best.get(mode, dict(mode=mode, batch=batch, status="skipped (budget)"))
            plain = best.get("plain", {})
            record.update(time_vs_plain=ratio(record.get("wall_s"), plain.get("wall_s")),
                          memory_vs_plain=ratio(record.get("peak_bytes"), plain.get("peak_bytes")),
                          same_tokens_as_plain=None if mode == "plain" else same_tokens_share(outputs.get("plain"),
                                                                                              outputs.get(mode)))
            rows.append(record)
        if "fused" in best:
            best["fused"]["max_map_diff_vs_reference"] = max_map_difference(outputs.get("fused"),
                                                                            outputs.get("reference"))
        outputs.clear()
        _free(ctx.device)
    if sizes.oom_batch and budget.allows(30.0):
        for mode in ("reference", "fused"):
            record, _ = measure_generate(adapter, mode, samples[:sizes.oom_batch], sizes.new_tokens, ctx.device)
            rows.append(record)
            log(f"  batch {sizes.oom_batch} {mode}: {record['status']}")
            _free(ctx.device)
    table = markdown_table(
        ["batch", "mode", "status", "generate s", "ms / step", "x plain time", "peak GiB", "x plain memory",
         "same tokens as plain", "max map diff, fused vs reference"],
        [[r["batch"], r["mode"], r["status"], cell(r.get("wall_s"), "{:.2f}"), cell(r.get("ms_per_step"), "{:.1f}"),
          cell(r.get("time_vs_plain"), "{:.3f}"), cell(r.get("peak_bytes") and r["peak_bytes"] / GIB, "{:.2f}"),
          cell(r.get("memory_vs_plain"), "{:.3f}"), cell(r.get("same_tokens_as_plain"), "{:.2f}"),
          cell(r.get("max_map_diff_vs_reference"), "{:.1e}")] for r in rows])
    table += (f"\n\n- {LLAVA_SIZES[sizes.size].describe()}, {ctx.dtype}; prompt: '{_helpers.CAPTURE_PROMPT}'; "
              f"{sizes.new_tokens} new tokens, greedy; best of {sizes.rounds} interleaved rounds; peak: "
              f"{_helpers.PeakMemory(ctx.device).measure}")
    failed = [r for r in rows if r["status"] not in ("ok", "OOM") and not r["status"].startswith("skipped")]
    return dict(status="failed" if failed else "ok", rows=rows, table=table)


# ------------------------------------------------------------------------------------------------
# 3. upsample + peak
# ------------------------------------------------------------------------------------------------
def section_upsample(ctx: Context, budget: Budget) -> dict:
    import torch

    from pixfound.ops import upsample_peaks, upsample_peaks_reference

    sizes = ctx.sizes
    maps = torch.randn(sizes.upsample_maps, 24, 24, generator=torch.Generator().manual_seed(0)).to(ctx.device)
    size = sizes.upsample_size
    variants = {"fused (auto backend)": lambda: upsample_peaks(maps, size, aspect="pad"),
                "torch reference": lambda: upsample_peaks_reference(maps, size, aspect="pad")}
    _, upsampled = upsample_peaks_reference(maps, size, aspect="pad", return_maps=True)
    best_values = upsampled.flatten(1).max(dim=1).values
    rows = []
    for name, fn in variants.items():
        peaks = fn()
        chosen = upsampled[torch.arange(len(maps), device=upsampled.device), peaks[:, 0, 1], peaks[:, 0, 0]]
        milliseconds = _helpers.median_ms(fn, ctx.device, sizes.upsample_repeats)
        with _helpers.PeakMemory(ctx.device) as memory:
            fn()
        extra = None if memory.peak_bytes is None else memory.peak_bytes - memory.before_bytes
        rows.append(dict(variant=name, median_ms=milliseconds, extra_bytes=extra if ctx.device == "cuda" else None,
                         peaks_at_maximum=float((best_values - chosen <= 1e-5).float().mean())))
    for row in rows:
        row["x_reference_time"] = ratio(row["median_ms"], rows[-1]["median_ms"])
    full = sizes.upsample_maps * size[0] * size[1] * 4
    table = markdown_table(
        ["variant", "median ms", "x reference time", "extra MiB", "peaks at the maximum"],
        [[r["variant"], f"{r['median_ms']:.3f}", f"{r['x_reference_time']:.3f}",
          cell(r["extra_bytes"] and r["extra_bytes"] / MIB, "{:.2f}"), f"{r['peaks_at_maximum']:.0%}"] for r in rows])
    table += (f"\n\n- {sizes.upsample_maps} maps 24 x 24 -> {size[1]} x {size[0]}, pad, one peak; median of "
              f"{sizes.upsample_repeats}; extra: allocated above the start (CUDA only); the [G, H, W] float32 maps "
              f"are {full / MIB:.2f} MiB")
    return dict(status="ok", rows=rows, table=table)


# ------------------------------------------------------------------------------------------------
# 4. end to end
# ------------------------------------------------------------------------------------------------
E2E_PIPELINES = ("plain", "fused", "published", "reference", "fused+sam-bf16", "fused+overlap")


def section_e2e(ctx: Context, budget: Budget) -> dict:
    sizes = ctx.sizes
    settings = e2e.Settings(size=sizes.size, samples=sizes.e2e_images, batch_size=sizes.e2e_batch,
                            max_new_tokens=sizes.e2e_new_tokens, protocols=sizes.e2e_protocols, selects=("oracle",),
                            image_hw=sizes.e2e_image_hw, sam=sizes.e2e_sam, sam_batch_size=sizes.e2e_sam_batch,
                            device=ctx.device, dtype=ctx.dtype)
    components = e2e.build_components(settings, adapter=ctx.adapter())
    rows, problems = [], []
    for label in E2E_PIPELINES:  # the limit and the fused pipeline first: a short budget still gives them
        needed = 1.5 * max((row["wall_s"] for row in rows), default=1.0)  # about one run and its warm-up
        if not budget.allows(needed):
            problems.append(f"{label}: skipped, {budget.remaining():.0f} s left")
            continue
        count = sizes.published_images if label == "published" else sizes.e2e_images
        try:
            row = e2e.measure_once(label, settings, components,
                                   _helpers.synthetic_samples(count, settings.image_hw, settings.seed))
        except Exception as error:  # one broken pipeline must not cost the others their numbers
            problems.append(f"{label}: {'out of memory' if _helpers.is_out_of_memory(error) else 'error'}: "
                            f"{str(error).strip().splitlines()[-1][:300]}")
            log(traceback.format_exc())
            _free(ctx.device)
            continue
        rows.append(row)
        log(f"  {label}: {row['images_per_s']:.3f} images/s")
    e2e.compare(rows)
    table = e2e.format_table(rows) if rows else "no end-to-end run finished"
    table += "".join(f"\n- {problem}" for problem in problems)
    for row in rows:  # the records are for the equality checks, not for the JSON
        row.pop("records")
    errors = [p for p in problems if ": error:" in p]
    return dict(status="ok" if rows and not errors else "failed", rows=rows, problems=problems, table=table)


# ------------------------------------------------------------------------------------------------
# environment, outputs, main
# ------------------------------------------------------------------------------------------------
def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str, commit: Optional[str]) -> dict:
    import torch

    import pixfound

    meta: dict[str, Any] = dict(
        date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=" ".join([pathlib.Path(sys.executable).name, *sys.argv]), python=platform.python_version(),
        device=device, torch=torch.__version__, cuda=torch.version.cuda,
        versions={name: _version(name) for name in ("triton", "transformers", "segment-anything", "spacy", "numpy")},
        pixfound_path=str(pathlib.Path(pixfound.__file__).parent),
    )
    try:
        import pixfound._C  # noqa: F401

        meta["compiled_core"] = "importable"
    except ImportError as error:
        meta["compiled_core"] = f"missing: {error}"
    if device == "cuda":
        memory = torch.cuda.get_device_properties(0).total_memory
        meta["card"] = f"{torch.cuda.get_device_name(0)}, {memory / GIB:.1f} GiB"
    else:
        meta["card"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    if commit is None:
        try:
            found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True, timeout=10)
            changed = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                     capture_output=True, text=True, timeout=10)
            commit = (found.stdout.strip() + (" with uncommitted changes" if changed.stdout.strip() else "")) or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    meta["commit"] = commit
    return meta


def format_environment(meta: dict) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in meta["versions"].items() if version)
    return "\n".join([f"date: {meta['date_utc']}; machine: {meta['card']}; commit {meta['commit'] or '-'}",
                      f"python {meta['python']}, torch {meta['torch']} (CUDA {meta['cuda']}), {versions}",
                      f"pixfound from {meta['pixfound_path']} (compiled core {meta['compiled_core']})",
                      f"command: {meta['command']}"])


def render_markdown(results: dict) -> str:
    parts = [f"## gpu_bench, {results['meta']['date_utc']}", "", "```", format_environment(results["meta"]), "```"]
    for name, section in results["sections"].items():
        parts += ["", f"### {name} ({section['status']}, {section['elapsed_s']} s)", "", section.get("table") or ""]
        if section.get("error"):
            parts += ["", "```", section["error"].strip()[-3000:], "```"]
    return "\n".join(parts) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def write_outputs(ctx: Context) -> None:
    if ctx.out is not None:
        (ctx.out / "gpu_bench.json").write_text(json.dumps(_jsonable(ctx.results), indent=1))
        (ctx.out / "gpu_bench.md").write_text(render_markdown(ctx.results))


SECTION_FUNCTIONS: dict[str, Callable[[Context, Budget], dict]] = {
    "tests": section_tests, "capture": section_capture, "upsample": section_upsample, "e2e": section_e2e}


def parse_sections(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--sections takes a comma-separated subset of {', '.join(SECTIONS)}; "
                                         f"got {text!r}")
    return [name for name in SECTIONS if name in names]  # always in the documented order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--small", action="store_true", help="tiny sizes: every section in about half a minute")
    parser.add_argument("--sections", type=parse_sections, default=list(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-clock budget of all sections")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="folder for gpu_bench.json, gpu_bench.md and kernel_tests.log")
    parser.add_argument("--commit", default=None, help="the commit measured, where the tree has no .git")
    # Other settings of the capture comparison, e.g. on the CPU: --size medium --batches 4 --rounds 3
    parser.add_argument("--size", choices=sorted(LLAVA_SIZES), default=None, help="the random LLaVA's size")
    parser.add_argument("--batches", type=lambda text: tuple(int(b) for b in text.split(",")), default=None,
                        help="capture batch sizes, e.g. 1,8,32")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per capture run")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved capture rounds")
    return parser


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the chosen sections; print every table; return (and write) the results."""
    args = build_parser().parse_args(argv)
    if args.budget_s <= 0:
        raise SystemExit(f"--budget-s must be > 0, got {args.budget_s}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    if device == "cpu":
        torch.set_num_threads(1)  # repeatable on a shared machine
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    sizes = sizes_for(device, args.small)
    chosen = dict(size=args.size, batches=args.batches, new_tokens=args.new_tokens, rounds=args.rounds)
    sizes = dataclasses.replace(sizes, **{name: value for name, value in chosen.items() if value is not None})
    results: dict[str, Any] = dict(meta=environment(device, args.commit), sizes=dataclasses.asdict(sizes), sections={})
    ctx = Context(device=device, sizes=sizes, results=results, out=args.out)
    log(format_environment(results["meta"]))
    total = Budget(args.budget_s)
    if {"capture", "e2e"} & set(args.sections):
        try:
            ctx.adapter()  # built once, before the sections share out what is left of the budget
        except Exception:  # the sections that need the model will say why; the others still run
            log(traceback.format_exc())
    for index, name in enumerate(args.sections):
        share = SECTION_WEIGHTS[name] / sum(SECTION_WEIGHTS[n] for n in args.sections[index:])
        budget = Budget(max(0.0, total.remaining()) * share)
        log(f"\n=== {name} (budget {budget.seconds:.0f} s) ===")
        started = time.perf_counter()
        try:
            section = SECTION_FUNCTIONS[name](ctx, budget)
        except Exception:  # one broken section must not cost the others their numbers
            section = dict(status="error", rows=[], error=traceback.format_exc(), table=None)
            log(section["error"])
            _free(device)
        section["elapsed_s"] = round(time.perf_counter() - started, 1)
        results["sections"][name] = section
        log(f"\n{section.get('table') or ''}")
        write_outputs(ctx)
    return results


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if all(s["status"] == "ok" for s in outcome["sections"].values()) else 1)
