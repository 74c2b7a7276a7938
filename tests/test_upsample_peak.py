"""Fused bicubic upsample + top-k peak (Triton) against its torch reference.

The Triton cases run in the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1)
and natively when CUDA is present; sizes are kept small for the interpreter.
"""
from __future__ import annotations

import functools

import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pixfound.ops.upsample import (
    MAX_TRITON_K,
    _check_args,
    _geometry,
    upsample_peaks,
    upsample_peaks_reference,
    upsample_reference,
)
from pixfound.triton_kernels import interpreting, triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_HERE = triton_available() and (DEVICE == "cuda" or interpreting())
needs_triton = pytest.mark.skipif(
    not TRITON_HERE, reason="Triton needs CUDA, or TRITON_INTERPRET=1 set before import (tests/conftest.py)"
)


def upsample_peaks_triton(*args, **kwargs):
    """The Triton launcher itself (imported when used: it needs an importable triton)."""
    from pixfound.triton_kernels.upsample_peak import upsample_peaks_triton as launch

    return launch(*args, **kwargs)

# Upsampled values of the two implementations differ by float rounding only (torch's CPU
# kernel contracts to FMA depending on the instruction set): a few ulp of |value|.
MAPS_ATOL = 1e-5
MAPS_RTOL = 1e-5
# Two pixels whose reference values are this close count as tied: either may win.
NEAR_TIE_ATOL = 2e-5


def published_upsample(maps: torch.Tensor, size: tuple[int, int], aspect: str) -> torch.Tensor:
    """The published PixFoundation code, written out (infer_pixfoundation.py)."""
    height, width = size
    if aspect == "pad":
        side = max(height, width)
        crop_h_start = (side - height) // 2
        crop_w_start = (side - width) // 2
        up = F.interpolate(maps.float()[None], size=(side, side), mode="bicubic", align_corners=False)[0]
        return up[:, crop_h_start : crop_h_start + height, crop_w_start : crop_w_start + width]
    return F.interpolate(maps.float()[None], size=(height, width), mode="bicubic", align_corners=False)[0]


