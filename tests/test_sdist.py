"""The sdist holds what a wheel build needs and nothing else (expectations: scripts/dist_files.py)."""
from __future__ import annotations

import importlib.util
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _dist_files():
    spec = importlib.util.spec_from_file_location("dist_files", ROOT / "scripts" / "dist_files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dist_files = _dist_files()
needs_git = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                               reason="needs git and a checkout")


@needs_git
def test_sdist_holds_the_sources_and_no_build_outputs(tmp_path):
    # The build backend itself, from the working tree as it is (a .venv and build/ are present here).
    done = subprocess.run([sys.executable, "-c", "import sys; from scikit_build_core.build import build_sdist; "
                           "print(build_sdist(sys.argv[1]))", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sdist = tmp_path / done.stdout.strip().splitlines()[-1]
    names = dist_files.sdist_names(str(sdist))
    files, mapping = dist_files.tracked(ROOT), dist_files.package_map(ROOT)
    assert dist_files.sdist_problems(names, files, mapping) == []
    # The checks are not vacuous: the C++ sources, every package module and the templates are there.
    assert {"CMakeLists.txt", "csrc/bindings.cpp", "csrc/parallel.hpp", "pyproject.toml"} <= set(names)
    assert {p for p in files if p.endswith("_templates.json")} <= set(names)
    assert len([n for n in names if n.endswith(".py") and n.startswith(tuple(mapping.values()))]) > 30


def test_checks_name_what_is_missing_or_stray():
    files = ["pyproject.toml", "CMakeLists.txt", "README.md", "csrc/a.cpp", "pixfound/__init__.py",
             "pixfound/eval/templates/vqa_templates.json", "tests/test_x.py"]
    mapping = {"pixfound": "pixfound"}
    names = ["PKG-INFO", "pyproject.toml", "CMakeLists.txt", "README.md", "csrc/a.cpp", "pixfound/__init__.py",
             ".venv/bin/python", "build/cp311/_C.so", "scratch.txt"]
    assert dist_files.sdist_problems(names, files, mapping) == [
        "missing from the sdist: pixfound/eval/templates/vqa_templates.json",
        "must not be in the sdist: .venv/bin/python",
        "must not be in the sdist: build/cp311/_C.so",
        "in the sdist but not tracked by git: scratch.txt",
    ]
    wheel = ["pixfound/__init__.py", "pixfound/_C.cpython-311-x86_64-linux-gnu.so", "pixfound/__pycache__/x.pyc"]
    assert dist_files.wheel_problems(wheel, files, mapping) == [
        "missing from the wheel: pixfound/eval/templates/vqa_templates.json",
        "must not be in the wheel: pixfound/__pycache__/x.pyc",
    ]


def test_package_folders_follow_pyproject_in_either_form(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.scikit-build]\nwheel.packages = {"pixfound" = "pixfound", "pixfound/triton_kernels" = "triton_kernels"}\n')
    mapping = dist_files.package_map(tmp_path)
    assert mapping == {"pixfound": "pixfound", "pixfound/triton_kernels": "triton_kernels"}
    files = ["pixfound/ops.py", "triton_kernels/image_attention.py", "tests/test_ops.py"]
    assert dist_files.expected_wheel_files(files, mapping) == {"pixfound/ops.py",
                                                               "pixfound/triton_kernels/image_attention.py"}
    (tmp_path / "pyproject.toml").write_text('[tool.scikit-build]\nwheel.packages = ["src/pixfound"]\n')
    assert dist_files.package_map(tmp_path) == {"pixfound": "src/pixfound"}
