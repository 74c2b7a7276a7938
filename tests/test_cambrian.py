"""Cambrian-1: the released checkpoint's parameter names, the published prompt, tokenisation, image
processing and un-padded geometry, and loading a checkpoint folder by name (towers from their releases)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from pixfound.models import load_model, tiny_model
from pixfound.models.cambrian import (
    CambrianConfig,
    CambrianForCausalLM,
    llama3_conversation,
    unpadded_grid,
)
from random_samples import random_image_sample

pytest.importorskip("timm")

TOWER_PREFIX = "model.vision_tower_aux_list."


@pytest.fixture(scope="module")
def cambrian():
    return tiny_model("cambrian")


def make_sample(index: int, size: tuple[int, int]):
    return random_image_sample(index, size, seed_base=3000, id_prefix="c")


# ------------------------------------------------------------------------------------------------
# The published structure, written down from cambrian/model (cambrian_arch.py, vision_sampler.py,
# language_model/cambrian_llama.py): the names and shapes of what the released checkpoint holds
# ------------------------------------------------------------------------------------------------
def published_names(c: dict, tower_widths: list[int], tower_token_sides: list[int]) -> dict[str, tuple]:
    h, v, layers = c["hidden_size"], c["vision_hidden_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    names = {"lm_head.weight": (c["vocab_size"], h), "model.embed_tokens.weight": (c["vocab_size"], h),
             "model.norm.weight": (h,), "model.vision_query": (c["num_query_group"], v), "model.image_newline": (h,)}
    for i in range(layers):  # LlamaDecoderLayer
        p = f"model.layers.{i}."
        names.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                      p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                      p + "mlp.gate_proj.weight": (c["intermediate_size"], h),
                      p + "mlp.up_proj.weight": (c["intermediate_size"], h),
                      p + "mlp.down_proj.weight": (h, c["intermediate_size"]),
                      p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    # mm_projector = Sequential(Linear(v * G, h), GELU, Linear(h, h))
    names.update({"model.mm_projector.0.weight": (h, v * c["num_query_group"]), "model.mm_projector.0.bias": (h,),
                  "model.mm_projector.2.weight": (h, h), "model.mm_projector.2.bias": (h,)})
    # mm_projector_aux_i = Sequential(Linear(tower, v), GELU, Linear(v, v), LayerNorm(v))
    for i, width in enumerate(tower_widths):
        p = f"model.mm_projector_aux_{i}."
        names.update({p + "0.weight": (v, width), p + "0.bias": (v,), p + "2.weight": (v, v), p + "2.bias": (v,),
                      p + "3.weight": (v,), p + "3.bias": (v,)})

    def sampler(prefix: str, q_dim: int, depth: int, query_side: int) -> None:
        # VisionTokenSampler -> layers.j = VisionCrossAttentionLayer(q_dim, context v, kv [v]*n, windows, v)
        for j in range(depth):
            p = f"{prefix}.layers.{j}."
            names.update({p + "proj_context.weight": (v, v), p + "proj_in.weight": (v, q_dim + v),
                          p + "proj_out.linear_1.weight": (v, v), p + "proj_out.linear_2.weight": (q_dim, v),
                          p + "norm.weight": (v,), p + "norm.bias": (v,),
                          p + "cross_attn.q_proj.0.weight": (v,), p + "cross_attn.q_proj.0.bias": (v,),
                          p + "cross_attn.q_proj.1.weight": (v, v), p + "cross_attn.o_proj.weight": (v, v)})
            for t, side in enumerate(tower_token_sides):
                for kind in ("k", "v"):
                    names.update({p + f"cross_attn.{kind}_proj_{t}.0.weight": (v,),
                                  p + f"cross_attn.{kind}_proj_{t}.0.bias": (v,),
                                  p + f"cross_attn.{kind}_proj_{t}.1.weight": (v, v)})
                window = side // query_side
                if window > 1:
                    names[p + f"pos_embed_{t}"] = (window * window, v)

    for g, query_num in enumerate(c["query_num_list"]):
        sampler(f"model.vision_sampler_{g}", v, c["connector_depth"], int(query_num**0.5))
    if not c["connector_only"]:
        for k in range(c["num_of_vision_sampler_layers"]):
            sampler(f"model.vision_sampler_layers.{k}", h, 1, int(c["image_token_len"] ** 0.5))
    return names


def _own_names(model: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(TOWER_PREFIX)}


def test_tiny_cambrian_has_the_published_parameter_names(cambrian):
    c = cambrian.model.config.to_dict()
    towers = cambrian.model.model.vision_tower_aux_list
    expected = published_names(c, [t.hidden_size for t in towers], [t.token_side for t in towers])
    assert _own_names(cambrian.model) == expected
    assert [t.hidden_size for t in towers] == [32, 32, 32, 8 + 16 + 24 + 32]  # ConvNeXt: all 4 stages


# The released nyu-visionx/cambrian-8b configuration (scripts/cambrian/finetune_cambrian_8b.sh and LLaMA-3-8B).
CAMBRIAN_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    mm_vision_tower_aux_list=["siglip/CLIP-ViT-SO400M-14-384", "openai/clip-vit-large-patch14-336",
                              "facebook/dinov2-giant-res378", "clip-convnext-XXL-multi-stage"],
    mm_vision_tower_aux_token_len_list=[576, 576, 576, 9216], image_token_len=576, num_query_group=1,
    query_num_list=[576], connector_depth=3, vision_hidden_size=1024, connector_only=False,
    num_of_vision_sampler_layers=10, start_of_vision_sampler_layers=0, stride_of_vision_sampler_layers=3,
    image_position=91, mm_projector_type="sva", mm_vision_select_layer=-2, image_token_index=128002,
)


def test_cambrian_8b_has_the_released_names_and_shapes():
    """Built on the meta device from the released configuration: every name and shape of the checkpoint's
    LLM, projectors and aggregators; the towers carry their own releases' names."""
    with torch.device("meta"):
        model = CambrianForCausalLM(CambrianConfig(**CAMBRIAN_8B))
    towers = model.model.vision_tower_aux_list
    assert [t.hidden_size for t in towers] == [1152, 1024, 1536, 384 + 768 + 1536 + 3072]
    assert [t.token_side for t in towers] == [24, 24, 24, 96]
    assert _own_names(model) == published_names(CAMBRIAN_8B, [t.hidden_size for t in towers], [24, 24, 24, 96])
    assert model.model.sampler_layer_indices == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    tower_names = [{k: tuple(v.shape) for k, v in t.vision_tower.state_dict().items()} for t in towers]
    siglip, clip, dino, convnext = tower_names
    assert siglip["pos_embed"] == (1, 729, 1152) and "blocks.26.mlp.fc2.weight" in siglip and "attn_pool.latent" in siglip
    assert any(k.endswith("encoder.layers.23.self_attn.q_proj.weight") for k in clip)
    assert dino["embeddings.position_embeddings"] == (1, 1370, 1536) and "encoder.layer.39.norm1.weight" in dino
    assert convnext["stages.2.blocks.29.conv_dw.weight"] == (1536, 1, 7, 7) and "head.norm.weight" in convnext


