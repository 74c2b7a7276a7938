"""Fused bicubic upsample + top-k peak of phrase attention maps.

PixFoundation turns each phrase's low-resolution attention map ``[h, w]`` into a point
prompt: upsample it bicubically to the original image (``pad`` mode: to the square
``S x S`` with ``S = max(H, W)``, then centre-crop to ``H x W``; ``original`` mode:
straight to ``H x W``) and take the argmax. The published code does exactly::

    up = F.interpolate(maps[None], (S, S), mode="bicubic", align_corners=False)[0]
    top, left = (S - H) // 2, (S - W) // 2
    up = up[:, top:top + H, left:left + W]
    flat = up.reshape(G, -1).argmax(1); x, y = flat % W, flat // W

(MSiam/PixFoundation, ``pixmmvp/inference/infer_pixfoundation.py``: ``crop_h_start =
(upsample_size - image_height) // 2``, same for the width.) This module holds

* the torch reference of that recipe (:func:`upsample_reference`,
  :func:`upsample_peaks_reference`), generalised to the k best pixels, and
* a two-pass Triton version (:func:`upsample_peaks`) that never writes the ``[G, H, W]``
  upsampled maps to memory unless ``return_maps=True``:

  1. ``_upsample_tile_topk_kernel``: one program per (tile of the cropped output, map).
     It evaluates the 4x4-tap bicubic (A = -0.75, clamped borders, the source index of
     ``interpolate(..., align_corners=False)``) for its tile and keeps the tile's k best
     (value, flat index) pairs, ties to the lowest flat index.
  2. ``_merge_tile_topk_kernel``: one program per map reduces the ``[tiles * k]``
     candidates to the k best and writes (x, y). It also checks the map's input values for
     NaN/inf (one int32 flag), so that the caller's only wait for the GPU comes after both
     launches: checking up front (``torch.isfinite(...).all()`` read on the host) left the GPU
     idle while the host prepared them.

Ordering is "value descending, then flat index ascending", which is ``torch.argmax``'s
tie rule (first maximal index); both passes use it, so the tiling never changes the
answer. Values are computed in float32. The fused kernel's arithmetic is the same
formula as torch's, but rounding can differ in the last bits (torch's own CPU builds
contract to FMA differently per instruction set, and its CUDA kernel differs again), so
two pixels whose values agree to ~1e-6 relative may swap; exact ties are always
resolved to the lowest flat index.

The Triton path keeps at most :data:`MAX_TRITON_K` peaks per tile; a larger k runs the
reference instead.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._backend import interpreting, resolve_backend, triton_available

__all__ = [
    "ASPECT_MODES",
    "MAX_TRITON_K",
    "upsample_peaks",
    "upsample_peaks_reference",
    "upsample_reference",
]

ASPECT_MODES = ("pad", "original")
#: Largest k the Triton path keeps per tile; above it :func:`upsample_peaks` uses the reference.
MAX_TRITON_K = 8
# Flat indices are int32 inside the kernels; this also marks "no candidate".
_NO_INDEX = 2**31 - 1
# Grid axis 1 (maps) is limited to 65535 programs on CUDA.
_MAX_MAPS_PER_LAUNCH = 65535
# Whether the kernels below were decorated under TRITON_INTERPRET=1 (Triton decides at
# decoration, so CPU tensors can only use them if this is True).
_DECORATED_FOR_INTERPRETER = False


# --------------------------------------------------------------------------------------
# Validation and geometry (shared by both paths)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """Where the cropped ``out_h x out_w`` window sits in the virtual upsampled grid."""

    full_h: int  # size interpolate() upsamples to
    full_w: int
    top: int  # crop offset inside the full grid
    left: int
    out_h: int  # = original image size (H, W)
    out_w: int


def _geometry(size: tuple[int, int], aspect: str) -> _Geometry:
    height, width = size
    if aspect == "pad":
        side = max(height, width)
        # Same integer centre as the published code: (S - H) // 2, (S - W) // 2.
        return _Geometry(side, side, (side - height) // 2, (side - width) // 2, height, width)
    return _Geometry(height, width, 0, 0, height, width)


def _check_size(size: object) -> tuple[int, int]:
    try:
        entries = list(size)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"size must be (H, W) of the original image, got {size!r}") from None
    if len(entries) != 2 or any(isinstance(v, bool) for v in entries):
        raise ValueError(f"size must be (H, W) of the original image, got {size!r}")
    try:
        height, width = (operator.index(v) for v in entries)
    except TypeError:
        raise ValueError(f"size must hold two integers (H, W), got {size!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive (H, W), got {(height, width)}")
    return height, width


def _check_maps(maps: object, *, finite: bool = True) -> torch.Tensor:
    """Validate ``maps`` and return it as float32 (values unchanged for fp16/bf16/fp32).

    ``finite=False`` leaves out the NaN/inf check (the Triton path checks inside its kernels and
    raises with :func:`_check_finite` after them).
    """
    if not isinstance(maps, torch.Tensor):
        raise ValueError(f"maps must be a torch.Tensor of shape [G, h, w], got {type(maps).__name__}")
    if maps.dim() != 3:
        raise ValueError(f"maps must have shape [G, h, w], got shape {tuple(maps.shape)}")
    if maps.numel() == 0:
        raise ValueError(f"maps must be non-empty, got shape {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise ValueError(f"maps must be a floating-point tensor, got dtype {maps.dtype}")
    maps32 = maps.to(torch.float32)
    if finite:
        _check_finite(maps32)
    return maps32


def _check_finite(maps32: torch.Tensor) -> None:
    """ValueError naming the maps with NaN or inf."""
    if not bool(torch.isfinite(maps32).all()):
        bad = (~torch.isfinite(maps32)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"maps must be finite (no NaN/inf); maps of shape {tuple(maps32.shape)} have "
            f"non-finite values in map(s) {bad[:10]}"
        )


def _check_args(maps: object, size: object, aspect: object, k: object, *, finite: bool = True
                ) -> tuple[torch.Tensor, _Geometry]:
    maps32 = _check_maps(maps, finite=finite)
    height, width = _check_size(size)
    if aspect not in ASPECT_MODES:
        raise ValueError(f"aspect must be one of {ASPECT_MODES}, got {aspect!r}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {k!r}")
    if not 1 <= k <= height * width:
        raise ValueError(f"k must be in [1, H*W] = [1, {height * width}] for size {(height, width)}, got {k}")
    return maps32, _geometry((height, width), aspect)  # type: ignore[arg-type]


def _flat_to_xy(flat: torch.Tensor, width: int) -> torch.Tensor:
    """Flat row-major indices ``[G, k]`` -> int64 ``[G, k, 2]`` as (x, y)."""
    flat = flat.to(torch.int64)
    return torch.stack((flat % width, flat // width), dim=-1)


# --------------------------------------------------------------------------------------
# Reference (torch): interpolate + crop + top-k with argmax's tie rule
# --------------------------------------------------------------------------------------


def _upsample_checked(maps32: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    full = F.interpolate(
        maps32[None], size=(geo.full_h, geo.full_w), mode="bicubic", align_corners=False
    )[0]
    return full[:, geo.top : geo.top + geo.out_h, geo.left : geo.left + geo.out_w].contiguous()


def _topk_lowest_index(flat_maps: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries per row of ``[G, N]``, best first, ties to the lowest index."""
    if k == 1:
        return flat_maps.argmax(dim=1, keepdim=True)  # documented: first maximal index
    # A stable sort keeps equal values in index order, so ties go to the lowest index.
    return torch.sort(flat_maps, dim=1, descending=True, stable=True).indices[:, :k]


