"""The model's Shaw attention against a naive reference that gathers the full `[Lq, Lk, d]` relative tensors
(`helpers.naive_shaw_attention`)."""

import pytest
import torch

from hf_relformer import RelformerModel, attention_relformer
from hf_relformer.modeling_relformer import cache_of
from hf_relformer.positions_relformer import DistanceGrid

from helpers import assert_attention_matches_naive, naive_shaw_attention, redraw_weights, tiny_config, tiny_lm


def test_naive_reference_matches_a_loop():
    """Check the reference itself on a few entries with explicit loops over i and j."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 5, 4) for _ in range(3))
    key_table, value_table = torch.randn(2 * 2 + 1, 4), torch.randn(2 * 2 + 1, 4)
    out = naive_shaw_attention(q, k, v, key_table, value_table, 2, causal=False, query_offset=0)
    for i in range(5):
        e = torch.stack([q[0, 0, i] @ (k[0, 0, j] + key_table[max(-2, min(2, j - i)) + 2]) / 2 for j in range(5)])
        alpha = e.softmax(0)
        z = sum(alpha[j] * (v[0, 0, j] + value_table[max(-2, min(2, j - i)) + 2]) for j in range(5))
        torch.testing.assert_close(out[0, 0, i], z)


CASES = [
    # (causal, per_head, values, length, past, kv_heads, padded, key_query)
    (True, False, False, 8, 0, 4, False, False),  # L above k
    (True, False, True, 3, 0, 4, False, False),  # L below k
    (True, True, True, 9, 5, 4, False, False),  # Lq < Lk (chunked prefill with a cache)
    (True, True, False, 9, 8, 2, False, False),  # one-token decode, grouped-query attention
    (True, False, True, 10, 3, 1, True, False),  # left padding, multi-query attention
    (False, False, False, 9, 0, 4, False, False),  # bidirectional
    (False, True, True, 2, 0, 4, False, False),  # bidirectional, L below k
    (False, False, True, 11, 0, 2, True, False),  # bidirectional, padding
    (False, False, False, 9, 0, 4, True, True),  # bidirectional, key-side term (BERT relative_key_query)
    (False, True, True, 7, 0, 4, False, True),  # key-side term with per-head tables and values
]


PARAMS = [(backend, *case) for case in CASES for backend in ("eager", "sdpa") if backend == "eager" or not case[2]]


@pytest.fixture(params=["whole", "row-blocks"])
def blocks(request, monkeypatch):
    """Run each case once as one block, and once one query row per block with the bucket index built per block
    (what long inputs do)."""
    if request.param == "row-blocks":
        monkeypatch.setattr(attention_relformer, "BLOCK_ELEMENTS", 1)
        monkeypatch.setattr(attention_relformer, "MIN_BLOCK_ROWS", 1)
        monkeypatch.setattr(DistanceGrid, "WHOLE_LIMIT", 0)
    return request.param


@pytest.mark.parametrize(
    ("backend", "causal", "per_head", "values", "length", "past", "kv_heads", "padded", "key_query"), PARAMS
)
def test_attention_matches_naive_shaw(
    blocks, backend, causal, per_head, values, length, past, kv_heads, padded, key_query
):
    config = tiny_config(
        is_decoder=causal,
        relative_attention_per_head=per_head,
        relative_attention_values=values,
        relative_attention_key_query=key_query,
        num_key_value_heads=kv_heads,
        attn_implementation=backend,
    )
    torch.manual_seed(1)
    model = redraw_weights(RelformerModel(config))
    assert model.config._attn_implementation == backend
    hidden = torch.randn(2, length, config.hidden_size)
    mask = torch.ones(2, length, dtype=torch.long)
    if padded:
        mask[1, :3] = 0  # causal: left padding; bidirectional: any padding
    assert_attention_matches_naive(model, hidden, past, mask)


def test_values_refuse_other_backends():
    with pytest.raises(ValueError, match="relative_attention_values"):
        RelformerModel(tiny_config(relative_attention_values=True, attn_implementation="sdpa"))
    model = RelformerModel(tiny_config(relative_attention_values=True))
    assert model.config._attn_implementation == "eager"  # chosen by itself
    with pytest.raises(ValueError, match="relative_attention_values"):
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("scheme", ["relative", "relative_values", "relative_per_head"])
def test_long_input_blocks_give_the_same_model_outputs_and_generation(scheme, monkeypatch):
    """Whole-model check of the block path: padded batch logits, cached prefill + decode, and greedy generate."""
    model = tiny_lm(scheme)
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        whole = model(ids, attention_mask=mask).logits
        whole_generated = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    monkeypatch.setattr(attention_relformer, "BLOCK_ELEMENTS", 2 * 4 * 12 * 3)  # about 3 query rows per block
    monkeypatch.setattr(attention_relformer, "MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(DistanceGrid, "WHOLE_LIMIT", 0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[mask.bool()], whole[mask.bool()])
        prefill = model(ids[:, :9], attention_mask=mask[:, :9], use_cache=True)
        step = model(ids[:, 9:], attention_mask=mask, cache=cache_of(prefill))
        torch.testing.assert_close(step.logits[mask[:, 9:].bool()], whole[:, 9:][mask[:, 9:].bool()])
        assert model.generate(ids[:1], max_new_tokens=8, do_sample=False).tolist() == whole_generated.tolist()
        prefill = model(ids[:1, :5], use_cache=True)  # no mask at all: the blocks build their causal mask
        step = model(ids[:1, 5:], cache=cache_of(prefill))
        torch.testing.assert_close(step.logits, model(ids[:1]).logits[:, 5:], atol=1e-4, rtol=1e-4)