# ------------------------------------------------------------------------------------------------
# Prompt and tokenisation as the published scripts build them
# ------------------------------------------------------------------------------------------------
def published_llama3_prompt(question: str) -> str:
    """conv_templates['llama_3'].get_prompt() for [(USER, '<image>\\n' + question), (ASSISTANT, None)]."""
    system = ("You are Cambrian, a highly intelligent multimodal AI trained by NYU Vision X. \n    As a multimodal AI, "
              "you have the ability to process and analyze images. Whenever an image is present in the conversation, "
              "very carefully examine it and consider its content when formulating your response.\n    You should "
              "give concise responses to very simple questions, but provide thorough responses to more complex and "
              "open-ended questions. ")
    ret = f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>{system}<|eot_id|>"
    ret += f"<|start_header_id|>user<|end_header_id|><image>\n{question}<|eot_id|>"
    return ret + "<|start_header_id|>assistant<|end_header_id|>"


def published_tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = -200) -> list[int]:
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    input_ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    separated = [piece for pair in zip(chunks, [[image_token_index] * (offset + 1)] * len(chunks)) for piece in pair][:-1]
    for piece in separated:
        input_ids.extend(piece[offset:])
    return input_ids


def test_prompt_and_tokens_are_the_published_ones(cambrian):
    question = "Identify the red car in the scene."
    assert cambrian.format_prompt(question) == published_llama3_prompt(question) == llama3_conversation(question)
    image = make_sample(0, (30, 50)).load_image()
    batch = cambrian.prepare([image], [question])
    ids = batch.inputs["input_ids"][0].tolist()
    published = published_tokenizer_image_token(published_llama3_prompt(question), cambrian.tokenizer)
    assert published[:2] == [cambrian.tokenizer.bos_token_id] * 2  # the BOS the tokenizer adds, then the template's
    layout = batch.layouts[0]
    image_at = published.index(-200)
    expanded = published[:image_at] + [cambrian.image_token_id] * layout.span_len + published[image_at + 1 :]
    assert ids == expanded and layout.span_start == image_at
    assert image_at == cambrian.model.config.image_position  # where the in-decoder aggregators read the image


