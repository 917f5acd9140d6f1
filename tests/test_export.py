"""torch.export (the path to ExecuTorch) through transformers' own helpers: every scheme exports with a static cache,
and stepping the exported program token by token gives one uncached eager forward's logits at every position."""

import pytest
import torch
from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM, convert_and_export_with_cache

from hf_relformer import RelformerForCausalLM

from helpers import SCHEMES, redraw_weights, tiny_config

IDS = torch.tensor([[5, 9, 3, 17, 22, 8, 41, 7]])


def static_cache_lm(variant: str) -> RelformerForCausalLM:
    model = redraw_weights(RelformerForCausalLM(tiny_config(**SCHEMES[variant]))).eval()
    model.generation_config.cache_implementation = "static"  # what transformers' export helpers require
    return model


def stepped_logits(program: torch.export.ExportedProgram) -> torch.Tensor:
    """Feed IDS one token a step (the cache lives in the program's buffers) -> `[L, vocab]`. A hand-written loop:
    transformers' own `generate` helper for exported programs passes each step's position one too high."""
    step = program.module()
    with torch.no_grad():
        return torch.stack(
            [step(input_ids=IDS[:, i : i + 1], cache_position=torch.tensor([i]))[0, -1] for i in range(IDS.shape[1])]
        )


@pytest.mark.parametrize("variant", list(SCHEMES))
def test_exported_program_steps_give_the_eager_logits(variant):
    model = static_cache_lm(variant)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits[0]
        program = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=16).export(
            input_ids=IDS[:, :1], cache_position=torch.tensor([0])
        )
    torch.testing.assert_close(stepped_logits(program), expected, atol=1e-5, rtol=1e-5)


def test_convert_and_export_with_cache_saves_and_reloads(tmp_path):
    model = static_cache_lm("relative_values")
    model.generation_config.cache_config = {"batch_size": 1, "max_cache_len": 16}  # the sizes this helper reads
    with torch.no_grad():
        expected = model(input_ids=IDS).logits[0]
    program = convert_and_export_with_cache(model)
    torch.export.save(program, tmp_path / "relformer.pt2")  # what ExecuTorch's lowering starts from
    torch.testing.assert_close(
        stepped_logits(torch.export.load(tmp_path / "relformer.pt2")), expected, atol=1e-5, rtol=1e-5
    )
