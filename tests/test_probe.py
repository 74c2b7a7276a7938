"""The attention probe: fused capture (SDPA + image_attention) against the published eager recipe."""
from __future__ import annotations

import inspect

import pytest
import torch

from pixfound.attention import probe
from pixfound.data.sample import Sample
from pixfound.models import ImageGeometry, ImageTokenLayout, tiny_model
from pixfound.triton_kernels import interpreting, triton_available
from random_samples import random_image_sample

# Triton's kernels run in its interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
# without CUDA); the tiny models here are on the CPU.
TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    not (triton_available() and interpreting()), reason="Triton runs CPU tensors only under TRITON_INTERPRET=1"))

MAP_TOL = 1e-5  # fp32 maps, fused vs reference and alone vs in a batch

# Prompts of different lengths, so the batch is left padded.
PROMPTS = [
    "describe the image",
    "what color is the big dog on the left of the wooden table ?",
    "identify the red car in the scene .",
]
# (H, W) per family: non-square images; Qwen needs larger ones to get several 28 px tokens.
IMAGE_SIZES = {
    "llava": [(30, 50), (64, 48), (40, 40)],
    "llava_next": [(30, 50), (64, 48), (40, 40)],
    "qwen2_vl": [(84, 140), (112, 84), (100, 100)],
    "qwen3_vl": [(97, 150), (128, 75), (100, 100)],
    "cambrian": [(30, 50), (64, 47), (40, 40)],
}
NEW_TOKENS = 5


def make_sample(index: int, size: tuple[int, int]) -> Sample:
    return random_image_sample(index, size, seed_base=1000, id_prefix="img")


def _reference_run(family: str):
    """A tiny model of ``family`` with its reference (eager) generation of the 3-sample batch."""
    adapter = tiny_model(family, seed=0)
    samples = [make_sample(i, size) for i, size in enumerate(IMAGE_SIZES[family])]
    reference = adapter.generate(samples, PROMPTS, max_new_tokens=NEW_TOKENS, capture="reference", batch_size=3)
    return adapter, samples, reference


@pytest.fixture(scope="module", params=["llava", "llava_next", "qwen2_vl", "qwen3_vl", "cambrian"])
def family_run(request):
    """One tiny model per family, with its reference (eager) generation of the 3-sample batch."""
    return _reference_run(request.param)


@pytest.fixture(scope="module")
def llava_run():
    """The LLaVA run alone, for what depends on the probe or the cache, not on the model family."""
    return _reference_run("llava")


def _assert_same(first, second, tol: float = MAP_TOL) -> None:
    assert first.token_ids == second.token_ids
    assert first.maps.shape == second.maps.shape
    assert first.maps.dtype == torch.float32 and first.maps.device.type == "cpu"
    diff = (first.maps - second.maps).abs().max().item()
    assert diff <= tol, f"maps differ by {diff:.3g} > {tol}"
    assert (first.stop_map is None) == (second.stop_map is None)
    if first.stop_map is not None:
        assert (first.stop_map - second.stop_map).abs().max().item() <= tol


# ------------------------------------------------------------------------------------------------
# fused vs reference on the real model classes
# ------------------------------------------------------------------------------------------------
def test_fused_matches_reference_batched(family_run):
    adapter, samples, reference = family_run
    text_config = adapter.model.config.get_text_config()
    assert text_config.num_key_value_heads < text_config.num_attention_heads  # GQA
    fused = adapter.generate(samples, PROMPTS, max_new_tokens=NEW_TOKENS, capture="fused", batch_size=3)
    # The prompts really are left padded to different lengths.
    batch = adapter.prepare([s.load_image() for s in samples], PROMPTS)
    assert len(set(batch.inputs["attention_mask"].sum(dim=1).tolist())) == 3
    for ref, fus in zip(reference, fused):
        assert len(ref.token_ids) == NEW_TOKENS  # tiny models never emit EOS on their own
        assert ref.maps.shape == (NEW_TOKENS, ref.geometry.grid_h, ref.geometry.grid_w)
        assert float(ref.maps.min()) >= 0.0 and float(ref.maps.sum(dim=(1, 2)).max()) <= 1.0 + 1e-6
        _assert_same(ref, fus)


