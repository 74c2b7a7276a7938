"""PixMMVP loader on the real annotation files, with stand-in images of the declared sizes."""
from __future__ import annotations

import collections
import csv
import json
import pathlib
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pixfound.data import benchmark_stats, load_benchmark

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

NUM_SAMPLES = 300
NUM_WITHOUT_EXPRESSION = 14   # the images listed in meta_none.txt
NUM_ANNOTATED_ABSENT = 39     # expression given, no polygon: the object is not in the image
MISMATCHED_IMAGE = 1          # stand-in written at another size than the JSON declares (annotated)
MISMATCHED_SIZE = (200, 240)  # (H, W)
NON_SQUARE_EMPTY = 10         # annotated as absent; written non-square to catch an (h, w) swap
NON_SQUARE_SIZE = (180, 300)
FILES = ("Objects.csv", "Segmentations.json", "meta_none.txt", "visual_patterns.csv")


def _csv_dicts(path: pathlib.Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _stand_in_size(index: int) -> tuple[int, int]:
    return {MISMATCHED_IMAGE: MISMATCHED_SIZE, NON_SQUARE_EMPTY: NON_SQUARE_SIZE}.get(index, (224, 224))


def _link_annotations(src: pathlib.Path, root: pathlib.Path, files=FILES) -> None:
    for name in files:
        (root / name).symlink_to(src / name)


@pytest.fixture(scope="module")
def mmvp_root(annotations_root: pathlib.Path, tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("pixmmvp")
    _link_annotations(annotations_root / "pixmmvp", root)
    images = root / "MMVP Images"
    images.mkdir()
    for index in range(1, NUM_SAMPLES + 1):
        height, width = _stand_in_size(index)
        Image.new("RGB", (width, height), (90, 120, 150)).save(images / f"{index}.jpg", quality=50)
    return root


@pytest.fixture(scope="module")
def samples(mmvp_root):
    return load_benchmark("pixmmvp", mmvp_root)


@pytest.fixture(scope="module")
def segmentations(annotations_root) -> dict:
    return json.loads((annotations_root / "pixmmvp" / "Segmentations.json").read_text())


def test_counts_ids_and_pairs(samples):
    assert len(samples) == NUM_SAMPLES and samples.skipped == []
    assert [s.id for s in samples] == [str(i) for i in range(1, NUM_SAMPLES + 1)]
    assert [s.index for s in samples] == list(range(NUM_SAMPLES))
    assert [s.pair_index for s in samples] == [i // 2 for i in range(NUM_SAMPLES)]
    for first, second in zip(samples[0::2], samples[1::2]):
        # MMVP pairs: the same question about two images with opposite answers
        assert first.question == second.question and first.options == second.options
        assert first.answer != second.answer


def test_questions_options_answers_and_patterns(samples, annotations_root):
    rows = _csv_dicts(annotations_root / "pixmmvp" / "visual_patterns.csv")
    assert samples[0].question == "Are the butterfly's wings closer to being open or closed?"
    assert samples[0].options == ["Open", "Closed"] and samples[0].answer == "A"
    assert samples[1].answer == "B"
    for sample, row in zip(samples, rows):
        assert sample.answer == row["Correct Answer"].strip()[1].upper()
        assert sample.task == row["Pattern"]
        assert len(sample.options) == 2 and all(o == o.strip() and o for o in sample.options)
    assert collections.Counter(s.task for s in samples) == collections.Counter(r["Pattern"] for r in rows)


def test_expressions_and_the_none_images(samples, annotations_root):
    none_files = {line.strip() for line in (annotations_root / "pixmmvp" / "meta_none.txt").read_text().splitlines()
                  if line.strip()}
    without = [s for s in samples if not s.has_expression]
    assert len(without) == NUM_WITHOUT_EXPRESSION == len(none_files)
    assert {f"{s.id}.jpg" for s in without} == none_files
    assert all(s.expression is None for s in without)
    for sample in samples:
        if sample.has_expression:
            assert sample.expression == sample.expression.strip() and sample.expression != "None"
    assert samples[0].expression == "the butterfly's wings"
    assert samples[9].expression == 'the key "Z"'  # the CSV doubles the quotes in an unquoted cell


def test_annotated_absent_images(samples, segmentations):
    annotated = {ann["image_id"] for ann in segmentations["annotations"]}
    absent = [s for s in samples if s.has_expression and int(s.id) not in annotated]
    assert len(absent) == NUM_ANNOTATED_ABSENT
    assert [s.id for s in samples if s.meta["annotated_absent"]] == [s.id for s in absent]
    for sample in absent + [s for s in samples if not s.has_expression]:
        mask = sample.gt_mask
        assert mask.shape == sample.image_size and not mask.any()


def test_masks_agree_with_pycocotools(samples, segmentations):
    coco = COCO()
    sizes = {s.meta["json_image_id"]: s.image_size for s in samples}
    coco.dataset = {
        "images": [dict(im, height=sizes[im["id"]][0], width=sizes[im["id"]][1]) for im in segmentations["images"]],
        "annotations": segmentations["annotations"], "categories": segmentations["categories"]}
    coco.createIndex()
    assert sum(s.meta["num_annotations"] for s in samples) == len(segmentations["annotations"])
    for sample in samples:
        height, width = sample.image_size
        expected = np.zeros((height, width), dtype=bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[sample.meta["json_image_id"]])):
            expected |= coco.annToMask(ann).astype(bool)
        mask = sample.gt_mask
        assert mask.dtype == bool and mask.flags.c_contiguous
        np.testing.assert_array_equal(mask, expected, err_msg=f"sample {sample.id}")


def test_actual_image_size_wins_and_is_recorded(samples):
    sample = samples[MISMATCHED_IMAGE - 1]
    assert sample.image_size == MISMATCHED_SIZE
    assert sample.meta["declared_size"] == (224, 224) and sample.meta["size_mismatch"]
    assert sample.gt_mask.shape == MISMATCHED_SIZE and sample.gt_mask.any()
    assert "size_mismatch" not in samples[2].meta


def test_empty_mask_is_height_by_width(samples):
    sample = samples[NON_SQUARE_EMPTY - 1]
    assert sample.meta["num_annotations"] == 0
    assert sample.gt_mask.shape == NON_SQUARE_SIZE == sample.image_size


def test_mask_calls_return_fresh_equal_arrays(samples):
    sample = samples[0]
    first = sample.gt_mask
    first[:] = False
    second = sample.gt_mask
    assert second.any() and second is not first
    np.testing.assert_array_equal(second, sample.gt_mask)


def test_samples_pickle_with_their_cached_masks(samples):
    again = pickle.loads(pickle.dumps(samples[:4]))
    for original, copy in zip(samples[:4], again):
        np.testing.assert_array_equal(original.gt_mask, copy.gt_mask)
        assert copy.image_path == original.image_path


def test_load_image_is_rgb_of_image_size(samples):
    image = samples[NON_SQUARE_EMPTY - 1].load_image()
    assert image.mode == "RGB" and image.size == NON_SQUARE_SIZE[::-1]


def test_questions_csv_is_used_when_present(annotations_root, tmp_path):
    """MMVP's own Questions.csv (header "lndex", as MMVP spells it) takes precedence."""
    _link_annotations(annotations_root / "pixmmvp", tmp_path)
    rows = _csv_dicts(annotations_root / "pixmmvp" / "visual_patterns.csv")
    with open(tmp_path / "Questions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["lndex", "Question", "Options", "Correct Answer"])
        for row in rows:
            writer.writerow([row["Index"], "Q: " + row["Question"], row["Options"], row["Correct Answer"]])
    samples = load_benchmark("pixmmvp", tmp_path, require_images=False)
    assert len(samples) == NUM_SAMPLES
    assert samples[0].question.startswith("Q: ")
    assert samples[0].task == rows[0]["Pattern"]  # patterns still come from visual_patterns.csv


def test_without_images_uses_declared_sizes(annotations_root):
    samples = load_benchmark("pixmmvp", annotations_root / "pixmmvp", require_images=False)
    assert len(samples) == NUM_SAMPLES
    assert all(s.meta["image_missing"] and s.image_size == (224, 224) for s in samples)
    stats = benchmark_stats(samples)
    assert stats["num_samples"] == NUM_SAMPLES and stats["num_pairs"] == NUM_SAMPLES // 2
    assert stats["without_expression"] == NUM_WITHOUT_EXPRESSION
    assert stats["annotated_absent"] == NUM_ANNOTATED_ABSENT
    assert stats["empty_masks"] == NUM_WITHOUT_EXPRESSION + NUM_ANNOTATED_ABSENT
    assert stats["mask_unavailable"] == 0
    assert 0 < stats["mask_area_fraction"]["min"] <= stats["mask_area_fraction"]["max"] <= 1
    assert sum(stats["per_task"].values()) == NUM_SAMPLES


def test_missing_image_is_reported(annotations_root):
    with pytest.raises(FileNotFoundError, match=r"visual_patterns.csv: line 2: image file not found: .*1\.jpg"):
        load_benchmark("pixmmvp", annotations_root / "pixmmvp")
