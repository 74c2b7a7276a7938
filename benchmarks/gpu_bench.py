"""One prepared benchmark run for a single H100/H200 (under 10 minutes), also runnable on CPU.

Sections, in order (``--sections`` picks a subset; each has a time budget, catches its own
errors, prints its table as soon as it is done, and the JSON is rewritten after every section,
so a run cut short still leaves numbers):

1. ``tests``: the native kernel tests (``tests/test_image_attention.py``,
   ``tests/test_upsample_peak.py``, ``tests/test_probe.py``) in a subprocess with a time cap. On
   CUDA the kernels run natively (tests/conftest.py sets ``TRITON_INTERPRET`` only without CUDA).
2. ``capture`` (issue 3): LLaVA-1.5-7B's architecture (32 layers x 32 heads x 4096 hidden,
   CLIP ViT-L/14-336 vision tower, 576 image tokens) with random fp16 weights, built on the GPU
   from configs (no download). Plain SDPA ``generate`` (no capture, the limit), fused capture
   and reference capture (eager + ``output_attentions``) at batch 1, 8 and 32 with 64 new tokens:
   time per generated token, peak memory (``torch.cuda.max_memory_allocated``), ratios to plain,
   and the reference path at a batch where it runs out of memory (recorded, not fatal).
3. ``upsample`` (issue 4): fused Triton upsample + peak against the published
   ``F.interpolate`` + crop + ``argmax``: 32 phrase maps, 24x24 -> a 1024x768 image, CUDA-event
   timing and peak memory (the fused path holds no [G, H, W] tensor).
4. ``e2e`` (issue 6): the published recipe vs pixfound ``--reference`` vs ``--fused``, images/s
   with the stage breakdown, on the same 7B LLaVA and a random SAM ViT-H, plus plain generation
   as the limit. It needs ``benchmarks/pipeline_bench.py``; without it the section says so.

``--device cpu --small`` runs every section with tiny configs (CPU kernels in Triton's
interpreter), which is how tests/test_gpu_bench.py keeps this script working without a GPU.

Run on the GPU machine (see benchmarks/gpu/README.md)::

    PYTHONUNBUFFERED=1 python benchmarks/gpu_bench.py            # JSON + Markdown under $OUT

Peak memory is what the PyTorch caching allocator handed out (``max_memory_allocated`` after
``reset_peak_memory_stats``); on CPU it is the process's peak resident set (VmHWM reset before
each point; absent where /proc/self/clear_refs is not writable).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional, Sequence

BENCH_DIR = pathlib.Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SECTIONS = ("tests", "capture", "upsample", "e2e")
KERNEL_TEST_FILES = ("tests/test_image_attention.py", "tests/test_upsample_peak.py", "tests/test_probe.py")
# A quick subset for --small (the CPU runs every kernel test in Triton's interpreter otherwise).
SMALL_TEST_FILTER = "bad_input or restores_model_state or reference_matches_explicit"
CAPTURE_MODES = ("plain", "fused", "reference")
GIB = 1024**3
MIB = 1024**2

# Shares of --budget-s per section, from the H100 runs of 2026-11-26: kernel tests ~60 s with 8
# workers, capture ~75 s, e2e ~90 s. Capture and e2e build the 7B model once (8-10 s), charged to
# whichever runs first; time a section leaves unused goes to the later ones.
SECTION_WEIGHTS = {"tests": 70.0, "capture": 100.0, "upsample": 5.0, "e2e": 110.0}
DEFAULT_BUDGET_S = 540.0  # 9 minutes: the device session has 15, start-up and transfers included


# ------------------------------------------------------------------------------------------------
# the model: LLaVA-1.5's architecture with random weights, built on the target device
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LlavaSpec:
    """Sizes of a LLaVA-1.5 (Llama text model + CLIP vision tower)."""

    name: str
    text_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    vision_layers: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    projection_dim: int

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# llava-hf/llava-1.5-7b-hf: Vicuna-7B (Llama, multi-head attention) + CLIP ViT-L/14 at 336 px.
LLAVA_1_5_7B = LlavaSpec(
    name="llava-1.5-7b-architecture (random fp16)",
    text_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, intermediate_size=11008, vocab_size=32064,
    vision_layers=24, vision_hidden=1024, vision_heads=16, vision_intermediate=4096,
    image_size=336, patch_size=14, projection_dim=768,
)
# --small: same code path, a few MB of weights, 8x8 = 64 image tokens.
LLAVA_SMALL = LlavaSpec(
    name="llava-1.5-small (random fp32)",
    text_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, intermediate_size=128, vocab_size=512,
    vision_layers=2, vision_hidden=32, vision_heads=2, vision_intermediate=64,
    image_size=112, patch_size=14, projection_dim=32,
)


def build_llava_adapter(spec: LlavaSpec, device: str, dtype: Any, *, seed: int = 0) -> Any:
    """A ``LlavaAdapter`` around ``LlavaForConditionalGeneration`` of ``spec`` with random weights.

    The model is created directly on ``device`` in ``dtype`` (transformers' own initialisation runs
    there: seconds for 7B on a GPU, no fp32 copy on the host). The processor is the tiny word-level
    tokenizer of :mod:`pixfound.models.tiny` with LLaVA's chat template and a pad-to-square image
    processor. LM-head rows of special tokens and of ids beyond the tokenizer's vocabulary are
    zeroed, so greedy decoding never stops early and every run generates exactly
    ``max_new_tokens`` decodable tokens.
    """
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from pixfound.models.llava import VICUNA_SYSTEM_PROMPT, LlavaAdapter
    from pixfound.models.tiny import llava_word_processor

    if spec.image_size % spec.patch_size:
        raise ValueError(f"spec {spec.name!r}: image_size {spec.image_size} is not a multiple of "
                         f"patch_size {spec.patch_size}")
    processor = llava_word_processor(spec.image_size, spec.patch_size)
    tokenizer = processor.tokenizer
    word_vocab = len(tokenizer.get_vocab())
    if spec.vocab_size < word_vocab:
        raise ValueError(f"spec {spec.name!r}: vocab_size {spec.vocab_size} is below the tokenizer's {word_vocab} ids")
    text = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads, image_size=spec.image_size,
        patch_size=spec.patch_size, projection_dim=spec.projection_dim, hidden_act="quick_gelu",
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=spec.image_tokens, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device.startswith("cuda"):
            torch.cuda.manual_seed(seed)
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[word_vocab:].zero_()
        for token_id in tokenizer.all_special_ids:
            head[token_id].zero_()
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    generation.do_sample = False
    generation.temperature = generation.top_p = generation.top_k = None
    return LlavaAdapter(model, processor, name=spec.name, system_prompt=VICUNA_SYSTEM_PROMPT)


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# run context, budgets, measurement
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunSizes:
    """Sizes of one run; :func:`settings_for` gives the GPU defaults or the --small ones."""

    spec: LlavaSpec
    batches: tuple[int, ...]          # capture: batch sizes
    new_tokens: int                   # capture: tokens generated per run
    capture_rounds: int               # capture: interleaved rounds, best time kept
    warmup_tokens: int                # capture: warm-up length (meets the kernel specialisations)
    upsample_maps: int
    upsample_grid: tuple[int, int]
    upsample_size: tuple[int, int]  # (H, W) of the original image
    upsample_repeats: int
    e2e_images: int                   # e2e: synthetic images through pixfound and plain generation
    e2e_batch: int
    e2e_new_tokens: int
    e2e_image_hw: tuple[int, int]
    e2e_sam: str
    e2e_sam_batch: int
    e2e_min_run_s: float              # e2e: no run starts with less budget left
    e2e_protocols: tuple[int, ...]
    published_images: int             # e2e: images through the (batch-1) published recipe
    test_filter: Optional[str]        # tests: pytest -k expression (None: all kernel tests)
    probe_oom: bool                   # capture: look for the reference's out-of-memory batch
    e2e_share_prefix: bool = False    # e2e: pixfound and plain runs prefill system prompt + image once per image
    e2e_sam_dtype: str = "float32"    # e2e: SAM precision of the pixfound runs (the published recipe: float32)
    e2e_overlap: bool = False         # e2e: pixfound grounds each batch in a second thread beside the next generate
    e2e_variants: bool = True         # e2e: also the fused rows of E2E_FUSED_VARIANTS (budget allowing)


def settings_for(device: str, small: bool) -> RunSizes:
    """The GPU run's sizes (issues 3, 4 and 6), or tiny ones for ``--small``."""
    if small:
        return RunSizes(
            spec=LLAVA_SMALL, batches=(1, 2), new_tokens=6, capture_rounds=1, warmup_tokens=2,
            upsample_maps=2, upsample_grid=(24, 24), upsample_size=(48, 64), upsample_repeats=2,
            e2e_images=2, e2e_batch=2, e2e_new_tokens=4, e2e_image_hw=(96, 128), e2e_sam="tiny", e2e_sam_batch=2,
            e2e_min_run_s=1.0, e2e_protocols=(3,), published_images=2,
            test_filter=SMALL_TEST_FILTER, probe_oom=False,
        )
    return RunSizes(
        spec=LLAVA_1_5_7B, batches=(1, 8, 32), new_tokens=64, capture_rounds=2, warmup_tokens=17,
        upsample_maps=32, upsample_grid=(24, 24), upsample_size=(768, 1024), upsample_repeats=50,
        e2e_images=32, e2e_batch=32, e2e_new_tokens=64, e2e_image_hw=(480, 640), e2e_sam="vit_h", e2e_sam_batch=4,
        e2e_min_run_s=15.0, e2e_protocols=(1, 3), published_images=4,
        test_filter=None, probe_oom=device == "cuda",
    )


