"""Triton kernels of the capture op ``pixfound::image_attention`` and their launcher.

For each sample ``b``, query row ``r`` and layer, the op gives

    mean over query heads h of  softmax(q[b, h, r] . k[b, h_kv(h)] * scale)[image span of b]

with the softmax over the row's valid keys ``[key_start[b], key_end[b, r])`` minus an optional
gap ``[gap_start[b], gap_end[b])`` (the padding after a shared image prefix), summed over the
layers. The contract, the argument checks and the plain torch reference are in
:mod:`pixfound.ops.image_attention`; this module assumes checked arguments and clamps every read
into the keys.

Two kernels compute it:

* ``_image_attention_kernel``, for one query row per sample (a single decode step): one program
  per (kv head, sample, layer x row). It holds the rows of every query head that shares the kv
  head, reads the row's valid keys once in ``BLOCK_N`` tiles with an online max and sum (fp32),
  puts the image keys' scores aside in a scratch buffer ``[layers, B, Hq, R, N]`` on the way,
  and finally writes their probabilities, summed over its heads, to ``[layers, B, Hkv, R, N]``.
* ``_image_attention_rows_kernel``, for several rows sharing their keys (a window of decode
  steps): one program per (sample, block of rows, layer) goes through the kv heads in turn and
  reads each key tile once for all its rows and grouped heads: a first pass for each
  (row, head)'s max and denominator, a second over the image keys only for the probabilities,
  summed over heads in registers. Its only scratch is those statistics and ``[layers, B, R, N]``.

Both share the key-tile dot, the online softmax update, its normaliser and the prologue that
finds a layer's tensors when several layers run in one launch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pixfound.triton_kernels import interpreting

__all__ = ["DECORATED_FOR_INTERPRETER", "TILES_16BIT", "TILES_FP32", "image_attention_triton"]

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Tiles:
    """Launch shape of both kernels for one input dtype."""

    block_n: int  # keys per tile
    num_warps: int
    max_pairs: int  # row-block kernel: at most this many (query row, head) pairs per program


# 16-bit inputs: tensor-core dots; a [64, 128] key tile and a [16..64, 64] score tile stay in registers.
# fp32 inputs: FMA dots, whose operands all sit in registers: smaller tiles on 8 warps. With the 16-bit
# shape ptxas spilled up to 5 KB per thread at head_dim 128 on sm_90; with these no variant spills
# (``python tools/compile_check.py``, kept by tests/test_kernel_compile.py).
TILES_16BIT = Tiles(block_n=64, num_warps=4, max_pairs=64)
TILES_FP32 = Tiles(block_n=32, num_warps=8, max_pairs=16)

# A layered launch addresses each layer's tensors in units of this many bytes (see _layer_tensors).
_ALIGN_BYTES = 16
# tl.dot on NVIDIA GPUs needs at least 16 rows and 16 reduction columns.
_MIN_DOT = 16


# ----------------------------------------------------------------------------------------------
# Shared device functions
# ----------------------------------------------------------------------------------------------
@triton.jit
def _layer_tensors(q_ptr, k_ptr, q_units_ptr, k_units_ptr, layer, LAYERED: tl.constexpr, OFFSET_UNIT: tl.constexpr):
    """This layer's q and k when several layers (all with the shapes and strides of q and k) share a launch.

    Each layer's q and k sit a whole number of 16-byte units past q_ptr and k_ptr, the lowest
    addresses. Counting in those units keeps the 16-byte alignment of the arguments known to the
    compiler, so the key tiles still load 16 bytes at a time (a pointer loaded from a table would
    not be); unsigned, so that the interpreter's address arithmetic stays exact.
    """
    if LAYERED:
        q_ptr += tl.load(q_units_ptr + layer).to(tl.uint64) * OFFSET_UNIT
        k_ptr += tl.load(k_units_ptr + layer).to(tl.uint64) * OFFSET_UNIT
    return q_ptr, k_ptr


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
def _online_softmax(m_i, l_i, s):
    """Fold one tile of scores ``s`` [M, BLOCK_N] (log2 units, -inf = no key) into the running max and sum of exp."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _normaliser(m_i, l_i, row_ok):
    """(max, 1 / sum) of the finished rows; a row without valid keys (or a padded one) gets 1 / sum = 0, not NaN."""
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    has_keys = l_i > 0.0
    inv_l = tl.where(has_keys & row_ok, 1.0 / tl.where(has_keys, l_i, 1.0), 0.0)
    return m_safe, inv_l


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
        s = _key_dots(q_tile, k_base, stride_kl, d_ok, keys, key_ok, DOT_IN_FP32)
        s = tl.where(key_ok[None, :], s * scale_log2, float("-inf"))
        in_image = key_ok & (keys >= image_lo) & (keys < image_hi)
        tl.store(score_rows + (keys - image_lo)[None, :], s, mask=row_ok[:, None] & in_image[None, :])
        m_i, l_i = _online_softmax(m_i, l_i, s)
    return m_i, l_i


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
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
    q_ptr, k_ptr = _layer_tensors(q_ptr, k_ptr, q_units_ptr, k_units_ptr, layer, LAYERED, OFFSET_UNIT)

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
    m_safe, inv_l = _normaliser(m_i, l_i, head_ok)
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
    q_ptr, k_ptr = _layer_tensors(q_ptr, k_ptr, q_units_ptr, k_units_ptr, layer, LAYERED, OFFSET_UNIT)
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
            m_i, l_i = _online_softmax(m_i, l_i, tl.where(ok, s * scale_log2, float("-inf")))
        m_safe, inv_l = _normaliser(m_i, l_i, pair_ok)
        tl.store(stats + kv_head * 2 * PAIRS + offs_m, m_safe)
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


