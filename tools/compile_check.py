"""Compile every Triton kernel variant the launchers emit for a GPU target, with no GPU, and read ptxas's report.

Most sessions have no GPU, and a kernel that only ever ran in Triton's interpreter can still fail
to compile natively (an op the interpreter allows, a shape the compiler rejects) or compile into
something slow (registers spilled to local memory, more shared memory than a block may have).
This module answers those questions on a CPU machine:

* a stand-in for Triton's active driver names the target (``cuda``, capability ``90`` = H100/H200);
* the real launchers (``image_attention_triton``, ``upsample_peaks_triton`` in ``pixfound.triton_kernels``) run on
  ``meta`` tensors at model shapes, with each kernel replaced by a proxy whose launch is Triton's
  ``warmup``: the JIT specialises and compiles exactly what that launch would run (constexprs,
  integer and alignment specialisations), and nothing executes;
* ``ptxas -v`` (shipped inside Triton's wheel) reports registers, spills and stack frame of each
  PTX; the PTX itself says whether ``tl.dot`` became tensor-core instructions (``mma.sync``, or
  Hopper's ``wgmma``) and whether tiles are loaded by asynchronous 16-byte copies.

It is a development tool and does not ship with the package. Run it from the repository, in a
process where ``TRITON_INTERPRET`` is not ``1`` (the kernels must be JIT functions)::

    python tools/compile_check.py [--arch 90] [--json]

It exits non-zero if a variant fails to compile, spills, or exceeds the target's shared memory.
``tests/test_kernel_compile.py`` runs it in CI; a GPU run still has to measure speed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

# Largest shared memory one block may use (opt-in), bytes, per compute capability.
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclasses.dataclass(frozen=True)
class CaptureShape:
    """One model's decoder shapes, as the attention probe hands them to the capture kernels."""

    name: str
    dtype: torch.dtype
    heads_q: int
    heads_kv: int
    head_dim: int
    layers: int
    batch: int
    num_keys: int
    image_keys: int
    gap: bool  # a shared image prefix: one padding run inside the valid keys


# The shapes the GPU runs use (LLaVA-1.5-7B fp16; Qwen2-VL-7B bf16 with GQA 28/4 and a shared
# prefix), LLaVA in fp32 (FMA dots instead of tensor cores), and a tiny fp32 model (GQA, a
# head_dim under tl.dot's minimum).
CAPTURE_SHAPES = (
    CaptureShape("llava-1.5-7b", torch.float16, 32, 32, 128, 32, 32, 704, 576, False),
    CaptureShape("qwen2-vl-7b", torch.bfloat16, 28, 4, 128, 28, 32, 1400, 1024, True),
    CaptureShape("llava-1.5-7b-fp32", torch.float32, 32, 32, 128, 32, 8, 704, 576, False),
    CaptureShape("tiny-fp32", torch.float32, 4, 2, 8, 3, 4, 60, 25, False),
)
# Query rows per call: 1 = one decode step (per-row kernel); more = a window of steps (row-block
# kernel; the row count sets its ROWS_P, so partial windows compile other variants).
CAPTURE_ROWS = (1, 3, 32)
# Upsample + peak: (k, return_maps). k changes the unrolled top-k; return_maps adds the store.
UPSAMPLE_VARIANTS = ((1, False), (1, True), (8, False))


@dataclasses.dataclass
class Variant:
    """One compiled kernel: where it came from and what the compiler reported."""

    kernel: str
    case: str
    grid: tuple
    num_warps: int
    shared_bytes: int
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    stack_bytes: Optional[int] = None
    tensor_core: str = "-"  # the PTX's matrix instructions: "mma.sync x64" (Ampere style), "wgmma x16" (Hopper)
    async_copies: int = 0  # cp.async global->shared copies in the PTX (16-byte, pipelined tile loads)
    error: Optional[str] = None

    def problems(self, arch: int) -> list[str]:
        found = []
        if self.error:
            found.append(f"does not compile: {self.error}")
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} bytes of registers")
        if self.shared_bytes > MAX_SHARED_BYTES.get(arch, MAX_SHARED_BYTES[80]):
            found.append(f"needs {self.shared_bytes} bytes of shared memory (limit {MAX_SHARED_BYTES.get(arch)})")
        return found


