"""transformers `GPT2LMHeadModel` / `GPT2Model` folder -> Relformer (learned positions, pre-norm, biases)."""

from __future__ import annotations

from pathlib import Path

from transformers import GPT2LMHeadModel, GPT2Model

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

ARCHITECTURES = {"GPT2LMHeadModel": (GPT2LMHeadModel, RelformerForCausalLM), "GPT2Model": (GPT2Model, RelformerModel)}


def convert(path: Path, options: Options) -> Conversion:
    raw = read_config(path, "gpt2", ("gpt2",))
    source_class, head_class = ARCHITECTURES[pick_architecture(raw, "gpt2", ARCHITECTURES)]
    source = load_pretrained(source_class, path, "gpt2")
    config = source.config
    if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
        raise ConversionError(
            "gpt2: scale_attn_by_inverse_layer_idx=True or scale_attn_weights=False are not supported "
            "(Relformer scales attention scores by 1/sqrt(head_dim))."
        )
    hidden = config.n_embd
    inner = config.n_inner or 4 * hidden
    is_lm = head_class is RelformerForCausalLM
    tensors = SourceTensors(source.state_dict(), "gpt2", options.progress)
    src = "transformer." if is_lm else ""

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
    shape = (config.vocab_size, hidden)
    head = tensors.output_layer("lm_head.weight", "lm_head.weight", config.tie_word_embeddings, shape) if is_lm else {}
    tensors.check_all_used()

    config_kwargs = dict(
        vocab_size=config.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        intermediate_size=inner,
        hidden_act=config.activation_function,
        max_position_embeddings=config.n_positions,
        position_embedding_type="learned",
        layer_norm_position="pre",
        layer_norm_eps=config.layer_norm_epsilon,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=config.tie_word_embeddings,
        is_decoder=True,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model, reinitialised = finish(config_kwargs, mapped, head_class, options, "model." if is_lm else "", head)
    tokenizer = load_tokenizer(path, "gpt2", config.vocab_size)
    return transformers_conversion(
        source, model, "gpt2", source_name(raw, path), tokenizer, reinitialised, tokenizer_dir=path
    )
