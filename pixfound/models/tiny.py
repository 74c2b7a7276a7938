"""Tiny random-weight MLLMs of each supported family, built in code (no download).

They are the real transformers classes (``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``) with small configs:
3 text layers, hidden 64, 4 query heads over 2 kv heads (grouped-query attention), a 2-layer
vision tower and a handful of image tokens. The tokenizer is a word-level ``tokenizers``
vocabulary of English words with the family's special tokens and chat template.

Weights are drawn so that greedy decoding is decisive: random tiny models tend to give
near-tied logits, and then the float noise of batch padding (or of eager vs SDPA attention)
flips the argmax. The LM head is scaled up (top-2 logit gaps of order 1, far above 1e-5 noise)
and special/function-word rows are scaled down, so answers are sequences of real nouns and
adjectives that spaCy can chunk.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

# Word-level vocabulary (lower case; the tokenizer lower-cases its input).
_NOUNS = """
person man woman boy girl child people player dog cat bird horse cow sheep elephant bear zebra giraffe
car bus truck train bicycle motorcycle airplane boat bench chair couch bed table desk door window wall
floor roof house building tree flower plant grass sky cloud sun moon road street sign light pole fence
bridge river lake sea water beach sand mountain hill rock field ball kite umbrella bag bottle cup glass
plate bowl fork knife spoon apple banana orange pizza cake sandwich book clock vase phone laptop keyboard
mouse screen television lamp mirror picture box basket hat shirt shoe jacket hand head face eye ear nose
mouth hair leg arm foot square circle triangle rectangle star heart shape object scene image photo
background corner edge center side top bottom front back middle butterfly flag wheel toy animal food
""".split()
_ADJECTIVES = """
red green blue yellow black white gray brown pink purple dark bright small large big little tall short
long round flat open closed empty full old new young wooden metal plastic striped shiny left right
""".split()
_DETERMINERS = ["the", "a", "an", "two", "three", "some"]
_FUNCTION_WORDS = """
is are there what which where how many of and or not yes no does do can see this that it its to on at by
for under above below behind near next between inside outside facing sitting standing walking running
holding looking lying eating playing wearing riding parked flying
""".split()
# Words that prompts and chat templates use but answers should not (never or rarely generated).
_PROMPT_WORDS = """
color you visible direction position closer farther camera number count one four five six seven eight nine
ten zero identify in scene options option answer with letter from given choices directly b c d e f s user
assistant system helpful chat curious human artificial intelligence gives detailed polite answers
questions question describe picture please
""".split()
_PUNCTUATION = list(".,?!:;'\"()-/")

# Scale of each LM-head row by word class: nouns win most often, then modifiers, function words and
# punctuation (which split noun phrases); prompt-only words rarely, special tokens never.
_ROW_SCALE = {"noun": 1.0, "adjective": 0.85, "determiner": 0.9, "function": 0.75, "punctuation": 0.8,
              "prompt": 0.3}
# Weight std = gain / sqrt(fan_in). The text gain is well above the usual 0.02 * sqrt(fan_in), so
# attention is peaked rather than uniform; the LM-head gain gives logits of std ~4.
_LM_HEAD_GAIN = 4.0
_TEXT_GAIN = 1.2
_VISION_GAIN = 0.8


def _word_classes() -> dict[str, str]:
    classes: dict[str, str] = {}
    for words, kind in (
        (_NOUNS, "noun"),
        (_ADJECTIVES, "adjective"),
        (_DETERMINERS, "determiner"),
        (_FUNCTION_WORDS, "function"),
        (_PUNCTUATION, "punctuation"),
        (_PROMPT_WORDS, "prompt"),
    ):
        for word in words:
            classes.setdefault(word, kind)
    return classes


def build_word_tokenizer(
    special_tokens: list[str],
    *,
    eos_token: str,
    pad_token: str,
    bos_token: str | None = None,
    extra_special_tokens: dict[str, str] | None = None,
) -> Any:
    """A left-padding fast tokenizer over the fixed English vocabulary plus ``special_tokens``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    unk = "<unk>"
    vocab: dict[str, int] = {}
    for token in [unk, *special_tokens, *_word_classes()]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.add_special_tokens([unk, *special_tokens])
    kwargs: dict[str, Any] = dict(
        tokenizer_object=backend,
        unk_token=unk,
        eos_token=eos_token,
        pad_token=pad_token,
        padding_side="left",
    )
    if bos_token is not None:
        kwargs["bos_token"] = bos_token
    if extra_special_tokens:
        kwargs["extra_special_tokens"] = extra_special_tokens
    return PreTrainedTokenizerFast(**kwargs)


