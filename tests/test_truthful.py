"""Every output tells the truth: partial data, user mistakes, faults and interrupted runs.

Each test reproduces one case a user met: the command, the data root or the fault, and what pixfound
must do now (one clear line and exit 2 for a mistake, nothing overwritten or lost, every partial
number labelled as such).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from fake_openai_server import FakeOpenAIServer, Reply, error_reply
from pixfound import cli
from pixfound.eval import records as records_module
from pixfound.eval.records import read_jsonl
from stand_in_data import build_cvbench_root, build_pixmmvp_root

REPO = pathlib.Path(__file__).resolve().parents[1]
FAST = ["--kernel-backend", "cpp", "--device", "cpu", "--max-new-tokens", "6"]


def run(args, capsys):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str, code: int) -> None:
    assert code == 2 and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err


# `python -c KILLED_AT_SUMMARY ARGS` runs the command line and SIGKILLs itself just as it is about to
# put summary.json in place: the moment a kill loses the most.
KILLED_AT_SUMMARY = """
import os, sys
from pixfound.eval import records
real = os.replace
def replace(src, dst):
    if str(dst).endswith("summary.json"):
        os.kill(os.getpid(), 9)
    return real(src, dst)
records.os.replace = replace
from pixfound import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TRITON_INTERPRET="0")


# ------------------------------------------------------------------------------------------------
# 1, 2. score: by sample id only, never an empty folder, never over an earlier result
# ------------------------------------------------------------------------------------------------
def test_score_maps_files_by_sample_id_only(annotations_root, tmp_path, capsys):
    root = build_pixmmvp_root(annotations_root, tmp_path / "DATA", images=())
    preds = tmp_path / "p"
    preds.mkdir()
    Image.new("L", (224, 224), 255).save(preds / "5.png")
    code, out, err = run(["score", "--preds", preds, "--benchmark", "pixmmvp", "--data-root", root], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "p-score" / "per_sample.jsonl").read_text().splitlines()]
    with_file = [r for r in rows if r["file"] is not None]
    assert [(r["sample_id"], r["file"]) for r in with_file] == [("5", "5.png")]  # not also sample 6 (position 5)
    summary = json.loads((tmp_path / "p-score" / "summary.json").read_text())
    assert summary["counts"]["missing"] == 299 and len(summary["missing"]) == 299
    assert "MISSING: 299 sample(s)" in out
    assert not (preds / "summary.json").exists()  # the predictions folder is left alone


def test_score_refuses_an_empty_folder_and_an_earlier_result(annotations_root, tmp_path, capsys):
    root = build_pixmmvp_root(annotations_root, tmp_path / "DATA", images=())
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run(["score", "--preds", empty, "--benchmark", "pixmmvp", "--data-root", root], capsys)
    one_line_error(err, code)
    assert "holds no prediction" in err and "mIoU" not in out
    preds = tmp_path / "preds"
    preds.mkdir()
    Image.new("L", (224, 224), 0).save(preds / "1.png")
    args = ["score", "--preds", preds, "--benchmark", "pixmmvp", "--data-root", root]
    assert run(args, capsys)[0] == 0
    first = (tmp_path / "preds-score" / "summary.json").read_bytes()
    code, _, err = run(args, capsys)
    one_line_error(err, code)
    assert "--force" in err and (tmp_path / "preds-score" / "summary.json").read_bytes() == first
    assert run([*args, "--force"], capsys)[0] == 0
    assert run([*args, "--output", preds], capsys)[0] == 2  # never into the predictions themselves


