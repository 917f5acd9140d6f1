"""transformers `LlamaForCausalLM` / `LlamaModel` folder, or a GGUF file read by transformers' GGUF loader
(dequantized to fp32) -> Relformer (rotary, RMSNorm, SwiGLU, grouped-query attention)."""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from hf_relformer import RelformerForCausalLM, RelformerModel

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
    source_name,
    transformers_conversion,
)

ARCHITECTURES = {
    "LlamaForCausalLM": (LlamaForCausalLM, RelformerForCausalLM),
    "LlamaModel": (LlamaModel, RelformerModel),
}


def convert(path: Path, options: Options) -> Conversion:
    folder, gguf_file = _locate(path, options.gguf_file)
    if gguf_file is None:
        raw = read_config(folder, "llama", ("llama",))
        source_class, head_class = ARCHITECTURES[pick_architecture(raw, "llama", ARCHITECTURES)]
        source = load_pretrained(source_class, folder, "llama")
    else:
        source_class, head_class = LlamaForCausalLM, RelformerForCausalLM
        source = load_pretrained(source_class, folder, "llama", gguf_file=gguf_file)
        if source.config.model_type != "llama":
            raise ConversionError(f"llama: {gguf_file} holds a {source.config.model_type!r} model, not llama.")
        raw = {"_name_or_path": source.config._name_or_path}
    config: LlamaConfig = source.config
    is_lm = head_class is RelformerForCausalLM
    tensors = SourceTensors(source.state_dict(), "llama", options.progress)
    src = "model." if is_lm else ""
    hidden, inner, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_size, kv_size = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim

    mapped = {
        "embed_tokens.weight": tensors.take(f"{src}embed_tokens.weight", (config.vocab_size, hidden)),
        "norm.weight": tensors.take(f"{src}norm.weight", (hidden,)),
    }
    for i in range(config.num_hidden_layers):
        block, layer = f"{src}layers.{i}", f"layers.{i}"
        shapes = {
            "self_attn.q_proj": (q_size, hidden, config.attention_bias),
            "self_attn.k_proj": (kv_size, hidden, config.attention_bias),
            "self_attn.v_proj": (kv_size, hidden, config.attention_bias),
            "self_attn.o_proj": (hidden, q_size, config.attention_bias),
            "mlp.gate_proj": (inner, hidden, config.mlp_bias),
            "mlp.up_proj": (inner, hidden, config.mlp_bias),
            "mlp.down_proj": (hidden, inner, config.mlp_bias),
        }
        for name, (rows, columns, bias) in shapes.items():
            mapped[f"{layer}.{name}.weight"] = tensors.take(f"{block}.{name}.weight", (rows, columns))
            if bias:
                mapped[f"{layer}.{name}.bias"] = tensors.take(f"{block}.{name}.bias", (rows,))
        mapped[f"{layer}.self_attn_norm.weight"] = tensors.take(f"{block}.input_layernorm.weight", (hidden,))
        mapped[f"{layer}.mlp_norm.weight"] = tensors.take(f"{block}.post_attention_layernorm.weight", (hidden,))
    shape = (config.vocab_size, hidden)
    head = tensors.output_layer("lm_head.weight", "lm_head.weight", config.tie_word_embeddings, shape) if is_lm else {}
    tensors.check_all_used()

    config_kwargs = dict(
        vocab_size=config.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=inner,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        position_embedding_type="rotary",
        rope_parameters=dict(config.rope_parameters),
        layer_norm_position="pre",
        norm_type="rms_norm",
        layer_norm_eps=config.rms_norm_eps,
        feed_forward_type="gated",
        attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias,
        tie_word_embeddings=config.tie_word_embeddings,
        is_decoder=True,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model, reinitialised = finish(config_kwargs, mapped, head_class, options, "model." if is_lm else "", head)
    tokenizer = load_tokenizer(folder, "llama", config.vocab_size, **({"gguf_file": gguf_file} if gguf_file else {}))
    return transformers_conversion(
        source,
        model,
        "llama",
        source_name(raw, folder if gguf_file is None else folder / gguf_file),
        tokenizer,
        reinitialised,
        tokenizer_dir=folder if gguf_file is None else None,  # a GGUF's tokenizer is rebuilt and saved instead
        notes=[f"Weights dequantized from the GGUF file {gguf_file} by transformers."] if gguf_file else [],
    )


def _locate(path: Path, gguf_file: str | None) -> tuple[Path, str | None]:
    """(folder, GGUF file name or None): INPUT may be a folder, a folder plus `--gguf-file`, or a .gguf file."""
    if path.is_file() and path.suffix == ".gguf":
        if gguf_file is not None and gguf_file != path.name:
            raise ConversionError(f"llama: INPUT is the GGUF file {path.name}; --gguf-file {gguf_file} contradicts it.")
        return path.parent, path.name
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise ConversionError(f"llama: {path / gguf_file} does not exist.")
    return path, gguf_file
