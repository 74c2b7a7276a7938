"""Which implementation runs an op: decided here, and nowhere else.

Every op has three implementations of the same math: the C++ core (``pixfound._C``) for CPU
tensors, Triton kernels (``pixfound.triton_kernels``) for CUDA tensors, and the plain torch
reference that the tests compare both against. The fast two are registered with
``torch.library`` as the CPU and CUDA kernels of one custom op, so for ``auto`` torch's dispatcher
picks by the tensors' device; :func:`resolve_kernel_backend` names what will run and refuses,
with one line, a choice that cannot run where it is asked to.
"""
from __future__ import annotations

import torch

from pixfound.errors import UserError
from pixfound.triton_kernels import interpreter_incompatibility, interpreting, triton_available

__all__ = ["KERNEL_BACKENDS", "KERNEL_BACKEND_HELP", "resolve_kernel_backend"]

#: ``--kernel-backend`` choices, for the capture and for upsample + peak alike.
KERNEL_BACKENDS = ("auto", "cpp", "triton", "reference")

KERNEL_BACKEND_HELP = (
    "kernels of the fused capture and of upsample + peak: auto (the C++ core for CPU tensors, Triton for CUDA "
    "tensors), cpp (CPU tensors only), triton (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) or "
    "reference (the plain torch reference, any device)"
)


def resolve_kernel_backend(backend: str, device: torch.device | str) -> str:
    """What runs an op on tensors of ``device`` under ``backend``: ``"cpp"``, ``"triton"`` or ``"reference"``.

    ``auto`` gives ``cpp`` on the CPU and ``triton`` on CUDA (the reference where neither applies,
    e.g. CUDA without an importable Triton, or another device). An explicit ``cpp`` needs CPU
    tensors; ``triton`` needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` (Triton's
    interpreter, for tests). Raises :class:`pixfound.errors.UserError` otherwise.
    """
    if backend not in KERNEL_BACKENDS:
        raise UserError(f"kernel backend must be one of {', '.join(KERNEL_BACKENDS)}, got {backend!r}")
    kind = torch.device(device).type
    if backend == "auto":
        if kind == "cpu":
            return "cpp"
        return "triton" if kind == "cuda" and triton_available() else "reference"
    if backend == "cpp" and kind != "cpu":
        raise UserError(f"kernel backend 'cpp' runs on CPU tensors, these are on {device}; "
                        "use auto, triton or reference")
    if backend == "triton":
        if not triton_available():
            raise UserError("kernel backend 'triton' needs an importable triton; install it or use auto, cpp "
                            "or reference")
        if kind == "cpu" and not interpreting():
            raise UserError("kernel backend 'triton' runs on CUDA tensors, or on CPU tensors with "
                            "TRITON_INTERPRET=1 set before pixfound is imported; use auto, cpp or reference here")
        if kind not in ("cpu", "cuda"):
            raise UserError(f"kernel backend 'triton' runs on CUDA tensors, these are on {device}")
        if kind == "cpu":
            problem = interpreter_incompatibility()
            if problem is not None:
                raise UserError(problem)
    return backend