def test_sigkill_during_score_then_a_plain_rerun(tmp_path):
    """A score killed while writing its summary leaves no half file, and a plain rerun completes it."""
    preds = tmp_path / "preds"
    preds.mkdir()
    Image.new("L", (96, 128), 255).save(preds / "s0-0.png")
    args = ["score", "--preds", str(preds), "--benchmark", "synthetic", "--output", str(tmp_path / "out")]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_SUMMARY, *args], env=_env(), capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "out" / "summary.json").exists()
    rerun = subprocess.run([sys.executable, "-m", "pixfound", *args], env=_env(), capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["counts"]["missing"] == 15


# ------------------------------------------------------------------------------------------------
# 3. broken data stops the paper's benchmarks; a skipped entry is said wherever the score is
# ------------------------------------------------------------------------------------------------
def test_a_short_cvbench_file_stops_the_run_or_is_said_everywhere(annotations_root, tmp_path, capsys):
    root = build_cvbench_root(annotations_root, tmp_path / "cv", rows=8)
    args = ["eval", "--benchmark", "pixcvbench", "--data-root", root, "--protocol", "2", "--select", "oracle",
            "--recipe", "pixfound", *FAST]
    code, _, err = run([*args, "--output", tmp_path / "strict"], capsys)
    one_line_error(err, code)
    assert "Objects.csv" in err and "row count mismatch" in err
    assert not (tmp_path / "strict").exists()  # nothing left that blocks a rerun
    code, out, err = run([*args, "--no-strict", "--output", tmp_path / "loose"], capsys)
    assert code == 0, err
    line = "8 of 1438 samples scored (1430 skipped: see summary.json)"
    assert line in out and line in (tmp_path / "loose" / "summary.md").read_text()
    code, out, _ = run(["report", tmp_path / "loose"], capsys)
    assert code == 0 and "8/1438" in out


def test_a_deleted_pixmmvp_image_stops_the_run_or_is_listed(annotations_root, tmp_path, capsys):
    root = build_pixmmvp_root(annotations_root, tmp_path / "DATA", images=range(1, 301))
    (root / "MMVP Images" / "7.jpg").unlink()
    args = ["eval", "--benchmark", "pixmmvp", "--data-root", root, "--protocol", "2", "--select", "oracle", "--limit",
            "4", "--recipe", "pixfound", *FAST]
    code, _, err = run([*args, "--output", tmp_path / "strict"], capsys)
    one_line_error(err, code)
    assert "7.jpg" in err
    code, out, _ = run([*args, "--no-strict", "--output", tmp_path / "loose"], capsys)
    assert code == 0
    assert "4 of 300 samples scored (1 skipped: see summary.json; --limit 4)" in out
    summary = json.loads((tmp_path / "loose" / "summary.json").read_text())
    assert summary["coverage"]["skipped"] == 1 and summary["coverage"]["limit"] == 4


# ------------------------------------------------------------------------------------------------
# 4. ground never writes over its input
# ------------------------------------------------------------------------------------------------
def test_ground_never_overwrites_the_input_image(tmp_path, capsys):
    folder = tmp_path / "g"
    folder.mkdir()
    photo = folder / "photo.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(photo)
    before = photo.read_bytes()
    code, _, err = run(["ground", "--image", photo, "--prompt", "What is this?", "--output", folder / "photo",
                        *FAST], capsys)
    one_line_error(err, code)
    assert "input image" in err and photo.read_bytes() == before
    code, _, err = run(["ground", "--image", photo, "--prompt", "What is this?", "--output", folder / "demo",
                        *FAST], capsys)
    assert code == 0, err
    assert run(["ground", "--image", photo, "--prompt", "Again?", "--output", folder / "demo", *FAST], capsys)[0] == 2


# ------------------------------------------------------------------------------------------------
# 5. --share-image-prefix is refused where it cannot work
# ------------------------------------------------------------------------------------------------
def test_share_image_prefix_is_refused_for_qwen2_vl(tmp_path, capsys):
    code, _, err = run(["eval", "--model", "tiny-qwen2-vl", "--share-image-prefix", "--limit", "2", "--output",
                        tmp_path / "run", *FAST], capsys)
    one_line_error(err, code)
    assert "LLaVA families only" in err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# 6. a truncated JPEG is named, found by `data`, and leaves no folder behind
# ------------------------------------------------------------------------------------------------
def test_a_truncated_jpeg_is_named_and_blocks_nothing(annotations_root, tmp_path, capsys):
    root = build_pixmmvp_root(annotations_root, tmp_path / "DATA", images=range(1, 301))
    broken = root / "MMVP Images" / "2.jpg"
    Image.new("RGB", (224, 224), (12, 200, 30)).save(broken, quality=95)
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # cut short: the header still reads, the pixels do not
    code, out, _ = run(["data", "--benchmark", "pixmmvp", "--data-root", root, "--json"], capsys)
    assert code == 0
    assert any("2.jpg" in p and "cannot be read" in p for p in json.loads(out)["problems"])
    args = ["eval", "--benchmark", "pixmmvp", "--data-root", root, "--limit", "4", "--protocol", "2", "--select",
            "oracle", "--recipe", "pixfound", "--output", tmp_path / "run", *FAST]
    code, _, err = run(args, capsys)
    one_line_error(err, code)
    assert "2.jpg" in err and "cannot be read" in err
    assert not (tmp_path / "run").exists()
    code, out, err = run([*args, "--no-strict"], capsys)  # the same folder: nothing blocks the rerun
    assert code == 0, err
    assert "3 of 300 samples scored" in out


# ------------------------------------------------------------------------------------------------
# 7. --resume with another --limit
# ------------------------------------------------------------------------------------------------
def test_resume_refuses_another_limit_unless_extended(tmp_path, capsys):
    out_dir = tmp_path / "run"
    base = ["eval", "--protocol", "2", "--select", "oracle", "--output", out_dir, *FAST]
    assert run([*base, "--limit", "2"], capsys)[0] == 0
    code, _, err = run([*base, "--limit", "4", "--resume"], capsys)
    one_line_error(err, code)
    assert "--extend" in err
    code, _, err = run([*base, "--limit", "1", "--resume"], capsys)
    one_line_error(err, code)
    code, out, err = run([*base, "--limit", "4", "--resume", "--extend"], capsys)
    assert code == 0, err
    run_json = json.loads((out_dir / "run.json").read_text())
    assert run_json["config"]["limit"] == 4 and run_json["selection"]["samples"] == 4
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["coverage"]["limit"] == 4 and summary["run"]["records_written_now"] == 2
    assert run([*base, "--limit", "4", "--resume"], capsys)[0] == 0  # the grown run resumes as it is now


# ------------------------------------------------------------------------------------------------
# 8. mistakes are one line; Ctrl-C says how to go on; a bad flag leaves nothing behind
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "no CUDA device"),
    (["--kernel-backend", "triton"], "kernel backend 'triton' runs on CUDA tensors"),
    (["--vqa-template", "11"], "--vqa-template must be a layout number from 1 to 10"),
    (["--grounding-template", "Find the thing."], "one '{}'"),
    (["--judge", "openai:gpt-4o", "--judge-base-url", "ftp://x"], "http(s) URL"),
])
def test_mistakes_are_one_line_and_leave_no_folder(args, message, tmp_path, capsys, monkeypatch):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out_dir = tmp_path / "run"
    machine = [] if {"--device", "--kernel-backend"} & set(args) else FAST
    if "triton" in args:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' interpreter would make it valid
    code, _, err = run(["eval", *args, *machine, "--limit", "2", "--output", out_dir], capsys)
    one_line_error(err, code)
    assert message in err
    assert not out_dir.exists()
    code, _, err = run(["eval", "--limit", "2", "--protocol", "2", "--select", "oracle", "--output", out_dir, *FAST],
                       capsys)
    assert code == 0, err  # the corrected command runs in the same folder


