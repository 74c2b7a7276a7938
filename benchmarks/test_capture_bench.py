"""Capture: one image map per generated token, against its reference and against generation without it.

* The op alone (``pixfound::image_attention``): one call for every layer of a decode step (the
  C++ core on the CPU, Triton on CUDA) against the torch reference of
  ``pixfound.ops.attention_reference`` summed over the layers, with SDPA's own attention on the
  same shapes as a yardstick; and a window of 32 decode steps in one call, as the capture makes
  it, against one call per step.
* ``generate``: the fused capture against the reference capture (eager attention with
  ``output_attentions``, as published) and against plain SDPA generation without capture (the
  limit), same model, images and prompt, greedy.
* Peak memory of ``generate`` per mode over batch sizes and prompt lengths (printed with ``-s``;
  on the CPU one process per mode, peak RSS; on CUDA ``torch.cuda.max_memory_allocated``).

The model setting is ``PIXFOUND_BENCH_CAPTURE``: ``small`` (default, about a minute on one CPU
core), ``medium`` or ``llava-1.5-7b`` (see :data:`SETTINGS`). The random models come from
``pixfound.models.tiny.build_random_llava`` through ``_helpers.build_llava``.

Run: python -m pytest benchmarks/test_capture_bench.py --benchmark-group-by=group -s
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from _helpers import (CAPTURE_IMAGE_HW, CAPTURE_MODES, LLAVA_SIZES, MIB, build_llava, capture_memory_in_subprocess,
                      capture_memory_points, run_generate, synchronized, synthetic_samples)
from pixfound.ops.attention import image_attention
from pixfound.ops.attention_reference import image_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True)
class CaptureSetting:
    size: str  # a key of _helpers.LLAVA_SIZES
    batch: int
    new_tokens: int
    memory_batches: tuple[int, ...]
    memory_extra_prompt_tokens: tuple[int, ...]  # at batch `batch`: the sequence axis of the memory curve
    rounds: int = 3

    def describe(self) -> str:
        return f"{LLAVA_SIZES[self.size].describe()}, batch {self.batch}, {self.new_tokens} new tokens"


SETTINGS = {
    "small": CaptureSetting("small", batch=2, new_tokens=8, memory_batches=(1, 2), memory_extra_prompt_tokens=(512,)),
    "medium": CaptureSetting("medium", batch=4, new_tokens=64, memory_batches=(1, 2, 4, 8),
                             memory_extra_prompt_tokens=(512, 1024)),
    "llava-1.5-7b": CaptureSetting("llava-1.5-7b", batch=8, new_tokens=64, memory_batches=(1, 8, 32),
                                   memory_extra_prompt_tokens=()),
}
GENERATE_ROLES = {"fused": "fast", "reference": "reference", "plain": "limit"}


def selected_setting() -> CaptureSetting:
    name = os.environ.get("PIXFOUND_BENCH_CAPTURE", "small")
    if name not in SETTINGS:
        raise ValueError(f"PIXFOUND_BENCH_CAPTURE must be one of {sorted(SETTINGS)}, got {name!r}")
    return SETTINGS[name]


# ------------------------------------------------------------------------------------------------
# the op alone
# ------------------------------------------------------------------------------------------------
# (batch, query heads, kv heads, head dim, keys, image keys, layers, dtype): a decode step of the
# medium model on the CPU, of LLaVA-1.5-7B at batch 32 on CUDA.
OP_SHAPE = ((32, 32, 32, 128, 650, 576, 32, torch.float16) if DEVICE == "cuda"
            else (4, 8, 8, 64, 650, 576, 8, torch.float32))
WINDOW = 32  # decode steps per call, as the capture's window


def decode_inputs(steps: int) -> dict:
    """Queries of ``steps`` decode steps and the keys of every layer; step s sees the keys up to its position."""
    batch, heads, kv_heads, head_dim, num_keys, num_image, layers, dtype = OP_SHAPE
    gen = torch.Generator().manual_seed(steps)
    padding = torch.arange(batch) * 3  # left padding differs per sample
    ends = num_keys - steps + 1 + torch.arange(steps)
    return dict(
        queries=[torch.randn(batch, heads, steps, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(layers)],
        keys=[torch.randn(batch, kv_heads, num_keys, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(layers)],
        scales=[head_dim**-0.5] * layers, image_start=(padding + 5).to(DEVICE),
        image_len=torch.full((batch,), num_image, device=DEVICE), key_start=padding.to(DEVICE),
        key_end=ends.expand(batch, steps).contiguous().to(DEVICE),
    )


def fused_op(inputs: dict) -> torch.Tensor:
    # The capture's call: no index validation (no host sync), the width given.
    return image_attention(**inputs, num_image_keys=OP_SHAPE[5], validate=False)


def one_call_per_step(inputs: dict) -> torch.Tensor:
    steps = inputs["queries"][0].shape[2]
    return torch.cat([fused_op(dict(inputs, queries=[q[:, :, s:s + 1] for q in inputs["queries"]],
                                     key_end=inputs["key_end"][:, s:s + 1])) for s in range(steps)], dim=1)


def reference_op(inputs: dict) -> torch.Tensor:
    common = {name: inputs[name] for name in ("image_start", "image_len", "key_start", "key_end")}
    return sum(image_attention_reference(q, k, scale=scale, num_image_keys=OP_SHAPE[5], validate=False, **common)
               for q, k, scale in zip(inputs["queries"], inputs["keys"], inputs["scales"]))


def sdpa_same_shapes(inputs: dict) -> list:
    # Keys stand in for values: the shapes are what matters.
    return [F.scaled_dot_product_attention(q, k, k) for q, k in zip(inputs["queries"], inputs["keys"])]


OP_VARIANTS = {"fused op, one call": ("fast", fused_op), "torch reference": ("reference", reference_op),
               "sdpa, same shapes": ("other", sdpa_same_shapes)}
WINDOW_VARIANTS = {"fused op, one call for the window": ("fast", fused_op),
                   "fused op, one call per step": ("other", one_call_per_step),
                   "torch reference": ("reference", reference_op)}


def _op_group(steps: int) -> str:
    batch, heads, kv_heads, head_dim, num_keys, num_image, layers, dtype = OP_SHAPE
    return (f"capture op, {steps} decode step(s) x {layers} layers, batch {batch}, {heads}/{kv_heads} heads x "
            f"{head_dim}, {num_keys} keys ({num_image} image), {str(dtype)[6:]} on {DEVICE}")


def _run_op(benchmark, record_ratio, variants: dict, variant: str, steps: int) -> None:
    role, fn = variants[variant]
    inputs = decode_inputs(steps)
    run = synchronized(lambda: fn(inputs), DEVICE)
    result = benchmark.pedantic(run, rounds=20 if DEVICE == "cuda" else 5, iterations=1, warmup_rounds=1)
    record_ratio(variant, role)
    if fn is sdpa_same_shapes:
        assert len(result) == OP_SHAPE[6]
    else:  # summed over the layers: each adds its rounding
        torch.testing.assert_close(result, reference_op(inputs), atol=1e-5 * OP_SHAPE[6], rtol=1e-4)


@pytest.mark.benchmark(group=_op_group(1))
@pytest.mark.parametrize("variant", OP_VARIANTS)
def test_capture_op_one_step(benchmark, record_ratio, variant):
    _run_op(benchmark, record_ratio, OP_VARIANTS, variant, steps=1)


@pytest.mark.benchmark(group=_op_group(WINDOW))
@pytest.mark.parametrize("variant", WINDOW_VARIANTS)
def test_capture_op_window(benchmark, record_ratio, variant):
    _run_op(benchmark, record_ratio, WINDOW_VARIANTS, variant, steps=WINDOW)


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter():
    return build_llava(selected_setting().size, device=DEVICE, dtype="float16" if DEVICE == "cuda" else "float32")


@pytest.mark.parametrize("mode", CAPTURE_MODES)
def test_capture_generate(benchmark, record_ratio, adapter, mode):
    setting = selected_setting()
    benchmark.group = f"generate with capture: {setting.describe()}, on {DEVICE}"
    samples = synthetic_samples(setting.batch, CAPTURE_IMAGE_HW)
    run = synchronized(lambda: run_generate(adapter, mode, samples, setting.new_tokens), DEVICE)
    generations = benchmark.pedantic(run, rounds=setting.rounds, warmup_rounds=1, iterations=1)
    record_ratio(mode, GENERATE_ROLES[mode])
    assert all(0 < len(g.token_ids) <= setting.new_tokens for g in generations)
    if mode != "plain":
        side = LLAVA_SIZES[setting.size].image_size // LLAVA_SIZES[setting.size].patch_size
        assert all(g.maps.shape == (len(g.token_ids), side, side) for g in generations)


def format_memory(rows: list[dict]) -> str:
    """One line per point: each mode's peak (and its growth during generate), and the ratios."""
    lines = ["| batch | prompt tokens | new tokens | plain MiB (+gen) | fused MiB (+gen) | reference MiB (+gen) "
             "| fused / plain | reference / fused (+gen) |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        plain, fused, reference = (row[mode] for mode in CAPTURE_MODES)

        def mib(point: dict) -> str:
            return f"{point['peak_bytes'] / MIB:.0f} (+{(point['peak_bytes'] - point['before_bytes']) / MIB:.0f})"

        growth = ((reference["peak_bytes"] - reference["before_bytes"])
                  / max(fused["peak_bytes"] - fused["before_bytes"], 1))
        lines.append(f"| {row['batch']} | {row['prompt_tokens']} | {row['new_tokens']} | {mib(plain)} | {mib(fused)} "
                     f"| {mib(reference)} | {fused['peak_bytes'] / plain['peak_bytes']:.3f} | {growth:.1f} |")
    return "\n".join(lines + [f"peak: {rows[0]['plain']['measure']}; +gen: growth during generate"])


def test_capture_peak_memory(adapter):
    setting = selected_setting()
    points = [(batch, 0) for batch in setting.memory_batches]
    points += [(setting.batch, extra) for extra in setting.memory_extra_prompt_tokens]
    if DEVICE == "cuda":  # the allocator's own peak: exact within this process
        by_mode = {mode: capture_memory_points(setting.size, mode, points, setting.new_tokens, "cuda", "float16",
                                               adapter=adapter) for mode in CAPTURE_MODES}
    else:
        by_mode = {mode: capture_memory_in_subprocess(setting.size, mode, points, setting.new_tokens)
                   for mode in CAPTURE_MODES}
    if any(point["peak_bytes"] is None for points_of_mode in by_mode.values() for point in points_of_mode):
        pytest.skip("the peak resident set cannot be reset on this machine (/proc/self/clear_refs)")
    rows = [dict(batch=batch, prompt_tokens=by_mode["plain"][i]["prompt_tokens"], new_tokens=setting.new_tokens,
                 **{mode: by_mode[mode][i] for mode in CAPTURE_MODES}) for i, (batch, _) in enumerate(points)]
    print(f"\npeak memory of generate, {setting.describe()}, on {DEVICE}\n{format_memory(rows)}")
    for row in rows:
        if DEVICE == "cpu":  # fp32: the capture does not change the answer
            assert row["fused"]["token_ids"] == row["plain"]["token_ids"] == row["reference"]["token_ids"]
        assert all(row[mode]["peak_bytes"] > row[mode]["before_bytes"] > 0 for mode in CAPTURE_MODES)
