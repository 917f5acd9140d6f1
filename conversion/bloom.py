"""transformers `BloomForCausalLM` / `BloomModel` folder -> Relformer causal LM / decoder (ALiBi positions).

BLOOM as Relformer options: `position_embedding_type="alibi"` (BLOOM's slopes), `embedding_layer_norm=True` (its
`word_embeddings_layernorm`), pre-norm with a final norm, biases everywhere, tanh-approximated GELU (`gelu_new`), a
feed-forward of 4 x hidden_size, and the fused `query_key_value` split per head (its rows are laid out
`[heads, 3, head_dim]`: each head's q, k and v rows in turn).

BLOOM adds `m·j` with `j` the key's position counted over real tokens (`cumsum` of the attention mask), Relformer
`-m·(i - j)` over indices: the two differ by a constant per query row, which softmax ignores, and left padding shifts
every real token of a row alike, so both give the same outputs for the real tokens of padded and unpadded batches.
"""

from __future__ import annotations

from transformers import BloomForCausalLM, BloomModel

from hf_relformer import RelformerForCausalLM, RelformerModel

from .common import SourceTensors
from .source import Tensors, TransformersSource, causal_lm_head, decoder_settings, settings, unsupported


def relformer_config(source: BloomModel, raw: dict) -> dict:
    config = source.config
    return settings(
        config, "vocab_size", "hidden_size", num_hidden_layers="n_layer", num_attention_heads="n_head",
        layer_norm_eps="layer_norm_epsilon",
    ) | dict(
        intermediate_size=4 * config.hidden_size,
        hidden_act="gelu_new",
        position_embedding_type="alibi",
        layer_norm_position="pre",
        embedding_layer_norm=True,
        attention_bias=True,
        mlp_bias=True,
        **decoder_settings(config),
    )  # fmt: skip


def map_tensors(tensors: SourceTensors, config, src: str, is_head: bool) -> tuple[Tensors, Tensors]:
    hidden, heads = config.hidden_size, config.n_head
    head_dim, inner = hidden // heads, 4 * hidden

    def linear(theirs: str, ours: str, shape: tuple[int, int]) -> None:
        mapped[f"{ours}.weight"] = tensors.take(f"{theirs}.weight", shape)
        mapped[f"{ours}.bias"] = tensors.take(f"{theirs}.bias", (shape[0],))

    mapped = {"embed_tokens.weight": tensors.take(f"{src}word_embeddings.weight", (config.vocab_size, hidden))}
    norms = [(f"{src}word_embeddings_layernorm", "embed_norm"), (f"{src}ln_f", "norm")]
    for i in range(config.n_layer):
        block, layer = f"{src}h.{i}", f"layers.{i}"
        norms += [(f"{block}.input_layernorm", f"{layer}.self_attn_norm")]
        norms += [(f"{block}.post_attention_layernorm", f"{layer}.mlp_norm")]
        qkv = f"{block}.self_attention.query_key_value"
        weight = tensors.take(f"{qkv}.weight", (3 * hidden, hidden)).view(heads, 3, head_dim, hidden)
        bias = tensors.take(f"{qkv}.bias", (3 * hidden,)).view(heads, 3, head_dim)
        for index, name in enumerate(("q", "k", "v")):
            mapped[f"{layer}.self_attn.{name}_proj.weight"] = weight[:, index].reshape(hidden, hidden).contiguous()
            mapped[f"{layer}.self_attn.{name}_proj.bias"] = bias[:, index].reshape(hidden).contiguous()
        linear(f"{block}.self_attention.dense", f"{layer}.self_attn.o_proj", (hidden, hidden))
        linear(f"{block}.mlp.dense_h_to_4h", f"{layer}.mlp.up_proj", (inner, hidden))
        linear(f"{block}.mlp.dense_4h_to_h", f"{layer}.mlp.down_proj", (hidden, inner))
    for theirs, ours in norms:
        mapped[f"{ours}.weight"] = tensors.take(f"{theirs}.weight", (hidden,))
        mapped[f"{ours}.bias"] = tensors.take(f"{theirs}.bias", (hidden,))
    return mapped, causal_lm_head(tensors, config, hidden, is_head)


SOURCE = TransformersSource(
    name="bloom", help="a transformers BloomForCausalLM / BloomModel folder (alibi positions)",
    architectures=((BloomForCausalLM, RelformerForCausalLM), (BloomModel, RelformerModel)),
    refuse=unsupported(
        "Relformer's residual branches start from the layer input", apply_residual_connection_post_layernorm=True
    ),
    config=relformer_config, tensors=map_tensors,
)  # fmt: skip