class _TargetOnlyDriver:
    """What ``JITFunction.run`` asks of the active driver before it compiles; nothing launches."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target

    def is_active(self) -> bool:
        return True


class _CompileOnly:
    """Stands in for a kernel: ``kernel[grid](...)`` compiles through the JIT's warmup and records it."""

    def __init__(self, kernel: Any, case: Callable[[], str], sink: list) -> None:
        self.kernel = kernel
        self.case = case
        self.sink = sink

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        def compile_only(*args: Any, **kwargs: Any) -> None:
            compiled = self.kernel.run(*args, grid=grid, warmup=True, **kwargs)
            self.sink.append((self.kernel.__name__, self.case(), tuple(grid), kwargs.get("num_warps", 4), compiled))

        return compile_only


@contextlib.contextmanager
def _compiling_for(arch: int, modules: dict, sink: list, case: Callable[[], str]) -> Iterator[None]:
    """Point Triton at ``arch`` and swap each named kernel of ``modules`` for a compile-only proxy."""
    from triton.runtime import driver

    saved_driver = getattr(driver, "_active", None)
    swapped = []
    driver.set_active(_TargetOnlyDriver(arch))
    try:
        for module, names in modules.items():
            for name in names:
                kernel = getattr(module, name)
                swapped.append((module, name, kernel))
                setattr(module, name, _CompileOnly(kernel, case, sink))
        yield
    finally:
        for module, name, kernel in swapped:
            setattr(module, name, kernel)
            # The JIT caches per device index; drop the stand-in target's entries so a real GPU later
            # in this process compiles for itself.
            getattr(kernel, "device_caches", {}).clear()
        driver._active = saved_driver


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill bytes, stack frame bytes) from ``ptxas -v`` on ``ptx``."""
    from triton import knobs

    ptxas = knobs.nvidia.ptxas.path
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", str(source), "-o", str(source) + ".o"],
                              capture_output=True, text=True, check=True)
    log = done.stderr + done.stdout
    registers = re.search(r"Used (\d+) registers", log)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    stack = re.search(r"(\d+) bytes stack frame", log)
    return (int(registers.group(1)) if registers else -1, sum(spills),
            int(stack.group(1)) if stack else 0)


def _tensor_core(ptx: str) -> str:
    wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
    mma = len(re.findall(r"\bmma\.sync\.", ptx))
    found = [f"{kind} x{count}" for kind, count in (("wgmma", wgmma), ("mma.sync", mma)) if count]
    return ", ".join(found) or "-"


def _variant(name: str, case: str, grid: tuple, num_warps: int, compiled: Any, arch: int) -> Variant:
    ptx = compiled.asm["ptx"]
    registers, spills, stack = _ptxas_report(ptx, arch)
    return Variant(
        kernel=name, case=case, grid=grid, num_warps=int(num_warps), shared_bytes=int(compiled.metadata.shared),
        registers=registers, spill_bytes=spills, stack_bytes=stack, tensor_core=_tensor_core(ptx),
        async_copies=len(re.findall(r"\bcp\.async\.(?:cg|ca|bulk)\S*\s", ptx)),
    )


def _capture_cases(shape: CaptureShape, rows: int) -> None:
    """Call the capture's Triton launcher on meta tensors (what one window of ``rows`` steps launches)."""
    from pixfound.triton_kernels.image_attention import image_attention_triton

    meta = torch.device("meta")
    queries = [torch.empty(shape.batch, shape.heads_q, rows, shape.head_dim, dtype=shape.dtype, device=meta)
               for _ in range(shape.layers)]
    keys = [torch.empty(shape.batch, shape.heads_kv, shape.num_keys, shape.head_dim, dtype=shape.dtype, device=meta)
            for _ in range(shape.layers)]
    index = lambda *size: torch.zeros(*size, dtype=torch.int64, device=meta)  # noqa: E731
    gap = dict(gap_start=index(shape.batch), gap_end=index(shape.batch)) if shape.gap else {}
    image_attention_triton(
        queries, keys, [shape.head_dim ** -0.5] * shape.layers, image_start=index(shape.batch),
        image_len=index(shape.batch), key_start=index(shape.batch), key_end=index(shape.batch, rows),
        num_image_keys=shape.image_keys, **gap)


