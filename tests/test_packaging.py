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


@pytest.mark.parametrize("module", ["pixfound.ops", "pixfound._kernels.image_attention"])
def test_modules_import_without_a_gpu(module):
    import importlib

    assert importlib.import_module(module) is not None