def upsample_reference(
    maps: torch.Tensor, size: Sequence[int], *, aspect: str = "pad"
) -> torch.Tensor:
    """Upsample phrase maps to the original image, as the published PixFoundation code does.

    Args:
        maps: float tensor ``[G, h, w]`` (fp32/fp16/bf16; computed in float32), finite.
        size: ``(H, W)`` of the original image.
        aspect: ``"pad"`` (bicubic to ``S x S``, ``S = max(H, W)``, then the centre crop at
            ``top = (S - H) // 2``, ``left = (S - W) // 2``) or ``"original"`` (bicubic
            straight to ``H x W``). Bicubic is ``F.interpolate(mode="bicubic",
            align_corners=False)``.

    Returns:
        float32 ``[G, H, W]`` on the device of ``maps``.
    """
    maps32, geo = _check_args(maps, size, aspect, 1)
    return _upsample_checked(maps32, geo)


def _upsample_peaks_cpp(maps32: torch.Tensor, geo: _Geometry, k: int) -> torch.Tensor:
    """The C++ core's fused path (``pixfound._C.upsample_topk``) on validated float32 CPU maps."""
    from pixfound import _C

    peaks = _C.upsample_topk(maps32.detach().contiguous().numpy(), geo.full_h, geo.full_w, geo.top, geo.left,
                             geo.out_h, geo.out_w, k)
    return torch.from_numpy(peaks)


