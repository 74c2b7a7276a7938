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

import math
import numbers
from dataclasses import dataclass
import numpy as np
import torch

from pixfound._kernels._backend import resolve_backend, use_triton

__all__ = [
    "choose_backend",
    "image_attention",
    "image_attention_cpp_into",
    "image_attention_layers_cpp_into",
    "image_attention_layers_triton_into",
    "image_attention_reference",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
# Triton kernels (pixfound.triton_kernels.image_attention)
# ----------------------------------------------------------------------------------------------
def _image_attention_triton(q: torch.Tensor, k: torch.Tensor, checked: _Inputs, scale: float) -> torch.Tensor:
    from pixfound.triton_kernels.image_attention import image_attention_triton

    return image_attention_triton([q], [k], [scale], image_start=checked.image_start, image_len=checked.image_len,
                                  key_start=checked.key_start, key_end=checked.key_end, gap_start=checked.gap_start,
                                  gap_end=checked.gap_end, num_image_keys=checked.num_image_keys)


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
    """Add the Triton kernels' result for several layers into ``out`` (float32 ``[B, R, N]``); return ``out``."""
    from pixfound.triton_kernels.image_attention import image_attention_triton

    if out.dtype != torch.float32 or out.dim() != 3 or (queries and (
            out.device != queries[0].device or _shape(out)[:2] != (queries[0].shape[0], queries[0].shape[2]))):
        raise ValueError(f"out must be float32 [B, R, N] on the queries' device, got {out.dtype} {_shape(out)} "
                         f"on {out.device}")
    out += image_attention_triton(queries, keys, scales, image_start=image_start, image_len=image_len,
                                  key_start=key_start, key_end=key_end, gap_start=gap_start, gap_end=gap_end,
                                  num_image_keys=out.shape[-1])
    return out


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
