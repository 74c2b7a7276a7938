"""Where the fused capture's time goes on a GPU: one short device run (about two minutes).

Builds the benchmark LLaVA-1.5-7B architecture (random fp16, benchmarks/gpu_bench.py) and prints:

1. the image-attention kernel alone at decode shapes (one query row, LLaVA's 32 heads x 128,
   650 keys): GPU time per call (CUDA events around many calls) and host time per launch, next to
   SDPA on the same shapes; then one decode step's capture over 32 layers as the probe runs it
   (one layered launch) against one launch per layer, and a window of 32 decode steps (the
   row-block kernel, one launch) against one launch per step;
2. ``generate`` time per step for plain SDPA, fused capture, and fused capture with parts of the
   probe switched off (monkeypatched here, not in the library): no in-layer timer, and the capture's
   per-layer work reduced to bookkeeping (what the hooks and the attention wrapper cost alone);
3. a torch.profiler table of one fused ``generate`` (self CPU and self CUDA time per op).

Run on the device (benchmarks/gpu/README.md) as
``python3 benchmarks/gpu/profile_capture.py`` after installing pixfound; ``--device cpu --small``
runs it on tiny CPU shapes (Triton's interpreter) so that tests keep it working.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Iterator

BENCH_DIR = pathlib.Path(__file__).resolve().parents[1]
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from gpu_bench import log, synchronize as sync  # noqa: E402  (gpu_bench imports torch lazily)


def time_calls(fn: Callable[[], Any], device: str, calls: int, warmup: int = 3) -> tuple[float, float]:
    """Milliseconds per call of ``calls`` back-to-back calls: host time (launches only, the GPU may
    still be busy) and stream time (CUDA events around them; the host time on a CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    started = time.perf_counter()
    if device == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    for _ in range(calls):
        fn()
    host_ms = 1000 * (time.perf_counter() - started) / calls
    if device != "cuda":
        return host_ms, host_ms
    end.record()
    end.synchronize()
    return host_ms, begin.elapsed_time(end) / calls


def decode_spans(batch: int, keys: int, image: int, device: str) -> dict:
    """Index arguments of one decode step: 576-style image span at key 35, every key valid."""
    import torch

    index = dict(dtype=torch.int64, device=device)
    return dict(image_start=torch.full((batch,), 35, **index), image_len=torch.full((batch,), image, **index),
                key_start=torch.zeros(batch, **index), key_end=torch.full((batch, 1), keys, **index))


def kernel_micro(device: str, batches: tuple[int, ...], heads: int, head_dim: int, keys: int, image: int,
                 calls: int) -> list[dict]:
    """GPU time per call (events over ``calls`` back-to-back calls) and host time per launch."""
    import torch
    import torch.nn.functional as F

    from pixfound.ops.attention import image_attention

    dtype = torch.float16 if device == "cuda" else torch.float32
    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        q = torch.randn(batch, heads, 1, head_dim, generator=gen).to(device, dtype)
        k = torch.randn(batch, heads, keys, head_dim, generator=gen).to(device, dtype)
        v = torch.randn(batch, heads, keys, head_dim, generator=gen).to(device, dtype)
        args = dict(decode_spans(batch, keys, image, device), validate=False, num_image_keys=image)
        variants: dict[str, Callable[[], Any]] = {
            "image_attention (triton)": lambda: image_attention([q], [k], [head_dim ** -0.5], backend="triton", **args),
            "sdpa, same shapes": lambda: F.scaled_dot_product_attention(q, k, v),
        }
        for name, fn in variants.items():
            host_us, per_call_us = (1000 * ms for ms in time_calls(fn, device, calls))
            rows.append(dict(batch=batch, variant=name, host_us_per_call=host_us, stream_us_per_call=per_call_us))
            log(f"  B={batch:<3} {name:<26} host {host_us:8.1f} us/call   stream {per_call_us:8.1f} us/call")
    return rows


def layered_micro(device: str, batches: tuple[int, ...], layers: int, heads: int, head_dim: int, keys: int,
                  image: int, calls: int) -> list[dict]:
    """A decode step's capture for ``layers`` layers: one layered launch vs one launch per layer.

    The probe's GPU path is the layered one (one ``image_attention`` call for every layer); "per layer"
    is what it did before (one call and a sum per layer).
    """
    import torch

    from pixfound.ops.attention import image_attention

    dtype = torch.float16 if device == "cuda" else torch.float32
    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        qs = [torch.randn(batch, heads, 1, head_dim, generator=gen).to(device, dtype) for _ in range(layers)]
        ks = [torch.randn(batch, heads, keys, head_dim, generator=gen).to(device, dtype) for _ in range(layers)]
        spans = decode_spans(batch, keys, image, device)
        scale = head_dim ** -0.5

        def layered() -> Any:
            return image_attention(qs, ks, [scale] * layers, backend="triton", validate=False, num_image_keys=image,
                                   **spans)

        def per_layer() -> Any:
            out = torch.zeros(batch, 1, image, device=device)
            for q, k in zip(qs, ks):
                out += image_attention([q], [k], [scale], backend="triton", validate=False, num_image_keys=image,
                                       **spans)
            return out

        gap = float((layered() - per_layer()).abs().max())
        for name, fn in (("layered launch", layered), ("one launch per layer", per_layer)):
            host_ms, stream_ms = time_calls(fn, device, calls, warmup=2)
            rows.append(dict(batch=batch, variant=name, host_ms=host_ms, stream_ms=stream_ms, max_diff=gap))
            log(f"  B={batch:<3} {layers} layers, {name:<22} host {host_ms:7.3f} ms/step   with the GPU "
                f"{stream_ms:7.3f} ms/step   (max |layered - per layer| {gap:.1e})")
    return rows


def window_micro(device: str, batches: tuple[int, ...], layers: int, heads: int, head_dim: int, keys: int,
                 image: int, steps: int, calls: int) -> list[dict]:
    """A window of ``steps`` decode steps over ``layers`` layers: the row-block kernel (one launch, the
    probe's window) against one layered launch per step (what a window of one step runs)."""
    import torch

    from pixfound.ops.attention import image_attention

    dtype = torch.float16 if device == "cuda" else torch.float32
    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(batch + 1)
        qs = [torch.randn(batch, heads, steps, head_dim, generator=gen).to(device, dtype) for _ in range(layers)]
        ks = [torch.randn(batch, heads, keys, head_dim, generator=gen).to(device, dtype) for _ in range(layers)]
        spans = decode_spans(batch, keys, image, device)
        # Step s sees the keys up to keys - steps + 1 + s, as in generation.
        spans["key_end"] = (torch.arange(steps, device=device) + keys - steps + 1).expand(batch, -1).contiguous()
        scale = head_dim ** -0.5

        def window() -> Any:
            return image_attention(qs, ks, [scale] * layers, backend="triton", validate=False, num_image_keys=image,
                                   **spans)

        def step_by_step() -> Any:
            out = torch.zeros(batch, steps, image, device=device)
            for step in range(steps):
                one = dict(spans, key_end=spans["key_end"][:, step : step + 1])
                out[:, step : step + 1] = image_attention([q[:, :, step : step + 1] for q in qs], ks, [scale] * layers,
                                                          backend="triton", validate=False, num_image_keys=image,
                                                          **one)
            return out

        gap = float((window() - step_by_step()).abs().max())
        for name, fn in (("row-block window", window), ("one launch per step", step_by_step)):
            host_ms, stream_ms = time_calls(fn, device, calls, warmup=2)
            rows.append(dict(batch=batch, variant=name, host_ms=host_ms / steps, stream_ms=stream_ms / steps,
                             max_diff=gap))
            log(f"  B={batch:<3} {layers} layers x {steps} steps, {name:<20} host {host_ms / steps:7.3f} ms/step   "
                f"with the GPU {stream_ms / steps:7.3f} ms/step   (max |window - per step| {gap:.1e})")
    return rows


@contextlib.contextmanager
def patched(target: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, original)


def _bookkeeping_only(self: Any, backend: str) -> Any:
    """The capture's op replaced by zeros: what is left is its bookkeeping (attention function, ranges, window)."""
    import torch

    def compute(queries: Any, keys: Any, scales: Any, *ranges: Any) -> Any:
        return torch.zeros(queries[0].shape[0], queries[0].shape[2], self.num_image_keys, device=queries[0].device)

    return compute


class _NoTimer:
    host_seconds = 0.0

    def start(self, device: Any) -> None:
        return None

    def stop(self, begin: Any) -> None:
        return None

    def seconds(self) -> float:
        return 0.0


def generate_variants(adapter: Any, device: str, batches: tuple[int, ...], new_tokens: int, rounds: int) -> list[dict]:
    from test_capture_bench import run_generate

    from pixfound.attention import probe

    def fused_no_timer(batch: int) -> Any:
        original = probe.ImageAttentionCapture._reset

        def reset(self: Any) -> None:
            original(self)
            self.sink.timer = _NoTimer()

        with patched(probe.ImageAttentionCapture, "_reset", reset):
            return run_generate(adapter, "fused", batch, new_tokens, adapter_image_size(adapter))

    def fused_bookkeeping(batch: int) -> Any:
        with patched(probe.ImageAttentionCapture, "_op", _bookkeeping_only):
            return run_generate(adapter, "fused", batch, new_tokens, adapter_image_size(adapter))

    variants: dict[str, Callable[[int], Any]] = {
        "plain": lambda b: run_generate(adapter, "plain", b, new_tokens, adapter_image_size(adapter)),
        "fused": lambda b: run_generate(adapter, "fused", b, new_tokens, adapter_image_size(adapter)),
        "fused, no in-layer timer": fused_no_timer,
        "fused, bookkeeping only": fused_bookkeeping,
    }
    rows = []
    for batch in batches:
        for fn in variants.values():  # warm-up: kernel specialisations, cuBLAS heuristics
            fn(batch)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):  # interleaved, so a slow spell hits every variant alike
            for name, fn in variants.items():
                sync(device)
                started = time.perf_counter()
                fn(batch)
                sync(device)
                times[name].append(time.perf_counter() - started)
        plain = min(times["plain"])
        for name, values in times.items():
            best = min(values)
            rows.append(dict(batch=batch, variant=name, best_s=best, median_s=statistics.median(values),
                             ms_per_step=1000 * best / new_tokens, vs_plain=best / plain))
            log(f"  B={batch:<3} {name:<26} best {best:6.3f} s  {1000 * best / new_tokens:7.2f} ms/step  "
                f"x{best / plain:.3f} plain")
    return rows