def upsample_peaks_reference(
    maps: torch.Tensor,
    size: Sequence[int],
    *,
    aspect: str = "pad",
    k: int = 1,
    return_maps: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`upsample_peaks`: :func:`upsample_reference` + top-k.

    Returns int64 ``[G, k, 2]`` peaks as (x, y) in original-image pixels, best first, ties
    to the lowest flat index (``torch.argmax``'s rule); with ``return_maps=True`` also the
    float32 ``[G, H, W]`` upsampled maps.
    """
    maps32, geo = _check_args(maps, size, aspect, k)
    upsampled = _upsample_checked(maps32, geo)
    flat = _topk_lowest_index(upsampled.reshape(upsampled.shape[0], -1), k)
    peaks = _flat_to_xy(flat, geo.out_w)
    return (peaks, upsampled) if return_maps else peaks


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _upsample_tile_topk_kernel(
        maps_ptr,  # float32 [G, in_h, in_w], contiguous
        cand_val_ptr,  # float32 [G, n_tiles, K]
        cand_idx_ptr,  # int32 [G, n_tiles, K]; _NO_INDEX = no candidate
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

    _DECORATED_FOR_INTERPRETER = interpreting()


def _default_blocks(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_W, num_warps). The interpreter (CPU tensors) pays ~10 ms per
    program whatever its size, so it gets big tiles; a GPU wants many small ones."""
    if device.type == "cpu":
        return 128, 256, 4
    return 16, 64, 4


def _upsample_peaks_triton(
    maps32: torch.Tensor,
    geo: _Geometry,
    k: int,
    return_maps: bool,
    *,
    block_h: int | None = None,
    block_w: int | None = None,
    nonfinite: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Both Triton passes on validated float32 maps (block sizes overridable for tests).

    With ``nonfinite`` (int32 ``[1]``, zero), the merge pass also sets it to 1 if any map holds
    NaN or inf, so that the caller needs no check (and no wait for the GPU) before the launches.
    """
    if maps32.device.type == "cpu" and not _DECORATED_FOR_INTERPRETER:
        raise RuntimeError(
            "the upsample_peak kernels were compiled for the GPU: set TRITON_INTERPRET=1 before "
            "importing pixfound to run them on CPU tensors, or use backend='torch'"
        )
    default_h, default_w, num_warps = _default_blocks(maps32.device)
    block_h = block_h or default_h
    block_w = block_w or default_w
    maps32 = maps32.contiguous()
    n_maps, in_h, in_w = maps32.shape
    n_tiles_x = triton.cdiv(geo.out_w, block_w)
    n_tiles = triton.cdiv(geo.out_h, block_h) * n_tiles_x
    device = maps32.device

    cand_val = torch.empty((n_maps, n_tiles, k), dtype=torch.float32, device=device)
    cand_idx = torch.empty((n_maps, n_tiles, k), dtype=torch.int32, device=device)
    peaks = torch.empty((n_maps, k, 2), dtype=torch.int64, device=device)
    out_maps = (
        torch.empty((n_maps, geo.out_h, geo.out_w), dtype=torch.float32, device=device)
        if return_maps
        else None
    )
    # torch computes the scale in float32 as in_size / out_size (no scale_factor given).
    scale_y = float(np.float32(in_h) / np.float32(geo.full_h))
    scale_x = float(np.float32(in_w) / np.float32(geo.full_w))
    n_cand = n_tiles * k
    merge_block = min(max(triton.next_power_of_2(n_cand), 16), 1024)

    for first in range(0, n_maps, _MAX_MAPS_PER_LAUNCH):
        last = min(first + _MAX_MAPS_PER_LAUNCH, n_maps)
        chunk_maps = out_maps[first:last] if out_maps is not None else cand_val[first:last]
        _upsample_tile_topk_kernel[(n_tiles, last - first)](
            maps32[first:last],
            cand_val[first:last],
            cand_idx[first:last],
            chunk_maps,
            in_h,
            in_w,
            geo.out_h,
            geo.out_w,
            geo.top,
            geo.left,
            scale_y,
            scale_x,
            n_tiles_x,
            n_tiles,
            K=k,
            BLOCK_H=block_h,
            BLOCK_W=block_w,
            STORE_MAPS=return_maps,
            NO_INDEX=_NO_INDEX,
            num_warps=num_warps,
        )
    _merge_tile_topk_kernel[(n_maps,)](
        cand_val,
        cand_idx,
        peaks,
        maps32,
        nonfinite if nonfinite is not None else cand_idx,  # any int32 tensor when unused
        n_cand,
        geo.out_w,
        in_h * in_w,
        K=k,
        BLOCK=merge_block,
        NO_INDEX=_NO_INDEX,
        CHECK_FINITE=nonfinite is not None,
        num_warps=4,
    )
    return (peaks, out_maps) if return_maps else peaks


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def upsample_peaks(
    maps: torch.Tensor,
    size: Sequence[int],
    *,
    aspect: str = "pad",
    k: int = 1,
    return_maps: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Top-k peaks of bicubically upsampled phrase maps, in original-image pixels.

    Args:
        maps: float tensor ``[G, h, w]`` (fp32/fp16/bf16; computed in float32). Must be
            finite: NaN or inf raises ``ValueError``.
        size: ``(H, W)`` of the original image.
        aspect: ``"pad"`` (upsample to the ``max(H, W)`` square, centre-crop at
            ``((S - H) // 2, (S - W) // 2)``, as published) or ``"original"``.
        k: number of peaks per map, ``1 <= k <= H * W``. ``k = r`` and taking
            ``peaks[:, r - 1]`` gives the published ``--point-rank r`` point.
        return_maps: also return the float32 ``[G, H, W]`` upsampled maps (for overlays).
        backend: ``"auto"`` (Triton on CUDA tensors, or on CPU with ``TRITON_INTERPRET=1``;
            else the C++ core on the CPU), ``"triton"``, ``"cpp"`` (CPU tensors; the same
            formula one map at a time, never more than one upsampled map in memory) or
            ``"torch"``. ``k > MAX_TRITON_K`` on Triton and ``return_maps=True`` on C++ use torch.

    Returns:
        int64 ``[G, k, 2]`` peaks as (x, y), best first, ties to the lowest flat index
        (``y * W + x``), like ``torch.argmax``; with ``return_maps=True`` the tuple
        ``(peaks, maps [G, H, W])``.
    """
    maps32, geo = _check_args(maps, size, aspect, k, finite=False)
    if backend == "cpp":
        if maps32.device.type != "cpu":
            raise ValueError(f"backend='cpp' takes CPU tensors, got maps on {maps32.device}")
        chosen = "cpp"
    else:
        chosen = resolve_backend(backend, maps32)
        if backend == "auto" and maps32.device.type == "cpu" and (chosen == "torch" or not _DECORATED_FOR_INTERPRETER):
            chosen = "cpp"  # no Triton here (or it was enabled after this module was imported)
    if chosen == "triton" and k <= MAX_TRITON_K and geo.out_h * geo.out_w < _NO_INDEX:
        nonfinite = torch.zeros(1, dtype=torch.int32, device=maps32.device)
        result = _upsample_peaks_triton(maps32, geo, k, return_maps, nonfinite=nonfinite)
        if nonfinite.item():  # the one wait for the GPU, after the kernels
            _check_finite(maps32)
        return result
    _check_finite(maps32)
    if chosen == "cpp" and not return_maps:
        return _upsample_peaks_cpp(maps32, geo, k)
    upsampled = _upsample_checked(maps32, geo)
    peaks = _flat_to_xy(_topk_lowest_index(upsampled.reshape(upsampled.shape[0], -1), k), geo.out_w)
    return (peaks, upsampled) if return_maps else peaks
