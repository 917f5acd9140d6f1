"""What a transformers user expects of any model, as transformers' own common model tests check it: resizing the
vocabulary, mismatched head shapes on loading, `return_dict=False`, and clear errors for unsupported backends."""

import inspect

import pytest
import torch
from transformers import AttentionInterface, AutoModel
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

from hf_relformer import (
    RelformerForCausalLM,
    RelformerForConditionalGeneration,
    RelformerForMaskedLM,
    RelformerForSequenceClassification,
    RelformerForTokenClassification,
    RelformerModel,
    loading_relformer,
)

from helpers import SCHEMES, redraw_weights, tiny_config

IDS = torch.tensor([[5, 17, 33, 8, 41, 12], [9, 23, 4, 50, 7, 3]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])

FORMS = {
    "decoder-only": {},
    "encoder": {"is_decoder": False},
    "encoder-decoder": {"is_encoder_decoder": True, "decoder_start_token_id": 1, "decoder_layers": 3},
}
HEADS = [
    (RelformerModel, "decoder-only"),
    (RelformerModel, "encoder"),
    (RelformerModel, "encoder-decoder"),
    (RelformerForCausalLM, "decoder-only"),
    (RelformerForConditionalGeneration, "encoder-decoder"),
    (RelformerForMaskedLM, "encoder"),
    (RelformerForSequenceClassification, "encoder"),
    (RelformerForSequenceClassification, "decoder-only"),
    (RelformerForTokenClassification, "encoder"),
]


def build(head, form, **overrides):
    torch.manual_seed(0)
    return redraw_weights(head(tiny_config(**FORMS[form], **overrides)))


def inputs_for(form):
    extra = {"decoder_input_ids": IDS[:, :4]} if form == "encoder-decoder" else {}
    return {"input_ids": IDS, "attention_mask": MASK, **extra}


# 1. resize_token_embeddings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(("head", "form"), [(RelformerForMaskedLM, "encoder"), (RelformerForCausalLM, "decoder-only"),
                                            (RelformerForConditionalGeneration, "encoder-decoder")])  # fmt: skip
def test_resize_token_embeddings_keeps_the_old_logits_and_the_tie(head, form, tied, tmp_path):
    model = build(head, form, tie_word_embeddings=tied)
    inputs = inputs_for(form)
    with torch.no_grad():
        before = model(**inputs).logits
    model.resize_token_embeddings(70, pad_to_multiple_of=16)  # 70 -> 80
    assert model.config.vocab_size == 80
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == 80
    same = model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert same == tied
    with torch.no_grad():
        after = model(**inputs).logits
    assert after.shape[-1] == 80
    torch.testing.assert_close(after[..., :64], before)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, after)


def test_shrinking_the_vocabulary_of_a_masked_lm():
    model = build(RelformerForMaskedLM, "encoder")
    model.resize_token_embeddings(60)
    assert model.lm_head.decoder.weight.shape == (60, 32) and model.lm_head.decoder.bias.shape == (60,)
    assert model(torch.tensor([[5, 59]])).logits.shape == (1, 2, 60)


# 2. mismatched shapes on loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("head", "form"), [(RelformerForSequenceClassification, "encoder"),
                                            (RelformerForSequenceClassification, "decoder-only"),
                                            (RelformerForTokenClassification, "encoder")])  # fmt: skip
def test_a_head_of_another_shape_is_refused_unless_ignore_mismatched_sizes(head, form, tmp_path):
    trained = build(head, form, num_labels=3)
    trained.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"classifier.weight is \(3, 32\) in the file, \(42, 32\) here"):
        head.from_pretrained(tmp_path, num_labels=42)
    with CaptureLogger(loading_relformer.logger) as captured:
        reloaded = head.from_pretrained(tmp_path, num_labels=42, ignore_mismatched_sizes=True)
    assert reloaded.classifier.weight.shape == (42, 32)
    report = captured.out
    assert "Re-initialised 2 tensor(s)" in report and "classifier.weight (3, 32) -> (42, 32)" in report
    same = head.from_pretrained(tmp_path)  # the right shape loads silently and exactly
    torch.testing.assert_close(same.classifier.weight, trained.classifier.weight)


