"""Softmax attention of selected query rows to the image keys, mean over heads.

The attention probe calls :func:`image_attention` inside every attention layer while an
MLLM generates. For each sample ``b`` and query row ``r`` it returns

    mean over query heads h of  softmax(q[b, h, r] . k[b, h_kv(h)] * scale)[image span of b]

where the softmax runs over the valid keys ``[key_start[b], key_end[b, r])`` of the full row
(left padding before ``key_start``, causality after ``key_end``), and only the image keys
``[image_start[b], image_start[b] + image_len[b])`` are kept. The probability mass keeps the
denominator of the whole row; it is *not* renormalised over the image keys.

An optional gap ``[gap_start[b], gap_end[b])`` per sample is taken out of the valid keys: the
padding between a shared prefix (system prompt + image) and each sample's own prompt. Gap keys
get probability 0 and add nothing to the denominator, also where they overlap the image span.

Two implementations of the same math sit in this module:

* ``_image_attention_kernel`` (Triton): one program per (kv head, sample, query row), and per
  layer when several layers share one launch (:func:`image_attention_layers_triton_into`, the
  probe's GPU path for a single step). It holds
  the rows of every query head that shares the kv head and reads that row's valid keys once,
  in ``BLOCK_N`` tiles, with an online max and
  sum (the exact softmax denominator, fp32 accumulation; with a gap it runs over the two pieces
  of the row on either side of the gap and never loads a gap key). The image keys' scores are put
  aside in a scratch buffer ``[layers, B, Hq, R, N]`` on the way; at the end the program turns
  them into ``exp(s - max) / sum``, summed over its heads, in an fp32 partial buffer
  ``[layers, B, Hkv, R, N]``. The wrapper sums that over layers and kv heads and divides by
  ``Hq``. Nothing of size heads x keys is kept.
* ``_image_attention_rows_kernel`` (Triton): the probe's window of decode steps (several query
  rows sharing their keys). One program per (sample, block of rows, layer) goes through the kv
  heads in turn and reads each key tile once for all its rows and grouped heads: a first pass
  for each (row, head)'s max and denominator, a second over the image keys only for the
  probabilities, summed over heads in registers. Its only scratch is those statistics and the
  per-layer sums ``[layers, B, R, N]``. Should it fail to compile or launch, the rows are
  computed one by one with the first kernel (with a warning).
* :func:`image_attention_reference` (plain torch): upcast, full masked softmax, gather, head mean.
  Tests and benchmarks compare the kernel against it, and ``backend="torch"`` runs it.

``backend="cpp"`` runs the same math in the C++ core (``pixfound._C.image_attention``, float32 on
the CPU). It scores all rows and grouped heads of a sample in one pass over each kv head's keys,
so a window of decode steps reads every key once.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pixfound._kernels._backend import interpreting, resolve_backend, triton_available, use_triton

__all__ = [
    "choose_backend",
    "image_attention",
    "image_attention_cpp_into",
    "image_attention_layers_cpp_into",
    "image_attention_layers_triton_into",
    "image_attention_reference",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class _Tiles:
    """Launch shape of both kernels for one input dtype."""

    block_n: int  # keys per tile
    num_warps: int
    max_pairs: int  # row-block kernel: at most this many (query row, head) pairs per program


# 16-bit inputs: tensor-core dots; a [64, 128] key tile and a [16..64, 64] score tile stay in registers.
# fp32 inputs: FMA dots, whose operands all sit in registers: smaller tiles on 8 warps. With the 16-bit
# shape ptxas spilled up to 5 KB per thread at head_dim 128 on sm_90; with these no variant spills
# (``python -m pixfound._kernels.compile_check``, kept by tests/test_kernel_compile.py).
_TILES_16BIT = _Tiles(block_n=64, num_warps=4, max_pairs=64)
_TILES_FP32 = _Tiles(block_n=32, num_warps=8, max_pairs=16)


def _tiles(q: torch.Tensor) -> _Tiles:
    return _TILES_FP32 if q.dtype == torch.float32 else _TILES_16BIT


# A layered launch addresses each layer's tensors in units of this many bytes (see the kernel).
_ALIGN_BYTES = 16
# tl.dot on NVIDIA GPUs needs at least 16 rows and 16 reduction columns.
_MIN_DOT = 16
# Whether the kernel below was decorated under TRITON_INTERPRET=1 (Triton decides at decoration).
_DECORATED_FOR_INTERPRETER = False


# ----------------------------------------------------------------------------------------------
# Input checks, shared by the kernel wrapper and the reference
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Inputs:
    image_start: torch.Tensor  # int64 [B] on q.device
    image_len: torch.Tensor  # int64 [B]
    key_start: torch.Tensor  # int64 [B]
    key_end: torch.Tensor  # int64 [B, R]
    num_image_keys: int  # N, the width of the output
    gap_start: torch.Tensor | None = None  # int64 [B], or None (no gap) together with gap_end
    gap_end: torch.Tensor | None = None  # int64 [B]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_index(name: str, value: object, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be an integer torch.Tensor of shape {shape}, got {type(value).__name__}")
    if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
        raise ValueError(f"{name} must have an integer dtype (int64), got {value.dtype}")
    if _shape(value) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {_shape(value)}")
    if value.device.type != "cpu" and value.device != device:
        raise ValueError(f"{name} is on {value.device} but q and k are on {device}; use the same device or the CPU")
    return value.to(device=device, dtype=torch.int64, non_blocking=True)


def _check_inputs(
    q: object,
    k: object,
    image_start: object,
    image_len: object,
    key_start: object,
    key_end: object,
    scale: object,
    validate: bool,
    num_image_keys: int | None,
    gap_start: object = None,
    gap_end: object = None,
) -> _Inputs:
    """Shape, dtype and device checks on the host; value checks with one device->host copy."""
    for name, tensor in (("q", q), ("k", k)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
    if q.dim() != 4:
        raise ValueError(f"q must have shape [B, Hq, R, D] (4 dims), got shape {_shape(q)}")
    if k.dim() != 4:
        raise ValueError(f"k must have shape [B, Hkv, L, D] (4 dims), got shape {_shape(k)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if k.dtype != q.dtype:
        raise ValueError(f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"q and k must be on the same device, got q on {q.device} and k on {k.device}")
    batch, heads_q, rows, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {batch} (q {_shape(q)}, k {_shape(k)})")
    if k.shape[3] != head_dim:
        raise ValueError(f"k has head dim {k.shape[3]} but q has {head_dim} (q {_shape(q)}, k {_shape(k)})")
    heads_kv, num_keys = k.shape[1], k.shape[2]
    if heads_q == 0 or heads_kv == 0 or head_dim == 0:
        raise ValueError(f"q and k need at least one head and head dim >= 1, got q {_shape(q)}, k {_shape(k)}")
    if heads_q % heads_kv != 0:
        raise ValueError(
            f"the query heads ({heads_q}) must be a multiple of the kv heads ({heads_kv}) for grouped-query "
            f"attention (q {_shape(q)}, k {_shape(k)})"
        )
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")

    image_start_t = _check_index("image_start", image_start, (batch,), q.device)
    image_len_t = _check_index("image_len", image_len, (batch,), q.device)
    key_start_t = _check_index("key_start", key_start, (batch,), q.device)
    key_end_t = _check_index("key_end", key_end, (batch, rows), q.device)
    if (gap_start is None) != (gap_end is None):
        given, missing = ("gap_start", "gap_end") if gap_end is None else ("gap_end", "gap_start")
        raise ValueError(
            f"gap_start and gap_end must be given together (or both None for no gap): got {given} but {missing} is None"
        )
    has_gap = gap_start is not None
    gap_start_t = _check_index("gap_start", gap_start, (batch,), q.device) if has_gap else None
    gap_end_t = _check_index("gap_end", gap_end, (batch,), q.device) if has_gap else None

    if num_image_keys is not None:
        if isinstance(num_image_keys, bool) or not isinstance(num_image_keys, numbers.Integral) or num_image_keys < 0:
            raise ValueError(f"num_image_keys must be a non-negative int or None, got {num_image_keys!r}")
        num_image_keys = int(num_image_keys)

    if validate:
        # One copy to the host for every value check (and for N when it is not given).
        gaps = [gap_start_t, gap_end_t] if gap_start_t is not None and gap_end_t is not None else []
        host = torch.cat([image_start_t, image_len_t, key_start_t, *gaps, key_end_t.reshape(-1)]).cpu()
        starts, lengths, firsts = host[:batch], host[batch : 2 * batch], host[2 * batch : 3 * batch]
        ends = host[(3 + len(gaps)) * batch :].reshape(batch, rows)
        _check_values(starts, lengths, firsts, ends, num_keys, num_image_keys)
        if gaps:
            _check_gap_values(host[3 * batch : 4 * batch], host[4 * batch : 5 * batch], num_keys)
        if num_image_keys is None:
            num_image_keys = int(lengths.max()) if batch else 0
    elif num_image_keys is None:
        num_image_keys = int(image_len_t.max()) if batch else 0  # the one sync of an unvalidated call
        if num_image_keys < 0:
            raise ValueError(f"image_len must be >= 0, got max(image_len) = {num_image_keys}")
    return _Inputs(image_start_t, image_len_t, key_start_t, key_end_t, num_image_keys, gap_start_t, gap_end_t)


def _check_values(
    starts: torch.Tensor,
    lengths: torch.Tensor,
    firsts: torch.Tensor,
    ends: torch.Tensor,
    num_keys: int,
    num_image_keys: int | None,
) -> None:
    def first_bad(bad: torch.Tensor) -> int:
        return int(bad.nonzero()[0, 0])

    if (bad := lengths < 0).any():
        b = first_bad(bad)
        raise ValueError(f"image_len must be >= 0, got image_len[{b}] = {int(lengths[b])}")
    if (bad := starts < 0).any():
        b = first_bad(bad)
        raise ValueError(f"image_start must be >= 0, got image_start[{b}] = {int(starts[b])}")
    if (bad := starts + lengths > num_keys).any():
        b = first_bad(bad)
        raise ValueError(
            f"the image span of sample {b} ends beyond the keys: image_start[{b}] + image_len[{b}] = "
            f"{int(starts[b])} + {int(lengths[b])} > L = {num_keys} (k has {num_keys} keys)"
        )
    if (bad := (firsts < 0) | (firsts > num_keys)).any():
        b = first_bad(bad)
        raise ValueError(f"key_start must lie in [0, L = {num_keys}], got key_start[{b}] = {int(firsts[b])}")
    if (bad := ends < firsts[:, None]).any():
        b = first_bad(bad.any(dim=1))
        raise ValueError(
            f"key_end must be >= key_start, got key_end[{b}] = {ends[b].tolist()} < key_start[{b}] = {int(firsts[b])}"
        )
    if (bad := ends > num_keys).any():
        b = first_bad(bad.any(dim=1))
        raise ValueError(f"key_end must be <= L = {num_keys} (the keys in k), got key_end[{b}] = {ends[b].tolist()}")
    if num_image_keys is not None and lengths.numel() and int(lengths.max()) > num_image_keys:
        b = int(lengths.argmax())
        raise ValueError(
            f"num_image_keys = {num_image_keys} is smaller than image_len[{b}] = {int(lengths[b])}; "
            "pass at least max(image_len) or None"
        )


def _check_gap_values(gap_starts: torch.Tensor, gap_ends: torch.Tensor, num_keys: int) -> None:
    def first_bad(bad: torch.Tensor) -> int:
        return int(bad.nonzero()[0, 0])

    if (bad := gap_starts < 0).any():
        b = first_bad(bad)
        raise ValueError(f"gap_start must be >= 0, got gap_start[{b}] = {int(gap_starts[b])}")
    if (bad := gap_ends < gap_starts).any():
        b = first_bad(bad)
        raise ValueError(
            f"gap_end must be >= gap_start (equal for no gap), got gap_end[{b}] = {int(gap_ends[b])} < "
            f"gap_start[{b}] = {int(gap_starts[b])}"
        )
    if (bad := gap_ends > num_keys).any():
        b = first_bad(bad)
        raise ValueError(f"gap_end must be <= L = {num_keys} (the keys in k), got gap_end[{b}] = {int(gap_ends[b])}")


# ----------------------------------------------------------------------------------------------
# Torch reference
# ----------------------------------------------------------------------------------------------
def image_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    image_start: torch.Tensor,
    image_len: torch.Tensor,
    key_start: torch.Tensor,
    key_end: torch.Tensor,
    scale: float,
    validate: bool = True,
    num_image_keys: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    gap_start: torch.Tensor | None = None,
    gap_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch :func:`image_attention`: masked full-row softmax, image slice, head mean.

    Same arguments and result as :func:`image_attention`. ``compute_dtype`` is the precision the
    scores, softmax and head mean are computed in (float32 by default; tests also use float64 as
    the exact answer and the input dtype as a same-precision baseline). It keeps the
    ``[B, Hq, R, L]`` probabilities, so it is meant for tests, benchmarks and CPU fallback.
    The result is float32, or float64 when ``compute_dtype`` is float64.
    """
    checked = _check_inputs(
        q, k, image_start, image_len, key_start, key_end, scale, validate, num_image_keys, gap_start, gap_end
    )
    return _reference_math(q, k, checked, float(scale), compute_dtype)


