"""Bad data: every defect gives a clear error naming file and row; strict=False skips and reports.

Small hand-made benchmark folders (4 samples each) are built in tmp_path and then broken one way
at a time, so these tests need no real annotation files.
"""
from __future__ import annotations

import csv
import json
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pixfound.data import BadDataError, MissingImageError, benchmark_stats, load_benchmark
from pixfound.data._coco import rle_string_counts

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SQUARE = [[2, 2, 20, 2, 20, 20, 2, 20]]


def _write_csv(path: pathlib.Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _read_csv(path: pathlib.Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def _edit_json(path: pathlib.Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _rle(size: tuple[int, int], box: tuple[int, int, int, int]) -> dict:
    mask = np.zeros(size, dtype=np.uint8)
    y0, x0, y1, x1 = box
    mask[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


# ----------------------------------------------------------------------------------------------
# A 4-sample PixMMVP: samples 1-3 have a square polygon, sample 4 has no expression
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def mmvp(tmp_path) -> pathlib.Path:
    root = tmp_path / "mmvp"
    (root / "MMVP Images").mkdir(parents=True)
    _write_csv(root / "visual_patterns.csv", ["", "Index", "Question", "Options", "Correct Answer", "Pattern"],
               [[k - 1, k, f"Is shape {(k + 1) // 2} red?", "(a) Yes (b) No", "(a)" if k % 2 else "(b)", "Color"]
                for k in range(1, 5)])
    (root / "Objects.csv").write_text("Index, Object\n1, the shape\n2, the shape\n3, the square\n4, None\n")
    (root / "meta_none.txt").write_text("4.jpg\n")
    images = [{"id": k, "width": 40, "height": 32, "file_name": f"{k}.jpg"} for k in range(1, 5)]
    anns = [{"id": k, "image_id": k, "segmentation": SQUARE, "category_id": None} for k in range(1, 4)]
    (root / "Segmentations.json").write_text(json.dumps({"images": images, "annotations": anns}))
    for k in range(1, 5):
        Image.new("RGB", (40, 32)).save(root / "MMVP Images" / f"{k}.jpg")
    return root


def test_mmvp_fixture_loads_cleanly(mmvp):
    samples = load_benchmark("pixmmvp", mmvp)
    assert [s.id for s in samples] == ["1", "2", "3", "4"] and samples.skipped == []
    assert samples[3].expression is None
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(SQUARE, 32, 40))).astype(bool)
    np.testing.assert_array_equal(samples[0].gt_mask, expected)
    assert not samples[3].gt_mask.any() and samples[3].gt_mask.shape == (32, 40)


def test_missing_image_file(mmvp):
    (mmvp / "MMVP Images" / "2.jpg").unlink()
    with pytest.raises(MissingImageError, match=r"visual_patterns.csv: line 3: image file not found: .*2\.jpg"
                                                r" \(sample 2\)") as info:
        load_benchmark("pixmmvp", mmvp)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    samples = load_benchmark("pixmmvp", mmvp, strict=False)
    assert [s.id for s in samples] == ["1", "3", "4"]
    assert samples.skipped_ids == ["2"] and "2.jpg" in str(samples.skipped[0])


def test_unknown_image_id_in_json(mmvp):
    _edit_json(mmvp / "Segmentations.json",
               lambda d: d["annotations"].append({"id": 9, "image_id": 99, "segmentation": SQUARE}))
    with pytest.raises(BadDataError, match=r"Segmentations.json: annotations\[3\]: unknown image id 99"):
        load_benchmark("pixmmvp", mmvp)
    samples = load_benchmark("pixmmvp", mmvp, strict=False)
    assert len(samples) == 4  # only the stray annotation is dropped
    assert len(samples.skipped) == 1 and samples.skipped[0].sample_id is None


@pytest.mark.parametrize("polygon, reason", [
    ([[2, 2, 20, 2, 20, 20, 2]], "odd number of coordinates"),
    ([[2, 2, 20, "2", 20, 20]], "non-numeric"),
    ([[2, 2, 20, float("nan"), 20, 20]], "non-finite"),
    ([[2, 2, 20, 2]], "needs at least 3"),
    ([[2, 2, 20, 2, 1e300, 20]], "beyond"),
    ([], "empty polygon list"),
    ("[[2, 2, 20, 2, 20, 20]]", "must be a polygon list or an RLE dict"),
])
def test_malformed_polygon(mmvp, polygon, reason):
    _edit_json(mmvp / "Segmentations.json", lambda d: d["annotations"][1].update(segmentation=polygon))
    with pytest.raises(BadDataError, match=rf"Segmentations.json: annotations\[1\] \(image_id 2, 2.jpg\): .*{reason}"):
        load_benchmark("pixmmvp", mmvp)
    samples = load_benchmark("pixmmvp", mmvp, strict=False)
    assert [s.id for s in samples] == ["1", "3", "4"] and samples.skipped_ids == ["2"]


def test_bad_declared_image_size(mmvp):
    _edit_json(mmvp / "Segmentations.json", lambda d: d["images"][2].update(height="tall"))
    with pytest.raises(BadDataError, match=r"Segmentations.json: images\[2\]: 'height'/'width' must be positive"):
        load_benchmark("pixmmvp", mmvp, strict=False)


def test_objects_csv_shorter_than_questions(mmvp):
    (mmvp / "Objects.csv").write_text("Index, Object\n1, the shape\n2, the shape\n3, the square\n")
    (mmvp / "meta_none.txt").write_text("")
    with pytest.raises(BadDataError, match=r"Objects.csv: index 4: row count mismatch: Objects.csv has 3 rows, "
                                           r"visual_patterns.csv has 4.*line 5"):
        load_benchmark("pixmmvp", mmvp)
    samples = load_benchmark("pixmmvp", mmvp, strict=False)
    assert [s.id for s in samples] == ["1", "2", "3"] and samples.skipped_ids == ["4"]


def test_objects_csv_longer_than_questions(mmvp):
    with open(mmvp / "Objects.csv", "a") as handle:
        handle.write("5, the extra\n")
    with pytest.raises(BadDataError, match=r"Objects.csv: line 6: row count mismatch.*index 5 has no question"):
        load_benchmark("pixmmvp", mmvp)
    samples = load_benchmark("pixmmvp", mmvp, strict=False)
    assert len(samples) == 4 and samples.skipped[0].sample_id is None


def test_missing_required_column_raises_even_when_lenient(mmvp):
    rows = _read_csv(mmvp / "visual_patterns.csv")
    _write_csv(mmvp / "visual_patterns.csv", [c for k, c in enumerate(rows[0]) if k != 3],
               [[c for k, c in enumerate(r) if k != 3] for r in rows[1:]])
    for strict in (True, False):
        with pytest.raises(BadDataError, match=r"visual_patterns.csv: line 1: missing required column\(s\) "
                                               r"\['Options'\]"):
            load_benchmark("pixmmvp", mmvp, strict=strict)


def test_row_with_wrong_cell_count(mmvp):
    (mmvp / "Objects.csv").write_text("Index, Object\n1, the shape\n2, the shape, extra\n3, the square\n4, None\n")
    with pytest.raises(BadDataError, match=r"Objects.csv: line 3: has 3 cells"):
        load_benchmark("pixmmvp", mmvp)
    assert load_benchmark("pixmmvp", mmvp, strict=False).skipped_ids == ["2"]


def test_duplicate_index(mmvp):
    (mmvp / "Objects.csv").write_text("Index, Object\n1, the shape\n2, the shape\n2, the square\n4, None\n")
    with pytest.raises(BadDataError, match=r"Objects.csv: line 4: duplicate index 2 \(first on line 3\)"):
        load_benchmark("pixmmvp", mmvp)
    assert load_benchmark("pixmmvp", mmvp, strict=False).skipped_ids[0] == "2"


def test_expression_disagrees_with_meta_none(mmvp):
    (mmvp / "meta_none.txt").write_text("3.jpg\n")
    with pytest.raises(BadDataError,
                       match=r"Objects.csv: line 4: expression 'the square' disagrees with meta_none.txt"):
        load_benchmark("pixmmvp", mmvp)
    assert load_benchmark("pixmmvp", mmvp, strict=False).skipped_ids == ["3", "4"]


@pytest.mark.parametrize("options, answer, reason", [
    ("(a) Yes", "(a)", "not of the form"),
    ("(a) Yes (c) No", "(a)", "have letters"),
    ("(a) Yes (b) No", "(c)", "points past the 2 options"),
    ("(a) Yes (b) No", "yes", "is not a letter"),
])
def test_bad_options_or_answer(mmvp, options, answer, reason):
    rows = _read_csv(mmvp / "visual_patterns.csv")
    rows[2][3], rows[2][4] = options, answer
    _write_csv(mmvp / "visual_patterns.csv", rows[0], rows[1:])
    with pytest.raises(BadDataError, match=rf"visual_patterns.csv: line 3: .*{reason}"):
        load_benchmark("pixmmvp", mmvp)


# ----------------------------------------------------------------------------------------------
# A 4-sample PixCV-Bench: ADE RLE, ADE polygon (tuple with synonyms), COCO RLE, COCO tuple
# ----------------------------------------------------------------------------------------------

CV_ROWS = [  # idx, source, file name, objects cell, image size (H, W)
    (0, "ADE20K", "ADE_val_00000001.jpg", "lamp", (20, 30)),
    (1, "ADE20K", "ADE_val_00000002.jpg", "('wall', 'stairs, steps')", (24, 24)),
    (2, "COCO", "000000000003.jpg", "cup", (30, 20)),
    (3, "COCO", "000000000004.jpg", "('spoon', 'broccoli')", (30, 20)),
]


def _cv_row(idx, source, name):
    return {"idx": idx, "type": "2D", "task": "Count", "question": "How many?", "choices": ["1", "2"],
            "answer": "(B)", "prompt": "How many?\n(A) 1\n(B) 2", "source": source,
            "source_filename": name if source == "ADE20K" else f"/coco/val2017/{name}"}


@pytest.fixture
def cvbench(tmp_path) -> pathlib.Path:
    root = tmp_path / "cvbench"
    folders = {"ADE20K": root / "ADE20K" / "validation" / "images", "COCO": root / "COCO" / "coco" / "images"}
    for folder in folders.values():
        folder.mkdir(parents=True)
    rows = [_cv_row(idx, source, name) for idx, source, name, _, _ in CV_ROWS]
    rows.append({"idx": 4, "type": "3D", "task": "Depth", "question": "?", "choices": ["a", "b"], "answer": "(A)",
                 "prompt": "", "source": "Omni3D", "source_filename": "/Omni3D/x.jpg"})
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = {"ADE20K": "CV-Bench/ADE20K/validation/images", "COCO": "CV-Bench/COCO/coco/images"}
    _write_csv(root / "Objects.csv", ["", "Id", "file", "Objects"],
               [[idx, idx, f"{paths[source]}/{name}", cell] for idx, source, name, cell, _ in CV_ROWS])
    ade = {"categories": [{"id": 0, "name": "foreground"}],
           "images": [{"id": 0, "file_name": CV_ROWS[0][2]}, {"id": 1, "file_name": CV_ROWS[1][2]}],
           "annotations": [{"image_id": 0, "category_id": 0, "segmentation": _rle((20, 30), (2, 3, 10, 12))},
                           {"image_id": 1, "category_id": 0, "segmentation": SQUARE, "id": 1}]}
    coco = {"categories": [{"id": 0, "name": "foreground"}],
            "images": [{"id": 0, "file_name": CV_ROWS[2][2]}, {"id": 1, "file_name": CV_ROWS[3][2]}],
            "annotations": [{"image_id": 0, "category_id": 0, "segmentation": _rle((30, 20), (0, 0, 5, 5))},
                            {"image_id": 1, "category_id": 0, "segmentation": _rle((30, 20), (1, 1, 4, 4))},
                            {"image_id": 1, "category_id": 0, "segmentation": _rle((30, 20), (10, 10, 20, 12))}]}
    (root / "ADE20K" / "FinalSegmentations.json").write_text(json.dumps(ade))
    (root / "COCO" / "FinalSegmentations.json").write_text(json.dumps(coco))
    for _, source, name, _, (height, width) in CV_ROWS:
        Image.new("RGB", (width, height)).save(folders[source] / name)
    return root


def _jsonl_rows(root):
    return [json.loads(line) for line in (root / "test.jsonl").read_text().splitlines()]


def _write_jsonl(root, rows):
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cvbench_fixture_loads_cleanly(cvbench):
    samples = load_benchmark("pixcvbench", cvbench)
    assert [s.id for s in samples] == ["0", "1", "2", "3"] and samples.skipped == []
    assert samples[1].expression == "wall and stairs, steps"
    assert samples[3].gt_mask.sum() == 9 + 20
    assert samples[1].gt_mask.shape == (24, 24)


def test_cvbench_images_under_a_cv_bench_folder(cvbench):
    """Objects.csv's `file` column names CV-Bench/ADE20K/...: that layout is found too."""
    (cvbench / "CV-Bench" / "ADE20K").mkdir(parents=True)
    (cvbench / "CV-Bench" / "COCO").mkdir()
    (cvbench / "ADE20K" / "validation").rename(cvbench / "CV-Bench" / "ADE20K" / "validation")
    (cvbench / "COCO" / "coco").rename(cvbench / "CV-Bench" / "COCO" / "coco")
    samples = load_benchmark("pixcvbench", cvbench)
    assert len(samples) == 4
    assert samples[0].image_path == cvbench / "CV-Bench" / "ADE20K" / "validation" / "images" / "ADE_val_00000001.jpg"


def test_cvbench_without_file_column_uses_row_sources(cvbench):
    rows = _read_csv(cvbench / "Objects.csv")
    _write_csv(cvbench / "Objects.csv", ["", "Id", "Objects"], [[r[0], r[1], r[3]] for r in rows[1:]])
    samples = load_benchmark("pixcvbench", cvbench)
    assert [(s.meta["source"], s.meta["json_image_id"]) for s in samples] == \
           [("ADE20K", 0), ("ADE20K", 1), ("COCO", 0), ("COCO", 1)]


def test_unreadable_image_file(cvbench):
    (cvbench / "ADE20K" / "validation" / "images" / "ADE_val_00000001.jpg").write_bytes(b"not an image")
    with pytest.raises(BadDataError, match=r"test.jsonl: line 1: image file .*ADE_val_00000001.jpg cannot be read"):
        load_benchmark("pixcvbench", cvbench)
    assert load_benchmark("pixcvbench", cvbench, strict=False).skipped_ids == ["0"]


def test_cvbench_missing_image_file(cvbench):
    (cvbench / "COCO" / "coco" / "images" / "000000000003.jpg").unlink()
    with pytest.raises(MissingImageError, match=r"test.jsonl: line 3: image file not found: .*COCO/coco/images/"
                                                r"000000000003\.jpg \(sample 2\)"):
        load_benchmark("pixcvbench", cvbench)
    samples = load_benchmark("pixcvbench", cvbench, strict=False)
    assert [s.id for s in samples] == ["0", "1", "3"] and samples.skipped_ids == ["2"]


@pytest.mark.parametrize("segmentation, reason", [
    ({"size": [30, 20], "counts": 5}, "RLE 'counts' must be a string or a list"),
    ({"size": "30x20", "counts": "0"}, r"RLE 'size' must be \[height, width\]"),
    ({"size": [30, True], "counts": "0"}, r"RLE 'size' must be \[height, width\]"),
    ({"size": [30, 20], "counts": "a b~"}, "outside the compressed-RLE alphabet"),
    ({"size": [30, 20], "counts": [10, "5"]}, "non-negative integers"),
    ({"size": [30, 20], "counts": [10, 5]}, "sum to 15, expected height\\*width = 600"),
    ({"counts": "0"}, r"RLE 'size' must be \[height, width\]"),
    ({"size": [10**9, 10**9], "counts": "0"}, r"RLE 'size' must be \[height, width\] positive integers up to"),
])
def test_rle_with_wrong_types(cvbench, segmentation, reason):
    _edit_json(cvbench / "COCO" / "FinalSegmentations.json",
               lambda d: d["annotations"][0].update(segmentation=segmentation))
    with pytest.raises(BadDataError, match=rf"FinalSegmentations.json: annotations\[0\] \(image_id 0, "
                                           rf"000000000003.jpg\): .*{reason}"):
        load_benchmark("pixcvbench", cvbench)
    samples = load_benchmark("pixcvbench", cvbench, strict=False)
    assert samples.skipped_ids == ["2"] and len(samples) == 3


@pytest.mark.parametrize("counts, reason", [
    (_rle((10, 10), (0, 0, 5, 5))["counts"], "RLE runs sum to 100, expected height\\*width = 600"),
    ("o", "ends in the middle of a run length"),
])
def test_rle_whose_runs_do_not_fit_fails_at_decode_not_crash(cvbench, counts, reason):
    _edit_json(cvbench / "COCO" / "FinalSegmentations.json",
               lambda d: d["annotations"][0].update(segmentation={"size": [30, 20], "counts": counts}))
    sample = load_benchmark("pixcvbench", cvbench)[2]
    with pytest.raises(ValueError, match=rf"pixcvbench sample 2 \(.*FinalSegmentations.json, 000000000003.jpg\): "
                                         rf"segmentation 0: .*{reason}"):
        sample.gt_mask


@pytest.mark.parametrize("cell, reason", [
    ("('spoon', 1)", "must be a tuple of non-empty strings"),
    ("('spoon', '')", "must be a tuple of non-empty strings"),
    ("(__import__('os').getcwd())", "not a tuple of quoted strings"),
    ("(('a', 'b'), 'c')", "must be a tuple of non-empty strings"),
])
def test_bad_tuple_expression(cvbench, cell, reason):
    rows = _read_csv(cvbench / "Objects.csv")
    rows[4][3] = cell
    _write_csv(cvbench / "Objects.csv", rows[0], rows[1:])
    with pytest.raises(BadDataError, match=rf"Objects.csv: line 5: .*{reason}"):
        load_benchmark("pixcvbench", cvbench)
    assert load_benchmark("pixcvbench", cvbench, strict=False).skipped_ids == ["3"]


def test_code_in_a_plain_cell_is_only_text(cvbench):
    rows = _read_csv(cvbench / "Objects.csv")
    rows[1][3] = "__import__('os').getcwd()"
    _write_csv(cvbench / "Objects.csv", rows[0], rows[1:])
    assert load_benchmark("pixcvbench", cvbench)[0].expression == "__import__('os').getcwd()"


def test_file_names_disagree(cvbench):
    _edit_json(cvbench / "ADE20K" / "FinalSegmentations.json",
               lambda d: d["images"][1].update(file_name="ADE_val_00000099.jpg"))
    with pytest.raises(BadDataError, match=r"ADE20K/FinalSegmentations.json: images\[1\]: file names disagree: "
                                           r"test.jsonl line 2 has 'ADE_val_00000002.jpg'.*'ADE_val_00000099.jpg'"):
        load_benchmark("pixcvbench", cvbench)


def test_cvbench_row_missing_from_questions(cvbench):
    _write_jsonl(cvbench, [r for r in _jsonl_rows(cvbench) if r["idx"] != 3])
    with pytest.raises(BadDataError, match=r"Objects.csv: line 5: row count mismatch \(test.jsonl has 3 2D rows, "
                                           r"Objects.csv has 4 rows\): Id 3 has no 2D row"):
        load_benchmark("pixcvbench", cvbench)
    samples = load_benchmark("pixcvbench", cvbench, strict=False)
    # the entry without its question is a sample the run cannot evaluate: it counts as skipped
    assert [s.id for s in samples] == ["0", "1", "2"] and samples.skipped[0].sample_id == "3"


def test_objects_row_missing(cvbench):
    rows = _read_csv(cvbench / "Objects.csv")
    _write_csv(cvbench / "Objects.csv", rows[0], rows[1:4])
    with pytest.raises(BadDataError, match=r"Objects.csv: Id 3: row count mismatch .*no row for test.jsonl line 4"):
        load_benchmark("pixcvbench", cvbench)


def test_json_has_fewer_images_than_rows(cvbench):
    _edit_json(cvbench / "COCO" / "FinalSegmentations.json",
               lambda d: (d["images"].pop(), d["annotations"].__delitem__(slice(1, 3))))
    with pytest.raises(BadDataError, match=r"COCO/FinalSegmentations.json: images: no image with id 1 for "
                                           r"Objects.csv line 5"):
        load_benchmark("pixcvbench", cvbench)


@pytest.mark.parametrize("field, value, reason", [
    ("answer", "(C)", "points past the 2 choices"),
    ("answer", "B", "must look like '\\(A\\)'"),
    ("choices", "1, 2", "'choices' must be a list"),
    ("idx", "zero", "'idx' must be an integer"),
    ("question", "", "'question' must be a non-empty string"),
])
def test_bad_cvbench_row(cvbench, field, value, reason):
    rows = _jsonl_rows(cvbench)
    rows[1][field] = value
    _write_jsonl(cvbench, rows)
    with pytest.raises(BadDataError, match=rf"test.jsonl: line 2: .*{reason}"):
        load_benchmark("pixcvbench", cvbench)


def test_invalid_jsonl_line(cvbench):
    with open(cvbench / "test.jsonl", "a") as handle:
        handle.write("{not json\n")
    with pytest.raises(BadDataError, match=r"test.jsonl: line 6: invalid JSON"):
        load_benchmark("pixcvbench", cvbench)
    assert len(load_benchmark("pixcvbench", cvbench, strict=False)) == 4


def test_parquet_without_pyarrow_is_a_clear_error(cvbench, monkeypatch):
    (cvbench / "test.jsonl").rename(cvbench / "unused.jsonl")
    (cvbench / "test.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"test.parquet needs pyarrow .*test.jsonl"):
        load_benchmark("pixcvbench", cvbench)


def test_objects_csv_missing_column(cvbench):
    rows = _read_csv(cvbench / "Objects.csv")
    _write_csv(cvbench / "Objects.csv", rows[0][:3], [r[:3] for r in rows[1:]])
    with pytest.raises(BadDataError, match=r"Objects.csv: line 1: missing required column\(s\) \['Objects'\]"):
        load_benchmark("pixcvbench", cvbench, strict=False)


def test_polygon_only_image_without_file_has_no_size(cvbench):
    (cvbench / "ADE20K" / "validation" / "images" / "ADE_val_00000002.jpg").unlink()
    samples = load_benchmark("pixcvbench", cvbench, require_images=False)
    assert samples[1].image_size is None and samples[1].meta["image_missing"]
    with pytest.raises(ValueError,
                       match=r"sample 1 .*ADE_val_00000002.jpg is missing and its annotations are polygons"):
        samples[1].gt_mask
    stats = benchmark_stats(samples)
    assert stats["mask_unavailable"] == 1 and stats["empty_masks"] == 0


# ----------------------------------------------------------------------------------------------
# The RLE string parser that guards pycocotools' unchecked decoder
# ----------------------------------------------------------------------------------------------


def _column_major_runs(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = list(np.diff(bounds))
    return ([0] + runs) if flat.size and flat[0] == 1 else runs


@pytest.mark.parametrize("size", [(1, 1), (7, 13), (480, 640), (1650, 2200)])
def test_rle_string_counts_match_pycocotools(size):
    rng = np.random.default_rng(size[0])
    for density in (0.0, 0.001, 0.5, 1.0):
        mask = rng.random(size) < density
        if density == 0.5 and size[0] > 100:
            mask[:, : size[1] // 3] = True  # long runs: multi-group and negative deltas
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        runs = rle_string_counts(rle["counts"].decode("ascii"))
        assert runs.tolist() == _column_major_runs(mask)
        assert runs.sum() == size[0] * size[1]


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_unknown_benchmark_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown benchmark 'mmvp'; known benchmarks: pixmmvp, pixcvbench, synthetic"):
        load_benchmark("mmvp")


def test_unknown_option_lists_accepted_ones(mmvp):
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['n'\]; it takes \['strict'"):
        load_benchmark("pixmmvp", mmvp, n=3)


def test_root_required_and_checked(tmp_path):
    with pytest.raises(ValueError, match="needs a data root"):
        load_benchmark("pixcvbench")
    with pytest.raises(FileNotFoundError, match="root folder not found"):
        load_benchmark("pixmmvp", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"neither .*test.parquet nor .*test.jsonl"):
        load_benchmark("pixcvbench", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"neither .*Questions.csv nor .*visual_patterns.csv"):
        load_benchmark("pixmmvp", tmp_path)
