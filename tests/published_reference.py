"""The published PixFoundation rules, restated step by step as the tests' reference.

Each function follows one piece of ``MSiam/PixFoundation`` (commit 20027b0) or its ``groundLMM``
helper, in the same order of operations, so that a test can check pixfound's ``--recipe
published`` against it. File reading goes through PIL instead of OpenCV; nothing else changes.
"""
from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image

# ------------------------------------------------------------------ pixmmvp/inference/infer_pixfoundation.py


def protocol1_prompt(row: dict) -> str:
    """``--prompt_for_seg 0``: the question and its options, as pandas read them."""
    return row["Question"] + " " + row["Options"]


def protocol3_prompt(object_cell: str) -> str:
    """``--prompt_for_seg 1``: ``Object`` is the Objects.csv cell as pandas read it."""
    return f"Identify {object_cell} in the scene."


def protocol2_prompt(row: dict, question_extension: str = "Answer with the option's letter from the given "
                                                               "choices directly.") -> str:
    """``--prompt_for_seg 3``: ``process(line, question_extension)``."""
    qs = str(row["Question"]) + " Options:"
    options = str(row["Options"]).split("(b)")
    parts = [part.strip() for part in options]
    parts = [part.replace("(a)", "A.").replace("(b)", "B.") for part in parts]
    if len(parts) > 1:
        parts[1] = "B. " + parts[1]
    for part in parts:
        qs += f"\n{part}"
    qs += f"\n{question_extension}"
    return qs


def answers_file_prompt(qs: str) -> str:
    """The ``prompt`` the answers file stored: LLaVA's image placeholder line, then the question."""
    return "<image>" + "\n" + qs