def _init_weights(model: torch.nn.Module, tokenizer: Any, generator: torch.Generator,
                  text_prefixes: tuple[str, ...] = ("model.language_model",)) -> None:
    """Redraw the weights: peaked attention, decisive LM head biased toward content words."""
    classes = _word_classes()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2:
                continue  # norms and biases keep their defaults
            in_text = name.startswith(text_prefixes)
            fan_in = param[0].numel()
            std = (_TEXT_GAIN if in_text else _VISION_GAIN) / fan_in**0.5
            param.copy_(torch.randn(param.shape, generator=generator) * std)
        head = model.get_output_embeddings().weight
        head.copy_(torch.randn(head.shape, generator=generator) * (_LM_HEAD_GAIN / head.shape[1] ** 0.5))
        vocab = tokenizer.get_vocab()
        scale = torch.zeros(head.shape[0])
        for token, index in vocab.items():
            scale[index] = _ROW_SCALE[classes[token]] if token in classes else 0.0
        head.mul_(scale[:, None])


def _finish(model: torch.nn.Module, tokenizer: Any) -> torch.nn.Module:
    config = model.generation_config
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.do_sample = False
    config.temperature = None
    config.top_p = None
    config.top_k = None
    return model.float().eval()


def _text_config_kwargs(vocab_size: int, tokenizer: Any) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


# LLaVA-style template of llava-hf: the system text without a role, then "USER: <image>\n... ASSISTANT:".
_LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# The turns of the Qwen chat templates (text and images in the order given).
_QWEN_TURNS = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2-VL and Qwen2.5-VL add a default system message.
_QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    + _QWEN_TURNS
)

# Vision tower of the LLaVA family: 40 px images in 8 px patches -> a 5x5 grid (+ CLS, dropped).
_LLAVA_IMAGE_SIZE = 40
_LLAVA_PATCH = 8