# ------------------------------------------------------------------------------------------------
# Image processing and the un-padded grid
# ------------------------------------------------------------------------------------------------
def published_unpad_feature_size(feature_width, feature_height, image_width, image_height):
    """get_unpad_feature_size of pixmmvp/inference/infer_pixfoundation_cambrian.py."""
    if image_width / image_height > feature_width / feature_height:
        new_h = int(image_height * (feature_width / image_width))
        height_padding, width_padding = (feature_height - new_h) // 2, 0
        return feature_width, feature_height - height_padding * 2, width_padding, height_padding
    new_w = int(image_width * (feature_height / image_height))
    width_padding = (feature_width - new_w) // 2
    return feature_width - width_padding * 2, feature_height, width_padding, 0


def test_unpadded_grid_is_the_published_geometry():
    rng = random.Random(0)
    sizes = [(480, 640), (640, 480), (333, 500), (24, 24), (1, 300), (300, 1)] + [
        (rng.randint(1, 2000), rng.randint(1, 2000)) for _ in range(300)]
    for height, width in sizes:
        new_w, new_h, _, _ = published_unpad_feature_size(24, 24, width, height)
        assert unpadded_grid(24, height, width) == (new_h, new_w), (height, width)


@pytest.mark.parametrize("size", [(30, 50), (64, 47), (40, 40)])
def test_layout_skips_the_row_newlines(cambrian, size):
    batch = cambrian.prepare([make_sample(0, size).load_image()], ["the cat"])
    layout = batch.layouts[0]
    new_w, new_h, _, _ = published_unpad_feature_size(6, 6, size[1], size[0])
    assert (layout.geometry.grid_h, layout.geometry.grid_w) == (new_h, new_w)
    assert layout.span_len == new_h * (new_w + 1)
    # The published reading: reshape(rows, cols + 1)[:, :-1].
    expected = torch.arange(layout.span_len).reshape(new_h, new_w + 1)[:, :-1].flatten()
    assert torch.equal(layout.grid_index, expected)
    assert layout.geometry.fit == "resize" and layout.geometry.published_fit == "pad"
    generation = cambrian.generate([make_sample(0, size)], ["the cat"], max_new_tokens=2, capture="fused")[0]
    assert generation.maps.shape == (2, new_h, new_w)


def test_pixels_per_tower_are_the_published_processing(cambrian):
    image = make_sample(0, (30, 50)).load_image()
    pixels = cambrian.processor.pixel_values([image])
    for spec, tower_pixels in zip(cambrian.processor.specs, pixels):
        colour = tuple(int(x * 255) for x in spec["pad_mean"])
        square = Image.new("RGB", (50, 50), colour)
        square.paste(image, (0, 10))  # expand2square
        resized = np.asarray(square.resize((spec["image_size"],) * 2, Image.BICUBIC), dtype=np.float32) / 255
        expected = (resized - np.asarray(spec["mean"], dtype=np.float32)) / np.asarray(spec["std"], dtype=np.float32)
        torch.testing.assert_close(tower_pixels[0], torch.from_numpy(expected).permute(2, 0, 1), rtol=0, atol=1e-6)
    assert tuple(int(x * 255) for x in cambrian.processor.specs[0]["pad_mean"]) == (122, 116, 104)


