"""The README's commands are what CI runs, and the installed package carries its data."""
from __future__ import annotations

import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")
                and not line.startswith(("set ", "cd "))]
    assert len(commands) == 2
    for command in commands:
        assert command in readme, f".ci/run runs a command the README does not give: {command}"


def test_compiled_core_and_console_script_are_installed():
    from pixfound import _C

    assert callable(_C.pack_masks) and isinstance(_C.openmp, bool)
    assert shutil.which("pixfound") is not None, "the pixfound console script is not on PATH"


def test_prompt_templates_ship_as_package_data():
    from importlib import resources

    templates = resources.files("pixfound.eval") / "templates"
    names = {entry.name for entry in templates.iterdir()}
    assert {"vqa_templates.json", "grounding_templates.json"} <= names


def test_ops_and_kernels_import_and_run_without_a_gpu():
    """Importing the ops and the Triton kernel modules needs no GPU, and the ops answer on the CPU."""
    import importlib

    import numpy as np

    ops = importlib.import_module("pixfound.ops")
    kernels = importlib.import_module("pixfound.triton_kernels.image_attention")
    assert hasattr(kernels, "__file__") and kernels.__name__ == "pixfound.triton_kernels.image_attention"
    masks = np.zeros((1, 3, 4), dtype=bool)
    masks[0, :2, :2] = True
    assert ops.mask_iou(masks, masks).tolist() == [[1.0]]


def test_triton_kernels_ship_inside_the_package():
    """triton_kernels/ installs as pixfound.triton_kernels (wheel.packages in pyproject.toml)."""
    import importlib.util

    spec = importlib.util.find_spec("pixfound.triton_kernels")
    assert spec is not None and pathlib.Path(spec.origin).parent.name == "triton_kernels"
    assert importlib.util.find_spec("pixfound.triton_kernels.image_attention") is not None
    assert importlib.util.find_spec("pixfound.triton_kernels.upsample_peak") is not None


def test_triton_kernels_are_imported_only_as_pixfound_triton_kernels():
    """A top-level ``triton_kernels`` is another PyPI package: no source may import that name."""
    import re

    top_level = re.compile(r"^\s*(?:import triton_kernels\b|from triton_kernels\b)", re.MULTILINE)
    sources = [p for folder in ("pixfound", "triton_kernels", "tests", "benchmarks", "tools")
               for p in (ROOT / folder).rglob("*.py")]
    assert len(sources) > 50
    offenders = [str(p.relative_to(ROOT)) for p in sources if top_level.search(p.read_text())]
    assert offenders == []
