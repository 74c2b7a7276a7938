"""PixCV-Bench loader on the real annotation files, with stand-in images and a stand-in test.jsonl.

CV-Bench itself is not available here, so the test writes its 2D rows from Objects.csv in CV-Bench's
format (idx, type, task, question, choices, answer "(A)", prompt, source, source_filename, …) plus
a few Omni3D rows that must be ignored. Images are blank JPEGs of the sizes the RLEs declare.
"""
from __future__ import annotations

import ast
import collections
import json
import pathlib

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from pixfound.data import benchmark_stats, load_benchmark
from stand_in_data import RESIZED_ADE_IMAGE, RESIZED_SIZE, UNANNOTATED_SIZE, build_cvbench_root, csv_dicts

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Facts of the released files (MSiam/PixFoundation data/pixcvbench), as counted from them.
NUM_ADE, NUM_COCO = 633, 805
ADE_RLE, ADE_POLYGONS = 1232, 134
COCO_RLE, COCO_POLYGONS = 1619, 53
ADE_IMAGE_WITHOUT_ANNOTATION = 207  # JSON image id; its object is annotated as absent


@pytest.fixture(scope="module")
def cvbench_root(annotations_root: pathlib.Path, tmp_path_factory) -> pathlib.Path:
    return build_cvbench_root(annotations_root, tmp_path_factory.mktemp("pixcvbench") / "root")


@pytest.fixture(scope="module")
def samples(cvbench_root):
    return load_benchmark("pixcvbench", cvbench_root)


def _by_source(samples, source):
    return [s for s in samples if s.meta["source"] == source]


def test_counts_ids_and_3d_rows_ignored(samples):
    assert len(samples) == NUM_ADE + NUM_COCO == 1438
    assert [s.id for s in samples] == [str(i) for i in range(1438)]
    assert [s.index for s in samples] == list(range(1438))
    assert len(_by_source(samples, "ADE20K")) == NUM_ADE
    assert len(_by_source(samples, "COCO")) == NUM_COCO
    assert samples.skipped == []
    assert {s.task for s in samples} == {"Count", "Relation"}


def test_every_row_joins_its_json_image(samples, cvbench_root, annotations_root):
    objects = csv_dicts(annotations_root / "pixcvbench" / "Objects.csv")
    position = collections.Counter()
    for sample, row in zip(samples, objects):
        source = sample.meta["source"]
        # JSON image ids follow Objects.csv row order within each source
        assert sample.meta["json_image_id"] == position[source]
        position[source] += 1
        assert sample.image_path.name == row["file"].rsplit("/", 1)[1]
        expected_dir = ("ADE20K/validation/images" if source == "ADE20K" else "COCO/coco/images")
        assert sample.image_path == cvbench_root / expected_dir / sample.image_path.name
        assert sample.image_path.is_file()


def test_questions_options_answers_from_cvbench_rows(samples):
    first = samples[0]
    assert first.options == ["0", "1", "2", "3"] and first.answer == "A"
    assert samples[1].answer == "B"
    assert first.meta["prompt"].startswith(first.question)
    for sample in samples:
        assert sample.answer in "ABCD"[:len(sample.options)]


def test_annotation_counts_match_the_files(samples):
    for source, rle, polygons in (("ADE20K", ADE_RLE, ADE_POLYGONS), ("COCO", COCO_RLE, COCO_POLYGONS)):
        part = _by_source(samples, source)
        assert sum(s.meta["num_rle"] for s in part) == rle
        assert sum(s.meta["num_polygons"] for s in part) == polygons


def test_expressions_tuples_joined_synonyms_kept(samples, annotations_root):
    objects = [r["Objects"] for r in csv_dicts(annotations_root / "pixcvbench" / "Objects.csv")]
    for sample, cell in zip(samples, objects):
        if cell.startswith("("):
            parts = list(ast.literal_eval(cell))
            assert sample.meta["objects"] == parts
            assert sample.expression == " and ".join(parts)
        else:
            assert sample.expression == cell and sample.meta["objects"] == [cell]
    by_id = {s.id: s for s in samples}
    assert by_id["3"].expression == "curtain, drape, drapery, mantle, pall"  # ADE synonyms: one object
    assert by_id["344"].expression == "mirror and wardrobe, closet, press"
    assert all(s.has_expression for s in samples)


