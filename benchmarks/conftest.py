"""Benchmark runs: offline models, and each variant's time as a ratio to its group's reference and limit.

A benchmark names its variant's role with the ``record_ratio`` fixture: ``fast`` (pixfound's
path), ``reference`` (the plain version beside the op), ``limit`` (what cannot be beaten, e.g.
generation without capture) or ``other``. After the pytest-benchmark tables, pytest prints every
variant's median over its group's reference and limit, all measured in the same run.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROLES = ("fast", "reference", "limit", "other")
# group -> variant -> (role, median seconds)
_MEDIANS = pytest.StashKey[dict]()


@pytest.fixture
def record_ratio(benchmark, request) -> Callable[[str, str], None]:
    """Call after the benchmark ran: ``record_ratio(variant, role)``."""

    def record(variant: str, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if benchmark.stats is None:  # --benchmark-disable: nothing was timed
            return
        medians = request.config.stash.setdefault(_MEDIANS, {})
        medians.setdefault(benchmark.group or "", {})[variant] = (role, benchmark.stats.stats.median)

    return record


def _ratio_cell(median: float, base: Optional[tuple[str, float]]) -> str:
    return "" if base is None else f"{median / base[1]:8.3f} x {base[0]}"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config) -> None:
    medians = config.stash.get(_MEDIANS, {})
    if not medians:
        return
    terminalreporter.section("ratios measured in this run (median time / the group's reference or limit)")
    for group, variants in medians.items():
        by_role = {role: (name, median) for name, (role, median) in variants.items() if role in ("reference", "limit")}
        terminalreporter.write_line(group)
        for name, (role, median) in variants.items():
            cells = [_ratio_cell(median, by_role.get(base)) for base in ("reference", "limit")]
            terminalreporter.write_line(f"  {name:<40} {role:<9} {1000 * median:11.3f} ms  "
                                        + "  ".join(c for c in cells if c))
