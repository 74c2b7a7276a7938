"""benchmarks/gpu_bench.py on the CPU: the whole script with --small, and its helpers.

Every section runs with tiny sizes from a folder outside the checkout, and its tables and JSON are
checked for content: counts, one row per (batch, mode), equal tokens and maps between the capture
modes, peaks at the maximum, fused records equal to the reference's. No timing is asserted.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import pixfound

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_bench.py"
# The script imports its sibling modules (_helpers, e2e) from its own folder, as `python benchmarks/gpu_bench.py` does.
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_bench_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gpu_bench = _load_script()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[dict, str, pathlib.Path]:
    out = tmp_path_factory.mktemp("gpu_bench")
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--out", str(out)],
                          cwd=tmp_path_factory.mktemp("elsewhere"), capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads((out / "gpu_bench.json").read_text()), (out / "gpu_bench.md").read_text(), out


def test_small_run_reports_environment_and_every_section(small_run):
    results, markdown, _ = small_run
    meta = results["meta"]
    assert meta["device"] == "cpu" and meta["card"].startswith("CPU")
    assert meta["torch"] == torch.__version__ and meta["versions"]["transformers"]
    # run from outside the checkout: the package this test imports, with its compiled core
    assert meta["pixfound_path"] == str(pathlib.Path(pixfound.__file__).parent)
    assert meta["compiled_core"] == "importable"
    assert meta["model"]["size"] == "tiny" and meta["model"]["parameters"] > 0
    assert list(results["sections"]) == list(gpu_bench.SECTIONS)
    assert all(section["status"] == "ok" for section in results["sections"].values())
    assert meta["date_utc"] in markdown
    for name in gpu_bench.SECTIONS:
        assert f"### {name} (ok, " in markdown


def test_small_run_kernel_tests_pass(small_run):
    results, markdown, out = small_run
    (row,) = results["sections"]["tests"]["rows"]
    assert row["returncode"] == 0 and not row["timed_out"]
    assert row["passed"] > 0 and row["failed"] == row["errors"] == 0
    assert row["deselected"] > 0  # --small runs a quick subset
    assert f"| {row['passed']} | 0 | 0 |" in markdown
    assert "passed" in (out / "kernel_tests.log").read_text()


def test_small_run_capture_rows_compare_each_mode_with_plain(small_run):
    results, markdown, _ = small_run
    sizes = results["sizes"]
    rows = {(r["batch"], r["mode"]): r for r in results["sections"]["capture"]["rows"]}
    assert set(rows) == {(b, m) for b in sizes["batches"] for m in gpu_bench.CAPTURE_MODES}
    for (batch, mode), row in rows.items():
        assert row["status"] == "ok" and row["wall_s"] > 0 and row["ms_per_step"] > 0
        assert 0 < row["tokens"] <= batch * sizes["new_tokens"]
        assert row["time_vs_plain"] > 0 and row["memory_vs_plain"] > 0
        if mode != "plain":
            assert row["same_tokens_as_plain"] == 1.0  # fp32 on the CPU: the capture does not change the answer
    for batch in sizes["batches"]:
        assert rows[(batch, "fused")]["max_map_diff_vs_reference"] <= 1e-5
    assert markdown.count("| fused | ok |") == len(sizes["batches"])


def test_small_run_upsample_peaks_lie_at_the_maximum(small_run):
    results, _, _ = small_run
    rows = {r["variant"]: r for r in results["sections"]["upsample"]["rows"]}
    assert set(rows) == {"fused (auto backend)", "torch reference"}
    for row in rows.values():
        assert row["median_ms"] > 0 and row["peaks_at_maximum"] == 1.0
    assert rows["torch reference"]["x_reference_time"] == 1.0


def test_small_run_end_to_end_rows_and_agreement(small_run):
    results, markdown, _ = small_run
    sizes = results["sizes"]
    section = results["sections"]["e2e"]
    assert section["problems"] == []
    rows = {row["pipeline"]: row for row in section["rows"]}
    assert set(rows) == set(gpu_bench.E2E_PIPELINES)
    for name, row in rows.items():
        assert row["images_per_s"] > 0 and row["stages"]["generate"] > 0
        assert row["images"] == (sizes["published_images"] if name == "published" else sizes["e2e_images"])
        assert "records" not in row  # compared, not stored
    assert rows["published"]["batch_size"] == 1 and rows["fused"]["batch_size"] == sizes["e2e_batch"]
    assert rows["fused"]["x_published"] > 0 and rows["fused"]["generate_vs_plain"] > 0
    # fp32 on the CPU: the fused pipeline answers and segments exactly as the reference pipeline
    assert rows["fused"]["fused_vs_reference"]["identical"] is True
    assert rows["fused+overlap"]["vs_fused"]["identical"] is True  # the same records from a second thread
    assert rows["fused+sam-bf16"]["settings"]["sam_dtype"] == "bfloat16"
    assert "fused vs reference: identical" in markdown


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
class _RunsOutOfMemory:
    def generate(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB.")


def test_running_out_of_memory_is_a_result_not_an_error():
    record, generations = gpu_bench.measure_generate(_RunsOutOfMemory(), "reference", [object()] * 3, 4, "cpu")
    assert generations is None
    assert record["status"] == "OOM" and record["batch"] == 3 and "Tried to allocate" in record["error"]


def test_parse_pytest_summary_and_verbose_counts():
    summary = "....\n===== 12 passed, 2 skipped, 190 deselected, 1 warning in 8.33s ====="
    assert gpu_bench.parse_pytest_summary(summary) == dict(passed=12, skipped=2, deselected=190)
    assert gpu_bench.parse_pytest_summary("collected 3 items\n") == {}
    cut_off = "\n".join([
        "tests/test_a.py::test_one PASSED",
        "tests/test_a.py::test_two[fp32-case 1] FAILED",
        "[gw1] PASSED tests/test_b.py::test_three",
        "tests/test_b.py::test_four SKIPPED (needs CUDA)",
        "FAILED tests/test_a.py::test_two[fp32-case 1] - AssertionError",
    ])
    assert gpu_bench.count_verbose_outcomes(cut_off) == dict(passed=2, failed=1, skipped=1)


@pytest.mark.parametrize("text", ["", "capture,nonsense", " , "])
def test_bad_sections_are_rejected_with_the_valid_names(text):
    with pytest.raises(SystemExit):
        gpu_bench.build_parser().parse_args(["--sections", text])
    with pytest.raises(Exception, match="tests, capture, upsample, e2e"):
        gpu_bench.parse_sections(text)


def test_sections_run_in_documented_order():
    assert gpu_bench.parse_sections("e2e,tests") == ["tests", "e2e"]


def test_run_capped_kills_at_the_cap_and_keeps_the_output(tmp_path):
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    output, returncode = gpu_bench.run_capped(command, cwd=str(tmp_path), timeout_s=1)
    assert returncode is None and "started" in output
    output, returncode = gpu_bench.run_capped([sys.executable, "-c", "print('done')"], cwd=str(tmp_path), timeout_s=30)
    assert returncode == 0 and output.strip() == "done"
