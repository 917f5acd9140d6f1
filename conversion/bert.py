"""BERT folders -> Relformer encoders (post-norm, token types, embedding norm).

- `bert`: a transformers `BertModel` / `BertForMaskedLM` folder with absolute (learned) positions.
- `bert-relative-v4`: a checkpoint saved by transformers 4 with `position_embedding_type="relative_key"` or
  `"relative_key_query"` (Shaw keys term over every distance up to `max_position_embeddings - 1`, one table per
  layer, shared by the heads; `relative_key_query` adds the key-side term). transformers 5 loads such checkpoints as
  absolute-position models; the Relformer reproduces transformers 4's outputs. The reference is transformers 5's
  BERT with transformers 4's relative score restored as an attention function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, BertForMaskedLM, BertModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from hf_relformer import RelformerForMaskedLM, RelformerModel

from .common import SourceTensors, read_state_dict
from .source import Located, Tensors, TransformersSource, settings

RELATIVE_TYPES = ("relative_key", "relative_key_query")


def refuse_relative(config: dict) -> str | None:
    """The `bert` source takes absolute positions only."""
    position_type = config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        hint = " (use the bert-relative-v4 converter)" if position_type in RELATIVE_TYPES else ""
        return f"position_embedding_type {position_type!r} is not absolute{hint}."
    return _refuse_decoder(config)


def refuse_absolute(config: dict) -> str | None:
    """The `bert-relative-v4` source takes transformers 4's relative positions only."""
    position_type = config.get("position_embedding_type", "absolute")
    if position_type not in RELATIVE_TYPES:
        return (
            f"position_embedding_type must be one of {', '.join(RELATIVE_TYPES)}, got {position_type!r} (use the bert "
            "converter for absolute positions)."
        )
    return _refuse_decoder(config)


def _refuse_decoder(config: dict) -> str | None:
    if config.get("is_decoder") or config.get("add_cross_attention"):
        return "decoder BERT checkpoints (is_decoder / add_cross_attention) are not supported."
    return None


def relformer_config(source: BertModel, raw: dict) -> dict:
    config = source.config
    same = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    same += ("hidden_act", "max_position_embeddings", "layer_norm_eps", "type_vocab_size", "tie_word_embeddings")
    relative = raw.get("position_embedding_type", "absolute") in RELATIVE_TYPES
    return settings(config, *same, "pad_token_id") | dict(
        position_embedding_type="relative" if relative else "learned",
        relative_attention_max_distance=config.max_position_embeddings - 1,
        relative_attention_key_query=raw.get("position_embedding_type") == "relative_key_query",
        layer_norm_position="post",
        embedding_layer_norm=True,
        is_decoder=False,
    )


def map_tensors(tensors: SourceTensors, config, src: str, is_head: bool) -> tuple[Tensors, Tensors]:
    hidden, inner, positions = config.hidden_size, config.intermediate_size, config.max_position_embeddings
    head_dim = hidden // config.num_attention_heads
    relative = any(_is_distance_table(name) for name in tensors.tensors)

    def linear(theirs: str, ours: str, shape: tuple[int, ...], into: dict | None = None) -> None:
        """A weight and its bias (LayerNorm too: `shape` `(hidden,)`)."""
        into = mapped if into is None else into
        into[f"{ours}.weight"] = tensors.take(f"{theirs}.weight", shape)
        into[f"{ours}.bias"] = tensors.take(f"{theirs}.bias", shape[:1])

    def norm(theirs: str, ours: str) -> None:
        linear(theirs, ours, (hidden,))

    mapped: dict[str, torch.Tensor] = {
        "embed_tokens.weight": tensors.take(f"{src}embeddings.word_embeddings.weight", (config.vocab_size, hidden)),
        "embed_token_types.weight": tensors.take(
            f"{src}embeddings.token_type_embeddings.weight", (config.type_vocab_size, hidden)
        ),
    }
    position_table = tensors.take(f"{src}embeddings.position_embeddings.weight", (positions, hidden))
    if not relative:
        mapped["embed_positions.embeddings.weight"] = position_table  # (unused by transformers 4's relative BERT)
    norm(f"{src}embeddings.LayerNorm", "embed_norm")
    for i in range(config.num_hidden_layers):
        block, layer = f"{src}encoder.layer.{i}", f"layers.{i}"
        for theirs, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            linear(f"{block}.attention.self.{theirs}", f"{layer}.self_attn.{ours}", (hidden, hidden))
        linear(f"{block}.attention.output.dense", f"{layer}.self_attn.o_proj", (hidden, hidden))
        norm(f"{block}.attention.output.LayerNorm", f"{layer}.self_attn_norm")
        linear(f"{block}.intermediate.dense", f"{layer}.mlp.up_proj", (inner, hidden))
        linear(f"{block}.output.dense", f"{layer}.mlp.down_proj", (hidden, inner))
        norm(f"{block}.output.LayerNorm", f"{layer}.mlp_norm")
        if relative:
            # transformers 4 indexes its table by (i - j) + P - 1; the Relformer by clip(j - i) + k with k = P - 1
            table = tensors.take(f"{block}.attention.self.distance_embedding.weight", (2 * positions - 1, head_dim))
            mapped[f"{layer}.self_attn.position.relative_key_table"] = table.flip(0)
    tensors.skip([f"{src}pooler.dense.weight", f"{src}pooler.dense.bias"])  # BertModel's pooler: not the encoder's
    head: dict[str, torch.Tensor] = {}
    if is_head:
        linear("cls.predictions.transform.dense", "lm_head.dense", (hidden, hidden), head)
        linear("cls.predictions.transform.LayerNorm", "lm_head.norm", (hidden,), head)
        head["lm_head.decoder.bias"] = tensors.take("cls.predictions.decoder.bias", (config.vocab_size,))
        tensors.skip(["cls.predictions.bias"])  # the same tensor as the decoder's bias
        shape = (config.vocab_size, hidden)
        head |= tensors.output_layer(
            "cls.predictions.decoder.weight", "lm_head.decoder.weight", config.tie_word_embeddings, shape
        )
    return mapped, head


