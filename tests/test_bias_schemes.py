"""The scalar-bias schemes against their sources: T5's buckets (transformers' T5Attention), ALiBi's slopes (the
paper's and BLOOM's) and bias, and the blocked path (long inputs) against one whole block."""

import pytest
import torch
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
from transformers.models.t5.modeling_t5 import T5Attention

from hf_relformer import RelformerConfig, RelformerModel, attention_relformer
from hf_relformer.positions_relformer import DistanceGrid, alibi_slopes, t5_relative_position_bucket
from hf_relformer.variants import scheme_variants, with_horizon

from helpers import SCHEMES, scheme_of, tiny_config, tiny_lm, tiny_seq2seq

BIAS_SCHEMES = [name for name in SCHEMES if getattr(scheme_of(name).attention_part.terms, "adds_bias", False)]


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
        monkeypatch.setattr(attention_relformer, "BLOCK_ELEMENTS", 1)
        monkeypatch.setattr(attention_relformer, "MIN_BLOCK_ROWS", 1)
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
    _, grid = stack_part(torch.zeros(1, 4, 32), torch.arange(3, 7)[None], 3, 7)  # queries at 3..6, keys at 0..6
    slopes = alibi_slopes(4)
    distance = torch.arange(7)[None] - torch.arange(3, 7)[:, None]
    torch.testing.assert_close(grid.block(0, 4, 7)[0], -slopes[:, None, None] * distance.abs())


@pytest.mark.parametrize("causal", [True, False])
def test_kerple_bias_is_its_log_kernel_of_the_distance_in_every_layer(causal):
    """Every query-key pair, past keys included: `-r1·log(1 + r2·|j - i|)` with each layer's own r1, r2 per head
    (clamped at 0.01), initialised as the paper's code (r1 in [0, 2), r2 in [0, 1))."""
    model = RelformerModel(tiny_config(**SCHEMES["kerple"], is_decoder=causal))
    _, grid = model.embed_positions(torch.zeros(1, 4, 32), torch.arange(3, 7)[None], 3, 7)  # queries 3..6, keys 0..6
    distance = torch.arange(7)[None] - torch.arange(3, 7)[:, None]
    biases = []
    for layer in model.layers:
        part = layer.self_attn.position
        assert ((part.kerple_power >= 0) & (part.kerple_power < 2)).all() and (part.kerple_scale < 1).all()
        with torch.no_grad():
            part.kerple_scale[0] = -1.0  # clamped to 0.01
        power, scale = part.kerple_power.detach().clamp(min=0.01), part.kerple_scale.detach().clamp(min=0.01)
        expected = -power[:, None, None] * torch.log1p(scale[:, None, None] * distance.abs())
        biases.append(part(torch.zeros(1, 4, 4, 8), torch.zeros(1, 4, 7, 8), grid).bias(0, 4, 7)[0])
        torch.testing.assert_close(biases[-1], expected)
    assert not torch.allclose(biases[0], biases[1])  # each layer its own kernel


