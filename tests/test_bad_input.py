"""Bad input gets a clear error naming the problem; edge cases that are valid give correct, finite results."""

import pytest
import torch

from hf_relformer import (
    RelformerForCausalLM,
    RelformerForMaskedLM,
    RelformerForSequenceClassification,
    RelformerForTokenClassification,
)
from hf_relformer.modeling_relformer import cache_of

from helpers import SCHEMES, redraw_weights, skip_without_encoder, tiny_config, tiny_lm, tiny_seq2seq

IDS = torch.tensor([[3, 4, 5, 6]])


def tiny_encoder(head=RelformerForMaskedLM, scheme: str = "relative", **overrides):
    skip_without_encoder(scheme)
    torch.manual_seed(0)
    return redraw_weights(head(tiny_config(is_decoder=False, **SCHEMES[scheme], **overrides)))


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (torch.tensor([[3, 64]]), r"input_ids must be in \[0, 64\).*from 3 to 64"),
        (torch.tensor([[-1, 3]]), r"input_ids must be in \[0, 64\).*from -1 to 3"),
        (torch.tensor([3, 4, 5]), r"shape \[batch, length\].*\(3,\)"),
        (torch.tensor([[3.0, 4.0]]), "integer token ids"),
        (torch.zeros(1, 0, dtype=torch.long), r"empty.*\[1, 0\]"),
        (torch.zeros(0, 3, dtype=torch.long), r"empty.*\[0, 3\]"),
    ],
)
def test_bad_input_ids_are_named(lm, ids, match):
    with pytest.raises(ValueError, match=match):
        lm(ids)


