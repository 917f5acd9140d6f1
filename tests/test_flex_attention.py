"""attn_implementation="flex_attention" for every scheme and form, checked against eager attention on CPU (forward
only: torch has no flex backward on CPU).

Every scheme variant in each form (decoder-only, encoder, encoder-decoder with cross-attention) gives eager's outputs
on a padded batch, and with a cache (a prefill, then one token at a time) eager's uncached logits; cached generate()
gives the logits of an uncached forward of each row; Shaw's values term computed from the kernel's log-sum-exp (a
band of keys within distance k, the rest by subtraction) equals eager's term from the probabilities; the position
term never builds an `[Lq, Lk]` grid; training on CPU is refused with the backends that can train.
"""

import pytest
import torch
from test_generation_logits import PROMPTS, generate, left_padded, uncached_logits
from transformers.masking_utils import and_masks

from hf_relformer import RelformerModel
from hf_relformer.attention_relformer import AttentionMask, run_flex_attention
from hf_relformer.modeling_relformer import cache_of
from hf_relformer.positions_relformer import DistanceGrid, RelativeBuckets, ShawRelativeAttention, relative_values_term

from helpers import SCHEMES, redraw_weights, skip_without_encoder, tiny_config, tiny_lm, tiny_seq2seq

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
FLEX = "flex_attention"


# One layer per stack: torch's unfused CPU flex attention costs about 0.1 s a call, whatever the size
ONE_LAYER = {"num_hidden_layers": 1, "decoder_layers": 1}


def one_layer_lm(scheme: str, **overrides):
    return tiny_lm(scheme, num_hidden_layers=1, **overrides)


def one_layer_encoder(scheme: str, **overrides) -> RelformerModel:
    skip_without_encoder(scheme)
    torch.manual_seed(0)
    config = tiny_config(**SCHEMES[scheme], is_decoder=False, num_hidden_layers=1, **overrides)
    return redraw_weights(RelformerModel(config))


def one_layer_seq2seq(scheme: str, **overrides):
    return tiny_seq2seq(scheme, **ONE_LAYER, **overrides)


FORMS = {"decoder-only": one_layer_lm, "encoder": one_layer_encoder, "encoder-decoder": one_layer_seq2seq}


def outputs(model, ids, mask, decoder_ids=None) -> torch.Tensor:
    """The model's logits (or last hidden state) at the real tokens."""
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        out = model(ids, attention_mask=mask)
        return out.last_hidden_state[mask.bool()] if isinstance(model, RelformerModel) else out.logits[mask.bool()]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_flex_equals_eager_on_a_padded_batch(form, scheme):
    model = FORMS[form](scheme)
    ids, mask = left_padded(PROMPTS)  # an encoder's padding may sit anywhere: on the left here
    decoder_ids = torch.tensor([[1, 9, 23, 4, 50], [1, 30, 7, 19, 5], [1, 60, 8, 41, 12]])
    eager = outputs(model, ids, mask, decoder_ids)
    model.set_attn_implementation(FLEX)
    assert model.config._attn_implementation == FLEX
    torch.testing.assert_close(outputs(model, ids, mask, decoder_ids), eager, **TOLERANCE)


@pytest.mark.parametrize(
    ("form", "overrides"),
    [
        ("encoder", {"relative_attention_key_query": True}),  # plus k_j·a^K, in the band too
        ("decoder-only", {"num_key_value_heads": 2}),  # grouped-query attention
        ("encoder", {"num_key_value_heads": 2}),
    ],
)
def test_flex_equals_eager_for_key_query_and_grouped_query_attention(form, overrides):
    model = FORMS[form]("relative_values", **overrides)
    ids, mask = left_padded(PROMPTS)
    eager = outputs(model, ids, mask)
    model.set_attn_implementation(FLEX)
    torch.testing.assert_close(outputs(model, ids, mask), eager, **TOLERANCE)


GENERATING_FORMS = {"decoder-only": one_layer_lm, "encoder-decoder": one_layer_seq2seq}


