"""Tensor parallelism through transformers' own machinery: a saved Relformer loaded with
`from_pretrained(..., tp_plan="auto")` by two `torchrun` processes (gloo, CPU) gives the one-process logits, greedy
tokens and gradients, for every scheme and variant in every form (decoder-only, encoder, encoder-decoder).

The plan (`RelformerConfig.base_model_tp_plan`) shards q/k/v by heads and the output projection by rows, the
feed-forward likewise; per-head position tables are replicated and each rank reads its heads' rows, so a wrong head
slice shows in the logits. One `torchrun` launch runs every model (a launch costs ~10 s)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers.utils.import_utils import is_torch_greater_or_equal

from hf_relformer import RelformerForCausalLM, RelformerForConditionalGeneration, RelformerForMaskedLM

from helpers import ENCODER_SCHEMES, SCHEMES, redraw_weights, tiny_config

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not is_torch_greater_or_equal("2.5"), reason="needs torch.distributed"
)

FORMS = {
    "decoder-only": (RelformerForCausalLM, {}),
    "encoder": (RelformerForMaskedLM, {"is_decoder": False}),
    "encoder-decoder": (RelformerForConditionalGeneration, {"is_encoder_decoder": True, "decoder_start_token_id": 1}),
}
CASES = [(form, variant) for form in FORMS for variant in (ENCODER_SCHEMES if form == "encoder" else SCHEMES)] + [
    ("encoder", "relative_key_query")
]
IDS = [[5, 9, 3, 17, 22, 8, 41, 7, 11, 13], [6, 2, 19, 33, 4, 28, 12, 50, 9, 3]]

# Run by each torchrun process: load every folder with tp_plan="auto"; rank 0 saves what each model gives.
TP_SCRIPT = """
import json, sys
import torch
import hf_relformer  # registers the Auto classes
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM
from tensor_parallel_inputs import outputs
auto = {"decoder-only": AutoModelForCausalLM, "encoder": AutoModelForMaskedLM, "encoder-decoder": AutoModelForSeq2SeqLM}
results = {}
for folder, form in json.loads(open(sys.argv[1]).read()):
    model = auto[form].from_pretrained(folder, tp_plan="auto")
    assert model.tp_size == 2
    q_proj = model.get_decoder().layers[0].self_attn.q_proj.weight if form != "encoder" else (
        model.model.layers[0].self_attn.q_proj.weight)
    assert q_proj.to_local().shape[0] == q_proj.shape[0] // 2, "q_proj is not sharded"
    results[folder] = outputs(model, form)
if torch.distributed.get_rank() == 0:
    torch.save(results, sys.argv[2])
"""

# What each model gives, in both processes (full tensors of sharded gradients).
INPUTS_MODULE = f"""
import torch
IDS = torch.tensor({IDS})

def outputs(model, form):
    model.eval()
    with torch.no_grad():
        extra = {{"decoder_input_ids": IDS[:, :6]}} if form == "encoder-decoder" else {{}}
        result = {{"logits": model(input_ids=IDS, **extra).logits}}
        if form != "encoder":
            result["tokens"] = model.generate(IDS, max_new_tokens=6, do_sample=False)
    model.train()
    labels = IDS[:, :6].contiguous() if form == "encoder-decoder" else IDS
    model(input_ids=IDS, labels=labels, **extra).loss.backward()
    grads = {{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
    result["grads"] = {{n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}}
    return result
"""


def build(form: str, variant: str) -> torch.nn.Module:
    model_class, form_overrides = FORMS[form]
    overrides = (
        {**SCHEMES["relative"], "relative_attention_key_query": True} if variant == "relative_key_query"
        else SCHEMES[variant]
    )  # fmt: skip
    return redraw_weights(model_class(tiny_config(**overrides, **form_overrides)), std=0.3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(form, variant): (one-process outputs, two-process outputs)}, from one torchrun launch."""
    work = tmp_path_factory.mktemp("tensor_parallel")
    (work / "tensor_parallel_inputs.py").write_text(INPUTS_MODULE)
    (work / "tp_run.py").write_text(TP_SCRIPT)
    sys.path.insert(0, str(work))
    try:
        from tensor_parallel_inputs import outputs
    finally:
        sys.path.remove(str(work))
    manifest, single = [], {}
    for form, variant in CASES:
        folder = work / f"{form}-{variant}"
        model = build(form, variant)
        model.save_pretrained(folder)
        single[form, variant] = outputs(model, form)
        manifest.append((str(folder), form))
    (work / "manifest.json").write_text(json.dumps(manifest))
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(work)}
    result = subprocess.run(
        [*command, str(work / "tp_run.py"), str(work / "manifest.json"), str(work / "tp.pt")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    sharded = torch.load(work / "tp.pt", weights_only=True)
    return {case: (single[case], sharded[folder]) for case, (folder, _) in zip(CASES, manifest, strict=True)}


@pytest.mark.parametrize(("form", "variant"), CASES)
def test_two_ranks_give_the_one_process_logits_tokens_and_gradients(runs, form, variant):
    single, sharded = runs[form, variant]
    # float32 sums in another order (each rank's heads, then an all-reduce): 1e-5 of the logits' size
    torch.testing.assert_close(sharded["logits"], single["logits"], atol=1e-5, rtol=1e-5)
    if "tokens" in single:
        assert torch.equal(sharded["tokens"], single["tokens"])
    assert sharded["grads"].keys() == single["grads"].keys()
    for name, grad in single["grads"].items():  # position tables included: their gradients summed over the ranks
        torch.testing.assert_close(sharded["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_plan_shards_every_projection_and_names_only_existing_modules():
    for form, (model_class, form_overrides) in FORMS.items():
        for variant, overrides in SCHEMES.items():
            if form == "encoder" and variant not in ENCODER_SCHEMES:
                continue
            config = tiny_config(**overrides, **form_overrides, feed_forward_type="gated")
            plan, model = config.base_model_tp_plan, model_class(config)
            modules = dict(model.base_model.named_modules())
            for key in plan:
                assert key.replace("*", "0") in modules, (form, variant, key)
            # the plan transformers collects from the model and its sub-models (each stack of an encoder-decoder)
            names = dict(model.named_modules()) | dict(model.named_parameters())
            for key in model.tp_plan:
                assert key.replace("*", "0") in names, (form, variant, key)
            linears = {
                name.replace(".0.", ".*.")
                for name, module in modules.items()
                if isinstance(module, torch.nn.Linear) and ".0." in name
            }
            assert linears == {key for key, style in plan.items() if style in ("colwise", "rowwise")}, (form, variant)
