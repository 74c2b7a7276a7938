"""The image-attention Triton kernel against its torch reference.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and the kernel runs in
Triton's interpreter on CPU tensors, so sizes stay small. With CUDA every test runs natively.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch

from pixfound._kernels._backend import use_triton
from pixfound._kernels.image_attention import image_attention, image_attention_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

requires_triton = pytest.mark.skipif(
    not use_triton(torch.empty(0, device=DEVICE)),
    reason="Triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 and an importable triton)",
)


@dataclass(frozen=True)
class Case:
    batch: int
    heads_q: int
    heads_kv: int
    rows: int
    num_keys: int
    head_dim: int
    image_at: str  # where the image span sits in the valid keys: start | middle | end | straddle


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    image_start: torch.Tensor
    image_len: torch.Tensor
    key_start: torch.Tensor
    key_end: torch.Tensor
    scale: float

    def kwargs(self) -> dict[str, object]:
        return dict(
            image_start=self.image_start,
            image_len=self.image_len,
            key_start=self.key_start,
            key_end=self.key_end,
            scale=self.scale,
        )


def make_inputs(case: Case, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Inputs:
    """Random q/k and a random layout per sample: left padding, image span, causal row ends."""
    gen = torch.Generator().manual_seed(seed)

    def randint(low: int, high: int) -> int:  # inclusive bounds
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    num_keys = case.num_keys
    image_start, image_len, key_start, key_end = [], [], [], []
    for b in range(case.batch):
        first = 0 if b == 0 else randint(0, num_keys // 4)  # sample 0 is the longest prompt
        valid = num_keys - first
        length = randint(max(1, valid // 2), valid)
        if case.image_at == "start":
            start = first
        elif case.image_at == "middle":
            start = first + (valid - length) // 2
        elif case.image_at == "end":
            start = first + valid - length
        else:  # straddle: part of the span lies in the left padding and gets probability 0
            start = max(0, first - length // 2)
        # Row r is the query at position L - R + r (causal), sometimes earlier, cutting the span.
        ends = [max(first, num_keys - (case.rows - 1 - r) - randint(0, valid // 3)) for r in range(case.rows)]
        image_start.append(start)
        image_len.append(length)
        key_start.append(first)
        key_end.append(ends)

    def tensor(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=DEVICE)

    q = torch.randn(case.batch, case.heads_q, case.rows, case.head_dim, generator=gen)
    k = torch.randn(case.batch, case.heads_kv, num_keys, case.head_dim, generator=gen)
    # Some heads with large scores make the softmax peaked, as in real attention.
    q[:, ::2] *= 3.0
    return Inputs(
        q=q.to(device=DEVICE, dtype=dtype),
        k=k.to(device=DEVICE, dtype=dtype),
        image_start=tensor(image_start),
        image_len=tensor(image_len),
        key_start=tensor(key_start),
        key_end=tensor(key_end),
        scale=case.head_dim**-0.5,
    )


CASES = [
    Case(batch=1, heads_q=1, heads_kv=1, rows=1, num_keys=1, head_dim=8, image_at="start"),
    Case(batch=2, heads_q=3, heads_kv=3, rows=2, num_keys=7, head_dim=8, image_at="end"),
    Case(batch=3, heads_q=4, heads_kv=2, rows=1, num_keys=7, head_dim=16, image_at="middle"),
    Case(batch=2, heads_q=8, heads_kv=2, rows=2, num_keys=130, head_dim=16, image_at="start"),
    Case(batch=3, heads_q=2, heads_kv=1, rows=2, num_keys=130, head_dim=32, image_at="straddle"),
    Case(batch=2, heads_q=6, heads_kv=3, rows=1, num_keys=257, head_dim=24, image_at="middle"),
    Case(batch=2, heads_q=8, heads_kv=8, rows=2, num_keys=700, head_dim=32, image_at="end"),
    Case(batch=2, heads_q=4, heads_kv=1, rows=2, num_keys=700, head_dim=8, image_at="middle"),
]


def case_id(case: Case) -> str:
    return (
        f"B{case.batch}-H{case.heads_q}/{case.heads_kv}-R{case.rows}-L{case.num_keys}-D{case.head_dim}-{case.image_at}"
    )


def run_kernel(inputs: Inputs, **options: object) -> torch.Tensor:
    return image_attention(inputs.q, inputs.k, backend="triton", **inputs.kwargs(), **options)


def run_reference(inputs: Inputs, **options: object) -> torch.Tensor:
    return image_attention_reference(inputs.q, inputs.k, **inputs.kwargs(), **options)


def test_reference_matches_explicit_per_head_loop() -> None:
    """The vectorised reference against the definition, written out one sample/head/row at a time."""
    case = Case(batch=3, heads_q=4, heads_kv=2, rows=2, num_keys=23, head_dim=8, image_at="straddle")
    inputs = make_inputs(case, seed=11)
    got = run_reference(inputs, compute_dtype=torch.float64)
    width = int(inputs.image_len.max())
    expected = torch.zeros(case.batch, case.rows, width, dtype=torch.float64)
    group = case.heads_q // case.heads_kv
    for b in range(case.batch):
        first, start, length = int(inputs.key_start[b]), int(inputs.image_start[b]), int(inputs.image_len[b])
        for r in range(case.rows):
            end = int(inputs.key_end[b, r])
            for h in range(case.heads_q):
                scores = inputs.k[b, h // group, first:end].double() @ inputs.q[b, h, r].double() * inputs.scale
                probs = torch.zeros(case.num_keys, dtype=torch.float64)
                probs[first:end] = torch.softmax(scores, dim=0)
                expected[b, r, :length] += probs[start : start + length].cpu() / case.heads_q
    torch.testing.assert_close(got.cpu().double(), expected, atol=1e-6, rtol=0)


@requires_triton
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_matches_reference_fp32(case: Case) -> None:
    inputs = make_inputs(case, seed=case.num_keys + case.heads_q)
    got = run_kernel(inputs)
    assert got.dtype == torch.float32
    assert got.shape == (case.batch, case.rows, int(inputs.image_len.max()))
    torch.testing.assert_close(got, run_reference(inputs), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.double(), run_reference(inputs, compute_dtype=torch.float64), atol=1e-6, rtol=0)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[6]], ids=case_id)
def test_kernel_low_precision_within_flash_attention_bound(case: Case, dtype: torch.dtype) -> None:
    """flash-attention's rule: the kernel's error against the fp64 answer on the same rounded inputs
    stays within twice the error of a PyTorch implementation in the input precision."""
    inputs = make_inputs(case, dtype=dtype, seed=7 * case.num_keys)
    exact = run_reference(inputs, compute_dtype=torch.float64).double()
    same_precision = run_reference(inputs, compute_dtype=dtype).double()
    kernel_error = (run_kernel(inputs).double() - exact).abs().max().item()
    baseline_error = (same_precision - exact).abs().max().item()
    assert baseline_error > 0, "the same-precision baseline should carry rounding error"
    assert kernel_error <= 2 * baseline_error + 1e-6, (kernel_error, baseline_error)


@requires_triton
def test_auto_backend_runs_the_kernel_here() -> None:
    inputs = make_inputs(CASES[3], seed=3)
    got = image_attention(inputs.q, inputs.k, **inputs.kwargs())  # backend="auto"
    torch.testing.assert_close(got, run_reference(inputs), atol=1e-6, rtol=0)


@requires_triton
def test_kernel_reads_strided_views_and_int32_indices() -> None:
    """q and k as transposed views of [B, L, H, D] projections, the probe's layout."""
    case = Case(batch=2, heads_q=6, heads_kv=2, rows=2, num_keys=45, head_dim=16, image_at="middle")
    inputs = make_inputs(case, seed=5)
    q_view = inputs.q.transpose(1, 2).contiguous().transpose(1, 2)
    k_view = inputs.k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_view.is_contiguous() and not k_view.is_contiguous()
    strided = replace(
        inputs,
        q=q_view,
        k=k_view,
        image_start=inputs.image_start.int(),
        key_end=inputs.key_end.t().contiguous().t(),  # a non-contiguous [B, R] too
    )
    torch.testing.assert_close(run_kernel(strided), run_reference(inputs), atol=1e-6, rtol=0)