@pytest.mark.parametrize("backend", ["cpp", "reference", TRITON])
def test_fused_backends_match_reference(family_run, backend):
    """The C++ core, the Triton kernels and the torch reference inside the probe give the published maps."""
    adapter, samples, reference = family_run
    fused = adapter.generate(samples, PROMPTS, max_new_tokens=NEW_TOKENS, capture="fused", batch_size=3,
                             backend=backend)
    for ref, fus in zip(reference, fused):
        _assert_same(ref, fus)


def test_a_static_cache_gives_the_reference_maps(llava_run, monkeypatch):
    """transformers' StaticCache hands the kernel its whole buffer, and an unpadded prefill gets no mask
    (SDPA's top-left causal alignment): the maps must still be the published ones, padded or not."""
    adapter, samples, reference = llava_run
    plain_kwargs = adapter._generation_kwargs
    monkeypatch.setattr(adapter, "_generation_kwargs", lambda *args: dict(
        plain_kwargs(*args), cache_implementation="static", disable_compile=True))
    batched = adapter.generate(samples, PROMPTS, max_new_tokens=NEW_TOKENS, capture="fused", batch_size=3,
                               kv_cache="dynamic")
    alone = adapter.generate(samples[1:2], PROMPTS[1:2], max_new_tokens=NEW_TOKENS, capture="fused",
                             kv_cache="dynamic")
    for ref, fus in zip(reference, batched):
        _assert_same(ref, fus)
    _assert_same(reference[1], alone[0])


@pytest.mark.parametrize("backend", ["cpp", TRITON])
def test_a_window_of_steps_gives_the_bits_of_one_call_per_step(llava_run, monkeypatch, backend):
    """The deferred capture computes several steps per call (one query row each): the per-step result
    (bits on the C++ path)."""
    adapter, samples, reference = llava_run
    runs = {}
    for limit in (1, 2, probe.MAX_WINDOW_STEPS):
        monkeypatch.setattr(probe, "MAX_WINDOW_STEPS", limit)
        runs[limit] = adapter.generate(samples, PROMPTS, max_new_tokens=NEW_TOKENS, capture="fused", batch_size=3,
                                       backend=backend)
    for one, two, many, ref in zip(runs[1], runs[2], runs[probe.MAX_WINDOW_STEPS], reference):
        if backend == "cpp":  # one C++ routine for any number of rows
            assert torch.equal(one.maps, two.maps) and torch.equal(one.maps, many.maps)
        else:  # Triton: windows run the row-block kernel, single steps the per-row one
            torch.testing.assert_close(one.maps, two.maps, atol=1e-6, rtol=0)
            torch.testing.assert_close(one.maps, many.maps, atol=1e-6, rtol=0)
        _assert_same(ref, many)


@pytest.mark.parametrize("backend", ["cpp", TRITON])
def test_a_step_that_skipped_a_layer_is_reported_not_averaged(backend):
    """Steps of one window that ran different numbers of layers are computed apart, then refused."""
    adapter = tiny_model("llava")
    config = adapter.model.config.text_config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    generator = torch.Generator().manual_seed(0)
    buffer = torch.randn(1, kv_heads, 10, dim, generator=generator)  # a preallocated cache's storage
    capture = probe.ImageAttentionCapture(adapter.model, image_start=[1], image_len=[4], backend=backend)
    with pytest.raises(RuntimeError, match="generation step 1 ran the fused attention in 2 layers"):
        with capture:
            for q_len, kv_len, layers in [(6, 6, 3), (1, 7, 2), (1, 8, 3)]:
                for layer in range(layers):
                    query = torch.randn(1, heads, q_len, dim, generator=generator)
                    capture.record_layer(layer, query, buffer[:, :, :kv_len], None, dim**-0.5)
    assert capture.sink.layer_counts == [3, 2, 3]
    assert len(capture.sink.step_sums()) == 3  # every step was computed, each on its own
    _assert_clean(adapter)


def test_batch_invariance(family_run):
    """A sample alone gives the same tokens and maps as inside a padded batch (both modes)."""
    adapter, samples, reference = family_run
    for index in (0, 1):  # the shortest prompt (most padding) and the longest (none)
        alone_fused = adapter.generate([samples[index]], [PROMPTS[index]], max_new_tokens=NEW_TOKENS, capture="fused")
        _assert_same(alone_fused[0], reference[index])
    alone_reference = adapter.generate([samples[0]], [PROMPTS[0]], max_new_tokens=NEW_TOKENS, capture="reference")
    _assert_same(alone_reference[0], reference[0])


