"""Cambrian-1 (``nyu-visionx/cambrian-8b``): four vision towers, the Spatial Vision Aggregator, LLaMA-3.

Built from the published architecture (github.com/cambrian-mllm/cambrian, ``cambrian/model``), with
the parameter names of the released checkpoint, so that its ``model-*.safetensors`` load by name.

Architecture (the released ``config.json`` values for Cambrian-8B in brackets)
---------------------------------------------------------------------------------
* Vision towers (``mm_vision_tower_aux_list``), each fed the image padded to a square with its
  processor's mean colour and resized to the tower's resolution:

  - SigLIP ViT-SO400M/14 at 384 px (open_clip's timm trunk): ``forward_features`` (27 x 27 tokens);
  - CLIP ViT-L/14 at 336 px (transformers): the second-to-last layer, CLS dropped (24 x 24);
  - DINOv2 giant at 378 px (transformers): the last hidden state, CLS dropped (27 x 27);
  - CLIP ConvNeXt-XXL at 1024 px (open_clip's timm trunk), "multi-stage": the 4 stage outputs,
    each resized to 96 x 96 and concatenated along channels.

  Token grids that differ from ``mm_vision_tower_aux_token_len_list`` [576, 576, 576, 9216] are
  resized bilinearly. The released checkpoint holds no tower weights: the published loader takes
  them from each tower's own release (:func:`load_released_towers`).
* ``mm_projector_aux_i``: Linear-GELU-Linear-LayerNorm from each tower to ``vision_hidden_size``
  [1024]. The mean over tower 0's tokens is the global context.
* Spatial Vision Aggregator (``vision_sampler_0``, ``connector_depth`` [3] layers): each of the
  ``image_token_len`` [576] learned queries (one ``vision_query`` per group) attends to its own
  window of every tower (1 x 1 for the 24 x 24 towers, 4 x 4 for ConvNeXt's 96 x 96), with the
  padding of the square masked out; ``mm_projector`` maps the result to the LLM's width.
* The 24 x 24 grid is un-padded to the image's aspect ratio (``unpad_image``) and every row gets
  one ``image_newline`` token: ``rows * (cols + 1)`` image tokens (the published PixFoundation
  script's ``new_feature_height * (new_feature_width + 1)``).
* LLaMA-3-8B. Unless ``connector_only`` [False], ``num_of_vision_sampler_layers`` [10] more
  aggregators run during the prefill after decoder layers ``start + k * stride`` [0, 3, ..., 27]:
  the hidden states of the image tokens (newlines kept) are the queries, the towers' un-padded
  windows the keys, and the result replaces them. The published code finds those tokens at the
  fixed position ``image_position`` [91] of the sequence; here the position is counted from each
  row's first (non-padding) token, which is the same for a single unpadded prompt. With a
  tokenizer that adds BOS (LLaMA-3's does), the published prompt below starts with two BOS and its
  image at position 92 (counted with LLaMA-3's tokenizer.model), so the published aggregators read
  one token early: the header token before the image and all but the last image token. This is
  reproduced as published, not corrected.

Prompt
------
``conv_templates["llama_3"]`` as the published PixFoundation scripts use it: the Cambrian system
message, ``<image>\\n`` before the question, no blank line after the headers; tokenised as
``tokenizer_image_token`` does (each side of ``<image>`` on its own; a BOS-led tokenizer keeps the
first chunk whole and drops the second chunk's first token). The image placeholder is a token id
of the vocabulary that is replaced by the image features before the decoder runs (the published
code uses -200, which cannot stay in ``input_ids`` through ``generate``).
"""
from __future__ import annotations

import inspect
import math
import pathlib
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from pixfound.models.base import ImageGeometry, ImageTokenLayout, VisionLanguageAdapter, image_token_span

__all__ = [
    "CAMBRIAN_SYSTEM_PROMPT",
    "CambrianAdapter",
    "CambrianConfig",
    "CambrianForCausalLM",
    "CambrianProcessor",
    "load_cambrian",
    "load_released_towers",
    "released_tower_spec",
    "unpad_slices",
]

