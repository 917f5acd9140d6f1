"""transformers `GPT2LMHeadModel` / `GPT2Model` folder -> Relformer (learned positions, pre-norm, biases)."""

from __future__ import annotations

from transformers import GPT2LMHeadModel, GPT2Model

from hf_relformer import RelformerForCausalLM, RelformerModel

from .common import SourceTensors
from .source import Tensors, TransformersSource, causal_lm_head, decoder_settings, settings, unsupported


def relformer_config(source: GPT2Model, raw: dict) -> dict:
    config = source.config
    return settings(
        config,
        "vocab_size",
        hidden_size="n_embd",
        num_hidden_layers="n_layer",
        num_attention_heads="n_head",
        hidden_act="activation_function",
        max_position_embeddings="n_positions",
        layer_norm_eps="layer_norm_epsilon",
    ) | dict(
        intermediate_size=config.n_inner or 4 * config.n_embd,
        position_embedding_type="learned",
        layer_norm_position="pre",
        attention_bias=True,
        mlp_bias=True,
        **decoder_settings(config),
    )


def map_tensors(tensors: SourceTensors, config, src: str, is_head: bool) -> tuple[Tensors, Tensors]:
    hidden = config.n_embd
    inner = config.n_inner or 4 * hidden

    def conv1d(name: str, shape: tuple[int, int]):
        """GPT-2's Conv1D stores `[in, out]`; nn.Linear wants `[out, in]`."""
        return tensors.take(f"{name}.weight", shape).T.contiguous(), tensors.take(f"{name}.bias", (shape[1],))

    mapped = {
        "embed_tokens.weight": tensors.take(f"{src}wte.weight", (config.vocab_size, hidden)),
        "embed_positions.embeddings.weight": tensors.take(f"{src}wpe.weight", (config.n_positions, hidden)),
        "norm.weight": tensors.take(f"{src}ln_f.weight", (hidden,)),
        "norm.bias": tensors.take(f"{src}ln_f.bias", (hidden,)),
    }
    for i in range(config.n_layer):
        block, layer = f"{src}h.{i}", f"layers.{i}"
        for theirs, ours in (("ln_1", "self_attn_norm"), ("ln_2", "mlp_norm")):
            mapped[f"{layer}.{ours}.weight"] = tensors.take(f"{block}.{theirs}.weight", (hidden,))
            mapped[f"{layer}.{ours}.bias"] = tensors.take(f"{block}.{theirs}.bias", (hidden,))
        qkv_weight, qkv_bias = conv1d(f"{block}.attn.c_attn", (hidden, 3 * hidden))
        for name, weight, bias in zip(("q", "k", "v"), qkv_weight.chunk(3), qkv_bias.chunk(3), strict=True):
            mapped[f"{layer}.self_attn.{name}_proj.weight"] = weight
            mapped[f"{layer}.self_attn.{name}_proj.bias"] = bias
        for theirs, ours, shape in (
            ("attn.c_proj", "self_attn.o_proj", (hidden, hidden)),
            ("mlp.c_fc", "mlp.up_proj", (hidden, inner)),
            ("mlp.c_proj", "mlp.down_proj", (inner, hidden)),
        ):
            mapped[f"{layer}.{ours}.weight"], mapped[f"{layer}.{ours}.bias"] = conv1d(f"{block}.{theirs}", shape)
    return mapped, causal_lm_head(tensors, config, hidden, is_head)


SOURCE = TransformersSource(
    name="gpt2", help="a transformers GPT2LMHeadModel / GPT2Model folder",
    architectures=((GPT2LMHeadModel, RelformerForCausalLM), (GPT2Model, RelformerModel)),
    refuse=unsupported(
        "Relformer scales attention scores by 1/sqrt(head_dim)",
        scale_attn_by_inverse_layer_idx=True, scale_attn_weights=False,
    ),
    config=relformer_config, tensors=map_tensors,
)  # fmt: skip
