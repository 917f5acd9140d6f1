"""RelformerConfig: defaults, round trips, and a clear ValueError for every invalid value."""

import json

import pytest
from transformers import AutoConfig

import hf_relformer
from hf_relformer import RelformerConfig, RelformerModel
from hf_relformer.configuration_relformer import CODE_VERSION_KEY
from hf_relformer.positions_relformer import POSITION_SCHEMES

from helpers import REPO_ROOT, tiny_config, tiny_lm

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


@pytest.mark.parametrize(
    ("flags", "form"),
    [
        ({"is_decoder": True}, "decoder-only"),
        ({"is_decoder": False}, "encoder"),
        ({"is_encoder_decoder": True}, "encoder-decoder"),
    ],
)
def test_form_names_the_shape_of_model_the_flags_build(flags, form):
    config = RelformerConfig(**flags)
    assert config.form == form
    assert "form" not in config.to_dict()  # derived from the flags, never stored


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
        ({"position_embedding_type": "rope"}, "position_embedding_type"),
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
        ({"hidden_size": "32"}, "hidden_size"),
        ({"num_attention_heads": 2.0}, "num_attention_heads"),
        ({"relative_attention_values": "yes"}, "relative_attention_values"),
        ({"attention_bias": 1}, "attention_bias"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
        ({"is_decoder": None}, "is_decoder"),
        ({"pad_token_id": 64}, "pad_token_id"),  # vocab_size is 64
        ({"bos_token_id": -1}, "bos_token_id"),
        ({"eos_token_id": [2, 99]}, "eos_token_id"),
        ({"decoder_start_token_id": "1"}, "decoder_start_token_id"),
        ({"rope_parameters": 3}, "rope_parameters"),
        ({"position_embedding_type": "rotary", "rope_parameters": {"rope_type": "linear"}}, "factor"),
        ({"position_embedding_type": "rotary", "rope_parameters": {"rope_theta": -1.0}}, "rope_theta"),
        ({"decoder_layers": 3}, "decoder_layers"),  # a decoder-only config: num_hidden_layers sets the depth
        ({"is_encoder_decoder": True, "encoder_layers": 0}, "encoder_layers"),
        ({"hidden_dropout": "0.1"}, "hidden_dropout"),
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


def test_a_field_changed_after_construction_is_checked_when_a_model_is_built(tmp_path):
    from hf_relformer import RelformerForCausalLM

    config = tiny_config()
    config.relative_attention_max_distance = 0
    with pytest.raises(ValueError, match="relative_attention_max_distance"):
        RelformerForCausalLM(config)
    config = tiny_config()
    config.position_embedding_type = "rope"
    with pytest.raises(ValueError, match="position_embedding_type"):
        config.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()  # nothing written


@pytest.mark.parametrize("backend", ["sdpa", "flash_attention_2"])
def test_relative_values_refuse_backends_that_cannot_compute_them(backend, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_relformer import RelformerForCausalLM

    with pytest.raises(ValueError, match="relative_attention_values"):
        RelformerForCausalLM._from_config(tiny_config(relative_attention_values=True), attn_implementation=backend)
    model = RelformerForCausalLM(tiny_config(relative_attention_values=True))
    assert model.config._attn_implementation == "eager"  # chosen by default
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="relative_attention_values"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=backend)
    with pytest.raises(ValueError, match="relative_attention_values"):
        model.set_attn_implementation(backend)


def test_unknown_fields_warn_and_are_kept(tmp_path, caplog):
    """A config.json from a newer version (or with a misspelt name): the unknown field is named in a warning, kept
    as an attribute and written back on save; the model is built from the fields this version knows."""
    import json
    import logging

    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "relative_attention_buckets": "log"}))
    with caplog.at_level(logging.WARNING):
        loaded = AutoConfig.from_pretrained(tmp_path)
    assert "relative_attention_buckets" in caplog.text
    assert loaded.relative_attention_buckets == "log"
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["relative_attention_buckets"] == "log"
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # what transformers itself writes or reads is not "unknown"
        tiny_config(num_labels=3).save_pretrained(tmp_path / "plain")
        AutoConfig.from_pretrained(tmp_path / "plain", num_labels=3)
        tiny_config(torch_dtype="float32", attn_implementation="eager", max_length=20)
    assert "unknown field" not in caplog.text


def test_fields_missing_from_an_older_config_take_the_old_behaviour(tmp_path):
    """Every field added after the first release defaults to what models did before it existed: a config.json
    without them loads into the same model (same tensors, same logits)."""
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from helpers import tiny_lm

    model = tiny_lm("relative_values")
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    fields = json.loads(path.read_text())
    added_later = ("head_dim", "final_layer_norm", "type_vocab_size", "relative_attention_key_query")
    path.write_text(json.dumps({k: v for k, v in fields.items() if k not in added_later}))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert set(load_file(tmp_path / "model.safetensors")) <= set(loaded.state_dict())
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_an_older_encoder_config_without_type_vocab_size_keeps_no_token_types(tmp_path):
    """New encoder configs default to BERT's two segments; an encoder saved before that (no `type_vocab_size` in its
    config.json, no token-type tensor) still loads into the same model, with the same logits."""
    import json

    import torch
    from transformers import AutoModelForMaskedLM

    from hf_relformer import RelformerForMaskedLM

    from helpers import redraw_weights, tiny_config

    assert tiny_config(is_decoder=False).type_vocab_size == 2
    assert tiny_config().type_vocab_size == 0 and tiny_config(is_encoder_decoder=True).type_vocab_size == 0
    old = redraw_weights(RelformerForMaskedLM(tiny_config(is_decoder=False, type_vocab_size=0)))
    old.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "type_vocab_size"}))
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert loaded.config.type_vocab_size == 0 and set(loaded.state_dict()) == set(old.state_dict())
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, old(ids).logits, rtol=0, atol=0)


def test_every_saved_config_records_the_code_version_and_loads_silently(tmp_path, caplog):
    tiny_lm().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[CODE_VERSION_KEY] == hf_relformer.__version__
    with caplog.at_level("WARNING"):
        config = RelformerConfig.from_pretrained(tmp_path)
    assert caplog.records == []  # a known key, not an "unknown field"
    assert config.to_dict()[CODE_VERSION_KEY] == hf_relformer.__version__


def test_readme_lists_every_position_scheme():
    """README's scheme table has a row for each scheme of the registry."""
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme[readme.index("| `position_embedding_type` |") :].split("\n\n")[0]
    for name in POSITION_SCHEMES:
        assert f"| `{name}`" in table, name


def test_xpos_refuses_an_encoder_and_the_scaling_rope_types_with_the_reason():
    with pytest.raises(ValueError, match=r"'xpos' is causal: its decay .* grows without bound"):
        RelformerConfig(position_embedding_type="xpos", is_decoder=False)
    with pytest.raises(ValueError, match="rope_type 'default'"):
        RelformerConfig(position_embedding_type="xpos", rope_parameters={"rope_type": "linear", "factor": 2.0})
    config = RelformerConfig(position_embedding_type="xpos", is_encoder_decoder=True)  # the decoder gets xPos
    model = RelformerModel(config)
    assert model.decoder.embed_positions.decay and not model.encoder.embed_positions.decay
