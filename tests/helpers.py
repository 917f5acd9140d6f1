"""Test helpers: tiny configs and weights large enough that generation tests can fail."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import hf_relformer  # noqa: F401  (registers the Auto classes)
from hf_relformer import RelformerConfig, RelformerForCausalLM, RelformerForConditionalGeneration

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("RELFORMER_ASSETS", REPO_ROOT / "assets"))

# Every position scheme, as config overrides; the relative ones cover keys / keys+values, shared / per-head.
SCHEMES = {
    "relative": {"position_embedding_type": "relative"},
    "relative_values": {"position_embedding_type": "relative", "relative_attention_values": True},
    "relative_per_head": {"position_embedding_type": "relative", "relative_attention_per_head": True},
    "relative_values_per_head": {
        "position_embedding_type": "relative",
        "relative_attention_values": True,
        "relative_attention_per_head": True,
    },
    "sinusoidal": {"position_embedding_type": "sinusoidal"},
    "learned": {"position_embedding_type": "learned"},
    "rotary": {"position_embedding_type": "rotary"},
    "none": {"position_embedding_type": "none"},
}


def tiny_config(**overrides) -> RelformerConfig:
    """A 2-layer model small enough for fast CPU tests; k = 3 so that tests run both below and above k."""
    values = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        relative_attention_max_distance=3,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return RelformerConfig(**values)


@torch.no_grad()
def redraw_weights(model: torch.nn.Module, std: float = 0.5, seed: int = 0) -> torch.nn.Module:
    """Redraw every matrix with a large std: at the default init (0.02) greedy decoding repeats one token, so a
    cache, padding or beam test on such a model could never fail."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        if parameter.dim() > 1:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model.eval()


def tiny_lm(scheme: str = "relative", seed: int = 0, **overrides) -> RelformerForCausalLM:
    """A tiny causal LM of one scheme with large random weights, in eval mode."""
    torch.manual_seed(seed)
    model = RelformerForCausalLM(tiny_config(**SCHEMES[scheme], **overrides))
    return redraw_weights(model, seed=seed)


def tiny_seq2seq(scheme: str = "relative", seed: int = 0, **overrides) -> RelformerForConditionalGeneration:
    """A tiny encoder-decoder: encoder of 2 layers, decoder of 3 (different depths on purpose), large weights."""
    values = {"is_encoder_decoder": True, "decoder_layers": 3, "decoder_start_token_id": 1, **overrides}
    config = tiny_config(**SCHEMES[scheme], **values)
    torch.manual_seed(seed)
    return redraw_weights(RelformerForConditionalGeneration(config), seed=seed)


REMOTE_SCRIPT = """
import json, sys
sys.modules["hf_relformer"] = None  # as on a machine where the package is not installed
try:
    import hf_relformer
    raise SystemExit("hf_relformer is importable")
except ImportError:
    pass
import torch
import transformers
path, auto_name, inputs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
inputs = {name: torch.tensor(value) for name, value in inputs.items()}
config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=True)
model = getattr(transformers, auto_name).from_pretrained(path, trust_remote_code=True)
transformers.AutoModel.from_pretrained(path, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    logits = model(**inputs).logits
generated = None
if model.can_generate():
    generated = model.generate(inputs["input_ids"], max_new_tokens=10, min_new_tokens=10, do_sample=False).tolist()
print(json.dumps({"config": type(config).__name__, "logits": logits.tolist(), "generated": generated}))
"""


def run_remote_code(folder: Path, auto_name: str, inputs: dict[str, torch.Tensor], work_dir: Path) -> dict:
    """Load `folder` with `transformers.<auto_name>` and trust_remote_code=True in a fresh process where hf_relformer
    cannot be imported; returns its config class name, logits and (for generative models) 10 greedy tokens."""
    env = {**os.environ, "HF_MODULES_CACHE": str(work_dir / "modules"), "HF_HUB_OFFLINE": "1"}
    json_inputs = json.dumps({name: value.tolist() for name, value in inputs.items()})
    return run_script(REMOTE_SCRIPT, [str(folder), auto_name, json_inputs], env, work_dir)


def run_script(script: str, args: list[str], env: dict[str, str], work_dir: Path) -> dict:
    """Run `python -c script args` in a fresh process; return the JSON it prints last (fails with its stderr)."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, cwd=work_dir, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