def test_out_of_vocabulary_ids_are_caught_in_every_form_and_in_generate(lm):
    with pytest.raises(ValueError, match="input_ids must be in"):
        lm.generate(torch.tensor([[3, 99]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must be in"):
        tiny_encoder()(torch.tensor([[3, 99]]))
    seq2seq = tiny_seq2seq()
    with pytest.raises(ValueError, match="input_ids must be in"):
        seq2seq(torch.tensor([[3, 99]]), decoder_input_ids=torch.tensor([[1]]))
    with pytest.raises(ValueError, match="input_ids must be in"):  # the decoder's ids
        seq2seq(torch.tensor([[3, 4]]), decoder_input_ids=torch.tensor([[1, 70]]))


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (torch.ones(1, 3), r"attention_mask must have shape \[batch, length\] = \[1, 4\].*got \[1, 3\]"),
        (torch.ones(1, 5), r"= \[1, 4\].*got \[1, 5\]"),
        (torch.ones(4), r"got \[4\]"),
        (torch.ones(2, 4), r"got \[2, 4\]"),
        (torch.ones(1, 4, 4), r"got \[1, 4, 4\]"),
        (torch.tensor([[0.0, 0.0, float("-inf"), 0.0]]), "1 for tokens and 0 for padding.*additive"),
        (torch.tensor([[1, 1, 2, 1]]), "1 for tokens and 0 for padding"),
        (torch.ones(2, 1, 4, 4), r"4-D attention_mask must have shape \[1 or 1"),
    ],
)
def test_bad_attention_masks_are_named(lm, mask, match):
    with pytest.raises(ValueError, match=match):
        lm(IDS, attention_mask=mask)


def test_masks_of_any_dtype_give_the_same_result(lm):
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        reference = lm(ids, attention_mask=mask).logits
        for dtype in (torch.bool, torch.int32, torch.float32, torch.float16):
            torch.testing.assert_close(lm(ids, attention_mask=mask.to(dtype)).logits, reference, rtol=0, atol=0)


def test_a_cached_step_needs_the_mask_of_all_tokens(lm):
    with torch.no_grad():
        past = cache_of(lm(IDS, use_cache=True))
        with pytest.raises(ValueError, match=r"counts the cached tokens.*got \[1, 1\]"):
            lm(torch.tensor([[7]]), attention_mask=torch.ones(1, 1), cache=past)


def test_other_inputs_of_the_wrong_shape_are_named(lm):
    with pytest.raises(ValueError, match=r"position_ids must have shape \[batch or 1, 4\]"):
        lm(IDS, position_ids=torch.arange(3)[None])
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \[batch, length, 32\]"):
        lm(inputs_embeds=torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        lm()
    encoder = tiny_encoder(type_vocab_size=2)
    with pytest.raises(ValueError, match=r"token_type_ids must have the inputs' shape \[1, 4\]"):
        encoder(IDS, token_type_ids=torch.zeros(1, 3, dtype=torch.long))
    seq2seq = tiny_seq2seq()
    with pytest.raises(ValueError, match=r"encoder attention_mask must have shape .* = \[1, 4\]"):
        seq2seq.model.decoder(
            input_ids=torch.tensor([[1]]),
            encoder_hidden_states=torch.randn(1, 4, 32),
            encoder_attention_mask=torch.ones(1, 5),
        )


@pytest.mark.parametrize(
    ("make", "inputs", "labels", "match"),
    [
        (tiny_lm, {"input_ids": IDS}, torch.tensor([[3, 4]]), r"labels must have shape \[1, 4\].*got \[1, 2\]"),
        (tiny_lm, {"input_ids": IDS}, torch.tensor([[3, 4, 5, 6]] * 2), r"got \[2, 4\]"),
        (tiny_lm, {"input_ids": IDS}, torch.tensor([[3, 4, 64, -100]]), r"-100 \(ignored\) or in \[0, 64\).*64"),
        (tiny_encoder, {"input_ids": IDS}, torch.tensor([[3, 4, 5]]), r"labels must have shape \[1, 4\]"),
        (
            tiny_seq2seq,
            {"input_ids": IDS, "decoder_input_ids": torch.tensor([[1, 3, 4]])},
            torch.tensor([[3, 4]]),
            r"labels must have shape \[1, 3\] \(one per decoder input token\)",
        ),
        (
            lambda: tiny_encoder(RelformerForTokenClassification, num_labels=3),
            {"input_ids": IDS},
            torch.tensor([[0, 1, 3, -100]]),
            r"in \[0, 3\)",
        ),
        (
            lambda: tiny_encoder(RelformerForSequenceClassification, num_labels=3),
            {"input_ids": IDS},
            torch.tensor([0, 1]),
            r"one entry per sequence \(1\)",
        ),
    ],
)
def test_labels_that_do_not_fit_are_named(make, inputs, labels, match):
    with pytest.raises(ValueError, match=match):
        make()(**inputs, labels=labels)


def test_logits_to_keep_with_labels_is_refused(lm):
    with pytest.raises(ValueError, match=r"labels must have shape \[1, 1\]"):
        lm(IDS, labels=IDS, logits_to_keep=1)


def rows_alone_and_batched(model, rows: list[list[int]], left: bool, **kwargs):
    """Each row run alone, and all rows in one padded batch (padding on the left or right); real positions only."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, **kwargs).logits
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row]), **kwargs).logits[0]
            real = mask[i].bool() if batched.dim() == 3 else slice(None)
            yield alone, batched[i][real] if batched.dim() == 3 else batched[i]


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_a_row_gives_the_same_result_alone_or_in_a_padded_batch(scheme):
    rows = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    for alone, batched in rows_alone_and_batched(tiny_lm(scheme), rows, left=True):
        torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    for alone, batched in rows_alone_and_batched(tiny_encoder(scheme=scheme), rows, left=False):
        torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    classifier = tiny_encoder(RelformerForSequenceClassification, scheme=scheme, num_labels=3)
    for alone, batched in rows_alone_and_batched(classifier, rows, left=False):
        torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def padded_with_an_empty_row(length: int, dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(3, 64, (3, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1] = 0  # a row of padding only
    mask[2, : length // 2] = 0  # a half-padded row
    return ids, mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("scheme", "backend"),
    [
        (scheme, backend)
        for scheme in SCHEMES
        for backend in ("eager", "sdpa")
        if backend == "eager" or "values" not in scheme
    ],
)
def test_fully_masked_rows_never_give_nan(scheme, backend, dtype):
    """A row of padding only has nothing to attend to: its outputs are arbitrary but finite, and the other rows are
    unaffected (decoder, encoder, and an encoder-decoder whose source row is all padding; relative values run eager
    only). fp64 keeps its softmax in fp64: in fp32 its mask minimum is -inf and a padded row would give NaN."""
    ids, mask = padded_with_an_empty_row(12)
    models = [
        tiny_lm(scheme, attn_implementation=backend),
        tiny_encoder(scheme=scheme, attn_implementation=backend),
        tiny_seq2seq(scheme, attn_implementation=backend),
    ]
    for model in models:
        model.to(dtype)
        kwargs = {"decoder_input_ids": ids[:, :5]} if model.config.is_encoder_decoder else {}
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, **kwargs).logits
            first = model(ids[:1], attention_mask=mask[:1], **{k: v[:1] for k, v in kwargs.items()}).logits
        assert torch.isfinite(logits).all(), (type(model).__name__, scheme, backend, dtype)
        tolerance = 0 if dtype in (torch.float32, torch.float64) else 0.05 * float(first.abs().max())
        torch.testing.assert_close(logits[:1], first, rtol=0, atol=max(tolerance, 1e-4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["relative", "relative_values_per_head", "sinusoidal", "rotary"])
def test_half_precision_stays_finite_and_close_on_long_inputs(scheme, dtype):
    """1,100 tokens, so that relative attention runs in blocks; half-precision weights stay finite and follow fp32
    to a tolerance relative to the logits' scale: 5% for fp16, 10% for bf16 (8 bits of mantissa; these random weights
    make attention sharp)."""
    model = tiny_lm(scheme, max_position_embeddings=2048, num_hidden_layers=1)
    ids, mask = padded_with_an_empty_row(1100)
    with torch.no_grad():
        reference = model(ids[2:], attention_mask=mask[2:]).logits
        half = model.to(dtype)(ids, attention_mask=mask).logits
    assert torch.isfinite(half).all()
    real = mask[2].bool()
    error = (half[2][real].float() - reference[0][real]).abs().max()
    tolerance = 0.05 if dtype == torch.float16 else 0.1
    assert error < tolerance * reference.abs().max(), (float(error), float(reference.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["sinusoidal", "rotary"])
def test_position_angles_stay_exact_after_casting_the_model_to_half_precision(scheme, dtype):
    """`model.to(half)` casts the frequency buffers too; rounded frequencies would put the angle of position 2000 off
    by radians. The tables must equal fp32's up to the rounding of their values in [-1, 1]."""
    positions = tiny_lm(scheme, max_position_embeddings=4096).model.embed_positions
    position_ids = torch.arange(2000)[None]

    def tables(dtype: torch.dtype) -> torch.Tensor:
        embeds, layer_inputs = positions.to(dtype)(torch.zeros(1, 2000, 32, dtype=dtype), position_ids, 0, 2000)
        return torch.cat([embeds] if layer_inputs is None else list(layer_inputs), dim=-1).float()

    reference = tables(torch.float32)
    torch.testing.assert_close(tables(dtype), reference, rtol=0, atol=2 * torch.finfo(dtype).eps)


def test_long_inputs_beyond_learned_positions_are_refused_but_relative_ones_run():
    ids = torch.randint(3, 64, (1, 100))
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        tiny_lm("learned")(ids)
    with torch.no_grad():
        assert tiny_lm("relative")(ids).logits.shape == (1, 100, 64)  # 100 > max_position_embeddings: unused


def test_batch_of_one_and_of_many_generate_the_same(lm):
    prompts = [[3, 4, 5], [6, 7, 8]]
    ids = torch.tensor(prompts)
    together = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    for i, prompt in enumerate(prompts):
        alone = lm.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0].tolist()
        assert together[i].tolist() == alone + [lm.config.pad_token_id] * (together.shape[1] - len(alone))


def test_the_model_checks_inputs_before_touching_the_embedding(lm):
    """The check must come before the embedding lookup: on a GPU an out-of-range id is a device-side assert that
    kills the process (CPU raises IndexError); here, the embedding must never see it."""
    seen = []
    handle = lm.model.embed_tokens.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with pytest.raises(ValueError):
            lm(torch.tensor([[3, 200]]))
    finally:
        handle.remove()
    assert not seen


def test_causal_lm_refuses_an_encoder_config():
    with pytest.raises(ValueError, match="decoder-only"):
        RelformerForCausalLM(tiny_config(is_decoder=False))
