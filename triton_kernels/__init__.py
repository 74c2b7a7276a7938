"""pixfound's Triton kernels, one file per op (the kernels and their launcher).

This folder ships inside the wheel as ``pixfound.triton_kernels`` (``wheel.packages`` in
pyproject.toml) and is imported only under that name: a top-level ``triton_kernels`` belongs to
another PyPI package.

Triton runs natively on CUDA tensors, and on CPU tensors only in its interpreter
(``TRITON_INTERPRET=1``, read when a kernel is decorated, so it must be set before a kernel
module is imported). Which backend runs an op is decided in :func:`pixfound.ops.resolve_kernel_backend`;
this module only answers what the installed Triton can do.
"""
from __future__ import annotations

import functools
import os

__all__ = [
    "default_to_interpreter_without_cuda",
    "interpreter_incompatibility",
    "interpreting",
    "major_minor",
    "triton_available",
]


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


def interpreter_incompatibility(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why Triton's interpreter cannot run pixfound's kernels with these versions (default: installed), or None.

    Before Triton 3.7 the interpreter turns scalar loop bounds into Python ints through NumPy's
    conversion of 1-element arrays, which NumPy 2.4 removed: every kernel with a loop then fails
    with "only 0-dimensional arrays can be converted to Python scalars" (seen with Triton 3.5 and
    3.6; 3.7.1 and 3.8 work). Native GPU launches are not affected.
    """
    if triton_version is None or numpy_version is None:
        import numpy
        import triton

        triton_version = triton_version or triton.__version__
        numpy_version = numpy_version or numpy.__version__
    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run with NumPy {numpy_version}: "
            "before Triton 3.7 it needs NumPy < 2.4. Install triton>=3.7 or 'numpy<2.4', "
            "or use the cpp or reference kernel backend on CPU tensors"
        )
    return None


def default_to_interpreter_without_cuda() -> None:
    """For test and benchmark sessions: let Triton kernels run in the interpreter when there is no GPU.

    Call it before any kernel module is imported; Triton reads the variable at decoration time.
    """
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