def compile_variants(arch: int = 90) -> list[Variant]:
    """Compile the capture and upsample kernels as the launchers would launch them on ``arch``."""
    from pixfound.triton_kernels import interpreting, triton_available

    if not triton_available():
        raise RuntimeError("triton is not importable")
    from pixfound.triton_kernels import image_attention, upsample_peak

    if interpreting() or image_attention.DECORATED_FOR_INTERPRETER or upsample_peak.DECORATED_FOR_INTERPRETER:
        raise RuntimeError("run the compile check without TRITON_INTERPRET=1: the kernels must be JIT functions")
    if arch not in MAX_SHARED_BYTES:
        raise ValueError(f"arch must be one of {sorted(MAX_SHARED_BYTES)}, got {arch}")
    sink: list = []
    variants: list[Variant] = []
    current = {"case": ""}
    kernels = {
        image_attention: ("_image_attention_kernel", "_image_attention_rows_kernel"),
        upsample_peak: ("_upsample_tile_topk_kernel", "_merge_tile_topk_kernel"),
    }

    def attempt(case: str, call: Callable[[], None]) -> None:
        current["case"] = case
        try:
            call()
        except Exception as error:  # a compile error of this case; the others still run
            variants.append(Variant(kernel="?", case=case, grid=(), num_warps=0, shared_bytes=0,
                                    error=f"{type(error).__name__}: {str(error)[:400]}"))
        while sink:
            name, where, grid, num_warps, compiled = sink.pop(0)
            variants.append(_variant(name, where, grid, num_warps, compiled, arch))

    with _compiling_for(arch, kernels, sink, lambda: current["case"]):
        for shape in CAPTURE_SHAPES:
            for rows in CAPTURE_ROWS:
                attempt(f"{shape.name} rows={rows}", lambda: _capture_cases(shape, rows))
        window = (1024, 1024, 128, 0, 768, 1024)  # pad mode: 1024 square, centre crop of 768 x 1024
        maps = torch.empty(32, 24, 24, dtype=torch.float32, device="meta")
        flag = torch.zeros(1, dtype=torch.int32, device="meta")  # upsample_peaks' in-kernel NaN/inf check
        for k, return_maps in UPSAMPLE_VARIANTS:
            attempt(f"upsample 24x24->768x1024 k={k} maps={return_maps}",
                    lambda: upsample_peak.upsample_peaks_triton(maps, window, k, return_maps, nonfinite=flag))
    return variants


def _table(variants: list[Variant], arch: int) -> str:
    lines = [f"sm_{arch}: kernel | case | grid | warps | regs | spill B | stack B | shared B | tensor cores | "
             "async copies | problems",
             "---|---|---|---|---|---|---|---|---|---|---"]
    for v in variants:
        lines.append(" | ".join(str(x) for x in (
            v.kernel, v.case, v.grid, v.num_warps, v.registers, v.spill_bytes, v.stack_bytes, v.shared_bytes,
            v.tensor_core, v.async_copies, "; ".join(v.problems(arch)) or "-")))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED_BYTES),
                        help="compute capability to compile for (90 = H100/H200, 80 = A100)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    args = parser.parse_args(argv)
    variants = compile_variants(args.arch)
    if args.json:
        print(json.dumps([{**dataclasses.asdict(v), "problems": v.problems(args.arch)} for v in variants]))
    else:
        print(_table(variants, args.arch))
    return 1 if any(v.problems(args.arch) for v in variants) else 0


if __name__ == "__main__":
    sys.exit(main())