def test_bugs_keep_their_traceback(monkeypatch, tmp_path):
    from pixfound.eval import runner

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(runner, "compute_records", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["eval", "--limit", "2", "--protocol", "2", "--select", "oracle", "--output", str(tmp_path / "r"),
                  *FAST])


def test_ctrl_c_says_how_to_continue(tmp_path):
    out_dir = tmp_path / "run"
    command = [sys.executable, "-m", "pixfound", "-q", "eval", "--limit", "10", "--batch-size", "1", "--protocol",
               "1,3", "--select", "oracle", "--output", str(out_dir), *FAST]
    victim = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    samples = out_dir / "samples.jsonl"
    deadline = time.monotonic() + 300
    while (not samples.exists() or samples.read_bytes().count(b"\n") < 2) and victim.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=120)
    err = err.decode()
    assert victim.returncode == 130, err
    assert "Traceback" not in err
    assert "record(s) in this run" in err and f"continue with: pixfound eval --resume --output {out_dir}" in err
    read_jsonl(samples)  # every line kept is a whole record
    resumed = subprocess.run(command + ["--resume"], env=_env(), capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]


# ------------------------------------------------------------------------------------------------
# 9. context travels with the numbers; one file mode; -q and -v
# ------------------------------------------------------------------------------------------------
def test_context_and_file_modes(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run(["-q", "eval", "--limit", "4", "--select", "oracle", "--output", out_dir, *FAST], capsys)
    assert code == 0, err
    assert "RANDOM WEIGHTS" in out and "4 of 16 samples scored (--limit 4)" in out
    assert "Loading weights" not in err  # -q: no progress bars, transformers' included
    modes = {path.name: path.stat().st_mode & 0o777 for path in out_dir.iterdir() if path.is_file()}
    assert len(set(modes.values())) == 1, modes
    code, out, _ = run(["report", out_dir], capsys)
    assert "random weights" in out and "4/16" in out
    summary = json.loads((out_dir / "summary.json").read_text())
    from pixfound.eval.figures import plot_note

    assert plot_note(summary) == "4 of 16 samples; RANDOM WEIGHTS: shows the pipeline only"
    code, _, err = run(["-v", "eval", "--limit", "2", "--protocol", "2", "--select", "oracle", "--output",
                        tmp_path / "verbose", *FAST], capsys)
    assert code == 0 and "settings: " in err and "batch 1: protocol 2" in err


def test_sweep_says_what_its_numbers_stand_on(tmp_path, capsys):
    code, out, err = run(["eval", "--sweep-templates", "--limit", "2", "--protocol", "2", "--select", "oracle",
                          "--output", tmp_path / "sweep", *FAST], capsys)
    assert code == 0, err
    text = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "2 of 16 samples" in text and "RANDOM WEIGHTS" in text and "2 of 16 samples" in out


# ------------------------------------------------------------------------------------------------
# faults: a full disk, a failing judge, a kill during the final summary
# ------------------------------------------------------------------------------------------------
def test_a_full_disk_stops_cleanly_and_resume_completes(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "run"
    args = ["eval", "--limit", "4", "--batch-size", "1", "--protocol", "1,2", "--select", "oracle", "--output",
            out_dir, *FAST]
    real = records_module.RecordWriter._write_all
    calls = {"n": 0}

    def fill_disk(self, data):
        calls["n"] += 1
        if calls["n"] == 4:
            real(self, data[: len(data) // 2])  # half a record reaches the disk, then it is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, data)

    monkeypatch.setattr(records_module.RecordWriter, "_write_all", fill_disk)
    code, _, err = run(args, capsys)
    assert code == 1 and "Traceback" not in err
    assert "No space left on device" in err and "--resume" in err and "samples.jsonl" in err
    kept, partial = read_jsonl(out_dir / "samples.jsonl", allow_partial_tail=False)
    assert len(kept) == 3 and not partial  # the half record is gone
    monkeypatch.setattr(records_module.RecordWriter, "_write_all", real)
    code, _, err = run([*args, "--resume"], capsys)
    assert code == 0, err
    assert run([*args[:-len(FAST) - 2], "--output", tmp_path / "whole", *FAST], capsys)[0] == 0
    done = {r["key"]: r["answer"] for r in read_jsonl(out_dir / "samples.jsonl")[0]}
    whole = {r["key"]: r["answer"] for r in read_jsonl(tmp_path / "whole" / "samples.jsonl")[0]}
    assert done == whole


@pytest.mark.parametrize("failure", ["http_500", "http_429", "timeout", "garbage"])
def test_a_failing_judge_falls_back_and_the_run_goes_on(tmp_path, failure):
    from pixfound.eval.config import EvalConfig
    from pixfound.eval.judge import OpenAIJudge
    from pixfound.eval.pipeline import build_pipeline
    from pixfound.eval.runner import run_evaluation

    reply = {"http_500": error_reply(500, "boom"), "http_429": error_reply(429, "slow down"),
             "timeout": Reply(body={}, delay=1.0), "garbage": Reply(body="<html>oops</html>")}[failure]
    server = FakeOpenAIServer([reply]).start()
    try:
        judge = OpenAIJudge("m", base_url=server.base_url, api_key="k", max_attempts=2, backoff=0.001, timeout=0.3)

        def factory(config):
            # the real pipeline, with a judge that gives up quickly
            pipeline = build_pipeline(dataclasses.replace(config, selects=("oracle",), judge="none"))
            pipeline.judge, pipeline.config = judge, config.resolved()
            return pipeline

        config = EvalConfig(limit=4, protocols=(1, 3), selects=("oracle", "judge"), judge="openai:m",
                            kernel_backend="cpp", device="cpu", max_new_tokens=6, output=str(tmp_path / "run"),
                            progress=False)
        summary = run_evaluation(config, pipeline_factory=factory)
    finally:
        server.stop()
    records = read_jsonl(tmp_path / "run" / "samples.jsonl")[0]
    graded = [r for r in records if r["protocol"] == 1]
    assert graded and all(r["judge_error"] and r["correct_method"] == "rule" for r in graded)
    judged = [r["grounding"]["selections"]["judge"]["info"] for r in records if r.get("grounding")]
    assert all(info.get("judge_error") or info["reason"] == "no_candidates" for info in judged)
    assert summary["accuracy"]["p1"]["judge_fallbacks"] == len(graded)
    assert summary["table"][0]["A_dagger"] is None  # a fallen-back A† is not a graded one


def test_sigkill_during_the_final_summary_then_resume(tmp_path):
    out_dir = tmp_path / "run"
    args = ["eval", "--limit", "4", "--protocol", "2", "--select", "oracle", "--output", str(out_dir), *FAST]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_SUMMARY, *args], env=_env(), capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert not (out_dir / "summary.json").exists()
    assert len(read_jsonl(out_dir / "samples.jsonl", allow_partial_tail=False)[0]) == 4
    resumed = subprocess.run([sys.executable, "-m", "pixfound", *args, "--resume"], env=_env(), capture_output=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["run"]["records_written_now"] == 0 and summary["counts"]["records"] == 4


# ------------------------------------------------------------------------------------------------
# 10. the README tells the truth
# ------------------------------------------------------------------------------------------------
def test_readme_is_true():
    readme = (REPO / "README.md").read_text()
    assert "hf download" in readme and "huggingface-cli" not in readme
    assert "PIXFOUND_ANNOTATIONS" in readme
    assert "DESIGN notes" not in readme
    assert "Nothing is downloaded at run time" not in readme and "nothing is downloaded at run time" not in readme