def test_in_decoder_aggregators_change_only_the_image_tokens(cambrian):
    """After each aggregator layer only the image tokens' hidden states (newlines kept) are replaced."""
    batch = cambrian.prepare([make_sample(i, s).load_image() for i, s in enumerate([(30, 50), (40, 40)])],
                             ["the cat", "what is on the left of the red table ?"])
    model = cambrian.model.model
    before, after = [], []  # each layer's output before and after the aggregator's hook
    handles = [model.layers[i].register_forward_hook(lambda m, a, o: after.append(o.clone()))
               for i in model.sampler_layer_indices]
    handles += [model.layers[i].register_forward_hook(lambda m, a, o: before.append(o.clone()), prepend=True)
                for i in model.sampler_layer_indices]
    try:
        with torch.inference_mode():
            cambrian.model(**batch.inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert len(before) == len(after) == len(model.sampler_layer_indices) == 2
    for b_state, a_state in zip(before, after):
        changed = (b_state != a_state).any(dim=-1)
        for row, layout in enumerate(batch.layouts):
            expected = torch.zeros(changed.shape[1], dtype=torch.bool)
            expected[layout.span_start + layout.grid_index] = True
            assert torch.equal(changed[row], expected)


# ------------------------------------------------------------------------------------------------
# Loading a checkpoint folder by the released names; towers from their release formats
# ------------------------------------------------------------------------------------------------
def test_load_model_reads_the_released_layout(tmp_path, cambrian):
    from safetensors.torch import load_file, save_file

    model = cambrian.model
    checkpoint = tmp_path / "cambrian"
    released = {k: v for k, v in model.state_dict().items() if not k.startswith(TOWER_PREFIX)}
    model.save_pretrained(checkpoint, state_dict=released)
    cambrian.tokenizer.save_pretrained(checkpoint)
    tower_paths = {}
    for tower in model.model.vision_tower_aux_list:
        folder = tmp_path / tower.kind
        folder.mkdir(exist_ok=True)
        own = {k: v.contiguous() for k, v in tower.vision_tower.state_dict().items()}
        if tower.spec["release_format"] == "open_clip":  # the whole CLIP model; the tower is visual.trunk
            state = {"visual.trunk." + k: v for k, v in own.items()} | {"logit_scale": torch.ones(())}
            save_file(state, str(folder / "open_clip_model.safetensors"))
        else:  # a transformers release: config.json and weights
            tower.vision_tower.save_pretrained(folder)
        tower_paths[tower.kind] = folder
    assert not any(k.startswith(TOWER_PREFIX) for k in load_file(str(checkpoint / "model.safetensors")))
    loaded = load_model(str(checkpoint), device="cpu", tower_paths=tower_paths)
    assert type(loaded) is type(cambrian) and loaded.family == "cambrian"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    samples = [make_sample(i, s) for i, s in enumerate([(30, 50), (64, 47)])]
    prompts = ["the dog", "what color is the car ?"]
    expected = cambrian.generate(samples, prompts, max_new_tokens=3, capture="fused")
    got = loaded.generate(samples, prompts, max_new_tokens=3, capture="fused")
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert all(torch.equal(g.maps, e.maps) for g, e in zip(got, expected))


def test_missing_tower_weights_say_how_to_get_them(tmp_path, cambrian, monkeypatch):
    from pixfound.errors import MissingFileError

    model = cambrian.model
    checkpoint = tmp_path / "cambrian"
    model.save_pretrained(checkpoint, state_dict={k: v for k, v in model.state_dict().items()
                                                  if not k.startswith(TOWER_PREFIX)})
    cambrian.tokenizer.save_pretrained(checkpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MissingFileError, match="hf download tiny/siglip"):
        load_model(str(checkpoint), device="cpu")
