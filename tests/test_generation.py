"""Cached decoding for every position scheme: incremental == full forward, cached == uncached generate(),
static == dynamic cache, left-padded batches == each row alone, beam search and sampling."""

import pytest
import torch
from transformers import DynamicCache

from helpers import SCHEMES, tiny_lm

NEW_TOKENS = 12  # with k = 3 and prompts of 4-6 tokens, generation runs well past the clipping distance

PROMPTS = [[5, 17, 33, 8, 41, 12], [9, 23, 4, 50]]


def generate(model, input_ids, attention_mask=None, **kwargs):
    kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, **kwargs}
    return model.generate(input_ids, attention_mask=attention_mask, **kwargs)


def left_padded(prompts, pad_id=0):
    """[B, L] ids and mask, each row left-padded to the longest prompt."""
    length = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("scheme", SCHEMES)
def test_incremental_forward_matches_full_forward(scheme):
    model = tiny_lm(scheme)
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :4], cache=cache).logits]  # a 4-token prefill, then a 3-token chunk
        steps.append(model(ids[:, 4:7], cache=cache).logits)
        steps += [model(ids[:, i : i + 1], cache=cache).logits for i in range(7, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_cached_generate_equals_uncached(scheme):
    model = tiny_lm(scheme)
    ids = torch.tensor(PROMPTS[:1])
    cached = generate(model, ids)
    assert len(set(cached[0, -NEW_TOKENS:].tolist())) > 2, "weights too small: the model repeats one token"
    torch.testing.assert_close(generate(model, ids, use_cache=False), cached)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_static_cache_equals_dynamic_cache(scheme):
    model = tiny_lm(scheme)
    ids, mask = left_padded(PROMPTS)
    dynamic = generate(model, ids, mask)
    torch.testing.assert_close(generate(model, ids, mask, cache_implementation="static"), dynamic)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_left_padded_batch_equals_each_row_alone(scheme):
    model = tiny_lm(scheme)
    ids, mask = left_padded(PROMPTS)
    batch = generate(model, ids, mask)[:, -NEW_TOKENS:]
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]))[:, -NEW_TOKENS:]
        torch.testing.assert_close(batch[row : row + 1], alone, msg=f"row {row}")


@pytest.mark.parametrize("scheme", ["relative", "relative_values_per_head", "learned", "rotary"])
def test_beam_search_cached_uncached_and_padded(scheme):
    model = tiny_lm(scheme)
    ids, mask = left_padded(PROMPTS)
    beams = {"num_beams": 3, "num_return_sequences": 2}
    batch = generate(model, ids, mask, **beams)
    torch.testing.assert_close(generate(model, ids, mask, use_cache=False, **beams), batch)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]), **beams)[:, -NEW_TOKENS:]
        torch.testing.assert_close(batch[2 * row : 2 * row + 2, -NEW_TOKENS:], alone, msg=f"row {row}")


@pytest.mark.parametrize("scheme", ["relative", "relative_values", "sinusoidal"])
def test_sampling_cached_equals_uncached(scheme):
    model = tiny_lm(scheme)
    ids = torch.tensor(PROMPTS[:1])
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        outputs.append(generate(model, ids, do_sample=True, top_k=10, use_cache=use_cache))
    torch.testing.assert_close(outputs[0], outputs[1])


@pytest.mark.parametrize("scheme", ["relative", "relative_values", "sinusoidal", "rotary", "none"])
def test_generation_runs_past_max_position_embeddings(scheme):
    model = tiny_lm(scheme, max_position_embeddings=8)
    out = generate(model, torch.tensor(PROMPTS[:1]), max_new_tokens=20, min_new_tokens=20)
    assert out.shape == (1, len(PROMPTS[0]) + 20)


def test_learned_positions_beyond_the_table_raise():
    model = tiny_lm("learned", max_position_embeddings=8)
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        model(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        generate(model, torch.tensor(PROMPTS[:1]), max_new_tokens=5, min_new_tokens=5)
