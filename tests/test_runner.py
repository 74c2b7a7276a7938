"""The evaluation harness: record files, resume, config checks, shards and merge, batch invariance, SIGKILL.

Most tests drive :func:`run_evaluation` with a fake pipeline (no model) so that the bookkeeping is
tested in isolation; the batch-invariance and SIGKILL tests run the real tiny models.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pixfound.data import load_benchmark
from pixfound.eval import records as run_records, runner
from pixfound.eval.config import EvalConfig, parse_protocols, parse_selects, parse_shard
from pixfound.eval.records import ConfigMismatchError, RecordWriter, RunPaths, read_jsonl, record_key, repair_jsonl_tail
from pixfound.eval.runner import Worker, run_evaluation, shard_positions

REPO = pathlib.Path(__file__).resolve().parents[1]


def _use_torch_kernels(monkeypatch) -> None:
    """Run the reference backends on CPU (faster, same maths). The Triton kernel modules are imported
    first, while TRITON_INTERPRET is still set: a kernel decorated without it is compiled for the
    GPU and would break later interpreter tests in this process."""
    import pixfound.triton_kernels.image_attention  # noqa: F401
    import pixfound.triton_kernels.upsample_peak  # noqa: F401

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _strip_volatile(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("timings", "run")}


class FakePipeline:
    """Deterministic records from sample fields alone; counts what it was asked to compute.

    ``fail_after`` raises after that many records were produced (a crash in the middle of a run).
    """

    def __init__(self, config: EvalConfig, fail_after: int | None = None):
        self.config = config
        self.fail_after = fail_after
        self.calls: list[tuple[str, int]] = []
        self.batches: list[int] = []

    def components(self) -> dict:
        return {"model": {"name": self.config.model}, "random_weights": True}

    def end_batch(self) -> None:
        pass

    def process(self, samples, protocol):
        self.batches.append(len(samples))
        records = []
        for sample in samples:
            if self.fail_after is not None and len(self.calls) >= self.fail_after:
                raise RuntimeError("simulated crash")
            self.calls.append((sample.id, protocol))
            records.append(fake_record(sample, protocol))
        return records


def fake_record(sample, protocol: int) -> dict:
    record = {
        "key": record_key(sample.id, protocol), "sample_id": sample.id, "index": sample.index,
        "benchmark": sample.benchmark, "protocol": protocol, "task": sample.task, "pair_index": sample.pair_index,
        "has_expression": sample.has_expression, "expression": sample.expression, "answer": f"answer {sample.index}",
        "timings": {"generate_s": 0.01},
    }
    if protocol in (1, 2):
        record.update(correct=(sample.index * 7 + protocol) % 3 != 0, parsed_choice="A", correct_method="rule")
    if protocol in (1, 3):
        iou = ((sample.index * 37 + protocol) % 10) / 10
        record["grounding"] = {
            "gt_area": 10, "phrases": [{"index": 0, "text": "the thing", "position_pct": 10.0 * (sample.index % 10)}],
            "selections": {"oracle": {"candidate_index": 0, "phrase_index": 0, "iou": iou, "grounded": iou > 0.5,
                                      "pred_area": 5}},
        }
    else:
        record["grounding"] = None
    return record


@pytest.fixture(scope="module")
def synthetic_samples():
    return load_benchmark("synthetic", n=12, seed=3)


def _config(tmp_path: pathlib.Path, name: str = "run", **overrides) -> EvalConfig:
    values = dict(model="fake-model", selects=("oracle",), output=str(tmp_path / name), progress=False,
                  device="cpu", dtype="float32", batch_size=3)
    values.update(overrides)
    return EvalConfig(**values)


# --------------------------------------------------------------------------------- record files


def test_read_jsonl_drops_only_a_half_written_last_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"key": "a#p1"}\n{"key": "b#p1"}\n{"key": "c#p', encoding="utf-8")
    records, partial = read_jsonl(path)
    assert [r["key"] for r in records] == ["a#p1", "b#p1"]
    assert partial is True
    assert repair_jsonl_tail(path) is True
    assert path.read_text(encoding="utf-8") == '{"key": "a#p1"}\n{"key": "b#p1"}\n'
    assert repair_jsonl_tail(path) is False


def test_a_complete_last_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"key": "a#p1"}\n{"key": "b#p1"}', encoding="utf-8")
    assert repair_jsonl_tail(path) is False
    assert path.read_text(encoding="utf-8").endswith('{"key": "b#p1"}\n')
    assert [r["key"] for r in read_jsonl(path)[0]] == ["a#p1", "b#p1"]


def test_a_corrupt_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"key": "a#p1"}\nnot json\n{"key": "b#p1"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"samples.jsonl: line 2"):
        read_jsonl(path)


def test_record_writer_flushes_each_record(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = RecordWriter(path)
    writer.write({"key": "x#p2", "value": 1})
    # Another reader sees the record before the writer is closed (a SIGKILL now loses nothing).
    assert read_jsonl(path)[0] == [{"key": "x#p2", "value": 1}]
    writer.close()


def test_record_writer_rejects_nan(tmp_path):
    with RecordWriter(tmp_path / "out.jsonl") as writer, pytest.raises(ValueError):
        writer.write({"key": "x#p1", "iou": float("nan")})


# --------------------------------------------------------------------------------- arguments


def test_parse_protocols_and_errors():
    assert parse_protocols("3,1") == (1, 3)
    assert parse_protocols("1, 2 ,3") == (1, 2, 3)
    for bad, message in (("4", "not one of 1, 2, 3"), ("1,x", "'x'"), ("", "at least one"), ("1,1", "twice")):
        with pytest.raises(ValueError, match=message):
            parse_protocols(bad)


def test_parse_selects_and_shard():
    assert parse_selects("judge,oracle") == ("oracle", "judge")
    with pytest.raises(ValueError, match="unknown"):
        parse_selects("oracle,best")
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x/2", "1", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_config_validation_names_the_setting(tmp_path):
    with pytest.raises(ValueError, match="needs a judge"):
        _config(tmp_path, selects=("oracle", "judge"))
    with pytest.raises(ValueError, match="batch_size"):
        _config(tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="protocols"):
        _config(tmp_path, protocols=(1, 5))
    config = _config(tmp_path, protocols=(1, 3))
    assert EvalConfig.from_dict(config.to_dict()) == config


def test_shard_positions_partition_the_samples():
    count, world = 11, 3
    parts = [shard_positions(count, rank, world) for rank in range(world)]
    assert sorted(i for part in parts for i in part) == list(range(count))
    assert all(i % world == rank for rank, part in enumerate(parts) for i in part)
    with pytest.raises(ValueError):
        shard_positions(5, 3, 3)


def test_worker_from_env():
    assert runner.worker_from_env(env={}) == Worker()
    torchrun = runner.worker_from_env(env={"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert (torchrun.rank, torchrun.world, torchrun.kind) == (2, 4, "torchrun")
    assert runner.worker_from_env((1, 3), env={}).tag == "shard-001-of-003"
    with pytest.raises(ValueError, match="torchrun"):
        runner.worker_from_env((0, 2), env={"WORLD_SIZE": "2", "RANK": "0"})


# --------------------------------------------------------------------------------- runs with a fake pipeline


def test_run_writes_every_expected_record_once(tmp_path, synthetic_samples):
    config = _config(tmp_path)
    pipeline = FakePipeline(config)
    summary = run_evaluation(config, pipeline_factory=lambda c: pipeline, samples=synthetic_samples)
    expected = run_records.expected_keys(synthetic_samples, config.protocols)
    records, partial = read_jsonl(RunPaths(tmp_path / "run").samples)
    assert not partial
    assert [r["key"] for r in records] == sorted(expected, key=lambda k: (
        next(s.index for s in synthetic_samples if s.id == k.split("#")[0]), int(k[-1])))
    # protocol 3 is skipped exactly for the samples without an expression
    without = [s.id for s in synthetic_samples if s.expression is None]
    assert without and all(record_key(i, 3) not in expected for i in without)
    assert summary["counts"]["missing_records"] == 0
    assert max(pipeline.batches) <= config.batch_size
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["config"]["model"] == "fake-model" and "torch" in run_json["versions"]


def test_refuses_to_overwrite_an_existing_run(tmp_path, synthetic_samples):
    config = _config(tmp_path)
    run_evaluation(config, pipeline_factory=FakePipeline, samples=synthetic_samples)
    with pytest.raises(ValueError, match="already holds a run"):
        run_evaluation(config, pipeline_factory=FakePipeline, samples=synthetic_samples)


def test_unwritable_output_is_a_clear_error(tmp_path, synthetic_samples):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    config = _config(tmp_path, output=str(blocker / "run"))
    with pytest.raises(ValueError, match="not writable"):
        run_evaluation(config, pipeline_factory=FakePipeline, samples=synthetic_samples)


def test_resume_after_a_crash_computes_only_missing_keys_and_matches(tmp_path, synthetic_samples):
    reference = _config(tmp_path, "reference")
    full = run_evaluation(reference, pipeline_factory=FakePipeline, samples=synthetic_samples)

    crashed = _config(tmp_path, "crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_evaluation(crashed, pipeline_factory=lambda c: FakePipeline(c, fail_after=7), samples=synthetic_samples)
    paths = RunPaths(tmp_path / "crashed")
    first_part = {r["key"] for r in read_jsonl(paths.samples)[0]}
    assert 0 < len(first_part) < len(run_records.expected_keys(synthetic_samples, crashed.protocols))
    with open(paths.samples, "a", encoding="utf-8") as handle:  # a record cut off mid-write
        handle.write('{"key": "s3-11#p1", "sample_id": "s3-1')

    second = FakePipeline(crashed)
    resumed = run_evaluation(_config(tmp_path, "crashed", resume=True), pipeline_factory=lambda c: second,
                             samples=synthetic_samples)
    recomputed = {record_key(i, p) for i, p in second.calls}
    assert not recomputed & first_part, "resume recomputed finished records"
    assert recomputed | first_part == set(run_records.expected_keys(synthetic_samples, crashed.protocols))
    assert _strip_volatile(resumed) == _strip_volatile(full)
    keys = [r["key"] for r in read_jsonl(paths.samples)[0]]
    assert len(keys) == len(set(keys))


def test_resume_refuses_other_settings(tmp_path, synthetic_samples):
    run_evaluation(_config(tmp_path), pipeline_factory=FakePipeline, samples=synthetic_samples)
    with pytest.raises(ConfigMismatchError, match=r"model: run.json has 'fake-model', now 'other-model'"):
        run_evaluation(_config(tmp_path, model="other-model", resume=True), pipeline_factory=FakePipeline,
                       samples=synthetic_samples)
    with pytest.raises(ConfigMismatchError, match="max_new_tokens"):
        run_evaluation(_config(tmp_path, max_new_tokens=5, resume=True), pipeline_factory=FakePipeline,
                       samples=synthetic_samples)
    # batch size and limit do not change records: a resume may change them
    summary = run_evaluation(_config(tmp_path, batch_size=5, resume=True), pipeline_factory=FakePipeline,
                             samples=synthetic_samples)
    assert summary["counts"]["missing_records"] == 0


def test_limit_then_resume_with_a_larger_limit_reuses_records(tmp_path, synthetic_samples):
    run_evaluation(_config(tmp_path, limit=5), pipeline_factory=FakePipeline, samples=synthetic_samples)
    second = FakePipeline(_config(tmp_path))
    with pytest.raises(ConfigMismatchError, match="--extend"):
        run_evaluation(_config(tmp_path, limit=8, resume=True), pipeline_factory=lambda c: second,
                       samples=synthetic_samples)
    summary = run_evaluation(_config(tmp_path, limit=8, resume=True, extend=True), pipeline_factory=lambda c: second,
                             samples=synthetic_samples)
    assert {sample_id for sample_id, _ in second.calls} == {s.id for s in synthetic_samples[5:8]}
    assert summary["counts"]["samples"] == 8


def test_shard_jobs_split_the_work_and_the_last_one_merges(tmp_path, synthetic_samples):
    pipelines = []

    def factory(config):
        pipelines.append(FakePipeline(config))
        return pipelines[-1]

    first = run_evaluation(_config(tmp_path, shard=(0, 2)), pipeline_factory=factory, samples=synthetic_samples)
    assert first is None  # shard 1 is not done yet: nothing merged
    paths = RunPaths(tmp_path / "run")
    assert not paths.samples.exists() and (paths.shards / "shard-000-of-002.jsonl").exists()
    second = run_evaluation(_config(tmp_path, shard=(1, 2)), pipeline_factory=factory, samples=synthetic_samples)
    assert second is not None and second["counts"]["missing_records"] == 0
    by_index = {s.id: s.index for s in synthetic_samples}
    for rank, pipeline in enumerate(pipelines):
        assert all(by_index[sample_id] % 2 == rank for sample_id, _ in pipeline.calls)
    records = read_jsonl(paths.samples)[0]
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == len(run_records.expected_keys(synthetic_samples, (1, 2, 3)))
    assert not list(paths.root.glob("shards/*.jsonl"))
    reference = run_evaluation(_config(tmp_path, "single"), pipeline_factory=FakePipeline, samples=synthetic_samples)
    assert _strip_volatile(second) == _strip_volatile(reference)


def test_merge_keeps_one_copy_per_key(tmp_path):
    paths = RunPaths(tmp_path)
    paths.shards.mkdir()
    rows = [{"key": f"s{i}#p2", "sample_id": f"s{i}", "index": i, "protocol": 2} for i in range(4)]
    (paths.shards / "rank-000-of-002.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (paths.shards / "rank-001-of-002.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    merged = run_records.merge_records(paths)
    assert [r["key"] for r in merged] == [r["key"] for r in rows]
    assert [r["key"] for r in read_jsonl(paths.samples)[0]] == [r["key"] for r in rows]


# --------------------------------------------------------------------------------- real tiny models


def _tiny_config(tmp_path, name, **overrides):
    values = dict(model="tiny-llava", selects=("oracle",), output=str(tmp_path / name), progress=False,
                  device="cpu", dtype="float32", limit=6, max_new_tokens=8, kernel_backend="reference")
    values.update(overrides)
    return EvalConfig(**values)


def test_batch_size_does_not_change_answers_or_masks(tmp_path, monkeypatch):
    """The same run with --batch-size 1 and 4 (fp32, tiny models): identical answers and masks."""
    _use_torch_kernels(monkeypatch)
    one = run_evaluation(_tiny_config(tmp_path, "bs1", batch_size=1))
    four = run_evaluation(_tiny_config(tmp_path, "bs4", batch_size=4))
    records_one = read_jsonl(tmp_path / "bs1" / "samples.jsonl")[0]
    records_four = read_jsonl(tmp_path / "bs4" / "samples.jsonl")[0]
    assert [r["key"] for r in records_one] == [r["key"] for r in records_four]
    grounded = 0
    for a, b in zip(records_one, records_four):
        assert a["answer"] == b["answer"] and a["token_ids"] == b["token_ids"], a["key"]
        if a["grounding"] is not None:
            grounded += 1
            assert a["grounding"]["points"] == b["grounding"]["points"], a["key"]
            masks_a = [c["mask_rle"] for c in a["grounding"]["candidates"]]
            masks_b = [c["mask_rle"] for c in b["grounding"]["candidates"]]
            assert masks_a == masks_b, a["key"]
            assert a["grounding"]["selections"]["oracle"]["mask_rle"] == b["grounding"]["selections"]["oracle"]["mask_rle"]
    assert grounded > 0
    assert _strip_volatile(one) == _strip_volatile(four)


def _cli_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _count_lines(path: pathlib.Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_sigkill_mid_run_then_resume_gives_the_same_summary(tmp_path):
    args = ["-q", "eval", "--limit", "8", "--batch-size", "1", "--protocol", "1,2,3", "--select", "oracle",
            "--max-new-tokens", "8", "--kernel-backend", "reference", "--device", "cpu"]
    command = [sys.executable, "-m", "pixfound", *args]
    env = _cli_env()
    # Run the uninterrupted reference and the run to be killed at the same time.
    reference = subprocess.Popen([*command, "--output", str(tmp_path / "reference")], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim_dir = tmp_path / "killed"
    victim = subprocess.Popen([*command, "--output", str(victim_dir)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    samples_file = victim_dir / "samples.jsonl"
    deadline = time.monotonic() + 600
    while _count_lines(samples_file) < 4 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed: " + victim.stderr.read().decode()[-2000:]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    done_before = _count_lines(samples_file)
    assert done_before >= 4
    assert not (victim_dir / "summary.json").exists()
    with open(samples_file, "a", encoding="utf-8") as handle:  # as if the kill hit in the middle of a write
        handle.write('{"key": "s0-7#p1", "sample_id": "s0-7", "ans')

    resumed = subprocess.run([*command, "--output", str(victim_dir), "--resume"], env=env, capture_output=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err.decode()[-3000:]

    summary_resumed = json.loads((victim_dir / "summary.json").read_text())
    summary_reference = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert _strip_volatile(summary_resumed) == _strip_volatile(summary_reference)
    records = read_jsonl(samples_file)[0]
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == summary_reference["counts"]["expected_records"]
    assert done_before < len(keys), "the kill came after the last record"
    # the resumed process computed only what was missing
    assert summary_resumed["run"]["records_written_now"] == len(keys) - done_before
    reference_records = read_jsonl(tmp_path / "reference" / "samples.jsonl")[0]
    assert [r["answer"] for r in records] == [r["answer"] for r in reference_records]
    masks = [[s.get("mask_rle") for s in (r["grounding"] or {}).get("selections", {}).values()] for r in records]
    reference_masks = [[s.get("mask_rle") for s in (r["grounding"] or {}).get("selections", {}).values()]
                       for r in reference_records]
    assert masks == reference_masks
    assert np.isfinite(summary_reference["table"][0]["M"])