def argmax_rounds_topk(flat_maps: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k by k rounds of argmax (first maximal index) + masking: the tie rule, spelled out."""
    work = flat_maps.clone()
    picks = []
    for _ in range(k):
        best = work.argmax(dim=1)
        picks.append(best)
        work[torch.arange(work.shape[0]), best] = float("-inf")
    return torch.stack(picks, dim=1)


def assert_peaks_match(
    peaks: torch.Tensor, ref_peaks: torch.Tensor, ref_maps: torch.Tensor
) -> None:
    """Peaks equal the reference's, except that near-tied pixels may swap ranks.

    Rank by rank, the reference map's value at our peak must equal (within rounding) its
    value at the reference peak, and our peaks must be distinct pixels.
    """
    assert peaks.shape == ref_peaks.shape and peaks.dtype == torch.int64
    peaks, ref_peaks, ref_maps = peaks.cpu(), ref_peaks.cpu(), ref_maps.cpu()
    n_maps, k, _ = peaks.shape
    height, width = ref_maps.shape[1:]
    assert bool((peaks[..., 0] >= 0).all() and (peaks[..., 0] < width).all())
    assert bool((peaks[..., 1] >= 0).all() and (peaks[..., 1] < height).all())
    for g in range(n_maps):
        flat = (peaks[g, :, 1] * width + peaks[g, :, 0]).tolist()
        assert len(set(flat)) == k, f"map {g}: repeated peaks {peaks[g].tolist()}"
        ours = ref_maps[g, peaks[g, :, 1], peaks[g, :, 0]]
        theirs = ref_maps[g, ref_peaks[g, :, 1], ref_peaks[g, :, 0]]
        torch.testing.assert_close(ours, theirs, atol=NEAR_TIE_ATOL, rtol=0)
    mismatched = (peaks != ref_peaks).any(-1).sum().item()
    # Near-ties are rare on random maps: a handful at most, never the norm.
    assert mismatched <= max(1, peaks.shape[0] * k // 10), f"{mismatched} peaks differ"


# --------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("aspect", ["pad", "original"])
@pytest.mark.parametrize("grid", [(24, 24), (16, 23)])
@pytest.mark.parametrize("size", [(224, 224), (480, 640), (333, 500), (500, 333), (1, 1)])
def test_reference_upsample_is_interpolate_plus_centre_crop(aspect, grid, size):
    maps = torch.randn(3, *grid, generator=torch.Generator().manual_seed(1))
    got = upsample_reference(maps, size, aspect=aspect)
    assert got.shape == (3, *size) and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, published_upsample(maps, size, aspect), atol=0, rtol=0)


def test_reference_centre_crop_offsets_follow_published_integer_division():
    # 5 x 8 image in pad mode: S = 8, top = (8 - 5) // 2 = 1 (the odd pixel goes below).
    maps = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(2))
    full = F.interpolate(maps[None], size=(8, 8), mode="bicubic", align_corners=False)[0]
    got = upsample_reference(maps, (5, 8), aspect="pad")
    torch.testing.assert_close(got, full[:, 1:6, :], atol=0, rtol=0)
    got = upsample_reference(maps, (8, 3), aspect="pad")
    torch.testing.assert_close(got, full[:, :, 2:5], atol=0, rtol=0)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_reference_topk_matches_argmax_rounds_on_random_and_plateau_maps(k):
    gen = torch.Generator().manual_seed(3)
    random_maps = torch.randn(4, 16, 23, generator=gen)
    # Coarse quantisation makes many exact ties after upsampling.
    plateau_maps = torch.zeros(3, 24, 24)
    plateau_maps[1, 5:9, 5:9] = 1.0
    plateau_maps[2] = torch.randint(0, 2, (24, 24), generator=gen).float()
    for maps in (random_maps, plateau_maps):
        peaks, up = upsample_peaks_reference(maps, (60, 70), aspect="pad", k=k, return_maps=True)
        expected = argmax_rounds_topk(up.reshape(up.shape[0], -1), k)
        torch.testing.assert_close(peaks[..., 1] * 70 + peaks[..., 0], expected, atol=0, rtol=0)


def test_reference_zero_map_ties_go_to_lowest_flat_index():
    peaks = upsample_peaks_reference(torch.zeros(2, 24, 24), (30, 40), aspect="pad", k=3)
    assert peaks.tolist() == [[[0, 0], [1, 0], [2, 0]]] * 2


# --------------------------------------------------------------------------------------
# Fused (Triton) against the reference
# --------------------------------------------------------------------------------------

FUSED_CASES = [
    # grid, original size, aspect, k, number of maps
    ((24, 24), (224, 224), "pad", 1, 4),
    ((24, 24), (224, 224), "original", 3, 2),
    ((16, 23), (333, 500), "pad", 3, 2),
    ((16, 23), (333, 500), "original", 1, 2),
    ((24, 24), (480, 640), "pad", 3, 2),
    ((16, 23), (480, 640), "original", 1, 1),
    ((24, 24), (1, 1), "pad", 1, 3),
    ((16, 23), (1, 1), "original", 1, 3),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("grid", "size", "aspect", "k", "n_maps"), FUSED_CASES)
def test_fused_matches_reference_on_random_maps(grid, size, aspect, k, n_maps, dtype):
    seed = zlib.crc32(repr((grid, size, aspect, k)).encode())
    maps = torch.randn(n_maps, *grid, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    peaks, up = upsample_peaks(maps, size, aspect=aspect, k=k, return_maps=True, backend="triton")
    ref_peaks, ref_up = upsample_peaks_reference(maps, size, aspect=aspect, k=k, return_maps=True)
    assert up.shape == (n_maps, *size) and up.dtype == torch.float32
    torch.testing.assert_close(up, ref_up, atol=MAPS_ATOL, rtol=MAPS_RTOL)
    assert_peaks_match(peaks, ref_peaks, ref_up)
    # Without return_maps the same peaks come back (the maps are simply not stored).
    torch.testing.assert_close(
        upsample_peaks(maps, size, aspect=aspect, k=k, backend="triton"), peaks, atol=0, rtol=0
    )


@needs_triton
@pytest.mark.parametrize("k", [1, 4, MAX_TRITON_K])
def test_fused_small_tiles_merge_across_many_tiles(k):
    # 8 x 16 tiles on a 45 x 61 output: 6 x 4 tiles with ragged edges, k up to the limit.
    maps = torch.randn(2, 16, 23, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    maps32, geo = _check_args(maps, (45, 61), "pad", k)
    peaks, up = upsample_peaks_triton(maps32, geo, k, True, block_h=8, block_w=16)
    ref_peaks, ref_up = upsample_peaks_reference(maps, (45, 61), aspect="pad", k=k, return_maps=True)
    torch.testing.assert_close(up, ref_up, atol=MAPS_ATOL, rtol=MAPS_RTOL)
    assert_peaks_match(peaks, ref_peaks, ref_up)


def _hot_cell_tie_pixels(cells, size, aspect):
    """Pixels (x, y) tied at the maximum when 24x24 is upsampled by exactly 2.

    With scale 1/2 the source fractions are 0.75 and 0.25, so the 2x2 output pixels of a
    hot interior cell get the same weight cc1(0.25)^2 with identical arithmetic: exact ties.
    """
    height, width = size
    side = max(height, width) if aspect == "pad" else None
    top = (side - height) // 2 if side else 0
    left = (side - width) // 2 if side else 0
    pixels = []
    for r, c in cells:
        for dy in (0, 1):
            for dx in (0, 1):
                x, y = 2 * c + dx - left, 2 * r + dy - top
                assert 0 <= x < width and 0 <= y < height
                pixels.append((x, y))
    return sorted(pixels, key=lambda p: p[1] * width + p[0])


# Hot cells at least 3 cells apart in one coordinate (separate 4x4 footprints), off the border.
HOT_CELLS = [(10, 18), (3, 17), (10, 4), (20, 9)]


@pytest.mark.parametrize(("size", "aspect"), [((48, 48), "original"), ((48, 40), "pad"), ((44, 48), "pad")])
@pytest.mark.parametrize("backend", ["reference", "cpp", pytest.param("triton", marks=needs_triton)])
def test_exact_ties_resolve_to_lowest_flat_index(size, aspect, backend):
    maps = torch.zeros(2, 24, 24)
    for r, c in HOT_CELLS:
        maps[0, r, c] = 1.0
    maps[1, HOT_CELLS[2][0], HOT_CELLS[2][1]] = 1.0  # one hot cell: a 4-way tie
    maps = maps.to(DEVICE)
    k = 5
    if backend == "triton":
        # Small tiles so that the tied pixels sit in different programs.
        maps32, geo = _check_args(maps, size, aspect, k)
        peaks, _ = upsample_peaks_triton(maps32, geo, k, False, block_h=8, block_w=16)
    else:
        peaks = upsample_peaks(maps, size, aspect=aspect, k=k, backend=backend)
    all_tied = _hot_cell_tie_pixels(HOT_CELLS, size, aspect)
    assert peaks[0].tolist() == [list(p) for p in all_tied[:k]]
    one_cell = _hot_cell_tie_pixels([HOT_CELLS[2]], size, aspect)
    assert peaks[1, :4].tolist() == [list(p) for p in one_cell]


@needs_triton
@pytest.mark.parametrize("k", [1, 3])
def test_fused_constant_zero_maps_tie_everywhere(k):
    maps = torch.zeros(2, 16, 23, device=DEVICE)
    for block in [(None, None), (8, 16)]:
        maps32, geo = _check_args(maps, (37, 29), "pad", k)
        peaks, _ = upsample_peaks_triton(maps32, geo, k, False, block_h=block[0], block_w=block[1])
        assert peaks.tolist() == [[[i, 0] for i in range(k)]] * 2


@pytest.mark.parametrize("aspect", ["pad", "original"])
@pytest.mark.parametrize("cell", [(12, 5), (4, 20), (19, 11)])
@pytest.mark.parametrize("backend", ["reference", "cpp", pytest.param("triton", marks=needs_triton)])
def test_single_hot_cell_peak_lies_in_that_cells_pixels(aspect, cell, backend):
    height, width = 480, 640
    maps = torch.zeros(1, 24, 24)
    maps[0, cell[0], cell[1]] = 1.0
    (x, y) = upsample_peaks(maps.to(DEVICE), (height, width), aspect=aspect, backend=backend)[0, 0].tolist()
    # The cell's footprint in the (uncropped) upsampled grid, then shifted by the crop.
    full_h, full_w = (max(height, width),) * 2 if aspect == "pad" else (height, width)
    top, left = (full_h - height) // 2, (full_w - width) // 2
    cell_h, cell_w = full_h / 24, full_w / 24
    y_full, x_full = y + top, x + left
    assert cell[0] * cell_h <= y_full < (cell[0] + 1) * cell_h
    assert cell[1] * cell_w <= x_full < (cell[1] + 1) * cell_w
    # The bicubic bump peaks at the cell centre; the best pixel is the nearest one.
    assert abs(y_full - ((cell[0] + 0.5) * cell_h - 0.5)) <= 1.0
    assert abs(x_full - ((cell[1] + 0.5) * cell_w - 0.5)) <= 1.0


def test_hot_cell_pad_mode_known_location_480x640():
    # Cell (12, 5) of 24x24 in pad mode: S = 640, one cell = 640 / 24 px, crop top = 80.
    # Centre (12.5 * 640/24 - 0.5, 5.5 * 640/24 - 0.5) = (332.83, 146.17) in the square,
    # i.e. (x, y) = (146.17, 252.83) in the image; the sampled peak is the nearest pixel.
    maps = torch.zeros(1, 24, 24)
    maps[0, 12, 5] = 1.0
    for backend in ["reference", "cpp" if DEVICE == "cpu" else "auto"] + (["triton"] if TRITON_HERE else []):
        peaks = upsample_peaks(maps.to(DEVICE), (480, 640), aspect="pad", backend=backend)
        assert peaks[0, 0].tolist() == [146, 253]


@needs_triton
def test_bf16_maps_equal_their_fp32_upcast():
    maps = torch.randn(3, 24, 24, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16)
    from_bf16 = upsample_peaks(maps, (96, 128), k=3, backend="triton")
    from_fp32 = upsample_peaks(maps.float(), (96, 128), k=3, backend="triton")
    torch.testing.assert_close(from_bf16, from_fp32, atol=0, rtol=0)


class _RecordAllocations(TorchDispatchMode):
    """Records the element count of every tensor a torch op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.numels.append(item.numel())
        return out


@needs_triton
def test_fused_path_allocates_no_full_size_map():
    maps = torch.randn(4, 24, 24, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    size = (200, 300)
    with _RecordAllocations() as fused:
        upsample_peaks(maps, size, k=2, backend="triton")
    with _RecordAllocations() as reference:
        upsample_peaks(maps, size, k=2, backend="reference")
    one_map = size[0] * size[1]
    assert max(reference.numels) >= 4 * one_map  # the reference does build [G, H, W]
    assert max(fused.numels) < one_map  # the fused path never holds even one H x W map


# --------------------------------------------------------------------------------------
# C++ (host) against the reference
# --------------------------------------------------------------------------------------


CPP_CASES = [(grid, size, aspect, k, n_maps) for grid, size, aspect, _, n_maps in FUSED_CASES
             for k in (1, 3, 12) if k <= size[0] * size[1]]


@pytest.mark.parametrize(("grid", "size", "aspect", "k", "n_maps"), CPP_CASES)
def test_cpp_matches_reference_on_random_maps(grid, size, aspect, k, n_maps):
    seed = zlib.crc32(repr(("cpp", grid, size, aspect, k)).encode())
    maps = torch.randn(n_maps + 2, *grid, generator=torch.Generator().manual_seed(seed))
    peaks = upsample_peaks(maps, size, aspect=aspect, k=k, backend="cpp")
    ref_peaks, ref_up = upsample_peaks_reference(maps, size, aspect=aspect, k=k, return_maps=True)
    assert_peaks_match(peaks, ref_peaks, ref_up)
    # fp16/bf16 maps are upcast first, as on every path
    half = maps.to(torch.bfloat16)
    torch.testing.assert_close(upsample_peaks(half, size, aspect=aspect, k=k, backend="cpp"),
                               upsample_peaks(half.float(), size, aspect=aspect, k=k, backend="cpp"), atol=0, rtol=0)


def test_cpp_with_return_maps_gives_the_reference_and_auto_runs_the_core_on_cpu(monkeypatch):
    from pixfound import _C

    maps = torch.randn(3, 16, 23, generator=torch.Generator().manual_seed(11))
    got = upsample_peaks(maps, (50, 70), aspect="original", k=2, return_maps=True, backend="cpp")
    ref = upsample_peaks_reference(maps, (50, 70), aspect="original", k=2, return_maps=True)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    calls = []
    original = _C.upsample_topk
    monkeypatch.setattr(_C, "upsample_topk", lambda *a: calls.append(1) or original(*a))
    assert_peaks_match(upsample_peaks(maps, (50, 70), k=2, backend="auto"),  # also under TRITON_INTERPRET=1
                       *upsample_peaks_reference(maps, (50, 70), k=2, return_maps=True))
    assert calls == [1]


def test_cpp_core_rejects_bad_windows_and_arrays():
    import numpy as np

    from pixfound import _C

    good = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="must lie inside"):
        _C.upsample_topk(good, 10, 10, 5, 0, 6, 10, 1)
    with pytest.raises(ValueError, match="float32"):
        _C.upsample_topk(good.astype(np.float64), 10, 10, 0, 0, 10, 10, 1)
    with pytest.raises(ValueError, match="k must be between"):
        _C.upsample_topk(good, 10, 10, 0, 0, 2, 2, 5)
    with pytest.raises(ValueError, match="NaN"):
        _C.upsample_topk(np.full((1, 4, 4), np.nan, np.float32), 10, 10, 0, 0, 10, 10, 1)


# --------------------------------------------------------------------------------------
# Backends and validation
# --------------------------------------------------------------------------------------


def test_torch_backend_is_the_reference():
    maps = torch.randn(3, 16, 23, generator=torch.Generator().manual_seed(7))
    got = upsample_peaks(maps, (50, 70), aspect="original", k=2, return_maps=True, backend="reference")
    ref = upsample_peaks_reference(maps, (50, 70), aspect="original", k=2, return_maps=True)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_cpu_kernels_decorated_without_interpreter_refuse_cpu_tensors(monkeypatch):
    # TRITON_INTERPRET set only after import: the kernels were compiled for the GPU.
    import pixfound.triton_kernels.upsample_peak as triton_module

    monkeypatch.setattr(triton_module, "DECORATED_FOR_INTERPRETER", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    maps = torch.randn(2, 16, 23, generator=torch.Generator().manual_seed(9))
    got = upsample_peaks(maps, (30, 40), k=2, backend="auto")
    torch.testing.assert_close(got, upsample_peaks_reference(maps, (30, 40), k=2), atol=0, rtol=0)
    if triton_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            upsample_peaks(maps, (30, 40), k=2, backend="triton")


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
def test_k_above_triton_limit_uses_the_reference(backend):
    maps = torch.randn(2, 24, 24, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    k = MAX_TRITON_K + 1
    got = upsample_peaks(maps, (40, 30), k=k, backend=backend)
    torch.testing.assert_close(got, upsample_peaks_reference(maps, (40, 30), k=k), atol=0, rtol=0)


GOOD = torch.zeros(2, 24, 24)
BAD_CALLS = [
    (dict(maps=torch.zeros(24, 24)), "shape"),
    (dict(maps=torch.zeros(1, 2, 24, 24)), "shape"),
    (dict(maps=torch.zeros(0, 24, 24)), "non-empty"),
    (dict(maps=torch.zeros(2, 0, 24)), "non-empty"),
    (dict(maps=torch.zeros(2, 24, 24, dtype=torch.int64)), "floating"),
    (dict(maps=GOOD.numpy()), "torch.Tensor"),
    (dict(maps=torch.full((2, 24, 24), float("nan"))), "finite"),
    (dict(maps=GOOD.clone().index_put_((torch.tensor([1]),), torch.tensor(float("inf")))), "finite"),
    (dict(size=(0, 10)), "positive"),
    (dict(size=(10, -3)), "positive"),
    (dict(size=(10,)), "size"),
    (dict(size=(10, 2.5)), "integers"),
    (dict(size=10), "size"),
    (dict(aspect="square"), "aspect"),
    (dict(k=0), "k must be in"),
    (dict(k=10 * 10 + 1, size=(10, 10)), "k must be in"),
    (dict(k=1.0), "k must be an int"),
]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN/inf maps in the interpreter
@pytest.mark.parametrize("fn", [upsample_peaks, upsample_peaks_reference,
                                functools.partial(upsample_peaks, backend="cpp")], ids=["auto", "reference", "cpp"])
@pytest.mark.parametrize(("overrides", "message"), BAD_CALLS)
def test_bad_input_raises_value_error(fn, overrides, message):
    call = dict(maps=GOOD, size=(10, 12), aspect="pad", k=1) | overrides
    maps, size = call.pop("maps"), call.pop("size")
    with pytest.raises(ValueError, match=message):
        fn(maps, size, **call)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN/inf maps in the interpreter
def test_nan_error_names_the_map():
    maps = torch.zeros(3, 24, 24)
    maps[2, 4, 4] = float("nan")
    with pytest.raises(ValueError, match=r"map\(s\) \[2\]"):
        upsample_peaks(maps, (10, 10))


def test_upsample_reference_validates_too():
    with pytest.raises(ValueError, match="aspect"):
        upsample_reference(GOOD, (10, 10), aspect="stretch")
    with pytest.raises(ValueError, match="backend"):
        upsample_peaks(GOOD, (10, 10), backend="cuda")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN/inf maps in the interpreter
@pytest.mark.parametrize("backend", ["auto", "cpp", "reference", pytest.param("triton", marks=needs_triton)])
def test_nan_outside_the_cropped_window_still_raises(backend):
    """The Triton path checks the input maps inside its merge pass; a NaN whose taps never reach the
    cropped image (top rows, wide image in pad mode) must raise all the same, as on the other paths."""
    maps = torch.zeros(2, 24, 24)
    maps[1, 0, 0] = float("nan")
    assert torch.isfinite(upsample_reference(maps[:1], (10, 40))).all()
    with pytest.raises(ValueError, match=r"map\(s\) \[1\]"):
        upsample_peaks(maps, (10, 40), backend=backend)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN/inf maps in the interpreter
@needs_triton
def test_finite_check_of_the_triton_path_flags_only_bad_maps():
    device = DEVICE
    good = torch.randn(3, 24, 24, device=device)
    for bad_value, expected in ((None, 0), (float("inf"), 1), (float("-inf"), 1), (float("nan"), 1)):
        maps = good.clone()
        if bad_value is not None:
            maps[2, 23, 23] = bad_value
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        upsample_peaks_triton(maps, _geometry((30, 20), "pad"), 1, False, nonfinite=flag)
        assert int(flag.item()) == expected
