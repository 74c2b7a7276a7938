"""Model adapters: loading, prompts and layouts, image geometry, generation API and its errors."""
from __future__ import annotations

import json
import time

import pytest
import torch
from PIL import Image

from pixfound.data.sample import Sample
from pixfound.errors import UserError
from pixfound.models import (
    FAMILIES,
    TINY_MODELS,
    Generation,
    ImageGeometry,
    image_token_span,
    load_model,
    tiny_model,
)
from pixfound.models.llava import anyres_grid_shape, configure_llava_image_processor
from random_samples import random_image_sample


def make_sample(index: int, size: tuple[int, int]) -> Sample:
    return random_image_sample(index, size, seed_base=2000, id_prefix="s")


@pytest.fixture(scope="module")
def llava():
    return tiny_model("llava")


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen2_vl")


# ------------------------------------------------------------------------------------------------
# registry and loading
# ------------------------------------------------------------------------------------------------
def test_tiny_models_of_every_family():
    for name, kind in TINY_MODELS.items():
        adapter = load_model(name, device="cpu")
        assert adapter.dtype == torch.float32 and adapter.device.type == "cpu"
        assert adapter.name == name
        assert FAMILIES[kind][0] == adapter.family
        text = adapter.model.config.get_text_config()
        assert text.num_key_value_heads < text.num_attention_heads  # grouped-query attention
        assert adapter.tokenizer.padding_side == "left"


def test_tiny_model_is_deterministic_per_seed():
    first, again, other = tiny_model("llava", seed=1), tiny_model("llava", seed=1), tiny_model("llava", seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), again.model.parameters()))
    assert not torch.equal(first.model.lm_head.weight, other.model.lm_head.weight)


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="no tiny model for family 'gpt2'"):
        tiny_model("gpt2")


def test_load_model_from_a_saved_checkpoint(tmp_path, llava):
    llava.model.save_pretrained(tmp_path)
    llava.processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", system_prompt=None)  # the tiny template has none
    assert type(loaded) is type(llava) and loaded.fit == "pad"
    assert all(torch.equal(a, b) for a, b in zip(llava.model.parameters(), loaded.model.parameters()))
    sample = [make_sample(0, (30, 50))]
    expected = llava.generate(sample, ["the dog"], max_new_tokens=3, capture=None)[0]
    assert loaded.generate(sample, ["the dog"], max_new_tokens=3, capture=None)[0].token_ids == expected.token_ids


def test_load_model_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="no adapter for model type 'bert'"):
        load_model(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match="hf download someone/not-cached-model"):
        load_model("someone/not-cached-model")
    # Not offline, but the hub cannot be reached: the same advice at once, not after half a minute of retries.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    started = time.monotonic()
    with pytest.raises(UserError, match="hub.invalid cannot be reached.*hf download someone/not-cached-model"):
        load_model("someone/not-cached-model")
    assert time.monotonic() - started < 10
    with pytest.raises(ValueError, match="non-empty str"):
        load_model("")
    with pytest.raises(ValueError, match="unknown tiny model 'tiny-gpt'"):
        load_model("tiny-gpt")


# ------------------------------------------------------------------------------------------------
# prompts and image-token layouts
# ------------------------------------------------------------------------------------------------
def test_llava_layout_is_one_5x5_run_in_each_padded_row(llava):
    images = [make_sample(i, s).load_image() for i, s in enumerate([(30, 50), (64, 48)])]
    batch = llava.prepare(images, ["the cat", "what color is the dog on the left of the table ?"])
    ids = batch.inputs["input_ids"]
    assert batch.inputs["attention_mask"][0, 0] == 0 and batch.inputs["attention_mask"][:, -1].all()  # left padding
    for row, layout in enumerate(batch.layouts):
        assert (layout.geometry.grid_h, layout.geometry.grid_w) == (5, 5)
        assert layout.geometry.fit == "pad"
        span = ids[row, layout.span_start : layout.span_start + layout.span_len]
        assert layout.span_len == 25 and bool((span == llava.image_token_id).all())
        assert torch.equal(layout.grid_index, torch.arange(25))
    assert batch.layouts[0].span_start > batch.layouts[1].span_start
    assert batch.prompt_texts[0].startswith("USER: <image>\nthe cat") and batch.prompt_texts[0].endswith("ASSISTANT:")


