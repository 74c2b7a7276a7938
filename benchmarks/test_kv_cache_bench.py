"""Key/value cache update of one decode step over 32 layers: pixfound's preallocated layer against
transformers' ``DynamicLayer`` (the reference: the same values, a new concatenated tensor per step).

At batch 1 on a GPU a decode step is bound by host time, and this update runs per layer and step
in plain and fused generation alike, so its host time counts.

Run: python -m pytest benchmarks/test_kv_cache_bench.py --benchmark-group-by=group
"""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from pixfound.models.kv_cache import PreallocatedLayer

LAYERS, HEADS, HEAD_DIM, PROMPT, STEPS = 32, 32, 4, 600, 64
GROUP = f"kv cache: {STEPS} decode steps x {LAYERS} layers, batch 1, {PROMPT}-token prompt"
VARIANTS = {"preallocated": "fast", "transformers DynamicLayer": "reference"}


def filled_layers(variant: str) -> list:
    layers = [PreallocatedLayer(PROMPT + STEPS + 1) if variant == "preallocated" else DynamicLayer()
              for _ in range(LAYERS)]
    prompt = torch.zeros(1, HEADS, PROMPT, HEAD_DIM)
    for layer in layers:
        layer.update(prompt, prompt)
    return layers


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_updates(benchmark, record_ratio, variant):
    step_keys = torch.arange(HEADS * HEAD_DIM, dtype=torch.float32).reshape(1, HEADS, 1, HEAD_DIM)

    def decode(layers: list) -> list:
        for _ in range(STEPS):
            for layer in layers:
                layer.update(step_keys, step_keys)
        return layers

    layers = benchmark.pedantic(decode, setup=lambda: ((filled_layers(variant),), {}), rounds=15, iterations=1)
    record_ratio(variant, VARIANTS[variant])
    assert all(layer.keys.shape == (1, HEADS, PROMPT + STEPS, HEAD_DIM) for layer in layers)
    assert torch.equal(layers[-1].keys[:, :, PROMPT:], step_keys.expand(1, HEADS, STEPS, HEAD_DIM))