@pytest.mark.parametrize("max_distance", [4, 8, 16, 64])
def test_every_scheme_takes_the_demos_horizon_and_t5_clips_there(max_distance):
    for overrides in scheme_variants(featured_only=True).values():
        RelformerConfig(**with_horizon(overrides, max_distance))  # raises for a scheme the knob cannot set up
    t5 = with_horizon({"position_embedding_type": "t5"}, max_distance)
    assert with_horizon({"position_embedding_type": "relative"}, max_distance)["relative_attention_max_distance"] == (
        max_distance
    )
    assert with_horizon({"position_embedding_type": "alibi"}, max_distance) == {"position_embedding_type": "alibi"}
    buckets = t5_relative_position_bucket(
        -torch.arange(4 * max_distance), False, t5["relative_attention_num_buckets"], max_distance
    )
    assert (buckets[max_distance - 1 :] == max_distance - 1).all()  # one bucket for every distance from k - 1 on
    assert (buckets[: max_distance // 2] == torch.arange(max_distance // 2)).all()  # exact below k / 2
    assert len(set(buckets[:max_distance].tolist())) >= 0.9 * max_distance  # and nearly one per distance below k


def test_xpos_scores_are_rotary_scores_decayed_per_dimension_by_the_distance():
    """q_n·k_m after xPos == Σ_d (R_n q)_d (R_m k)_d ζ_d^((n - m)/512), with Sun et al.'s ζ_i = (2i + 0.4·D) / (1.4·D)
    (torchscale's `xpos.py`) and R the rotary rotation of each position; keys from a cache (positions 0..9)."""
    model = RelformerModel(tiny_config(**SCHEMES["xpos"], num_hidden_layers=1))
    rotary = RelformerModel(tiny_config(**SCHEMES["rotary"], num_hidden_layers=1))
    dim, positions = model.config.head_dim, torch.arange(10)[None]
    query, key = torch.randn(2, 1, 10, dim), torch.randn(2, 1, 10, dim)
    _, xpos_inputs = model.embed_positions(torch.zeros(1, 10, 32), positions * 300, 0, 10)  # far: a strong decay
    _, rotary_inputs = rotary.embed_positions(torch.zeros(1, 10, 32), positions * 300, 0, 10)
    q, k = model.layers[0].self_attn.position.before_cache(query, key, xpos_inputs)
    rq, rk = rotary.layers[0].self_attn.position.before_cache(query, key, rotary_inputs)
    zeta = (torch.arange(0, dim, 2) + 0.4 * dim) / (1.4 * dim)
    distance = (positions[0, :, None] - positions[0, None, :]) * 300  # n - m
    decay = torch.cat((zeta, zeta))[:, None, None] ** (distance / 512)  # [D, n, m]
    expected = torch.einsum("bhnd,bhmd,dnm->bhnm", rq, rk, decay)
    torch.testing.assert_close(q @ k.transpose(-1, -2), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, rq @ rk.transpose(-1, -2), atol=1e-2)  # the decay is not negligible here


def test_distances_come_from_the_position_ids_per_row():
    """The grid's distances are those of the given positions (sorted random ones, say), per row when rows differ, and
    a cache's earlier keys continue the first query's position: -m·|p_j - p_i| for ALiBi."""
    stack_part = RelformerModel(tiny_config(**SCHEMES["alibi"])).embed_positions
    positions = torch.tensor([[0, 3, 4, 9], [2, 5, 11, 12]])
    _, grid = stack_part(torch.zeros(2, 4, 32), positions, 0, 4)
    slopes = alibi_slopes(4)[None, :, None, None]
    expected = -slopes * (positions[:, None, None, :] - positions[:, None, :, None]).abs()
    torch.testing.assert_close(grid.block(0, 4, 4), expected)
    _, grid = stack_part(torch.zeros(2, 1, 32), torch.tensor([[7], [4]]), 5, 6)  # decoding: row 1 had 3 pads
    keys = torch.arange(6)[None] + torch.tensor([[2], [-1]])
    expected = -slopes * (keys[:, None, None, :] - torch.tensor([7, 4])[:, None, None, None]).abs()
    torch.testing.assert_close(grid.block(0, 1, 6), expected)
    _, grid = stack_part(torch.zeros(3, 4, 32), torch.arange(4).expand(3, 4), 0, 4)
    assert grid.whole.shape[0] == 1  # rows with the same positions share one grid


def fire_reference(part, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """FIRE's bias `[H, Lq, Lk]` as the community implementation (mcleish7/arithmetic, `FIRE.forward`) computes it,
    for given positions, with a layer's parameters: an `nn.Sequential` MLP of the normalized log distances."""
    mlp = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.ReLU(), torch.nn.Linear(32, part.num_heads))
    with torch.no_grad():
        mlp[0].weight.copy_(part.fire_hidden_weight[:, None])
        mlp[0].bias.copy_(part.fire_hidden_bias)
        mlp[2].weight.copy_(part.fire_output_weight)
        mlp[2].bias.copy_(part.fire_output_bias)
        c, threshold = part.fire_log_scale[0], torch.abs(part.fire_threshold_scale[0] * 512.0)
        relative_distances = key_positions[None, :] - query_positions[:, None]
        normalizer = torch.max(query_positions.float(), threshold)[:, None]
        normalized_distances = torch.log(torch.abs(c * relative_distances) + 1)
        normalized = normalized_distances / (torch.log(torch.abs(c * normalizer) + 1) + 1e-6)
        return mlp(normalized.unsqueeze(-1)).permute(2, 0, 1)


@pytest.mark.parametrize("causal", [True, False])
def test_fire_bias_is_the_community_implementations_in_every_layer_and_in_flex(causal):
    """Every query-key pair, past keys from a cache included, at positions below and beyond the threshold L (set to
    4 here, so that `max(L, i)` takes both sides): the community implementation's bias, per layer; initialised as it is
    (c = 0.1, L = 512, the MLP as nn.Linear); the flex score_mod adds the same bias."""
    model = RelformerModel(tiny_config(**SCHEMES["fire"], is_decoder=causal))
    biases = []
    for layer in model.layers:
        part = layer.self_attn.position
        assert part.fire_log_scale.item() == pytest.approx(0.1) and part.fire_threshold_scale.item() == 1.0
        assert part.fire_hidden_weight.abs().max() <= 1 and part.fire_output_weight.abs().max() <= 32**-0.5
        for threshold in (512, 4):  # every query below L (the bias is read off one line of distances), and not
            with torch.no_grad():
                part.fire_threshold_scale.fill_(threshold / 512)
            _, grid = model.embed_positions(torch.zeros(1, 4, 32), torch.arange(3, 7)[None], 3, 7)  # queries 3..6
            terms = part(torch.zeros(1, 4, 4, 8), torch.zeros(1, 4, 7, 8), grid)
            expected = fire_reference(part, torch.arange(3, 7), torch.arange(7))
            torch.testing.assert_close(terms.bias(0, 4, 7)[0], expected)
            torch.testing.assert_close(terms.bias(1, 3, 6)[0], expected[:, 1:3, :6])
            b, h = torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(4)[None, :, None, None]
            q_idx, kv_idx = torch.arange(4)[None, None, :, None], torch.arange(7)[None, None, None, :]
            scores = terms.score_mod()(torch.zeros(1, 4, 4, 7), b, h, q_idx, kv_idx)
            torch.testing.assert_close(scores[0], expected)
        biases.append(expected)
    assert not torch.allclose(biases[0], biases[1])  # each layer its own MLP
