"""The scalar-bias schemes against their sources: T5's buckets (transformers' T5Attention), ALiBi's slopes (the
paper's and BLOOM's) and bias, and the blocked path (long inputs) against one whole block."""

import pytest
import torch
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
from transformers.models.t5.modeling_t5 import T5Attention

from hf_relformer import RelformerModel, modeling_relformer
from hf_relformer.positions_relformer import DistanceGrid, alibi_slopes, t5_relative_position_bucket

from helpers import SCHEMES, scheme_of, tiny_config, tiny_lm, tiny_seq2seq

BIAS_SCHEMES = [name for name in SCHEMES if scheme_of(name).attention_part.adds_bias]


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("buckets", "max_distance"), [(32, 128), (8, 20), (6, 7)])
def test_t5_buckets_equal_transformers_t5(bidirectional, buckets, max_distance):
    distance = torch.arange(-300, 301)[None] - torch.arange(0, 5)[:, None]
    expected = T5Attention._relative_position_bucket(distance, bidirectional, buckets, max_distance)
    assert torch.equal(t5_relative_position_bucket(distance, bidirectional, buckets, max_distance), expected)


@pytest.mark.parametrize("form", ["decoder", "seq2seq"])
@pytest.mark.parametrize("scheme", BIAS_SCHEMES)
def test_blocks_of_query_rows_give_the_whole_result(scheme, form, monkeypatch):
    """Every bias scheme runs through the same blocked path: one query row per block, with the grid built per block
    (what a long input does), gives the logits of one whole block."""
    ids = torch.randint(3, 64, (2, 23), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    if form == "decoder":
        model = tiny_lm(scheme)
        inputs = {"input_ids": ids, "attention_mask": mask}
    else:
        model = tiny_seq2seq(scheme)
        inputs = {"input_ids": ids, "attention_mask": mask.flip(-1), "decoder_input_ids": ids[:, :11]}
    with torch.no_grad():
        whole = model(**inputs).logits
        monkeypatch.setattr(modeling_relformer, "BLOCK_ELEMENTS", 1)
        monkeypatch.setattr(modeling_relformer, "MIN_BLOCK_ROWS", 1)
        monkeypatch.setattr(DistanceGrid, "WHOLE_LIMIT", 0)
        blocked = model(**inputs).logits
    real = inputs["attention_mask"].bool() if form == "decoder" else torch.ones(2, 11, dtype=torch.bool)
    torch.testing.assert_close(blocked[real], whole[real], atol=1e-4, rtol=1e-4)  # large weights: float order


@pytest.mark.parametrize("heads", range(1, 25))
def test_alibi_slopes_equal_blooms_and_the_papers(heads):
    """Press et al.: 2^(-8i/n) for n a power of two; BLOOM's slopes (the paper's rule for other head counts)."""
    slopes = alibi_slopes(heads)
    assert torch.equal(slopes, _get_alibi_slopes(heads, torch.device("cpu")))
    if heads & (heads - 1) == 0:
        expected = torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)])
        torch.testing.assert_close(slopes, expected, atol=0, rtol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_bias_is_minus_slope_times_distance(causal):
    """The bias of every query-key pair, past keys from a cache included: -m_h·|j - i| (causal rows see j <= i)."""
    stack_part = RelformerModel(tiny_config(**SCHEMES["alibi"], is_decoder=causal)).embed_positions
    _, grid = stack_part(torch.zeros(1, 4, 32), None, 3, 7)  # queries at 3..6, keys at 0..6
    slopes = alibi_slopes(4)
    distance = torch.arange(7)[None] - torch.arange(3, 7)[:, None]
    torch.testing.assert_close(grid.block(0, 4, 7), -slopes[:, None, None] * distance.abs())