#: The system message of ``conv_llama_3`` in the published ``cambrian/conversation.py``, byte for byte.
CAMBRIAN_SYSTEM_PROMPT = (
    "You are Cambrian, a highly intelligent multimodal AI trained by NYU Vision X. \n"
    "    As a multimodal AI, you have the ability to process and analyze images. Whenever an image is present in "
    "the conversation, very carefully examine it and consider its content when formulating your response.\n"
    "    You should give concise responses to very simple questions, but provide thorough responses to more "
    "complex and open-ended questions. "
)
IMAGE_TOKEN = "<image>"
# A reserved LLaMA-3 token stands for the image in input_ids (its embedding is never used).
RELEASED_IMAGE_PLACEHOLDER = "<|reserved_special_token_0|>"

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------
# The vision towers
# ------------------------------------------------------------------------------------------------
def released_tower_spec(name: str, token_len: int) -> dict:
    """The tower spec of one published tower name (``mm_vision_tower_aux_list`` entry).

    ``pad_mean`` is the mean colour ``process_images`` pads with (the tower processor's
    ``image_mean``; open_clip towers are wrapped in a ``ProcessorWrapper`` whose mean is CLIP's);
    ``mean``/``std`` normalise the pixels as the tower's own processor does.
    """
    from pixfound.errors import UserError

    lowered = name.lower()
    if lowered.startswith("siglip/clip-vit-so400m-14-384"):
        return dict(kind="siglip", name=name, token_len=token_len, image_size=384, pad_mean=_OPENAI_MEAN,
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), timm_model="vit_so400m_patch14_siglip_384",
                    release="timm/ViT-SO400M-14-SigLIP-384", release_format="open_clip")
    if lowered.startswith("openai/clip-vit-large-patch14-336"):
        return dict(kind="clip", name=name, token_len=token_len, image_size=336, pad_mean=_OPENAI_MEAN,
                    mean=_OPENAI_MEAN, std=_OPENAI_STD, select_layer=-2,
                    config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                hidden_act="quick_gelu", layer_norm_eps=1e-5),
                    release="openai/clip-vit-large-patch14-336", release_format="transformers")
    if lowered.startswith("facebook/dinov2-giant"):
        resolution = 378 if "res378" in lowered else 518
        return dict(kind="dinov2", name=name, token_len=token_len, image_size=resolution, pad_mean=_IMAGENET_MEAN,
                    mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
                    config=dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4,
                                use_swiglu_ffn=True, image_size=518, patch_size=14, layer_norm_eps=1e-6),
                    release="facebook/dinov2-giant", release_format="transformers")
    if lowered.startswith("clip-convnext-xxl"):
        return dict(kind="convnext", name=name, token_len=token_len, image_size=1024, pad_mean=_OPENAI_MEAN,
                    mean=_OPENAI_MEAN, std=_OPENAI_STD, multi_stage="multi-stage" in lowered,
                    timm_model="convnext_xxlarge",
                    release="laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup", release_format="open_clip")
    raise UserError(f"Cambrian vision tower {name!r} is not supported; supported: the four towers of Cambrian-8B")


def _timm() -> Any:
    try:
        import timm
    except ImportError as error:  # the SigLIP and ConvNeXt towers are timm models, as in open_clip
        from pixfound.errors import UserError

        raise UserError("Cambrian needs timm for its SigLIP and ConvNeXt towers: pip install 'pixfound[cambrian]'") \
            from error
    return timm


def _build_tower_module(spec: Mapping[str, Any]) -> nn.Module:
    kind = spec["kind"]
    if kind in ("siglip", "convnext"):
        timm = _timm()
        if "timm_model" in spec:  # as open_clip builds the trunk: no classifier
            return timm.create_model(spec["timm_model"], pretrained=False, num_classes=0)
        if kind == "siglip":
            from timm.models.vision_transformer import VisionTransformer

            return VisionTransformer(num_classes=0, **spec["timm_kwargs"])
        from timm.models.convnext import ConvNeXt

        return ConvNeXt(num_classes=0, **spec["timm_kwargs"])
    if kind == "clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        return CLIPVisionModel(CLIPVisionConfig(**spec["config"]))
    if kind == "dinov2":
        from transformers import Dinov2Config, Dinov2Model

        return Dinov2Model(Dinov2Config(**spec["config"]))
    raise ValueError(f"unknown Cambrian tower kind {kind!r}")


def _resize_tokens(features: torch.Tensor, side: int) -> torch.Tensor:
    """[B, n*n, C] tokens of a square grid, bilinearly resized to side x side (in float32, as published)."""
    batch, count, channels = features.shape
    current = math.isqrt(count)
    grid = features.view(batch, current, current, channels).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(side, side), mode="bilinear", align_corners=False).to(features.dtype)
    return grid.permute(0, 2, 3, 1).flatten(1, 2)


