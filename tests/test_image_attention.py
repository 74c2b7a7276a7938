"""The capture op pixfound::image_attention: its C++ and Triton kernels against the torch reference.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and the Triton kernels run in
Triton's interpreter on CPU tensors, so sizes stay small. With CUDA every Triton test runs natively.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import pytest
import torch

from pixfound.errors import UserError
from pixfound.ops import attention
from pixfound.ops.attention_reference import image_attention_reference
from pixfound.ops.backends import resolve_kernel_backend
from pixfound.triton_kernels import interpreter_incompatibility, interpreting, triton_available

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU = torch.device("cpu")


TRITON_HERE = triton_available() and (DEVICE.type == "cuda" or interpreting())


def backend_device(backend: str) -> torch.device:
    """Where a backend's inputs live: the C++ path takes host tensors even on a machine with CUDA."""
    return torch.device("cpu") if backend == "cpp" else DEVICE


requires_triton = pytest.mark.skipif(
    not TRITON_HERE, reason="Triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 and an importable triton)"
)


def image_attention(q: torch.Tensor, k: torch.Tensor, *, scale: float, **options: object) -> torch.Tensor:
    """One layer of the capture op (which takes a list of layers)."""
    return attention.image_attention([q], [k], [scale], **options)


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
    gap_start: torch.Tensor | None = None  # both None: no gap (the argument is left out)
    gap_end: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Inputs":
        """The same inputs on ``device`` (every tensor field moved)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    def kwargs(self) -> dict[str, object]:
        kwargs: dict[str, object] = dict(
            image_start=self.image_start,
            image_len=self.image_len,
            key_start=self.key_start,
            key_end=self.key_end,
            scale=self.scale,
        )
        if self.gap_start is not None:
            kwargs["gap_start"] = self.gap_start
        if self.gap_end is not None:
            kwargs["gap_end"] = self.gap_end
        return kwargs


def make_inputs(case: Case, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                device: torch.device = DEVICE) -> Inputs:
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
        return torch.tensor(values, dtype=torch.int64, device=device)

    q = torch.randn(case.batch, case.heads_q, case.rows, case.head_dim, generator=gen)
    k = torch.randn(case.batch, case.heads_kv, num_keys, case.head_dim, generator=gen)
    # Some heads with large scores make the softmax peaked, as in real attention.
    q[:, ::2] *= 3.0
    return Inputs(
        q=q.to(device=device, dtype=dtype),
        k=k.to(device=device, dtype=dtype),
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
    assert_within_flash_attention_bound(make_inputs(case, dtype=dtype, seed=7 * case.num_keys), dtype)


def assert_within_flash_attention_bound(inputs: Inputs, dtype: torch.dtype) -> None:
    """The kernel's error against fp64 is at most twice that of the reference computed in ``dtype``."""
    exact = run_reference(inputs, compute_dtype=torch.float64).double()
    same_precision = run_reference(inputs, compute_dtype=dtype).double()
    kernel_error = (run_kernel(inputs).double() - exact).abs().max().item()
    baseline_error = (same_precision - exact).abs().max().item()
    assert baseline_error > 0, "the same-precision baseline should carry rounding error"
    assert kernel_error <= 2 * baseline_error + 1e-6, (kernel_error, baseline_error)


def test_auto_backend_runs_the_op_registered_for_the_device() -> None:
    """auto: the C++ core for CPU tensors, Triton for CUDA tensors, through torch's dispatcher."""
    assert resolve_kernel_backend("auto", "cpu") == "cpp"
    if triton_available():
        assert resolve_kernel_backend("auto", "cuda:0") == "triton"
    assert resolve_kernel_backend("auto", "meta") == "reference"
    inputs = make_inputs(CASES[3], seed=3)
    got = image_attention(inputs.q, inputs.k, **inputs.kwargs())  # backend="auto"
    torch.testing.assert_close(got, run_reference(inputs), atol=1e-6, rtol=0)
    schema = str(torch.ops.pixfound.image_attention.default._schema)
    assert schema.startswith("pixfound::image_attention(Tensor[] queries, Tensor[] keys, float[] scales")


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
def test_reference_backend_is_the_reference(dtype: torch.dtype) -> None:
    inputs = make_inputs(CASES[4], dtype=dtype, seed=31)
    got = image_attention(inputs.q, inputs.k, backend="reference", **inputs.kwargs())
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
    with pytest.raises(UserError, match=r"kernel backend must be one of auto, cpp, triton, reference, got 'cuda'"):
        image_attention(inputs.q, inputs.k, **inputs.kwargs(), backend="cuda")


@pytest.mark.parametrize(
    ("triton_version", "numpy_version", "broken"),
    [("3.6.0", "2.4.6", True), ("3.5.1", "2.5.2", True), ("3.6.0", "2.3.5", False), ("3.7.1", "2.4.6", False),
     ("3.8.0+git1234", "2.5.0rc1", False), ("3.6.0", "1.26.4", False)],
)
def test_interpreter_incompatibility_names_both_versions_and_the_fix(triton_version, numpy_version, broken) -> None:
    problem = interpreter_incompatibility(triton_version, numpy_version)
    if not broken:
        assert problem is None
        return
    assert f"Triton {triton_version}" in problem and f"NumPy {numpy_version}" in problem
    assert "triton>=3.7" in problem and "numpy<2.4" in problem


def test_interpreter_with_an_incompatible_numpy_fails_before_launching(monkeypatch) -> None:
    """A clear error instead of Triton's "only 0-dimensional arrays" from deep in the interpreter."""
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(UserError, match=r"Triton 3\.6\.0's interpreter .* NumPy 2\.4\.6.*needs NumPy < 2\.4"):
        resolve_kernel_backend("triton", "cpu")
    assert resolve_kernel_backend("auto", "cpu") == "cpp"  # the interpreter only runs when asked for
    assert resolve_kernel_backend("reference", "cpu") == "reference"


