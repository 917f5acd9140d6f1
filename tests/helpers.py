"""Test helpers: tiny configs and weights large enough that generation tests can fail, and the naive Shaw
attention reference with the comparison of a layer's attention against it."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

import hf_relformer  # noqa: F401  (registers the Auto classes)
from hf_relformer import RelformerConfig, RelformerForCausalLM, RelformerForConditionalGeneration, RelformerModel
from hf_relformer.attention_relformer import AttentionMask, repeat_kv
from hf_relformer.positions_relformer import POSITION_SCHEMES, PositionScheme
from hf_relformer.variants import scheme_variants

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("RELFORMER_ASSETS", REPO_ROOT / "assets"))

# Settings that tiny models need for a scheme (T5's default 16 buckets up to distance 16 would put every test
# distance in an exact bucket: 8 buckets up to 12 reach the log-spaced ones).
TINY_SETTINGS = {"t5": {"relative_attention_num_buckets": 8, "relative_attention_max_distance": 12}}

# Every position scheme and its named variants (relative: keys / keys+values, shared / per-head), as config
# overrides, from the registry, with the settings of tiny models.
SCHEMES = {
    name: overrides | TINY_SETTINGS.get(overrides["position_embedding_type"], {})
    for name, overrides in scheme_variants().items()
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


def scheme_of(variant: str) -> PositionScheme:
    """The registry's scheme object of a variant name of `SCHEMES`."""
    return POSITION_SCHEMES[SCHEMES[variant]["position_embedding_type"]]


def builds(**overrides) -> bool:
    """Whether a tiny config with these overrides can be built (xPos is causal: it has no encoder form)."""
    try:
        tiny_config(**overrides)
    except ValueError:
        return False
    return True


# The variants whose scheme has an encoder form (is_decoder=False)
ENCODER_SCHEMES = [name for name in SCHEMES if builds(**SCHEMES[name], is_decoder=False)]


def skip_without_encoder(variant: str) -> None:
    """Skip a test of the encoder form for a variant that has none (its refusal is tested in test_config.py)."""
    if variant not in ENCODER_SCHEMES:
        import pytest

        pytest.skip(f"{variant} has no encoder form")


# The variants that run SDPA attention (the others, eager alone)
SDPA_SCHEMES = [name for name in SCHEMES if "sdpa" in scheme_of(name).backends(tiny_config(**SCHEMES[name]))]


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


