"""BERT folders -> Relformer encoders (post-norm, token types, embedding norm).

- `bert`: a transformers `BertModel` / `BertForMaskedLM` folder with absolute (learned) positions.
- `bert-relative-v4`: a checkpoint saved by transformers 4 with `position_embedding_type="relative_key"` or
  `"relative_key_query"` (Shaw keys term over every distance up to `max_position_embeddings - 1`, one table per
  layer, shared by the heads; `relative_key_query` adds the key-side term). transformers 5 loads such checkpoints as
  absolute-position models; the Relformer reproduces transformers 4's outputs. The reference is transformers 5's
  BERT with transformers 4's relative score restored as an attention function.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AttentionInterface, BertForMaskedLM, BertModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from hf_relformer import RelformerForMaskedLM, RelformerModel

from .common import (
    Conversion,
    ConversionError,
    Options,
    SourceTensors,
    finish,
    load_pretrained,
    load_tokenizer,
    pick_architecture,
    read_config,
    read_state_dict,
    source_name,
    transformers_conversion,
)

ARCHITECTURES = {"BertModel": (BertModel, RelformerModel), "BertForMaskedLM": (BertForMaskedLM, RelformerForMaskedLM)}
RELATIVE_TYPES = ("relative_key", "relative_key_query")


def convert(path: Path, options: Options) -> Conversion:
    """A transformers BERT folder with absolute positions."""
    raw = read_config(path, "bert", ("bert",))
    position_type = raw.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        hint = " (use the bert-relative-v4 converter)" if position_type in RELATIVE_TYPES else ""
        raise ConversionError(f"bert: position_embedding_type {position_type!r} is not absolute{hint}.")
    return _convert(path, options, raw, "bert", relative=None)


def convert_relative_v4(path: Path, options: Options) -> Conversion:
    """A transformers 4 BERT folder with `relative_key` / `relative_key_query` positions."""
    raw = read_config(path, "bert-relative-v4", ("bert",))
    position_type = raw.get("position_embedding_type", "absolute")
    if position_type not in RELATIVE_TYPES:
        raise ConversionError(
            f"bert-relative-v4: position_embedding_type must be one of {', '.join(RELATIVE_TYPES)}, got "
            f"{position_type!r} (use the bert converter for absolute positions)."
        )
    return _convert(path, options, raw, "bert-relative-v4", relative=position_type)


def _convert(path: Path, options: Options, raw: dict, name: str, relative: str | None) -> Conversion:
    source_class, head_class = ARCHITECTURES[pick_architecture(raw, name, ARCHITECTURES)]
    if raw.get("is_decoder") or raw.get("add_cross_attention"):
        raise ConversionError(f"{name}: decoder BERT checkpoints (is_decoder / add_cross_attention) are not supported.")
    kwargs = {"attn_implementation": "bert_relative_v4", "read_separately": _is_distance_table} if relative else {}
    source = load_pretrained(source_class, path, name, **kwargs)
    config = source.config
    is_mlm = head_class is RelformerForMaskedLM
    state = source.state_dict()
    if relative:  # transformers 5 has no distance_embedding: read those from the files
        files = read_state_dict(path, name)
        state |= {key: t for key, t in files.items() if _is_distance_table(key)}
    tensors = SourceTensors(state, name, options.progress)
    src = "bert." if is_mlm else ""
    hidden, inner, positions = config.hidden_size, config.intermediate_size, config.max_position_embeddings
    head_dim = hidden // config.num_attention_heads

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
    tensors.skip(
        [f"{src}pooler.dense.weight", f"{src}pooler.dense.bias"]
    )  # BertModel's pooler: not part of the encoder
    head: dict[str, torch.Tensor] = {}
    if is_mlm:
        linear("cls.predictions.transform.dense", "lm_head.dense", (hidden, hidden), head)
        linear("cls.predictions.transform.LayerNorm", "lm_head.norm", (hidden,), head)
        head["lm_head.decoder.bias"] = tensors.take("cls.predictions.decoder.bias", (config.vocab_size,))
        tensors.skip(["cls.predictions.bias"])  # the same tensor as the decoder's bias
        shape = (config.vocab_size, hidden)
        head |= tensors.output_layer(
            "cls.predictions.decoder.weight", "lm_head.decoder.weight", config.tie_word_embeddings, shape
        )
    tensors.check_all_used()

    config_kwargs = dict(
        vocab_size=config.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=inner,
        hidden_act=config.hidden_act,
        max_position_embeddings=positions,
        position_embedding_type="relative" if relative else "learned",
        relative_attention_max_distance=positions - 1,
        relative_attention_key_query=relative == "relative_key_query",
        layer_norm_position="post",
        layer_norm_eps=config.layer_norm_eps,
        embedding_layer_norm=True,
        type_vocab_size=config.type_vocab_size,
        tie_word_embeddings=config.tie_word_embeddings,
        is_decoder=False,
        pad_token_id=config.pad_token_id,
    )
    model, reinitialised = finish(config_kwargs, mapped, head_class, options, "model." if is_mlm else "", head)
    if relative:
        _restore_relative_attention(source, state, relative, src)
    tokenizer = load_tokenizer(path, name, config.vocab_size)
    notes = [] if is_mlm or f"{src}pooler.dense.weight" not in state else ["BertModel's pooler is not converted."]
    return transformers_conversion(
        source, model, name, source_name(raw, path), tokenizer, reinitialised, path, notes, token_types=True
    )


def _is_distance_table(name: str) -> bool:
    """transformers 4's relative-position table of a layer, which transformers 5's BERT does not have."""
    return name.endswith("attention.self.distance_embedding.weight")


def _restore_relative_attention(source: nn.Module, state: dict, relative: str, src: str) -> None:
    """Give transformers 5's BERT back transformers 4's relative positions: no absolute position embeddings, and a
    `distance_embedding` per layer read by `bert_relative_v4_attention`."""
    bert = source.bert if hasattr(source, "bert") else source
    with torch.no_grad():
        bert.embeddings.position_embeddings.weight.zero_()
    for i, layer in enumerate(bert.encoder.layer):
        table = state[f"{src}encoder.layer.{i}.attention.self.distance_embedding.weight"]
        layer.attention.self.distance_embedding = nn.Embedding.from_pretrained(table.float())
        layer.attention.self.relative_type = relative
        layer.attention.self.max_position_embeddings = bert.config.max_position_embeddings


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