def _clip_vision_config(image_size: int = _LLAVA_IMAGE_SIZE, patch_size: int = _LLAVA_PATCH) -> Any:
    """A 2-layer, width-32 CLIP vision tower (LLaVA reads its second-to-last layer)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )


def _llava_tokenizer() -> Any:
    return build_word_tokenizer(
        ["<s>", "</s>", "<pad>", "<image>"],
        eos_token="</s>",
        pad_token="<pad>",
        bos_token="<s>",
        extra_special_tokens={"image_token": "<image>"},
    )


def llava_word_processor(image_size: int, patch_size: int) -> Any:
    """A LLaVA-1.5 processor over the in-code word tokenizer: chat template, pad-to-square images.

    ``(image_size // patch_size) ** 2`` image tokens per image. The processor's tokenizer is
    ``processor.tokenizer``. Used by the random builders here and by the GPU benchmark.
    """
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor
    from transformers.models.llava.processing_llava import LlavaProcessor

    image_processor = LlavaImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_pad=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=_llava_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=_LLAVA_TEMPLATE,
        num_additional_image_tokens=1,
    )


def tiny_llava(seed: int = 0) -> Any:
    """Tiny LLaVA-1.5: CLIP vision (5x5 patch grid), Llama text with GQA; pads images to a square."""
    return build_random_llava(seed)


def build_random_llava(
    seed: int = 0,
    *,
    text_layers: int = 3,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    image_size: int = _LLAVA_IMAGE_SIZE,
    patch_size: int = _LLAVA_PATCH,
    name: str = "tiny-llava",
) -> Any:
    """A random-weight LLaVA-1.5 of any size (``tiny_llava`` uses the defaults).

    ``(image_size // patch_size) ** 2`` image tokens: ``image_size=336, patch_size=14`` gives
    LLaVA-1.5's 576. The vision tower stays small (2 layers, width 32); the benchmarks scale
    the text model with ``text_layers``, ``hidden_size`` and the head counts.
    """
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from pixfound.models.llava import LlavaAdapter

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads}), and num_heads a multiple "
            f"of num_kv_heads ({num_kv_heads})"
        )
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    processor = llava_word_processor(image_size, patch_size)
    tokenizer = processor.tokenizer
    vocab_size = len(tokenizer.get_vocab())
    side = image_size // patch_size
    text = _text_config_kwargs(vocab_size, tokenizer)
    text.update(
        num_hidden_layers=text_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
        max_position_embeddings=max(1024, 2 * side * side + 512),
    )
    config = LlavaConfig(
        vision_config=_clip_vision_config(image_size, patch_size),
        text_config=LlamaConfig(**text),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=side * side,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = _build(LlavaForConditionalGeneration, config, tokenizer, seed)
    return LlavaAdapter(model, processor, name=name, system_prompt=None)


def tiny_llava_next(seed: int = 0) -> Any:
    """Tiny LLaVA-NeXT: 5x5 base view + anyres tiles of 40 px (pinpoints up to 80x80)."""
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_llava_next import LlavaNextImageProcessor
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    from pixfound.models.llava import LlavaNextAdapter

    tokenizer = _llava_tokenizer()
    vocab_size = len(tokenizer.get_vocab())
    tile = _LLAVA_IMAGE_SIZE
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [tile, 3 * tile], [3 * tile, tile]]
    config = LlavaNextConfig(
        vision_config=_clip_vision_config(),
        text_config=LlamaConfig(**_text_config_kwargs(vocab_size, tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_LLAVA_PATCH,
        vision_feature_select_strategy="default",
        chat_template=_LLAVA_TEMPLATE,
        num_additional_image_tokens=1,
    )
    model = _build(LlavaNextForConditionalGeneration, config, tokenizer, seed)
    return LlavaNextAdapter(model, processor, name="tiny-llava-next")


def tiny_qwen2_vl(seed: int = 0) -> Any:
    """Tiny Qwen2-VL: 14 px patches merged 2x2 (28 px tokens), at most 48 tokens; M-RoPE text with GQA."""
    return _tiny_qwen(seed, version="2")


def tiny_qwen2_5_vl(seed: int = 0) -> Any:
    """Tiny Qwen2.5-VL (windowed vision attention); same tokens and geometry as :func:`tiny_qwen2_vl`."""
    return _tiny_qwen(seed, version="2.5")


_QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                        "<|image_pad|>", "<|video_pad|>"]


def _tiny_qwen(seed: int, version: str) -> Any:
    import transformers
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from pixfound.models.qwen2_vl import Qwen2VLAdapter

    tokenizer = build_word_tokenizer(_QWEN_SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    vocab_size = len(tokenizer.get_vocab())
    text = _text_config_kwargs(vocab_size, tokenizer)
    text["bos_token_id"] = None
    # M-RoPE sections (temporal, height, width) must sum to head_dim / 2 = 64 / 4 / 2 = 8.
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    vision = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2":
        vision.update(embed_dim=32, hidden_size=text["hidden_size"])
        config_class, model_class, processor_class = (
            "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor")
        name = "tiny-qwen2-vl"
    else:
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=text["hidden_size"], window_size=56,
                      fullatt_block_indexes=[1])
        config_class, model_class, processor_class = (
            "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor")
        name = "tiny-qwen2.5-vl"
    ids = tokenizer.convert_tokens_to_ids
    config = getattr(transformers, config_class)(
        vision_config=vision,
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    pixels = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 48)
    processor = getattr(transformers, processor_class)(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=_QWEN_TEMPLATE,
    )
    model = _build(getattr(transformers, model_class), config, tokenizer, seed)
    return Qwen2VLAdapter(model, processor, name=name)


# Qwen3-VL's template adds no default system message.
_QWEN3_TEMPLATE = _QWEN_TURNS


def tiny_qwen3_vl(seed: int = 0) -> Any:
    """Tiny Qwen3-VL: 16 px patches merged 2x2 (32 px tokens), at most 48 tokens; DeepStack features added
    after the first decoder layer; interleaved M-RoPE text with GQA."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from pixfound.models.qwen2_vl import Qwen3VLAdapter

    tokenizer = build_word_tokenizer(_QWEN_SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    text = _text_config_kwargs(len(tokenizer.get_vocab()), tokenizer)
    text.update(bos_token_id=None, head_dim=16)
    # Interleaved M-RoPE sections (temporal, height, width) sum to head_dim / 2 = 8.
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                               "mrope_interleaved": True}
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text["hidden_size"],
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    pixels = dict(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 48)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2, **pixels),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2),
        chat_template=_QWEN3_TEMPLATE,
    )
    model = _build(Qwen3VLForConditionalGeneration, config, tokenizer, seed)
    return Qwen3VLAdapter(model, processor, name="tiny-qwen3-vl")


_LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>", "<|reserved_special_token_0|>"]