@requires_triton
def test_row_mass_is_one_when_the_image_span_covers_every_valid_key() -> None:
    case = Case(batch=3, heads_q=4, heads_kv=2, rows=2, num_keys=90, head_dim=16, image_at="start")
    inputs = make_inputs(case, seed=13)
    # The span runs from the first valid key to the last key; row 0 ends earlier, so its
    # last image keys are masked, but every one of its valid keys is still in the span.
    covering = replace(inputs, image_start=inputs.key_start, image_len=case.num_keys - inputs.key_start)
    covering.key_end[:, 0] = torch.maximum(covering.key_end[:, 0], covering.key_start + 1)
    mass = run_kernel(covering).sum(dim=-1)
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-5, rtol=0)


@requires_triton
@pytest.mark.parametrize("case", [CASES[4], CASES[5]], ids=case_id)
def test_row_mass_is_at_most_one(case: Case) -> None:
    mass = run_kernel(make_inputs(case, seed=17)).sum(dim=-1)
    assert (mass >= 0).all() and (mass <= 1 + 1e-5).all(), mass


@requires_triton
def test_rows_without_valid_or_image_keys_give_zeros_not_nan() -> None:
    case = Case(batch=3, heads_q=2, heads_kv=1, rows=2, num_keys=20, head_dim=8, image_at="middle")
    inputs = make_inputs(case, seed=19)
    inputs.key_start[:] = torch.tensor([4, 0, 10])
    inputs.key_end[:] = torch.tensor([[4, 20], [20, 20], [20, 20]])  # sample 0, row 0: no valid key
    inputs.image_start[:] = torch.tensor([6, 2, 0])
    inputs.image_len[:] = torch.tensor([5, 0, 9])  # sample 1: no image; sample 2: image all in padding
    got = run_kernel(inputs)
    assert torch.isfinite(got).all()
    assert (got[0, 0] == 0).all() and (got[1] == 0).all() and (got[2] == 0).all()
    assert got[0, 1].sum() > 0
    torch.testing.assert_close(got, run_reference(inputs), atol=1e-6, rtol=0)


