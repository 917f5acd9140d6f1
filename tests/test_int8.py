"""An int8 weight-only checkpoint round trip: a model quantized at load with torchao through transformers'
`TorchAoConfig(Int8WeightOnlyConfig())`, saved with `save_pretrained` and reloaded from the saved folder alone, has
the same int8 layers and generates the same tokens with the same logits; its cached decoding equals one uncached
forward.

transformers 5 always saves safetensors (`save_pretrained` has no `safe_serialization` switch any more): its torchao
quantizer flattens torchao's `Int8Tensor` weights into plain tensors (`qdata`, `scale`) with their type in the file's
metadata, and writes `quantization_config` into config.json, so `from_pretrained(folder)` needs no argument to
rebuild them. Same code in transformers 5.23 and 5.25."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, TorchAoConfig

from helpers import tiny_lm

quantization = pytest.importorskip("torchao.quantization")

IDS = torch.randint(3, 64, (3, 6), generator=torch.Generator().manual_seed(0))  # no pad (0) in the prompts
GENERATE = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)


def int8_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's torchao int8 weights by name."""
    return {name: p for name, p in model.named_parameters() if isinstance(p, quantization.Int8Tensor)}


@torch.no_grad()
def test_int8_checkpoint_saves_reloads_and_decodes_the_same(tmp_path):
    tiny_lm("relative").save_pretrained(tmp_path / "fp32")  # large random weights: tokens that can differ
    config = TorchAoConfig(quantization.Int8WeightOnlyConfig())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=config).eval()
    before = model.generate(IDS, **GENERATE)
    fp32 = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32").eval().generate(IDS, **GENERATE)
    # int8 weights change the tokens of this model: a reload that lost them would show
    assert fp32.sequences.tolist() != before.sequences.tolist()

    model.save_pretrained(tmp_path / "int8")
    saved = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "torchao"
    assert (tmp_path / "int8" / "model.safetensors").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "int8").eval()
    expected, found = int8_weights(model), int8_weights(reloaded)
    assert "model.layers.0.self_attn.q_proj.weight" in found and found.keys() == expected.keys()
    for name, weight in found.items():
        assert torch.equal(weight.qdata, expected[name].qdata) and torch.equal(weight.scale, expected[name].scale)

    after = reloaded.generate(IDS, **GENERATE)
    assert after.sequences.tolist() == before.sequences.tolist()
    torch.testing.assert_close(torch.stack(after.logits), torch.stack(before.logits), atol=1e-6, rtol=1e-6)

    # the cached steps' logits equal one uncached forward over the generated sequences
    uncached = reloaded(after.sequences).logits[:, IDS.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(after.logits, dim=1), uncached, atol=1e-4, rtol=1e-4)