def test_fused_generation_equals_plain_sdpa(family_run):
    adapter, samples, reference = family_run
    plain = adapter.generate(samples, PROMPTS, max_new_tokens=NEW_TOKENS, capture=None, batch_size=3)
    for p, r in zip(plain, reference):
        assert p.maps is None
        assert p.token_ids == r.token_ids
        assert p.text == r.text


def test_fused_forward_logits_bitwise_equal_to_sdpa():
    """The fused attention returns SDPA's output unchanged: logits are bit-for-bit the same."""
    adapter = tiny_model("llava")
    samples = [make_sample(i, size) for i, size in enumerate(IMAGE_SIZES["llava"])]
    batch = adapter.prepare([s.load_image() for s in samples], PROMPTS)
    with torch.inference_mode():
        with adapter.text_attention("sdpa"):
            plain = adapter.model(**batch.inputs).logits
        with probe.ImageAttentionCapture(
            adapter.model,
            image_start=[l.span_start for l in batch.layouts],
            image_len=[l.span_len for l in batch.layouts],
            first_token_row="last",
        ) as capture:
            fused = adapter.model(**batch.inputs).logits
    assert torch.equal(plain, fused)
    assert capture.step_maps().shape == (3, 1, 25)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the native Triton kernel)")
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl", "cambrian"])
def test_fused_matches_reference_on_cuda(family):
    adapter = tiny_model(family)
    adapter.model.to("cuda")
    samples = [make_sample(i, size) for i, size in enumerate(IMAGE_SIZES[family])]
    reference = adapter.generate(samples, PROMPTS, max_new_tokens=NEW_TOKENS, capture="reference", batch_size=3)
    fused = adapter.generate(samples, PROMPTS, max_new_tokens=NEW_TOKENS, capture="fused", batch_size=3,
                             backend="triton")
    for ref, fus in zip(reference, fused):
        _assert_same(ref, fus)


def test_last_row_option_matches_reference():
    adapter = tiny_model("qwen2_vl")
    samples = [make_sample(i, size) for i, size in enumerate(IMAGE_SIZES["qwen2_vl"])]
    kwargs = dict(max_new_tokens=3, batch_size=3, first_token_row="last")
    reference = adapter.generate(samples, PROMPTS, capture="reference", **kwargs)
    fused = adapter.generate(samples, PROMPTS, capture="fused", backend="reference", **kwargs)
    published = adapter.generate(samples, PROMPTS, capture="fused", max_new_tokens=3, batch_size=3)
    for ref, fus, pub in zip(reference, fused, published):
        _assert_same(ref, fus)
        # Only the first token's map depends on the row choice.
        assert not torch.allclose(ref.maps[0], pub.maps[0])
        assert torch.allclose(ref.maps[1:], pub.maps[1:], atol=MAP_TOL, rtol=0)


def test_maps_end_before_eos():
    """A sample that emits EOS keeps only the tokens before it; the others run on."""
    adapter = tiny_model("llava")
    samples = [make_sample(i, size) for i, size in enumerate(IMAGE_SIZES["llava"])]
    free = adapter.generate(samples, PROMPTS, max_new_tokens=NEW_TOKENS, capture=None, batch_size=3)
    eos = free[1].token_ids[2]  # sample 1 "ends" at its third token
    adapter.model.generation_config.eos_token_id = eos
    ref = adapter.generate(samples, PROMPTS, max_new_tokens=NEW_TOKENS, capture="reference", batch_size=3)
    fus = adapter.generate(samples, PROMPTS, max_new_tokens=NEW_TOKENS, capture="fused", batch_size=3)
    for r, f, full in zip(ref, fus, free):
        expected = full.token_ids[: full.token_ids.index(eos)] if eos in full.token_ids else full.token_ids
        assert r.token_ids == expected
        assert r.maps.shape[0] == len(expected)
        # The step that emitted EOS keeps its map apart (the published mean counts it); no EOS, no map.
        assert (r.stop_map is None) == (eos not in full.token_ids)
        _assert_same(r, f)
    assert len(ref[1].token_ids) == free[1].token_ids.index(eos) <= 2  # sample 1 really was cut short
    assert ref[1].stop_map.shape == ref[1].maps.shape[1:]