@pytest.mark.parametrize("form", GENERATING_FORMS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_flex_with_a_cache_equals_eager_without(form, scheme):
    """A left-padded batch: a prefill, then two steps of one token under flex, against eager's uncached logits."""
    model = GENERATING_FORMS[form](scheme)
    ids, mask = left_padded(PROMPTS)
    steps = [(0, ids.shape[1] - 2), (ids.shape[1] - 2, ids.shape[1] - 1), (ids.shape[1] - 1, ids.shape[1])]
    with torch.no_grad():
        if form == "encoder-decoder":
            decoder_ids = ids.flip(1).clamp(min=1)  # unpadded decoder inputs, padded encoder inputs

            def forward(start, stop, **kwargs):
                return model(ids, attention_mask=mask, decoder_input_ids=decoder_ids[:, start:stop], **kwargs)

            real = torch.ones_like(decoder_ids, dtype=torch.bool)
        else:

            def forward(start, stop, **kwargs):
                return model(ids[:, start:stop], attention_mask=mask[:, :stop], **kwargs)

            real = mask.bool()
        eager = forward(0, ids.shape[1], use_cache=False).logits
        model.set_attn_implementation(FLEX)
        cache, pieces = None, []
        for start, stop in steps:
            out = forward(start, stop, use_cache=True, cache=cache)
            cache = cache_of(out)
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1)[real], eager[real], **TOLERANCE)


@pytest.mark.parametrize(("form", "scheme"), [("decoder-only", "relative_values_per_head"),
                                             ("encoder-decoder", "relative_values")])  # fmt: skip
def test_cached_generate_under_flex_gives_the_logits_of_an_uncached_forward(form, scheme):
    model = GENERATING_FORMS[form](scheme, attn_implementation=FLEX)
    ids, mask = left_padded(PROMPTS)
    new = {"max_new_tokens": 5, "min_new_tokens": 5}
    out = generate(model, ids, mask, **new)
    logits = torch.stack(out.logits, dim=1)
    tokens = out.sequences if form == "encoder-decoder" else out.sequences[:, ids.shape[1] :]
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(logits[row], uncached_logits(model, prompt, tokens[row]), **TOLERANCE)
    model.set_attn_implementation("eager")
    assert generate(model, ids, mask, **new).sequences.tolist() == out.sequences.tolist()