# 3. return_dict=False -----------------------------------------------------------------------------------------------


def flat(values):
    """Tensors of a (nested) output tuple, in order; caches by their length."""
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, tuple):
            yield from flat(value)
        else:
            yield torch.tensor(value.get_seq_length())


@pytest.mark.parametrize("via", ["argument", "config"])
@pytest.mark.parametrize(("head", "form"), HEADS)
def test_return_dict_false_gives_the_dict_outputs_to_tuple(head, form, via):
    model = build(head, form)
    inputs = {**inputs_for(form), "output_hidden_states": True, "output_attentions": True}
    if "labels" in head.forward.__code__.co_varnames and head is not RelformerModel:
        labels = IDS[:, :4] if form == "encoder-decoder" else IDS
        if head is RelformerForSequenceClassification:
            labels = torch.tensor([0, 1])
        inputs["labels"] = labels
    with torch.no_grad():
        expected = model(**inputs).to_tuple()
        if via == "argument":
            got = model(**inputs, return_dict=False)
        else:
            model.config.return_dict = False
            got = model(**inputs)
    assert isinstance(got, tuple) and len(got) == len(expected)
    for a, b in zip(flat(got), flat(expected), strict=True):
        torch.testing.assert_close(a, b)


# 8. unsupported attention backends ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["flash_attention_2"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_unsupported_backends_name_the_supported_ones(scheme, backend):
    supported = "'eager' or 'flex_attention'" if "values" in scheme else "'eager' or 'sdpa' or 'flex_attention'"
    with pytest.raises(ValueError, match=f"{backend}.*{supported}|{backend}.*use 'eager'"):
        RelformerForCausalLM(tiny_config(**SCHEMES[scheme], attn_implementation=backend))
    model = RelformerForCausalLM(tiny_config(**SCHEMES[scheme]))
    with pytest.raises(ValueError, match=backend):
        model.set_attn_implementation(backend)


# 5. missing tensors and output_loading_info --------------------------------------------------------------------------


def test_missing_body_tensors_raise_unless_the_report_is_asked_for(tmp_path):
    from safetensors.torch import load_file, save_file

    model = build(RelformerForCausalLM, "decoder-only")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    missing = "model.layers.1.mlp.up_proj.weight"
    del tensors[missing]
    tensors["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 tensor\(s\) missing \(model.layers.1.mlp.up_proj.weight"):
        RelformerForCausalLM.from_pretrained(tmp_path)
    with CaptureLogger(loading_relformer.logger) as captured:
        loaded, info = RelformerForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {missing} and set(info["unexpected_keys"]) == {"model.layers.9.extra.weight"}
    assert not info["mismatched_keys"] and not info["error_msgs"]
    assert missing in captured.out and "model.layers.9.extra.weight" in captured.out
    torch.testing.assert_close(loaded.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    RelformerForCausalLM.from_pretrained(tmp_path, allow_missing_weights=True, allow_unused_weights=True)


@pytest.mark.parametrize(("head", "form"), [h for h in HEADS if h[0] is not RelformerModel])
def test_a_bare_checkpoint_loads_into_every_head_and_back(head, form, tmp_path):
    bare = build(RelformerModel, form)
    bare.save_pretrained(tmp_path / "bare")
    model, info = head.from_pretrained(tmp_path / "bare", output_loading_info=True)
    assert all(not key.startswith("model.") for key in info["missing_keys"]), info  # only the head's own layers
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, tensor in bare.state_dict().items():
        torch.testing.assert_close(model.model.state_dict()[name], tensor, msg=name)
    model.save_pretrained(tmp_path / "head")
    back = RelformerModel.from_pretrained(tmp_path / "head").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs_for(form)).last_hidden_state,
                                   bare.eval()(**inputs_for(form)).last_hidden_state)  # fmt: skip


# 4. every rope type, exact against transformers' Llama ----------------------------------------------------------------

