"""Triton kernels of ``pixfound::upsample_peaks`` (fused bicubic upsample + top-k peak) and their launcher.

The op's contract, argument checks and torch reference are in :mod:`pixfound.ops.upsample_peaks`.
Two passes never write the ``[G, H, W]`` upsampled maps to memory unless asked to:

1. ``_upsample_tile_topk_kernel``: one program per (tile of the cropped output, map). It
   evaluates the 4x4-tap bicubic (A = -0.75, clamped borders, the source index of
   ``interpolate(..., align_corners=False)``) for its tile and keeps the tile's k best
   (value, flat index) pairs, ties to the lowest flat index.
2. ``_merge_tile_topk_kernel``: one program per map reduces the ``[tiles * k]`` candidates to
   the k best and writes (x, y). It also checks the map's input values for NaN/inf (one int32
   flag), so that the caller's only wait for the GPU comes after both launches.

Ordering is "value descending, then flat index ascending", ``torch.argmax``'s tie rule; both
passes use it, so the tiling never changes the answer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from pixfound.triton_kernels import interpreting

__all__ = ["DECORATED_FOR_INTERPRETER", "MAX_TRITON_K", "NO_INDEX", "upsample_peaks_triton"]

#: Largest k the kernels keep per tile.
MAX_TRITON_K = 8
#: Flat indices are int32 inside the kernels; this also marks "no candidate" (so H * W must stay below it).
NO_INDEX = 2**31 - 1
# Grid axis 1 (maps) is limited to 65535 programs on CUDA.
_MAX_MAPS_PER_LAUNCH = 65535


@triton.jit
def _upsample_tile_topk_kernel(
    maps_ptr,  # float32 [G, in_h, in_w], contiguous
    cand_val_ptr,  # float32 [G, n_tiles, K]
    cand_idx_ptr,  # int32 [G, n_tiles, K]; NO_INDEX = no candidate
    out_maps_ptr,  # float32 [G, out_h, out_w], written only when STORE_MAPS
    in_h,
    in_w,
    out_h,
    out_w,
    top,
    left,
    scale_y,
    scale_x,
    n_tiles_x,
    n_tiles,
    K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    STORE_MAPS: tl.constexpr,
    NO_INDEX: tl.constexpr,
):
    tile = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    rows = (tile // n_tiles_x) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = (tile % n_tiles_x) * BLOCK_W + tl.arange(0, BLOCK_W)

    # Source coordinates as interpolate(align_corners=False) computes them for cubic:
    # src = scale * (dst + 0.5) - 0.5 in the full (uncropped) grid, not clamped; the
    # integer part is capped at size - 1 and the fraction clamped to [0, 1].
    # (Written inline: helper @jit calls cost ~1 ms each in the interpreter.)
    src_y = scale_y * ((rows + top).to(tl.float32) + 0.5) - 0.5
    base_y = tl.minimum(tl.floor(src_y).to(tl.int32), in_h - 1)
    t_y = tl.minimum(tl.maximum(src_y - base_y.to(tl.float32), 0.0), 1.0)
    src_x = scale_x * ((cols + left).to(tl.float32) + 0.5) - 0.5
    base_x = tl.minimum(tl.floor(src_x).to(tl.int32), in_w - 1)
    t_x = tl.minimum(tl.maximum(src_x - base_x.to(tl.float32), 0.0), 1.0)

    # Keys cubic convolution, A = -0.75 (torch's get_cubic_upsample_coefficients):
    #   |d| <= 1: ((A + 2) d - (A + 3)) d^2 + 1;   1 < |d| < 2: ((A d - 5A) d + 8A) d - 4A
    # at the tap distances t + 1, t, 1 - t, (1 - t) + 1.
    s_x = 1.0 - t_x
    d0_x = t_x + 1.0
    d3_x = s_x + 1.0
    wx0 = ((-0.75 * d0_x + 3.75) * d0_x - 6.0) * d0_x + 3.0
    wx1 = ((1.25 * t_x - 2.25) * t_x) * t_x + 1.0
    wx2 = ((1.25 * s_x - 2.25) * s_x) * s_x + 1.0
    wx3 = ((-0.75 * d3_x + 3.75) * d3_x - 6.0) * d3_x + 3.0
    s_y = 1.0 - t_y
    d0_y = t_y + 1.0
    d3_y = s_y + 1.0
    wy0 = ((-0.75 * d0_y + 3.75) * d0_y - 6.0) * d0_y + 3.0
    wy1 = ((1.25 * t_y - 2.25) * t_y) * t_y + 1.0
    wy2 = ((1.25 * s_y - 2.25) * s_y) * s_y + 1.0
    wy3 = ((-0.75 * d3_y + 3.75) * d3_y - 6.0) * d3_y + 3.0

    # Tap addresses clamped to the border (also keeps rows/cols past the edge in bounds).
    cx0 = tl.minimum(tl.maximum(base_x - 1, 0), in_w - 1)[None, :]
    cx1 = tl.minimum(tl.maximum(base_x, 0), in_w - 1)[None, :]
    cx2 = tl.minimum(tl.maximum(base_x + 1, 0), in_w - 1)[None, :]
    cx3 = tl.minimum(tl.maximum(base_x + 2, 0), in_w - 1)[None, :]
    src = maps_ptr + g * in_h * in_w

    # Same order as torch's CPU loop: interpolate each of the 4 source rows along x,
    # then combine the rows along y.
    value = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    for j in tl.static_range(4):
        if j == 0:
            wy = wy0
        elif j == 1:
            wy = wy1
        elif j == 2:
            wy = wy2
        else:
            wy = wy3
        ry = tl.minimum(tl.maximum(base_y + (j - 1), 0), in_h - 1)
        row_ptr = src + (ry * in_w)[:, None]
        along_x = tl.load(row_ptr + cx0) * wx0[None, :]
        along_x += tl.load(row_ptr + cx1) * wx1[None, :]
        along_x += tl.load(row_ptr + cx2) * wx2[None, :]
        along_x += tl.load(row_ptr + cx3) * wx3[None, :]
        if j == 0:
            value = along_x * wy[:, None]
        else:
            value += along_x * wy[:, None]

    inside = (rows < out_h)[:, None] & (cols < out_w)[None, :]
    flat = rows[:, None] * out_w + cols[None, :]
    if STORE_MAPS:
        tl.store(out_maps_ptr + g * out_h * out_w + flat, value, mask=inside)

    value = tl.where(inside, value, float("-inf"))
    flat = tl.where(inside, flat, NO_INDEX)
    cand = (g * n_tiles + tile) * K
    # k rounds of "best (value desc, index asc) strictly after the previous pick".
    for r in tl.static_range(K):
        if r == 0:
            pool_val = value
            pool_idx = flat
        else:
            after = (value < best_val) | ((value == best_val) & (flat > best_idx))
            pool_val = tl.where(after, value, float("-inf"))
            pool_idx = tl.where(after, flat, NO_INDEX)
        best_val = tl.max(tl.max(pool_val, axis=1), axis=0)
        best_idx = tl.min(tl.min(tl.where(pool_val == best_val, pool_idx, NO_INDEX), axis=1), axis=0)
        tl.store(cand_val_ptr + cand + r, best_val)
        tl.store(cand_idx_ptr + cand + r, best_idx)


@triton.jit
def _merge_tile_topk_kernel(
    cand_val_ptr,  # float32 [G, n_cand]
    cand_idx_ptr,  # int32 [G, n_cand]
    peaks_ptr,  # int64 [G, K, 2] as (x, y)
    maps_ptr,  # float32 [G, map_numel], read only when CHECK_FINITE
    nonfinite_ptr,  # int32 [1], set to 1 when CHECK_FINITE finds NaN or inf in any map
    n_cand,
    out_w,
    map_numel,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    NO_INDEX: tl.constexpr,
    CHECK_FINITE: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    if CHECK_FINITE:  # here rather than before the launch: a host check would wait for the GPU first
        found = tl.zeros([BLOCK], tl.int32)
        for start in range(0, map_numel, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(maps_ptr + g * map_numel + offs, mask=offs < map_numel, other=0.0)
            found = tl.maximum(found, ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32))
        tl.atomic_max(nonfinite_ptr, tl.max(found, axis=0))
    vals_ptr = cand_val_ptr + g * n_cand
    idx_ptr = cand_idx_ptr + g * n_cand
    for r in tl.static_range(K):
        # Per-lane running best over the chunks, then one reduction across lanes.
        lane_val = tl.full([BLOCK], float("-inf"), tl.float32)
        lane_idx = tl.full([BLOCK], NO_INDEX, tl.int32)
        for start in range(0, n_cand, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < n_cand
            val = tl.load(vals_ptr + offs, mask=ok, other=float("-inf"))
            idx = tl.load(idx_ptr + offs, mask=ok, other=NO_INDEX)
            if r > 0:
                after = (val < best_val) | ((val == best_val) & (idx > best_idx))
                val = tl.where(after, val, float("-inf"))
                idx = tl.where(after, idx, NO_INDEX)
            better = (val > lane_val) | ((val == lane_val) & (idx < lane_idx))
            lane_val = tl.where(better, val, lane_val)
            lane_idx = tl.where(better, idx, lane_idx)
        best_val = tl.max(lane_val, axis=0)
        best_idx = tl.min(tl.where(lane_val == best_val, lane_idx, NO_INDEX), axis=0)
        flat = best_idx.to(tl.int64)
        tl.store(peaks_ptr + (g * K + r) * 2, flat % out_w)
        tl.store(peaks_ptr + (g * K + r) * 2 + 1, flat // out_w)


# Whether the kernels above were decorated under TRITON_INTERPRET=1 (Triton decides at decoration):
# only then can CPU tensors be handed to them.
DECORATED_FOR_INTERPRETER = interpreting()


def _default_blocks(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_W, num_warps). The interpreter (CPU tensors) pays ~10 ms per
    program whatever its size, so it gets big tiles; a GPU wants many small ones."""
    if device.type == "cpu":
        return 128, 256, 4
    return 16, 64, 4