def test_a_backend_that_cannot_run_here_is_one_clear_user_error(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match=r"'cpp' runs on CPU tensors, these are on cuda:0"):
        resolve_kernel_backend("cpp", torch.device("cuda", 0))
    if triton_available():
        with pytest.raises(UserError, match=r"'triton' runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET"):
            resolve_kernel_backend("triton", "cpu")
    with pytest.raises(UserError) as unknown:
        resolve_kernel_backend("torch", "cpu")
    assert "\n" not in str(unknown.value) and "auto, cpp, triton, reference" in str(unknown.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="native kernel test needs CUDA")
@pytest.mark.parametrize("kernel", ["per_row", "row_block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_native_cuda_kernels_at_model_sizes(dtype: torch.dtype, kernel: str) -> None:
    """LLaVA-like sizes (576 image keys, head dim 128) and Qwen2-VL-like GQA (28/4 heads), natively; the
    row-block kernel with a window of 32 (and 9) decode steps."""
    from pixfound.triton_kernels import image_attention as module

    windows = (32, 9) if kernel == "row_block" else (2, 1)
    for case in (
        Case(batch=4, heads_q=32, heads_kv=32, rows=windows[0], num_keys=700, head_dim=128, image_at="middle"),
        Case(batch=3, heads_q=28, heads_kv=4, rows=windows[1], num_keys=2049, head_dim=128, image_at="straddle"),
    ):
        inputs = make_inputs(case, dtype=dtype, seed=43)
        width = int(inputs.image_len.max())
        if kernel == "row_block":
            index = module.Index(inputs.image_start, inputs.image_len, inputs.key_start, inputs.key_end, None, None,
                                 width)
            got = module._launch_row_block_kernel(inputs.q, inputs.k, index, inputs.scale)
        else:
            got = run_kernel(inputs, validate=False, num_image_keys=width)
        assert_within_bound_of_reference(got, inputs, dtype)


def assert_within_bound_of_reference(got: torch.Tensor, inputs: Inputs, dtype: torch.dtype) -> None:
    """fp32: within 1e-6 of the fp64 reference; fp16/bf16: at most twice the same-precision reference's error."""
    exact = run_reference(inputs, compute_dtype=torch.float64).double()
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, atol=1e-6, rtol=0)
    else:
        baseline_error = (run_reference(inputs, compute_dtype=dtype).double() - exact).abs().max().item()
        assert (got.double() - exact).abs().max().item() <= 2 * baseline_error + 1e-6


# ----------------------------------------------------------------------------------------------
# The C++ core (backend="cpp"; the op's CPU kernel, what "auto" runs for CPU tensors)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpp_matches_reference_fp32(case: Case) -> None:
    inputs = make_inputs(case, seed=case.num_keys * 3 + case.heads_kv, device=CPU)
    got = image_attention(inputs.q, inputs.k, backend="cpp", **inputs.kwargs())
    assert got.dtype == torch.float32 and got.shape == (case.batch, case.rows, int(inputs.image_len.max()))
    torch.testing.assert_close(got, run_reference(inputs), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.double(), run_reference(inputs, compute_dtype=torch.float64), atol=1e-6, rtol=0)


def test_cpp_reads_strided_views_clamps_indices_and_gives_zero_rows() -> None:
    case = Case(batch=3, heads_q=4, heads_kv=2, rows=2, num_keys=41, head_dim=8, image_at="straddle")
    inputs = make_inputs(case, seed=5, device=CPU)
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


def test_cpp_reads_key_cache_views_without_a_copy_bit_for_bit() -> None:
    """Keys as a preallocated cache hands them out (views of a longer buffer) give the contiguous bits."""
    from pixfound.ops.attention import _host_rows

    case = Case(batch=3, heads_q=6, heads_kv=2, rows=1, num_keys=37, head_dim=12, image_at="middle")
    layers = [make_inputs(case, seed=40 + i, device=CPU) for i in range(2)]
    first = layers[0]
    index_args = {name: getattr(first, name) for name in ("image_start", "image_len", "key_start", "key_end")}
    width = int(first.image_len.max())
    views = []
    for layer in layers:
        buffer = torch.full((case.batch, case.heads_kv, case.num_keys + 9, case.head_dim), float("nan"))
        buffer[:, :, : case.num_keys] = layer.k  # the spare room holds NaN: it must never be read
        views.append(buffer[:, :, : case.num_keys])
    assert not views[0].is_contiguous()
    assert _host_rows(views[0]).ctypes.data == views[0].data_ptr()  # handed over without a copy

    def run(keys: list[torch.Tensor]) -> torch.Tensor:
        return attention.image_attention([l.q for l in layers], keys, [l.scale for l in layers], backend="cpp",
                                         num_image_keys=width, **index_args)

    assert torch.equal(run(views), run([l.k for l in layers]))


def test_cpp_upcasts_16_bit_host_tensors_and_the_core_rejects_bad_arrays() -> None:
    import numpy as np

    from pixfound import _C

    for dtype in (torch.bfloat16, torch.float16):
        inputs = make_inputs(CASES[5], dtype=dtype, seed=3, device=CPU)
        upcast = replace(inputs, q=inputs.q.float(), k=inputs.k.float())
        got = image_attention(inputs.q, inputs.k, backend="cpp", **inputs.kwargs())
        assert torch.equal(got, image_attention(upcast.q, upcast.k, backend="cpp", **upcast.kwargs()))
        torch.testing.assert_close(got, run_reference(inputs), atol=1e-6, rtol=0)
    q = np.zeros((1, 2, 1, 4), np.float32)
    k = np.zeros((1, 1, 5, 4), np.float32)
    index = np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="k must be float32"):
        _C.image_attention(q, k.astype(np.float64), index, index, index, np.zeros((1, 1), np.int64), 1.0, 1)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        _C.image_attention(q, np.zeros((1, 1, 5, 8), np.float32)[..., ::2], index, index, index,
                           np.zeros((1, 1), np.int64), 1.0, 1)
    with pytest.raises(ValueError, match="key_end has shape"):
        _C.image_attention(q, k, index, index, index, np.zeros((1, 2), np.int64), 1.0, 1)


