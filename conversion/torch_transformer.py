"""A `torch.nn.Transformer` or `torch.nn.TransformerEncoder` state dict + its constructor arguments -> Relformer.

The hyper-parameters come from a JSON file (`--hparams`):

    {"module": "Transformer",            # or "TransformerEncoder"
     "d_model": 512, "nhead": 8, "num_encoder_layers": 6, "num_decoder_layers": 6,   # "num_layers" for an encoder
     "dim_feedforward": 2048, "activation": "relu", "layer_norm_eps": 1e-5, "norm_first": false, "bias": true,
     "vocab_size": 32000,                # the Relformer's token embeddings (the PyTorch module has none)
     "prefix": "",                       # where the module's tensors sit in the state dict, e.g. "transformer."
     "embedding": null,                  # optional state-dict name of the token embedding table [vocab, d_model]
     "causal": false}                    # TransformerEncoder used with a causal mask -> decoder-only Relformer

`nn.Transformer` becomes an encoder-decoder, `nn.TransformerEncoder` an encoder (or, with `"causal": true`, a
decoder-only model). The module adds no positions, so neither does the Relformer (`position_embedding_type="none"`)
unless `--position-embedding-type` re-initialises them. Verification feeds the same embeddings to both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hf_relformer import RelformerModel
from hf_relformer.checkpoint import read_json

from .common import Conversion, ConversionError, Options, SourceTensors, finish, read_state_dict
from .source import Flag, Source

MODULES = ("Transformer", "TransformerEncoder")
KNOWN_KEYS = {
    "module", "d_model", "nhead", "num_encoder_layers", "num_decoder_layers", "num_layers", "dim_feedforward",
    "activation", "layer_norm_eps", "norm_first", "bias", "vocab_size", "prefix", "embedding", "causal",
    "dropout", "batch_first",
}  # fmt: skip
OPTIONAL_TYPES = {  # the optional keys and the JSON types they take
    "prefix": str, "embedding": (str, type(None)), "activation": str, "norm_first": bool, "bias": bool,
    "causal": bool, "batch_first": bool, "layer_norm_eps": (int, float), "dropout": (int, float),
}  # fmt: skip


def convert(path: Path, options: Options) -> Conversion:
    hparams = _read_hparams(options.hparams)
    state = read_state_dict(path, "torch-transformer")
    tensors = SourceTensors(state, "torch-transformer", options.progress)
    d, prefix = hparams["d_model"], hparams.get("prefix", "")
    bias, encoder_decoder = hparams.get("bias", True), hparams["module"] == "Transformer"
    ff = hparams.get("dim_feedforward", 2048)

    def attention(theirs: str, ours: str) -> None:
        weight = tensors.take(f"{theirs}.in_proj_weight", (3 * d, d))
        biases = tensors.take(f"{theirs}.in_proj_bias", (3 * d,)).chunk(3) if bias else (None,) * 3
        for name, w, b in zip(("q", "k", "v"), weight.chunk(3), biases, strict=True):
            mapped[f"{ours}.{name}_proj.weight"] = w
            if b is not None:
                mapped[f"{ours}.{name}_proj.bias"] = b
        linear(f"{theirs}.out_proj", f"{ours}.o_proj", (d, d))

    def linear(theirs: str, ours: str, shape: tuple[int, int]) -> None:
        mapped[f"{ours}.weight"] = tensors.take(f"{theirs}.weight", shape)
        if bias:
            mapped[f"{ours}.bias"] = tensors.take(f"{theirs}.bias", shape[:1])

    def norm(theirs: str, ours: str) -> None:
        mapped[f"{ours}.weight"] = tensors.take(f"{theirs}.weight", (d,))
        # a LayerNorm without bias equals one with a zero bias
        mapped[f"{ours}.bias"] = tensors.take(f"{theirs}.bias", (d,)) if bias else torch.zeros(d)

    def layers(theirs: str, ours: str, count: int, cross: bool) -> None:
        for i in range(count):
            block, layer = f"{theirs}.{i}", f"{ours}.{i}"
            attention(f"{block}.self_attn", f"{layer}.self_attn")
            linear(f"{block}.linear1", f"{layer}.mlp.up_proj", (ff, d))
            linear(f"{block}.linear2", f"{layer}.mlp.down_proj", (d, ff))
            norm(f"{block}.norm1", f"{layer}.self_attn_norm")
            if cross:
                attention(f"{block}.multihead_attn", f"{layer}.cross_attn")
                norm(f"{block}.norm2", f"{layer}.cross_attn_norm")
                norm(f"{block}.norm3", f"{layer}.mlp_norm")
            else:
                norm(f"{block}.norm2", f"{layer}.mlp_norm")

    mapped: dict[str, torch.Tensor] = {}
    if encoder_decoder:
        layers(f"{prefix}encoder.layers", "encoder.layers", hparams["num_encoder_layers"], cross=False)
        layers(f"{prefix}decoder.layers", "decoder.layers", hparams["num_decoder_layers"], cross=True)
        norm(f"{prefix}encoder.norm", "encoder.norm")
        norm(f"{prefix}decoder.norm", "decoder.norm")
        final_norm, embedding_name = True, "encoder.embed_tokens.weight"
    else:
        layers(f"{prefix}layers", "layers", hparams["num_layers"], cross=False)
        final_norm, embedding_name = tensors.has(f"{prefix}norm.weight"), "embed_tokens.weight"
        if final_norm:
            norm(f"{prefix}norm", "norm")
    notes = []
    if hparams.get("embedding"):
        mapped[embedding_name] = tensors.take(hparams["embedding"], (hparams["vocab_size"], d))
    else:
        notes.append("The token embeddings are initialised randomly: the PyTorch module has none.")
    prefixed = [name for name in state if name.startswith(prefix)] if prefix else list(state)
    if len(prefixed) < len(state):  # tensors of the surrounding model (embeddings, output layer): not ours to check
        tensors.skip(name for name in state if not name.startswith(prefix) and name != hparams.get("embedding"))
    tensors.check_all_used()

    causal = bool(hparams.get("causal", False))
    config_kwargs = dict(
        vocab_size=hparams["vocab_size"],
        hidden_size=d,
        num_hidden_layers=hparams["num_encoder_layers"] if encoder_decoder else hparams["num_layers"],
        num_attention_heads=hparams["nhead"],
        intermediate_size=ff,
        hidden_act=hparams.get("activation", "relu"),
        position_embedding_type="none",
        layer_norm_position="pre" if hparams.get("norm_first", False) else "post",
        layer_norm_eps=hparams.get("layer_norm_eps", 1e-5),
        final_layer_norm=final_norm,
        attention_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=True,
        is_decoder=causal or encoder_decoder,
        is_encoder_decoder=encoder_decoder,
        type_vocab_size=0,  # nn.Transformer has no segments
    )
    if encoder_decoder:
        config_kwargs["decoder_layers"] = hparams["num_decoder_layers"]
    random_embeddings = not hparams.get("embedding")
    model, reinitialised = finish(
        config_kwargs,
        mapped,
        RelformerModel,
        options,
        "",
        allow_missing=(lambda name: name.endswith("embed_tokens.weight")) if random_embeddings else None,
    )
    reference = _reference_module(hparams, state, final_norm)
    inputs, compare_mask, run_reference = _sample(reference, hparams, encoder_decoder, causal)
    return Conversion(
        model=model,
        reference=run_reference,
        inputs=inputs,
        source="torch-transformer",
        source_name=f"torch.nn.{hparams['module']} ({path.name})",
        output_name="last_hidden_state",
        notes=notes,
        positions_reinitialised=reinitialised,
        compare_mask=compare_mask,
    )


def _read_hparams(path: Path | None) -> dict:
    if path is None:
        raise ConversionError("torch-transformer: --hparams FILE.json (the module's constructor arguments) is needed.")
    hparams = read_json(path, "torch-transformer --hparams")
    unknown = sorted(set(hparams) - KNOWN_KEYS)
    if unknown:
        raise ConversionError(f"torch-transformer: unknown keys in {path}: {', '.join(unknown)}.")
    if hparams.get("module") not in MODULES:
        raise ConversionError(f"torch-transformer: 'module' must be one of {', '.join(MODULES)} in {path}.")
    layer_keys = ("num_encoder_layers", "num_decoder_layers") if hparams["module"] == "Transformer" else ("num_layers",)
    optional = ("dim_feedforward",) if "dim_feedforward" in hparams else ()
    for key in ("d_model", "nhead", "vocab_size", *layer_keys, *optional):
        value = hparams.get(key)
        if not _has_type(value, int) or value < 1:
            raise ConversionError(f"torch-transformer: {key!r} must be a positive integer in {path}, got {value!r}.")
    for key, types in OPTIONAL_TYPES.items():
        if key in hparams and not _has_type(hparams[key], types):
            raise ConversionError(f"torch-transformer: {key!r} has the wrong type in {path}: {hparams[key]!r}.")
    if hparams.get("activation", "relu") not in ("relu", "gelu"):
        raise ConversionError(f"torch-transformer: activation must be 'relu' or 'gelu', got {hparams['activation']!r}.")
    if hparams.get("causal") and hparams["module"] != "TransformerEncoder":
        raise ConversionError("torch-transformer: 'causal' applies to a TransformerEncoder only.")
    return hparams


def _has_type(value: object, types: type | tuple[type, ...]) -> bool:
    """`isinstance`, except that JSON's true and false are bools only (not integers)."""
    return isinstance(value, types) and (types is bool or not isinstance(value, bool))