def upsample_peaks_triton(
    maps32: torch.Tensor,
    window: Sequence[int],
    k: int,
    return_maps: bool,
    *,
    nonfinite: torch.Tensor | None = None,
    block_h: int | None = None,
    block_w: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both passes on checked float32 maps ``[G, h, w]``: int64 peaks ``[G, k, 2]`` as (x, y), and the maps or None.

    ``window`` is ``(full_h, full_w, top, left, out_h, out_w)``: ``interpolate`` upsamples to
    ``full_h x full_w`` and the ``out_h x out_w`` crop starts at (``top``, ``left``). ``k`` is at most
    :data:`MAX_TRITON_K` and ``out_h * out_w`` below :data:`NO_INDEX`. With ``nonfinite`` (int32 ``[1]``,
    zero), the merge pass sets it to 1 if any map holds NaN or inf. Block sizes are overridable for tests.
    """
    full_h, full_w, top, left, out_h, out_w = (int(v) for v in window)
    if maps32.device.type == "cpu" and not DECORATED_FOR_INTERPRETER:
        raise RuntimeError(
            "the upsample_peak kernels were compiled for the GPU: set TRITON_INTERPRET=1 before "
            "importing pixfound.triton_kernels to run them on CPU tensors"
        )
    if not 1 <= k <= MAX_TRITON_K or out_h * out_w >= NO_INDEX:
        raise ValueError(f"the Triton upsample keeps 1..{MAX_TRITON_K} peaks of fewer than 2**31 pixels, "
                         f"got k={k} for {out_h}x{out_w}")
    default_h, default_w, num_warps = _default_blocks(maps32.device)
    block_h = block_h or default_h
    block_w = block_w or default_w
    maps32 = maps32.contiguous()
    n_maps, in_h, in_w = maps32.shape
    n_tiles_x = triton.cdiv(out_w, block_w)
    n_tiles = triton.cdiv(out_h, block_h) * n_tiles_x
    device = maps32.device

    cand_val = torch.empty((n_maps, n_tiles, k), dtype=torch.float32, device=device)
    cand_idx = torch.empty((n_maps, n_tiles, k), dtype=torch.int32, device=device)
    peaks = torch.empty((n_maps, k, 2), dtype=torch.int64, device=device)
    out_maps = torch.empty((n_maps, out_h, out_w), dtype=torch.float32, device=device) if return_maps else None
    # torch computes the scale in float32 as in_size / out_size (no scale_factor given).
    scale_y = float(np.float32(in_h) / np.float32(full_h))
    scale_x = float(np.float32(in_w) / np.float32(full_w))
    n_cand = n_tiles * k
    merge_block = min(max(triton.next_power_of_2(n_cand), 16), 1024)

    for first in range(0, n_maps, _MAX_MAPS_PER_LAUNCH):
        last = min(first + _MAX_MAPS_PER_LAUNCH, n_maps)
        chunk_maps = out_maps[first:last] if out_maps is not None else cand_val[first:last]
        _upsample_tile_topk_kernel[(n_tiles, last - first)](
            maps32[first:last], cand_val[first:last], cand_idx[first:last], chunk_maps,
            in_h, in_w, out_h, out_w, top, left, scale_y, scale_x, n_tiles_x, n_tiles,
            K=k, BLOCK_H=block_h, BLOCK_W=block_w, STORE_MAPS=return_maps, NO_INDEX=NO_INDEX, num_warps=num_warps,
        )
    _merge_tile_topk_kernel[(n_maps,)](
        cand_val, cand_idx, peaks, maps32,
        nonfinite if nonfinite is not None else cand_idx,  # any int32 tensor when unused
        n_cand, out_w, in_h * in_w,
        K=k, BLOCK=merge_block, NO_INDEX=NO_INDEX, CHECK_FINITE=nonfinite is not None, num_warps=4,
    )
    return peaks, out_maps