def test_cpp_core_rejects_an_out_it_would_copy() -> None:
    import numpy as np

    from pixfound import _C

    inputs = make_inputs(CASES[4], seed=11, device=CPU)
    expected = image_attention_reference(inputs.q, inputs.k, **inputs.kwargs())
    batch, rows, width = expected.shape
    index_args = {name: getattr(inputs, name) for name in ("image_start", "image_len", "key_start", "key_end")}
    arrays = [inputs.q.numpy(), inputs.k.numpy(), *(value.contiguous().numpy() for value in index_args.values())]
    out = np.zeros((batch, rows, width), np.float32)
    _C.image_attention(*arrays, inputs.scale, width, out=out)
    _C.image_attention(*arrays, inputs.scale, width, out=out)  # the core adds into out
    torch.testing.assert_close(torch.from_numpy(out), 2 * expected, atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="out must be float32"):
        _C.image_attention(*arrays, inputs.scale, width, out=np.zeros((batch, rows, width)))
    with pytest.raises(ValueError, match="out must be a float32 numpy array"):
        _C.image_attention(*arrays, inputs.scale, width, out=[0.0])
    with pytest.raises(ValueError, match="out has shape"):
        _C.image_attention(*arrays, inputs.scale, width, out=np.zeros((batch, rows + 1, width), np.float32))


def test_cpp_layers_call_equals_one_call_per_layer_bit_for_bit() -> None:
    """One op call for all layers gives the bits of the core called once per layer (adding into out), gap included."""
    import numpy as np

    from pixfound import _C

    layers = [make_inputs(CASES[4], seed=20 + i, device=CPU) for i in range(3)]
    first = layers[0]
    batch, rows = first.q.shape[0], first.q.shape[2]
    width = int(first.image_len.max())
    index_args = {name: getattr(first, name) for name in ("image_start", "image_len", "key_start", "key_end")}
    gaps = dict(gap_start=first.key_start + 1, gap_end=first.key_start + 3)
    arrays = {name: value.contiguous().numpy() for name, value in {**index_args, **gaps}.items()}
    one_by_one = np.zeros((batch, rows, width), np.float32)
    for layer in layers:
        _C.image_attention_layers([layer.q.numpy()], [layer.k.numpy()], [layer.scale], num_image_keys=width,
                                  out=one_by_one, **arrays)
    together = attention.image_attention([l.q for l in layers], [l.k for l in layers], [l.scale for l in layers],
                                         backend="cpp", **index_args, **gaps)
    assert torch.equal(together, torch.from_numpy(one_by_one))
    expected = sum(image_attention_reference(l.q, l.k, **index_args, scale=l.scale, num_image_keys=width, **gaps)
                   for l in layers)
    torch.testing.assert_close(together, expected, atol=3e-6, rtol=1e-5)

    arrays = dict(image_start=first.image_start.numpy(), image_len=first.image_len.numpy(),
                  key_start=first.key_start.numpy(), key_end=first.key_end.contiguous().numpy())
    q, k = first.q.numpy(), first.k.numpy()
    with pytest.raises(ValueError, match="of one length"):
        _C.image_attention_layers([q, q], [k], [1.0, 1.0], num_image_keys=width, **arrays)
    with pytest.raises(ValueError, match="non-empty"):
        _C.image_attention_layers([], [], [], num_image_keys=width, **arrays)
    with pytest.raises(ValueError, match=r"q\[1\]"):
        _C.image_attention_layers([q, q[:, :1]], [k, k], [1.0, 1.0], num_image_keys=width, **arrays)
    with pytest.raises(ValueError, match="numpy arrays"):
        _C.image_attention_layers([q, [0.0]], [k, k], [1.0, 1.0], num_image_keys=width, **arrays)
    with pytest.raises(ValueError, match=r"k\[0\] must be float32"):
        _C.image_attention_layers([q], [k.astype(np.float64)], [1.0], num_image_keys=width, **arrays)


def test_cpp_threads_do_not_change_the_result() -> None:
    """A call large enough for OpenMP gives the same bits on 1 and 2 threads (rows are independent)."""
    import numpy as np

    from pixfound import _C

    gen = torch.Generator().manual_seed(5)
    batch, heads, rows, keys, dim, width = 4, 8, 8, 1024, 64, 300  # 2^24 multiply-adds: the parallel branch
    q = torch.randn(batch, heads, rows, dim, generator=gen).numpy()
    k = torch.randn(batch, heads, keys, dim, generator=gen).numpy()
    image_start = np.full(batch, 100, np.int64)
    image_len = np.full(batch, width, np.int64)
    key_start = np.zeros(batch, np.int64)
    key_end = np.tile(np.arange(keys - rows + 1, keys + 1, dtype=np.int64), (batch, 1))
    results = [
        _C.image_attention(q, k, image_start, image_len, key_start, key_end, 0.125, width, num_threads=threads)
        for threads in (1, 2)
    ]
    assert np.array_equal(results[0], results[1])
    assert results[0].sum() > 0


# ----------------------------------------------------------------------------------------------
# A gap of excluded keys per sample (gap_start / gap_end): padding between a shared prefix and
# each sample's own prompt
# ----------------------------------------------------------------------------------------------
# Where each sample's gap [gap_start, gap_end) sits, relative to its valid keys and image span.
GAP_KINDS = ("before", "overlap", "inside", "after", "empty", "at_key_start", "at_key_end", "whole_row")


