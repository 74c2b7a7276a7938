"""Upsample + peak: the fused op (``pixfound.ops.upsample_peaks``: the C++ core on the CPU, Triton on
CUDA) against its torch reference (``pixfound.ops.upsample_peaks_reference``: bicubic
``F.interpolate`` to the padded square, centre crop, argmax, as the published code does).

32 phrase maps of 24 × 24 to a 1024 × 768 image (H = 768, W = 1024, pad mode: the reference
upsamples to 1024 × 1024 before cropping), one peak each. On CUDA each variant also records in
``extra_info`` the memory it allocates above the start: the reference holds the [G, H, W] maps,
the fused op never does.

Run: python -m pytest benchmarks/test_upsample_peak_bench.py --benchmark-group-by=group
"""
from __future__ import annotations

import pytest
import torch

from _helpers import PeakMemory, synchronized
from pixfound.ops import upsample_peaks, upsample_peaks_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAPS, GRID, SIZE = 32, (24, 24), (768, 1024)
GROUP = f"upsample + peak, {MAPS} maps {GRID[0]} x {GRID[1]} -> {SIZE[1]} x {SIZE[0]}, pad, on {DEVICE}"
VARIANTS = {"fused (auto backend)": "fast", "torch reference": "reference"}


@pytest.fixture(scope="module")
def maps() -> torch.Tensor:
    return torch.randn(MAPS, *GRID, generator=torch.Generator().manual_seed(0)).to(DEVICE)


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("variant", VARIANTS)
def test_upsample_peak(benchmark, record_ratio, maps, variant):
    if variant == "torch reference":
        run = synchronized(lambda: upsample_peaks_reference(maps, SIZE, aspect="pad"), DEVICE)
    else:
        run = synchronized(lambda: upsample_peaks(maps, SIZE, aspect="pad"), DEVICE)
    run()  # compiles the Triton kernels on a GPU
    if DEVICE == "cuda":
        with PeakMemory(DEVICE) as memory:
            run()
        benchmark.extra_info.update(device=torch.cuda.get_device_name(), full_maps_bytes=MAPS * SIZE[0] * SIZE[1] * 4,
                                    extra_bytes=memory.peak_bytes - memory.before_bytes)
    peaks = benchmark.pedantic(run, rounds=20 if DEVICE == "cuda" else 5, iterations=1, warmup_rounds=1)
    record_ratio(variant, VARIANTS[variant])
    _, upsampled = upsample_peaks_reference(maps, SIZE, aspect="pad", return_maps=True)
    x, y = peaks[:, 0, 0], peaks[:, 0, 1]
    chosen = upsampled[torch.arange(MAPS, device=upsampled.device), y, x]
    # Rounding may differ from torch's bicubic in the last bits: a peak may be any near-tie of the maximum.
    torch.testing.assert_close(chosen, upsampled.flatten(1).max(dim=1).values, atol=1e-5, rtol=0)