class CambrianVisionTower(nn.Module):
    """One tower (``vision_tower``: the release's own module) and how Cambrian reads its features."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__()
        self.spec = dict(spec)
        self.kind = spec["kind"]
        self.token_side = math.isqrt(int(spec["token_len"]))
        self.vision_tower = _build_tower_module(spec)
        if self.kind == "siglip":
            self.hidden_size = int(self.vision_tower.embed_dim)
        elif self.kind == "convnext":
            channels = [int(stage["num_chs"]) for stage in self.vision_tower.feature_info]
            self.hidden_size = sum(channels) if spec.get("multi_stage", True) else channels[-1]
        else:
            self.hidden_size = int(self.vision_tower.config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] → [B, token_len, hidden_size]."""
        parameter = next(self.vision_tower.parameters())
        pixels = pixels.to(device=parameter.device, dtype=parameter.dtype)
        if self.kind == "convnext":
            x = self.vision_tower.stem(pixels)
            stages = []
            for stage in self.vision_tower.stages:
                x = stage(x)
                stages.append(x)
            if not self.spec.get("multi_stage", True):
                stages = stages[-1:]
            side = self.token_side  # every stage is resized, also one of the right size (as published)
            resized = [F.interpolate(s.float(), size=(side, side), mode="bilinear", align_corners=False).to(s.dtype)
                       .flatten(2, 3).transpose(1, 2) for s in stages]
            return torch.cat(resized, dim=-1)
        if self.kind == "siglip":
            features = self.vision_tower.forward_features(pixels)
        elif self.kind == "clip":
            features = self._clip_hidden_state(pixels)[:, 1:]
        else:  # dinov2
            features = self.vision_tower(pixels).last_hidden_state[:, 1:]
        if features.shape[1] != self.token_side**2:
            features = _resize_tokens(features, self.token_side)
        return features

    def _clip_hidden_state(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP's ``hidden_states[select_layer]``: the embeddings (index 0) or the output of encoder layer
        ``index - 1``, read by a hook on that layer. (transformers' ``output_hidden_states`` collects through
        hooks that an enclosing model's ``output_attentions`` can install twice, shifting the indices.)"""
        model = getattr(self.vision_tower, "vision_model", self.vision_tower)  # transformers < 5 nests it
        layers = model.encoder.layers
        index = int(self.spec.get("select_layer", -2)) % (len(layers) + 1)
        if index == 0:
            return model.pre_layrnorm(model.embeddings(pixels))
        tapped: list[torch.Tensor] = []
        handle = layers[index - 1].register_forward_hook(
            lambda module, args, output: tapped.append(output[0] if isinstance(output, tuple) else output))
        try:
            self.vision_tower(pixels)
        finally:
            handle.remove()
        return tapped[0]


# ------------------------------------------------------------------------------------------------
# The Spatial Vision Aggregator (parameter names as in the published vision_sampler.py)
# ------------------------------------------------------------------------------------------------
class _GeluMLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden, bias=False)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class _CrossTowerRead(nn.Module):
    """Queries attend to the concatenated windows of all towers (keys and values projected per tower).

    (Not named *Attention*: transformers decides from such class names whether a model's attention
    implementation can be switched.)"""

    def __init__(self, q_dim: int, kv_dims: Sequence[int], hidden: int, heads: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"the aggregator width {hidden} is not a multiple of its {heads} heads")
        self.heads = heads
        self.q_proj = nn.Sequential(nn.LayerNorm(q_dim), nn.Linear(q_dim, hidden, bias=False))
        self.num_towers = len(kv_dims)
        for i, kv_dim in enumerate(kv_dims):
            setattr(self, f"k_proj_{i}", nn.Sequential(nn.LayerNorm(kv_dim), nn.Linear(kv_dim, hidden, bias=False)))
            setattr(self, f"v_proj_{i}", nn.Sequential(nn.LayerNorm(kv_dim), nn.Linear(kv_dim, hidden, bias=False)))
        self.o_proj = nn.Linear(hidden, q_dim, bias=False)

    def forward(self, queries: torch.Tensor, latents: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
                ) -> torch.Tensor:
        batch, q_len, _ = queries.shape
        keys = torch.cat([getattr(self, f"k_proj_{i}")(x) for i, x in enumerate(latents)], dim=1)
        values = torch.cat([getattr(self, f"v_proj_{i}")(x) for i, x in enumerate(latents)], dim=1)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], self.heads, -1).transpose(1, 2)

        # True = may attend; one mask row per query, shared by the heads.
        mask = torch.cat(list(masks), dim=-1)[:, None, None, :].expand(batch, 1, q_len, -1)
        out = F.scaled_dot_product_attention(heads(self.q_proj(queries)), heads(keys), heads(values), attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, q_len, -1))


class _AggregatorLayer(nn.Module):
    """One aggregation step: query + global context in, cross-attention to the windows, MLP, residual."""

    HEADS = 16  # fixed in the published layer

    def __init__(self, q_dim: int, context_dim: int, kv_dims: Sequence[int], window_sides: Sequence[int],
                 hidden: int) -> None:
        super().__init__()
        self.proj_context = nn.Linear(context_dim, hidden, bias=False)
        self.proj_in = nn.Linear(q_dim + hidden, hidden, bias=False)
        self.proj_out = _GeluMLP(hidden, hidden, q_dim)
        self.norm = nn.LayerNorm(hidden)
        self.cross_attn = _CrossTowerRead(hidden, kv_dims, hidden, self.HEADS)
        for i, side in enumerate(window_sides):
            if side > 1:  # a position per window cell, for windows of more than one token
                setattr(self, f"pos_embed_{i}", nn.Parameter(torch.randn(side**2, hidden)))

    def forward(self, queries: torch.Tensor, context: torch.Tensor, latents: Sequence[torch.Tensor],
                masks: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.proj_in(torch.cat([queries, self.proj_context(context)], dim=-1))
        positioned = [window + getattr(self, f"pos_embed_{i}")[None].to(window.dtype) if window.shape[1] > 1 else window
                      for i, window in enumerate(latents)]
        x = self.norm(x + self.cross_attn(x, positioned, masks))
        return self.proj_out(x) + queries


class _Aggregator(nn.Module):
    def __init__(self, q_dim: int, context_dim: int, kv_dims: Sequence[int], window_sides: Sequence[int],
                 hidden: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_AggregatorLayer(q_dim, context_dim, kv_dims, window_sides, hidden)
                                     for _ in range(depth)])

    def forward(self, queries: torch.Tensor, context: torch.Tensor, latents: Sequence[torch.Tensor],
                masks: Sequence[torch.Tensor]) -> torch.Tensor:
        for layer in self.layers:
            queries = layer(queries, context, latents, masks)
        return queries