def _reference_module(hparams: dict, state: dict, final_norm: bool) -> nn.Module:
    """The PyTorch module itself, built from the hyper-parameters and loaded with the state dict."""
    kwargs = dict(
        d_model=hparams["d_model"],
        nhead=hparams["nhead"],
        dim_feedforward=hparams.get("dim_feedforward", 2048),
        dropout=0.0,
        activation=hparams.get("activation", "relu"),
        layer_norm_eps=hparams.get("layer_norm_eps", 1e-5),
        batch_first=True,
        norm_first=hparams.get("norm_first", False),
        bias=hparams.get("bias", True),
    )
    if hparams["module"] == "Transformer":
        module = nn.Transformer(
            num_encoder_layers=hparams["num_encoder_layers"], num_decoder_layers=hparams["num_decoder_layers"], **kwargs
        )
    else:
        norm = (
            nn.LayerNorm(kwargs["d_model"], eps=kwargs["layer_norm_eps"], bias=kwargs["bias"]) if final_norm else None
        )
        module = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**kwargs), hparams["num_layers"], norm=norm, enable_nested_tensor=False
        )
    prefix = hparams.get("prefix", "")
    own = {name[len(prefix) :]: t.float() for name, t in state.items() if name.startswith(prefix)}
    module.load_state_dict(own, strict=True)
    return module.eval()


