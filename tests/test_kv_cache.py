"""The preallocated key/value cache: the same values as transformers' concatenating cache, without the copies."""
from __future__ import annotations

import pytest
import torch

from pixfound.models import tiny_model
from pixfound.models.kv_cache import PreallocatedLayer, preallocated_cache
from random_samples import random_image_sample


def _states(generator: torch.Generator, batch: int = 2, heads: int = 3, length: int = 1, dim: int = 5):
    shape = (batch, heads, length, dim)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_layer_equals_concatenation_and_hands_out_views_of_one_buffer():
    generator = torch.Generator().manual_seed(0)
    layer = PreallocatedLayer(capacity=14)
    keys, values = _states(generator, length=7)
    expected_keys, expected_values = keys, values
    out_keys, _ = layer.update(keys, values)
    buffer = out_keys.data_ptr()
    for _ in range(5):
        keys, values = _states(generator)
        out_keys, out_values = layer.update(keys, values)
        expected_keys = torch.cat([expected_keys, keys], dim=-2)
        expected_values = torch.cat([expected_values, values], dim=-2)
        assert torch.equal(out_keys, expected_keys) and torch.equal(out_values, expected_values)
        assert out_keys.data_ptr() == buffer  # written in place, never copied
    assert not out_keys.is_contiguous()  # a view with the spare room of the buffer behind it
    assert layer.get_seq_length() == 12


def test_layer_grows_past_its_capacity_and_keeps_every_entry():
    generator = torch.Generator().manual_seed(1)
    layer = PreallocatedLayer(capacity=4)
    all_keys, all_values = [], []
    for length in (3, 1, 1, 2, 1, 5):
        keys, values = _states(generator, length=length)
        all_keys.append(keys)
        all_values.append(values)
        out_keys, out_values = layer.update(keys, values)
        assert torch.equal(out_keys, torch.cat(all_keys, dim=-2))
        assert torch.equal(out_values, torch.cat(all_values, dim=-2))
    assert layer.get_seq_length() == 13


def test_layer_follows_operations_that_replace_its_tensors():
    """Beam-style batch selection and crop replace keys/values; the next update builds on them."""
    generator = torch.Generator().manual_seed(2)
    layer = PreallocatedLayer(capacity=10)
    keys, values = _states(generator, batch=3, length=4)
    layer.update(keys, values)
    layer.batch_select_indices(torch.tensor([2, 0]))
    new_keys, new_values = _states(generator, batch=2)
    out_keys, out_values = layer.update(new_keys, new_values)
    assert torch.equal(out_keys, torch.cat([keys[[2, 0]], new_keys], dim=-2))
    assert torch.equal(out_values, torch.cat([values[[2, 0]], new_values], dim=-2))
    layer.crop(-2)
    more_keys, more_values = _states(generator, batch=2)
    out_keys, _ = layer.update(more_keys, more_values)
    assert torch.equal(out_keys, torch.cat([keys[[2, 0], :, :3], more_keys], dim=-2))


def test_layer_never_broadcasts_or_casts_new_states_into_its_buffer():
    """The update's fast path (its own views untouched) still checks the new states against the buffer."""
    generator = torch.Generator().manual_seed(3)
    layer = PreallocatedLayer(capacity=10)
    keys, values = _states(generator, length=3)
    layer.update(keys, values)
    step_keys, step_values = _states(generator)
    layer.update(step_keys, step_values)  # the views it handed out are still its keys/values
    wide_keys, wide_values = (t.double() for t in _states(generator))
    out_keys, out_values = layer.update(wide_keys, wide_values)  # new float64 buffers, earlier entries kept
    assert out_keys.dtype == torch.float64 and out_values.dtype == torch.float64
    assert torch.equal(out_keys, torch.cat([keys.double(), step_keys.double(), wide_keys], dim=-2))
    assert torch.equal(out_values, torch.cat([values.double(), step_values.double(), wide_values], dim=-2))
    one_sample = tuple(t.double() for t in _states(generator, batch=1))
    with pytest.raises(RuntimeError):  # a batch of 1 is never broadcast over the layer's 2 samples
        layer.update(*one_sample)