def naive_shaw_attention(
    query, key, value, key_table, value_table, max_distance, causal, query_offset, mask=None, key_query=False
):
    """Shaw et al. (2018), eq. (3)-(5), written the obvious way (`key_query`: plus `k_j·a_ij`, Huang et al. 2020).

    query `[B, H, Lq, D]` at positions `query_offset + i`, key/value `[B, H, Lk, D]` at positions `j`; tables
    `[R, D]` (shared) or `[H, R, D]` (per head), with rows for distances -k..0 (causal) or -k..k. `mask` `[B, Lk]`.
    """
    lq, lk, d = query.shape[2], key.shape[2], query.shape[3]
    distance = torch.arange(lk)[None, :] - (query_offset + torch.arange(lq))[:, None]  # j - i
    rows = distance.clamp(-max_distance, max_distance) + max_distance  # row of a 2k + 1 table
    if causal:  # tables keep only distances -k..0
        rows = rows.clamp(max=max_distance)
    a_key = key_table[..., rows, :]  # [Lq, Lk, D] or [H, Lq, Lk, D]
    if key_table.dim() == 2:
        a_key = a_key.expand(query.shape[1], lq, lk, d)
    scores = query @ key.transpose(-1, -2) + torch.einsum("bhid,hijd->bhij", query, a_key)
    if key_query:
        scores = scores + torch.einsum("bhjd,hijd->bhij", key, a_key)
    scores = scores / math.sqrt(d)
    if causal:
        scores = scores.masked_fill(distance > 0, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    out = probs @ value
    if value_table is not None:
        a_value = value_table[..., rows, :]
        if value_table.dim() == 2:
            a_value = a_value.expand(query.shape[1], lq, lk, d)
        out = out + torch.einsum("bhij,hijd->bhid", probs, a_value)
    return out


def run_attention(model, hidden, past, mask):
    """Run layer 0's attention on `hidden [B, L, C]`, the first `past` positions as a cache, then the rest
    (`mask` `[B, L]`, or None for no mask at all).

    Returns the output of the second call (before the output projection) and the projected q, k, v of all of
    `hidden`, so the reference can be computed from the very same projections.
    """
    attention = model.layers[0].self_attn
    captured = {}
    hook = attention.o_proj.register_forward_hook(lambda module, args, out: captured.__setitem__("out", args[0]))
    cache = DynamicCache(config=model.config) if model.is_causal else None
    query_length = hidden.shape[1] - past

    def call(states, past_length, key_length, attention_mask):
        position_ids = (torch.arange(states.shape[1]) + past_length)[None]
        embedded = states.new_zeros(states.shape)
        _, buckets = model.embed_positions(embedded, position_ids, past_length, key_length)
        return attention(states, attention_mask, buckets, cache)

    full_mask = model_mask(model, hidden, mask, past)
    if past:
        prefix_mask = None if mask is None else mask[:, :past]
        call(hidden[:, :past], 0, past, model_mask(model, hidden[:, :past], prefix_mask, 0))
    call(hidden[:, past:], past, hidden.shape[1], full_mask)
    hook.remove()
    shape = (hidden.shape[0], -1, attention.head_dim)
    q, k, v = (
        proj(hidden).view(*hidden.shape[:2], *shape[1:]).transpose(1, 2)
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
    )
    out = captured["out"].view(hidden.shape[0], query_length, -1, attention.head_dim).transpose(1, 2)
    return (
        out,
        q[:, :, past:],
        repeat_kv(k, attention.num_key_value_groups),
        repeat_kv(v, attention.num_key_value_groups),
    )


def model_mask(model, hidden, mask, past):
    """The mask description the model would build for these inputs."""
    return AttentionMask.of(mask, hidden.shape[0], hidden.shape[1] - past, hidden.shape[1], model.is_causal, past)


def assert_attention_matches_naive(model: RelformerModel, hidden: torch.Tensor, past: int, mask: torch.Tensor | None):
    """Layer 0's self-attention of `model` (a decoder-only or encoder `RelformerModel` with relative positions) on
    `hidden [B, L, C]`, the first `past` positions from a cache, equals `naive_shaw_attention` at every real query.

    A causal query at a pad sees no key at all: its output is arbitrary, so only real queries are compared.
    """
    out, q, k, v = run_attention(model, hidden, past, mask)
    config, shaw = model.config, model.layers[0].self_attn.position
    expected = naive_shaw_attention(
        q,
        k,
        v,
        shaw.relative_key_table,
        shaw.relative_value_table,
        config.relative_attention_max_distance,
        model.is_causal,
        past,
        mask,
        key_query=config.relative_attention_key_query,
    )
    real_queries = torch.ones(hidden.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    real_queries = real_queries[:, past:]
    torch.testing.assert_close(
        out.transpose(1, 2)[real_queries], expected.transpose(1, 2)[real_queries], atol=1e-5, rtol=1e-5
    )


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
    outputs = model(**inputs)
logits = outputs.logits if "logits" in outputs else outputs.last_hidden_state  # a bare model: its hidden states
generated = None
if model.can_generate():
    generated = model.generate(inputs["input_ids"], max_new_tokens=10, min_new_tokens=10, do_sample=False).tolist()
print(json.dumps({"config": type(config).__name__, "model": type(model).__name__, "logits": logits.tolist(),
                  "generated": generated}))
"""


def run_remote_code(folder: Path, auto_name: str, inputs: dict[str, torch.Tensor], work_dir: Path) -> dict:
    """Load `folder` with `transformers.<auto_name>` and trust_remote_code=True in a fresh process where hf_relformer
    cannot be imported; returns its config and model class names, logits (a bare model's last hidden states) and (for
    generative models) 10 greedy tokens."""
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


def load_example(name: str, folder: str = "examples"):
    """The module `examples/NAME.py` (or `FOLDER/NAME.py`: a script), imported under the name `NAME`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
