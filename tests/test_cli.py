"""The ``pixfound`` command line end to end on the synthetic benchmark with the real tiny models.

The main run goes through ``cli.main`` in this process (models load once); ``python -m pixfound``
is checked in a subprocess. Capture and upsampling use the reference backends here (the C++ and
Triton kernels have their own tests), except in small runs with the default and with Triton.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from fake_openai_server import FakeOpenAIServer, chat_reply
from pixfound import cli
from pixfound.data import load_benchmark
from pixfound.eval.prompts import build_prompt, grounding_templates, vqa_templates
from pixfound.eval.records import read_jsonl
from pixfound.grounding.select import rle_to_mask
from stand_in_data import build_pixmmvp_root

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = ["--kernel-backend", "reference", "--device", "cpu", "--max-new-tokens", "8"]


def _use_torch_kernels(monkeypatch) -> None:
    """Run the reference backends on CPU (faster, same maths). The Triton kernel modules are imported
    first, while TRITON_INTERPRET is still set: a kernel decorated without it is compiled for the
    GPU and would break later interpreter tests in this process."""
    import pixfound.triton_kernels.image_attention  # noqa: F401
    import pixfound.triton_kernels.upsample_peak  # noqa: F401

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture()
def no_interpreter(monkeypatch):
    _use_torch_kernels(monkeypatch)


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    """One full run: protocols 1-3, oracle + similarity, 6 samples."""
    output = tmp_path_factory.mktemp("e2e") / "run"
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        _use_torch_kernels(patch)
        # capsys is function scoped: capture this module-scoped run by redirection
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["eval", "--fused", "--limit", "6", "--batch-size", "3", "--select", "oracle,similarity",
                             "--output", str(output), *FAST])
    return code, out.getvalue(), err.getvalue(), output


def test_eval_end_to_end_files_header_and_table(e2e_run):
    code, out, err, output = e2e_run
    assert code == 0, err
    for name in ("run.json", "samples.jsonl", "summary.json", "summary.md", "failure_bins.png", "when.json"):
        assert (output / name).is_file(), name
    assert (output / "failure_bins.png").read_bytes()[:8] == PNG_MAGIC
    assert "RANDOM weights" in err and cli.REAL_RUN_HINT in err
    lines = out.strip().splitlines()
    # No grader (--judge): protocol-1 accuracy is parsed by rule and shown as "A† rule", never as A†.
    assert lines[0].split() == ["model", "benchmark", "select", "A†", "A†", "rule", "A", "M†", "M", "S"]
    assert [line.split()[2] for line in lines[2:4]] == ["oracle", "similarity"]
    # Under the table: the random weights, the recipe, what "A† rule" means, and what the numbers stand on.
    assert lines[4].startswith("RANDOM WEIGHTS") and lines[5] == "recipe: pixfound (changed: max_new_tokens=8)"
    assert "A† rule" in lines[6] and lines[7] == "6 of 16 samples scored (--limit 6)"
    markdown = (output / "summary.md").read_text()
    for name in ("tiny-llava", "SAM: `tiny`", "en_core_web", "judge: `none`", "capture: `fused`"):
        assert name in markdown, name


def test_eval_summary_recomputed_from_samples_jsonl(e2e_run):
    code, _, err, output = e2e_run
    assert code == 0, err
    summary = json.loads((output / "summary.json").read_text())
    records = read_jsonl(output / "samples.jsonl")[0]
    samples = {s.id: s for s in load_benchmark("synthetic", n=16, seed=0)}
    expected_keys = {f"{s.id}#p{p}" for s in list(samples.values())[:6] for p in (1, 2, 3)
                     if p != 3 or s.expression is not None}
    assert {r["key"] for r in records} == expected_keys and len(records) == len(expected_keys)

    def pair_accuracy(protocol):
        by_pair = defaultdict(list)
        for r in records:
            if r["protocol"] == protocol:
                by_pair[r["pair_index"]].append(r["correct"])
        complete = [v for v in by_pair.values() if len(v) == 2]
        return 100.0 * sum(all(v) for v in complete) / len(complete)

    def miou(protocol, strategy):
        values = []
        for r in records:
            if r["protocol"] != protocol or not r["has_expression"]:
                continue
            selection = r["grounding"]["selections"][strategy]
            # the stored IoU agrees with the stored mask and the benchmark's ground truth
            predicted = rle_to_mask(selection["mask_rle"])
            gt = samples[r["sample_id"]].gt_mask
            union = np.logical_or(predicted, gt).sum()
            iou = 1.0 if union == 0 else np.logical_and(predicted, gt).sum() / union
            assert selection["iou"] == pytest.approx(iou), r["key"]
            values.append(iou)
        return 100.0 * float(np.mean(values))

    for row in summary["table"]:
        assert row["A_dagger"] is None and row["A_dagger_rule"] == pytest.approx(pair_accuracy(1))
        assert row["A"] == pytest.approx(pair_accuracy(2))
        assert row["M_dagger"] == pytest.approx(miou(1, row["select"]))
        assert row["M"] == pytest.approx(miou(3, row["select"]))
        a, m = row["A"], max(row["M_dagger"], row["M"])  # the rule-parsed A† stays out of S
        assert row["S"] == pytest.approx(0.0 if a + m == 0 else 2 * a * m / (a + m))
    # the oracle is the best candidate: no strategy beats it on any record
    for r in records:
        if r["grounding"] and r["has_expression"]:
            selections = r["grounding"]["selections"]
            assert selections["oracle"]["iou"] >= selections["similarity"]["iou"] - 1e-9
            assert len(r["grounding"]["candidates"]) == 3 * len(r["grounding"]["phrases"])
    timings = summary["timings"]["total_s"]
    assert timings["generate"] > 0 and set(timings) >= {"phrases", "upsample_peak", "sam_encoder", "sam_decoder"}


def test_resume_of_a_finished_run_computes_nothing(e2e_run, capsys, tmp_path):
    code, _, err, output = e2e_run
    assert code == 0, err
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    before = json.loads((copy / "summary.json").read_text())
    code, out, err = run_cli(["eval", "--fused", "--limit", "6", "--batch-size", "3", "--select", "oracle,similarity",
                              "--output", copy, "--resume", *FAST], capsys)
    assert code == 0, err
    after = json.loads((copy / "summary.json").read_text())
    assert after["run"]["records_written_now"] == 0
    strip = lambda s: {k: v for k, v in s.items() if k not in ("timings", "run")}  # noqa: E731
    assert strip(after) == strip(before)
    # and a different setting is refused with the reason
    code, _, err = run_cli(["eval", "--limit", "6", "--select", "oracle,similarity", "--output", copy, "--resume",
                            "--kernel-backend", "reference", "--device", "cpu", "--max-new-tokens", "9"], capsys)
    assert code == 2 and "max_new_tokens: run.json has 8, now 9" in err


def test_show_writes_overlays(e2e_run, capsys):
    code, _, err, output = e2e_run
    assert code == 0, err
    records = read_jsonl(output / "samples.jsonl")[0]
    sample_id = next(r["sample_id"] for r in records if r["grounding"] and r["grounding"]["phrases"])
    code, out, err = run_cli(["show", "--run", output, "--id", sample_id], capsys)
    assert code == 0, err
    paths = [pathlib.Path(line) for line in out.split()]
    assert paths and all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)
    code, _, err = run_cli(["show", "--run", output, "--id", "no-such-sample"], capsys)
    assert code == 2 and "no grounded record" in err


def test_report_merges_runs(e2e_run, tmp_path, capsys):
    code, _, err, output = e2e_run
    assert code == 0, err
    second = tmp_path / "second"
    shutil.copytree(output, second)
    markdown = tmp_path / "table.md"
    code, out, err = run_cli(["report", output, second, "--output", markdown], capsys)
    assert code == 0, err
    assert out.count("tiny-llava") == 4 and "second" in out
    assert markdown.read_text().startswith("| model | benchmark | select | run |")
    code, _, err = run_cli(["report", tmp_path / "missing"], capsys)
    assert code == 2 and "no summary.json" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--protocol", "1,4"], "not one of 1, 2, 3"),
        (["--protocol", "x"], "not one of 1, 2, 3"),
        (["--model", "tiny-nope"], "unknown tiny model 'tiny-nope'"),
        (["--model", "./no/such/checkpoint"], "no such checkpoint folder"),
        (["--benchmark", "mmvp"], "invalid choice: 'mmvp'"),
        (["--benchmark", "pixmmvp"], "needs a data root"),
        (["--benchmark", "pixmmvp", "--data-root", "/no/such/folder"], "root folder not found: /no/such/folder"),
        (["--select", "oracle,judge"], "needs a judge"),
        (["--select", "best"], "unknown"),
        (["--resume"], "--resume needs --output"),
        (["--shard", "2/2"], "--shard"),
    ],
)
def test_eval_bad_inputs_fail_clearly(args, message, capsys, tmp_path):
    if "--resume" not in args:
        args = [*args, "--output", tmp_path / "out"]
    code, _, err = run_cli(["eval", *args], capsys)
    assert code == 2
    assert message in err


def test_eval_unwritable_output_and_unknown_hub_model(tmp_path, capsys, no_interpreter):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(["eval", "--output", blocker / "run", "--limit", "2"], capsys)
    assert code == 2 and "is not writable" in err
    code, _, err = run_cli(["eval", "--model", "nobody/no-such-model", "--output", tmp_path / "hub", "--limit", "2",
                            "--protocol", "2", *FAST], capsys)
    assert code == 2 and "no-such-model" in err


def test_eval_with_judge_server(tmp_path, capsys, no_interpreter):
    """Protocol 1 graded by the judge; the judge also selects masks (it answers 'Yes' to everything)."""
    output = tmp_path / "judged"
    with FakeOpenAIServer([chat_reply("Yes")]) as server:
        code, out, err = run_cli(["eval", "--limit", "2", "--protocol", "1", "--select", "oracle,judge", "--judge",
                                  "openai:fake-judge", "--judge-base-url", server.base_url, "--output", output, *FAST],
                                 capsys)
        bodies = [r.body for r in server.requests]
    assert code == 0, err
    records = read_jsonl(output / "samples.jsonl")[0]
    assert all(r["correct_method"] == "judge:openai:fake-judge" and r["correct"] for r in records)
    grading = [b for b in bodies if "Respond with a Yes/No" in str(b["messages"][-1]["content"])]
    assert len(grading) == 2
    for record in records:
        judge = record["grounding"]["selections"]["judge"]
        if record["grounding"]["num_candidates"] > 1:
            assert judge["info"]["fallback"] == "no_integer" and judge["candidate_index"] == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["table"][0]["A_dagger"] == 100.0 and summary["components"]["judge"] == "openai:fake-judge"
    assert "openai:fake-judge" in (output / "summary.md").read_text()


def test_eval_triton_kernels_under_the_interpreter(tmp_path, capsys):
    """--kernel-backend triton through the whole pipeline (Triton's interpreter on CPU tensors)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on machines without CUDA)")
    code, out, err = run_cli(["eval", "--fused", "--limit", "2", "--protocol", "3", "--select", "oracle",
                              "--max-new-tokens", "6", "--device", "cpu", "--kernel-backend", "triton",
                              "--output", tmp_path / "run"], capsys)
    assert code == 0, err
    records = read_jsonl(tmp_path / "run" / "samples.jsonl")[0]
    assert len(records) == 2 and all(r["grounding"] is not None for r in records)


def test_sweep_templates(tmp_path, capsys, no_interpreter):
    output = tmp_path / "sweep"
    code, out, err = run_cli(["eval", "--sweep-templates", "--limit", "2", "--protocol", "2,3", "--select", "oracle",
                              "--output", output, "--kernel-backend", "reference", "--device", "cpu",
                              "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    sweep = json.loads((output / "sweep.json").read_text())
    assert [r["template"] for r in sweep["vqa"]["per_template"]] == list(range(1, len(vqa_templates()) + 1))
    assert [r["template"] for r in sweep["grounding"]["per_template"]] == list(range(1, len(grounding_templates()) + 1))
    values = [r["M"]["oracle"] for r in sweep["grounding"]["per_template"]]
    assert sweep["grounding"]["M"]["oracle"]["mean"] == pytest.approx(np.mean(values))
    assert sweep["grounding"]["M"]["oracle"]["std"] == pytest.approx(np.std(values, ddof=1))
    assert "±" in out
    samples = load_benchmark("synthetic", n=16, seed=0)[:2]
    records = read_jsonl(output / "sweep" / "vqa-03" / "samples.jsonl")[0]
    assert [r["prompt"] for r in records] == [build_prompt(s, 2, vqa_template=3) for s in samples]
    records = read_jsonl(output / "sweep" / "grounding-05" / "samples.jsonl")[0]
    assert [r["prompt"] for r in records] == [build_prompt(s, 3, grounding_template=5) for s in samples]


def test_grounding_prompt_override(tmp_path, capsys, no_interpreter):
    code, _, err = run_cli(["eval", "--limit", "2", "--protocol", "3", "--select", "oracle", "--grounding-prompt",
                            "Where is {}?", "--output", tmp_path / "run", *FAST], capsys)
    assert code == 0, err
    records = read_jsonl(tmp_path / "run" / "samples.jsonl")[0]
    samples = load_benchmark("synthetic", n=16, seed=0)[:2]
    assert [r["prompt"] for r in records] == [f"Where is {s.expression}?" for s in samples]


def test_ground_demo_with_judge(tmp_path, capsys, no_interpreter):
    image_path = tmp_path / "scene.png"
    load_benchmark("synthetic", n=2, seed=0)[0].load_image().save(image_path)
    with FakeOpenAIServer([chat_reply("yes"), chat_reply("2")]) as server:
        code, out, err = run_cli(["ground", "--image", image_path, "--prompt", "What is in the image?", "--expression",
                                  "the green square", "--judge", "openai:fake", "--judge-base-url", server.base_url,
                                  "--output", tmp_path / "demo", "--max-new-tokens", "12", "--kernel-backend", "reference",
                                  "--device", "cpu"], capsys)
    assert code == 0, err
    payload = json.loads((tmp_path / "demo.json").read_text())
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG_MAGIC
    assert payload["answer"] and "answer:" in out
    assert len(payload["points"]) == len(payload["phrases"]) == len(payload["sam_scores"])
    if len(payload["phrases"]) * 3 > 1:
        assert payload["selection"]["strategy"] == "judge" and payload["selection"]["candidate_index"] == 1
    code, _, err = run_cli(["ground", "--image", tmp_path / "missing.png", "--prompt", "hi"], capsys)
    assert code == 2 and "does not exist" in err


def test_data_command(capsys):
    code, out, err = run_cli(["data", "--benchmark", "synthetic", "--synthetic-n", "8"], capsys)
    assert code == 0, err
    assert "num_samples" in out and " 8" in out
    code, out, _ = run_cli(["data", "--benchmark", "synthetic", "--synthetic-n", "8", "--json"], capsys)
    stats = json.loads(out)
    assert stats["num_samples"] == 8 and stats["num_pairs"] == 4 and stats["problems"] == []
    for args, message in ((["--benchmark", "nope"], "invalid choice: 'nope'"), (["--benchmark", "pixcvbench"], "--data-root"),
                          (["--benchmark", "synthetic", "--synthetic-n", "3"], "even")):
        code, _, err = run_cli(["data", *args], capsys)
        assert code == 2 and message in err


def test_missing_images_are_counted_and_listed_or_fatal(annotations_root, tmp_path, capsys, no_interpreter):
    root = build_pixmmvp_root(annotations_root, tmp_path / "pixmmvp")
    code, out, err = run_cli(["data", "--benchmark", "pixmmvp", "--data-root", root, "--json"], capsys)
    assert code == 0, err
    stats = json.loads(out)
    assert stats["num_samples"] == 4 and stats["skipped"] == 296
    assert any("5.jpg" in p for p in stats["problems"])
    code, _, err = run_cli(["data", "--benchmark", "pixmmvp", "--data-root", root, "--strict"], capsys)
    assert code == 2 and ".jpg" in err
    code, out, err = run_cli(["eval", "--benchmark", "pixmmvp", "--data-root", root, "--no-strict", "--limit", "2",
                              "--protocol", "2", "--select", "oracle", "--output", tmp_path / "run", *FAST], capsys)
    assert code == 0, err
    assert "296 benchmark entries were skipped" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["counts"]["samples"] == 2 and len(summary["run"]["skipped_samples"]) == 296
    code, _, err = run_cli(["eval", "--benchmark", "pixmmvp", "--data-root", root, "--strict", "--limit", "2",
                            "--protocol", "2", "--output", tmp_path / "strict", *FAST], capsys)
    assert code == 2 and "image" in err


def test_python_dash_m_pixfound_help():
    import pixfound

    # The subprocess imports the package these tests import: the source tree, or an installed wheel.
    env = dict(os.environ)
    package_parent = str(pathlib.Path(pixfound.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "pixfound", "--help"], env=env, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    for command in ("data", "eval", "score", "when", "show", "ground", "report"):
        assert command in text


def test_default_selection_is_oracle_and_similarity_plus_the_judge():
    args = cli.build_parser().parse_args(["eval", "--output", "x"])
    assert cli._eval_config(args).resolved().selects == ("oracle", "similarity")
    args = cli.build_parser().parse_args(["eval", "--output", "x", "--judge", "openai:gpt-4o"])
    assert cli._eval_config(args).resolved().selects == ("oracle", "similarity", "judge")
    args = cli.build_parser().parse_args(["eval", "--output", "x", "--select", "judge,oracle", "--judge", "hf:m"])
    assert cli._eval_config(args).resolved().selects == ("oracle", "judge")



def test_sam_precision_and_encoder_batch_flags_reach_the_config():
    from pixfound.cli import _eval_config, build_parser

    config = _eval_config(build_parser().parse_args(["eval", "--batch-size", "6", "--sam-dtype", "bfloat16",
                                                     "--output", "unused"])).resolved()
    assert config.sam_dtype == "bfloat16" and config.sam_batch_size == 6  # encoder batch follows --batch-size
    config = _eval_config(build_parser().parse_args(["eval", "--sam-batch-size", "2", "--output", "unused"]))
    assert config.sam_dtype == "float32" and config.sam_batch_size == 2


def test_prefix_sharing_and_cpp_backend_flags_reach_the_config():
    from pixfound.cli import _eval_config, build_parser

    config = _eval_config(build_parser().parse_args(["eval", "--output", "unused"]))
    assert config.share_image_prefix is False and config.kernel_backend == "auto"
    config = _eval_config(build_parser().parse_args(["eval", "--share-image-prefix", "--kernel-backend", "cpp",
                                                     "--output", "unused"]))
    assert config.share_image_prefix is True and config.kernel_backend == "cpp"
    assert config.cudnn_attention is False
    assert _eval_config(build_parser().parse_args(["eval", "--cudnn-attention", "--output", "unused"])).cudnn_attention
    assert config.kv_cache == "preallocated"
    assert _eval_config(build_parser().parse_args(["eval", "--kv-cache", "dynamic", "--output", "unused"])).kv_cache \
        == "dynamic"
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        dataclasses.replace(config, kv_cache="static").validate()
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--kernel-backend", "cuda"])


@pytest.mark.parametrize("args, select", [
    (["--model", "tiny-cambrian"], "oracle"),
    (["--model", "tiny-qwen3-vl"], "oracle"),
    (["--model", "tiny-qwen2.5-vl", "--grounding", "points"], "oracle"),
    (["--model", "tiny-qwen3-vl", "--grounding", "boxes"], "model"),
    (["--model", "tiny-cambrian", "--grounding", "baseline"], "model"),
])
def test_every_family_and_grounding_mode_runs_offline(args, select, tmp_path, capsys):
    code, out, err = run_cli(["-q", "eval", *args, "--limit", "2", "--kernel-backend", "cpp", "--device", "cpu",
                              "--max-new-tokens", "6", "--output", tmp_path / "run"], capsys)
    assert code == 0, err
    records = read_jsonl(tmp_path / "run" / "samples.jsonl")[0]
    grounded = [r for r in records if r.get("grounding")]
    assert grounded and all(select in r["grounding"]["selections"] for r in grounded)
    native = "--grounding" in args
    assert all(bool(r["grounding"].get("native")) == native for r in grounded)
    assert {r["protocol"] for r in grounded} == ({3} if native else {1, 3})
    assert out.splitlines()[2].split()[2] == select
