"""benchmarks/gpu_bench.py on CPU: the whole script with --small, and its helpers.

The GPU run happens on a lent machine; here every section runs with tiny configs (kernels in
Triton's interpreter) so the script stays runnable, and its tables and JSON are checked for
content: counts, one row per (batch, mode), equal tokens and maps between capture modes, and the
fused upsample holding no [G, H, W] tensor. No timing is asserted.
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

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_bench.py"


def _load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    if str(module.BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(module.BENCH_DIR))
    return module


gpu_bench = _load_gpu_bench()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[dict, str, str]:
    out = tmp_path_factory.mktemp("gpu_bench")
    json_path, markdown_path = out / "results.json", out / "results.md"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("OUT", None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--share-image-prefix", "--e2e-sam-dtype",
         "bfloat16", "--json-out",
         str(json_path), "--markdown-out", str(markdown_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    assert json_path.is_file(), (f"no JSON written (exit {done.returncode}):\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(json_path.read_text()), markdown_path.read_text(), done.stdout


def test_small_cpu_run_reports_environment_and_every_section(small_run):
    results, markdown, stdout = small_run
    meta = results["meta"]
    assert meta["device"] == "cpu" and meta["card"].startswith("CPU")
    assert meta["torch"] == torch.__version__ and meta["versions"]["transformers"]
    assert meta["model"]["parameters"] > 0 and meta["model"]["spec"]["image_size"] == 112
    assert list(results["sections"]) == list(gpu_bench.SECTIONS)
    for name, section in results["sections"].items():
        assert section["status"] in ("ok", "skipped"), (name, section.get("error"))
    assert "SUMMARY" in stdout and meta["date_utc"] in markdown
    for name in gpu_bench.SECTIONS:
        assert f"### {name} (" in markdown


def test_small_run_kernel_tests_pass(small_run):
    results, markdown, _ = small_run
    (row,) = results["sections"]["tests"]["rows"]
    assert row["returncode"] == 0 and not row["timed_out"]
    assert row["passed"] > 0 and row["failed"] == 0 and row["errors"] == 0
    assert row["deselected"] > 0  # --small runs the quick subset
    assert f"| {row['passed']} | 0 | 0 |" in markdown


def test_small_run_capture_table(small_run):
    results, markdown, _ = small_run
    section = results["sections"]["capture"]
    settings = results["settings"]
    rows = {(r["batch"], r["mode"]): r for r in section["rows"]}
    assert set(rows) == {(b, m) for b in settings["batches"] for m in gpu_bench.CAPTURE_MODES}
    for (batch, mode), row in rows.items():
        assert row["status"] == "ok"
        assert row["wall_s"] > 0 and row["ms_per_token"] > 0
        # the zeroed LM-head rows keep every sample going for exactly new_tokens
        assert row["generated_tokens"] == batch * settings["new_tokens"]
        assert row["time_vs_plain"] > 0
        if mode != "plain":
            assert row["same_tokens_as_plain"] == 1.0  # fp32 on CPU: capture does not change the answer
            assert row["maps_finite"] is True
        if mode == "fused":
            assert row["max_map_diff_vs_reference"] <= 1e-5
    assert markdown.count("| fused | ok |") == len(settings["batches"])
    sdpa = section["sdpa_new_shape_ms"]
    assert set(sdpa) == {"default backends", "cuDNN excluded"}
    assert all(v["first_call_ms"] > 0 and v["repeat_call_ms"] > 0 for v in sdpa.values())
    assert "key lengths not seen before" in markdown


def test_small_run_upsample_table(small_run):
    results, _, _ = small_run
    section = results["sections"]["upsample"]
    rows = {r["variant"]: r for r in section["rows"]}
    published = rows["published: interpolate + crop + argmax"]
    fused = rows["pixfound fused (Triton)"]  # the interpreter runs it on CPU
    for row in rows.values():
        assert row["status"] == "ok" and row["median_ms"] > 0
        assert row["peaks_equal_published"] == 1.0
    assert published["peak_extra_bytes"] >= section["full_maps_bytes"]  # the published path materialises them
    assert fused["peak_extra_bytes"] < section["full_maps_bytes"]


def test_small_run_e2e_section(small_run):
    results, markdown, _ = small_run
    section = results["sections"]["e2e"]
    if not (REPO / "benchmarks" / "pipeline_bench.py").is_file():
        assert section["status"] == "skipped" and "pipeline_bench.py" in section["reason"]
        return
    rows = {row["pipeline"]: row for row in section["rows"]}
    # the pixfound rows already run SAM in bf16, so of the extra fused rows only the overlapped one differs
    assert set(rows) == set(gpu_bench.E2E_PIPELINES) | {"fused, overlap"}
    overlapped = rows.pop("fused, overlap")
    assert overlapped["status"] == "ok" and overlapped["settings"]["overlap"] is True
    assert overlapped["vs_fused"]["identical"] is True  # same records from a second thread
    assert "fused, overlap vs fused: answers" in markdown
    settings = results["settings"]
    assert settings["e2e_share_prefix"] is True  # the pixfound and plain runs reuse each image's prefix
    assert settings["e2e_sam_dtype"] == "bfloat16"  # the pixfound runs' SAM; the published recipe stays float32
    assert rows["fused"]["settings"]["sam_dtype"] == "bfloat16"
    assert rows["published"]["settings"]["sam_dtype"] == "float32"
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert row["images_per_s"] > 0 and row["wall_s"] > 0
        assert row["images"] == (settings["published_images"] if name == "published" else settings["e2e_images"])
        assert row["stages"]["generate"] > 0
        assert "records" not in row  # signatures are compared, not stored
    assert rows["published"]["batch_size"] == 1 and rows["fused"]["batch_size"] == settings["e2e_batch"]
    assert rows["fused"]["speedup_vs_published"] > 0 and rows["fused"]["generate_vs_plain"] > 0
    # fp32 on the CPU: the fused run answers and segments exactly as the reference run
    assert rows["fused"]["fused_vs_reference"]["identical"] is True
    assert "fused vs reference: identical" in markdown


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def test_measure_call_reports_out_of_memory_instead_of_raising():
    def runs_out():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has ...")

    record, value = gpu_bench.measure_call(runs_out, "cpu")
    assert value is None
    assert record["status"] == "OOM"
    assert record["requested_bytes"] == int(2.5 * 1024**3)
    assert "Tried to allocate" in record["error"]


def test_measure_call_returns_value_and_time():
    record, value = gpu_bench.measure_call(lambda: torch.ones(3).sum().item(), "cpu")
    assert value == 3.0 and record["status"] == "ok" and record["wall_s"] >= 0


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


def test_estimate_largest_batch_extrapolates_the_two_largest_points():
    gib = 1024**3
    points = {1: dict(status="ok", peak_bytes=15 * gib), 8: dict(status="ok", peak_bytes=18 * gib),
              32: dict(status="ok", peak_bytes=30 * gib)}
    # 0.5 GiB per sample above 14 GiB: 0.97 * 80 GiB holds (77.6 - 14) / 0.5 = 127 samples
    assert gpu_bench.estimate_largest_batch(points, 80 * gib) == 127
    assert gpu_bench.estimate_largest_batch({1: points[1]}, 80 * gib) is None
    assert gpu_bench.estimate_largest_batch(points, None) is None


@pytest.mark.parametrize("text", ["", "capture,nonsense", " , "])
def test_bad_sections_are_rejected_with_the_valid_names(text):
    with pytest.raises(SystemExit):
        gpu_bench.build_parser().parse_args(["--sections", text])
    with pytest.raises(Exception, match="tests, capture, upsample, e2e"):
        gpu_bench.parse_sections(text)


def test_sections_run_in_documented_order():
    assert gpu_bench.parse_sections("e2e,tests") == ["tests", "e2e"]


def test_small_llava_spec_builds_with_decodable_greedy_tokens():
    adapter = gpu_bench.build_llava_adapter(gpu_bench.LLAVA_SMALL, "cpu", torch.float32)
    head = adapter.model.get_output_embeddings().weight
    vocab = len(adapter.tokenizer.get_vocab())
    assert head.shape[0] == gpu_bench.LLAVA_SMALL.vocab_size > vocab
    assert not head[vocab:].any()
    assert not head[adapter.tokenizer.eos_token_id].any()
    assert adapter.model.config.text_config.num_attention_heads == gpu_bench.LLAVA_SMALL.num_heads


def test_seven_b_spec_builds_llava_1_5_7b_on_the_meta_device():
    spec = gpu_bench.LLAVA_1_5_7B
    assert (spec.text_layers, spec.num_heads, spec.hidden_size, spec.image_tokens) == (32, 32, 4096, 576)
    # the meta device allocates nothing: this checks the configs, not the weights
    adapter = gpu_bench.build_llava_adapter(spec, "meta", torch.float16)
    assert gpu_bench.parameter_count(adapter.model) == 7_063_427_072  # llava-hf/llava-1.5-7b-hf
    assert adapter.dtype == torch.float16 and adapter.grid_side == 24
    vision = adapter.model.config.vision_config
    assert (vision.num_hidden_layers, vision.hidden_size, vision.image_size, vision.patch_size) == (24, 1024, 336, 14)


def test_bad_spec_is_a_clear_error():
    bad = gpu_bench.dataclasses.replace(gpu_bench.LLAVA_SMALL, image_size=100)
    with pytest.raises(ValueError, match="image_size 100 is not a multiple of patch_size 14"):
        gpu_bench.build_llava_adapter(bad, "cpu", torch.float32)


def test_run_capped_kills_at_the_cap_and_keeps_the_output(tmp_path):
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    output, returncode = gpu_bench.run_capped(command, cwd=str(tmp_path), timeout_s=3)
    assert returncode is None and "started" in output
    output, returncode = gpu_bench.run_capped([sys.executable, "-c", "print('done')"], cwd=str(tmp_path), timeout_s=30)
    assert returncode == 0 and output.strip() == "done"


def test_predicted_oom_batch_lies_beyond_the_estimated_fit():
    gib = 1024**3
    # reference capture: 14 GiB of weights plus 1.3 GiB per sample (attention maps of every layer)
    points = {b: dict(status="ok", peak_bytes=int((14 + 1.3 * b) * gib)) for b in (8, 32)}
    fits = gpu_bench.estimate_largest_batch(points, 80 * gib)
    assert fits == 48
    predicted = gpu_bench.predicted_oom_batch(points, 80 * gib)
    assert predicted % 16 == 0 and predicted > fits and predicted == 64


def test_profile_capture_script_runs_small_on_cpu():
    """benchmarks/gpu/profile_capture.py (the GPU profiling run) keeps working: every part prints."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / "profile_capture.py"), "--device", "cpu",
                             "--small"], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for expected in ("== kernel alone at decode shapes", "image_attention (triton)", "sdpa, same shapes",
                     "fused, bookkeeping only", "fused, no in-layer timer", "by self CPU time", "layered launch",
                     "one launch per layer"):
        assert expected in out, expected
    # One line per (batch, variant) with its ratio to plain; plain itself is x1.000.
    assert out.count("x1.000 plain") >= 2
    gaps = [float(line.rsplit(" ", 1)[-1].rstrip(")")) for line in out.splitlines() if "max |layered - per layer|" in line]
    assert len(gaps) == 2 and max(gaps) <= 1e-6  # the layered launch sums the same layers
    window = [float(line.rsplit(" ", 1)[-1].rstrip(")")) for line in out.splitlines()
              if "max |window - per step|" in line]
    assert len(window) == 2 and max(window) <= 1e-6  # the row-block window gives the per-step maps
    assert "row-block window" in out and "one launch per step" in out
