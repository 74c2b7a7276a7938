"""Export a run in the layout of the published PixFoundation evaluation scripts.

``pixfound export RUN --format pixfoundation --protocol P --output DIR`` writes what the
published inference scripts would have written for protocol ``P``, so that their evaluation
scripts (``eval_nonpixLMM_iou.py``, ``protocol1_accuracy.py``, ``protocol2_accuracy.py``) can
score a pixfound run::

    DIR/preds/{image}_{phrase:03d}_{mask:03d}.png   each SAM candidate, uint8 0/255, at image size
    DIR/preds/{image}.png                          an all-zero mask where the answer had no phrase
    DIR/meta_file.txt                              "{image}.jpg - {phrase} - {text}| {root}| {score:f}"
    DIR/answers.jsonl                              the answers, in the fields the accuracy scripts read
    DIR/auto.jsonl                                 the judge's choice per sample, where a judge ran

``{image}`` is the PixMMVP image number (the sample id) or the PixCV-Bench image stem. The
similarity scores in the meta file are the run's own (its ``--phrase-vectors``); the published
evaluation picks the last mask file of the best phrase, which is pixfound's
``--similarity-pick last_file``. Candidate masks come from ``samples.jsonl``, so the run must have
kept them (the default; not with ``--no-save-candidates``).
"""
from __future__ import annotations

import json
import pathlib
from typing import Union

import numpy as np

from pixfound.errors import OutputExistsError, UserError
from pixfound.eval.prompts import IMAGE_LINE
from pixfound.eval.records import RunPaths, collect_records, sort_key, write_jsonl_atomic

__all__ = ["export_pixfoundation", "image_name"]


def image_name(record: dict) -> str:
    """The ``{image}`` part of the published file names for a record."""
    return str(record.get("image") or record["sample_id"])


def _answer_label(record: dict) -> str:
    letter = str(record.get("answer_letter") or "")
    # MMVP's CSV writes "(a)"; CV-Bench's own prompts letter their choices "(A)".
    return f"({letter})" if record.get("benchmark") == "pixcvbench" else f"({letter.lower()})"


def _answers_row(record: dict, protocol: int, model: str) -> dict:
    question_id = int(record["index"]) + 1 if record.get("benchmark") == "pixmmvp" else record["sample_id"]
    prompt = IMAGE_LINE + str(record["prompt"])
    if protocol == 2:
        # infer_pixfoundation.py --prompt_for_seg 3: the CV-Bench format protocol2_accuracy.py reads
        options = record.get("options") or []
        return {"question_id": question_id, "prompt": prompt, "answer": str(record["answer"]).strip(),
                "gt_answer": _answer_label(record), "model_id": model, "text_options": list(options)}
    return {"question_id": question_id, "prompt": prompt, "answer": _answer_label(record),
            "response": record["answer"], "answer_id": record["key"], "model_id": model}


def _write_png(path: pathlib.Path, mask: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)


def export_pixfoundation(run_dir: Union[str, pathlib.Path], protocol: int, output: Union[str, pathlib.Path], *,
                         force: bool = False) -> dict:
    """Write protocol ``protocol`` of a run in the published layout (module docstring); return counts."""
    from pixfound.grounding.select import rle_to_mask

    if protocol not in (1, 2, 3):
        raise UserError(f"--protocol must be 1, 2 or 3, got {protocol}")
    paths = RunPaths(pathlib.Path(run_dir))
    if not paths.run_json.is_file():
        raise UserError(f"{paths.root} holds no run.json (is it a `pixfound eval` output?)")
    records, _ = collect_records(paths)
    chosen = sorted((r for r in records.values() if int(r["protocol"]) == protocol), key=sort_key)
    if not chosen:
        raise UserError(f"{paths.root} holds no protocol-{protocol} records")
    out = pathlib.Path(output)
    if out.resolve() == paths.root.resolve() or paths.root.resolve() in out.resolve().parents:
        raise UserError(f"--output {out} is inside the run folder; export to a folder of its own")
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"--output {out} is not empty; pass --force to write into it")
    config = json.loads(paths.run_json.read_text(encoding="utf-8")).get("config", {})
    model = str(config.get("model", ""))
    preds = out / "preds"
    preds.mkdir(parents=True, exist_ok=True)

    counts = {"samples": len(chosen), "candidate_files": 0, "empty_files": 0, "meta_lines": 0, "auto_rows": 0}
    meta_lines: list[str] = []
    auto_rows: list[dict] = []
    grounds = protocol in (1, 3)
    for record in chosen:
        if not grounds:
            continue
        grounding = record.get("grounding")
        if grounding is None:
            raise UserError(f"record {record['key']} has no grounding; export needs a run with protocol {protocol} "
                            "grounding")
        name = image_name(record)
        candidates = grounding.get("candidates") or []
        if candidates and any("mask_rle" not in c for c in candidates):
            raise UserError(f"{paths.root} was run with --no-save-candidates: its candidate masks are not stored, "
                            "so they cannot be exported")
        for candidate in candidates:
            target = preds / f"{name}_{int(candidate['phrase_index']):03d}_{int(candidate['mask_index']):03d}.png"
            _write_png(target, rle_to_mask(candidate["mask_rle"]))
            counts["candidate_files"] += 1
        if not candidates:
            height, width = record["image_hw"]
            _write_png(preds / f"{name}.png", np.zeros((int(height), int(width)), dtype=bool))
            counts["empty_files"] += 1
        similarity = (grounding.get("selections") or {}).get("similarity") or {}
        info = similarity.get("info") or {}
        scores = dict(zip(info.get("phrase_indices") or [], info.get("similarities") or []))
        for phrase in grounding.get("phrases") or []:
            score = float(scores.get(phrase["index"], 0.0))
            meta_lines.append(f"{name}.jpg - {int(phrase['index'])} - {phrase['text']}| {phrase.get('root', '')}| "
                              f"{score:f}")
        judge = (grounding.get("selections") or {}).get("judge")
        if judge is not None:
            if judge.get("phrase_index") is None:
                selected = "NONE"
            else:
                selected = str((preds / f"{name}_{int(judge['phrase_index']):03d}_"
                                f"{int(judge['mask_index']):03d}.png").resolve())
            auto_rows.append({"question_id": int(record["index"]), "selected file": selected})
    if grounds:
        (out / "meta_file.txt").write_text("".join(line + "\n" for line in meta_lines), encoding="utf-8")
        counts["meta_lines"] = len(meta_lines)
    write_jsonl_atomic(out / "answers.jsonl", [_answers_row(r, protocol, model) for r in chosen])
    if auto_rows:
        write_jsonl_atomic(out / "auto.jsonl", auto_rows)
        counts["auto_rows"] = len(auto_rows)
    return counts


def export_run(run_dir: Union[str, pathlib.Path], *, format: str, protocol: int, output: Union[str, pathlib.Path],
               force: bool = False) -> dict:
    """``pixfound export``: dispatch on ``format`` (only ``pixfoundation`` so far)."""
    if format != "pixfoundation":
        raise UserError(f"--format {format!r} is unknown; choose pixfoundation")
    return export_pixfoundation(run_dir, protocol, output, force=force)