def test_image_without_annotation_is_absent_with_empty_mask(samples):
    absent = [s for s in samples if s.meta["annotated_absent"]]
    assert [(s.meta["source"], s.meta["json_image_id"]) for s in absent] == [("ADE20K", ADE_IMAGE_WITHOUT_ANNOTATION)]
    mask = absent[0].gt_mask
    assert mask.shape == UNANNOTATED_SIZE and mask.dtype == bool and not mask.any()


def _reference_masks(source_json: pathlib.Path, sizes: dict[int, tuple[int, int]]) -> dict[int, np.ndarray]:
    """annToMask-style union with pycocotools' COCO API; RLEs of another size resized with torch."""
    data = json.loads(source_json.read_text())
    coco = COCO()
    coco.dataset = {"images": [dict(im, height=sizes[im["id"]][0], width=sizes[im["id"]][1])
                               for im in data["images"] if im["id"] in sizes],
                    "annotations": [dict(a, id=k + 1) for k, a in enumerate(data["annotations"])],
                    "categories": data["categories"]}
    coco.createIndex()
    masks = {}
    for image_id, (height, width) in sizes.items():
        union = np.zeros((height, width), dtype=bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            mask = torch.from_numpy(coco.annToMask(ann).astype(np.float32))
            if mask.shape != (height, width):
                mask = torch.nn.functional.interpolate(mask[None, None], size=(height, width),
                                                       mode="nearest-exact")[0, 0]
            union |= mask.numpy() > 0.5
        masks[image_id] = union
    return masks


@pytest.mark.parametrize("source", ["ADE20K", "COCO"])
def test_masks_agree_with_pycocotools(samples, annotations_root, source):
    part = _by_source(samples, source)
    chosen = [s for s in part if s.meta["num_polygons"] or s.meta["json_image_id"] % 20 == 0
              or s.meta["json_image_id"] in (RESIZED_ADE_IMAGE, ADE_IMAGE_WITHOUT_ANNOTATION)]
    sizes = {s.meta["json_image_id"]: s.image_size for s in chosen}
    reference = _reference_masks(annotations_root / "pixcvbench" / source / "FinalSegmentations.json", sizes)
    for sample in chosen:
        mask = sample.gt_mask
        assert mask.dtype == bool and mask.flags.c_contiguous
        assert mask.shape == sample.image_size
        np.testing.assert_array_equal(mask, reference[sample.meta["json_image_id"]], err_msg=f"sample {sample.id}")
        # the statistics' shortcut: area from the RLE, without decoding
        assert sample.mask_loader.area() == (int(mask.sum()), mask.size)
    assert sum(s.meta["num_polygons"] > 0 for s in chosen) > 0


def test_rle_resized_to_the_actual_image(samples):
    sample = next(s for s in _by_source(samples, "ADE20K") if s.meta["json_image_id"] == RESIZED_ADE_IMAGE)
    assert sample.image_size == RESIZED_SIZE
    assert sample.meta["size_mismatch"] and sample.meta["declared_size"] == (256, 256)
    assert sample.gt_mask.shape == RESIZED_SIZE and sample.gt_mask.any()


def test_parquet_gives_the_same_samples(cvbench_root, samples, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [json.loads(line) for line in (cvbench_root / "test.jsonl").read_text().splitlines()]
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k not in ("target_class", "target_size", "bbox")}
                                  for r in rows])
    table = table.append_column("image", pa.array([{"bytes": b"", "path": None}] * len(rows)))
    path = tmp_path / "test.parquet"
    pq.write_table(table, path)
    again = load_benchmark("pixcvbench", cvbench_root, questions_file=path)
    assert [(s.id, s.question, s.options, s.answer, s.expression, s.task, s.image_path) for s in again] == \
           [(s.id, s.question, s.options, s.answer, s.expression, s.task, s.image_path) for s in samples]


def test_stats_without_decoding(samples):
    stats = benchmark_stats(samples, decode_masks=False)
    assert stats["num_samples"] == 1438 and stats["without_expression"] == 0
    assert stats["annotated_absent"] == 1
    assert sum(stats["per_task"].values()) == 1438
    assert "empty_masks" not in stats
