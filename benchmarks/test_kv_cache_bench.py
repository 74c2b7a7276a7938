"""The key/value cache update of one decode step over 32 layers: pixfound's preallocated layer
against transformers' concatenating DynamicLayer (the reference: same values, a new tensor per step).

At batch 1 on a GPU the decode step is host-bound, so the update's own host time counts (it runs
per layer and step, in plain and fused generation alike).

Run: pytest benchmarks/test_kv_cache_bench.py --benchmark-group-by=group
"""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from pixfound.models.kv_cache import PreallocatedLayer

LAYERS, HEADS, HEAD_DIM, PROMPT, STEPS = 32, 32, 4, 600, 64


def _filled_layers(kind: str) -> list:
    layers = [PreallocatedLayer(PROMPT + STEPS + 1) if kind == "preallocated" else DynamicLayer() for _ in range(LAYERS)]
    prompt = torch.zeros(1, HEADS, PROMPT, HEAD_DIM)
    for layer in layers:
        layer.update(prompt, prompt)
    return layers


@pytest.mark.benchmark(group=f"kv cache: {STEPS} decode steps x {LAYERS} layers, batch 1")
@pytest.mark.parametrize("kind", ["preallocated", "dynamic"])
def test_decode_updates(benchmark, kind):
    step_keys = torch.arange(HEADS * HEAD_DIM, dtype=torch.float32).reshape(1, HEADS, 1, HEAD_DIM)

    def decode(layers: list) -> list:
        for _ in range(STEPS):
            for layer in layers:
                layer.update(step_keys, step_keys)
        return layers

    layers = benchmark.pedantic(decode, setup=lambda: ((_filled_layers(kind),), {}), rounds=15, iterations=1)
    assert all(layer.keys.shape == (1, HEADS, PROMPT + STEPS, HEAD_DIM) for layer in layers)
    assert torch.equal(layers[-1].keys[:, :, PROMPT:], step_keys.expand(1, HEADS, STEPS, HEAD_DIM))