@requires_triton
def test_unvalidated_call_with_given_width_matches_and_pads_with_zeros() -> None:
    inputs = make_inputs(CASES[3], seed=23)
    width = int(inputs.image_len.max())
    expected = run_reference(inputs)
    got = run_kernel(inputs, validate=False, num_image_keys=width + 5)
    assert got.shape[-1] == width + 5
    torch.testing.assert_close(got[..., :width], expected, atol=1e-6, rtol=0)
    assert (got[..., width:] == 0).all()


@requires_triton
def test_unvalidated_out_of_range_indices_are_clamped_not_read() -> None:
    """Without validation the kernel still never reads outside k: key ranges clamp to [0, L]."""
    inputs = make_inputs(CASES[2], seed=29)
    wild = replace(inputs, key_end=inputs.key_end + 1000, key_start=inputs.key_start - 1000)
    widened = replace(
        inputs,
        key_end=torch.full_like(inputs.key_end, CASES[2].num_keys),
        key_start=torch.zeros_like(inputs.key_start),
    )
    torch.testing.assert_close(run_kernel(wild, validate=False), run_reference(widened), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_backend_is_the_reference(dtype: torch.dtype) -> None:
    inputs = make_inputs(CASES[4], dtype=dtype, seed=31)
    got = image_attention(inputs.q, inputs.k, backend="torch", **inputs.kwargs())
    assert torch.equal(got, run_reference(inputs))


def _set(field: str, value: Callable[[Inputs], object]) -> Callable[[Inputs], Inputs]:
    def mutate(inputs: Inputs) -> Inputs:
        return replace(inputs, **{field: value(inputs)})

    return mutate


BAD_INPUTS = [
    ("q-rank", _set("q", lambda x: x.q[0]), r"q must have shape \[B, Hq, R, D\] \(4 dims\), got shape \(4, 2, 16\)"),
    ("k-rank", _set("k", lambda x: x.k[..., None]), r"k must have shape \[B, Hkv, L, D\]"),
    ("q-int-dtype", _set("q", lambda x: x.q.to(torch.int32)), r"q must be float32, float16 or bfloat16"),
    ("dtype-mismatch", _set("k", lambda x: x.k.half()), r"k must have the dtype of q \(torch.float32\)"),
    ("device-mismatch", _set("k", lambda x: x.k.to("meta")), r"q and k must be on the same device"),
    ("index-device", _set("key_start", lambda x: x.key_start.to("meta")), r"key_start is on meta"),
    ("batch-mismatch", _set("k", lambda x: x.k[:1]), r"k has batch size 1 but q has 3"),
    ("head-dim-mismatch", _set("k", lambda x: x.k[..., :8]), r"k has head dim 8 but q has 16"),
    (
        "gqa-ratio",
        _set("k", lambda x: x.k.repeat(1, 3, 1, 1)[:, :3]),
        r"query heads \(4\) must be a multiple of the kv heads \(3\)",
    ),
    ("float-index", _set("image_start", lambda x: x.image_start.float()), r"image_start must have an integer dtype"),
    ("index-shape", _set("key_end", lambda x: x.key_end[:, 0]), r"key_end must have shape \(3, 2\), got \(3,\)"),
    ("index-type", _set("image_len", lambda x: [3, 3, 3]), r"image_len must be an integer torch.Tensor"),
    ("negative-length", _set("image_len", lambda x: x.image_len - 100), r"image_len must be >= 0, got image_len\[0\]"),
    ("negative-start", _set("image_start", lambda x: x.image_start - 100), r"image_start must be >= 0"),
    ("span-beyond-keys", _set("image_start", lambda x: x.image_start + 30), r"image span of sample 0 ends beyond"),
    ("key-start-beyond", _set("key_start", lambda x: x.key_start + 100), r"key_start must lie in \[0, L = 40\]"),
    ("end-before-start", _set("key_end", lambda x: x.key_start[:, None].repeat(1, 2) - 1), r"key_end must be >= key_"),
    ("end-beyond-keys", _set("key_end", lambda x: x.key_end + 5), r"key_end must be <= L = 40"),
    ("scale-nan", _set("scale", lambda x: float("nan")), r"scale must be a finite real number"),
    ("scale-tensor", _set("scale", lambda x: torch.tensor(0.5)), r"scale must be a finite real number"),
]


@pytest.mark.parametrize("fn", [image_attention, image_attention_reference], ids=["image_attention", "reference"])
@pytest.mark.parametrize("mutate, message", [bad[1:] for bad in BAD_INPUTS], ids=[bad[0] for bad in BAD_INPUTS])
def test_bad_input_raises_value_error(
    fn: Callable[..., torch.Tensor], mutate: Callable[[Inputs], Inputs], message: str
) -> None:
    case = Case(batch=3, heads_q=4, heads_kv=2, rows=2, num_keys=40, head_dim=16, image_at="end")
    inputs = mutate(make_inputs(case, seed=37))
    with pytest.raises(ValueError, match=message):
        fn(inputs.q, inputs.k, **inputs.kwargs())


def test_too_small_width_and_unknown_backend_raise_value_error() -> None:
    inputs = make_inputs(CASES[3], seed=41)
    with pytest.raises(ValueError, match=r"num_image_keys = 1 is smaller than image_len"):
        image_attention(inputs.q, inputs.k, **inputs.kwargs(), num_image_keys=1)
    with pytest.raises(ValueError, match=r"num_image_keys must be a non-negative int"):
        image_attention(inputs.q, inputs.k, **inputs.kwargs(), num_image_keys=-1)
    with pytest.raises(ValueError, match=r"backend must be 'auto', 'triton' or 'torch'"):
        image_attention(inputs.q, inputs.k, **inputs.kwargs(), backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="native kernel test needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_native_cuda_kernel_at_model_sizes(dtype: torch.dtype) -> None:
    """LLaVA-like sizes (576 image keys, head dim 128) and Qwen2-VL-like GQA (28/4 heads)."""
    for case in (
        Case(batch=4, heads_q=32, heads_kv=32, rows=2, num_keys=700, head_dim=128, image_at="middle"),
        Case(batch=3, heads_q=28, heads_kv=4, rows=1, num_keys=2049, head_dim=128, image_at="straddle"),
    ):
        inputs = make_inputs(case, dtype=dtype, seed=43)
        got = run_kernel(inputs, validate=False, num_image_keys=int(inputs.image_len.max()))
        exact = run_reference(inputs, compute_dtype=torch.float64).double()
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), exact, atol=1e-6, rtol=0)
        else:
            baseline_error = (run_reference(inputs, compute_dtype=dtype).double() - exact).abs().max().item()
            assert (got.double() - exact).abs().max().item() <= 2 * baseline_error + 1e-6