# ------------------------------------------------------------------------------------------------
# Un-padding: which part of a grid over the padded square covers the image
# ------------------------------------------------------------------------------------------------
def unpad_slices(grid_h: int, grid_w: int, image_h: int, image_w: int) -> tuple[slice, slice]:
    """Rows and columns of a ``grid_h x grid_w`` grid over the padded square that cover an image.

    The arithmetic of the published ``unpad_image`` (and of PixFoundation's
    ``get_unpad_feature_size``): the padding is ``(side - int(size * scale)) // 2`` cells on each
    side of the short axis.
    """
    if image_w / image_h > grid_w / grid_h:
        kept = int(image_h * (grid_w / image_w))
        pad = (grid_h - kept) // 2
        return slice(pad, grid_h - pad), slice(0, grid_w)
    kept = int(image_w * (grid_h / image_h))
    pad = (grid_w - kept) // 2
    return slice(0, grid_h), slice(pad, grid_w - pad)


def unpadded_grid(side: int, image_h: int, image_w: int) -> tuple[int, int]:
    """(rows, cols) of the un-padded ``side x side`` grid of an ``image_h x image_w`` image."""
    rows, cols = unpad_slices(side, side, image_h, image_w)
    return rows.stop - rows.start, cols.stop - cols.start


def _tower_windows(features: torch.Tensor, query_side: int, image_sizes: Sequence[tuple[int, int]], *, unpad: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's window of a tower: ([queries, r*r, C] features, [queries, r*r] may-attend mask).

    ``features`` is [B, a*a, C] over the padded square, ``r = a // query_side``. Window cells on the
    padding are masked (a window with no image cell attends to all of its cells, as published);
    with ``unpad`` only the queries of the un-padded grid are kept.
    """
    batch, count, channels = features.shape
    side = math.isqrt(count)
    reduce = side // query_side
    if reduce * query_side != side:
        raise ValueError(f"a {side}x{side} tower grid does not split into {query_side}x{query_side} windows")
    grid = features.view(batch, query_side, reduce, query_side, reduce, channels).permute(0, 1, 3, 2, 4, 5)
    all_windows, all_masks = [], []
    for b, (image_h, image_w) in enumerate(image_sizes):
        rows, cols = unpad_slices(side, side, image_h, image_w)
        valid = torch.zeros(side, side, dtype=torch.bool, device=features.device)
        valid[rows, cols] = True
        valid = valid.view(query_side, reduce, query_side, reduce).permute(0, 2, 1, 3)
        windows = grid[b]
        if unpad:
            q_rows, q_cols = unpad_slices(query_side, query_side, image_h, image_w)
            windows, valid = windows[q_rows, q_cols], valid[q_rows, q_cols]
        windows = windows.reshape(-1, reduce * reduce, channels)
        valid = valid.reshape(-1, reduce * reduce).clone()
        valid[~valid.any(dim=-1)] = True
        all_windows.append(windows)
        all_masks.append(valid)
    return torch.cat(all_windows), torch.cat(all_masks)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------
class CambrianConfig(LlamaConfig):
    """LLaMA config plus the published Cambrian fields (read with their published defaults).

    ``vision_tower_specs`` (pixfound's own field) describes small towers of the tiny random model;
    without it the towers follow from ``mm_vision_tower_aux_list`` (:func:`released_tower_spec`).
    """

    model_type = "cambrian_llama"


def tower_specs(config: Any) -> list[dict]:
    specs = getattr(config, "vision_tower_specs", None)
    if specs:
        return [dict(spec) for spec in specs]
    names = getattr(config, "mm_vision_tower_aux_list", None)
    lengths = getattr(config, "mm_vision_tower_aux_token_len_list", None)
    if not names or not lengths or len(names) != len(lengths):
        raise ValueError("a Cambrian config needs mm_vision_tower_aux_list and mm_vision_tower_aux_token_len_list")
    return [released_tower_spec(name, int(length)) for name, length in zip(names, lengths)]


def _sampler_layer_indices(config: Any) -> list[int]:
    if getattr(config, "connector_only", True):
        return []
    start, stride = int(config.start_of_vision_sampler_layers), int(config.stride_of_vision_sampler_layers)
    return [start + k * stride for k in range(int(config.num_of_vision_sampler_layers))]


class CambrianLlamaModel(LlamaModel):
    """LLaMA decoder plus the towers and the aggregators (the published ``CambrianLlamaModel``'s modules)."""

    config_class = CambrianConfig

    def __init__(self, config: CambrianConfig) -> None:
        super().__init__(config)
        if getattr(config, "mm_projector_type", "sva") != "sva":
            raise ValueError(f"only the 'sva' projector of Cambrian-1 is supported, got {config.mm_projector_type!r}")
        specs = tower_specs(config)
        self.vision_tower_aux_list = nn.ModuleList([CambrianVisionTower(spec) for spec in specs])
        width = int(config.vision_hidden_size)
        groups = int(config.num_query_group)
        self.query_num_list = [int(n) for n in config.query_num_list]
        self.image_side = math.isqrt(int(config.image_token_len))
        token_sides = [math.isqrt(int(spec["token_len"])) for spec in specs]
        self.mm_projector = nn.Sequential(nn.Linear(width * groups, config.hidden_size), nn.GELU(),
                                          nn.Linear(config.hidden_size, config.hidden_size))
        for i, tower in enumerate(self.vision_tower_aux_list):
            setattr(self, f"mm_projector_aux_{i}", nn.Sequential(nn.Linear(tower.hidden_size, width), nn.GELU(),
                                                                 nn.Linear(width, width), nn.LayerNorm(width)))
        kv_dims = [width] * len(specs)
        for g, query_num in enumerate(self.query_num_list):
            sides = [side // math.isqrt(query_num) for side in token_sides]
            setattr(self, f"vision_sampler_{g}", _Aggregator(width, width, kv_dims, sides, width,
                                                             int(config.connector_depth)))
        self.sampler_layer_indices = _sampler_layer_indices(config)
        if self.sampler_layer_indices:
            sides = [side // self.image_side for side in token_sides]
            self.vision_sampler_layers = nn.ModuleList(
                [_Aggregator(config.hidden_size, width, kv_dims, sides, width, 1) for _ in self.sampler_layer_indices])
        self.vision_query = nn.Parameter(torch.randn(groups, width) / width**0.5)
        self.image_newline = nn.Parameter(torch.randn(config.hidden_size) / config.hidden_size**0.5)
        # What the in-decoder aggregators read during one prefill (set by CambrianForCausalLM.forward).
        self._image_context: Optional[dict] = None
        for index in self.sampler_layer_indices:
            self.layers[index].register_forward_hook(self._aggregate_after_layer(index))

    def _aggregate_after_layer(self, layer_index: int):
        sampler_index = self.sampler_layer_indices.index(layer_index)

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            context = self._image_context
            if context is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = self._aggregate(hidden, context, self.vision_sampler_layers[sampler_index])
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _aggregate(self, hidden: torch.Tensor, context: dict, sampler: nn.Module) -> torch.Tensor:
        """Replace the hidden states of each row's image tokens (newlines kept) by the aggregator's output."""
        hidden = hidden.clone()
        spans = context["spans"]  # per row (start, rows, cols)
        queries = torch.cat([hidden[b, start : start + rows * (cols + 1)].view(rows, cols + 1, -1)[:, :cols]
                             .reshape(rows * cols, 1, -1) for b, (start, rows, cols) in enumerate(spans)])
        latents = [w.to(hidden.dtype) for w in context["windows"]]
        out = sampler(queries, context["global"].to(hidden.dtype), latents, context["masks"])
        offset = 0
        for b, (start, rows, cols) in enumerate(spans):
            block = hidden[b, start : start + rows * (cols + 1)].view(rows, cols + 1, -1)
            block[:, :cols] = out[offset : offset + rows * cols, 0].view(rows, cols, -1)
            offset += rows * cols
        return hidden

    # -- images to features ---------------------------------------------------------------------
    def image_features(self, pixel_values: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]]
                       ) -> tuple[list[torch.Tensor], Optional[dict]]:
        """Per image its ``rows * (cols + 1)`` LLM-width tokens; and what the in-decoder aggregators read.

        ``image_sizes`` are (height, width) of the original images.
        """
        dtype = self.embed_tokens.weight.dtype
        if len(pixel_values) != len(self.vision_tower_aux_list):
            raise ValueError(f"got pixel values for {len(pixel_values)} towers, the model has "
                             f"{len(self.vision_tower_aux_list)}")
        projected = [getattr(self, f"mm_projector_aux_{i}")(tower(pixels).to(dtype))
                     for i, (tower, pixels) in enumerate(zip(self.vision_tower_aux_list, pixel_values))]
        batch = projected[0].shape[0]
        global_context = projected[0].mean(dim=1)  # [B, width]
        side = self.image_side
        groups = []
        for g, query_num in enumerate(self.query_num_list):
            query_side = math.isqrt(query_num)
            queries = self.vision_query[g].view(1, 1, -1).expand(batch * query_num, 1, -1)
            context = global_context[:, None, None, :].expand(-1, query_num, 1, -1).flatten(0, 1)
            windows, masks = zip(*(_tower_windows(p, query_side, image_sizes, unpad=False) for p in projected))
            out = getattr(self, f"vision_sampler_{g}")(queries, context, windows, masks).view(batch, query_num, -1)
            if query_side != side:
                out = _resize_tokens(out, side)
            groups.append(out)
        grid = self.mm_projector(torch.cat(groups, dim=-1)).to(dtype).view(batch, side, side, -1)
        tokens = []
        for b, (image_h, image_w) in enumerate(image_sizes):
            rows, cols = unpad_slices(side, side, image_h, image_w)
            kept = grid[b, rows, cols]
            newline = self.image_newline.to(kept.dtype).view(1, 1, -1).expand(kept.shape[0], 1, -1)
            tokens.append(torch.cat([kept, newline], dim=1).flatten(0, 1))
        if not self.sampler_layer_indices:
            return tokens, None
        windows, masks = zip(*(_tower_windows(p, side, image_sizes, unpad=True) for p in projected))
        counts = [unpadded_grid(side, h, w) for h, w in image_sizes]
        global_rows = torch.cat([global_context[b : b + 1, None, :].expand(rows * cols, 1, -1)
                                 for b, (rows, cols) in enumerate(counts)])
        return tokens, {"windows": list(windows), "masks": list(masks), "global": global_rows, "grids": counts}


class CambrianForCausalLM(LlamaForCausalLM):
    """Cambrian-1 on LLaMA: ``generate`` / ``forward`` take ``pixel_values`` (one tensor per tower) and
    ``image_sizes`` ([B, 2] original (height, width)) with the prompt's image placeholder tokens."""

    config_class = CambrianConfig
    # The released checkpoint holds no tower weights; load_released_towers loads them from their releases.
    _keys_to_ignore_on_load_missing = [r"model\.vision_tower_aux_list\."]

    def __init__(self, config: CambrianConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.model = CambrianLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_index)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # Parameters outside nn.Linear/LayerNorm, drawn as the published initialize_vision_modules draws them.
        with torch.no_grad():
            if isinstance(module, CambrianLlamaModel):
                module.vision_query.normal_(0.0, module.vision_query.shape[-1] ** -0.5)
                module.image_newline.normal_(0.0, module.image_newline.shape[-1] ** -0.5)
            elif isinstance(module, _AggregatorLayer):
                for name, parameter in module.named_parameters(recurse=False):
                    if name.startswith("pos_embed_"):
                        parameter.normal_()

    def set_attn_implementation(self, attn_implementation: Any, **kwargs: Any) -> None:
        """The language model's attention only: the vision towers keep theirs (both capture modes see the
        same image features)."""
        towers = [m for m in self.model.vision_tower_aux_list.modules()
                  if hasattr(m, "config") and hasattr(m.config, "_attn_implementation_internal")]
        kept = [(m.config, m.config._attn_implementation_internal) for m in towers]
        super().set_attn_implementation(attn_implementation, **kwargs)
        for config, implementation in kept:
            config._attn_implementation_internal = implementation

    def merge_image_tokens(self, input_ids: torch.Tensor, pixel_values: Sequence[torch.Tensor],
                           image_sizes: torch.Tensor, attention_mask: Optional[torch.Tensor]
                           ) -> tuple[torch.Tensor, Optional[dict]]:
        """Token embeddings with each row's image placeholders replaced by its image tokens; and the
        in-decoder aggregators' inputs, with each row's image span counted from its first real token."""
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        tokens, context = self.model.image_features(pixel_values, sizes)
        is_image = input_ids == self.image_token_id
        embeds = self.model.embed_tokens(input_ids.masked_fill(is_image, 0))
        for b, row_tokens in enumerate(tokens):
            count = int(is_image[b].sum())
            if count != row_tokens.shape[0]:
                raise ValueError(f"row {b} holds {count} image placeholder tokens, its image needs {row_tokens.shape[0]}")
        embeds = embeds.masked_scatter(is_image[..., None], torch.cat(tokens).to(embeds.dtype))
        if context is None:
            return embeds, None
        if attention_mask is not None and attention_mask.dim() == 2:
            first = attention_mask.to(torch.int32).argmax(dim=-1).tolist()
        else:
            first = [0] * input_ids.shape[0]
        position = int(self.config.image_position)
        spans = []
        for b, (rows, cols) in enumerate(context.pop("grids")):
            start = first[b] + position
            if start + rows * (cols + 1) > input_ids.shape[1]:
                raise ValueError(f"row {b}: the image tokens at image_position {position} end beyond the prompt")
            spans.append((start, rows, cols))
        context["spans"] = spans
        return embeds, context

    def _forward_with_images(self, input_ids: Optional[torch.Tensor] = None, pixel_values: Any = None,
                             image_sizes: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                             inputs_embeds: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        if pixel_values is None or input_ids is None or not bool((input_ids == self.image_token_id).any()):
            return LlamaForCausalLM.forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                            inputs_embeds=inputs_embeds, **kwargs)
        if image_sizes is None:
            raise ValueError("Cambrian needs image_sizes (original height, width) with pixel_values")
        embeds, context = self.merge_image_tokens(input_ids, pixel_values, image_sizes, attention_mask)
        self.model._image_context = context
        try:
            return LlamaForCausalLM.forward(self, input_ids=None, attention_mask=attention_mask, inputs_embeds=embeds,
                                            **kwargs)
        finally:
            self.model._image_context = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward_with_images(*args, **kwargs)


def _forward_signature() -> inspect.Signature:
    """LlamaForCausalLM.forward's parameters plus pixel_values and image_sizes: generate reads the signature
    (which cache argument, logits_to_keep, position_ids) and must see the installed transformers' own."""
    base = inspect.signature(LlamaForCausalLM.forward)
    parameters = [p for p in base.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
             for name in ("pixel_values", "image_sizes")]
    var_keyword = [p for p in base.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    positional = [p for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    keyword = [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return base.replace(parameters=positional + keyword + extra + var_keyword)


CambrianForCausalLM.forward.__signature__ = _forward_signature()


# ------------------------------------------------------------------------------------------------
# The processor
# ------------------------------------------------------------------------------------------------
def _pad_to_square(image: Any, colour: tuple[int, int, int]) -> Any:
    """``expand2square``: centre the image on a square of ``colour`` (the smaller half of the border on the
    top/left)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


class CambrianProcessor:
    """Prompts to input ids with the image placeholders, images to one pixel tensor per tower.

    Each tower gets the image padded to a square with its mean colour, resized (PIL bicubic) to the
    tower's resolution and normalised with the tower's statistics: the published ``process_images``
    followed by each tower's processor, whose resize and crop leave an image of that size as it is.
    """

    def __init__(self, tokenizer: Any, specs: Sequence[Mapping[str, Any]], *, image_token_len: int,
                 image_placeholder: str) -> None:
        self.tokenizer = tokenizer
        self.specs = [dict(spec) for spec in specs]
        self.image_side = math.isqrt(int(image_token_len))
        self.image_placeholder = image_placeholder
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(image_placeholder))
        if self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_placeholder!r} token for the image")

    def image_token_count(self, image_h: int, image_w: int) -> int:
        rows, cols = unpadded_grid(self.image_side, image_h, image_w)
        return rows * (cols + 1)

    def pixel_values(self, images: Sequence[Any]) -> list[torch.Tensor]:
        import numpy as np
        from PIL import Image

        per_tower = []
        for spec in self.specs:
            colour = tuple(int(x * 255) for x in spec["pad_mean"])
            size = int(spec["image_size"])
            mean = torch.tensor(spec["mean"], dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(spec["std"], dtype=torch.float32).view(3, 1, 1)
            batch = []
            for image in images:
                square = _pad_to_square(image.convert("RGB"), colour).resize((size, size), Image.BICUBIC)
                pixels = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).permute(2, 0, 1)
                batch.append((pixels - mean) / std)
            per_tower.append(torch.stack(batch))
        return per_tower

    def prompt_ids(self, text: str, image_tokens: Optional[int]) -> list[int]:
        """``tokenizer_image_token``: the text on each side of ``<image>`` tokenised on its own; when the first
        chunk starts with BOS, the second chunk's first token is dropped (the published rule)."""
        if image_tokens is None:
            if IMAGE_TOKEN in text:
                raise ValueError("a prompt with <image> needs an image")
            return list(self.tokenizer(text).input_ids)
        chunks = text.split(IMAGE_TOKEN)
        if len(chunks) != 2:
            raise ValueError(f"a Cambrian prompt holds exactly one {IMAGE_TOKEN}, got {len(chunks) - 1}")
        before, after = (list(self.tokenizer(chunk).input_ids) for chunk in chunks)
        bos = self.tokenizer.bos_token_id
        skip = 1 if before and bos is not None and before[0] == bos else 0
        return before + [self.image_token_id] * image_tokens + after[skip:]

    def __call__(self, text: Sequence[str], images: Optional[Sequence[Any]] = None, return_tensors: str = "pt",
                 padding: bool = True) -> dict[str, Any]:
        if images is not None and len(images) != len(text):
            raise ValueError(f"got {len(text)} prompts but {len(images)} images")
        counts = [None] * len(text) if images is None else [self.image_token_count(im.height, im.width) for im in images]
        rows = [self.prompt_ids(t, n) for t, n in zip(text, counts)]
        width = max(len(r) for r in rows)
        pad = int(self.tokenizer.pad_token_id)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):  # left padding
            input_ids[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, width - len(row):] = 1
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images is not None:
            out["pixel_values"] = self.pixel_values(images)
            out["image_sizes"] = torch.tensor([[im.height, im.width] for im in images], dtype=torch.long)
        return out


# ------------------------------------------------------------------------------------------------
# The adapter
# ------------------------------------------------------------------------------------------------
def llama3_conversation(prompt: str, *, with_image: bool = True, system: str = CAMBRIAN_SYSTEM_PROMPT) -> str:
    """``conv_templates["llama_3"]`` with one user turn, as the published PixFoundation scripts build it."""
    question = f"{IMAGE_TOKEN}\n{prompt}" if with_image else prompt
    return (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>{system}<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>{question}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>")


class CambrianAdapter(VisionLanguageAdapter):
    """Cambrian-1: ``rows x (cols + 1)`` image tokens (un-padded 24 x 24 grid, a newline per row).

    ``Generation.maps`` is the ``rows x cols`` grid (newlines dropped, as the published script
    reads it). It covers the image (``fit="resize"``); the published script upsamples it as if it
    covered the padded square (``published_fit="pad"``).
    """

    family = "cambrian"

    def __init__(self, model: torch.nn.Module, processor: CambrianProcessor, *, name: str,
                 system_prompt: str = CAMBRIAN_SYSTEM_PROMPT) -> None:
        super().__init__(model, processor, name=name)
        self.system_prompt = system_prompt
        self.image_token_id = processor.image_token_id
        if self.image_token_id != int(model.config.image_token_index):
            raise ValueError(f"the processor's image token {self.image_token_id} is not the model's "
                             f"{model.config.image_token_index}")
        self.grid_side = processor.image_side

    def format_prompt(self, prompt: str, *, with_image: bool = True) -> str:
        return llama3_conversation(prompt, with_image=with_image, system=self.system_prompt)

    def _encode(self, images: Optional[list], texts: list[str]) -> dict[str, Any]:
        return self.processor(text=texts, images=images)

    def _layout(self, inputs: dict[str, Any], row: int, image_size: tuple[int, int]) -> ImageTokenLayout:
        start, length = image_token_span(inputs["input_ids"], self.image_token_id, row=row)
        height, width = int(image_size[0]), int(image_size[1])
        rows, cols = unpadded_grid(self.grid_side, height, width)
        if length != rows * (cols + 1):
            raise ValueError(f"sample {row} has {length} image tokens, but a {height}x{width} image needs "
                             f"{rows}x({cols}+1 newline)")
        grid_index = (torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)[None, :]).flatten()
        geometry = ImageGeometry(rows, cols, height, width, "resize", published_fit="pad")
        return ImageTokenLayout(start, length, grid_index, geometry)


# ------------------------------------------------------------------------------------------------
# Loading the released checkpoint and the towers' releases
# ------------------------------------------------------------------------------------------------
def _release_folder(spec: Mapping[str, Any], sources: Mapping[str, Any], local_only: bool) -> pathlib.Path:
    from pixfound.errors import MissingFileError

    given = sources.get(spec["name"]) or sources.get(spec["release"]) or sources.get(spec["kind"])
    if given is not None:
        folder = pathlib.Path(given).expanduser()
        if not folder.exists():
            raise MissingFileError(f"the weights given for Cambrian tower {spec['name']!r} do not exist: {folder}")
        return folder
    try:
        from huggingface_hub import snapshot_download

        return pathlib.Path(snapshot_download(spec["release"], local_files_only=local_only))
    except Exception as error:  # not cached (offline) or not reachable
        raise MissingFileError(
            f"Cambrian tower {spec['name']!r} loads its weights from {spec['release']!r}, which is not in the local "
            f"Hugging Face cache: `hf download {spec['release']}`, or pass tower_paths={{{spec['kind']!r}: folder}}"
        ) from error


def _read_weights(folder: pathlib.Path, stem_names: Sequence[str]) -> dict[str, torch.Tensor]:
    from pixfound.errors import MissingFileError

    candidates = [folder] if folder.is_file() else [folder / name for name in stem_names]
    for path in candidates:
        if path.is_file():
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(str(path), map_location="cpu", weights_only=True)
    raise MissingFileError(f"none of {', '.join(stem_names)} in {folder}")


def tower_state_dict(spec: Mapping[str, Any], folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """The tower's weights from its release, named as the tower module names them.

    open_clip releases (SigLIP, ConvNeXt): the tower is the ``visual.trunk.*`` of the CLIP model's
    weights. transformers releases (CLIP, DINOv2): loaded as the published code loads them
    (``CLIPVisionModel`` / ``Dinov2Model.from_pretrained``), which also maps names that later
    transformers versions changed.
    """
    if spec["release_format"] == "open_clip":
        state = _read_weights(folder, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
        prefix = "visual.trunk."
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    from transformers import CLIPVisionModel, Dinov2Model

    model_class = CLIPVisionModel if spec["kind"] == "clip" else Dinov2Model
    return model_class.from_pretrained(str(folder), local_files_only=True).state_dict()


def load_released_towers(model: CambrianForCausalLM, tower_paths: Optional[Mapping[str, Any]] = None, *,
                         local_only: bool = True) -> None:
    """Load each tower's weights from its own release (strict: a missing or extra name is an error).

    ``tower_paths`` maps a tower's published name, release id or kind (``siglip``, ``clip``,
    ``dinov2``, ``convnext``) to a local folder or file; other towers come from the Hugging Face cache.
    """
    sources = dict(tower_paths or {})
    for tower in model.model.vision_tower_aux_list:
        folder = _release_folder(tower.spec, sources, local_only)
        state = tower_state_dict(tower.spec, folder)
        if next(tower.vision_tower.parameters()).device.type == "meta":
            tower.vision_tower.to_empty(device="cpu")
        buffers = dict(tower.vision_tower.named_buffers())
        missing, unexpected = tower.vision_tower.load_state_dict(state, strict=False)
        # Buffers a release does not store (e.g. position ids) are computed by the module itself.
        missing = [k for k in missing if k not in buffers]
        if missing or unexpected:
            raise ValueError(f"Cambrian tower {tower.spec['name']!r}: the weights in {folder} do not match the tower "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        tower.vision_tower.to(dtype=model.dtype)


def load_cambrian(where: str, *, dtype: torch.dtype, local_only: bool,
                  tower_paths: Optional[Mapping[str, Any]] = None) -> tuple[CambrianForCausalLM, CambrianProcessor]:
    """The released checkpoint (LLM, aggregators, projectors by their published names), its towers from their
    releases, and the processor."""
    from transformers import AutoTokenizer

    config = CambrianConfig.from_pretrained(where, local_files_only=local_only)
    tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local_only)
    placeholder = getattr(config, "image_placeholder", RELEASED_IMAGE_PLACEHOLDER)
    if getattr(config, "image_token_index", None) is None:
        config.image_token_index = int(tokenizer.convert_tokens_to_ids(placeholder))
    if tokenizer.pad_token_id is None:  # LLaMA-3 has none; padding positions are masked out
        tokenizer.pad_token = "<|end_of_text|>" if "<|end_of_text|>" in tokenizer.get_vocab() else tokenizer.eos_token
    model = CambrianForCausalLM.from_pretrained(where, config=config, dtype=dtype, attn_implementation="sdpa",
                                                local_files_only=local_only)
    load_released_towers(model, tower_paths, local_only=local_only)
    processor = CambrianProcessor(tokenizer, tower_specs(config), image_token_len=int(config.image_token_len),
                                  image_placeholder=placeholder)
    return model.eval(), processor


def register_with_transformers() -> None:
    """Let AutoConfig read ``model_type: cambrian_llama`` (idempotent)."""
    from transformers import AutoConfig

    AutoConfig.register(CambrianConfig.model_type, CambrianConfig, exist_ok=True)


register_with_transformers()
