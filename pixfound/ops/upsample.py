"""The op ``pixfound::upsample_peaks``: fused bicubic upsample + top-k peak of phrase attention maps.

PixFoundation turns each phrase's low-resolution attention map ``[h, w]`` into a point
prompt: upsample it bicubically to the original image (``pad`` mode: to the square
``S x S`` with ``S = max(H, W)``, then centre-crop to ``H x W``; ``original`` mode:
straight to ``H x W``) and take the argmax. The published code does exactly::

    up = F.interpolate(maps[None], (S, S), mode="bicubic", align_corners=False)[0]
    top, left = (S - H) // 2, (S - W) // 2
    up = up[:, top:top + H, left:left + W]
    flat = up.reshape(G, -1).argmax(1); x, y = flat % W, flat // W

(MSiam/PixFoundation, ``pixmmvp/inference/infer_pixfoundation.py``: ``crop_h_start =
(upsample_size - image_height) // 2``, same for the width.) This module holds the torch reference
of that recipe (:func:`upsample_reference`, :func:`upsample_peaks_reference`), generalised to the
k best pixels, and the op, registered with ``torch.library``:

* CPU kernel: the C++ core (``pixfound._C.upsample_topk``), the same formula one map at a time,
  never more than one upsampled map in memory; with ``return_maps`` (overlays) the maps come from
  torch's ``interpolate``, as the core does not return them;
* CUDA kernel: the two Triton passes of :mod:`pixfound.triton_kernels.upsample_peak`, which never
  write the upsampled maps unless asked to (``k`` above :data:`MAX_TRITON_K` runs the torch recipe);
* fake: the shapes, for ``torch.compile``.

The op returns a NaN/inf flag next to the peaks instead of raising, so that on a GPU the one wait
for the device comes after the kernels; :func:`upsample_peaks` reads it and raises.

Ordering is "value descending, then flat index ascending", which is ``torch.argmax``'s tie rule
(first maximal index). Values are computed in float32. The fast paths compute torch's formula, but
rounding can differ in the last bits (torch's own CPU builds contract to FMA differently per
instruction set, and its CUDA kernel differs again), so two pixels whose values agree to ~1e-6
relative may swap; exact ties are always resolved to the lowest flat index.
"""
from __future__ import annotations

import operator
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from pixfound.ops.backends import resolve_kernel_backend

__all__ = [
    "ASPECT_MODES",
    "MAX_TRITON_K",
    "upsample_peaks",
    "upsample_peaks_reference",
    "upsample_reference",
]

ASPECT_MODES = ("pad", "original")
#: Largest k the Triton kernels keep per tile (pixfound.triton_kernels.upsample_peak); above it CUDA runs torch.
MAX_TRITON_K = 8
# Flat indices are int32 inside the Triton kernels.
_NO_INDEX = 2**31 - 1


# --------------------------------------------------------------------------------------
# Validation and geometry (shared by both paths)
# --------------------------------------------------------------------------------------


class _Geometry(NamedTuple):
    """Where the cropped ``out_h x out_w`` window sits in the virtual upsampled grid (the op's window arguments)."""

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

    ``finite=False`` leaves out the NaN/inf check (the op reports non-finite maps in its flag, and
    :func:`upsample_peaks` raises with :func:`_check_finite` after it).
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
# The op
# --------------------------------------------------------------------------------------