HEAD_DIM = 16
ROPE_EXTRAS = {
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 2.0, "original_max_position_embeddings": 8},
    "longrope": {"short_factor": [1.0 + i / 8 for i in range(HEAD_DIM // 2)],
                 "long_factor": [2.0 + i / 4 for i in range(HEAD_DIM // 2)], "original_max_position_embeddings": 8},
    "llama3": {"factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "proportional": {"partial_rotary_factor": 0.5},
}  # fmt: skip


def test_every_rope_type_of_the_registry_is_covered():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert set(ROPE_EXTRAS) == {"default", *ROPE_INIT_FUNCTIONS}


@pytest.mark.parametrize("rope_type", ROPE_EXTRAS)
def test_rope_types_match_llama_past_max_position_embeddings(rope_type, tmp_path):
    """A Llama with each rope type, converted: the same logits on 40 tokens (max_position_embeddings = 16), and the
    same cached greedy decoding logits from 6 to 36 tokens, where dynamic NTK and longrope update their frequencies."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from hf_relformer.conversion.api import convert

    torch.manual_seed(0)
    rope = {"rope_type": rope_type, "rope_theta": 100.0, **ROPE_EXTRAS[rope_type]}
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=48, max_position_embeddings=16, initializer_range=0.2,
                         rope_parameters=rope)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    convert("llama", tmp_path / "llama", tmp_path / "out", log=lambda message: None)
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    generate = {"max_new_tokens": 30, "min_new_tokens": 30, "do_sample": False, "output_logits": True,
                "return_dict_in_generate": True}  # fmt: skip
    outputs = []
    for model in (
        LlamaForCausalLM.from_pretrained(tmp_path / "llama"),
        AutoModelForCausalLM.from_pretrained(tmp_path / "out"),
    ):
        model.eval()
        assert model.config.rope_parameters["rope_type"] == rope_type
        with torch.no_grad():
            full = model(ids).logits
        fresh = type(model).from_pretrained(model.name_or_path).eval()  # run-time rope state starts afresh
        out = fresh.generate(ids[:1, :6], **generate)
        outputs.append((full, out.sequences, torch.stack(out.logits, 1)))
    (theirs, their_tokens, their_steps), (ours, our_tokens, our_steps) = outputs
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert our_tokens.tolist() == their_tokens.tolist()
    torch.testing.assert_close(our_steps, their_steps, atol=1e-4, rtol=1e-4)


# 10. torch.compile of the decode step ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["relative", "learned"])
def test_compiled_static_cache_decoding_equals_eager(scheme):
    """`torch.compile(model.forward, fullgraph=True)` with a static cache: no data-dependent branch or host sync in
    the forward (the static cache's length is a tensor), and the same logits as eager decoding."""
    from helpers import tiny_lm

    model = tiny_lm(scheme)
    ids = torch.tensor([[5, 17, 33, 8, 41, 12]])
    generate = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "cache_implementation": "static",
                "output_logits": True, "return_dict_in_generate": True}  # fmt: skip
    eager = model.generate(ids, **generate)
    model.forward = torch.compile(model.forward, fullgraph=True)
    compiled = model.generate(ids, **generate)
    assert compiled.sequences.tolist() == eager.sequences.tolist()
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), atol=1e-4, rtol=1e-4)


# 9. what transformers' own model tests (5.25) check -----------------------------------------------------------------


@pytest.mark.parametrize("head", sorted({head for head, _ in HEADS}, key=lambda head: head.__name__))
def test_every_forward_starts_with_the_main_input(head):
    """transformers reads the main input off the class's forward (`test_model_main_input_name`), RelformerModel's
    too, although RelformerModel(config) builds the class of the config's form."""
    assert list(inspect.signature(head.forward).parameters)[1] == head.main_input_name == "input_ids"


@pytest.mark.parametrize("scheme", ["relative", "relative_values", "rotary"])
def test_an_unknown_backend_is_refused_in_transformers_words_then_ours(scheme):
    model = RelformerForCausalLM(tiny_config(**SCHEMES[scheme]))
    with pytest.raises(ValueError, match=r'Specified `attn_implementation="foo"` is not supported\. .*\'eager\''):
        model.set_attn_implementation("foo")
    assert model.config._attn_implementation == ("eager" if "values" in scheme else "sdpa")  # unchanged


@pytest.mark.parametrize(("head", "form"), [(RelformerForSequenceClassification, "encoder"),
                                            (RelformerForSequenceClassification, "decoder-only")])  # fmt: skip
def test_mismatched_shapes_raise_runtime_errors_or_reinitialise_with_transformers_report(head, form, tmp_path):
    """transformers' `test_load_with_mismatched_shapes`: another num_labels, or another vocab_size given as config,
    raise RuntimeError; with ignore_mismatched_sizes=True they load, in transformers' own loading report."""
    build(head, form, num_labels=3).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match=r"classifier\.weight"):
        head.from_pretrained(tmp_path, num_labels=42)
    small = tiny_config(**FORMS[form], num_labels=3, vocab_size=10)
    with pytest.raises(RuntimeError, match="embed_tokens"):
        AutoModel.from_pretrained(tmp_path, config=small)
    report = transformers_logging.get_logger("transformers.modeling_utils")
    with CaptureLogger(report) as captured:
        model = head.from_pretrained(tmp_path, num_labels=42, ignore_mismatched_sizes=True)
    assert "Reinit due to size mismatch" in captured.out
    assert model(IDS, attention_mask=MASK).logits.shape == (2, 42)
    with CaptureLogger(report) as captured:
        bare = AutoModel.from_pretrained(tmp_path, config=small, ignore_mismatched_sizes=True)
    assert "Reinit due to size mismatch" in captured.out
    assert bare(IDS % 10).last_hidden_state.shape == (2, IDS.shape[1], small.hidden_size)


def test_a_quantization_config_is_a_known_key(caplog, tmp_path):
    """transformers writes `quantization_config` into a quantized model's config.json: loading it warns of nothing."""
    config = tiny_config()
    int8 = {"default": {"_type": "Int8WeightOnlyConfig"}}
    config.quantization_config = {"quant_method": "torchao", "quant_type": int8}
    config.save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        loaded = type(config).from_pretrained(tmp_path)
    assert "unknown field" not in caplog.text and loaded.quantization_config == config.quantization_config


# 10. serving engines' attention functions ---------------------------------------------------------------------------


def qkv_only(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """What vLLM's and SGLang's transformers backends register: q, k and v in, causal masking of its own (the mask
    is not read), no bias; output `[B, Lq, H, D]`."""
    causal = module.is_causal and query.shape[2] > 1
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scaling)
    return output.transpose(1, 2), None


@pytest.fixture
def registered_qkv_only():
    AttentionInterface.register("qkv_only", qkv_only)
    yield "qkv_only"
    del AttentionInterface._global_mapping["qkv_only"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_serving_engines_function_runs_the_schemes_that_act_on_q_k_or_embeddings(scheme, registered_qkv_only):
    """Schemes without attention terms run through any registered function that takes q, k and v alone (cached
    decoding included); schemes that add a term to the scores refuse it, saying why."""
    model = redraw_weights(RelformerForCausalLM(tiny_config(**SCHEMES[scheme])))
    if model.config.position_scheme.attention_part.terms is not None:
        with pytest.raises(ValueError, match=f"{registered_qkv_only}.*would drop"):
            model.set_attn_implementation(registered_qkv_only)
        with pytest.raises(ValueError, match="adds position terms to attention"):
            RelformerForCausalLM(tiny_config(**SCHEMES[scheme], attn_implementation=registered_qkv_only))
        return
    ids = IDS[:1]
    with torch.no_grad():
        expected = model(ids).logits
        model.set_attn_implementation(registered_qkv_only)
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=0)  # fmt: skip
        uncached = model(out.sequences[:, :-1]).logits[:, ids.shape[1] - 1 :]
    torch.testing.assert_close(torch.stack(out.logits, 1), uncached, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme", ["none", "relative"])
def test_returned_attentions_are_the_ones_the_output_depends_on(scheme):
    """`output_attentions=True` returns the probabilities the output was computed from, so that `retain_grad()` on
    them gets a gradient (transformers' `test_retain_grad_hidden_states_attentions`)."""
    model = RelformerForCausalLM._from_config(tiny_config(**SCHEMES[scheme]), attn_implementation="eager")
    outputs = model(IDS, output_attentions=True, output_hidden_states=True)
    attentions, hidden_states = outputs.attentions[0], outputs.hidden_states[0]
    attentions.retain_grad(), hidden_states.retain_grad()
    outputs.logits.flatten()[0].backward()
    assert attentions.grad is not None and hidden_states.grad is not None
