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


def major_minor(version: str) -> tuple[int, int]:
    """``"3.6.0"`` -> ``(3, 6)``; local and pre-release suffixes (``+git…``, ``rc1``) are ignored."""
    parts = [int(p) if p.isdigit() else 0 for p in (version.split("+")[0].split(".") + ["0", "0"])[:2]]
    return parts[0], parts[1]


def interpreter_incompatibility(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run pixfound's kernels with these versions, or None.

    Before Triton 3.7 the interpreter turns scalar loop bounds into Python ints through NumPy's
    conversion of 1-element arrays, which NumPy 2.4 removed: every kernel with a loop then fails
    with "only 0-dimensional arrays can be converted to Python scalars" (seen with Triton 3.5 and
    3.6; 3.7.1 and 3.8 work). Native GPU launches are not affected.
    """
    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run with NumPy {numpy_version}: "
            "before Triton 3.7 it needs NumPy < 2.4. Install triton>=3.7 or 'numpy<2.4', "
            "or use backend='torch' (or 'cpp' for the capture) on CPU tensors"
        )
    return None


def check_interpreter_versions() -> None:
    """Raise a clear error where the installed Triton interpreter and NumPy do not work together."""
    import numpy
    import triton

    problem = interpreter_incompatibility(triton.__version__, numpy.__version__)
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


def default_to_interpreter_without_cuda() -> None:
    """For test and benchmark sessions: run kernels in Triton's interpreter when there is no GPU.

    Call it before any kernel module is imported; Triton reads the variable at decoration time.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