class Budget:
    """A wall-clock allowance: ``remaining()`` seconds until ``deadline``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.deadline = time.perf_counter() + self.seconds

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def allows(self, needed_s: float) -> bool:
        return self.remaining() >= needed_s


@dataclasses.dataclass
class BenchContext:
    device: str
    settings: RunSizes
    small: bool
    results: dict
    json_out: Optional[pathlib.Path]
    markdown_out: Optional[pathlib.Path]
    _adapter: Any = None
    build_s: Optional[float] = None

    @property
    def dtype(self) -> Any:
        import torch

        return torch.float16 if self.device == "cuda" else torch.float32

    def adapter(self) -> Any:
        """The benchmark LLaVA, built once and shared by the capture and e2e sections."""
        if self._adapter is None:
            started = time.perf_counter()
            self._adapter = build_llava_adapter(self.settings.spec, self.device, self.dtype)
            synchronize(self.device)
            self.build_s = time.perf_counter() - started
            self.results["meta"]["model"] = dict(
                spec=dataclasses.asdict(self.settings.spec), parameters=parameter_count(self._adapter.model),
                dtype=str(self.dtype).replace("torch.", ""), build_s=round(self.build_s, 2),
            )
            log(f"built {self.settings.spec.name}: {parameter_count(self._adapter.model) / 1e9:.2f} B parameters "
                f"in {self.build_s:.1f} s")
        return self._adapter


def log(message: str) -> None:
    print(message, flush=True)


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _oom_errors() -> tuple[type, ...]:
    import torch

    return (torch.cuda.OutOfMemoryError,)


def _requested_bytes(message: str) -> Optional[int]:
    """The allocation size an out-of-memory message names ("Tried to allocate 2.50 GiB")."""
    found = re.search(r"Tried to allocate ([0-9.]+) (B|KiB|MiB|GiB|TiB)", message)
    if not found:
        return None
    scale = {"B": 1, "KiB": 1024, "MiB": MIB, "GiB": GIB, "TiB": 1024 * GIB}[found.group(2)]
    return int(float(found.group(1)) * scale)


class _HostPeak:
    """Peak resident set of this process around a call (VmHWM, reset via /proc/self/clear_refs)."""

    def __init__(self) -> None:
        from pipeline_bench import current_rss_bytes, reset_peak_rss

        self.exact = reset_peak_rss()
        self.before = current_rss_bytes()
        if self.before is None:
            raise RuntimeError("no VmRSS in /proc/self/status")

    def peak(self) -> Optional[int]:
        from pipeline_bench import peak_rss_bytes

        peak = peak_rss_bytes()
        return peak if (self.exact and peak is not None) else None


def measure_call(fn: Callable[[], Any], device: str) -> tuple[dict, Any]:
    """Run ``fn`` once: wall time and peak memory, or ``status="OOM"`` with the memory at failure.

    CUDA: ``max_memory_allocated`` after a peak reset (``before_bytes`` is what was allocated at
    the start). CPU: the process's peak resident set. An out-of-memory error is caught, its
    tensors freed, and reported instead of raised.
    """
    import torch

    gc.collect()  # the allocator keeps its cache: emptying it would add cudaMalloc time to every point
    synchronize(device)
    host_peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        host_peak = _HostPeak()
        before = host_peak.before
    started = time.perf_counter()
    value, oom_message = None, None
    try:
        value = fn()
        synchronize(device)
    except _oom_errors() as err:
        oom_message = str(err)
    wall = time.perf_counter() - started
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = host_peak.peak() if host_peak is not None else None
    record: dict[str, Any] = dict(status="ok", wall_s=wall, before_bytes=before, peak_bytes=peak)
    if oom_message is not None:
        free_memory(device)
        record.update(status="OOM", requested_bytes=_requested_bytes(oom_message),
                      error=oom_message.strip().splitlines()[0][:300])
    return record, value


def median_ms(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 3) -> float:
    """Median time of ``fn`` in milliseconds: CUDA events on a GPU, ``perf_counter`` on CPU."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def gib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def ratio(a: Optional[float], b: Optional[float], digits: int = 3) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


