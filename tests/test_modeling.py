"""The model itself: backends agree, outputs are recorded, every architecture switch works, forms are checked,
the loss is right, activation checkpointing is exact, and no [L, L, d] tensor is ever built."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from hf_relformer import RelformerForCausalLM, RelformerForConditionalGeneration, RelformerModel
from hf_relformer.modeling_relformer import cache_of

from helpers import SCHEMES, SDPA_SCHEMES, redraw_weights, tiny_config, tiny_lm

IDS = torch.tensor([[5, 17, 33, 8, 41, 12, 7, 19], [9, 23, 4, 50, 3, 3, 61, 2]])


@pytest.mark.parametrize("scheme", SDPA_SCHEMES)
def test_eager_and_sdpa_agree(scheme):
    eager = tiny_lm(scheme, attn_implementation="eager")
    sdpa = tiny_lm(scheme, attn_implementation="sdpa")
    mask = torch.ones_like(IDS)
    mask[1, :2] = 0
    with torch.no_grad():
        torch.testing.assert_close(sdpa(IDS).logits, eager(IDS).logits)
        real = mask.bool()  # a query at a left pad sees no key: its output is arbitrary
        torch.testing.assert_close(
            sdpa(IDS, attention_mask=mask).logits[real], eager(IDS, attention_mask=mask).logits[real]
        )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_output_attentions_and_hidden_states(scheme):
    model = tiny_lm(scheme, attn_implementation="eager")
    with torch.no_grad():
        out = model(IDS, output_attentions=True, output_hidden_states=True)
    layers, heads, length = model.config.num_hidden_layers, model.config.num_attention_heads, IDS.shape[1]
    assert len(out.attentions) == layers and len(out.hidden_states) == layers + 1
    for attentions in out.attentions:
        assert attentions.shape == (2, heads, length, length)
        torch.testing.assert_close(attentions.sum(-1), torch.ones(2, heads, length))
        assert attentions.triu(1).abs().max() == 0  # causal
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)


VARIANTS = {
    "post_norm_bert_like": {"layer_norm_position": "post", "embedding_layer_norm": True},
    "llama_like": {
        "norm_type": "rms_norm",
        "feed_forward_type": "gated",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    },
    "scaled_embeddings": {"scale_embedding": True, "hidden_act": "relu"},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scheme", ["relative_values", "rotary"])
def test_architecture_variants_build_and_decode_with_a_cache(variant, scheme):
    model = tiny_lm(scheme, **VARIANTS[variant])
    with torch.no_grad():
        full = model(IDS).logits
        cache = DynamicCache(config=model.config)
        prefix = model(IDS[:, :5], cache=cache).logits
        rest = model(IDS[:, 5:], cache=cache).logits
    torch.testing.assert_close(torch.cat([prefix, rest], 1), full, atol=1e-4, rtol=1e-5)
    if VARIANTS[variant].get("tie_word_embeddings") is False:
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert (model.model.norm is None) == (VARIANTS[variant].get("layer_norm_position") == "post")


@pytest.mark.parametrize("scheme", ["relative", "relative_values_per_head", "sinusoidal"])
def test_encoder_form_is_bidirectional(scheme):
    torch.manual_seed(0)
    encoder = redraw_weights(RelformerModel(tiny_config(**SCHEMES[scheme], is_decoder=False)))
    changed = IDS.clone()
    changed[:, -1] = 60
    with torch.no_grad():
        first = encoder(IDS).last_hidden_state
        second = encoder(changed).last_hidden_state
    assert (first[:, 0] - second[:, 0]).abs().max() > 1e-3  # the last token reaches the first one
    assert cache_of(encoder(IDS, use_cache=True)) is None  # an encoder keeps no cache


def test_heads_refuse_a_form_they_cannot_serve():
    with pytest.raises(ValueError, match="RelformerForCausalLM needs a decoder-only config"):
        RelformerForCausalLM(tiny_config(is_decoder=False))
    with pytest.raises(ValueError, match="RelformerForCausalLM needs a decoder-only config"):
        RelformerForCausalLM(tiny_config(is_encoder_decoder=True))
    with pytest.raises(ValueError, match="RelformerForConditionalGeneration needs an encoder-decoder config"):
        RelformerForConditionalGeneration(tiny_config())
    model = tiny_lm("relative")
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(input_ids=IDS, inputs_embeds=torch.zeros(2, 8, 32))


def test_loss_is_next_token_cross_entropy_ignoring_minus_100():
    model = tiny_lm("relative")
    labels = IDS.clone()
    labels[0, :3] = -100
    out = model(IDS, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, model.config.vocab_size), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)


def test_inputs_embeds_equal_input_ids():
    model = tiny_lm("learned", scale_embedding=True)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(IDS) * model.config.hidden_size**0.5
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(IDS).logits)


# Reentrant checkpointing runs the forward without gradients, where SDPA picks another kernel (measured on t5 with
# large weights: 9e-5 on gradients of size 3; 1.7e-6 with eager attention, which has one kernel).
CHECKPOINTED_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_activation_checkpointing_gives_the_same_gradients(scheme, reentrant):
    """Every scheme trains under both kinds of activation checkpointing with the gradients of training without it
    (T5's table, shared by the layers, broke under reentrant checkpointing in 0.2.1)."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_lm(scheme, hidden_dropout=0.0).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        model(IDS, labels=IDS).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name, **CHECKPOINTED_TOLERANCE)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize(
    ("scheme", "backend"), [("relative", "eager"), ("relative", "sdpa"), ("relative_values_per_head", "eager")]
)
def test_no_length_by_length_by_head_size_tensor(scheme, backend):
    # one sequence, 2 heads of size 64: scores are [1, 2, L, L]; a naive gather would be [L, L, 64] or larger
    model = tiny_lm(scheme, hidden_size=128, num_attention_heads=2, attn_implementation=backend)
    length = 96
    ids = torch.randint(3, 64, (1, length))
    with torch.no_grad(), LargestTensor() as probe:
        model(ids)
    assert probe.largest < length * length * 64 / 4, probe.largest


def test_token_type_embeddings():
    torch.manual_seed(0)
    with_types = redraw_weights(RelformerModel(tiny_config(is_decoder=False, type_vocab_size=2)))
    types = torch.zeros_like(IDS)
    types[:, 4:] = 1
    with torch.no_grad():
        base = with_types(IDS).last_hidden_state
        torch.testing.assert_close(with_types(IDS, token_type_ids=torch.zeros_like(IDS)).last_hidden_state, base)
        assert not torch.allclose(with_types(IDS, token_type_ids=types).last_hidden_state, base)
        with pytest.raises(ValueError, match="token_type_ids must be in"):
            with_types(IDS, token_type_ids=types * 2)
        without = RelformerModel(tiny_config(is_decoder=False, type_vocab_size=0))
        without(IDS, token_type_ids=torch.zeros_like(IDS))  # what BERT tokenizers send: accepted, ignored
        with pytest.raises(ValueError, match="type_vocab_size=0"):
            without(IDS, token_type_ids=types)
