"""RelformerConfig: defaults, round trips, and a clear ValueError for every invalid value."""

import pytest
from transformers import AutoConfig

from hf_relformer import RelformerConfig

from helpers import tiny_config

REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "position_embedding_type",
    "relative_attention_max_distance",
    "relative_attention_values",
    "relative_attention_per_head",
    "initializer_range",
    "tie_word_embeddings",
    "use_cache",
    "is_decoder",
    "is_encoder_decoder",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
)


def test_defaults_and_required_fields():
    config = RelformerConfig()
    assert config.model_type == "relformer"
    assert config.position_embedding_type == "relative"
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.is_decoder and not config.is_encoder_decoder
    for name in REQUIRED_FIELDS:
        assert name in config.to_dict(), name


def test_explicit_values_are_kept():
    # use_cache and tie_word_embeddings are dropped silently by transformers unless declared as fields.
    config = RelformerConfig(use_cache=False, tie_word_embeddings=False, relative_attention_max_distance=7)
    assert config.use_cache is False
    assert config.tie_word_embeddings is False
    assert config.relative_attention_max_distance == 7


def test_round_trip_through_json(tmp_path):
    config = tiny_config(position_embedding_type="rotary", num_key_value_heads=2, norm_type="rms_norm")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RelformerConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.auto_map["AutoModelForCausalLM"] == "modeling_relformer.RelformerForCausalLM"


def test_positional_arguments_are_rejected():
    with pytest.raises((TypeError, ValueError)):
        RelformerConfig(100)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"position_embedding_type": "alibi"}, "position_embedding_type"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_key_value_heads"),
        ({"relative_attention_max_distance": 0}, "relative_attention_max_distance"),
        ({"relative_attention_max_distance": 2.5}, "relative_attention_max_distance"),
        ({"relative_attention_values": True, "position_embedding_type": "rotary"}, "relative_attention_values"),
        ({"relative_attention_per_head": True, "position_embedding_type": "learned"}, "relative_attention_per_head"),
        ({"layer_norm_position": "middle"}, "layer_norm_position"),
        ({"norm_type": "batch_norm"}, "norm_type"),
        ({"feed_forward_type": "moe"}, "feed_forward_type"),
        ({"hidden_act": "swish2"}, "hidden_act"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"num_hidden_layers": -1}, "num_hidden_layers"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"hidden_dropout": 1.5}, "hidden_dropout"),
        ({"attention_dropout": -0.1}, "attention_dropout"),
        ({"layer_norm_eps": -1.0}, "layer_norm_eps"),
        ({"initializer_range": -0.02}, "initializer_range"),
        ({"position_embedding_type": "rotary", "hidden_size": 36, "num_attention_heads": 4}, "position_embedding_type"),
        ({"position_embedding_type": "sinusoidal", "hidden_size": 33, "num_attention_heads": 3}, "sinusoidal"),
        ({"position_embedding_type": "rotary", "rope_parameters": {"rope_type": "dynamic"}}, "rope_type"),
        ({"head_dim": 0}, "head_dim"),
        ({"relative_attention_key_query": True}, "relative_attention_key_query"),  # a decoder
        ({"relative_attention_key_query": True, "is_decoder": False, "num_key_value_heads": 2}, "key_query"),
        ({"relative_attention_key_query": True, "is_decoder": False, "position_embedding_type": "rotary"}, "key_query"),
        ({"type_vocab_size": -1}, "type_vocab_size"),
        ({"final_layer_norm": "yes"}, "final_layer_norm"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_head_dim_can_differ_from_hidden_size_over_heads(tmp_path):
    import torch

    from hf_relformer import RelformerForCausalLM

    config = tiny_config(hidden_size=30, num_attention_heads=4, head_dim=8, num_key_value_heads=2)
    model = RelformerForCausalLM(config)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (32, 30)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 30)
    assert model(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, 64)
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).head_dim == 8
    assert tiny_config().head_dim == 8  # hidden_size / num_attention_heads by default


def test_final_layer_norm_defaults_to_pre_norm_stacks_only():
    assert tiny_config().has_final_layer_norm
    assert not tiny_config(layer_norm_position="post").has_final_layer_norm
    assert tiny_config(layer_norm_position="post", final_layer_norm=True).has_final_layer_norm
    assert not tiny_config(final_layer_norm=False).has_final_layer_norm
