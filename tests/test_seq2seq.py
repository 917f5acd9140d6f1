"""Encoder-decoder Relformer: parity with transformers' BART, cached == uncached generation (greedy, beams,
static cache) for every scheme, padded batches == rows alone, label shifting and the unshifted loss."""

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration

from hf_relformer import RelformerForConditionalGeneration
from hf_relformer.modeling_relformer import shift_tokens_right

from helpers import SCHEMES, redraw_weights, tiny_config, tiny_seq2seq

SOURCES = [[5, 17, 33, 8, 41, 12, 7], [9, 23, 4, 50]]
NEW_TOKENS = 10


def padded(sources, side="right"):
    length = max(map(len, sources))
    pad = [[0] * (length - len(s)) for s in sources]
    ids = [p + s if side == "left" else s + p for s, p in zip(sources, pad)]
    mask = [
        [0] * len(p) + [1] * len(s) if side == "left" else [1] * len(s) + [0] * len(p) for s, p in zip(sources, pad)
    ]
    return torch.tensor(ids), torch.tensor(mask)


def generate(model, ids, mask=None, **kwargs):
    """Tokens and the per-step scores (compared too: random models often repeat tokens, scores never do)."""
    kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, **kwargs}
    out = model.generate(ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores, 1)


def bart_and_relformer():
    """A random BART and a Relformer with the options that make the math identical, holding BART's weights."""
    bart_config = BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, activation_function="gelu",
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, scale_embedding=True,
        forced_eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    bart = redraw_weights(BartForConditionalGeneration(bart_config))
    config = tiny_config(
        is_encoder_decoder=True, decoder_layers=3, decoder_start_token_id=1, position_embedding_type="learned",
        layer_norm_position="post", embedding_layer_norm=True, scale_embedding=True, hidden_act="gelu",
    )  # fmt: skip
    relformer = RelformerForConditionalGeneration(config).eval()
    state = {"model.encoder.embed_tokens.weight": bart.model.shared.weight}
    for side in ("encoder", "decoder"):
        stack = getattr(bart.model, side)
        state[f"model.{side}.embed_positions.embeddings.weight"] = stack.embed_positions.weight[2:]  # BART offset 2
        for name in ("weight", "bias"):
            state[f"model.{side}.embed_norm.{name}"] = getattr(stack.layernorm_embedding, name)
        for i, layer in enumerate(stack.layers):
            ours = f"model.{side}.layers.{i}"
            blocks = [("self_attn", layer.self_attn, layer.self_attn_layer_norm)]
            if side == "decoder":
                blocks.append(("cross_attn", layer.encoder_attn, layer.encoder_attn_layer_norm))
            for block, attention, norm in blocks:
                for proj in ("q_proj", "k_proj", "v_proj"):
                    for name in ("weight", "bias"):
                        state[f"{ours}.{block}.{proj}.{name}"] = getattr(getattr(attention, proj), name)
                for name in ("weight", "bias"):
                    state[f"{ours}.{block}.o_proj.{name}"] = getattr(attention.out_proj, name)
                    state[f"{ours}.{block}_norm.{name}"] = getattr(norm, name)
            for name in ("weight", "bias"):
                state[f"{ours}.mlp.up_proj.{name}"] = getattr(layer.fc1, name)
                state[f"{ours}.mlp.down_proj.{name}"] = getattr(layer.fc2, name)
                state[f"{ours}.mlp_norm.{name}"] = getattr(layer.final_layer_norm, name)
    missing, unexpected = relformer.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == {"lm_head.weight", "model.decoder.embed_tokens.weight"}  # tied
    assert torch.equal(relformer.lm_head.weight, bart.lm_head.weight)
    assert not bart.final_logits_bias.any()
    return bart, relformer