@dataclass(frozen=True, kw_only=True)
class BertSource(TransformersSource):
    """A transformers BERT folder with absolute positions."""

    def notes(self, source: BertModel, state: Tensors) -> list[str]:
        return ["BertModel's pooler is not converted."] if "pooler.dense.weight" in state else []


@dataclass(frozen=True, kw_only=True)
class RelativeBertSource(BertSource):
    """A transformers 4 BERT folder with `relative_key` / `relative_key_query` positions: transformers 5 loads it
    without its `distance_embedding` tables, which are read from the files and given back to it."""

    def load_kwargs(self, located: Located) -> dict:
        return {"attn_implementation": "bert_relative_v4", "read_separately": _is_distance_table}

    def state_dict(self, source: BertModel, located: Located) -> Tensors:
        files = read_state_dict(located.folder, self.name)
        return source.state_dict() | {key: t for key, t in files.items() if _is_distance_table(key)}

    def prepare_reference(self, source: BertModel, state: Tensors, located: Located) -> None:
        """Give transformers 5's BERT back transformers 4's relative positions: no absolute position embeddings, and
        a `distance_embedding` per layer read by `bert_relative_v4_attention`."""
        bert = source.bert if hasattr(source, "bert") else source
        src = "bert." if bert is not source else ""
        with torch.no_grad():
            bert.embeddings.position_embeddings.weight.zero_()
        for i, layer in enumerate(bert.encoder.layer):
            table = state[f"{src}encoder.layer.{i}.attention.self.distance_embedding.weight"]
            layer.attention.self.distance_embedding = nn.Embedding.from_pretrained(table.float())
            layer.attention.self.relative_type = located.config["position_embedding_type"]
            layer.attention.self.max_position_embeddings = bert.config.max_position_embeddings


BERT = dict(
    architectures=((BertModel, RelformerModel), (BertForMaskedLM, RelformerForMaskedLM)),
    config=relformer_config,
    tensors=map_tensors,
    token_types=True,
)  # what the two BERT sources share
SOURCE = BertSource(
    name="bert",
    help="a transformers BertModel / BertForMaskedLM folder (absolute positions)",
    refuse=refuse_relative,
    **BERT,
)
RELATIVE_V4 = RelativeBertSource(
    name="bert-relative-v4",
    help="a BERT folder saved by transformers 4 with position_embedding_type relative_key or relative_key_query "
    "(transformers 5 no longer runs these)",
    refuse=refuse_absolute,
    **BERT,
)


def _is_distance_table(name: str) -> bool:
    """transformers 4's relative-position table of a layer, which transformers 5's BERT does not have."""
    return name.endswith("attention.self.distance_embedding.weight")


def bert_relative_v4_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers 4's `BertSelfAttention` scores with relative positions (eager): query/key/value `[B, H, L, D]`."""
    query_length, key_length = query.shape[2], key.shape[2]
    distance = torch.arange(query_length)[:, None] - torch.arange(key_length)[None, :]
    table = module.distance_embedding(distance + module.max_position_embeddings - 1).to(query.dtype)  # [Lq, Lk, D]
    scores = query @ key.transpose(2, 3) + torch.einsum("bhld,lrd->bhlr", query, table)
    if module.relative_type == "relative_key_query":
        scores = scores + torch.einsum("bhrd,lrd->bhlr", key, table)
    scores = scores * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:  # additive, from eager_mask
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1)
    return (probs @ value).transpose(1, 2).contiguous(), probs


AttentionInterface.register("bert_relative_v4", bert_relative_v4_attention)
AttentionMaskInterface.register("bert_relative_v4", eager_mask)
