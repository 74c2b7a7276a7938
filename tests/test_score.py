"""``pixfound score``: external mask PNGs with known IoUs, resizing, missing files, naming."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pixfound import cli
from pixfound.data import load_benchmark
from pixfound.eval import report

N = 8


@pytest.fixture(scope="module")
def samples():
    return load_benchmark("synthetic", n=N, seed=0)


def _save(mask: np.ndarray, path) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def _expected_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else np.logical_and(pred, gt).sum() / union


@pytest.fixture()
def predictions(tmp_path, samples):
    """Hand-made predictions; returns (folder, expected IoU per sample id, ids of resized/missing files)."""
    folder = tmp_path / "preds"
    folder.mkdir()
    expected = {}
    non_empty = [s for s in samples if s.gt_mask.any()]
    exact, partial, doubled, coloured, by_position = non_empty[:5]
    _save(exact.gt_mask, folder / f"{exact.id}.png")
    expected[exact.id] = 1.0
    half = partial.gt_mask.copy()
    rows = np.flatnonzero(half.any(axis=1))
    half[rows[: len(rows) // 2]] = False  # drop the top half of the object
    _save(half, folder / f"{partial.id}.png")
    expected[partial.id] = _expected_iou(half, partial.gt_mask)
    _save(np.repeat(np.repeat(doubled.gt_mask, 2, axis=0), 2, axis=1), folder / f"{doubled.id}.png")
    expected[doubled.id] = 1.0  # nearest-neighbour resize back recovers the mask exactly
    rgb = np.zeros(coloured.gt_mask.shape + (3,), dtype=np.uint8)
    rgb[coloured.gt_mask] = (255, 0, 0)
    Image.fromarray(rgb).save(folder / f"{coloured.id}.png")
    expected[coloured.id] = 1.0
    # named by its benchmark position, not its id: it names no sample, and the sample is missing
    _save(~by_position.gt_mask, folder / f"{by_position.index}.png")
    written = {exact.id, partial.id, doubled.id, coloured.id}
    missing = [s.id for s in samples if s.id not in written]
    for sample in samples:
        if sample.id in missing:
            expected[sample.id] = 1.0 if not sample.gt_mask.any() else 0.0
    return folder, expected, [doubled.id], missing


def test_score_predictions_known_ious(samples, predictions):
    folder, expected, resized, missing = predictions
    summary, rows = report.score_predictions(samples, folder, name="handmade")
    got = {r["sample_id"]: r["iou"] for r in rows}
    assert got == pytest.approx(expected)
    with_expression = [s.id for s in samples if s.has_expression]
    assert summary["miou"]["external"]["miou"] == pytest.approx(np.mean([expected[i] for i in with_expression]))
    assert summary["miou"]["external"]["n"] == len(with_expression)
    assert [entry["sample_id"] for entry in summary["resized"]] == resized
    assert summary["resized"][0]["prediction_hw"] == [2 * v for v in summary["resized"][0]["image_hw"]]
    assert sorted(summary["missing"]) == sorted(missing)
    ids = {s.id for s in samples}
    assert summary["unmatched"] == sorted(p.stem for p in folder.glob("*.png") if p.stem not in ids) != []
    assert summary["table"][0]["M"] == pytest.approx(100 * summary["miou"]["external"]["miou"])
    assert summary["table"][0]["A"] is None


def test_partial_mask_iou_is_between_zero_and_one(samples, predictions):
    folder, expected, _, _ = predictions
    partial = sorted(v for v in expected.values() if 0.0 < v < 1.0)
    assert partial, "the hand-made half mask should give a fractional IoU"


def test_strict_refuses_a_missing_prediction(samples, predictions):
    folder, _, _, missing = predictions
    with pytest.raises(FileNotFoundError, match=f"no prediction for sample {missing[0]}"):
        report.score_predictions(samples, folder, strict=True)


def test_unreadable_prediction_is_named(samples, tmp_path):
    folder = tmp_path / "preds"
    folder.mkdir()
    (folder / f"{samples[0].id}.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"{samples[0].id}.png is not a readable image"):
        report.score_predictions(samples, folder)


def test_score_command(tmp_path, samples, predictions, capsys):
    folder, expected, _, _ = predictions
    out = tmp_path / "scored"
    code = cli.main(["score", "--preds", str(folder), "--benchmark", "synthetic", "--synthetic-n", str(N),
                     "--name", "LISA-like", "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "LISA-like" in captured.out and "resized" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "per_sample.jsonl").read_text().splitlines()]
    assert {r["sample_id"]: r["iou"] for r in rows} == pytest.approx(expected)
    assert summary["kind"] == "score" and summary["counts"]["samples"] == N
    # the score run can sit beside eval runs in `pixfound report`
    assert cli.main(["report", str(out)]) == 0
    assert "external" in capsys.readouterr().out


def test_score_command_errors(tmp_path, capsys):
    assert cli.main(["score", "--preds", str(tmp_path / "nope"), "--benchmark", "synthetic"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert cli.main(["score", "--preds", str(tmp_path), "--benchmark", "pixmmvp"]) == 2
    assert "needs a data root" in capsys.readouterr().err
    assert cli.main(["score", "--preds", str(tmp_path), "--benchmark", "mmvp"]) == 2
    assert "invalid choice: 'mmvp'" in capsys.readouterr().err