# ------------------------------------------------------------------------------------------------
# the probe leaves nothing behind; bad input
# ------------------------------------------------------------------------------------------------
def _assert_clean(adapter) -> None:
    assert not any(hasattr(layer.self_attn, probe.CAPTURE_ATTRIBUTE) for layer in adapter.decoder.layers)
    assert adapter.model.config.get_text_config()._attn_implementation == "sdpa"
    assert adapter.model.config._attn_implementation == "sdpa"
    assert not adapter.decoder._forward_pre_hooks


def test_capture_restores_model_state():
    adapter = tiny_model("llava")
    samples = [make_sample(0, (30, 50))]
    adapter.generate(samples, PROMPTS[:1], max_new_tokens=2, capture="fused")
    _assert_clean(adapter)
    adapter.generate(samples, PROMPTS[:1], max_new_tokens=2, capture="reference")
    _assert_clean(adapter)
    result = adapter.generate(samples, PROMPTS[:1], max_new_tokens=2, capture=None)
    assert result[0].maps is None and len(result[0].token_ids) == 2
    _assert_clean(adapter)


def test_image_span_beyond_sequence_is_a_clear_error_and_restores_state():
    adapter = tiny_model("llava")
    batch = adapter.prepare([make_sample(0, (30, 50)).load_image()], PROMPTS[:1])
    too_far = batch.prompt_len - 3
    with pytest.raises(ValueError, match="image span of sample 0 ends beyond the sequence"):
        with torch.inference_mode(), probe.ImageAttentionCapture(adapter.model, image_start=[too_far], image_len=[25]):
            adapter.model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
    _assert_clean(adapter)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_start=[3], image_len=[0]), "no image tokens"),
        (dict(image_start=[-1], image_len=[4]), "image_start"),
        (dict(image_start=[0, 1], image_len=[4]), "one entry per sample"),
        (dict(image_start=[0], image_len=[4], first_token_row="first"), "first_token_row"),
        (dict(image_start=[0], image_len=[4], backend="cuda"), "backend"),
    ],
)
def test_capture_rejects_bad_arguments(kwargs, message):
    adapter = tiny_model("llava")
    with pytest.raises(ValueError, match=message):
        probe.ImageAttentionCapture(adapter.model, **kwargs)


def test_sliding_window_layers_are_rejected():
    adapter = tiny_model("llava")
    adapter.model.config.text_config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="full-attention text layers only"):
        probe.ImageAttentionCapture(adapter.model, image_start=[0], image_len=[4])


def test_one_padding_run_inside_the_sequence_matches_the_reference():
    """A shared image prefix puts padding between prefix and own text: the capture excludes that run."""
    adapter = tiny_model("llava")
    batch = adapter.prepare([make_sample(0, (30, 50)).load_image()], PROMPTS[:1])
    batch.inputs["attention_mask"][0, 1:3] = 0  # one run of padding after the first (BOS-like) token
    layout = batch.layouts[0]
    spans = dict(image_start=[layout.span_start], image_len=[layout.span_len])
    with torch.inference_mode():
        with probe.ImageAttentionCapture(adapter.model, **spans) as fused:
            adapter.model(**batch.inputs)
        with adapter.text_attention("eager"):
            out = adapter.model(**batch.inputs, output_attentions=True)
    expected = probe.reference_step_maps([out.attentions], **spans)
    torch.testing.assert_close(fused.step_maps(), expected, atol=MAP_TOL, rtol=0)
    _assert_clean(adapter)


def test_padding_in_two_places_inside_the_sequence_is_rejected():
    """The kernel excludes one padding run per row; a second must not pass silently."""
    adapter = tiny_model("llava")
    batch = adapter.prepare([make_sample(0, (30, 50)).load_image()], PROMPTS[:1])
    batch.inputs["attention_mask"][0, 1] = 0
    batch.inputs["attention_mask"][0, 3] = 0
    layout = batch.layouts[0]
    with pytest.raises(ValueError, match="more than one place"):
        with torch.inference_mode(), probe.ImageAttentionCapture(
            adapter.model, image_start=[layout.span_start], image_len=[layout.span_len]
        ):
            adapter.model(**batch.inputs)
    _assert_clean(adapter)


