"""Top-k peaks: the C++ core against its torch reference (``pixfound.ops.topk_peaks_reference``) and ``torch.topk``.

32 maps of 1024 × 768, the 5 highest locations each, ties to the lowest flat index (``torch.argmax``'s
rule; ``torch.topk`` has no tie rule, so it is a yardstick, not a reference).

Run: python -m pytest benchmarks/test_peaks_bench.py --benchmark-group-by=group
"""
from __future__ import annotations

import pytest
import torch

from pixfound import ops

MAPS, HEIGHT, WIDTH, K = 32, 1024, 768, 5
GROUP = f"top-{K} peaks of {MAPS} maps {WIDTH} x {HEIGHT}"
VARIANTS = {"cpp": "fast", "torch reference": "reference", "torch.topk": "other"}


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("variant", VARIANTS)
def test_topk_peaks(benchmark, record_ratio, variant):
    maps = torch.randn(MAPS, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))
    expected = torch.topk(maps.reshape(MAPS, -1), K, dim=1).indices  # random maps: no ties
    if variant == "cpp":
        peaks = benchmark(ops.topk_peaks, maps, K)
    elif variant == "torch reference":
        peaks = benchmark.pedantic(ops.topk_peaks_reference, args=(maps, K), rounds=3, iterations=1)
    else:
        indices = benchmark(lambda: torch.topk(maps.reshape(MAPS, -1), K, dim=1).indices)
        peaks = torch.stack((indices % WIDTH, indices // WIDTH), dim=-1)
    record_ratio(variant, VARIANTS[variant])
    torch.testing.assert_close(peaks[..., 1] * WIDTH + peaks[..., 0], expected)