def _sample(module: nn.Module, hparams: dict, encoder_decoder: bool, causal: bool):
    """Seeded random embeddings (the module's inputs), padding in the source, and the module's run on them."""
    generator = torch.Generator().manual_seed(0)
    d = hparams["d_model"]
    source = torch.randn(2, 12, d, generator=generator)
    mask = torch.ones(2, 12, dtype=torch.long)
    if not causal:
        mask[1, -3:] = 0
    if encoder_decoder:
        target = torch.randn(2, 9, d, generator=generator)
        inputs = {"inputs_embeds": source, "attention_mask": mask, "decoder_inputs_embeds": target}

        def run(inputs):
            padding = ~inputs["attention_mask"].bool()
            causal_mask = nn.Transformer.generate_square_subsequent_mask(target.shape[1])
            return module(
                inputs["inputs_embeds"],
                inputs["decoder_inputs_embeds"],
                tgt_mask=causal_mask,
                tgt_is_causal=True,
                src_key_padding_mask=padding,
                memory_key_padding_mask=padding,
            )

        return inputs, torch.ones(2, 9, dtype=torch.long), run
    inputs = {"inputs_embeds": source, "attention_mask": mask}

    def run(inputs):
        if causal:
            return module(
                inputs["inputs_embeds"], mask=nn.Transformer.generate_square_subsequent_mask(12), is_causal=True
            )
        return module(inputs["inputs_embeds"], src_key_padding_mask=~inputs["attention_mask"].bool())

    return inputs, None, run


def _hparams_problem(path: Path, input_path: Path) -> str | None:
    return None if path.is_file() else f"{path} is not a file"


SOURCE = Source(
    name="torch-transformer",
    help="a torch.nn.Transformer / nn.TransformerEncoder state dict (.safetensors, or .pt read with weights_only=True) "
    "and --hparams FILE.json with its constructor arguments",
    run=convert,
    flags=(
        Flag(
            "hparams",
            "JSON of the module's constructor arguments",
            type=Path,
            metavar="FILE.json",
            required=True,
            check=_hparams_problem,
        ),
    ),
)