def test_captures_do_not_nest():
    adapter = tiny_model("llava")
    outer = probe.ImageAttentionCapture(adapter.model, image_start=[0], image_len=[4])
    with outer:
        with pytest.raises(RuntimeError, match="already recording"):
            with probe.ImageAttentionCapture(adapter.model, image_start=[0], image_len=[4]):
                pass
        with pytest.raises(RuntimeError, match="after the capture block"):
            outer.step_maps()
    with pytest.raises(RuntimeError, match="recorded nothing"):
        with probe.ImageAttentionCapture(adapter.model, image_start=[0], image_len=[4]) as idle:
            pass
        idle.step_maps()
    _assert_clean(adapter)


def test_second_to_last_row_needs_two_prompt_tokens():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        probe._query_row("second_to_last", 0, 1)
    assert probe._query_row("last", 0, 1) == 0
    assert probe._query_row("second_to_last", 0, 7) == 5
    assert probe._query_row("second_to_last", 3, 1) == 0


# ------------------------------------------------------------------------------------------------
# registration with transformers
# ------------------------------------------------------------------------------------------------
def test_mask_function_is_registered_so_padding_is_kept():
    """Without a registered mask function transformers silently builds no mask for a custom attention."""
    from transformers import AttentionInterface, LlamaConfig
    from transformers.masking_utils import AttentionMaskInterface, create_causal_mask, sdpa_mask

    name = probe.register_fused_attention()
    assert AttentionInterface._global_mapping[name] is probe.fused_attention_forward
    assert AttentionMaskInterface._global_mapping[name] is sdpa_mask

    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, vocab_size=10)
    config._attn_implementation = name
    embeds = torch.zeros(2, 5, 8)
    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    # transformers renamed the cache argument (past_key_values before 5.2x, cache after).
    cache_arg = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
    mask = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=padding, **{cache_arg: None})
    assert mask is not None and mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert not mask[0, 0, 4, :2].any() and mask[0, 0, 4, 2:].all()  # the padding keys stay masked
    assert not mask[1, 0, 2, 3:].any()  # and causality holds


# ------------------------------------------------------------------------------------------------
# reference recipe and shared post-processing on synthetic tensors
# ------------------------------------------------------------------------------------------------
def _published_loop(attentions, image_start: int, image_len: int, sample: int) -> torch.Tensor:
    """infer_pixfoundation.py (MSiam/PixFoundation), for one sample of the batch."""
    maps = []
    for i, layers in enumerate(attentions):
        layers = [x[sample : sample + 1] for x in layers]
        if i == 0:
            step = torch.cat([x[:, :, -2:-1, :] for x in layers])
        else:
            step = torch.cat(layers)
        step = step[:, :, -1, image_start : image_start + image_len]
        maps.append(step.mean(dim=(0, 1)))
    return torch.stack(maps)


def test_reference_step_maps_is_the_published_recipe():
    generator = torch.Generator().manual_seed(3)
    batch, heads, layers, prompt = 2, 3, 4, 11
    attentions = []
    for step in range(4):
        queries = prompt if step == 0 else 1
        keys = prompt + step
        attentions.append(
            tuple(
                torch.softmax(torch.randn(batch, heads, queries, keys, generator=generator), -1)
                for _ in range(layers)
            )
        )
    starts, lengths = [2, 4], [6, 5]
    result = probe.reference_step_maps(attentions, image_start=starts, image_len=lengths)
    assert result.shape == (batch, 4, 6) and result.dtype == torch.float32
    for b in range(batch):
        expected = _published_loop(attentions, starts[b], lengths[b], b)
        torch.testing.assert_close(result[b, :, : lengths[b]], expected, rtol=0, atol=1e-7)
        assert not result[b, :, lengths[b] :].any()
    last = probe.reference_step_maps(attentions, image_start=starts, image_len=lengths, first_token_row="last")
    expected_first = torch.stack([a[0, :, -1, 2:8] for a in attentions[0]]).mean(dim=(0, 1))
    torch.testing.assert_close(last[0, 0], expected_first, rtol=0, atol=1e-7)
    torch.testing.assert_close(last[:, 1:], result[:, 1:], rtol=0, atol=0)