def with_gaps(inputs: Inputs, kinds: tuple[str, ...], *, seed: int) -> Inputs:
    """The same inputs with one gap per sample, of the given kind (one kind per sample)."""
    gen = torch.Generator().manual_seed(seed)

    def randint(low: int, high: int) -> int:  # inclusive bounds
        return int(torch.randint(low, max(low, high) + 1, (1,), generator=gen))

    num_keys = inputs.k.shape[2]
    assert len(kinds) == inputs.q.shape[0]
    starts, ends = [], []
    for b, kind in enumerate(kinds):
        first, start, length = int(inputs.key_start[b]), int(inputs.image_start[b]), int(inputs.image_len[b])
        image_end = start + length
        if kind == "before":  # between the first valid key and the image (empty if there is no room)
            lo = randint(first, start - 1) if start > first else start
            hi = randint(lo + 1, start) if start > first else start
        elif kind == "overlap":  # across the start of the image span
            lo = randint(max(0, start - 4), start)
            hi = randint(start + 1, image_end)
        elif kind == "inside":  # strictly inside the image span
            lo = randint(start, image_end - 1)
            hi = randint(lo + 1, image_end)
        elif kind == "after":  # between the image and the end of the keys (empty if there is no room)
            lo = randint(image_end, num_keys - 1) if image_end < num_keys else num_keys
            hi = randint(lo + 1, num_keys) if image_end < num_keys else num_keys
        elif kind == "empty":
            lo = hi = randint(0, num_keys)
        elif kind == "at_key_start":
            lo = first
            hi = randint(first + 1, num_keys)
        elif kind == "at_key_end":  # ends exactly at the end of row 0's valid keys
            hi = int(inputs.key_end[b, 0])
            lo = randint(first, hi - 1)
        elif kind == "whole_row":  # every key excluded: rows give zeros
            lo, hi = 0, num_keys
        else:
            raise AssertionError(kind)
        assert 0 <= lo <= hi <= num_keys, (kind, lo, hi)
        starts.append(lo)
        ends.append(hi)
    index = dict(dtype=torch.int64, device=inputs.key_start.device)
    return replace(inputs, gap_start=torch.tensor(starts, **index), gap_end=torch.tensor(ends, **index))


def without_gap_keys(inputs: Inputs, b: int) -> tuple[Inputs, Callable[[int], int]]:
    """Sample b alone with its gap keys physically removed from k, and the map old key -> new key."""
    lo, hi = int(inputs.gap_start[b]), int(inputs.gap_end[b])
    width = hi - lo

    def shift(j: int) -> int:
        return j - min(max(j - lo, 0), width)

    k = torch.cat([inputs.k[b : b + 1, :, :lo], inputs.k[b : b + 1, :, hi:]], dim=2)
    key_end = inputs.key_end[b : b + 1]
    key_end = key_end - (key_end - lo).clamp(0, width)  # shift() of each entry
    alone = replace(
        inputs,
        q=inputs.q[b : b + 1],
        k=k,
        # The image span runs over every remaining key, so the result holds the full row.
        image_start=torch.zeros_like(inputs.image_start[:1]),
        image_len=torch.full_like(inputs.image_len[:1], k.shape[2]),
        key_start=torch.full_like(inputs.key_start[:1], shift(int(inputs.key_start[b]))),
        key_end=key_end,
        gap_start=None,
        gap_end=None,
    )
    return alone, shift


def expected_by_removing_the_gap(inputs: Inputs) -> torch.Tensor:
    """float64 answer built from the gap-free reference on k with each sample's gap keys cut out."""
    batch, _, rows, _ = inputs.q.shape
    width = int(inputs.image_len.max())
    expected = torch.zeros(batch, rows, width, dtype=torch.float64)
    for b in range(batch):
        alone, shift = without_gap_keys(inputs, b)
        lo, hi = int(inputs.gap_start[b]), int(inputs.gap_end[b])
        if alone.k.shape[2] == 0:
            continue  # the gap covers every key
        full_row = run_reference(alone, compute_dtype=torch.float64).cpu()[0]  # [R, L - gap]
        for i in range(int(inputs.image_len[b])):
            j = int(inputs.image_start[b]) + i
            if not lo <= j < hi:
                expected[b, :, i] = full_row[:, shift(j)]
    return expected


GAP_REFERENCE_CASES = [
    (Case(batch=4, heads_q=4, heads_kv=2, rows=2, num_keys=29, head_dim=8, image_at="middle"), GAP_KINDS[:4]),
    (Case(batch=4, heads_q=3, heads_kv=1, rows=3, num_keys=41, head_dim=8, image_at="end"), GAP_KINDS[4:]),
    (Case(batch=4, heads_q=2, heads_kv=2, rows=2, num_keys=33, head_dim=16, image_at="straddle"),
     ("overlap", "at_key_end", "before", "at_key_start")),
    (Case(batch=4, heads_q=6, heads_kv=3, rows=1, num_keys=150, head_dim=8, image_at="start"),
     ("inside", "after", "at_key_start", "empty")),
]


@pytest.mark.parametrize("case, kinds", GAP_REFERENCE_CASES, ids=[case_id(c) for c, _ in GAP_REFERENCE_CASES])
def test_reference_with_gap_equals_reference_with_the_gap_keys_removed(case: Case, kinds: tuple[str, ...]) -> None:
    inputs = with_gaps(make_inputs(case, seed=case.num_keys), kinds, seed=1)
    got = run_reference(inputs, compute_dtype=torch.float64).cpu()
    torch.testing.assert_close(got, expected_by_removing_the_gap(inputs), atol=1e-12, rtol=0)
    for b, kind in enumerate(kinds):
        lo, hi = int(inputs.gap_start[b]), int(inputs.gap_end[b])
        keys = int(inputs.image_start[b]) + torch.arange(got.shape[-1])
        assert (got[b][:, (keys >= lo) & (keys < hi)] == 0).all(), kind  # gap keys get probability 0
        if kind == "whole_row":
            assert (got[b] == 0).all()


