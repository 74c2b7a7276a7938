"""Decides whether a Triton kernel can run on a given tensor.

Triton runs natively on CUDA tensors, and on CPU tensors only in interpreter mode
(``TRITON_INTERPRET=1``, which must be set before the kernel modules are imported).
Everything else falls back to the torch reference that sits beside each kernel.
"""
from __future__ import annotations

import torch

from pixfound.triton_kernels import (  # noqa: F401 - re-exported for the callers of this module
    default_to_interpreter_without_cuda,
    interpreter_incompatibility,
    interpreting,
    major_minor,
    triton_available,
)


def check_interpreter_versions() -> None:
    """Raise a clear error where the installed Triton interpreter and NumPy do not work together."""
    problem = interpreter_incompatibility()
    if problem is not None:
        raise RuntimeError(problem)


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
        backend = "triton" if use_triton(*tensors) else "torch"
    elif backend == "triton" and not use_triton(*tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"the Triton backend cannot run on {devices}: it needs CUDA tensors, or CPU tensors "
            "with TRITON_INTERPRET=1 set before pixfound is imported, and an importable triton"
        )
    if backend == "triton" and not any(t.is_cuda for t in tensors):
        check_interpreter_versions()
    return backend