@pytest.mark.parametrize("form", GENERATING_FORMS)
def test_static_cache_generate_under_flex_equals_dynamic(form):
    """With a static cache generate() prepares the masks itself: under flex the stacks still build theirs."""
    model = GENERATING_FORMS[form]("relative_values", attn_implementation=FLEX)
    ids, mask = left_padded(PROMPTS)
    dynamic = generate(model, ids, mask, max_new_tokens=4, min_new_tokens=4)
    static = generate(model, ids, mask, max_new_tokens=4, min_new_tokens=4, cache_implementation="static")
    torch.testing.assert_close(torch.stack(static.logits, 1), torch.stack(dynamic.logits, 1), **TOLERANCE)


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
@pytest.mark.parametrize(
    ("causal", "query_length", "past"), [(True, 7, 0), (True, 3, 6), (True, 1, 2), (False, 7, 0), (False, 2, 0)]
)
def test_values_term_from_the_log_sum_exp_equals_eager_values_term(causal, query_length, past, per_head):
    """`ShawTerms.values_from_lse` (a band of `W` keys, the clipped buckets by subtraction and, bidirectional, a
    second log-sum-exp through `lse_of`) against its `values` of the eager probabilities; left padding in row 1, k = 3
    below and above the length, and a query that sees no key at all (row 1's first, causal: its term only has to be
    finite)."""
    config = tiny_config(relative_attention_values=True, relative_attention_per_head=per_head)
    part = ShawRelativeAttention(config, causal)
    generator = torch.Generator().manual_seed(0)
    for parameter in part.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator)
    key_length = past + query_length
    query = torch.randn(2, 4, query_length, 8, generator=generator)
    key, value = (torch.randn(2, 4, key_length, 8, generator=generator) for _ in range(2))
    grid = DistanceGrid.of(
        (torch.arange(query_length) + past)[None], past, key_length, RelativeBuckets(config, causal).transform
    )
    tokens = torch.ones(2, key_length, dtype=torch.bool)
    tokens[1, : min(3, key_length - 1)] = False
    mask = AttentionMask.of(tokens.long(), 2, query_length, key_length, causal, past)
    terms = part(query, key, grid)
    score_mod, mask_mod = terms.score_mod(), mask.mask_mod()
    _, lse = run_flex_attention(query, key, value, score_mod, mask.block_mask(query.device), part.scaling, True)
    regions = []

    def lse_of(region):
        regions.append(region)
        region_mask = mask.block_mask_of(and_masks(mask_mod, region), query.device)
        return run_flex_attention(query, key, value, score_mod, region_mask, part.scaling, True)[1]

    term = terms.values_from_lse(lse, mask_mod, lse_of)
    assert len(regions) == (0 if causal else 1)

    scores = query @ key.transpose(-1, -2) * part.scaling + terms.bias(0, query_length, key_length)
    allowed = mask.allowed(0, query_length, key_length, query.device).expand(2, 1, query_length, key_length)
    probabilities = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    bucket_index = grid.block(0, query_length, key_length)
    expected = relative_values_term(probabilities, bucket_index, part.relative_value_table, per_head)
    sees_a_key = allowed.any(-1).expand(-1, 4, -1)  # [B, H, Lq]
    torch.testing.assert_close(term[sees_a_key], expected[sees_a_key], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(term).all()


@pytest.mark.parametrize("scheme", ["relative_values", "t5"])
def test_flex_never_builds_an_lq_by_lk_grid(scheme, monkeypatch):
    """The score_mods read `[B, H, L, R]` products and an `O(L)` line of the grid, never a block of it."""
    model = one_layer_lm(scheme, attn_implementation=FLEX)
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits[mask.bool()]
    monkeypatch.setattr(DistanceGrid, "WHOLE_LIMIT", 0)

    def refuse(*args):
        raise AssertionError("an [Lq, Lk] block of the distance grid was built")

    monkeypatch.setattr(DistanceGrid, "block", refuse)
    monkeypatch.setattr(DistanceGrid, "_build", refuse)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[mask.bool()], expected)


@pytest.mark.parametrize(
    ("scheme", "alternatives"), [("relative", "'eager' or 'sdpa'"), ("relative_values", "'eager'")]
)
def test_training_under_flex_on_cpu_names_the_backends_that_can(scheme, alternatives):
    model = one_layer_lm(scheme, attn_implementation=FLEX).train()
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(NotImplementedError, match=f"cannot train on CPU.*attn_implementation={alternatives}"):
        model(ids, labels=ids).loss.backward()
    with torch.no_grad():  # inference in train mode is fine (no dropout in these models)
        model(ids)
    model.set_attn_implementation(alternatives.split(" or ")[0].strip("'"))
    model(ids, labels=ids).loss.backward()


def test_attention_dropout_under_flex_is_refused_in_training():
    model = one_layer_lm("relative", attn_implementation=FLEX, attention_dropout=0.1).train()
    with torch.no_grad(), pytest.raises(ValueError, match="no attention dropout"):
        model(torch.tensor([PROMPTS[0]]))
    with torch.no_grad():
        model.eval()(torch.tensor([PROMPTS[0]]))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_accepts_flex_and_keeps_its_default(scheme):
    config = tiny_config(**SCHEMES[scheme])
    assert FLEX in config.position_scheme.backends(config)
    default = one_layer_lm(scheme).config._attn_implementation
    assert default == ("eager" if "values" in scheme else "sdpa")
    assert one_layer_lm(scheme, attn_implementation=FLEX).config._attn_implementation == FLEX