def test_reference_step_maps_rejects_bad_spans():
    attentions = [(torch.full((1, 1, 4, 4), 0.25),)]
    with pytest.raises(ValueError, match="ends beyond the sequence"):
        probe.reference_step_maps(attentions, image_start=[2], image_len=[3])
    with pytest.raises(ValueError, match="attentions is empty"):
        probe.reference_step_maps([], image_start=[0], image_len=[1])
    with pytest.raises(ValueError, match="no attention weights"):
        probe.reference_step_maps([(None,)], image_start=[0], image_len=[1])


def test_token_maps_cuts_at_stop_ids_and_maps_cells():
    steps = torch.arange(2 * 4 * 7, dtype=torch.float32).reshape(2, 4, 7)
    geometry = ImageGeometry(2, 3, 20, 30, "resize")
    permuted = torch.tensor([6, 5, 4, 3, 2, 1])
    layouts = [
        ImageTokenLayout(0, 7, torch.arange(6), geometry),
        ImageTokenLayout(0, 7, permuted, geometry),
    ]
    result = probe.token_maps(steps, layouts, [2, 4])  # sample 0 stopped after 2 tokens, sample 1 ran on
    maps0, stop0 = result[0]
    maps1, stop1 = result[1]
    assert maps0.shape == (2, 2, 3) and maps1.shape == (4, 2, 3)
    torch.testing.assert_close(maps0.flatten(1), steps[0, :2, :6], rtol=0, atol=0)
    torch.testing.assert_close(maps1.flatten(1), steps[1][:, permuted], rtol=0, atol=0)
    # The step that emitted the first stop id keeps its map apart; a row without a stop id has none.
    torch.testing.assert_close(stop0.flatten(), steps[0, 2, :6], rtol=0, atol=0)
    assert stop1 is None
    with pytest.raises(ValueError, match="one map per token"):
        probe.token_maps(steps, layouts, [5, 4])


def test_fused_capture_reports_its_in_layer_time():
    adapter = tiny_model("llava", seed=0)
    samples = [make_sample(0, IMAGE_SIZES["llava"][0])]
    recorder = probe.ImageAttentionCapture(adapter.model, image_start=[0], image_len=[1])
    assert recorder.capture_seconds() == 0.0  # nothing recorded yet
    (generation,) = adapter.generate(samples, PROMPTS[:1], max_new_tokens=3, capture="fused")
    # The in-layer kernel time is now part of capture_s, and it cannot exceed the whole generate.
    assert 0.0 < generation.timings["capture_s"] <= generation.timings["generate_s"]


# ------------------------------------------------------------------------------------------------
# torch.compile traces through the capture
# ------------------------------------------------------------------------------------------------
def test_decoder_layers_with_the_capture_compile_into_one_graph_each_and_give_the_eager_maps():
    """torch.compile(fullgraph=True) over each decoder layer with the capture attached, on the CPU: no graph
    break (fullgraph raises on one), the capture op traced through its fake kernel into every layer's
    graph, and the maps and logits of eager mode."""
    adapter = tiny_model("llava")
    samples = [make_sample(i, size) for i, size in enumerate(IMAGE_SIZES["llava"])]
    batch = adapter.prepare([s.load_image() for s in samples], PROMPTS)
    spans = dict(image_start=[l.span_start for l in batch.layouts], image_len=[l.span_len for l in batch.layouts])
    graphs = []

    def record_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

    def forward(layers_compiled: bool):
        with torch.no_grad(), probe.ImageAttentionCapture(adapter.model, **spans, decoder=adapter.decoder) as capture:
            logits = adapter.model(**batch.inputs).logits
        return logits, capture.step_maps()

    eager_logits, eager_maps = forward(False)
    torch._dynamo.reset()
    try:
        for layer in adapter.decoder.layers:
            layer.compile(backend=record_graph, fullgraph=True)
        compiled_logits, compiled_maps = forward(True)
    finally:
        for layer in adapter.decoder.layers:
            layer._compiled_call_impl = None
        torch._dynamo.reset()
    assert len(graphs) >= 1
    assert all("pixfound.image_attention" in str(graph.graph) for graph in graphs)
    torch.testing.assert_close(compiled_maps, eager_maps, atol=1e-6, rtol=0)
    torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-5, rtol=0)
    _assert_clean(adapter)