def adapter_image_size(adapter: Any) -> int:
    return int(adapter.model.config.vision_config.image_size)


def profile_generate(adapter: Any, device: str, batch: int, new_tokens: int, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    from test_capture_bench import run_generate

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        run_generate(adapter, "fused", batch, new_tokens, adapter_image_size(adapter))
        sync(device)
    averages = prof.key_averages()
    parts = [f"--- fused generate, batch {batch}, {new_tokens} new tokens: by self CPU time ---",
             averages.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)]
    if device == "cuda":
        parts += ["--- by self CUDA time ---",
                  averages.table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--small", action="store_true", help="tiny model and shapes (CPU test)")
    parser.add_argument("--new-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import gpu_bench

    small = args.small or device == "cpu"
    spec = gpu_bench.LLAVA_SMALL if small else gpu_bench.LLAVA_1_5_7B
    dtype = torch.float16 if device == "cuda" else torch.float32
    log(f"device {device}" + (f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else "") +
        f", torch {torch.__version__}")
    log("== kernel alone at decode shapes")
    if small:
        kernel_micro(device, (1, 2), heads=2, head_dim=16, keys=40, image=16, calls=3)
    else:
        kernel_micro(device, (1, 32), heads=32, head_dim=128, keys=650, image=576, calls=200)
    log("== one decode step's capture: layered launch vs one launch per layer")
    if small:
        layered_micro(device, (2,), layers=3, heads=2, head_dim=16, keys=40, image=16, calls=2)
    else:
        layered_micro(device, (1, 32), layers=32, heads=32, head_dim=128, keys=650, image=576, calls=50)
    log("== a window of decode steps: row-block kernel vs one launch per step")
    if small:
        window_micro(device, (2,), layers=2, heads=2, head_dim=16, keys=40, image=16, steps=3, calls=1)
    else:
        window_micro(device, (1, 32), layers=32, heads=32, head_dim=128, keys=650, image=576, steps=32, calls=5)
    started = time.perf_counter()
    adapter = gpu_bench.build_llava_adapter(spec, device, dtype)
    log(f"== built {spec.name} in {time.perf_counter() - started:.1f} s")
    new_tokens = args.new_tokens or (3 if small else 32)
    log(f"== generate, {new_tokens} new tokens")
    generate_variants(adapter, device, (1, 2) if small else (1, 32), new_tokens, rounds=1 if small else 2)
    log("== profiler")
    log(profile_generate(adapter, device, 2 if small else 32, 2 if small else 8, top=12 if small else 25))


if __name__ == "__main__":
    main()