def upsample_pad_argmax(scores, height: int, width: int):
    """``--aspect-ratio pad`` and ``--max_point 1``: points (x, y) of phrase maps [N, h, w] (torch)."""
    import torch

    upsample_size = max(height, width)
    crop_h_start = (upsample_size - height) // 2
    crop_w_start = (upsample_size - width) // 2
    up = torch.nn.functional.interpolate(scores.unsqueeze(0), size=(upsample_size, upsample_size), mode="bicubic",
                                         align_corners=False).squeeze(0)
    up = up[:, crop_h_start:crop_h_start + height, crop_w_start:crop_w_start + width]
    n, h, w = up.shape
    max_indices = torch.argmax(up.reshape(n, -1), dim=1)
    return torch.stack([max_indices % w, max_indices // w], dim=1)


def token_maps_minus_mean(step_maps):
    """``attentions - attentions.mean(dim=0)`` over every generated step, the EOS step included."""
    attentions = step_maps.float()
    return attentions - attentions.mean(dim=0)


# ------------------------------------------------------------------------------- groundLMM aas/utils.py


def spacy_normalize(phrase: str) -> str:
    """``get_spacy_embedding``'s text: lowercased, one leading article dropped (at the very start only)."""
    phrase = phrase.lower()
    if phrase.startswith("the "):
        phrase = phrase[4:]
    elif phrase.startswith("an "):
        phrase = phrase[3:]
    elif phrase.startswith("a "):
        phrase = phrase[2:]
    return phrase


# ------------------------------------------------------------------------- pixmmvp/eval/eval_nonpixLMM_iou.py


def compute_iou(segmentation, annotation):
    if np.isclose(np.sum(annotation), 0) and np.isclose(np.sum(segmentation), 0):
        return 1
    return np.sum((annotation & segmentation)) / np.sum((annotation | segmentation), dtype=np.float32)


def read_mask(path: str) -> np.ndarray:
    mask = np.array(Image.open(path).convert("L"))
    mask[mask == 255] = 1
    return mask


def retrieve_highest_iou(filename: str, preds_files: list, anno_masks: np.ndarray):
    filename = filename.split("/")[-1].split(".")[0]
    matched = [pf for pf in preds_files if filename == pf.split("/")[-1].split("_")[0]]
    best_iou = 0
    best_matched_mask = None
    best_matched_file = None
    for predf in matched:
        pred_mask = read_mask(predf)
        iou = compute_iou(pred_mask, anno_masks)
        if iou >= best_iou:
            best_iou = iou
            best_matched_mask = pred_mask
            best_matched_file = predf
    return best_matched_mask, best_matched_file


def load_meta_info(meta_file: str) -> dict:
    meta_info: dict = {}
    with open(meta_file, "r") as f:
        for line in f:
            tokens = line.split("- ")
            fname = tokens[0].strip()
            if fname not in meta_info:
                meta_info[fname] = []
            phrase, core_word, spacy_score = tokens[2].strip().split("| ")
            meta_info[fname].append((phrase.strip(), core_word.strip(), float(spacy_score.strip())))
    return meta_info


def retrieve_max_spacy_score(filename: str, preds_files: list, meta_info: dict):
    filename = filename.split("/")[-1].split(".")[0]
    matched = sorted(pf for pf in preds_files if filename == pf.split("/")[-1].split("_")[0])
    best_spacy_score = 0
    best_matched_mask = None
    best_matched_file = None
    for predf in matched:
        pred_mask = read_mask(predf)
        phrase_idx = int(predf.split("/")[-1].split("_")[1])
        _, _, spacy_score = meta_info[filename + ".jpg"][phrase_idx]
        if spacy_score >= best_spacy_score:
            best_spacy_score = spacy_score
            best_matched_mask = pred_mask
            best_matched_file = predf
    if best_spacy_score < 0.7 and best_matched_mask is not None:
        best_matched_mask = np.zeros_like(best_matched_mask)
    return best_matched_mask, best_matched_file


def miou(preds_dir: str, samples: list, kind: str, meta_file: str = "") -> float:
    """The published mIoU over ``samples`` ((image name, ground-truth mask, has expression)) with
    ``--remove_none_flag``: oracle (``kind="oracle"``) or "a+s" (``kind="spacy_score"``)."""
    preds_files = sorted(os.path.join(preds_dir, f) for f in os.listdir(preds_dir) if f.endswith(".png"))
    meta_info = load_meta_info(meta_file) if kind == "spacy_score" else None
    total, count = 0.0, 0
    for name, anno_masks, has_expression in samples:
        if not has_expression:
            continue
        anno_masks = np.asarray(anno_masks, dtype=np.uint8)
        if kind == "oracle":
            if anno_masks.sum() == 0:
                pred_mask = np.zeros_like(anno_masks)
            else:
                pred_mask, _ = retrieve_highest_iou(f"{name}.jpg", preds_files, anno_masks)
        else:
            pred_mask, _ = retrieve_max_spacy_score(f"{name}.jpg", preds_files, meta_info)
        total += 0 if pred_mask is None else compute_iou(pred_mask, anno_masks)
        count += 1
    return float(total / count)


# -------------------------------------------------------------------------- protocol1_accuracy.py (grading)


def grading_question(question: str, correct_answer: str, model_response: str) -> str:
    return (f"Given the following question {question}, the correct answer is {correct_answer}. Does the following "
            f"answer correctly answers the question, answer:{model_response}? Respond with a Yes/No")


# -------------------------------------------------------------- pixmmvp/inference/infer_pixfoundation_auto_gpt.py


def judge_says_exists(reply: str) -> bool:
    return bool(re.compile(r"^(yes)\.*$", re.IGNORECASE).match(reply.lower()))


def judge_pick(outputs: str, files: list):
    """The file the published stage 2 selected for a reply (IndexError where it stopped)."""
    files = files[:499]
    try:
        best_idx = int(outputs) - 1
    except ValueError:
        try:
            best_idx = int(re.search(r"\d+", outputs)[0]) - 1
        except TypeError:
            best_idx = 0
    return files[best_idx]


# ------------------------------------------------------------------------------- pixmmvp/eval/gpt_concept_when.py

CONCEPT_QUESTION = ("Can you classify the following noun phrase belongs to which of these 6 concepts: (a) Color and "
                    "appearance, (b) Location and position, (c) Object part, (d) Context or setting, (e) "
                    "Objects/entities, (f) State. Please respond with one or two letters and provide letters only. "
                    "You will be given the noun phrase and the correponding full context.")


def concept_question(noun_phr: str, full_text: str) -> str:
    return CONCEPT_QUESTION + f": '{noun_phr}', '{full_text}'. "


def count_concepts(replies: list) -> dict:
    """The published counting of the (lowercased) replies; raises KeyError where it stopped."""
    bins = {chr(i + ord("a")): 0 for i in range(6)}
    for concept_cat in replies:
        for cat in concept_cat.lower().split(","):
            cat = cat.replace("(", "").replace(")", "")
            try:
                bins[cat.strip()] += 1
            except KeyError:
                cat = cat.split(" ")[0]
                bins[cat.strip()] += 1
    return bins
