"""transformers `T5ForConditionalGeneration` / `T5EncoderModel` folder -> Relformer encoder-decoder / encoder.

Everything T5 does is an ordinary Relformer option: `position_embedding_type="t5"` (its bucketed scalar bias, from the
first layer's `relative_attention_bias` table, in self-attention only), `scale_attention_scores=False` (T5 does not
divide the scores by sqrt(head_dim)), `norm_type="rms_norm"` (T5LayerNorm: no centring, no bias), a `plain` relu or
`gated` gelu_new feed-forward, no biases, pre-norm with final norms, and `scale_lm_head_input` for the
`d_model**-0.5` rescale T5 applies before a tied LM head (`scale_decoder_outputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import T5EncoderModel, T5ForConditionalGeneration

from hf_relformer import RelformerForConditionalGeneration, RelformerModel

from .common import Conversion, SourceTensors
from .source import Tensors, TransformersSource

DECODER_SAMPLE_LENGTH = 9  # decoder inputs of the verification (seeded random ids after the start token)


def relformer_config(source: T5EncoderModel, raw: dict) -> dict:
    config = source.config
    is_lm = hasattr(source, "lm_head")
    tied = _tied(source.state_dict(), is_lm)
    settings = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        head_dim=config.d_kv,
        intermediate_size=config.d_ff,
        hidden_act=config.dense_act_fn,
        feed_forward_type="gated" if config.is_gated_act else "plain",
        position_embedding_type="t5",
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        scale_attention_scores=False,
        layer_norm_position="pre",
        norm_type="rms_norm",
        layer_norm_eps=config.layer_norm_epsilon,
        final_layer_norm=True,
        attention_bias=False,
        mlp_bias=False,
        type_vocab_size=0,
        tie_word_embeddings=tied,
        is_decoder=False,
        pad_token_id=config.pad_token_id,
        eos_token_id=config.eos_token_id,
    )
    if is_lm:
        settings.update(
            is_encoder_decoder=True,
            encoder_layers=config.num_layers,
            decoder_layers=config.num_decoder_layers,
            decoder_start_token_id=config.decoder_start_token_id,
            scale_lm_head_input=bool(getattr(config, "scale_decoder_outputs", tied)),
        )
    return settings


def map_tensors(tensors: SourceTensors, config, src: str, is_head: bool) -> tuple[Tensors, Tensors]:
    shared = tensors.take("shared.weight", (config.vocab_size, config.d_model))
    tensors.skip(["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"])
    mapped = _stack(tensors, config, shared, "encoder.", "encoder." if is_head else "", config.num_layers, False)
    if not is_head:
        return mapped, {}
    mapped |= _stack(tensors, config, shared, "decoder.", "decoder.", config.num_decoder_layers, True)
    shape = (config.vocab_size, config.d_model)
    return mapped, tensors.output_layer("lm_head.weight", "lm_head.weight", _tied(tensors.tensors, is_head), shape)


def _tied(state: Tensors, is_lm: bool) -> bool:
    """T5 ties its LM head to the shared embedding when the two tensors are one."""
    return is_lm and torch.equal(state["lm_head.weight"], state["shared.weight"])


@dataclass(frozen=True, kw_only=True)
class T5Source(TransformersSource):
    def complete(self, conversion: Conversion, source: T5EncoderModel) -> Conversion:
        """Compare the logits of every decoder position (T5's decoder starts with decoder_start_token_id)."""
        if not hasattr(source, "lm_head"):
            return conversion
        batch = conversion.inputs["input_ids"].shape[0]
        generator = torch.Generator().manual_seed(1)
        decoder_ids = torch.randint(0, source.config.vocab_size, (batch, DECODER_SAMPLE_LENGTH), generator=generator)
        decoder_ids[:, 0] = source.config.decoder_start_token_id
        conversion.inputs["decoder_input_ids"] = decoder_ids
        conversion.compare_mask = torch.ones_like(decoder_ids)
        return conversion


SOURCE = T5Source(
    name="t5", help="a transformers T5ForConditionalGeneration / T5EncoderModel folder (t5 positions)",
    architectures=((T5ForConditionalGeneration, RelformerForConditionalGeneration), (T5EncoderModel, RelformerModel)),
    config=relformer_config, tensors=map_tensors,
)  # fmt: skip


def _stack(
    tensors: SourceTensors, config, shared: torch.Tensor, theirs: str, ours: str, layers: int, decoder: bool
) -> dict[str, torch.Tensor]:
    """One T5 stack (`encoder.` or `decoder.`): embeddings, the first layer's bias table, the layers, the final norm."""
    d, inner, heads = config.d_model, config.num_heads * config.d_kv, config.num_heads
    mapped = {
        f"{ours}embed_tokens.weight": shared,
        f"{ours}embed_positions.relative_attention_bias.weight": tensors.take(
            f"{theirs}block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (config.relative_attention_num_buckets, heads),
        ),
        f"{ours}norm.weight": tensors.take(f"{theirs}final_layer_norm.weight", (d,)),
    }
    attention_shapes = {"q": (inner, d), "k": (inner, d), "v": (inner, d), "o": (d, inner)}
    for i in range(layers):
        block, layer = f"{theirs}block.{i}.layer", f"{ours}layers.{i}"
        sublayers = [("0", "SelfAttention", "self_attn")]
        if decoder:
            sublayers.append(("1", "EncDecAttention", "cross_attn"))
        for index, their_name, our_name in sublayers:
            mapped[f"{layer}.{our_name}_norm.weight"] = tensors.take(f"{block}.{index}.layer_norm.weight", (d,))
            for name, shape in attention_shapes.items():
                weight = tensors.take(f"{block}.{index}.{their_name}.{name}.weight", shape)
                mapped[f"{layer}.{our_name}.{name}_proj.weight"] = weight
        ff = f"{block}.{2 if decoder else 1}"
        mapped[f"{layer}.mlp_norm.weight"] = tensors.take(f"{ff}.layer_norm.weight", (d,))
        projections = {"wo": "down_proj"}
        projections |= {"wi_0": "gate_proj", "wi_1": "up_proj"} if config.is_gated_act else {"wi": "up_proj"}
        for theirs_name, ours_name in projections.items():
            shape = (d, config.d_ff) if theirs_name == "wo" else (config.d_ff, d)
            mapped[f"{layer}.mlp.{ours_name}.weight"] = tensors.take(f"{ff}.DenseReluDense.{theirs_name}.weight", shape)
    return mapped