def _cambrian_tokenizer() -> Any:
    """A word tokenizer with LLaMA-3's special tokens that, like LLaMA-3's, starts every encoding with BOS."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = build_word_tokenizer(_LLAMA3_SPECIAL_TOKENS, eos_token="<|eot_id|>", pad_token="<|end_of_text|>",
                                     bos_token="<|begin_of_text|>")
    bos = "<|begin_of_text|>"
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))])
    return tokenizer


def tiny_cambrian(seed: int = 0) -> Any:
    """Tiny Cambrian-1: four small towers of the published kinds (a SigLIP-style timm ViT with 7x7 tokens
    resized to 6x6, CLIP with 6x6, DINOv2 with 7x7, a 4-stage timm ConvNeXt resized to 12x12), the
    aggregator with 36 queries in 2x2 ConvNeXt windows, and two in-decoder aggregators (after layers 0
    and 2) over a LLaMA text model with GQA. The image is a 6x6 grid, un-padded, a newline per row."""
    from pixfound.models.cambrian import (
        CambrianAdapter,
        CambrianConfig,
        CambrianForCausalLM,
        CambrianProcessor,
        IMAGE_TOKEN,
        RELEASED_IMAGE_PLACEHOLDER,
        llama3_conversation,
    )

    tokenizer = _cambrian_tokenizer()
    openai_mean, openai_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    towers = [
        dict(kind="siglip", name="tiny-siglip", token_len=36, image_size=28, pad_mean=openai_mean,
             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), release="tiny/siglip", release_format="open_clip",
             timm_kwargs=dict(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                              class_token=False, global_pool="map", act_layer="gelu_tanh")),
        dict(kind="clip", name="tiny-clip", token_len=36, image_size=24, pad_mean=openai_mean, mean=openai_mean,
             std=openai_std, select_layer=-2, release="tiny/clip", release_format="transformers",
             config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         image_size=24, patch_size=4, projection_dim=32)),
        dict(kind="dinov2", name="tiny-dinov2", token_len=36, image_size=28, pad_mean=(0.485, 0.456, 0.406),
             mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), release="tiny/dinov2",
             release_format="transformers",
             config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=28,
                         patch_size=4, use_swiglu_ffn=True)),
        dict(kind="convnext", name="tiny-convnext", token_len=144, image_size=48, pad_mean=openai_mean,
             mean=openai_mean, std=openai_std, multi_stage=True, release="tiny/convnext", release_format="open_clip",
             timm_kwargs=dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))),
    ]
    # The image starts after the system turn and the user header: where the in-decoder aggregators look.
    before_image = llama3_conversation("x").split(IMAGE_TOKEN)[0]
    text = _text_config_kwargs(len(tokenizer.get_vocab()), tokenizer)
    config = CambrianConfig(
        **text,
        vision_tower_specs=towers,
        mm_vision_tower_aux_token_len_list=[t["token_len"] for t in towers],
        mm_projector_type="sva",
        image_token_len=36,
        num_query_group=1,
        query_num_list=[36],
        connector_depth=2,
        vision_hidden_size=32,
        connector_only=False,
        num_of_vision_sampler_layers=2,
        start_of_vision_sampler_layers=0,
        stride_of_vision_sampler_layers=2,
        image_position=len(tokenizer(before_image).input_ids),
        image_aspect_ratio="pad",
        image_placeholder=RELEASED_IMAGE_PLACEHOLDER,
        image_token_index=tokenizer.convert_tokens_to_ids(RELEASED_IMAGE_PLACEHOLDER),
    )
    config._attn_implementation = "sdpa"
    model = _build(CambrianForCausalLM, config, tokenizer, seed, text_prefixes=("model.embed_tokens", "model.layers",
                                                                                 "model.norm", "lm_head"))
    processor = CambrianProcessor(tokenizer, towers, image_token_len=36, image_placeholder=RELEASED_IMAGE_PLACEHOLDER)
    return CambrianAdapter(model, processor, name="tiny-cambrian")


def _build(model_class: Any, config: Any, tokenizer: Any, seed: int,
           text_prefixes: tuple[str, ...] = ("model.language_model",)) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = model_class(config)
    _init_weights(model, tokenizer, generator, text_prefixes)
    return _finish(model, tokenizer)


TINY_BUILDERS: dict[str, Callable[[int], Any]] = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "qwen3_vl": tiny_qwen3_vl,
    "cambrian_llama": tiny_cambrian,
    "cambrian": tiny_cambrian,
}
