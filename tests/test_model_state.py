"""A model object holds no hidden state: nothing a call does to it (generate, save, eval, inference mode) changes
what a later call, a copy or another thread sees. Each test here is a trap that the CPU decode layout of 0.2.1
(generate() re-strided the weights in place; state_dict() and train() put them back) fell into; the layout is gone
(README, Performance: why)."""

import copy
import threading

import pytest
import torch
from torch import nn

from hf_relformer import RelformerForCausalLM

from helpers import tiny_lm, tiny_seq2seq

IDS = torch.tensor([[5, 17, 33, 8, 41, 12], [9, 23, 4, 50, 3, 7]])


def greedy_logits(model: nn.Module, ids: torch.Tensor, new_tokens: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.generate(
        ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
        output_logits=True, pad_token_id=0,
    )  # fmt: skip
    return out.sequences, torch.stack(out.logits, dim=1)


def layouts(model: nn.Module) -> dict[str, tuple]:
    """Every parameter's storage and strides: what a call must not change."""
    return {name: (p.data_ptr(), p.stride(), p.dtype) for name, p in model.named_parameters()}


@pytest.mark.parametrize("make", [tiny_lm, tiny_seq2seq], ids=["decoder-only", "encoder-decoder"])
def test_no_call_changes_the_parameters(make, tmp_path):
    model = make("relative")
    before = layouts(model)
    inputs = {"decoder_input_ids": IDS[:, :3]} if model.config.is_encoder_decoder else {}
    for rows in (1, 2, 5, 8):
        model.generate(IDS[:1].repeat(rows, 1), max_new_tokens=3, do_sample=False, pad_token_id=0)
    model.generate(IDS, max_new_tokens=3, num_beams=2, pad_token_id=0)
    with torch.inference_mode():
        model.generate(IDS[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    model.state_dict()
    model.save_pretrained(tmp_path / "saved")
    model.train()
    model(IDS, **inputs)
    model.eval()
    assert layouts(model) == before


def test_a_deep_copy_after_generate_saves_and_reloads(tmp_path):
    """What an EMA copy or TRL's reference model does: generate, deepcopy, save the copy."""
    model = tiny_lm("relative")
    greedy_logits(model, IDS[:1])
    twin = copy.deepcopy(model)
    twin.save_pretrained(tmp_path / "twin")
    reloaded = RelformerForCausalLM.from_pretrained(tmp_path / "twin").eval()
    torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)


def test_gradients_after_generate_under_inference_mode_without_train():
    """Attribution and probing take gradients in eval mode: a generate() under inference_mode must leave the
    weights ordinary tensors, so that a backward pass and an optimizer step follow without `.train()`."""
    model = tiny_lm("relative")
    with torch.inference_mode():
        sequences, _ = greedy_logits(model, IDS[:1])
    sequences = sequences.clone()  # made under inference_mode: an ordinary tensor for autograd
    assert not any(p.is_inference() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(sequences, labels=sequences).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    optimizer.step()
    assert model(sequences, labels=sequences).loss < loss


def test_generate_then_bfloat16_save_and_reload_give_the_same_logits(tmp_path):
    model = tiny_lm("relative")
    greedy_logits(model, IDS[:1])
    model = model.to(torch.bfloat16)
    expected = model(IDS).logits
    model.save_pretrained(tmp_path / "bf16")
    reloaded = RelformerForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert reloaded.dtype == torch.bfloat16
    torch.testing.assert_close(reloaded(IDS).logits, expected, atol=0, rtol=0)


def test_two_threads_generating_on_one_model_get_the_tokens_of_one_after_another():
    """A server's threads share one model: batch 1 and batch 8 at once, 20 rounds each, must decode exactly what the
    same calls decode one after another."""
    model = tiny_lm("relative")
    prompts = {1: IDS[:1], 8: IDS.repeat(4, 1)}
    expected = {rows: greedy_logits(model, ids)[0] for rows, ids in prompts.items()}
    results, errors = {rows: [] for rows in prompts}, []

    def work(rows: int) -> None:
        try:
            for _ in range(20):
                results[rows].append(greedy_logits(model, prompts[rows])[0])
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(rows,)) for rows in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for rows, runs in results.items():
        assert len(runs) == 20 and all(torch.equal(run, expected[rows]) for run in runs), rows


def test_torchao_int8_weight_only_generates_at_batch_one():
    """torchao's int8 weight-only layers decode one row as they decode five (the layout used to transpose them)."""
    quantization = pytest.importorskip("torchao.quantization")
    model = tiny_lm("relative")
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    assert "Int8" in type(model.lm_head.weight).__name__
    one, _ = greedy_logits(model, IDS[:1])
    five, _ = greedy_logits(model, IDS[:1].repeat(5, 1))
    assert all(torch.equal(row, one[0]) for row in five)


def test_torchao_int8_checkpoint_loads_and_generates(tmp_path):
    """`from_pretrained(..., quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))`: quantized layers are left
    as they are, and batch 1 decodes as batch 5."""
    quantization = pytest.importorskip("torchao.quantization")
    from transformers import TorchAoConfig

    tiny_lm("relative").save_pretrained(tmp_path / "fp32")
    config = TorchAoConfig(quantization.Int8WeightOnlyConfig())
    model = RelformerForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=config).eval()
    assert "Int8" in type(model.model.layers[0].self_attn.q_proj.weight).__name__
    one, _ = greedy_logits(model, IDS[:1])
    five, _ = greedy_logits(model, IDS[:1].repeat(5, 1))
    assert all(torch.equal(row, one[0]) for row in five)
