"""What the benchmarks share: random LLaVA sizes, inputs, timing, memory figures and tables.

The per-op benchmark files, ``e2e.py`` and ``gpu_bench.py`` import this module; it imports only
the installed ``pixfound`` (and torch lazily), never a test file.
"""
from __future__ import annotations

import dataclasses
import pathlib
import statistics
import time
from typing import Any, Callable, Optional, Sequence

MIB = 1024**2
GIB = 1024**3


# ------------------------------------------------------------------------------------------------
# random LLaVA-1.5 models, all built by pixfound.models.tiny.build_random_llava
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LlavaSize:
    """The text model of a random LLaVA-1.5; the vision tower is always the small one of ``build_random_llava``."""

    name: str
    layers: int
    heads: int
    kv_heads: int
    hidden: int
    intermediate: Optional[int]  # None: 2 x hidden
    image_size: int              # with patch_size: (image_size // patch_size)² image tokens
    patch_size: int

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def describe(self) -> str:
        heads = f"{self.heads} heads" if self.kv_heads == self.heads else f"{self.heads} heads ({self.kv_heads} kv)"
        return f"{self.layers} layers × {heads} × {self.hidden}, {self.image_tokens} image tokens"


LLAVA_SIZES = {
    # tiny_model("llava"): what `pixfound eval` runs offline by default
    "tiny": LlavaSize("tiny", layers=3, heads=4, kv_heads=2, hidden=64, intermediate=None, image_size=40, patch_size=8),
    # quick checks at LLaVA-1.5's 576 image tokens
    "small": LlavaSize("small", layers=2, heads=4, kv_heads=4, hidden=128, intermediate=512, image_size=336,
                       patch_size=14),
    "medium": LlavaSize("medium", layers=8, heads=8, kv_heads=8, hidden=512, intermediate=2048, image_size=336,
                        patch_size=14),
    # the text model of LLaVA-1.5-7B (Vicuna-7B); built in float32 on the host first (about 28 GB)
    "llava-1.5-7b": LlavaSize("llava-1.5-7b", layers=32, heads=32, kv_heads=32, hidden=4096, intermediate=11008,
                              image_size=336, patch_size=14),
}


