"""Decides whether a Triton kernel can run on a given tensor.

Triton runs natively on CUDA tensors, and on CPU tensors only in interpreter mode
(``TRITON_INTERPRET=1``, which must be set before the kernel modules are imported).
Everything else falls back to the torch reference that sits beside each kernel.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails on import
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor can be handed to a Triton kernel."""
    if not triton_available():
        return False
    if all(t.is_cuda for t in tensors):
        return not interpreting()
    if all(t.device.type == "cpu" for t in tensors):
        return interpreting()
    return False


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map ``"auto" | "triton" | "torch"`` to the backend that will run."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if use_triton(*tensors) else "torch"
    if backend == "triton" and not use_triton(*tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"the Triton backend cannot run on {devices}: it needs CUDA tensors, or CPU tensors "
            "with TRITON_INTERPRET=1 set before pixfound is imported, and an importable triton"
        )
    return backend


def default_to_interpreter_without_cuda() -> None:
    """For test and benchmark sessions: run kernels in Triton's interpreter when there is no GPU.

    Call it before any kernel module is imported; Triton reads the variable at decoration time.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