def test_reference_with_gap_matches_explicit_per_head_loop() -> None:
    case = Case(batch=4, heads_q=4, heads_kv=2, rows=2, num_keys=23, head_dim=8, image_at="middle")
    inputs = with_gaps(make_inputs(case, seed=12), ("overlap", "before", "inside", "at_key_start"), seed=2)
    got = run_reference(inputs, compute_dtype=torch.float64).cpu()
    expected = torch.zeros_like(got)
    group = case.heads_q // case.heads_kv
    for b in range(case.batch):
        first, start, length = int(inputs.key_start[b]), int(inputs.image_start[b]), int(inputs.image_len[b])
        lo, hi = int(inputs.gap_start[b]), int(inputs.gap_end[b])
        for r in range(case.rows):
            keys = [j for j in range(first, int(inputs.key_end[b, r])) if not lo <= j < hi]
            for h in range(case.heads_q):
                probs = torch.zeros(case.num_keys, dtype=torch.float64)
                if keys:
                    scores = inputs.k[b, h // group, keys].double() @ inputs.q[b, h, r].double() * inputs.scale
                    probs[keys] = torch.softmax(scores, dim=0).cpu()
                expected[b, r, :length] += probs[start : start + length] / case.heads_q
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


# Odd sizes, GQA, several tiles of 64 keys (so that whole tiles fall in the gap); every kind twice.
GAP_KERNEL_CASES = [
    (Case(batch=4, heads_q=4, heads_kv=2, rows=2, num_keys=37, head_dim=8, image_at="middle"),
     ("before", "overlap", "empty", "at_key_end")),
    (Case(batch=4, heads_q=6, heads_kv=2, rows=3, num_keys=150, head_dim=24, image_at="end"),
     ("at_key_start", "before", "inside", "whole_row")),
    (Case(batch=4, heads_q=2, heads_kv=1, rows=2, num_keys=203, head_dim=16, image_at="straddle"),
     ("overlap", "after", "at_key_end", "at_key_start")),
    (Case(batch=4, heads_q=3, heads_kv=3, rows=1, num_keys=131, head_dim=40, image_at="start"),
     ("inside", "empty", "after", "whole_row")),
]
GAP_KERNEL_IDS = [case_id(c) for c, _ in GAP_KERNEL_CASES]


@requires_triton
@pytest.mark.parametrize("case, kinds", GAP_KERNEL_CASES, ids=GAP_KERNEL_IDS)
def test_kernel_with_gap_matches_reference_fp32(case: Case, kinds: tuple[str, ...]) -> None:
    inputs = with_gaps(make_inputs(case, seed=case.num_keys + 1), kinds, seed=case.rows)
    got = run_kernel(inputs)
    assert got.dtype == torch.float32 and got.shape == (case.batch, case.rows, int(inputs.image_len.max()))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, run_reference(inputs), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.double().cpu(), expected_by_removing_the_gap(inputs), atol=1e-6, rtol=0)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case, kinds", GAP_KERNEL_CASES[1:3], ids=GAP_KERNEL_IDS[1:3])
def test_kernel_with_gap_low_precision_within_flash_attention_bound(
    case: Case, kinds: tuple[str, ...], dtype: torch.dtype
) -> None:
    inputs = with_gaps(make_inputs(case, dtype=dtype, seed=5 * case.num_keys), kinds, seed=3)
    assert_within_flash_attention_bound(inputs, dtype)


@pytest.mark.parametrize("case, kinds", GAP_KERNEL_CASES + GAP_REFERENCE_CASES,
                         ids=GAP_KERNEL_IDS + [case_id(c) for c, _ in GAP_REFERENCE_CASES])
def test_cpp_with_gap_matches_reference_fp32(case: Case, kinds: tuple[str, ...]) -> None:
    inputs = with_gaps(make_inputs(case, seed=case.num_keys + 2, device=CPU), kinds, seed=4)
    got = image_attention(inputs.q, inputs.k, backend="cpp", **inputs.kwargs())
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, run_reference(inputs), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.double(), expected_by_removing_the_gap(inputs), atol=1e-6, rtol=0)


