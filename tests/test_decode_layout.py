"""The CPU decode layout: `generate()` of at most 4 rows per step (sequences x beams) stores the weights of Relformer's
projections column-major (same shapes, Parameter objects and values; only the strides change), a `generate()` of
more rows the stored layout; `state_dict()` (saving) and `train()` restore the stored layout, and layers with
hooks or of other classes are left alone. Outputs do not change."""

import torch
from safetensors.torch import load_file
from torch import nn

from hf_relformer import RelformerForCausalLM, RelformerForConditionalGeneration
from hf_relformer.modeling_relformer import DECODE_LAYOUT_MARK, use_decode_layout, use_stored_layout

from helpers import tiny_lm, tiny_seq2seq

IDS = torch.tensor([[5, 17, 33, 8, 41, 12], [9, 23, 4, 50, 3, 2]])


def linear_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: module.weight for name, module in model.named_modules() if type(module) is nn.Linear}


def is_column_major(weight: torch.Tensor) -> bool:
    return not weight.is_contiguous() and weight.t().is_contiguous()


def test_generate_stores_linear_weights_column_major_keeping_parameters_and_values(tmp_path):
    model = tiny_lm("relative")
    before = {name: (weight, weight.detach().clone()) for name, weight in linear_weights(model).items()}
    assert before and not any(is_column_major(weight) for weight, _ in before.values())

    def assert_layout(column_major: bool) -> None:
        after = linear_weights(model)
        assert after.keys() == before.keys()
        for name, (weight, values) in before.items():
            assert after[name] is weight, name  # the same Parameter object (optimizers, PEFT, tying keep theirs)
            assert is_column_major(weight) == column_major == hasattr(weight, DECODE_LAYOUT_MARK), name
            assert weight.is_contiguous() != column_major and torch.equal(weight, values), name
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied

    one_row = IDS[:1]
    model.generate(one_row, max_new_tokens=3, do_sample=False)
    assert_layout(column_major=True)
    model.train()  # training runs on the stored layout
    assert_layout(column_major=False)
    model.eval().generate(one_row, max_new_tokens=3, do_sample=False)
    assert_layout(column_major=True)
    model.generate(IDS.repeat(3, 1), max_new_tokens=3, num_beams=2)  # 12 rows per step
    assert_layout(column_major=False)
    model.generate(inputs_embeds=model.model.embed_tokens(IDS), max_new_tokens=3, num_beams=2)  # 4 rows
    assert_layout(column_major=True)
    model.generate(one_row.repeat(5, 1), max_new_tokens=3, do_sample=False)  # 5 rows
    assert_layout(column_major=False)
    model.generate(input_ids=one_row, max_new_tokens=3, do_sample=False)
    assert_layout(column_major=True)
    decoded = model(IDS).logits
    model.save_pretrained(tmp_path / "saved")  # reads state_dict(), which restores the stored layout
    assert_layout(column_major=False)
    assert all(tensor.is_contiguous() for tensor in load_file(tmp_path / "saved" / "model.safetensors").values())
    reloaded = RelformerForCausalLM.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(reloaded(IDS).logits, decoded, atol=1e-5, rtol=1e-5)


def test_outputs_do_not_depend_on_the_layout():
    for model in (tiny_lm("relative"), tiny_seq2seq("relative")):
        inputs = {"input_ids": IDS}
        if isinstance(model, RelformerForConditionalGeneration):
            inputs["decoder_input_ids"] = IDS[:, :4]
        stored = model(**inputs).logits
        use_decode_layout(model)
        assert any(is_column_major(weight) for weight in linear_weights(model).values())
        torch.testing.assert_close(model(**inputs).logits, stored, atol=1e-5, rtol=1e-5)
        use_stored_layout(model)
        assert all(weight.is_contiguous() for weight in linear_weights(model).values())
        torch.testing.assert_close(model(**inputs).logits, stored, atol=0, rtol=0)


class TaggedLinear(nn.Linear):
    """A subclass (as quantized and adapter layers are): its weight layout is its own."""


def test_layers_with_hooks_or_of_other_classes_keep_their_layout():
    model = tiny_lm("relative")
    layer = model.model.layers[0]
    hooked = layer.mlp.up_proj
    hooked.register_forward_hook(lambda module, args, output: None)
    tagged = TaggedLinear(layer.self_attn.o_proj.in_features, layer.self_attn.o_proj.out_features)
    layer.self_attn.o_proj = tagged
    shared = torch.randn(2 * model.config.hidden_size, model.config.hidden_size)
    viewed = layer.self_attn.q_proj
    viewed.weight = nn.Parameter(shared[: viewed.out_features])  # a view of a larger tensor
    use_decode_layout(model)
    assert hooked.weight.is_contiguous() and tagged.weight.is_contiguous() and viewed.weight.is_contiguous()
    assert is_column_major(layer.self_attn.k_proj.weight)
