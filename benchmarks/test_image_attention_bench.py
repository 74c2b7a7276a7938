"""The image-attention Triton kernel against its torch reference.

Run: pytest benchmarks/test_image_attention_bench.py --benchmark-group-by=group

Without CUDA the kernel runs in Triton's interpreter (slow by nature: this measures that it runs,
not its speed) at a small size; with CUDA it runs natively at a LLaVA-1.5-like decoding size.
"""
from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when the kernel is decorated, i.e. on first import of the module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pixfound.ops.attention import image_attention  # noqa: E402
from pixfound.ops.attention_reference import image_attention_reference  # noqa: E402
from pixfound.triton_kernels import interpreting, triton_available  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# (batch, query heads, kv heads, rows, keys, head dim, image keys, dtype)
SIZE = (8, 32, 8, 1, 1200, 128, 576, torch.bfloat16) if ON_GPU else (2, 8, 2, 1, 300, 32, 144, torch.float32)
GROUP = "image_attention B{}xH{}/{}xR{}xL{}xD{} N={} {}".format(*SIZE)


@pytest.fixture(scope="module")
def decoding_step() -> dict[str, object]:
    batch, heads_q, heads_kv, rows, num_keys, head_dim, num_image, dtype = SIZE
    gen = torch.Generator().manual_seed(0)
    padding = torch.arange(batch) * 3  # left padding differs per sample
    return dict(
        q=torch.randn(batch, heads_q, rows, head_dim, generator=gen).to(DEVICE, dtype),
        k=torch.randn(batch, heads_kv, num_keys, head_dim, generator=gen).to(DEVICE, dtype),
        image_start=(padding + 5).to(DEVICE),
        image_len=torch.full((batch,), num_image, device=DEVICE),
        key_start=padding.to(DEVICE),
        key_end=torch.full((batch, rows), num_keys, device=DEVICE),
        scale=head_dim**-0.5,
    )


def _synchronized(fn, **kwargs) -> torch.Tensor:
    out = fn(**kwargs)
    if ON_GPU:
        torch.cuda.synchronize()
    return out


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_image_attention(benchmark, decoding_step, impl: str) -> None:
    expected = image_attention_reference(**decoding_step)
    if impl == "triton":
        if not triton_available() or not (ON_GPU or interpreting()):
            pytest.skip("the Triton kernel cannot run here (set TRITON_INTERPRET=1 before pixfound is imported)")
        # The capture's hot path: no validation, width given, so no host sync inside the call.
        step = dict(decoding_step)
        queries, keys, scales = [step.pop("q")], [step.pop("k")], [step.pop("scale")]
        kwargs = dict(step, queries=queries, keys=keys, scales=scales, backend="triton", validate=False,
                      num_image_keys=SIZE[6])
        fn = image_attention
    else:
        kwargs, fn = decoding_step, image_attention_reference
    rounds = 20 if ON_GPU else 3
    result = benchmark.pedantic(_synchronized, args=(fn,), kwargs=kwargs, rounds=rounds, iterations=1, warmup_rounds=1)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)