def build_llava(size: str | LlavaSize, *, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> Any:
    """A random-weight LLaVA-1.5 adapter of ``size`` (a :data:`LLAVA_SIZES` key or a :class:`LlavaSize`)."""
    import torch

    from pixfound.eval.pipeline import torch_dtype
    from pixfound.models.tiny import build_random_llava

    spec = LLAVA_SIZES[size] if isinstance(size, str) else size
    adapter = build_random_llava(
        seed, text_layers=spec.layers, hidden_size=spec.hidden, num_heads=spec.heads, num_kv_heads=spec.kv_heads,
        intermediate_size=spec.intermediate, image_size=spec.image_size, patch_size=spec.patch_size,
        name=f"random-llava-{spec.name}",
    )
    adapter.model.to(device=torch.device(device), dtype=torch_dtype(dtype))
    return adapter


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def synthetic_samples(count: int, image_hw: Sequence[int] = (96, 128), seed: int = 0) -> list:
    """The first ``count`` samples of the synthetic benchmark, images of ``image_hw`` (H, W)."""
    from pixfound.data import load_benchmark

    even = count + count % 2  # the synthetic benchmark comes in pairs
    return list(load_benchmark("synthetic", n=even, seed=seed, size=tuple(image_hw)))[:count]


CAPTURE_PROMPT = "describe the image in detail ."
# Repeated to lengthen the prompt (8 text tokens a time) for the sequence axis of the memory curve.
PROMPT_FILLER = " the red car is on the table ."
CAPTURE_MODES = ("plain", "fused", "reference")
CAPTURE_IMAGE_HW = (336, 336)


def capture_prompt(extra_tokens: int = 0) -> str:
    return CAPTURE_PROMPT + PROMPT_FILLER * (extra_tokens // 8)


def run_generate(adapter: Any, mode: str, samples: Sequence[Any], new_tokens: int, extra_tokens: int = 0) -> list:
    """One ``generate`` call over ``samples`` with capture ``mode`` (``plain`` is no capture), greedy."""
    capture = None if mode == "plain" else mode
    return adapter.generate(list(samples), [capture_prompt(extra_tokens)] * len(samples), max_new_tokens=new_tokens,
                            capture=capture, batch_size=len(samples))


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def synchronize(device: Any) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def synchronized(fn: Callable[[], Any], device: Any) -> Callable[[], Any]:
    """``fn`` followed by a wait for the GPU, so that a timer around it sees the kernels' time."""
    if not str(device).startswith("cuda"):
        return fn

    def run() -> Any:
        out = fn()
        synchronize(device)
        return out

    return run


def seconds(fn: Callable[[], Any], device: Any) -> tuple[float, Any]:
    """Wall time of one call of ``fn`` (GPU work included) and its result."""
    synchronize(device)
    started = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - started, out


def median_ms(fn: Callable[[], Any], device: Any, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn``: CUDA events on a GPU, ``perf_counter`` on the CPU."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if str(device).startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> Optional[int]:
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set (VmHWM) to its current RSS; False where Linux does not allow it."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_bytes(field: str = "VmRSS") -> Optional[int]:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in bytes; None without /proc."""
    kib = _proc_status_kib(field)
    return None if kib is None else kib * 1024


class PeakMemory:
    """Peak memory while the ``with`` block runs.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (what the caching allocator handed out).
    CPU: the process's peak resident set (VmHWM reset on entry), None where it cannot be reset.
    ``before_bytes`` is what was allocated (CUDA) or resident (CPU) on entry.
    """

    def __init__(self, device: Any) -> None:
        self.cuda = str(device).startswith("cuda")
        self.before_bytes: Optional[int] = None
        self.peak_bytes: Optional[int] = None
        self.measure = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM after a reset (model included)"

    def __enter__(self) -> "PeakMemory":
        import gc

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before_bytes = torch.cuda.memory_allocated()
        else:
            self._exact = reset_peak_rss()
            self.before_bytes = rss_bytes()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        elif self._exact:
            self.peak_bytes = rss_bytes("VmHWM")


def capture_memory_points(size: str, mode: str, points: Sequence[Sequence[int]], new_tokens: int,
                          device: str = "cpu", dtype: str = "float32", adapter: Any = None) -> list[dict]:
    """Peak memory of one ``generate`` per (batch, extra prompt tokens) point, in this process.

    On the CPU run it in a fresh process per mode (``capture_memory_in_subprocess``): peak RSS
    only means something for what ran in that process. ``adapter``: a model of ``size`` already built.
    """
    adapter = adapter or build_llava(size, device=device, dtype=dtype)
    samples = synthetic_samples(max(batch for batch, _ in points), CAPTURE_IMAGE_HW)
    run_generate(adapter, mode, samples[:1], 2)  # first-call allocations stay out of every point
    rows = []
    for batch, extra_tokens in points:
        with PeakMemory(device) as memory:
            generations = run_generate(adapter, mode, samples[:batch], new_tokens, extra_tokens)
        prepared = adapter.prepare([samples[0].load_image()], [capture_prompt(extra_tokens)])
        rows.append(dict(mode=mode, batch=batch, extra_tokens=extra_tokens, new_tokens=new_tokens,
                         prompt_tokens=prepared.prompt_len, before_bytes=memory.before_bytes,
                         peak_bytes=memory.peak_bytes, measure=memory.measure,
                         token_ids=[list(g.token_ids) for g in generations]))
    return rows


def capture_memory_in_subprocess(size: str, mode: str, points: Sequence[Sequence[int]], new_tokens: int) -> list[dict]:
    """:func:`capture_memory_points` on the CPU in a fresh Python process."""
    import json
    import os
    import subprocess
    import sys

    here = pathlib.Path(__file__).resolve().parent
    code = "import json, sys, _helpers; print(json.dumps(_helpers.capture_memory_points(**json.loads(sys.argv[1]))))"
    arguments = json.dumps(dict(size=size, mode=mode, points=[list(p) for p in points], new_tokens=new_tokens))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")])))
    # Blocks of 64 KiB and more are mapped and unmapped one by one, so freed tensors leave the RSS
    # and each point's peak follows its live tensors rather than what the heap kept.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    # cwd: this folder, so that `import pixfound` finds the installed package, not a source tree.
    done = subprocess.run([sys.executable, "-c", code, arguments], cwd=here, env=env, capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"capture memory of {mode!r} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def cell(value: Any, fmt: str = "{}") -> str:
    return "–" if value is None else fmt.format(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