def _backends() -> list[str]:
    return ["reference", "cpp"] + (["triton"] if TRITON_HERE else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_gap_equals_an_empty_gap_bitwise_on_every_backend(dtype: torch.dtype) -> None:
    """Leaving the gap out, a gap of zeros and a gap [L, L) give the same bits as today's call."""
    case = Case(batch=3, heads_q=4, heads_kv=2, rows=2, num_keys=150, head_dim=16, image_at="straddle")
    for backend in _backends():
        inputs = make_inputs(case, dtype=dtype, seed=47, device=backend_device(backend))
        zeros = torch.zeros_like(inputs.key_start)
        at_end = torch.full_like(inputs.key_start, case.num_keys)
        plain = image_attention(inputs.q, inputs.k, backend=backend, **inputs.kwargs())
        for lo, hi in ((zeros, zeros), (at_end, at_end)):
            gapped = image_attention(inputs.q, inputs.k, backend=backend, **inputs.kwargs(), gap_start=lo, gap_end=hi)
            assert torch.equal(plain, gapped), backend
        torch.testing.assert_close(plain, run_reference(inputs), atol=1e-6 if dtype == torch.float32 else 1e-5,
                                   rtol=0)
    assert torch.equal(run_reference(inputs), run_reference(inputs, gap_start=zeros, gap_end=zeros))


@pytest.mark.parametrize("backend", _backends())
def test_shared_prefix_padding_prompt_batch_equals_each_sample_alone(backend: str) -> None:
    """The layout the gap is for: [system + image | padding | own prompt] per sample, batched, gives
    what each sample gives alone with no padding at all."""
    prefix, image_start, image_len, num_keys, rows = 12, 3, 9, 140, 2
    prompts = [2, 90, 41]  # own prompt lengths; the padding is num_keys - prefix - prompt (up to 126 keys)
    gen = torch.Generator().manual_seed(53)
    q = torch.randn(len(prompts), 6, rows, 16, generator=gen)
    k = torch.randn(len(prompts), 2, num_keys, 16, generator=gen)
    q[:, ::2] *= 3.0
    device = backend_device(backend)
    index = dict(dtype=torch.int64, device=device)
    key_end = torch.arange(num_keys - rows + 1, num_keys + 1, **index).expand(len(prompts), -1).contiguous()
    batched = image_attention(
        q.to(device), k.to(device), backend=backend, scale=0.25,
        image_start=torch.full((3,), image_start, **index), image_len=torch.full((3,), image_len, **index),
        key_start=torch.zeros(3, **index), key_end=key_end,
        gap_start=torch.full((3,), prefix, **index), gap_end=torch.tensor([num_keys - p for p in prompts], **index),
    )
    for b, prompt in enumerate(prompts):
        k_alone = torch.cat([k[b : b + 1, :, :prefix], k[b : b + 1, :, num_keys - prompt :]], dim=2)
        alone = image_attention(
            q[b : b + 1].to(device), k_alone.to(device), backend=backend, scale=0.25,
            image_start=torch.tensor([image_start], **index), image_len=torch.tensor([image_len], **index),
            key_start=torch.zeros(1, **index), key_end=key_end[b : b + 1] - (num_keys - prompt - prefix),
        )
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", _backends())
def test_unvalidated_out_of_range_gaps_are_clamped(backend: str) -> None:
    """validate=False: wild gaps never read outside k; they act as their overlap with [0, L]."""
    case = Case(batch=3, heads_q=4, heads_kv=2, rows=2, num_keys=90, head_dim=8, image_at="middle")
    inputs = make_inputs(case, seed=59, device=backend_device(backend))
    L = case.num_keys

    def gap(lo: list[int], hi: list[int]) -> dict[str, torch.Tensor]:
        index = dict(dtype=torch.int64, device=inputs.key_start.device)
        return dict(gap_start=torch.tensor(lo, **index), gap_end=torch.tensor(hi, **index))

    def run(gaps: dict[str, torch.Tensor], validate: bool) -> torch.Tensor:
        return image_attention(inputs.q, inputs.k, backend=backend, validate=validate, **inputs.kwargs(), **gaps)

    wild = gap([-1000, 30, -(2**40)], [20, 10**6, 2**40])
    clamped = gap([0, 30, 0], [20, L, L])
    got = run(wild, validate=False)
    assert torch.isfinite(got).all() and (got[2] == 0).all()
    torch.testing.assert_close(got, run(clamped, validate=True), atol=1e-6, rtol=0)
    torch.testing.assert_close(got, run_reference(replace(inputs, **clamped)), atol=1e-6, rtol=0)
    # gap_end < gap_start is an empty gap.
    reversed_gap = run(gap([50, 2**40, L], [10, -5, 0]), validate=False)
    assert torch.equal(reversed_gap, image_attention(inputs.q, inputs.k, backend=backend, **inputs.kwargs()))


GAP_BAD_INPUTS = [
    ("only-gap-start", dict(gap_start=lambda x: x.key_start), r"gap_start and gap_end must be given together.*"
     r"got gap_start but gap_end is None"),
    ("only-gap-end", dict(gap_end=lambda x: x.key_start), r"got gap_end but gap_start is None"),
    ("gap-shape", dict(gap_start=lambda x: x.key_end, gap_end=lambda x: x.key_start),
     r"gap_start must have shape \(3,\), got \(3, 2\)"),
    ("gap-float", dict(gap_start=lambda x: x.key_start, gap_end=lambda x: x.key_start.float()),
     r"gap_end must have an integer dtype"),
    ("gap-bool", dict(gap_start=lambda x: x.key_start > 0, gap_end=lambda x: x.key_start),
     r"gap_start must have an integer dtype"),
    ("gap-list", dict(gap_start=lambda x: [0, 0, 0], gap_end=lambda x: x.key_start),
     r"gap_start must be an integer torch.Tensor"),
    ("gap-device", dict(gap_start=lambda x: x.key_start.to("meta"), gap_end=lambda x: x.key_start),
     r"gap_start is on meta"),
    ("gap-negative", dict(gap_start=lambda x: torch.tensor([0, -3, 0]), gap_end=lambda x: torch.tensor([1, 1, 1])),
     r"gap_start must be >= 0, got gap_start\[1\] = -3"),
    ("gap-beyond-keys", dict(gap_start=lambda x: torch.tensor([0, 0, 5]), gap_end=lambda x: torch.tensor([1, 1, 41])),
     r"gap_end must be <= L = 40 \(the keys in k\), got gap_end\[2\] = 41"),
    ("gap-start-beyond-keys", dict(gap_start=lambda x: torch.tensor([0, 45, 0]),
                                   gap_end=lambda x: torch.tensor([0, 40, 0])),
     r"gap_end must be >= gap_start \(equal for no gap\), got gap_end\[1\] = 40 < gap_start\[1\] = 45"),
    ("gap-reversed", dict(gap_start=lambda x: torch.tensor([5, 0, 0]), gap_end=lambda x: torch.tensor([4, 0, 0])),
     r"gap_end must be >= gap_start \(equal for no gap\), got gap_end\[0\] = 4 < gap_start\[0\] = 5"),
]


@pytest.mark.parametrize("fn", [image_attention, image_attention_reference], ids=["image_attention", "reference"])
@pytest.mark.parametrize("gaps, message", [bad[1:] for bad in GAP_BAD_INPUTS], ids=[bad[0] for bad in GAP_BAD_INPUTS])
def test_bad_gap_raises_value_error(fn: Callable[..., torch.Tensor], gaps: dict, message: str) -> None:
    case = Case(batch=3, heads_q=4, heads_kv=2, rows=2, num_keys=40, head_dim=16, image_at="end")
    inputs = make_inputs(case, seed=37)
    with pytest.raises(ValueError, match=message):
        fn(inputs.q, inputs.k, **inputs.kwargs(), **{name: make(inputs) for name, make in gaps.items()})


def test_cpp_binding_checks_the_gap_arrays() -> None:
    import numpy as np

    from pixfound import _C

    q = np.ones((2, 2, 1, 4), np.float32)
    k = np.ones((2, 1, 5, 4), np.float32)
    index = np.zeros(2, np.int64)
    ends = np.full((2, 1), 5, np.int64)
    lengths = np.full(2, 5, np.int64)
    plain = _C.image_attention(q, k, index, lengths, index, ends, 1.0, 5)
    np.testing.assert_array_equal(plain, np.full((2, 1, 5), 0.2, np.float32))
    gapped = _C.image_attention(q, k, index, lengths, index, ends, 1.0, 5, np.array([1, 0], np.int64),
                                np.array([3, 5], np.int64))
    np.testing.assert_allclose(gapped[0, 0], [1 / 3, 0, 0, 1 / 3, 1 / 3], atol=1e-7)
    assert (gapped[1] == 0).all()
    with pytest.raises(ValueError, match="gap_start and gap_end must be given together"):
        _C.image_attention(q, k, index, lengths, index, ends, 1.0, 5, index)
    with pytest.raises(ValueError, match="gap_end must be int64"):
        _C.image_attention(q, k, index, lengths, index, ends, 1.0, 5, index, index.astype(np.int32))
    with pytest.raises(ValueError, match="gap_start has shape"):
        _C.image_attention(q, k, index, lengths, index, ends, 1.0, 5, np.zeros(3, np.int64), index)


# ----------------------------------------------------------------------------------------------
# Several layers in one call: one Triton launch for a model's layers
# ----------------------------------------------------------------------------------------------
def _layer_stack(case: Case, count: int, *, dtype: torch.dtype, seed: int, strided: bool) -> list[Inputs]:
    """``count`` layers with the same shapes and indices, each q/k its own allocation (as a model's layers)."""
    first = make_inputs(case, dtype=dtype, seed=seed)
    layers = []
    for i in range(count):
        layer = make_inputs(case, dtype=dtype, seed=seed + 100 + i)
        q = layer.q
        if strided:  # the decode-step query: a row slice of a [B, Hq, R + 2, D] view transposed from [B, L, H, D]
            wide = torch.randn(case.batch, case.rows + 2, case.heads_q, case.head_dim, device=DEVICE).to(dtype)
            q = wide.transpose(1, 2)[:, :, 1 : 1 + case.rows]
            q.copy_(layer.q)
        layers.append(replace(first, q=q, k=layer.k))
    return layers


@requires_triton
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided-q"])
@pytest.mark.parametrize("case, kinds", [(CASES[3], None), (CASES[5], None), GAP_KERNEL_CASES[0]],
                         ids=[case_id(CASES[3]), case_id(CASES[5]), "gap-" + GAP_KERNEL_IDS[0]])
def test_triton_layers_call_equals_the_sum_of_one_call_per_layer(
    case: Case, kinds, strided: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pixfound.triton_kernels import image_attention as module

    launches: list[int] = []
    for name in ("_launch_row_kernel", "_launch_row_block_kernel"):  # one query row, or several (a window of steps)
        launch = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _launch=launch, **kwargs:
                            launches.append(kwargs.get("layers", 1)) or _launch(*args, **kwargs))

    layers = _layer_stack(case, 3, dtype=torch.float32, seed=7 * case.num_keys, strided=strided)
    if kinds is not None:
        gapped = with_gaps(layers[0], kinds, seed=8)
        layers = [replace(layer, gap_start=gapped.gap_start, gap_end=gapped.gap_end) for layer in layers]
    first = layers[0]
    width = int(first.image_len.max())
    index = {name: value for name, value in first.kwargs().items() if name != "scale"}
    out = attention.image_attention([l.q for l in layers], [l.k for l in layers], [first.scale] * 3,
                                    backend="triton", **index)
    assert launches == [3]  # one launch for the three layers
    assert out.shape == (case.batch, case.rows, width)
    one_by_one = sum(run_kernel(layer) for layer in layers)
    torch.testing.assert_close(out, one_by_one, atol=1e-6, rtol=0)
    expected = sum(run_reference(layer, compute_dtype=torch.float64) for layer in layers)
    torch.testing.assert_close(out.double().cpu(), expected.cpu(), atol=3e-6, rtol=0)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_layers_call_low_precision_gqa(dtype: torch.dtype) -> None:
    case = Case(batch=3, heads_q=8, heads_kv=2, rows=1, num_keys=203, head_dim=32, image_at="middle")
    layers = _layer_stack(case, 4, dtype=dtype, seed=31, strided=True)
    index = {name: value for name, value in layers[0].kwargs().items() if name != "scale"}
    out = attention.image_attention([l.q for l in layers], [l.k for l in layers], [layers[0].scale] * 4,
                                    backend="triton", **index)
    torch.testing.assert_close(out, sum(run_kernel(layer) for layer in layers), atol=1e-6, rtol=0)
    expected = sum(run_reference(layer, compute_dtype=torch.float64) for layer in layers)
    # Each layer's row sums to at most 1: an absolute bound of bf16/fp16 score rounding per layer.
    assert float((out.double().cpu() - expected.cpu()).abs().max()) < 4 * (2e-2 if dtype == torch.bfloat16 else 3e-3)


# The row-block kernel: what the probe's windows of decode steps (several query rows sharing their keys) run.
ROWS_CASES = [
    (Case(batch=2, heads_q=4, heads_kv=2, rows=5, num_keys=70, head_dim=16, image_at="middle"), ("inside", "before")),
    (Case(batch=3, heads_q=7, heads_kv=1, rows=17, num_keys=130, head_dim=32, image_at="straddle"),
     ("overlap", "empty", "at_key_end")),  # a group of 7 heads, padded to 8
    (Case(batch=1, heads_q=8, heads_kv=8, rows=33, num_keys=257, head_dim=24, image_at="end"), ("after",)),
    (Case(batch=2, heads_q=6, heads_kv=3, rows=2, num_keys=9, head_dim=8, image_at="start"), ("whole_row", "empty")),
]
ROWS_IDS = [case_id(case) for case, _ in ROWS_CASES]


def _rows_kernel_inputs(case: Case, kinds, *, gap: bool, dtype: torch.dtype, seed: int) -> Inputs:
    inputs = make_inputs(case, dtype=dtype, seed=seed)
    if case.rows > 3:  # a row whose keys end at its first valid key: it gives zeros
        key_end = inputs.key_end.clone()
        key_end[0, 1] = inputs.key_start[0]
        inputs = replace(inputs, key_end=key_end)
    return with_gaps(inputs, kinds, seed=seed + 1) if gap else inputs


@requires_triton
@pytest.mark.parametrize("gap", [False, True], ids=["no-gap", "gap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case, kinds", ROWS_CASES, ids=ROWS_IDS)
def test_row_block_kernel_matches_reference(case: Case, kinds, dtype: torch.dtype, gap: bool) -> None:
    from pixfound.triton_kernels.image_attention import Index, _launch_row_block_kernel

    inputs = _rows_kernel_inputs(case, kinds, gap=gap, dtype=dtype, seed=3 * case.rows + case.num_keys)
    width = int(inputs.image_len.max())
    index = Index(inputs.image_start, inputs.image_len, inputs.key_start, inputs.key_end, inputs.gap_start,
                  inputs.gap_end, width)
    got = _launch_row_block_kernel(inputs.q, inputs.k, index, inputs.scale)
    assert_within_bound_of_reference(got, inputs, dtype)
    assert torch.isfinite(got).all()


@requires_triton
def test_a_failing_row_block_kernel_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken kernel fails loudly, every time: no quiet switch to another kernel."""
    from pixfound.triton_kernels import image_attention as module

    def broken(*args, **kwargs):
        raise RuntimeError("no such kernel on this card")

    monkeypatch.setattr(module, "_launch_row_block_kernel", broken)
    case, _ = ROWS_CASES[0]
    layers = _layer_stack(case, 2, dtype=torch.float32, seed=5, strided=False)
    index = {name: value for name, value in layers[0].kwargs().items() if name != "scale"}
    for _ in range(2):
        with pytest.raises(RuntimeError, match="no such kernel"):
            attention.image_attention([l.q for l in layers], [l.k for l in layers], [layers[0].scale] * 2,
                                      backend="triton", **index)


@requires_triton
def test_triton_layers_call_falls_back_to_one_launch_per_layer_when_layers_differ() -> None:
    """Different key lengths or scales cannot share a launch; the sum is still right."""
    short = Case(batch=2, heads_q=4, heads_kv=2, rows=1, num_keys=90, head_dim=16, image_at="start")
    long = replace(short, num_keys=130)
    a, b = make_inputs(short, seed=1), make_inputs(long, seed=2)
    b = replace(b, image_start=a.image_start, image_len=a.image_len, key_start=a.key_start, key_end=a.key_end)
    index = {name: value for name, value in a.kwargs().items() if name != "scale"}
    out = attention.image_attention([a.q, b.q], [a.k, b.k], [a.scale, 0.5 * a.scale], backend="triton", **index)
    expected = run_kernel(a) + run_kernel(replace(b, scale=0.5 * a.scale))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@requires_triton
def test_triton_layers_call_with_a_tensor_off_the_16_byte_grid_launches_per_layer(monkeypatch) -> None:
    """Layers are addressed in 16-byte units from the lowest one; a tensor off that grid cannot be."""
    from pixfound.triton_kernels import image_attention as module

    case = Case(batch=2, heads_q=4, heads_kv=2, rows=1, num_keys=50, head_dim=16, image_at="middle")
    a, b = make_inputs(case, seed=4), make_inputs(case, seed=5)
    flat = torch.empty(b.k.numel() + 1, device=DEVICE)
    shifted_k = flat[1:].view(b.k.shape)  # 4 bytes past an aligned allocation
    shifted_k.copy_(b.k)
    launches: list[int] = []
    launch = module._launch_row_kernel
    monkeypatch.setattr(module, "_launch_row_kernel",
                        lambda *args, **kwargs: launches.append(kwargs.get("layers", 1)) or launch(*args, **kwargs))
    index = {name: value for name, value in a.kwargs().items() if name != "scale"}
    out = attention.image_attention([a.q, b.q], [a.k, shifted_k], [a.scale, a.scale], backend="triton", **index)
    assert launches == [1, 1]
    expected = run_kernel(a) + run_kernel(replace(b, image_start=a.image_start, image_len=a.image_len,
                                                  key_start=a.key_start, key_end=a.key_end))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "cpp"] + (["triton"] if TRITON_HERE else []))
def test_layers_call_rejects_bad_lists(backend: str) -> None:
    inputs = make_inputs(CASES[3], seed=3, device=backend_device(backend))
    index = {name: value for name, value in inputs.kwargs().items() if name != "scale"}
    with pytest.raises(ValueError, match="non-empty and of one length"):
        attention.image_attention([], [], [], backend=backend, **index)
    with pytest.raises(ValueError, match="non-empty and of one length"):
        attention.image_attention([inputs.q], [inputs.k, inputs.k], [1.0], backend=backend, **index)
    with pytest.raises(ValueError, match="must be lists"):
        attention.image_attention(inputs.q, inputs.k, 1.0, backend=backend, **index)
    with pytest.raises(ValueError, match="layer 1 has q of shape .* every layer needs the same batch, rows"):
        attention.image_attention([inputs.q, inputs.q[:, :, :1]], [inputs.k, inputs.k], [1.0, 1.0], backend=backend,
                                  **index)