def cell(value: Any, fmt: str = "{}") -> str:
    if value is None:
        return "-"
    return fmt.format(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# section 1: native kernel tests
# ------------------------------------------------------------------------------------------------
_SUMMARY_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")
# One verbose result line per test: "tests/test_x.py::test_y[case] PASSED" (xdist: "[gw0] PASSED tests/...").
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
    """Per-test outcome counts from ``pytest -v`` lines: what finished before a run was cut off."""
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


def kernel_test_command(test_filter: Optional[str], workers: int) -> list[str]:
    files = [str(REPO / name) for name in KERNEL_TEST_FILES]
    missing = [f for f in files if not pathlib.Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"kernel test files not found: {missing}")
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--rootdir", str(REPO),
               "-o", "console_output_style=classic", *files]
    if test_filter:
        command += ["-k", test_filter]
    if workers > 1:
        command += ["-n", str(workers)]
    return command


def run_capped(command: Sequence[str], *, cwd: str, timeout_s: float) -> tuple[str, Optional[int]]:
    """Run ``command`` (stdout and stderr together); at ``timeout_s`` kill its whole process group.

    Returns the output so far and the exit code (None after a timeout). The group matters for
    pytest-xdist, whose workers would otherwise outlive a killed pytest and keep the GPU busy.
    """
    import signal

    process = subprocess.Popen(list(command), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
        return output, process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return output, None


def section_tests(ctx: BenchContext, budget: Budget) -> dict:
    import importlib.util

    # pytest-xdist (in the GPU image) spreads Triton's compilations over CPU cores.
    workers = 8 if ctx.device == "cuda" and importlib.util.find_spec("xdist") is not None else 1
    command = kernel_test_command(ctx.settings.test_filter, workers)
    # Run outside the checkout so `import pixfound` finds the installed package (with its compiled
    # core) rather than the source folder, which `python -m` would put first on sys.path.
    timeout = max(10.0, budget.remaining())
    log(f"$ {' '.join(command)}   (cap {timeout:.0f} s)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:
        output, returncode = run_capped(command, cwd=cwd, timeout_s=timeout)
    timed_out = returncode is None
    if ctx.json_out is not None:  # the whole log beside the JSON, for failures the table only names
        ctx.json_out.parent.mkdir(parents=True, exist_ok=True)
        (ctx.json_out.parent / "kernel_tests.log").write_text(output)
    counts = parse_pytest_summary(output) if not timed_out else {}
    if not counts:
        counts = count_verbose_outcomes(output)
    failures = [line.strip() for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    log("\n".join(failures[:40]) or "(no failures listed)")
    log("\n".join(output.strip().splitlines()[-3:]))
    row = dict(files=list(KERNEL_TEST_FILES), filter=ctx.settings.test_filter, workers=workers,
               returncode=returncode, timed_out=timed_out, wall_s=round(time.perf_counter() - started, 1),
               passed=counts.get("passed", 0), failed=counts.get("failed", 0), skipped=counts.get("skipped", 0),
               errors=counts.get("errors", 0), deselected=counts.get("deselected", 0), failures=failures[:40])
    label = ", ".join(pathlib.Path(f).name for f in KERNEL_TEST_FILES)
    if ctx.settings.test_filter:
        label += f" (-k {ctx.settings.test_filter!r})"
    table = markdown_table(
        ["tests", "passed", "failed", "errors", "skipped", "deselected", "exit", "s"],
        [[label, row["passed"], row["failed"], row["errors"], row["skipped"], row["deselected"],
          f"timeout ({timeout:.0f} s)" if timed_out else returncode, row["wall_s"]]],
    )
    if failures:
        table += "\n\n" + "\n".join(f"- {line}" for line in failures[:40])
    ok = returncode == 0 and row["passed"] > 0
    return dict(status="ok" if ok else "failed", rows=[row], table=table)


# ------------------------------------------------------------------------------------------------
# section 2: capture cost (issue 3)
# ------------------------------------------------------------------------------------------------
def _generate_point(ctx: BenchContext, mode: str, batch: int, new_tokens: int) -> tuple[dict, Any]:
    from test_capture_bench import run_generate

    adapter = ctx.adapter()
    spec = ctx.settings.spec
    record, generations = measure_call(
        lambda: run_generate(adapter, mode, batch, new_tokens, spec.image_size), ctx.device)
    record.update(mode=mode, batch=batch, new_tokens=new_tokens, rounds=1)
    if record["status"] == "ok":
        lengths = [len(g.token_ids) for g in generations]
        record["generated_tokens"] = sum(lengths)
        record["steps"] = max(lengths)
        _per_token_times(record)
        record["maps_finite"] = (None if mode == "plain"
                                 else bool(all(bool(g.maps.isfinite().all()) for g in generations)))
    return record, generations


def _per_token_times(record: dict) -> None:
    record["ms_per_step"] = 1000 * record["wall_s"] / max(record["steps"], 1)
    record["ms_per_token"] = 1000 * record["wall_s"] / max(record["generated_tokens"], 1)


def same_token_share(plain: Optional[list], other: Optional[list]) -> Optional[float]:
    """Share of samples whose generated tokens equal those of the ``plain`` run."""
    if not plain or not other:
        return None
    return round(sum(a.token_ids == b.token_ids for a, b in zip(plain, other)) / len(plain), 3)


def _max_map_difference(first: Optional[list], second: Optional[list]) -> Optional[float]:
    """Largest |map difference| over the samples where both captures generated the same tokens."""
    if not first or not second:
        return None
    worst = None
    for a, b in zip(first, second):
        if a.token_ids == b.token_ids and a.maps is not None and b.maps is not None and a.maps.numel():
            diff = float((a.maps - b.maps).abs().max())
            worst = diff if worst is None else max(worst, diff)
    return worst


def estimate_largest_batch(points: dict[int, dict], total_bytes: Optional[int]) -> Optional[int]:
    """Largest batch whose peak memory stays under ``total_bytes``, by a line through the two largest batches."""
    fitted = sorted(b for b, p in points.items() if p.get("status") == "ok" and p.get("peak_bytes"))
    if total_bytes is None or len(fitted) < 2:
        return None
    low, high = fitted[-2], fitted[-1]
    slope = (points[high]["peak_bytes"] - points[low]["peak_bytes"]) / (high - low)
    if slope <= 0:
        return None
    intercept = points[high]["peak_bytes"] - slope * high
    return max(0, int((0.97 * total_bytes - intercept) // slope))


def section_capture(ctx: BenchContext, budget: Budget) -> dict:
    import torch

    settings = ctx.settings
    adapter = ctx.adapter()
    new_tokens = settings.new_tokens
    log(f"capture: {settings.spec.name}, {settings.spec.image_tokens} image tokens, batches {settings.batches}, "
        f"{new_tokens} new tokens")
    from test_capture_bench import run_generate

    # Warm-up: Triton compiles a kernel variant per argument specialisation (e.g. key lengths that
    # are or are not multiples of 16), so run enough steps to meet them outside the timed runs.
    for mode in CAPTURE_MODES:
        run_generate(adapter, mode, 1, settings.warmup_tokens, settings.spec.image_size)
    synchronize(ctx.device)

    rows: list[dict] = []
    points: dict[str, dict[int, dict]] = {mode: {} for mode in CAPTURE_MODES}
    for batch in settings.batches:
        generations: dict[str, Any] = {}
        # Rounds interleave the modes, so a slow spell of the machine hits all of them alike; the
        # time is the best round, memory and tokens those of the first.
        for round_index in range(settings.capture_rounds):
            for mode in CAPTURE_MODES:
                first = points[mode].get(batch)
                if first is not None and first["status"] != "ok":
                    continue
                if not budget.allows(_estimated_seconds(points, mode, batch)):
                    if first is None:
                        first = dict(mode=mode, batch=batch, new_tokens=new_tokens, status="skipped (budget)")
                        points[mode][batch] = first
                        rows.append(first)
                    continue
                record, outputs = _generate_point(ctx, mode, batch, new_tokens)
                if first is None:
                    points[mode][batch] = record
                    rows.append(record)
                    generations[mode] = outputs
                elif record["status"] == "ok":
                    first["wall_s"] = min(first["wall_s"], record["wall_s"])
                    first["rounds"] += 1
                    _per_token_times(first)
                    # Run to run, on the same inputs: how deterministic greedy decoding is here.
                    first.setdefault("same_tokens_as_first_round", same_token_share(generations.get(mode), outputs))
                del outputs
                log(f"  batch {batch:>3} {mode:<9} round {round_index + 1} {record['status']:<6} "
                    f"{cell(record.get('wall_s'), '{:.2f}')} s, peak {gib(record.get('peak_bytes'))} GiB")
        plain = generations.get("plain")
        for mode in ("fused", "reference"):
            record = points[mode][batch]
            record["same_tokens_as_plain"] = same_token_share(plain, generations.get(mode))
        points["fused"][batch]["max_map_diff_vs_reference"] = _max_map_difference(
            generations.get("fused"), generations.get("reference"))
        for mode in CAPTURE_MODES:
            base, record = points["plain"][batch], points[mode][batch]
            record["time_vs_plain"] = ratio(record.get("wall_s"), base.get("wall_s"))
            record["memory_vs_plain"] = ratio(record.get("peak_bytes"), base.get("peak_bytes"))
        del generations
        free_memory(ctx.device)

    total = torch.cuda.get_device_properties(0).total_memory if ctx.device == "cuda" else None
    largest = {mode: estimate_largest_batch(points[mode], total) for mode in CAPTURE_MODES}
    oom_rows = _probe_reference_oom(ctx, budget, points, total) if settings.probe_oom else []
    rows += oom_rows

    header = ["batch", "mode", "status", "generate s", "ms / step", "ms / token", "x plain time", "peak GiB",
              "+gen GiB", "x plain mem", "same tokens", "max abs map diff, fused vs ref"]
    table_rows = []
    for record in rows:
        added = (None if record.get("peak_bytes") is None or record.get("before_bytes") is None
                 else record["peak_bytes"] - record["before_bytes"])
        status = record["status"]
        if status == "OOM" and record.get("requested_bytes"):
            status = f"OOM (asked {gib(record['requested_bytes'])} GiB more)"
        table_rows.append([
            record["batch"], record["mode"] + (" (OOM probe)" if record.get("probe") else ""), status,
            cell(record.get("wall_s"), "{:.2f}"),
            cell(record.get("ms_per_step"), "{:.1f}"), cell(record.get("ms_per_token"), "{:.2f}"),
            cell(record.get("time_vs_plain"), "{:.3f}"), gib(record.get("peak_bytes")), gib(added),
            cell(record.get("memory_vs_plain"), "{:.3f}"), cell(record.get("same_tokens_as_plain"), "{:.2f}"),
            cell(record.get("max_map_diff_vs_reference"), "{:.2e}"),
        ])
    notes = []
    for batch in settings.batches:
        fused = points["fused"].get(batch, {})
        if fused.get("time_vs_plain") is not None:
            notes.append(f"batch {batch}: fused capture costs {fused['time_vs_plain']:.3f}x the time and "
                         f"{cell(fused.get('memory_vs_plain'), '{:.3f}')}x the peak memory of plain generation "
                         "(targets on a GPU: <= 1.05 and <= 1.05)")
    if total is not None:
        notes.append("largest batch that fits (line through the two largest measured batches, 97% of "
                     f"{gib(total)} GiB): " + ", ".join(f"{m} ~{cell(largest[m])}" for m in CAPTURE_MODES))
    notes.append(f"{settings.spec.image_tokens} image tokens; prompt: Vicuna system prompt + image + "
                 f"'describe the image in detail .'; {new_tokens} new tokens, greedy; ms / token = generate time / "
                 f"(batch x tokens), best of {settings.capture_rounds} interleaved rounds; peak = "
                 + ("torch.cuda.max_memory_allocated" if ctx.device == "cuda" else "process VmHWM"))
    repeats = [f"{r['mode']} at batch {r['batch']}: {r['same_tokens_as_first_round']:.2f}" for r in rows
               if r.get("same_tokens_as_first_round") is not None]
    if repeats:
        notes.append("same tokens in round 2 as in round 1 (same mode, same inputs): " + ", ".join(repeats))
    small = ctx.small or ctx.device != "cuda"
    sdpa_costs = sdpa_new_shape_costs(ctx.device, batch=2 if small else max(settings.batches),
                                      heads=2 if small else settings.spec.num_heads,
                                      head_dim=16 if small else settings.spec.hidden_size // settings.spec.num_heads,
                                      first_keys=40 if small else 700, shapes=3 if small else 12)
    notes.append("SDPA of one decode step at key lengths not seen before (batch "
                 f"{2 if small else max(settings.batches)}), median ms of first call / repeat: "
                 + "; ".join(f"{label} {v['first_call_ms']:.2f} / {v['repeat_call_ms']:.2f}"
                             for label, v in sdpa_costs.items()))
    non_finite = [f"{r['mode']} at batch {r['batch']}" for r in rows if r.get("maps_finite") is False]
    if non_finite:
        notes.append("WARNING: non-finite attention maps (fp16 overflow in the random model?): "
                     + ", ".join(non_finite))
    table = markdown_table(header, table_rows) + "\n\n" + "\n".join(f"- {note}" for note in notes)
    failed = [r for r in rows if r["status"] not in ("ok", "OOM") and not r["status"].startswith("skipped")]
    return dict(status="failed" if failed or non_finite else "ok", rows=rows, largest_batch_estimate=largest,
                sdpa_new_shape_ms=sdpa_costs, table=table)


def sdpa_new_shape_costs(device: str, *, batch: int, heads: int, head_dim: int, first_keys: int,
                         shapes: int) -> dict[str, dict[str, float]]:
    """Decode-step SDPA at key lengths it has not seen, per backend set: first call vs a repeat (ms, median).

    A cuDNN attention plan is built per new shape; a decode step meets a new key length every time.
    """
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.float16 if device == "cuda" else torch.float32
    without_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    results = {}
    for offset, (label, backends) in enumerate((("default backends", None), ("cuDNN excluded", without_cudnn))):
        first, repeat = [], []
        for i in range(shapes):
            keys = first_keys + offset * shapes + i  # lengths no earlier call used
            q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
            k = torch.randn(batch, heads, keys, head_dim, device=device, dtype=dtype)
            v = torch.randn(batch, heads, keys, head_dim, device=device, dtype=dtype)
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                for times in (first, repeat):
                    synchronize(device)
                    started = time.perf_counter()
                    F.scaled_dot_product_attention(q, k, v)
                    synchronize(device)
                    times.append(1000 * (time.perf_counter() - started))
        results[label] = dict(first_call_ms=statistics.median(first), repeat_call_ms=statistics.median(repeat))
    return results


def _estimated_seconds(points: dict[str, dict[int, dict]], mode: str, batch: int) -> float:
    """A guess of one point's time from the last measured batch of that mode (time grows sub-linearly)."""
    measured = [(b, p["wall_s"]) for b, p in points[mode].items() if p.get("status") == "ok"]
    if not measured:
        return 1.0
    last_batch, last_s = max(measured)
    return last_s * max(1.0, (batch / last_batch) ** 0.5)


def _probe_reference_oom(ctx: BenchContext, budget: Budget, points: dict[str, dict[int, dict]],
                         total: Optional[int]) -> list[dict]:
    """Run the reference capture at a batch predicted not to fit (and fused there for contrast)."""
    reference = points["reference"]
    fitted = sorted(b for b, p in reference.items() if p.get("status") == "ok")
    rows: list[dict] = []
    if not fitted or total is None:
        return rows
    batch = predicted_oom_batch(reference, total) or 2 * fitted[-1]
    for _attempt in range(3):
        if not budget.allows(20.0):
            break
        record, _ = _generate_point(ctx, "reference", batch, ctx.settings.new_tokens)
        record["probe"] = "reference OOM probe"
        rows.append(record)
        log(f"  OOM probe: reference at batch {batch}: {record['status']}, peak {gib(record.get('peak_bytes'))} GiB")
        if record["status"] == "OOM":
            if budget.allows(30.0):
                fused, _ = _generate_point(ctx, "fused", batch, ctx.settings.new_tokens)
                fused["probe"] = "fused at the reference's OOM batch"
                rows.append(fused)
                log(f"  fused at batch {batch}: {fused['status']}, peak {gib(fused.get('peak_bytes'))} GiB")
            break
        batch *= 2
    free_memory(ctx.device)
    return rows


def predicted_oom_batch(points: dict[int, dict], total: int) -> Optional[int]:
    """A batch (multiple of 16) about 25% past the estimated largest fit: where a run should fail."""
    largest = estimate_largest_batch(points, total)
    if largest is None:
        return None
    return int(math.ceil((largest * 1.25 + 1) / 16) * 16)


# ------------------------------------------------------------------------------------------------
# section 3: fused upsample + peak (issue 4)
# ------------------------------------------------------------------------------------------------
def _memory_above_start(fn: Callable[[], Any], device: str) -> dict:
    """CUDA: peak bytes allocated during ``fn`` above the start. CPU: the largest tensor any op returned."""
    import torch

    if device == "cuda":
        synchronize(device)
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        synchronize(device)
        return dict(measure="cuda max_memory_allocated above start", bytes=torch.cuda.max_memory_allocated() - start)
    from test_grounding_bench import _LargestAllocation

    with _LargestAllocation() as recorder:
        fn()
    return dict(measure="largest tensor returned by a torch op", bytes=recorder.largest_bytes)


def section_upsample(ctx: BenchContext, budget: Budget) -> dict:
    import torch

    from pixfound.ops import upsample_peaks
    from pixfound.triton_kernels import interpreting, triton_available
    from test_grounding_bench import published_interpolate_argmax

    settings = ctx.settings
    maps_count, size = settings.upsample_maps, settings.upsample_size
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(maps_count, *settings.upsample_grid, generator=generator).to(ctx.device)
    variants: dict[str, Callable[[], Any]] = {
        "published: interpolate + crop + argmax": lambda: published_interpolate_argmax(maps, size),
        "pixfound torch reference": lambda: upsample_peaks(maps, size, aspect="pad", backend="reference"),
    }
    if triton_available() and (maps.is_cuda or interpreting()):
        variants["pixfound fused (Triton)"] = lambda: upsample_peaks(maps, size, aspect="pad", backend="triton")
    else:
        log("upsample: Triton cannot run here (no CUDA and no TRITON_INTERPRET=1); fused row skipped")
    full_bytes = maps_count * size[0] * size[1] * 4
    published_points = published_interpolate_argmax(maps, size).cpu()
    rows = []
    for name, fn in variants.items():
        if not budget.allows(2.0):
            rows.append(dict(variant=name, status="skipped (budget)"))
            continue
        points = fn()
        points = (points[:, 0] if points.dim() == 3 else points).cpu()
        agree = float((points == published_points).all(-1).float().mean())
        milliseconds = median_ms(fn, ctx.device, settings.upsample_repeats)
        memory = _memory_above_start(fn, ctx.device)
        rows.append(dict(variant=name, status="ok", median_ms=milliseconds, peak_extra_bytes=memory["bytes"],
                         memory_measure=memory["measure"], peaks_equal_published=agree))
        log(f"  {name}: {milliseconds:.3f} ms, extra memory {memory['bytes'] / MIB:.2f} MiB, peaks = published "
            f"{agree:.0%}")
    base = next((r for r in rows if r["variant"].startswith("published") and r["status"] == "ok"), None)
    for row in rows:
        row["speedup_vs_published"] = ratio(base and base["median_ms"], row.get("median_ms"), 2)
    table = markdown_table(
        ["variant", "median ms", "x faster than published", "peak extra MiB", "[G,H,W] fp32 MiB",
         "peaks = published"],
        [[r["variant"], cell(r.get("median_ms"), "{:.3f}"), cell(r.get("speedup_vs_published"), "{:.2f}"),
          cell(None if r.get("peak_extra_bytes") is None else r["peak_extra_bytes"] / MIB, "{:.2f}"),
          f"{full_bytes / MIB:.2f}", cell(r.get("peaks_equal_published"), "{:.0%}")] for r in rows],
    )
    table += (f"\n\n- {maps_count} maps {settings.upsample_grid[0]}x{settings.upsample_grid[1]} -> "
              f"{size[1]}x{size[0]} (W x H), pad mode, k=1; median of {settings.upsample_repeats} "
              f"({'CUDA events' if ctx.device == 'cuda' else 'perf_counter, Triton interpreter'}); "
              f"memory: {rows[0].get('memory_measure', '-') if rows else '-'}")
    return dict(status="ok", rows=rows, full_maps_bytes=full_bytes, table=table)


# ------------------------------------------------------------------------------------------------
# section 4: end to end (issue 6)
# ------------------------------------------------------------------------------------------------
def _import_pipeline_bench() -> Optional[Any]:
    if not (BENCH_DIR / "pipeline_bench.py").is_file():
        return None
    return importlib.import_module("pipeline_bench")


# Order of the e2e runs: the limit and pixfound first, so a short budget still gives the headline.
E2E_PIPELINES = ("plain", "fused", "published", "reference")
# Extra fused rows after those (labels and BenchSettings changes): SAM in bf16 (the encoder was 5.4 s of
# session 3's 19.5 s end to end) and the grounding stage overlapped with the next generate.
E2E_FUSED_VARIANTS = (
    ("fused, SAM bf16", dict(sam_dtype="bfloat16")),
    ("fused, overlap", dict(overlap=True)),
    ("fused, SAM bf16, overlap", dict(sam_dtype="bfloat16", overlap=True)),
)


def _e2e_components(ctx: BenchContext, pipeline_bench: Any) -> Any:
    """The shared 7B LLaVA (built on the device), a random SAM and the spaCy pipeline."""
    import torch

    from pixfound.grounding.phrases import load_spacy

    settings = ctx.settings
    started = time.perf_counter()
    with torch.device(ctx.device):  # SAM's own initialisation then runs on the GPU, not the host
        segmenter = pipeline_bench.build_segmenter(settings.e2e_sam, device=ctx.device, seed=0,
                                                   encoder_batch_size=settings.e2e_sam_batch)
    synchronize(ctx.device)
    log(f"built SAM {settings.e2e_sam} (random weights, {parameter_count(segmenter.model) / 1e6:.0f} M parameters) in "
        f"{time.perf_counter() - started:.1f} s")
    nlp = load_spacy()
    return pipeline_bench.Components(adapter=ctx.adapter(), segmenter=segmenter, nlp=nlp, vectors=None)


def section_e2e(ctx: BenchContext, budget: Budget) -> dict:
    """Published recipe vs pixfound --reference / --fused vs plain generation (pipeline_bench's runs)."""
    import torch

    pipeline_bench = _import_pipeline_bench()
    if pipeline_bench is None:
        message = ("benchmarks/pipeline_bench.py is not in this checkout: the end-to-end comparison "
                   "(published recipe vs pixfound --reference vs --fused) was not run")
        log(message)
        return dict(status="skipped", reason=message, rows=[], table=message)
    settings = ctx.settings
    components = _e2e_components(ctx, pipeline_bench)
    common = dict(
        size="tiny" if ctx.small else "llava-1.5-7b", max_new_tokens=settings.e2e_new_tokens,
        protocols=settings.e2e_protocols,
        selects=("oracle",), image_hw=settings.e2e_image_hw, sam=settings.e2e_sam, sam_dtype=settings.e2e_sam_dtype,
        sam_batch_size=settings.e2e_sam_batch, device=ctx.device, dtype=str(ctx.dtype).replace("torch.", ""),
        threads=torch.get_num_threads(), share_image_prefix=settings.e2e_share_prefix, overlap=settings.e2e_overlap,
    )
    batched = pipeline_bench.BenchSettings(samples=settings.e2e_images, batch_size=settings.e2e_batch, **common)
    # The published recipe is batch 1 throughout: fewer images give its images/s at a fraction of the time.
    one_by_one = pipeline_bench.BenchSettings(samples=settings.published_images, batch_size=1,
                                              **{**common, "sam_dtype": "float32"})
    log(f"e2e: {settings.e2e_images} synthetic images {settings.e2e_image_hw[1]}x{settings.e2e_image_hw[0]} at batch "
        f"{settings.e2e_batch} (published recipe: {settings.published_images} images, batch 1), protocols "
        f"{', '.join(map(str, settings.e2e_protocols))}, "
        f"{settings.e2e_new_tokens} new tokens, SAM {settings.e2e_sam} {settings.e2e_sam_dtype} encoder batch "
        f"{settings.e2e_sam_batch}, "
        "oracle selection" + (", shared image prefix" if settings.e2e_share_prefix else "")
        + (", grounding overlapped with generation" if settings.e2e_overlap else ""))

    rows, problems = [], []

    def run(label: str, name: str, run_settings: Any, min_s: float = settings.e2e_min_run_s) -> Optional[dict]:
        """One timed pipeline run as a row labelled ``label``; out of memory, errors and budget become problems."""
        if not budget.allows(min_s):
            problems.append(dict(pipeline=label, status="skipped (budget)"))
            log(f"  {label}: skipped, {budget.remaining():.0f} s left")
            return None
        started = time.perf_counter()
        try:
            row = pipeline_bench.measure_in_process(run_settings, name, components=components)
        except _oom_errors() as err:
            peak = torch.cuda.max_memory_allocated() if ctx.device == "cuda" else None
            problems.append(dict(pipeline=label, status="OOM", peak_gpu_bytes=peak,
                                 requested_bytes=_requested_bytes(str(err)), error=str(err).splitlines()[0][:300]))
            free_memory(ctx.device)
            log(f"  {label}: out of memory at batch {run_settings.batch_size} (peak {gib(peak)} GiB)")
            return None
        except Exception:  # one broken pipeline must not cost the others their numbers
            error = traceback.format_exc()
            log(error)
            problems.append(dict(pipeline=label, status="error", error=error[-3000:]))
            free_memory(ctx.device)
            return None
        row.update(pipeline=label, size=settings.spec.name, status="ok")
        rows.append(row)
        log(f"  {label}: {row['images_per_s']:.3f} images/s, wall {row['wall_s']:.1f} s "
            f"({time.perf_counter() - started:.0f} s with warm-up), peak GPU {gib(row.get('peak_gpu_bytes'))} GiB")
        gc.collect()
        return row

    for name in E2E_PIPELINES:
        run(name, name, one_by_one if name == "published" else batched)
    # What the fused row did not use, each alone and together, if the budget allows.
    variants = []
    for label, change in E2E_FUSED_VARIANTS:
        varied = dataclasses.replace(batched, **change)
        if settings.e2e_variants and varied != batched and varied not in [v for _, v in variants]:
            variants.append((label, varied))
    fused_rows = [row for row in rows if row["pipeline"] == "fused"]
    # a variant starts only if about as long as the fused run (plus its warm-up) is left
    variant_min_s = max(settings.e2e_min_run_s, 1.5 * fused_rows[0]["wall_s"]) if fused_rows else settings.e2e_min_run_s
    for label, varied in variants:
        run(label, "fused", varied, variant_min_s)
    pipeline_bench.compare(rows)
    by_name = {row["pipeline"]: row for row in rows}
    table = pipeline_bench.format_table(rows) if rows else "no end-to-end run finished"
    notes = []
    for label, _ in variants:
        if label in by_name and "fused" in by_name:
            same = pipeline_bench.agreement(by_name[label]["records"], by_name["fused"]["records"])
            by_name[label]["vs_fused"] = same
            notes.append(f"{label} vs fused: answers {same['answers_equal']}/{same['records']}, selected masks "
                         f"{same['selected_masks_equal']}/{same['grounded']} identical (mean IoU between them "
                         f"{same['selected_masks_mean_iou'] if same['selected_masks_mean_iou'] is None else round(same['selected_masks_mean_iou'], 4)})")
    if "fused" in by_name and "plain" in by_name:
        fused_peak, plain_peak = by_name["fused"].get("peak_gpu_bytes"), by_name["plain"].get("peak_gpu_bytes")
        if fused_peak and plain_peak:
            change = 100 * (fused_peak / plain_peak - 1)
            notes.append(f"peak GPU memory at batch {settings.e2e_batch}: fused pipeline {gib(fused_peak)} GiB vs "
                         f"plain generation {gib(plain_peak)} GiB ({change:+.1f}%; both with the LLaVA and SAM "
                         "weights resident)")
    for problem in problems:
        detail = "" if problem.get("peak_gpu_bytes") is None else f", peak {gib(problem['peak_gpu_bytes'])} GiB"
        if problem.get("error"):
            detail += f": {problem['error'].strip().splitlines()[-1]}"
        notes.append(f"{problem['pipeline']}: {problem['status']}{detail}")
    notes.append("largest batch that fits: see the capture section (memory line through batches 8 and 32, and the "
                 "reference's out-of-memory probe)")
    table += "\n\n" + "\n".join(f"- {note}" for note in notes)
    for row in rows:  # the per-record signatures are for the equality checks, not for the JSON
        row.pop("records", None)
    errors = [p for p in problems if p["status"] == "error"]
    return dict(status="ok" if rows and not errors else "failed", rows=rows + problems, table=table)


# ------------------------------------------------------------------------------------------------
# environment, output, main
# ------------------------------------------------------------------------------------------------
def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    import torch

    import pixfound

    meta: dict[str, Any] = dict(
        date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        command=" ".join([pathlib.Path(sys.executable).name, *sys.argv]),
        host=platform.node(), python=platform.python_version(), platform=platform.platform(),
        device=device, torch=torch.__version__, cuda=torch.version.cuda,
        versions={name: _version(name) for name in
                  ("triton", "transformers", "tokenizers", "segment-anything", "pycocotools", "spacy", "numpy",
                   "pixfound")},
        pixfound_path=str(pathlib.Path(pixfound.__file__).parent),
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
    )
    try:
        importlib.import_module("pixfound._C")
        meta["pixfound_C"] = "importable"
    except ImportError as err:
        meta["pixfound_C"] = f"missing: {err}"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta.update(card=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, card_memory_gib=round(props.total_memory / GIB, 1))
        try:
            query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
            smi = subprocess.run(query, capture_output=True, text=True, timeout=20)
            meta["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            meta["nvidia_smi"] = None
    else:
        meta.update(card=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                    torch_threads=torch.get_num_threads())
    # The device machine gets a copy of the working tree without .git: PIXFOUND_COMMIT names it there.
    meta["git_commit"] = os.environ.get("PIXFOUND_COMMIT")
    if not meta["git_commit"]:
        try:
            commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=10)
            meta["git_commit"] = commit.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            meta["git_commit"] = None
    return meta


def format_environment(meta: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    lines = [f"date: {meta['date_utc']}", f"card: {meta['card']}" + (f" ({meta['nvidia_smi']})" if meta.get(
        "nvidia_smi") else ""), f"python {meta['python']}, torch {meta['torch']} (CUDA {meta['cuda']}), {versions}",
        f"pixfound from {meta['pixfound_path']} (_C {meta['pixfound_C']}), commit {meta.get('git_commit') or '-'}",
        f"command: {meta['command']}"]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def render_markdown(results: dict) -> str:
    parts = ["## gpu_bench " + results["meta"]["date_utc"], "", "```", format_environment(results["meta"]), "```"]
    for name in SECTIONS:
        section = results["sections"].get(name)
        if section is None:
            continue
        parts += ["", f"### {name} ({section['status']}, {section.get('elapsed_s', '-')} s)", ""]
        if section.get("table"):
            parts.append(section["table"])
        if section.get("error"):
            parts += ["", "```", section["error"].strip()[-3000:], "```"]
    return "\n".join(parts) + "\n"


def write_outputs(ctx: BenchContext) -> None:
    if ctx.json_out is not None:
        ctx.json_out.parent.mkdir(parents=True, exist_ok=True)
        ctx.json_out.write_text(json.dumps(_jsonable(ctx.results), indent=1))
    if ctx.markdown_out is not None:
        ctx.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        ctx.markdown_out.write_text(render_markdown(ctx.results))


SECTION_FUNCTIONS: dict[str, Callable[[BenchContext, Budget], dict]] = {
    "tests": section_tests,
    "capture": section_capture,
    "upsample": section_upsample,
    "e2e": section_e2e,
}


def parse_sections(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--sections takes a comma-separated subset of {', '.join(SECTIONS)}; "
                                         f"got {text!r}")
    return [name for name in SECTIONS if name in names]  # always in the documented order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cuda (default when available) or cpu")
    parser.add_argument("--small", action="store_true", help="tiny configs: exercises every section in about a minute")
    parser.add_argument("--sections", type=parse_sections, default=list(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the kernel tests section")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"wall-clock budget of all sections together (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--batches", type=lambda s: tuple(int(b) for b in s.split(",")), default=None,
                        help="capture batches (default 1,8,32; --small 1,2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per capture run (default 64)")
    parser.add_argument("--share-image-prefix", action="store_true",
                        help="e2e: pixfound and plain runs use --share-image-prefix (the published recipe never does)")
    parser.add_argument("--e2e-sam-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="e2e: SAM precision of the pixfound runs (the published recipe stays float32; "
                             "pipeline_bench.py --sam-precision measures the mIoU effect)")
    parser.add_argument("--no-e2e-variants", action="store_true",
                        help="e2e: leave out the extra fused rows (SAM bf16, overlap, both)")
    parser.add_argument("--e2e-overlap", action="store_true",
                        help="e2e: pixfound runs ground each batch in a second thread while the next one generates")
    parser.add_argument("--json-out", type=pathlib.Path, default=None,
                        help="results JSON (default $OUT/gpu_bench.json when OUT is set)")
    parser.add_argument("--markdown-out", type=pathlib.Path, default=None,
                        help="the tables as Markdown, for benchmarks/RESULTS.md (default $OUT/gpu_bench.md when OUT "
                             "is set)")
    return parser


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    return requested


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the selected sections; print every table and return (and write) the results."""
    args = build_parser().parse_args(argv)
    if args.new_tokens is not None and args.new_tokens < 2:
        raise SystemExit(f"--new-tokens must be >= 2, got {args.new_tokens}")
    if args.batches is not None and (not args.batches or min(args.batches) < 1):
        raise SystemExit(f"--batches must be positive ints, got {args.batches}")
    if args.budget_s <= 0:
        raise SystemExit(f"--budget-s must be > 0, got {args.budget_s}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    device = resolve_device(args.device)
    if device == "cpu":
        # Triton reads this when the kernels are decorated, i.e. at their first import below.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import pixfound  # noqa: F401  (the installed package first: the benchmark modules put the checkout on sys.path)

    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))

    settings = settings_for(device, args.small)
    if args.batches is not None:
        settings = dataclasses.replace(settings, batches=tuple(args.batches))
    if args.new_tokens is not None:
        settings = dataclasses.replace(settings, new_tokens=args.new_tokens)
    if args.share_image_prefix:
        settings = dataclasses.replace(settings, e2e_share_prefix=True)
    settings = dataclasses.replace(settings, e2e_sam_dtype=args.e2e_sam_dtype, e2e_overlap=args.e2e_overlap,
                                   e2e_variants=not args.no_e2e_variants)
    sections = [s for s in args.sections if not (s == "tests" and args.skip_tests)]
    out_dir = pathlib.Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    json_out = args.json_out or (out_dir / "gpu_bench.json" if out_dir else None)
    markdown_out = args.markdown_out or (out_dir / "gpu_bench.md" if out_dir else None)

    results: dict[str, Any] = dict(meta=environment(device), settings=dataclasses.asdict(settings), sections={})
    results["meta"]["sections"] = sections
    ctx = BenchContext(device=device, settings=settings, small=args.small, results=results, json_out=json_out,
                       markdown_out=markdown_out)
    log(format_environment(results["meta"]))
    if device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    weights = {name: SECTION_WEIGHTS[name] for name in sections}
    total = Budget(args.budget_s)
    for index, name in enumerate(sections):
        share = weights[name] / sum(weights[n] for n in sections[index:])
        budget = Budget(max(0.0, total.remaining()) * share)
        log(f"\n=== {name} (budget {budget.seconds:.0f} s) ===")
        started = time.perf_counter()
        if total.remaining() <= 0:
            section = dict(status="skipped (total budget spent)", rows=[], table="skipped: total budget spent")
        else:
            try:
                section = SECTION_FUNCTIONS[name](ctx, budget)
            except Exception:  # one broken section must not cost the others their numbers
                error = traceback.format_exc()
                log(error)
                section = dict(status="error", rows=[], error=error, table=None)
                free_memory(device)
        section["elapsed_s"] = round(time.perf_counter() - started, 1)
        section["budget_s"] = round(budget.seconds, 1)
        results["sections"][name] = section
        if section.get("table"):
            log(f"\n{section['table']}")
        write_outputs(ctx)

    log("\n" + "=" * 100 + "\nSUMMARY\n" + render_markdown(results))
    if json_out:
        log(f"results: {json_out}")
    return results


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if all(s["status"] in ("ok", "skipped") for s in outcome["sections"].values()) else 1)
