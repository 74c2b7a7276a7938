"""Summaries from hand-made records, tables, Markdown, plots, run merging and overlays."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pixfound.eval import report
from pixfound.eval.config import EvalConfig
from pixfound.eval.records import write_json_atomic
from pixfound.grounding.select import mask_to_rle

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Four MMVP-style pairs; sample 7 has no referring expression (so no protocol-3 record).
P1_CORRECT = [True, True, True, True, True, True, False, False]     # pairs: ok, ok, ok, fail -> 3/4
P2_CORRECT = [True, True, True, False, False, False, True, True]    # pairs: ok, fail, fail, ok -> 2/4
P1_IOU = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.7, 1.0]
P3_IOU = [0.8, 0.6, 0.7, 0.9, 0.4, 0.4, 0.3]
POSITIONS = [5.0, 15.0, 15.0, 99.0, 50.0, 0.0, 100.0, 42.0]


def _record(index: int, protocol: int, *, benchmark="synthetic", task=None, correct=None, iou=None,
            has_expression=True, similarity_iou=0.0):
    record = {
        "key": f"s{index}#p{protocol}", "sample_id": f"s{index}", "index": index, "benchmark": benchmark,
        "protocol": protocol, "task": task or ("colour" if index < 4 else "count"),
        "pair_index": index // 2 if benchmark != "pixcvbench" else None, "has_expression": has_expression,
        "expression": "the red square" if has_expression else None, "answer": "a red square in the corner",
        "timings": {"generate_s": 0.5, "sam_decoder_s": 0.25},
    }
    if correct is not None:
        # protocol 1 graded by a judge, as the paper grades it (a rule-parsed A† has its own column)
        record.update(correct=correct, parsed_choice="A" if correct else None,
                      correct_method="judge:openai:gpt-4o" if protocol == 1 else "rule")
    if iou is not None:
        record["grounding"] = {
            "gt_area": 100 if has_expression else 0,
            "phrases": [{"index": 0, "text": "a red square", "position_pct": POSITIONS[index]}],
            "selections": {
                "oracle": {"candidate_index": 0, "phrase_index": 0, "iou": iou, "grounded": iou > 0.5, "pred_area": 90},
                "similarity": {"candidate_index": None, "phrase_index": None, "iou": similarity_iou,
                               "grounded": False, "pred_area": 0},
            },
        }
    else:
        record["grounding"] = None
    return record


def paired_records() -> list[dict]:
    records = []
    for i in range(8):
        has_expression = i != 7
        records.append(_record(i, 1, correct=P1_CORRECT[i], iou=P1_IOU[i], has_expression=has_expression))
        records.append(_record(i, 2, correct=P2_CORRECT[i], has_expression=has_expression))
        if has_expression:
            records.append(_record(i, 3, iou=P3_IOU[i]))
    return records


def _config(**overrides) -> EvalConfig:
    values = dict(model="tiny-llava", selects=("oracle", "similarity"), device="cpu", dtype="float32", output="x")
    values.update(overrides)
    return EvalConfig(**values)


def test_summary_numbers_on_hand_made_pairs():
    summary = report.summarize(paired_records(), config=_config(), expected=23)
    assert summary["accuracy"]["p1"]["accuracy"] == pytest.approx(3 / 4)
    assert summary["accuracy"]["p2"]["accuracy"] == pytest.approx(2 / 4)
    assert summary["accuracy"]["p2"]["unit"] == "pair"
    assert summary["accuracy"]["p2"]["per_task"]["colour"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    # mIoU leaves sample 7 (no expression) out
    m1 = sum(P1_IOU[:7]) / 7
    m3 = sum(P3_IOU) / 7
    assert summary["miou"]["p1"]["oracle"]["miou"] == pytest.approx(m1)
    assert summary["miou"]["p1"]["oracle"]["excluded_without_expression"] == 1
    assert summary["miou"]["p3"]["oracle"]["miou"] == pytest.approx(m3)
    row = next(r for r in summary["table"] if r["select"] == "oracle")
    assert row["A_dagger"] == pytest.approx(75.0) and row["A"] == pytest.approx(50.0)
    assert row["M_dagger"] == pytest.approx(100 * m1) and row["M"] == pytest.approx(100 * m3)
    better_a, better_m = 75.0, 100 * max(m1, m3)
    assert row["S"] == pytest.approx(2 * better_a * better_m / (better_a + better_m))
    similarity = next(r for r in summary["table"] if r["select"] == "similarity")
    assert similarity["M"] == 0.0 and similarity["S"] == 0.0
    # VQA from protocol 2, grounding from protocol 3 (sample 7 counts as grounded)
    bins = summary["failure_bins"]["oracle"]
    assert (bins["both_succeed"], bins["vqa_only_fail"], bins["both_fail"], bins["grounding_only_fail"]) == (1, 1, 1, 1)
    assert bins["vqa_protocol"] == 2 and bins["grounding_protocol"] == 3
    assert summary["counts"] == {"samples": 8, "with_expression": 7, "records": 23, "expected_records": 23,
                                 "missing_records": 0, "per_protocol": {"p1": 8, "p2": 8, "p3": 7}}
    assert summary["timings"]["total_s"]["generate"] == pytest.approx(23 * 0.5)
    # the when-histogram (protocol 1, oracle): samples 0..6 with expression and non-empty truth
    assert summary["when"]["counts"] == [2, 2, 0, 0, 0, 1, 0, 0, 0, 2]


def test_summary_is_independent_of_record_order():
    records = paired_records()
    forward = report.summarize(records, config=_config())
    backward = report.summarize(records[::-1], config=_config())
    assert {k: v for k, v in forward.items() if k != "timings"} == {k: v for k, v in backward.items() if k != "timings"}


def test_incomplete_pairs_are_dropped_not_fatal():
    records = [r for r in paired_records() if r["index"] < 7]  # pair 3 has one member left
    summary = report.summarize(records, config=_config())
    block = summary["accuracy"]["p2"]
    assert block["incomplete_pairs_dropped"] == 1
    assert block["accuracy"] == pytest.approx(1 / 3)  # pairs 0..2: ok, fail, fail


def test_cvbench_counts_per_question_with_tasks():
    tasks = ["Count", "Count", "Relation", "Relation", "Relation"]
    correct = [True, False, True, True, False]
    records = [_record(i, 2, benchmark="pixcvbench", task=t, correct=c) for i, (t, c) in enumerate(zip(tasks, correct))]
    summary = report.summarize(records, config=_config(benchmark="pixcvbench", data_root="/x", protocols=(2,)))
    block = summary["accuracy"]["p2"]
    assert block["unit"] == "question"
    assert block["accuracy"] == pytest.approx(3 / 5)
    assert block["per_task"]["Count"]["accuracy"] == pytest.approx(1 / 2)
    assert block["per_task"]["Relation"]["accuracy"] == pytest.approx(2 / 3)
    assert summary["table"][0]["A"] == pytest.approx(60.0) and summary["table"][0]["S"] is None


def test_markdown_names_the_components_and_the_table():
    components = {"model": {"name": "tiny-llava", "family": "llava", "dtype": "float32", "device": "cpu"},
                  "sam": {"model_type": "vit_h", "checkpoint": "/ckpt/sam_vit_h.pth"},
                  "spacy": {"name": "en_core_web_lg", "version": "3.8.0"},
                  "phrase_vectors": "spacy:en_core_web_lg", "judge": "openai:gpt-4o", "random_weights": True}
    summary = report.summarize(paired_records(), config=_config(capture="reference"), components=components)
    text = report.render_markdown(summary)
    for expected in ("tiny-llava", "vit_h", "/ckpt/sam_vit_h.pth", "en_core_web_lg", "openai:gpt-4o", "`reference`",
                     "| A† | A | M† | M | S |", "Random weights"):
        assert expected in text, expected
    table = report.format_table(summary["table"])
    assert table.splitlines()[0].split() == ["model", "benchmark", "select", "A†", "A", "M†", "M", "S"]
    assert "75.0" in table and "50.0" in table


def test_write_reports_makes_json_markdown_and_pngs(tmp_path):
    records = paired_records()
    summary = report.summarize(records, config=_config())
    written = report.write_reports(tmp_path, summary, records)
    assert set(written) == {"summary.json", "summary.md", "failure_bins.png", "when.json", "when.png"}
    for name in ("failure_bins.png", "when.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "summary.json").read_text())["table"] == json.loads(json.dumps(summary["table"]))


def test_merge_runs_puts_runs_side_by_side(tmp_path):
    for name, model in (("run-a", "model-a"), ("run-b", "model-b")):
        (tmp_path / name).mkdir()
        summary = report.summarize(paired_records(), config=_config(model=model))
        write_json_atomic(tmp_path / name / "summary.json", summary)
    rows, text, markdown = report.merge_runs([tmp_path / "run-a", tmp_path / "run-b"])
    assert [(r["run"], r["model"], r["select"]) for r in rows] == [
        ("run-a", "model-a", "oracle"), ("run-a", "model-a", "similarity"),
        ("run-b", "model-b", "oracle"), ("run-b", "model-b", "similarity")]
    assert "run-b" in text and markdown.startswith("| model |")
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        report.merge_runs([tmp_path / "missing"])


def test_mean_std():
    stats = report.mean_std([10.0, None, 20.0])
    assert stats == {"mean": 15.0, "std": pytest.approx(np.std([10.0, 20.0], ddof=1)), "n": 2}
    assert report.mean_std([None]) == {"mean": None, "std": None, "n": 0}


def test_sample_overlay_and_ground_grid_write_pngs(tmp_path):
    image = Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8))
    gt = np.zeros((20, 30), dtype=bool)
    gt[5:10, 5:15] = True
    candidate = np.zeros_like(gt)
    candidate[4:10, 5:16] = True
    record = _record(0, 1, correct=True, iou=0.8)
    record["grounding"]["points"] = [[[10, 7]]]
    record["grounding"]["candidates"] = [{"phrase_index": 0, "mask_index": k, "points": [[10, 7]], "sam_score": 0.5,
                                          "iou": 0.8, "mask_rle": mask_to_rle(candidate)} for k in range(3)]
    for selection in record["grounding"]["selections"].values():
        selection["mask_rle"] = mask_to_rle(candidate)
    path = report.render_sample_overlay(record, image, gt, tmp_path / "overlay.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    grid = report.render_ground_grid(image, [{"text": "a red square"}], [[[10, 7]]], [[candidate] * 3],
                                     tmp_path / "grid.png", chosen=(0, 1), scores=[[0.1, 0.2, 0.3]])
    assert Image.open(grid).size[0] > 0
    with pytest.raises(ValueError, match="no grounding"):
        report.render_sample_overlay(_record(0, 2, correct=True), image, gt, tmp_path / "x.png")


def test_load_summary_rejects_other_json(tmp_path):
    (tmp_path / "summary.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a pixfound summary"):
        report.load_summary(tmp_path)