def test_cache_prefill_and_bad_arguments():
    generator = torch.Generator().manual_seed(3)
    prefix = [_states(generator, length=6) for _ in range(2)]
    cache = preallocated_cache(2, capacity=9, prefill=prefix)
    assert cache.get_seq_length() == 6
    keys, values = _states(generator)
    out_keys, _ = cache.update(keys, values, 1)
    assert torch.equal(out_keys, torch.cat([prefix[1][0], keys], dim=-2))
    with pytest.raises(ValueError, match="prefill has 1 layers, the cache 2"):
        preallocated_cache(2, capacity=9, prefill=prefix[:1])
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        preallocated_cache(2, capacity=0)
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        preallocated_cache(0, capacity=3)


PROMPTS = ["describe the image", "what color is the big dog on the left of the wooden table ?"]
SIZES = {"llava": [(30, 50), (64, 48)], "qwen2_vl": [(84, 140), (112, 84)]}


def _assert_same_maps(pre: torch.Tensor, dyn: torch.Tensor, backend: str) -> None:
    if backend == "cpp":  # one C++ routine, whatever the window: the same bits
        assert torch.equal(pre, dyn)
    else:  # Triton: a window of steps runs the row-block kernel, a single step the per-row one
        torch.testing.assert_close(pre, dyn, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("capture, backend", [("fused", "cpp"), ("fused", "auto"), (None, "auto"),
                                              ("reference", "auto")])
def test_generate_with_either_cache_gives_the_same_results(family, capture, backend):
    """Only the storage differs: tokens are identical, and so are the maps (bits on the C++ path), in a
    left-padded batch. The preallocated cache lets the capture compute windows of steps."""
    adapter = tiny_model(family, seed=0)
    samples = [random_image_sample(i, size, seed_base=500, id_prefix="kv") for i, size in enumerate(SIZES[family])]
    runs = {
        kv_cache: adapter.generate(samples, PROMPTS, max_new_tokens=6, capture=capture, batch_size=2,
                                   kv_cache=kv_cache, backend=backend)
        for kv_cache in ("preallocated", "dynamic")
    }
    for pre, dyn in zip(runs["preallocated"], runs["dynamic"]):
        assert pre.token_ids == dyn.token_ids and len(pre.token_ids) == 6
        if capture is None:
            assert pre.maps is None and dyn.maps is None
        elif capture == "reference":
            assert torch.equal(pre.maps, dyn.maps)
        else:
            _assert_same_maps(pre.maps, dyn.maps, backend)


@pytest.mark.parametrize("backend", ["cpp", "auto"])
def test_generate_with_shared_prefix_and_either_cache_gives_the_same_results(backend):
    adapter = tiny_model("llava", seed=0)
    samples = [random_image_sample(i, (40, 40), seed_base=600, id_prefix="kvp") for i in range(2)]
    prefixes = adapter.encode_image_prefixes(samples)
    runs = {
        kv_cache: adapter.generate(samples, PROMPTS, max_new_tokens=5, capture="fused", batch_size=2,
                                   prefixes=prefixes, kv_cache=kv_cache, backend=backend)
        for kv_cache in ("preallocated", "dynamic")
    }
    for pre, dyn in zip(runs["preallocated"], runs["dynamic"]):
        assert pre.timings["prefix_shared"] and dyn.timings["prefix_shared"]
        assert pre.token_ids == dyn.token_ids
        _assert_same_maps(pre.maps, dyn.maps, backend)


def test_generate_rejects_an_unknown_cache():
    adapter = tiny_model("llava", seed=0)
    sample = random_image_sample(0, (40, 40), seed_base=700, id_prefix="kvx")
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        adapter.generate([sample], ["what is it ?"], max_new_tokens=2, kv_cache="static")