def _reference_peaks(maps32: torch.Tensor, geo: _Geometry, k: int, return_maps: bool
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    upsampled = _upsample_checked(maps32, geo)
    peaks = _flat_to_xy(_topk_lowest_index(upsampled.reshape(upsampled.shape[0], -1), k), geo.out_w)
    return peaks, (upsampled if return_maps else None)


def _nonfinite_flag(maps32: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(maps32)).any().to(torch.int32).reshape(1)


def _op_result(maps32: torch.Tensor, geo: _Geometry, peaks: torch.Tensor, upsampled: torch.Tensor | None,
               nonfinite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if upsampled is None:  # the op always returns a tensor: an empty one when the maps were not asked for
        upsampled = maps32.new_empty((0, geo.out_h, geo.out_w))
    return peaks, upsampled, nonfinite


def _triton_peaks(maps32: torch.Tensor, geo: _Geometry, k: int, return_maps: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernels (the CUDA kernel of the op, and Triton's interpreter on the CPU)."""
    if k > MAX_TRITON_K or geo.out_h * geo.out_w >= _NO_INDEX:
        return _op_result(maps32, geo, *_reference_peaks(maps32, geo, k, return_maps), _nonfinite_flag(maps32))
    from pixfound.triton_kernels.upsample_peak import upsample_peaks_triton

    nonfinite = torch.zeros(1, dtype=torch.int32, device=maps32.device)
    peaks, upsampled = upsample_peaks_triton(maps32, geo, k, return_maps, nonfinite=nonfinite)
    return _op_result(maps32, geo, peaks, upsampled, nonfinite)


@torch.library.custom_op("pixfound::upsample_peaks", mutates_args=(), device_types="cpu")
def upsample_peaks_op(maps32: torch.Tensor, full_h: int, full_w: int, top: int, left: int, out_h: int, out_w: int,
                      k: int, return_maps: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU kernel: (peaks int64 [G, k, 2], upsampled maps float32 [G or 0, out_h, out_w], NaN/inf flag int32 [1])."""
    geo = _Geometry(full_h, full_w, top, left, out_h, out_w)
    nonfinite = _nonfinite_flag(maps32)
    if nonfinite.item():  # the caller raises; the core is not run on NaN
        return _op_result(maps32, geo, torch.zeros(maps32.shape[0], k, 2, dtype=torch.int64), None, nonfinite)
    if return_maps:
        return _op_result(maps32, geo, *_reference_peaks(maps32, geo, k, True), nonfinite)
    from pixfound import _C

    peaks = _C.upsample_topk(maps32.detach().contiguous().numpy(), full_h, full_w, top, left, out_h, out_w, k)
    return _op_result(maps32, geo, torch.from_numpy(peaks), None, nonfinite)


@upsample_peaks_op.register_kernel("cuda")
def _upsample_peaks_cuda(maps32, full_h, full_w, top, left, out_h, out_w, k, return_maps):
    return _triton_peaks(maps32, _Geometry(full_h, full_w, top, left, out_h, out_w), k, return_maps)


@upsample_peaks_op.register_fake
def _upsample_peaks_fake(maps32, full_h, full_w, top, left, out_h, out_w, k, return_maps):
    count = maps32.shape[0]
    return (maps32.new_empty((count, k, 2), dtype=torch.int64),
            maps32.new_empty((count if return_maps else 0, out_h, out_w)),
            maps32.new_empty((1,), dtype=torch.int32))


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
        backend: ``auto``, ``cpp``, ``triton`` or ``reference`` (see
            :func:`pixfound.ops.backends.resolve_kernel_backend`).

    Returns:
        int64 ``[G, k, 2]`` peaks as (x, y), best first, ties to the lowest flat index
        (``y * W + x``), like ``torch.argmax``; with ``return_maps=True`` the tuple
        ``(peaks, maps [G, H, W])``.
    """
    maps32, geo = _check_args(maps, size, aspect, k, finite=False)
    chosen = resolve_kernel_backend(backend, maps32.device)
    if chosen == "reference":
        _check_finite(maps32)
        peaks, upsampled = _reference_peaks(maps32, geo, k, return_maps)
        return (peaks, upsampled) if return_maps else peaks
    if chosen == "triton" and maps32.device.type == "cpu":  # Triton's interpreter (tests, development)
        peaks, upsampled, nonfinite = _triton_peaks(maps32, geo, k, return_maps)
    else:
        peaks, upsampled, nonfinite = torch.ops.pixfound.upsample_peaks(maps32, *geo, k, return_maps)
    if nonfinite.item():  # on a GPU the one wait for the device, after the kernels
        _check_finite(maps32)
    return (peaks, upsampled) if return_maps else peaks
