"""LoRA through peft on the module names README documents: trains, saves, reloads and merges to the same logits."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from hf_relformer import RelformerForCausalLM

from helpers import SCHEMES, redraw_weights, tiny_config

IDS = torch.tensor([[5, 17, 33, 8, 41, 12, 9, 23], [9, 23, 4, 50, 7, 3, 11, 60]])
TARGETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gated feed-forward": ["gate_proj", "up_proj", "down_proj"],
    "all-linear": "all-linear",
}


def base_model(gated: bool, scheme: str = "relative") -> RelformerForCausalLM:
    torch.manual_seed(0)
    config = tiny_config(**SCHEMES[scheme], feed_forward_type="gated" if gated else "plain", hidden_act="silu")
    return redraw_weights(RelformerForCausalLM(config), std=0.2)


@pytest.mark.parametrize("targets", TARGETS)
def test_lora_trains_saves_reloads_and_merges(targets, tmp_path):
    gated = targets != "attention"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[targets], lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(base_model(gated), lora)
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert adapted == (set(TARGETS[targets]) if targets != "all-linear" else expected), adapted
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    model.eval()
    with torch.no_grad():
        trained = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(base_model(gated), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, trained, atol=1e-5, rtol=1e-5)
        merged = reloaded.merge_and_unload()
        assert isinstance(merged, RelformerForCausalLM)
        torch.testing.assert_close(merged(input_ids=IDS).logits, trained, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(base_model(gated)(input_ids=IDS).logits, trained, atol=1e-3)
    merged.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        again = RelformerForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=IDS).logits
    torch.testing.assert_close(again, trained, atol=1e-4, rtol=1e-4)
