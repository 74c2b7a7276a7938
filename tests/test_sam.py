"""SAM wrapper: tiny SAM end to end, batching equivalences, checkpoint errors (pixfound.grounding.sam)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("segment_anything")
from segment_anything import SamPredictor  # noqa: E402

from pixfound.grounding import sam as sam_module  # noqa: E402
from pixfound.grounding.sam import SamSegmenter, load_sam, tiny_sam  # noqa: E402

LOGIT_ATOL = 1e-4  # fp32 CPU; batched vs single matmuls differ in summation order only


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _points(height: int, width: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, width, count), rng.integers(0, height, count)], axis=-1)[:, None, :]


@pytest.fixture(scope="module")
def segmenter() -> SamSegmenter:
    return tiny_sam(seed=0)


def test_tiny_sam_is_small_seeded_and_in_eval_mode():
    a, b, c = tiny_sam(seed=0), tiny_sam(seed=0), tiny_sam(seed=1)
    params_a = dict(a.model.named_parameters())
    assert sum(p.numel() for p in params_a.values()) < 500_000
    assert not a.model.training
    assert all(torch.equal(p, dict(b.model.named_parameters())[n]) for n, p in params_a.items())
    assert any(not torch.equal(p, dict(c.model.named_parameters())[n]) for n, p in params_a.items())
    assert a.describe()["model_type"] == "tiny"


def test_segment_points_shapes_and_dtypes(segmenter):
    height, width = 37, 53
    segmenter.set_image(_image(height, width, seed=1))
    assert segmenter.image_size == (height, width)
    masks, scores = segmenter.segment_points(_points(height, width, 5, seed=2))
    assert masks.shape == (5, 3, height, width) and masks.dtype == torch.bool
    assert scores.shape == (5, 3) and scores.dtype == torch.float32
    assert masks.device.type == "cpu"


def test_segment_points_matches_sam_predictor(segmenter):
    height, width = 41, 30
    image = _image(height, width, seed=3)
    points = _points(height, width, 4, seed=4)
    segmenter.set_image(image)
    logits, scores = segmenter.segment_points(points, return_logits=True)

    predictor = SamPredictor(segmenter.model)
    predictor.set_image(image)
    coords = torch.as_tensor(predictor.transform.apply_coords(points.astype(np.float64), (height, width)),
                             dtype=torch.float32)
    labels = torch.ones(points.shape[:2], dtype=torch.int)
    expected_logits, expected_scores, _ = predictor.predict_torch(coords, labels, multimask_output=True,
                                                                  return_logits=True)
    torch.testing.assert_close(logits, expected_logits, atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(scores, expected_scores, atol=LOGIT_ATOL, rtol=0)


def test_batched_points_equal_one_call_per_phrase(segmenter):
    height, width = 29, 47
    segmenter.set_image(_image(height, width, seed=5))
    points = _points(height, width, 6, seed=6)
    logits, scores = segmenter.segment_points(points, return_logits=True)
    for g in range(points.shape[0]):
        one_logits, one_scores = segmenter.segment_points(points[g:g + 1], return_logits=True)
        torch.testing.assert_close(logits[g:g + 1], one_logits, atol=LOGIT_ATOL, rtol=0)
        torch.testing.assert_close(scores[g:g + 1], one_scores, atol=LOGIT_ATOL, rtol=0)
    masks, _ = segmenter.segment_points(points)
    assert torch.equal(masks, logits > segmenter.model.mask_threshold)


def test_prompt_chunks_equal_a_single_call():
    height, width = 33, 25
    image, points = _image(height, width, seed=7), _points(height, width, 5, seed=8)
    whole, chunked = tiny_sam(seed=0), tiny_sam(seed=0, prompt_batch_size=2)
    whole.set_image(image)
    chunked.set_image(image)
    a = whole.segment_points(points, return_logits=True)
    b = chunked.segment_points(points, return_logits=True)
    torch.testing.assert_close(a, b, atol=LOGIT_ATOL, rtol=0)


def test_batched_encoder_equals_one_by_one():
    images = [_image(37, 53, 10), _image(64, 41, 11), _image(20, 20, 12)]
    batched = tiny_sam(seed=0, encoder_batch_size=2)
    single = tiny_sam(seed=0, encoder_batch_size=1)
    together = batched.embed_images(images)
    for image, embedding in zip(images, together):
        (alone,) = single.embed_images([image])
        assert embedding.original_size == alone.original_size == image.shape[:2]
        assert embedding.input_size == alone.input_size
        torch.testing.assert_close(embedding.features, alone.features, atol=1e-5, rtol=1e-5)
        # and what SamPredictor.set_image computes
        predictor = SamPredictor(single.model)
        predictor.set_image(image)
        torch.testing.assert_close(embedding.features, predictor.features, atol=1e-5, rtol=1e-5)
        assert tuple(predictor.input_size) == embedding.input_size


def test_set_embedding_then_points_equal_set_image(segmenter):
    images = [_image(30, 44, 13), _image(51, 27, 14)]
    embeddings = segmenter.embed_images(images)
    for image, embedding in zip(images, embeddings):
        points = _points(*image.shape[:2], 3, seed=15)
        segmenter.set_embedding(embedding)
        from_embedding = segmenter.segment_points(points, return_logits=True)
        segmenter.set_image(image)
        from_image = segmenter.segment_points(points, return_logits=True)
        torch.testing.assert_close(from_embedding, from_image, atol=LOGIT_ATOL, rtol=0)


def test_several_points_per_phrase_with_missing_ones(segmenter):
    height, width = 40, 40
    segmenter.set_image(_image(height, width, seed=16))
    points = np.array([[[3, 4], [30, 31]], [[10, 12], [-1, -1]]])
    masks, scores = segmenter.segment_points(points)
    assert masks.shape == (2, 3, height, width) and scores.shape == (2, 3)


def test_no_phrases_gives_empty_outputs(segmenter):
    segmenter.set_image(_image(21, 34, seed=17))
    masks, scores = segmenter.segment_points(np.zeros((0, 1, 2), dtype=np.int64))
    assert masks.shape == (0, 3, 21, 34) and masks.dtype == torch.bool
    assert scores.shape == (0, 3)
    masks, scores = segmenter.segment_boxes(np.zeros((0, 4)))
    assert masks.shape == (0, 21, 34) and scores.shape == (0,)


def test_segment_boxes_keeps_the_last_mask(segmenter):
    height, width = 45, 38
    image = _image(height, width, seed=18)
    boxes = np.array([[2, 3, 20, 30], [10, 0, 37, 44]], dtype=np.float32)
    segmenter.set_image(image)
    single, single_scores = segmenter.segment_boxes(boxes, return_logits=True)
    last, last_scores = segmenter.segment_boxes(boxes, multimask_output=True, return_logits=True)
    assert single.shape == last.shape == (2, height, width)
    predictor = SamPredictor(segmenter.model)
    predictor.set_image(image)
    for i, box in enumerate(boxes):
        for multimask, got, got_scores in ((False, single, single_scores), (True, last, last_scores)):
            expected, expected_scores, _ = predictor.predict(box=box, multimask_output=multimask, return_logits=True)
            np.testing.assert_allclose(got[i].numpy(), expected[-1], atol=LOGIT_ATOL)
            assert got_scores[i].item() == pytest.approx(float(expected_scores[-1]), abs=LOGIT_ATOL)
    masks, _ = segmenter.segment_boxes(boxes)
    assert masks.dtype == torch.bool and masks.shape == (2, height, width)


@pytest.mark.parametrize(
    "points, message",
    [
        (np.array([[[5, 60]]]), "outside"),
        (np.array([[[-2, 3]]]), "outside"),
        (np.array([[[-1, -1]]]), "no valid point"),
        (np.array([[5.0, 6.0]]), r"\[G, P, 2\]"),
        (np.array([[[5.0, 6.0]]]), "integer"),
    ],
)
def test_bad_points_are_rejected(segmenter, points, message):
    segmenter.set_image(_image(40, 40, seed=19))
    with pytest.raises(ValueError, match=message):
        segmenter.segment_points(points)


def test_bad_images_and_boxes_are_rejected(segmenter):
    with pytest.raises(ValueError, match="RGB uint8"):
        segmenter.set_image(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        segmenter.embed_images([np.zeros((10, 10, 3), dtype=np.float32)])
    segmenter.set_image(_image(12, 12, seed=20))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        segmenter.segment_boxes(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="finite"):
        segmenter.segment_boxes(np.array([[0, 0, np.nan, 4]]))


def test_prompting_before_an_image_is_set():
    fresh = tiny_sam(seed=0)
    with pytest.raises(RuntimeError, match="no image is set"):
        fresh.segment_points(np.zeros((1, 1, 2), dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def test_missing_checkpoint_names_path_and_model_type(tmp_path):
    path = tmp_path / "nowhere" / "sam_vit_b.pth"
    with pytest.raises(FileNotFoundError) as info:
        load_sam("vit_b", path)
    assert str(path) in str(info.value) and "vit_b" in str(info.value)


def test_corrupt_checkpoint_names_path_and_model_type(tmp_path):
    path = tmp_path / "sam_vit_h_4b8939.pth"
    path.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(ValueError) as info:
        load_sam("vit_h", path)
    assert str(path) in str(info.value) and "vit_h" in str(info.value)


def test_checkpoint_of_another_model_type(tmp_path):
    path = tmp_path / "sam.pth"
    torch.save({sam_module._PATCH_KEY: torch.zeros(768, 3, 16, 16)}, path)
    with pytest.raises(ValueError, match="holds a vit_b image encoder, but model_type is 'vit_l'"):
        load_sam("vit_l", path)
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a SAM state dict"):
        load_sam("vit_h", path)


def test_checkpoint_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        load_sam("vit_x", tmp_path / "a.pth")
    with pytest.raises(ValueError, match="checkpoint=PATH"):
        load_sam("vit_b", None)


def test_load_sam_reads_a_state_dict(tmp_path, monkeypatch):
    """The load path end to end, with the tiny architecture standing in for vit_b."""
    import segment_anything

    source = tiny_sam(seed=3)
    path = tmp_path / "tiny.pth"
    torch.save(source.model.state_dict(), path)
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda: sam_module.build_tiny_sam_model())
    monkeypatch.setitem(sam_module.SAM_MODEL_TYPES, "vit_b", 32)
    loaded = load_sam("vit_b", path, device="cpu")
    assert loaded.describe()["checkpoint"] == str(path)
    for name, value in source.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    # a checkpoint with the right width but missing keys
    state = source.model.state_dict()
    state.pop("mask_decoder.iou_token.weight")
    torch.save(state, path)
    with pytest.raises(ValueError, match="does not fit vit_b"):
        load_sam("vit_b", path, device="cpu")
