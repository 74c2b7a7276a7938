"""The README's commands are what CI runs, and the installed package carries its data."""
from __future__ import annotations

import os
import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ci_commands() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
            if line.strip() not in ("", "(", ")") and not line.lstrip().startswith("#")
            and not line.startswith(("set ", "cd "))]


def test_ci_runs_exactly_the_readme_commands():
    readme_lines = {line.strip() for line in (ROOT / "README.md").read_text().splitlines()}
    commands = _ci_commands()
    assert commands
    for command in commands:
        assert command in readme_lines, f".ci/run runs a command the README does not give: {command}"
    # CI covers both ways in: the editable source tree, and the wheel as users get it (built from the
    # sdist, repaired, then installed and tested outside the tree).
    assert any("pip install -e" in command for command in commands)
    assert any("python -m build" in command and "auditwheel repair" in command for command in commands)
    assert any(command.startswith("bash scripts/check_wheel.sh ") for command in commands)


def test_readme_installs_the_wheel_first():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert first_block.splitlines()[0].startswith("pip install pixfound"), first_block


def test_compiled_core_and_console_script_are_installed():
    from pixfound import _C

    assert callable(_C.pack_masks)
    # No OpenMP runtime of its own: a wheel would vendor one beside torch's (csrc/parallel.hpp).
    assert _C.openmp is False
    assert shutil.which("pixfound") is not None, "the pixfound console script is not on PATH"


def test_the_package_under_test_is_the_one_meant():
    """An installed wheel's check (PIXFOUND_TEST_INSTALLED=1) must not import the source tree, and an
    editable run must import it."""
    import pixfound
    from pixfound import _C

    package = pathlib.Path(pixfound.__file__).resolve().parent
    if os.environ.get("PIXFOUND_TEST_INSTALLED") == "1":
        assert ROOT not in package.parents and "site-packages" in package.parts, package
        assert pathlib.Path(_C.__file__).resolve().parent == package
    else:
        assert package == ROOT / "pixfound"


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
