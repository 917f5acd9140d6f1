"""transformers `LlamaForCausalLM` / `LlamaModel` folder, or a GGUF file read by transformers' GGUF loader
(dequantized to fp32) -> Relformer (rotary, RMSNorm, SwiGLU, grouped-query attention)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import LlamaForCausalLM, LlamaModel

from hf_relformer import RelformerForCausalLM, RelformerModel

from .common import ConversionError, Options, SourceTensors
from .source import Flag, Located, Tensors, TransformersSource, causal_lm_head, decoder_settings, settings


def relformer_config(source: LlamaModel, raw: dict) -> dict:
    config = source.config
    same = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    same += ("intermediate_size", "hidden_act", "max_position_embeddings", "attention_bias", "mlp_bias")
    return settings(config, *same, layer_norm_eps="rms_norm_eps") | dict(
        position_embedding_type="rotary",
        rope_parameters=dict(config.rope_parameters),
        layer_norm_position="pre",
        norm_type="rms_norm",
        feed_forward_type="gated",
        **decoder_settings(config),
    )


def map_tensors(tensors: SourceTensors, config, src: str, is_head: bool) -> tuple[Tensors, Tensors]:
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
    return mapped, causal_lm_head(tensors, config, hidden, is_head)


@dataclass(frozen=True, kw_only=True)
class LlamaSource(TransformersSource):
    """A Llama folder, or a GGUF file: INPUT.gguf, or an INPUT folder with `--gguf-file NAME`."""

    def locate(self, path: Path, options: Options) -> Located:
        folder, gguf_file = _locate(path, options.gguf_file)
        if gguf_file is None:
            return super().locate(folder, options)
        return Located(
            folder=folder,
            config={},  # the GGUF's metadata, read by transformers: its model type is checked in `state_dict`
            classes=(LlamaForCausalLM, RelformerForCausalLM),
            load_kwargs={"gguf_file": gguf_file},
            label=folder / gguf_file,
            tokenizer_dir=None,  # a GGUF's tokenizer is rebuilt and saved instead
            notes=[f"Weights dequantized from the GGUF file {gguf_file} by transformers."],
        )

    def state_dict(self, source: LlamaModel, located: Located) -> Tensors:
        gguf_file = located.load_kwargs.get("gguf_file")
        if gguf_file is not None and source.config.model_type != "llama":
            raise ConversionError(f"llama: {gguf_file} holds a {source.config.model_type!r} model, not llama.")
        return source.state_dict()


def _locate(path: Path, gguf_file: str | None) -> tuple[Path, str | None]:
    """(folder, GGUF file name or None): INPUT may be a folder, a folder plus `--gguf-file`, or a .gguf file."""
    if path.is_file() and path.suffix == ".gguf":
        if gguf_file is not None and gguf_file != path.name:
            raise ConversionError(f"llama: INPUT is the GGUF file {path.name}; --gguf-file {gguf_file} contradicts it.")
        return path.parent, path.name
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise ConversionError(f"llama: {path / gguf_file} does not exist.")
    return path, gguf_file


def _gguf_file_problem(name: str, input_path: Path) -> str | None:
    if input_path.is_dir() and not (input_path / name).is_file():
        return f"{input_path / name} does not exist"
    return None


SOURCE = LlamaSource(
    name="llama",
    help="a transformers LlamaForCausalLM / LlamaModel folder, or a GGUF file (INPUT.gguf, or INPUT folder + "
    "--gguf-file NAME), dequantized by transformers' GGUF loader",
    flags=(Flag("gguf_file", "name of the GGUF file inside INPUT", metavar="NAME", check=_gguf_file_problem),),
    architectures=((LlamaForCausalLM, RelformerForCausalLM), (LlamaModel, RelformerModel)),
    config=relformer_config,
    tensors=map_tensors,
)