# Whether the kernels above were decorated under TRITON_INTERPRET=1 (Triton decides at decoration):
# only then can CPU tensors be handed to them.
DECORATED_FOR_INTERPRETER = interpreting()


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
class Index(NamedTuple):
    """The op's index tensors, int64 on the queries' device; gap_start/gap_end both None for no gap."""

    image_start: torch.Tensor  # [B]
    image_len: torch.Tensor  # [B]
    key_start: torch.Tensor  # [B]
    key_end: torch.Tensor  # [B, R]
    gap_start: torch.Tensor | None
    gap_end: torch.Tensor | None
    num_image_keys: int  # N, the width of the result


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class _LaunchArgs:
    """What the launches of both kernels share, in the kernels' parameter order."""

    pointers: tuple  # q, k, q_units, k_units, image_start, image_len, key_start, key_end, gap_start, gap_end
    strides: tuple  # q's 4, k's 4, key_end's 2
    constexprs: dict  # BLOCK_N, BLOCK_D, DOT_IN_FP32, HAS_GAP, LAYERED, OFFSET_UNIT and num_warps
    tiles: Tiles


def _launch_args(
    q: torch.Tensor, k: torch.Tensor, index: Index, q_units: torch.Tensor | None, k_units: torch.Tensor | None
) -> _LaunchArgs:
    """The arguments both kernels take alike."""
    if q.device.type == "cpu" and not DECORATED_FOR_INTERPRETER:
        raise RuntimeError(
            "the image_attention kernels were compiled for the GPU: set TRITON_INTERPRET=1 before importing "
            "pixfound.triton_kernels to run them on CPU tensors"
        )
    # fp32 inputs use IEEE fp32 (no TF32). The interpreter's dot multiplies bfloat16 as raw integers,
    # so there bf16 gets fp32 operands; products of fp16/bf16 are exact in fp32, so nothing changes.
    dot_in_fp32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and q.device.type == "cpu")
    has_gap = index.gap_start is not None and index.gap_end is not None
    layered = q_units is not None and k_units is not None
    tiles = TILES_FP32 if q.dtype == torch.float32 else TILES_16BIT
    # Pointers the compiled variant never reads (no gap, one layer) get any int64 tensor.
    unused = index.key_start
    pointers = (q, k, q_units if layered else unused, k_units if layered else unused, index.image_start,
                index.image_len, index.key_start, index.key_end, index.gap_start if has_gap else unused,
                index.gap_end if has_gap else unused)
    constexprs = dict(BLOCK_N=tiles.block_n, BLOCK_D=max(_MIN_DOT, _next_power_of_2(q.shape[-1])),
                      DOT_IN_FP32=dot_in_fp32, HAS_GAP=has_gap, LAYERED=layered,
                      OFFSET_UNIT=_ALIGN_BYTES // q.element_size(), num_warps=tiles.num_warps)
    return _LaunchArgs(pointers, (*q.stride(), *k.stride(), *index.key_end.stride()), constexprs, tiles)


def _launch_row_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    index: Index,
    scale: float,
    *,
    layers: int = 1,
    q_units: torch.Tensor | None = None,
    k_units: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 ``[B, R, N]`` from ``_image_attention_kernel``: the head mean, summed over ``layers`` layers.

    With ``q_units``/``k_units`` (int64 ``[layers]`` on the device), layer ``i`` reads its query and
    keys ``16 * q_units[i]`` and ``16 * k_units[i]`` bytes past ``q`` and ``k``, with their shapes
    and strides.
    """
    batch, heads_q, rows, head_dim = q.shape
    heads_kv, num_keys = k.shape[1], k.shape[2]
    width = index.num_image_keys
    args = _launch_args(q, k, index, q_units, k_units)
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


def _launch_row_block_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    index: Index,
    scale: float,
    *,
    layers: int = 1,
    q_units: torch.Tensor | None = None,
    k_units: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`_launch_row_kernel` for many query rows sharing their keys, with ``_image_attention_rows_kernel``.

    It reads each key tile once for a block of rows and needs no scratch beyond ``[layers, B, R, N]``
    fp32 and the per-pair softmax statistics.
    """
    batch, heads_q, rows, head_dim = q.shape
    heads_kv, num_keys = k.shape[1], k.shape[2]
    width = index.num_image_keys
    args = _launch_args(q, k, index, q_units, k_units)
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


def image_attention_triton(
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
    num_image_keys: int,
) -> torch.Tensor:
    """float32 ``[B, R, N]``: the capture op for one query ``[B, Hq, R, D]``, key ``[B, Hkv, L, D]`` and scale
    per layer, summed over the layers.

    One query row (a single decode step) runs ``_image_attention_kernel``, several (a window of
    steps) ``_image_attention_rows_kernel``. When the layers share shapes, strides, dtype and scale
    (every decoder layer of one model does) and sit on the 16-byte grid, they run as **one** launch,
    the layer being a grid axis; otherwise one launch per layer. The indices are int64 tensors on
    the queries' device and are not validated: the kernels clamp every read into the keys. A launch
    that fails raises.
    """
    if not queries or len(queries) != len(keys) or len(keys) != len(scales):
        raise ValueError(f"queries, keys and scales must be non-empty and of one length, got {len(queries)}, "
                         f"{len(keys)} and {len(scales)}")
    index = Index(image_start, image_len, key_start, key_end, gap_start, gap_end, int(num_image_keys))
    q0, k0 = queries[0], keys[0]
    launch = _launch_row_block_kernel if q0.shape[2] > 1 else _launch_row_kernel
    uniform = all(
        q.shape == q0.shape and q.stride() == q0.stride() and q.dtype == q0.dtype and q.device == q0.device
        and k.shape == k0.shape and k.stride() == k0.stride() and k.dtype == q0.dtype and k.device == q0.device
        and scale == scales[0]
        for q, k, scale in zip(queries, keys, scales)
    )
    q_base = min(queries, key=lambda t: t.data_ptr())
    k_base = min(keys, key=lambda t: t.data_ptr())
    units = [t.data_ptr() - base.data_ptr() for base, group in ((q_base, queries), (k_base, keys)) for t in group]
    if not uniform or len(queries) == 1 or any(delta % _ALIGN_BYTES for delta in units):
        out = launch(q0, k0, index, float(scales[0]))
        for q, k, scale in zip(queries[1:], keys[1:], scales[1:]):
            out += launch(q, k, index, float(scale))
        return out
    table = torch.tensor([delta // _ALIGN_BYTES for delta in units], dtype=torch.int64)
    if q0.device.type == "cuda":  # pinned, so the copy does not wait for the stream
        table = table.pin_memory().to(q0.device, non_blocking=True)
    layers = len(queries)
    return launch(q_base, k_base, index, float(scales[0]), layers=layers, q_units=table[:layers],
                  k_units=table[layers:])