def test_qwen_layout_follows_image_grid_thw(qwen):
    images = [make_sample(0, (84, 140)).load_image(), make_sample(1, (112, 84)).load_image()]
    batch = qwen.prepare(images, ["the cat", "the dog"])
    thw = batch.inputs["image_grid_thw"]
    for row, layout in enumerate(batch.layouts):
        assert (layout.geometry.grid_h, layout.geometry.grid_w) == (int(thw[row, 1]) // 2, int(thw[row, 2]) // 2)
        assert layout.geometry.fit == "resize"
        assert layout.span_len == layout.geometry.grid_h * layout.geometry.grid_w
    # smart_resize keeps the aspect: 84x140 -> 84x140 px -> 3x5 tokens of 28 px
    assert (batch.layouts[0].geometry.grid_h, batch.layouts[0].geometry.grid_w) == (3, 5)
    assert "<|vision_start|><|image_pad|>" in batch.prompt_texts[0]


def test_llava_next_layout_drops_row_newlines():
    adapter = tiny_model("llava_next")
    images = [make_sample(0, (30, 50)).load_image()]
    batch = adapter.prepare(images, ["the cat"])
    layout = batch.layouts[0]
    rows, cols = anyres_grid_shape((30, 50), adapter.grid_pinpoints, adapter.tile_size, adapter.patch_size)
    assert (layout.geometry.grid_h, layout.geometry.grid_w) == (rows, cols)
    assert layout.span_len == 25 + rows * (cols + 1)
    newline_offsets = {25 + r * (cols + 1) + cols for r in range(rows)}
    assert newline_offsets.isdisjoint(set(layout.grid_index.tolist()))
    assert set(layout.grid_index.tolist()).isdisjoint(range(25))  # the base view's 5 x 5 tokens get no map
    generation = adapter.generate([make_sample(0, (30, 50))], ["the cat"], max_new_tokens=2, capture="reference")[0]
    assert generation.maps.shape == (2, rows, cols)


def test_image_token_span_errors():
    ids = torch.tensor([[1, 7, 7, 7, 2], [1, 7, 2, 7, 2], [1, 2, 3, 4, 5]])
    assert image_token_span(ids, 7, row=0) == (1, 3)
    with pytest.raises(ValueError, match="not one contiguous run"):
        image_token_span(ids, 7, row=1)
    with pytest.raises(ValueError, match="row 2 of input_ids .* holds no image token"):
        image_token_span(ids, 7, row=2)
    with pytest.raises(ValueError, match="outside input_ids"):
        image_token_span(ids, 7, row=3)


def test_prompt_without_image_token_is_rejected(llava):
    """A chat template that drops the image gives a clear error, not a shifted map."""
    inputs = llava._encode(None, [llava.format_prompt("the cat", with_image=False)])
    with pytest.raises(ValueError, match="holds no image token"):
        llava._layout(inputs, 0, (30, 50))


# ------------------------------------------------------------------------------------------------
# image geometry
# ------------------------------------------------------------------------------------------------
def test_llava_hf_crop_processor_is_switched_to_square_padding():
    """llava-hf ships a CLIPImageProcessor (centre crop); the adapter pads like the published LLaVA."""
    from transformers import CLIPImageProcessor
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor

    class Holder:
        image_processor = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40})

    holder = Holder()
    assert configure_llava_image_processor(holder, pad_to_square=False) == "crop"
    assert configure_llava_image_processor(holder, pad_to_square=True) == "pad"
    assert isinstance(holder.image_processor, LlavaImageProcessor) and holder.image_processor.do_pad
    image = make_sample(0, (30, 50)).load_image()
    mean = tuple(int(x * 255) for x in holder.image_processor.image_mean)
    square = Image.new("RGB", (50, 50), mean)
    square.paste(image, (0, 10))  # expand2square: the image centred vertically
    padded = holder.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    manual = holder.image_processor(images=[square], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(padded, manual, rtol=0, atol=1e-5)


def test_geometry_maps_grid_to_pixels():
    pad = ImageGeometry(4, 4, 30, 50, "pad")  # 50x50 square, 10 px of padding on top
    assert pad.grid_to_image(0, 0) == (-10.0, 0.0)
    assert pad.grid_to_image(4, 4) == (40.0, 50.0)
    assert pad.cell_box(1, 2) == (25.0, 2.5, 37.5, 15.0)
    crop = ImageGeometry(4, 4, 30, 50, "crop")  # central 30x30 square, starting at x = 10
    assert crop.grid_to_image(0, 0) == (0.0, 10.0) and crop.grid_to_image(4, 4) == (30.0, 40.0)
    resize = ImageGeometry(3, 5, 84, 140, "resize")  # each cell is 28x28 px
    assert resize.cell_box(2, 4) == (112.0, 56.0, 140.0, 84.0)
    with pytest.raises(ValueError, match="fit must be one of"):
        ImageGeometry(2, 2, 10, 10, "stretch")
    with pytest.raises(ValueError, match="grid_h must be a positive int"):
        ImageGeometry(0, 2, 10, 10, "pad")
    with pytest.raises(ValueError, match="outside the 3x5 grid"):
        resize.cell_box(3, 0)


# ------------------------------------------------------------------------------------------------
# generation API
# ------------------------------------------------------------------------------------------------
def test_generation_fields_and_batching(qwen):
    samples = [make_sample(i, s) for i, s in enumerate([(84, 140), (112, 84), (100, 100)])]
    prompts = ["the cat", "what is on the table ?", "identify the red car in the scene ."]
    whole = qwen.generate(samples, prompts, max_new_tokens=3, capture="reference", batch_size=3)
    split = qwen.generate(samples, prompts, max_new_tokens=3, capture="reference", batch_size=2)
    for generation, other, sample, prompt in zip(whole, split, samples, prompts):
        assert isinstance(generation, Generation)
        assert generation.sample_id == sample.id and generation.prompt == prompt
        grid = (generation.geometry.grid_h, generation.geometry.grid_w)
        assert generation.maps.shape == (len(generation.token_ids), *grid)
        assert generation.text == qwen.tokenizer.decode(generation.token_ids, skip_special_tokens=True)
        assert all(word.isalpha() or word in ".,?!:;'\"()-/" for word in generation.text.split())
        assert (generation.geometry.image_h, generation.geometry.image_w) == sample.image_size
        assert generation.timings["capture"] == "reference"
        assert 0.0 <= generation.timings["capture_s"] <= generation.timings["generate_s"]
        assert other.token_ids == generation.token_ids
        torch.testing.assert_close(other.maps, generation.maps, rtol=0, atol=1e-5)


def test_chat_matches_uncaptured_generation(llava):
    sample = make_sample(0, (30, 50))
    generated = llava.generate([sample], ["the dog"], max_new_tokens=4, capture=None)[0]
    assert llava.chat(sample.load_image(), "the dog", 4) == generated.text  # as the hf judge calls it
    text_only = llava.chat(None, "is there a dog ?", max_new_tokens=3)
    assert isinstance(text_only, str) and len(text_only.split()) == 3
    with pytest.raises(ValueError, match="for every prompt or for none"):
        llava.chat_batch([sample.load_image(), None], ["a", "b"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(capture="eager"), "capture must be"),
        (dict(batch_size=0), "batch_size"),
        (dict(first_token_row="first"), "first_token_row"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
    ],
)
def test_generate_rejects_bad_arguments(llava, kwargs, message):
    options = dict(max_new_tokens=2, capture="fused")
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        llava.generate([make_sample(0, (30, 50))], ["the cat"], **options)


def test_generate_needs_one_prompt_per_sample(llava):
    with pytest.raises(ValueError, match="got 1 samples but 2 prompts"):
        llava.generate([make_sample(0, (30, 50))], ["a", "b"], max_new_tokens=2)


def test_sampling_is_seeded(llava):
    samples = [make_sample(0, (30, 50))]
    kwargs = dict(max_new_tokens=4, capture=None, do_sample=True, temperature=5.0, seed=7)
    first = llava.generate(samples, ["the cat"], **kwargs)[0]
    second = llava.generate(samples, ["the cat"], **kwargs)[0]
    assert first.token_ids == second.token_ids


# ------------------------------------------------------------------------------------------------
# SDPA backends while generating
# ------------------------------------------------------------------------------------------------
def test_generation_leaves_cudnn_out_of_sdpa_on_cuda_only_unless_asked():
    from pixfound.models.base import generation_sdpa_backends

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with generation_sdpa_backends(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before  # restored
    for device, allow in ((torch.device("cuda"), True), (torch.device("cpu"), False)):
        with generation_sdpa_backends(device, allow):
            assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_generate_runs_inside_the_generation_sdpa_backends(monkeypatch, llava):
    from pixfound.models import base

    seen = []
    original = base.generation_sdpa_backends
    monkeypatch.setattr(base, "generation_sdpa_backends",
                        lambda device, cudnn_attention=False: seen.append((device.type, cudnn_attention))
                        or original(device, cudnn_attention))
    sample = make_sample(0, (30, 40))
    llava.generate([sample], ["what is it ?"], max_new_tokens=2, capture=None, cudnn_attention=True)
    llava.generate([sample], ["what is it ?"], max_new_tokens=2, capture="fused")
    assert seen == [("cpu", True), ("cpu", False)]



# ------------------------------------------------------------------------------------------------
# Qwen3-VL: the image-token layout
# ------------------------------------------------------------------------------------------------
def test_qwen3_vl_layout_and_deepstack_positions():
    """16 px patches merged 2x2; DeepStack adds its features at exactly the image-token positions."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    adapter = tiny_model("qwen3_vl")
    sizes = [(84, 140), (130, 70)]
    images = [make_sample(i, size).load_image() for i, size in enumerate(sizes)]
    batch = adapter.prepare(images, ["the cat", "what is on the left of the red table ?"])
    ids = batch.inputs["input_ids"]
    for row, (layout, (height, width)) in enumerate(zip(batch.layouts, sizes)):
        resized_h, resized_w = smart_resize(height, width, factor=32, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 48)
        assert (layout.geometry.grid_h, layout.geometry.grid_w) == (resized_h // 32, resized_w // 32)
        assert layout.geometry.fit == "resize"
        span = ids[row, layout.span_start : layout.span_start + layout.span_len]
        assert bool((span == adapter.image_token_id).all()) and layout.span_len == int(
            (ids[row] == adapter.image_token_id).sum())
    seen = []
    language_model = adapter.model.model.language_model
    original = language_model._deepstack_process

    def record(hidden_states, visual_pos_masks, visual_embeds):
        seen.append(visual_pos_masks.clone())
        return original(hidden_states, visual_pos_masks, visual_embeds)

    language_model._deepstack_process = record
    try:
        with torch.inference_mode():
            adapter.model(**batch.inputs)
    finally:
        del language_model._deepstack_process
    assert len(seen) == len(adapter.model.config.vision_config.deepstack_visual_indexes)
    expected = torch.zeros_like(ids, dtype=torch.bool)
    for row, layout in enumerate(batch.layouts):
        expected[row, layout.span_start : layout.span_start + layout.span_len] = True
    assert all(torch.equal(mask.cpu(), expected) for mask in seen)


# ------------------------------------------------------------------------------------------------
# native grounding (the published Qwen scripts' chat turn)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen25():
    return tiny_model("qwen2_5_vl")


def test_native_prompt_is_the_published_message_layout(qwen25):
    text = qwen25.native_prompt("Point to the dog, output its coordinates in point-format as JSON")
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\nPoint to the dog, output its coordinates in point-format as JSON"
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
    )
    qwen3 = tiny_model("qwen3_vl")
    assert qwen3.native_prompt("point to the dog") == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\npoint to the dog"
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_native_chat_frames_and_batching(family, qwen25):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    adapter = qwen25 if family == "qwen2_5_vl" else tiny_model(family)
    sizes = [(84, 140), (100, 100), (131, 57)]
    images = [make_sample(i, size).load_image() for i, size in enumerate(sizes)]
    prompts = ["point to the dog", "locate the red car on the left of the table", "the cat"]
    together = adapter.native_chat(images, prompts, max_new_tokens=4, batch_size=3)
    alone = [adapter.native_chat([image], [prompt], max_new_tokens=4)[0] for image, prompt in zip(images, prompts)]
    assert together == alone
    lengths = {len(adapter.tokenizer(adapter.native_prompt(p)).input_ids) for p in prompts}
    assert len(lengths) == 3  # the batch really was left padded
    for reply, (height, width) in zip(together, sizes):
        assert len(reply.text.split()) == 4 and all(word.isalpha() for word in reply.text.split())
        if family == "qwen3_vl":
            assert reply.frame_hw == (1000, 1000)
        else:  # the processor's input in pixels: image_grid_thw x 14, as the published scripts compute it
            assert reply.frame_hw == smart_resize(height, width, factor=28, min_pixels=28 * 28 * 4,
                                                  max_pixels=28 * 28 * 48)
    assert adapter.native_chat([], [], max_new_tokens=4) == []


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_native_chat_without_native_grounding_is_one_clear_line(family):
    adapter = tiny_model(family)
    with pytest.raises(UserError, match="no native grounding") as error:
        adapter.native_chat([make_sample(0, (30, 50)).load_image()], ["point to the dog"], max_new_tokens=2)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------
# LLaVA-1.5 7B and 13B: geometry from the checkpoint configuration (no weights)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers, hidden, heads, intermediate", [(32, 4096, 32, 11008), (40, 5120, 40, 13824)])
def test_llava_1_5_geometry_from_the_released_configuration(layers, hidden, heads, intermediate):
    """llava-1.5-7b-hf / llava-1.5-13b-hf: Vicuna text model, CLIP ViT-L/14-336, 576 image tokens in 24 x 24."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from pixfound.models.llava import LlavaAdapter
    from pixfound.models.tiny import llava_word_processor

    processor = llava_word_processor(image_size=336, patch_size=14)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                num_key_value_heads=heads, intermediate_size=intermediate, vocab_size=32064,
                                pad_token_id=processor.tokenizer.pad_token_id),
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    adapter = LlavaAdapter(model, processor, name="llava-1.5", system_prompt=None)
    assert adapter.num_layers == layers and adapter.grid_side == 24
    assert len(adapter.decoder.layers) == layers and adapter.decoder.layers[0].self_attn.q_proj.in_features == hidden
    sizes = [(480, 640), (500, 333)]
    batch = adapter.prepare([make_sample(i, s).load_image() for i, s in enumerate(sizes)],
                            ["the cat", "what color is the dog on the left ?"])
    assert batch.inputs["pixel_values"].shape == (2, 3, 336, 336)
    for layout, (height, width) in zip(batch.layouts, sizes):
        assert layout.span_len == 576 and torch.equal(layout.grid_index, torch.arange(576))
        assert layout.geometry == ImageGeometry(24, 24, height, width, "pad")
        # The 24 x 24 grid covers the padded max(H, W) square: cell (0, 0) starts above/left of a non-square image.
        side = max(height, width)
        assert layout.geometry.grid_to_image(0, 0) == (-((side - height) // 2), -((side - width) // 2))


def test_every_model_type_resolves_to_its_adapter():
    from pixfound.models import KNOWN_CHECKPOINTS, _adapter_class

    for model_type, (family, _) in FAMILIES.items():
        assert _adapter_class(family).family == family, model_type
    for checkpoint in ("llava-hf/llava-1.5-13b-hf", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen3-VL-8B-Instruct",
                       "nyu-visionx/cambrian-8b"):
        assert checkpoint in KNOWN_CHECKPOINTS


def test_a_saved_qwen3_vl_checkpoint_loads_as_qwen3_vl(tmp_path):
    adapter = tiny_model("qwen3_vl")
    adapter.model.save_pretrained(tmp_path)
    adapter.processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert type(loaded) is type(adapter) and loaded.family == "qwen3_vl"
    sample = [make_sample(0, (84, 140))]
    expected = adapter.generate(sample, ["the dog"], max_new_tokens=3, capture="fused")[0]
    got = loaded.generate(sample, ["the dog"], max_new_tokens=3, capture="fused")[0]
    assert got.token_ids == expected.token_ids
    torch.testing.assert_close(got.maps, expected.maps, rtol=0, atol=1e-6)
