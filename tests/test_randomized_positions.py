"""Randomized positions (Ruoss et al. 2023, `randomized_position_range`): in training each sequence's position ids
are a sorted random sample from `[0, N)`, and every scheme (absolute, rotary, and the distances of the bias schemes)
reads them; evaluation and `generate()` use the ordinary positions."""

import pytest
import torch
from test_generation_logits import PROMPTS, generate, left_padded, uncached_logits

from hf_relformer import RelformerConfig

from helpers import SCHEMES, tiny_config, tiny_lm, tiny_seq2seq

RANGE = 64  # the tiny models' learned table: the largest range a learned scheme can sample from


def positions_seen(stack: torch.nn.Module) -> list[torch.Tensor]:
    """The position ids a stack's position part receives, one entry per forward."""
    seen = []
    stack.embed_positions.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    return seen


def assert_sorted_samples(positions: torch.Tensor, real: torch.Tensor | None = None) -> None:
    """Each row's real positions are distinct, increasing, inside [0, RANGE), and rows differ."""
    for i, row in enumerate(positions):
        row = row if real is None else row[real[i]]
        assert (row[1:] > row[:-1]).all() and row.min() >= 0 and row.max() < RANGE, row
    assert not torch.equal(positions[0], positions[1])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_positions_are_sorted_samples_that_every_scheme_reads(scheme):
    """Training mode: the positions are sorted samples, the same under the same seed; the logits are those of an
    evaluation forward given those positions (so the bias schemes' distances come from them too), and differ from the
    ordinary positions' (except without positions)."""
    model = tiny_lm(scheme, randomized_position_range=RANGE).train()
    seen = positions_seen(model.model)
    ids = torch.randint(3, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    logits = model(ids).logits
    positions = seen[-1]
    assert positions.shape == ids.shape
    assert_sorted_samples(positions)
    torch.manual_seed(0)
    torch.testing.assert_close(model(ids).logits, logits, atol=0, rtol=0)
    assert torch.equal(seen[-1], positions)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, position_ids=positions).logits, logits, atol=1e-5, rtol=1e-5)
        ordinary = model(ids).logits
    assert torch.equal(seen[-1], torch.arange(12)[None])  # evaluation: the ordinary positions
    if scheme != "none":
        assert not torch.allclose(ordinary, logits, atol=1e-3)


def test_padding_keeps_the_real_tokens_positions_sorted_samples():
    model = tiny_lm("learned", randomized_position_range=RANGE).train()
    seen = positions_seen(model.model)
    ids, mask = left_padded(PROMPTS)
    model(ids, attention_mask=mask)
    assert_sorted_samples(seen[-1], mask.bool())


@pytest.mark.parametrize("scheme", ["relative", "rotary"])
def test_both_stacks_of_an_encoder_decoder_train_on_randomized_positions(scheme):
    model = tiny_seq2seq(scheme, randomized_position_range=RANGE).train()
    encoder_seen, decoder_seen = positions_seen(model.model.encoder), positions_seen(model.model.decoder)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    model(ids, decoder_input_ids=ids[:, :7])
    assert_sorted_samples(encoder_seen[-1])
    assert_sorted_samples(decoder_seen[-1])


@pytest.mark.parametrize("scheme", ["relative", "learned", "rotary", "fire"])
def test_generate_uses_the_ordinary_positions_even_in_training_mode(scheme):
    """`generate()` runs without gradients: the positions are the ordinary ones even if the model was left in training
    mode, so its cached logits are those of one uncached evaluation forward per row."""
    model = tiny_lm(scheme, randomized_position_range=RANGE).train()
    ids, mask = left_padded(PROMPTS)
    out = generate(model, ids, mask)
    model.eval()
    logits = torch.stack(out.logits, dim=1)
    new = out.sequences[:, ids.shape[1] :]
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(logits[row], uncached_logits(model, prompt, new[row]), atol=1e-4, rtol=1e-4)


def test_a_range_below_the_training_length_is_an_error():
    model = tiny_lm("rotary", randomized_position_range=8).train()
    with pytest.raises(ValueError, match="randomized_position_range=8 is smaller than this training input's 12"):
        model(torch.ones(1, 12, dtype=torch.long))
    model.eval()
    with torch.no_grad():
        model(torch.ones(1, 12, dtype=torch.long))  # evaluation reads the ordinary positions: any length


@pytest.mark.parametrize("value", [0, -3, 2.5, "64", True])
def test_the_range_is_a_positive_integer(value):
    with pytest.raises(ValueError, match="randomized_position_range must be a positive integer"):
        tiny_config(randomized_position_range=value)


def test_a_learned_table_bounds_the_range():
    with pytest.raises(ValueError, match=r"randomized_position_range=65 .*\(64 positions, max_position_embeddings\)"):
        tiny_config(position_embedding_type="learned", randomized_position_range=65)
    assert RelformerConfig(position_embedding_type="rotary", randomized_position_range=10**6).randomized_position_range