def _reference_math(
    q: torch.Tensor, k: torch.Tensor, checked: _Inputs, scale: float, compute_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The reference computation on already checked inputs (the wrapper checks once, not twice)."""
    batch, heads_q, rows, _ = q.shape
    heads_kv, num_keys = k.shape[1], k.shape[2]
    width = checked.num_image_keys
    out_dtype = torch.promote_types(compute_dtype, torch.float32)
    if batch == 0 or width == 0 or num_keys == 0:
        return torch.zeros(batch, rows, width, dtype=out_dtype, device=q.device)

    # Query head h uses kv head h // group: fold each group's heads into the row axis so that one
    # matmul per kv head serves them all, without copying K once per query head.
    group = heads_q // heads_kv
    grouped_q = q.to(compute_dtype).reshape(batch, heads_kv, group * rows, q.shape[-1])
    scores = torch.matmul(grouped_q, k.to(compute_dtype).transpose(-1, -2)) * scale  # [B, Hkv, G*R, L]
    scores = scores.reshape(batch, heads_q, rows, num_keys)
    positions = torch.arange(num_keys, device=q.device)
    valid = (positions >= checked.key_start[:, None, None]) & (positions < checked.key_end[:, :, None])  # [B, R, L]
    if checked.gap_start is not None and checked.gap_end is not None:
        in_gap = (positions >= checked.gap_start[:, None, None]) & (positions < checked.gap_end[:, None, None])
        valid &= ~in_gap
    scores = scores.masked_fill(~valid[:, None], float("-inf"))
    # A row without valid keys is all NaN after softmax; it contributes 0.
    probs = torch.softmax(scores, dim=-1).masked_fill(~valid[:, None], 0.0)

    offsets = torch.arange(width, device=q.device)
    key_index = checked.image_start[:, None] + offsets  # [B, N]
    in_span = (offsets < checked.image_len[:, None]) & (key_index >= 0) & (key_index < num_keys)
    gathered = probs.gather(-1, key_index.clamp(0, num_keys - 1)[:, None, None, :].expand(-1, heads_q, rows, -1))
    gathered = gathered.masked_fill(~in_span[:, None, None, :], 0.0)
    return gathered.mean(dim=1).to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _key_dots(q_tile, k_base, stride_kl, d_ok, keys, key_ok, DOT_IN_FP32: tl.constexpr):
        """Raw dot products of the query rows with one tile of keys (keys not in ``key_ok`` are not read).

        fp32 inputs keep IEEE fp32 products (no TF32); 16-bit inputs use the tensor cores.
        """
        k_tile = tl.load(k_base + keys[None, :] * stride_kl, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            s = tl.dot(q_tile, k_tile.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q_tile, k_tile)
        return s

    @triton.jit
    def _scaled_scores(q_tile, k_base, stride_kl, d_ok, keys, key_ok, scale_log2, DOT_IN_FP32: tl.constexpr):
        """Scores of the query rows with one tile of keys, in log2 units; -inf where ``key_ok`` is False."""
        s = _key_dots(q_tile, k_base, stride_kl, d_ok, keys, key_ok, DOT_IN_FP32)
        return tl.where(key_ok[None, :], s * scale_log2, float("-inf"))

    @triton.jit
    def _pair_queries(q_sample, pair_row, pair_head, offs_d, pair_ok, d_ok, stride_qr, stride_qh, stride_qd,
                      DOT_IN_FP32: tl.constexpr):
        """The query vectors [PAIRS, BLOCK_D] of (row, query head) pairs of one sample (0 for padded pairs).

        Called per kv head, not hoisted: a pointer tile kept across the loop costs registers (ptxas spilled).
        """
        q_rows = q_sample + pair_row[:, None] * stride_qr + pair_head[:, None] * stride_qh
        q_tile = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=pair_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            q_tile = q_tile.to(tl.float32)
        return q_tile

    @triton.jit
    def _gap_bounds(gap_start_ptr, gap_end_ptr, sample, num_keys):
        """A sample's padding run [gap_lo, gap_hi), clamped into [0, num_keys] (gap_end < gap_start: empty)."""
        gap_lo = tl.minimum(tl.maximum(tl.load(gap_start_ptr + sample), 0), num_keys).to(tl.int32)
        gap_hi = tl.minimum(tl.maximum(tl.load(gap_end_ptr + sample), 0), num_keys).to(tl.int32)
        return gap_lo, tl.maximum(gap_hi, gap_lo)

    @triton.jit
    def _row_softmax_stats(
        q_tile, k_base, stride_kl, d_ok, offs_n, lo, hi, m_i, l_i, scale_log2, score_rows, image_lo, image_hi,
        row_ok, BLOCK_N: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):
        """Online max and sum of exp (log2 units) of the scores of keys [lo, hi), folded into m_i, l_i.

        The scores of the image keys among them are stored at ``score_rows + (key - image_lo)``, so
        that the probabilities need no second pass over the keys.
        """
        for start in range(lo, hi, BLOCK_N):
            keys = start + offs_n
            key_ok = keys < hi
            s = _scaled_scores(q_tile, k_base, stride_kl, d_ok, keys, key_ok, scale_log2, DOT_IN_FP32)
            in_image = key_ok & (keys >= image_lo) & (keys < image_hi)
            tl.store(score_rows + (keys - image_lo)[None, :], s, mask=row_ok[:, None] & in_image[None, :])
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
            m_i = m_new
        return m_i, l_i

    @triton.jit
    def _image_attention_kernel(
        q_ptr,
        k_ptr,
        q_units_ptr,
        k_units_ptr,
        image_start_ptr,
        image_len_ptr,
        key_start_ptr,
        key_end_ptr,
        gap_start_ptr,
        gap_end_ptr,
        scores_ptr,
        partial_ptr,
        stride_qb,
        stride_qh,
        stride_qr,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_kd,
        stride_end_b,
        stride_end_r,
        batch,
        heads_kv,
        rows,
        num_keys,
        head_dim,
        num_image_keys,
        scale_log2,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,
        HAS_GAP: tl.constexpr,
        LAYERED: tl.constexpr,
        OFFSET_UNIT: tl.constexpr,
    ):
        kv_head = tl.program_id(0).to(tl.int64)
        sample = tl.program_id(1).to(tl.int64)
        layer_row = tl.program_id(2).to(tl.int64)
        layer = layer_row // rows
        row = layer_row % rows
        if LAYERED:
            # Several layers in one launch (all with the shapes and strides of q and k): each layer's
            # q and k sit a whole number of 16-byte units past q_ptr and k_ptr, the lowest addresses.
            # Counting in those units keeps the 16-byte alignment of the arguments known to the
            # compiler, so the key tiles still load 16 bytes at a time (a pointer loaded from a
            # table would not be); unsigned, so that the interpreter's address arithmetic stays exact.
            q_ptr += tl.load(q_units_ptr + layer).to(tl.uint64) * OFFSET_UNIT
            k_ptr += tl.load(k_units_ptr + layer).to(tl.uint64) * OFFSET_UNIT

        # Clamp the ranges to [0, L] so that unvalidated indices can never read out of bounds.
        key_lo = tl.maximum(tl.load(key_start_ptr + sample), 0).to(tl.int32)
        key_hi = tl.minimum(tl.load(key_end_ptr + sample * stride_end_b + row * stride_end_r), num_keys).to(tl.int32)
        image_lo = tl.load(image_start_ptr + sample).to(tl.int32)
        image_n = tl.minimum(tl.load(image_len_ptr + sample), num_image_keys).to(tl.int32)
        # The valid keys are [key_lo, first_hi) and [second_lo, key_hi): the row minus the gap,
        # clamped into the row (an empty or out-of-row gap leaves first_hi = key_hi).
        first_hi = key_hi
        second_lo = key_hi
        if HAS_GAP:
            gap_lo, gap_hi = _gap_bounds(gap_start_ptr, gap_end_ptr, sample, num_keys)
            first_hi = tl.minimum(tl.maximum(gap_lo, key_lo), key_hi)
            second_lo = tl.minimum(tl.maximum(gap_hi, first_hi), key_hi)
            first_hi = tl.where(gap_hi > gap_lo, first_hi, key_hi)
            second_lo = tl.where(gap_hi > gap_lo, second_lo, key_hi)

        # Query rows of the GROUP heads that share this kv head (padded to BLOCK_M rows).
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        head_ok = offs_m < GROUP
        d_ok = offs_d < head_dim
        q_rows = q_ptr + sample * stride_qb + row * stride_qr + (kv_head * GROUP + offs_m)[:, None] * stride_qh
        q_tile = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=head_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            q_tile = q_tile.to(tl.float32)
        k_base = k_ptr + sample * stride_kb + kv_head * stride_kh + offs_d[:, None] * stride_kd  # [BLOCK_D, 1]
        # This program's rows of the score buffer [layers, B, Hq, R, N] (one row per query head).
        heads_q = heads_kv * GROUP
        score_rows = scores_ptr + ((((layer * batch + sample) * heads_q + kv_head * GROUP + offs_m) * rows + row)
                                   * num_image_keys)[:, None]

        # One pass over the valid keys: running max and sum of exp in log2 units, and the image
        # keys' scores kept aside; gap keys are never loaded.
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        image_hi = image_lo + image_n
        m_i, l_i = _row_softmax_stats(
            q_tile, k_base, stride_kl, d_ok, offs_n, key_lo, first_hi, m_i, l_i, scale_log2, score_rows, image_lo,
            image_hi, head_ok, BLOCK_N, DOT_IN_FP32,
        )
        if HAS_GAP:
            m_i, l_i = _row_softmax_stats(
                q_tile, k_base, stride_kl, d_ok, offs_n, second_lo, key_hi, m_i, l_i, scale_log2, score_rows,
                image_lo, image_hi, head_ok, BLOCK_N, DOT_IN_FP32,
            )
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        has_keys = l_i > 0.0
        inv_l = tl.where(has_keys, 1.0 / tl.where(has_keys, l_i, 1.0), 0.0)  # no valid key: 0, not NaN
        inv_l = tl.where(head_ok, inv_l, 0.0)  # padded rows add nothing
        # The stored scores were written by other threads of this program.
        tl.debug_barrier()

        # Probabilities of the image keys, summed over this group's heads (only the valid image
        # keys were stored; the others count as -inf).
        out_row = partial_ptr + (((layer * batch + sample) * heads_kv + kv_head) * rows + row) * num_image_keys
        for start in range(0, image_n, BLOCK_N):
            offs = start + offs_n
            keys = image_lo + offs
            in_image = offs < image_n
            key_ok = in_image & (keys >= key_lo) & (keys < key_hi)
            if HAS_GAP:
                key_ok = key_ok & ((keys < first_hi) | (keys >= second_lo))
            s = tl.load(score_rows + offs[None, :], mask=head_ok[:, None] & key_ok[None, :], other=float("-inf"))
            p = tl.exp2(s - m_safe[:, None]) * inv_l[:, None]
            tl.store(out_row + offs, tl.sum(p, axis=0), mask=in_image)


    @triton.jit
    def _image_attention_rows_kernel(
        q_ptr,
        k_ptr,
        q_units_ptr,
        k_units_ptr,
        image_start_ptr,
        image_len_ptr,
        key_start_ptr,
        key_end_ptr,
        gap_start_ptr,
        gap_end_ptr,
        stats_ptr,
        partial_ptr,
        stride_qb,
        stride_qh,
        stride_qr,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_kd,
        stride_end_b,
        stride_end_r,
        batch,
        heads_kv,
        rows,
        row_blocks,
        num_keys,
        head_dim,
        num_image_keys,
        scale_log2,
        GROUP: tl.constexpr,
        GROUP_P: tl.constexpr,
        ROWS_P: tl.constexpr,
        PAIRS: tl.constexpr,  # ROWS_P * GROUP_P
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,
        HAS_GAP: tl.constexpr,
        LAYERED: tl.constexpr,
        OFFSET_UNIT: tl.constexpr,
    ):
        """One program per (sample, block of ROWS_P query rows, layer), every kv head in turn.

        The rows of a window of decode steps share their keys, so a program reads each key tile
        for all its rows and grouped heads at once (M = ROWS_P x GROUP_P pairs): pass 1 gives
        each pair's softmax max and denominator over its valid keys, pass 2 re-reads only the
        image keys and sums the probabilities over the heads into registers. No scratch of
        size heads x rows x image keys; one store per output entry.
        """
        sample = tl.program_id(0).to(tl.int64)
        row_block = tl.program_id(1).to(tl.int64)
        layer = tl.program_id(2).to(tl.int64)
        if LAYERED:  # as in _image_attention_kernel: whole 16-byte units past the lowest q and k
            q_ptr += tl.load(q_units_ptr + layer).to(tl.uint64) * OFFSET_UNIT
            k_ptr += tl.load(k_units_ptr + layer).to(tl.uint64) * OFFSET_UNIT
        offs_m = tl.arange(0, PAIRS)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        pair_row = row_block * ROWS_P + offs_m // GROUP_P
        pair_head = offs_m % GROUP_P
        pair_ok = (pair_row < rows) & (pair_head < GROUP)
        # Clamp the ranges to [0, L] so that unvalidated indices can never read out of bounds.
        key_lo = tl.maximum(tl.load(key_start_ptr + sample), 0).to(tl.int32)
        key_hi = tl.load(key_end_ptr + sample * stride_end_b + pair_row * stride_end_r, mask=pair_ok, other=0)
        key_hi = tl.where(pair_ok, tl.minimum(key_hi, num_keys), 0).to(tl.int32)  # [PAIRS]
        reach = tl.max(key_hi, axis=0)
        image_lo = tl.load(image_start_ptr + sample).to(tl.int32)
        image_n = tl.minimum(tl.load(image_len_ptr + sample), num_image_keys).to(tl.int32)
        gap_lo = num_keys
        gap_hi = num_keys
        if HAS_GAP:  # the valid keys of a pair: [key_lo, key_hi) minus [gap_lo, gap_hi)
            gap_lo, gap_hi = _gap_bounds(gap_start_ptr, gap_end_ptr, sample, num_keys)
        stats = stats_ptr + (((layer * batch + sample) * row_blocks + row_block) * heads_kv) * 2 * PAIRS

        # Pass 1, per kv head: online max and sum of exp (log2 units) over each pair's valid keys.
        for kv_head in range(0, heads_kv):
            q_tile = _pair_queries(q_ptr + sample * stride_qb, pair_row, kv_head * GROUP + pair_head, offs_d, pair_ok,
                                   d_ok, stride_qr, stride_qh, stride_qd, DOT_IN_FP32)
            k_base = k_ptr + sample * stride_kb + kv_head * stride_kh + offs_d[:, None] * stride_kd
            m_i = tl.full([PAIRS], float("-inf"), tl.float32)
            l_i = tl.zeros([PAIRS], tl.float32)
            for start in range(key_lo, reach, BLOCK_N):
                keys = start + offs_n
                any_ok = (keys < reach) & ((keys < gap_lo) | (keys >= gap_hi))
                s = _key_dots(q_tile, k_base, stride_kl, d_ok, keys, any_ok, DOT_IN_FP32)
                ok = any_ok[None, :] & (keys[None, :] < key_hi[:, None])
                s = tl.where(ok, s * scale_log2, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
                l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
                m_i = m_new
            has_keys = l_i > 0.0
            inv_l = tl.where(has_keys & pair_ok, 1.0 / tl.where(has_keys, l_i, 1.0), 0.0)  # none: 0, not NaN
            tl.store(stats + kv_head * 2 * PAIRS + offs_m, tl.where(m_i == float("-inf"), 0.0, m_i))
            tl.store(stats + kv_head * 2 * PAIRS + PAIRS + offs_m, inv_l)
        tl.debug_barrier()  # the stats were written by other threads of this program

        # Pass 2, per block of image keys: probabilities summed over the kv heads and their groups.
        out_rows = row_block * ROWS_P + tl.arange(0, ROWS_P)
        out_base = partial_ptr + ((layer * batch + sample) * rows + out_rows)[:, None] * num_image_keys
        for start in range(0, image_n, BLOCK_N):
            offs = start + offs_n
            keys = image_lo + offs
            any_ok = (offs < image_n) & (keys >= key_lo) & (keys < reach) & ((keys < gap_lo) | (keys >= gap_hi))
            ok = any_ok[None, :] & (keys[None, :] < key_hi[:, None])
            acc = tl.zeros([ROWS_P, BLOCK_N], tl.float32)
            for kv_head in range(0, heads_kv):
                q_tile = _pair_queries(q_ptr + sample * stride_qb, pair_row, kv_head * GROUP + pair_head, offs_d,
                                       pair_ok, d_ok, stride_qr, stride_qh, stride_qd, DOT_IN_FP32)
                k_base = k_ptr + sample * stride_kb + kv_head * stride_kh + offs_d[:, None] * stride_kd
                s = _key_dots(q_tile, k_base, stride_kl, d_ok, keys, any_ok, DOT_IN_FP32)
                m_safe = tl.load(stats + kv_head * 2 * PAIRS + offs_m)
                inv_l = tl.load(stats + kv_head * 2 * PAIRS + PAIRS + offs_m)
                p = tl.where(ok, tl.exp2(s * scale_log2 - m_safe[:, None]) * inv_l[:, None], 0.0)
                acc += tl.sum(tl.reshape(p, (ROWS_P, GROUP_P, BLOCK_N)), axis=1)
            tl.store(out_base + offs[None, :], acc, mask=(out_rows < rows)[:, None] & (offs < image_n)[None, :])

    _DECORATED_FOR_INTERPRETER = interpreting()


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _image_attention_triton(q: torch.Tensor, k: torch.Tensor, checked: _Inputs, scale: float) -> torch.Tensor:
    return _launch_kernel(q, k, checked, scale)


@dataclass(frozen=True)
class _LaunchArgs:
    """What the launches of both kernels share, in the kernels' parameter order."""

    pointers: tuple  # q, k, q_units, k_units, image_start, image_len, key_start, key_end, gap_start, gap_end
    strides: tuple  # q's 4, k's 4, key_end's 2
    constexprs: dict  # BLOCK_N, BLOCK_D, DOT_IN_FP32, HAS_GAP, LAYERED, OFFSET_UNIT and num_warps
    tiles: _Tiles


def _launch_args(
    q: torch.Tensor, k: torch.Tensor, checked: _Inputs, q_units: torch.Tensor | None, k_units: torch.Tensor | None
) -> _LaunchArgs:
    """The arguments both kernels take alike. Raises if the kernels were compiled for the GPU and ``q`` is a CPU tensor."""
    if q.device.type == "cpu" and not _DECORATED_FOR_INTERPRETER:
        raise RuntimeError(
            "the image_attention kernel was compiled for the GPU: set TRITON_INTERPRET=1 before importing "
            "pixfound to run it on CPU tensors, or use backend='torch'"
        )
    # fp32 inputs use IEEE fp32 (no TF32). The interpreter's dot multiplies bfloat16 as raw integers,
    # so there bf16 gets fp32 operands; products of fp16/bf16 are exact in fp32, so nothing changes.
    dot_in_fp32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and q.device.type == "cpu")
    has_gap = checked.gap_start is not None and checked.gap_end is not None
    layered = q_units is not None and k_units is not None
    tiles = _tiles(q)
    # Pointers the compiled variant never reads (no gap, one layer) get any int64 tensor.
    unused = checked.key_start
    pointers = (q, k, q_units if layered else unused, k_units if layered else unused, checked.image_start,
                checked.image_len, checked.key_start, checked.key_end, checked.gap_start if has_gap else unused,
                checked.gap_end if has_gap else unused)
    constexprs = dict(BLOCK_N=tiles.block_n, BLOCK_D=max(_MIN_DOT, _next_power_of_2(q.shape[-1])),
                      DOT_IN_FP32=dot_in_fp32, HAS_GAP=has_gap, LAYERED=layered,
                      OFFSET_UNIT=_ALIGN_BYTES // q.element_size(), num_warps=tiles.num_warps)
    return _LaunchArgs(pointers, (*q.stride(), *k.stride(), *checked.key_end.stride()), constexprs, tiles)


def _launch_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    checked: _Inputs,
    scale: float,
    *,
    layers: int = 1,
    q_units: torch.Tensor | None = None,
    k_units: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 ``[B, R, N]``: the head mean, summed over ``layers`` layers in one launch.

    With ``q_units``/``k_units`` (int64 ``[layers]`` on the device), layer ``i`` reads its query and
    keys ``16 * q_units[i]`` and ``16 * k_units[i]`` bytes past ``q`` and ``k``, with their shapes
    and strides.
    """
    batch, heads_q, rows, head_dim = q.shape
    heads_kv, num_keys = k.shape[1], k.shape[2]
    width = checked.num_image_keys
    args = _launch_args(q, k, checked, q_units, k_units)
    if batch == 0 or width == 0 or rows == 0:
        return torch.zeros(batch, rows, width, dtype=torch.float32, device=q.device)
    group = heads_q // heads_kv
    # Entries past a sample's own image_len are never written: zeros, not garbage.
    partial = torch.zeros(layers, batch, heads_kv, rows, width, dtype=torch.float32, device=q.device)
    # The image keys' scores per query head, written and read back by the same program.
    scores = torch.empty(layers * batch * heads_q * rows * width, dtype=torch.float32, device=q.device)
    _image_attention_kernel[(heads_kv, batch, layers * rows)](
        *args.pointers, scores, partial, *args.strides,
        batch, heads_kv, rows, num_keys, head_dim, width, float(scale) * _LOG2E,
        GROUP=group, BLOCK_M=max(_MIN_DOT, _next_power_of_2(group)), **args.constexprs,
    )
    return partial.sum(dim=(0, 2)).div_(heads_q)


def _launch_rows_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    checked: _Inputs,
    scale: float,
    *,
    layers: int = 1,
    q_units: torch.Tensor | None = None,
    k_units: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`_launch_kernel` for many query rows sharing their keys (a window of decode steps).

    ``_image_attention_rows_kernel`` reads each key tile once for a block of rows and needs no
    scratch beyond ``[layers, B, R, N]`` fp32 and the per-pair softmax statistics.
    """
    batch, heads_q, rows, head_dim = q.shape
    heads_kv, num_keys = k.shape[1], k.shape[2]
    width = checked.num_image_keys
    args = _launch_args(q, k, checked, q_units, k_units)
    if batch == 0 or width == 0 or rows == 0:
        return torch.zeros(batch, rows, width, dtype=torch.float32, device=q.device)
    group = heads_q // heads_kv
    group_p = _next_power_of_2(group)
    # At least _MIN_DOT pairs per program (tl.dot's smallest M), at most the tiles' max_pairs.
    rows_p = max(min(_next_power_of_2(rows), max(1, args.tiles.max_pairs // group_p)), max(1, _MIN_DOT // group_p))
    row_blocks = -(-rows // rows_p)
    partial = torch.zeros(layers, batch, rows, width, dtype=torch.float32, device=q.device)
    stats = torch.empty(layers * batch * row_blocks * heads_kv * 2 * rows_p * group_p, dtype=torch.float32,
                        device=q.device)
    _image_attention_rows_kernel[(batch, row_blocks, layers)](
        *args.pointers, stats, partial, *args.strides,
        batch, heads_kv, rows, row_blocks, num_keys, head_dim, width, float(scale) * _LOG2E,
        GROUP=group, GROUP_P=group_p, ROWS_P=rows_p, PAIRS=rows_p * group_p, **args.constexprs,
    )
    return partial.sum(dim=0).div_(heads_q)


def image_attention_layers_triton_into(
    out: torch.Tensor,
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    scales: list[float],
    *,
    image_start: torch.Tensor,
    image_len: torch.Tensor,
    key_start: torch.Tensor,
    key_end: torch.Tensor,
    gap_start: torch.Tensor | None = None,
    gap_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add, for several layers, the Triton kernel's :func:`image_attention` result into ``out``; return ``out``.

    The attention probe's GPU hot path, the counterpart of :func:`image_attention_layers_cpp_into`:
    the probe collects a window of generation steps (query rows ``[B, Hq, R, D]``, one per step, the
    newest keys ``[B, Hkv, L, D]`` and scale per layer) and makes one call per window. When the
    layers share shapes, strides, dtype
    and scale (every decoder of one model does) they run as **one** kernel launch, the layer being
    a grid axis; otherwise one launch per layer. ``out`` is float32 ``[B, R, N]`` on the device of
    the queries; the indices are int64 tensors there, not validated (the kernel clamps every read
    into the keys), as :func:`image_attention` with ``validate=False``.
    """
    if not queries or len(queries) != len(keys) or len(keys) != len(scales):
        raise ValueError(f"queries, keys and scales must be non-empty and of one length, got {len(queries)}, "
                         f"{len(keys)} and {len(scales)}")
    q0, k0 = queries[0], keys[0]
    batch, _, rows, _ = q0.shape
    if out.dtype != torch.float32 or out.device != q0.device or _shape(out)[:2] != (batch, rows) or out.dim() != 3:
        raise ValueError(f"out must be float32 [B={batch}, R={rows}, N] on {q0.device}, got {out.dtype} "
                         f"{_shape(out)} on {out.device}")
    checked = _Inputs(image_start, image_len, key_start, key_end, out.shape[-1], gap_start, gap_end)
    uniform = all(
        q.shape == q0.shape and q.stride() == q0.stride() and q.dtype == q0.dtype and q.device == q0.device
        and k.shape == k0.shape
        and k.stride() == k0.stride() and k.dtype == q0.dtype and k.device == q0.device and scale == scales[0]
        for q, k, scale in zip(queries, keys, scales)
    )
    q_base = min(queries, key=lambda t: t.data_ptr())
    k_base = min(keys, key=lambda t: t.data_ptr())
    units = [t.data_ptr() - base.data_ptr() for base, group in ((q_base, queries), (k_base, keys)) for t in group]
    launch = _launch_rows_kernel if rows > 1 and _rows_kernel_usable() else _launch_kernel
    if not uniform or len(queries) == 1 or any(delta % _ALIGN_BYTES for delta in units):
        for q, k, scale in zip(queries, keys, scales):
            out += _guarded(launch, q, k, checked, float(scale))
        return out
    table = torch.tensor([delta // _ALIGN_BYTES for delta in units], dtype=torch.int64)
    if q0.device.type == "cuda":  # pinned, so the copy does not wait for the stream
        table = table.pin_memory().to(q0.device, non_blocking=True)
    layers = len(queries)
    out += _guarded(launch, q_base, k_base, checked, float(scales[0]), layers=layers, q_units=table[:layers],
                    k_units=table[layers:])
    return out


_ROWS_KERNEL_FAILED: list[str] = []  # why the row-block kernel is off in this process, if it failed


def _rows_kernel_usable() -> bool:
    return not _ROWS_KERNEL_FAILED


def _guarded(launch: Any, q: torch.Tensor, k: torch.Tensor, checked: _Inputs, scale: float, **layered: Any) -> torch.Tensor:
    """``launch(...)``; if the row-block kernel fails (it has not yet run natively on every GPU), warn once
    and compute the rows one at a time with the per-row kernel instead, from then on in this process."""
    if launch is not _launch_rows_kernel:
        return launch(q, k, checked, scale, **layered)
    try:
        return launch(q, k, checked, scale, **layered)
    except torch.OutOfMemoryError:
        raise  # not the kernel's fault: the caller sees it as from any other op
    except Exception as error:  # a compile or launch failure of this kernel only; the fallback is exact
        _ROWS_KERNEL_FAILED.append(f"{type(error).__name__}: {error}")
        warnings.warn(f"the row-block image_attention kernel failed ({_ROWS_KERNEL_FAILED[-1][:300]}); "
                      "falling back to one launch per query row", RuntimeWarning, stacklevel=3)
    rows = q.shape[2]
    parts = []
    for row in range(rows):
        one = dataclasses.replace(checked, key_end=checked.key_end[:, row : row + 1])
        parts.append(_launch_kernel(q[:, :, row : row + 1], k, one, scale, **layered))
    return torch.cat(parts, dim=1)


def _host_float32(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == torch.float32


def _host_array(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return t if isinstance(t, np.ndarray) else t.detach().contiguous().numpy()


def _host_rows(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """q or k as a NumPy view for the C++ core, which takes any strides with a contiguous last dimension.

    A key cache's views of a buffer with spare room pass without a copy.
    """
    if isinstance(t, np.ndarray):
        return t
    t = t.detach()
    return (t if t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()).numpy()


def image_attention_cpp_into(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    image_start: torch.Tensor | np.ndarray,
    image_len: torch.Tensor | np.ndarray,
    key_start: torch.Tensor | np.ndarray,
    key_end: torch.Tensor | np.ndarray,
    scale: float,
    gap_start: torch.Tensor | np.ndarray | None = None,
    gap_end: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Add the C++ host path's :func:`image_attention` result into ``out`` and return ``out``.

    For the attention probe's per-layer hot path on the CPU: no Python-side checks (the probe
    checks its spans once), while the C++ side still checks every dtype and shape and clamps every
    index. ``q``/``k`` are float32 CPU tensors; the indices int64 CPU tensors or NumPy arrays (the
    probe converts them once per step); ``out`` a
    contiguous float32 CPU tensor ``[B, R, N]`` (``N`` = the number of image keys to keep). Large
    calls run on at most ``torch.get_num_threads()`` OpenMP threads; the result does not depend on it.
    """
    return image_attention_layers_cpp_into(
        out, [q], [k], [scale], image_start=image_start, image_len=image_len, key_start=key_start, key_end=key_end,
        gap_start=gap_start, gap_end=gap_end,
    )


def image_attention_layers_cpp_into(
    out: torch.Tensor,
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    scales: list[float],
    *,
    image_start: torch.Tensor | np.ndarray,
    image_len: torch.Tensor | np.ndarray,
    key_start: torch.Tensor | np.ndarray,
    key_end: torch.Tensor | np.ndarray,
    gap_start: torch.Tensor | np.ndarray | None = None,
    gap_end: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """:func:`image_attention_cpp_into` for several layers in one C++ call, added into ``out`` in layer order.

    One query ``[B, Hq, R, D]``, key ``[B, Hkv, L, D]`` and scale per layer, the same indices for
    all. The probe collects a window of generation steps (one query row each) and makes one call
    per window: the result has the bits of one call per layer and per step, without the Python
    around each.
    """
    from pixfound import _C

    if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 CPU tensor, got {out.dtype} on {out.device}")
    gaps = [None if gap is None else _host_array(gap) for gap in (gap_start, gap_end)]
    _C.image_attention_layers([_host_rows(q) for q in queries], [_host_rows(k) for k in keys],
                              [float(s) for s in scales], _host_array(image_start), _host_array(image_len),
                              _host_array(key_start), _host_array(key_end), out.shape[-1], *gaps, out=out.numpy(),
                              num_threads=torch.get_num_threads())
    return out


def _image_attention_cpp(q: torch.Tensor, k: torch.Tensor, checked: _Inputs, scale: float) -> torch.Tensor:
    """The C++ host path (``pixfound._C.image_attention``): one call instead of a dozen torch ops."""
    if not _host_float32(q):
        raise ValueError(f"backend='cpp' takes float32 CPU tensors, got {q.dtype} on {q.device}")
    out = torch.zeros(q.shape[0], q.shape[2], checked.num_image_keys, dtype=torch.float32)
    return image_attention_cpp_into(
        out, q, k, image_start=checked.image_start, image_len=checked.image_len, key_start=checked.key_start,
        key_end=checked.key_end, scale=scale, gap_start=checked.gap_start, gap_end=checked.gap_end,
    )


def choose_backend(backend: str, q: torch.Tensor, k: torch.Tensor) -> str:
    """What :func:`image_attention` runs for these tensors: ``"triton"``, ``"cpp"`` or ``"torch"``."""
    if backend == "cpp" or (backend == "auto" and _host_float32(q) and not use_triton(q, k)):
        return "cpp"
    return resolve_backend(backend, q, k)


def image_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    image_start: torch.Tensor,
    image_len: torch.Tensor,
    key_start: torch.Tensor,
    key_end: torch.Tensor,
    scale: float,
    backend: str = "auto",
    validate: bool = True,
    num_image_keys: int | None = None,
    gap_start: torch.Tensor | None = None,
    gap_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean softmax attention of query rows to the image keys, with the full-row denominator.

    Args:
        q: ``[B, Hq, R, D]`` query rows (float32, float16 or bfloat16; any strides).
        k: ``[B, Hkv, L, D]`` keys, same dtype and device; ``Hq % Hkv == 0`` and query head ``h``
            reads kv head ``h // (Hq // Hkv)`` (grouped-query attention).
        image_start: int ``[B]``, index of each sample's first image key.
        image_len: int ``[B]``, number of image keys per sample (may differ between samples).
        key_start: int ``[B]``, first valid key (keys before it are left padding).
        key_end: int ``[B, R]``, exclusive end of the valid keys of each row (``position + 1``).
        scale: softmax scale applied to ``q . k``.
        backend: ``"auto"`` (Triton on CUDA, or on CPU under ``TRITON_INTERPRET=1``; float32 on the
            CPU otherwise runs the C++ core; anything else the torch reference), ``"triton"``,
            ``"cpp"`` or ``"torch"`` (the reference).
        validate: check the index values (spans inside ``[0, L]``, ``key_end >= key_start``, lengths
            >= 0). This copies the four index tensors to the host once, which synchronises a GPU;
            the attention probe's hot path passes ``validate=False`` with ``num_image_keys``, and
            then the call never synchronises (the kernel still clamps every read into ``[0, L)``).
        num_image_keys: width ``N`` of the result. ``None`` means ``max(image_len)``, which needs
            the host copy above (or one sync when ``validate=False``).
        gap_start, gap_end: int ``[B]`` each, or both ``None`` (the default: no gap). Keys
            ``gap_start[b] <= j < gap_end[b]`` (e.g. the padding between a shared prefix and each
            sample's own prompt) are left out of the valid keys: probability 0, no share of the
            denominator, also inside the image span. ``gap_end <= gap_start`` is an empty gap.
            ``validate`` checks ``0 <= gap_start <= gap_end <= L``; unvalidated values are clamped.

    The index tensors may live on the CPU or on the device of ``q``.

    Returns:
        float32 ``[B, R, N]``: entry ``[b, r, j]`` is the mean over the ``Hq`` heads of the softmax
        over keys ``[key_start[b], key_end[b, r])`` (minus the gap) at key ``image_start[b] + j``. It is 0 for
        ``j >= image_len[b]`` and for image keys outside the valid range; it is not renormalised
        over the image keys, so each row sums to at most 1.

    Raises:
        ValueError: on a bad shape, dtype, device, scale or index value, naming the argument.
    """
    checked = _check_inputs(
        q, k, image_start, image_len, key_start, key_end, scale, validate, num_image_keys, gap_start, gap_end
    )
    chosen = choose_backend(backend, q, k)
    if chosen == "cpp":
        return _image_attention_cpp(q, k, checked, float(scale))
    if chosen == "torch":
        return _reference_math(q, k, checked, float(scale))
    return _image_attention_triton(q, k, checked, float(scale))