# ----------------------------------------------------------------------------------------------
# The C++ host path (backend="cpp"; what "auto" runs for float32 CPU tensors without the interpreter)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpp_matches_reference_fp32(case: Case) -> None:
    inputs = make_inputs(case, seed=case.num_keys * 3 + case.heads_kv)
    got = image_attention(inputs.q, inputs.k, backend="cpp", **inputs.kwargs())
    assert got.dtype == torch.float32 and got.shape == (case.batch, case.rows, int(inputs.image_len.max()))
    torch.testing.assert_close(got, run_reference(inputs), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.double(), run_reference(inputs, compute_dtype=torch.float64), atol=1e-6, rtol=0)


def test_cpp_reads_strided_views_clamps_indices_and_gives_zero_rows() -> None:
    case = Case(batch=3, heads_q=4, heads_kv=2, rows=2, num_keys=41, head_dim=8, image_at="straddle")
    inputs = make_inputs(case, seed=5)
    # Views transposed from [B, L, H, D], as attention layers hold them.
    q_view = inputs.q.transpose(1, 2).contiguous().transpose(1, 2)
    k_view = inputs.k.transpose(1, 2).contiguous().transpose(1, 2)
    got = image_attention(q_view, k_view, backend="cpp", **inputs.kwargs())
    torch.testing.assert_close(got, run_reference(inputs), atol=1e-6, rtol=0)
    wild = replace(inputs, key_end=inputs.key_end + 1000, key_start=inputs.key_start - 1000)
    widened = replace(inputs, key_end=torch.full_like(inputs.key_end, case.num_keys),
                      key_start=torch.zeros_like(inputs.key_start))
    torch.testing.assert_close(image_attention(wild.q, wild.k, backend="cpp", validate=False, **wild.kwargs()),
                               run_reference(widened), atol=1e-6, rtol=0)
    empty = replace(inputs, key_end=inputs.key_start[:, None].expand(-1, case.rows).clone())
    out = image_attention(empty.q, empty.k, backend="cpp", **empty.kwargs())
    assert torch.isfinite(out).all() and (out == 0).all()


def test_cpp_backend_needs_float32_host_tensors_and_rejects_bad_arrays() -> None:
    import numpy as np

    from pixfound import _C

    inputs = make_inputs(CASES[2], dtype=torch.bfloat16, seed=3)
    with pytest.raises(ValueError, match="backend='cpp' takes float32 CPU tensors"):
        image_attention(inputs.q, inputs.k, backend="cpp", **inputs.kwargs())
    q = np.zeros((1, 2, 1, 4), np.float32)
    k = np.zeros((1, 1, 5, 4), np.float32)
    index = np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="k must be float32"):
        _C.image_attention(q, k.astype(np.float64), index, index, index, np.zeros((1, 1), np.int64), 1.0, 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.image_attention(q, np.zeros((1, 1, 5, 8), np.float32)[..., ::2], index, index, index,
                           np.zeros((1, 1), np.int64), 1.0, 1)
    with pytest.raises(ValueError, match="key_end has shape"):
        _C.image_attention(q, k, index, index, index, np.zeros((1, 2), np.int64), 1.0, 1)