def test_matches_transformers_bart_logits_and_beam_search():
    bart, relformer = bart_and_relformer()
    ids, mask = padded(SOURCES)
    decoder_ids = torch.tensor([[1, 7, 9, 11, 13], [1, 20, 21, 22, 23]])
    with torch.no_grad():
        expected = bart(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        actual = relformer(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    beams = {"num_beams": 4, "num_return_sequences": 2, "length_penalty": 1.0}
    bart_tokens, bart_scores = generate(bart, ids, mask, **beams)
    ours_tokens, ours_scores = generate(relformer, ids, mask, **beams)
    torch.testing.assert_close(ours_tokens, bart_tokens)
    torch.testing.assert_close(ours_scores, bart_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_cached_generation_equals_uncached(scheme):
    model = tiny_seq2seq(scheme)
    ids, mask = padded(SOURCES)
    tokens, scores = generate(model, ids, mask)
    assert (tokens[:, 0] == model.config.decoder_start_token_id).all()
    for kwargs in ({"use_cache": False}, {"cache_implementation": "static"}):
        other_tokens, other_scores = generate(model, ids, mask, **kwargs)
        torch.testing.assert_close(other_tokens, tokens, msg=str(kwargs))
        torch.testing.assert_close(other_scores, scores, atol=1e-4, rtol=1e-4, msg=str(kwargs))


@pytest.mark.parametrize("scheme", ["relative", "relative_values_per_head", "sinusoidal", "rotary"])
def test_beam_search_cached_equals_uncached(scheme):
    model = tiny_seq2seq(scheme)
    ids, mask = padded(SOURCES)
    beams = {"num_beams": 3, "num_return_sequences": 3}
    tokens, scores = generate(model, ids, mask, **beams)
    other_tokens, other_scores = generate(model, ids, mask, use_cache=False, **beams)
    torch.testing.assert_close(other_tokens, tokens)
    torch.testing.assert_close(other_scores, scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_padded_batch_equals_each_row_alone(scheme, side):
    model = tiny_seq2seq(scheme)
    ids, mask = padded(SOURCES, side)
    for kwargs in ({}, {"num_beams": 3}):
        tokens, scores = generate(model, ids, mask, **kwargs)
        for row, source in enumerate(SOURCES):
            alone_tokens, alone_scores = generate(model, torch.tensor([source]), **kwargs)
            torch.testing.assert_close(tokens[row : row + 1], alone_tokens, msg=f"row {row} {kwargs}")
            if not kwargs:
                torch.testing.assert_close(scores[row : row + 1], alone_scores, atol=1e-4, rtol=1e-4)


def test_labels_are_shifted_into_decoder_inputs_and_the_loss_is_not_shifted_again():
    model = tiny_seq2seq("relative")
    ids, mask = padded(SOURCES)
    labels = torch.tensor([[7, 9, 11, 2], [20, 2, -100, -100]])
    decoder_ids = shift_tokens_right(labels, pad_token_id=0, decoder_start_token_id=1)
    assert decoder_ids.tolist() == [[1, 7, 9, 11], [1, 20, 2, 0]]
    with torch.no_grad():  # both without gradients: SDPA picks another kernel for inputs that need them (~1e-5)
        out = model(ids, attention_mask=mask, labels=labels)
        logits = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(out.logits, logits)
    # by hand: mean over the 6 labelled positions of -log p(label_t | logits_t), logit t against label t
    terms = [
        -torch.log_softmax(logits[b, t], -1)[labels[b, t]] for b in range(2) for t in range(4) if labels[b, t] >= 0
    ]
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())
    shifted = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1))
    assert not torch.isclose(out.loss, shifted)


def test_missing_decoder_start_token_or_decoder_inputs_raise_clear_errors():
    model = tiny_seq2seq("relative")
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        shift_tokens_right(torch.tensor([[3, 4]]), 0, None)
    with pytest.raises(ValueError, match="needs decoder_input_ids"):
        model.model(torch.tensor(SOURCES[:1]))


# Reentrant checkpointing runs the forward without gradients, where SDPA picks another kernel (measured on t5 with
# large weights: 9e-5 on gradients of size 3; 1.7e-6 with eager attention, which has one kernel).
CHECKPOINTED_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("scheme", ["relative_values", "t5", "alibi"])
def test_activation_checkpointing_gives_the_same_gradients(scheme, reentrant):
    ids, mask = padded(SOURCES)
    labels = torch.tensor([[7, 9, 11, 2], [20, 2, -100, -100]])
    grads = []
    for checkpointing in (False, True):
        model = tiny_seq2seq(scheme).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name, **CHECKPOINTED_TOLERANCE)


def test_embeddings_are_shared_like_the_paper(tmp_path):
    model = tiny_seq2seq("relative")
    shared = model.model.encoder.embed_tokens.weight
    assert model.model.decoder.embed_tokens.weight is shared and model.lm_head.weight is shared
    model.save_pretrained(tmp_path)
    loaded = RelformerForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.model.decoder.embed_tokens.weight is loaded.model.encoder.embed_tokens.weight
    ids, mask = padded(SOURCES)
    torch.testing.assert_close(generate(loaded, ids, mask)[1], generate(model, ids, mask)[1])
    untied = tiny_seq2seq("relative", tie_word_embeddings=False)
    assert untied.model.decoder.embed_tokens.weight is not untied.model.encoder.embed_tokens.weight


@pytest.mark.parametrize("scheme", ["relative_values", "learned"])
def test_sampling_cached_equals_uncached(scheme):
    model = tiny_seq2seq(scheme)
    ids, mask = padded(SOURCES)
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(5)
        outputs.append(generate(model, ids, mask, do_sample=True, top_k=20, use_cache=use_cache))
    torch.testing.assert_close(outputs[1][0], outputs[0][0])
    torch.testing.assert_close(outputs[1][1], outputs[0][1], atol=1e-4, rtol=1e-4)
