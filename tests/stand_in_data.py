"""Stand-in benchmark folders built from the real annotation files, for tests.

CV-Bench and MMVP themselves are not available here: CV-Bench's 2D rows are written from Objects.csv in
CV-Bench's format (idx, type, task, question, choices, answer "(A)", prompt, source, source_filename, …)
plus a few Omni3D rows that must be ignored, and images are blank files of the sizes the annotations
declare.
"""
from __future__ import annotations

import ast
import collections
import csv
import json
import pathlib
import shutil
from typing import Optional

from PIL import Image

RESIZED_ADE_IMAGE = 0               # stand-in written at another size than its RLE declares
RESIZED_SIZE = (200, 300)           # (H, W)
UNANNOTATED_SIZE = (300, 400)


def csv_dicts(path: pathlib.Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _json_images(path: pathlib.Path) -> tuple[dict, dict[int, list]]:
    data = json.loads(path.read_text())
    anns = collections.defaultdict(list)
    for ann in data["annotations"]:
        anns[ann["image_id"]].append(ann)
    return data, anns


def _stand_in_size(anns: list) -> tuple[int, int]:
    for ann in anns:
        if isinstance(ann["segmentation"], dict):
            return tuple(ann["segmentation"]["size"])
    if not anns:
        return UNANNOTATED_SIZE
    xs = [v for ann in anns for poly in ann["segmentation"] for v in poly[0::2]]
    ys = [v for ann in anns for poly in ann["segmentation"] for v in poly[1::2]]
    return int(max(ys)) + 9, int(max(xs)) + 9


def _cvbench_rows(objects_csv: pathlib.Path) -> list[dict]:
    rows = []
    with open(objects_csv, newline="") as handle:
        for cells in csv.DictReader(handle):
            idx, file, objects = int(cells["Id"]), cells["file"], cells["Objects"]
            source = "ADE20K" if "/ADE20K/" in file else "COCO"
            name = file.rsplit("/", 1)[1]
            relation = objects.startswith("(")
            if relation:
                first, second = ast.literal_eval(objects)
                question = f"Considering the relative positions of the {first} and the {second}, where is the {first}?"
                choices = ["left", "right"]
            else:
                question = f"How many {objects}s are in the image?"
                choices = ["0", "1", "2", "3"]
            answer = f"({'AB'[idx % 2]})"
            rows.append({
                "idx": idx, "type": "2D", "task": "Relation" if relation else "Count", "question": question,
                "choices": choices, "answer": answer,
                "prompt": question + " Select from the following choices.\n"
                          + "\n".join(f"({'ABCD'[k]}) {c}" for k, c in enumerate(choices)),
                "filename": f"img/2D/{'relation' if relation else 'count'}/{source.lower()}_{idx}.png",
                "source": source,
                "source_dataset": f"{source} Validation Set",
                "source_filename": name if source == "ADE20K" else f"/coco/val2017/{name}",
                "target_class": None, "target_size": None, "bbox": None,
            })
    for k in range(3):  # 3D rows: CV-Bench's Omni3D questions, not part of PixCV-Bench
        idx = len(rows)
        rows.append({"idx": idx, "type": "3D", "task": "Depth", "question": "Which is closer?",
                     "choices": ["chair", "table"], "answer": "(A)", "prompt": "",
                     "filename": f"img/3D/depth/o_{k}.png",
                     "source": "Omni3D", "source_dataset": "Omni3D", "source_filename": f"/Omni3D/x_{k}.jpg",
                     "target_class": None, "target_size": None, "bbox": None})
    return rows


def build_cvbench_root(annotations_root: pathlib.Path, root: pathlib.Path, *, rows: Optional[int] = None
                       ) -> pathlib.Path:
    """A PixCV-Bench data root in ``root``: the real annotation files (linked), a stand-in test.jsonl
    (its first ``rows`` 2D rows only, when given) and stand-in images for the rows it holds."""
    src = annotations_root / "pixcvbench"
    root.mkdir(parents=True, exist_ok=True)
    (root / "Objects.csv").symlink_to(src / "Objects.csv")
    for source in ("ADE20K", "COCO"):
        (root / source).mkdir()
        (root / source / "FinalSegmentations.json").symlink_to(src / source / "FinalSegmentations.json")
    all_rows = _cvbench_rows(src / "Objects.csv")
    kept = all_rows if rows is None else [r for r in all_rows if r["type"] == "2D"][:rows]
    with open(root / "test.jsonl", "w") as handle:
        for row in kept:
            handle.write(json.dumps(row) + "\n")
    wanted = {pathlib.PurePosixPath(r["source_filename"]).name for r in kept}
    folders = {"ADE20K": root / "ADE20K" / "validation" / "images", "COCO": root / "COCO" / "coco" / "images"}
    for source, folder in folders.items():
        folder.mkdir(parents=True)
        data, anns = _json_images(src / source / "FinalSegmentations.json")
        for image in data["images"]:
            if image["file_name"] not in wanted:
                continue
            height, width = _stand_in_size(anns[image["id"]])
            if source == "ADE20K" and image["id"] == RESIZED_ADE_IMAGE:
                height, width = RESIZED_SIZE
            Image.new("L", (width, height), 128).save(folder / image["file_name"], quality=10)
    return root


def build_pixmmvp_root(annotations_root: pathlib.Path, root: pathlib.Path, images=range(1, 5)) -> pathlib.Path:
    """A PixMMVP data root in ``root``: the real annotation files and blank 224x224 images ``images``."""
    shutil.copytree(annotations_root / "pixmmvp", root)
    (root / "MMVP Images").mkdir()
    for index in images:
        Image.new("RGB", (224, 224), (90, 120, 150)).save(root / "MMVP Images" / f"{index}.jpg")
    return root
