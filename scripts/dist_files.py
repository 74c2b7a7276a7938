"""What the sdist and the wheel must hold, derived from what git tracks and from pyproject.toml.

    python scripts/dist_files.py sdist dist/pixfound-0.1.0.tar.gz
    python scripts/dist_files.py wheel dist/pixfound-0.1.0-cp311-cp311-manylinux_2_28_x86_64.whl

Prints each problem and exits 1 if there is any. The package folders come from
``[tool.scikit-build] wheel.packages`` (list form, or table form ``{"dest" = "src"}``), so moving a
package folder needs no change here. Needs git and a checkout.
"""
from __future__ import annotations

import fnmatch
import pathlib
import subprocess
import sys
import tarfile
import zipfile

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Files the wheel build reads besides the package folders.
BUILD_INPUTS = ("pyproject.toml", "CMakeLists.txt", "README.md", "csrc/*")
# Never in a distribution: environments, build outputs, run outputs, caches, compiled leftovers.
FORBIDDEN = (".venv/*", "*/.venv/*", "build/*", "_skbuild/*", "dist/*", "wheelhouse/*", "pixfound-runs/*",
             "*__pycache__/*", "*.pyc", ".pytest_cache/*", "*/.pytest_cache/*", ".benchmarks/*", ".git/*",
             ".gpu_carry/*", "*.egg-info/*", "*.whl", "*.pth", "*.safetensors")


def tracked(root: pathlib.Path = ROOT) -> list[str]:
    done = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, text=True, check=True)
    return sorted(p for p in done.stdout.split("\0") if p and (root / p).is_file())


def package_map(root: pathlib.Path = ROOT) -> dict[str, str]:
    """Wheel folder -> source folder, from ``wheel.packages``."""
    with open(root / "pyproject.toml", "rb") as f:
        packages = tomllib.load(f)["tool"]["scikit-build"]["wheel"]["packages"]
    if isinstance(packages, dict):
        return {dest.strip("/"): src.strip("/") for dest, src in packages.items()}
    return {src.strip("/").rsplit("/", 1)[-1]: src.strip("/") for src in packages}


def _matches(path: str, patterns) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)


def expected_wheel_files(files: list[str], mapping: dict[str, str]) -> set[str]:
    """Every tracked file of each package source folder, at its place in the wheel."""
    out = set()
    for dest, src in mapping.items():
        for path in files:
            if path.startswith(src + "/"):
                out.add(dest + path[len(src):])
    return out


def sdist_problems(names: list[str], files: list[str], mapping: dict[str, str]) -> list[str]:
    """``names``: the sdist's member paths below its top folder."""
    have = set(names)
    need = {p for p in files if _matches(p, BUILD_INPUTS)}
    need |= {p for src in mapping.values() for p in files if p.startswith(src + "/")}
    problems = [f"missing from the sdist: {p}" for p in sorted(need - have)]
    problems += [f"must not be in the sdist: {p}" for p in sorted(have) if _matches(p, FORBIDDEN)]
    untracked = sorted(have - set(files) - {"PKG-INFO"})
    problems += [f"in the sdist but not tracked by git: {p}" for p in untracked if not _matches(p, FORBIDDEN)]
    return problems


def wheel_problems(names: list[str], files: list[str], mapping: dict[str, str]) -> list[str]:
    have = {n for n in names if not n.endswith("/")}
    problems = [f"missing from the wheel: {p}" for p in sorted(expected_wheel_files(files, mapping) - have)]
    problems += [f"must not be in the wheel: {p}" for p in sorted(have) if _matches(p, FORBIDDEN)]
    if not any(fnmatch.fnmatch(n, "pixfound/_C.*.so") for n in have):
        problems.append("missing from the wheel: the compiled core pixfound/_C.*.so")
    return problems


def sdist_names(path: str) -> list[str]:
    with tarfile.open(path) as tar:
        members = [m.name for m in tar.getmembers() if m.isfile()]
    top = {m.split("/", 1)[0] for m in members}
    if len(top) != 1:
        raise ValueError(f"{path}: expected one top folder, got {sorted(top)}")
    return [m.split("/", 1)[1] for m in members]


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("sdist", "wheel"):
        print(__doc__, file=sys.stderr)
        return 2
    kind, path = argv
    files, mapping = tracked(), package_map()
    if kind == "sdist":
        problems = sdist_problems(sdist_names(path), files, mapping)
    else:
        problems = wheel_problems(zipfile.ZipFile(path).namelist(), files, mapping)
    for problem in problems:
        print(problem)
    print(f"{kind} {pathlib.Path(path).name}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
