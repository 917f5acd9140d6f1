"""Configuration of Relformer: one config class for the decoder-only, encoder-only and encoder-decoder forms.

This file is shipped with every saved checkpoint (remote code): it imports only the standard library, transformers and
its sibling `positions_relformer.py` (the position schemes own their config checks).
"""

import re

import transformers
from transformers import GenerationConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

from .positions_relformer import POSITION_SCHEMES

logger = logging.get_logger(__name__)

# The version of this code (hf_relformer's `__version__`), written into every saved config.json as
# `relformer_code_version`: a checkpoint's shipped code is frozen at save time, and this names it.
CODE_VERSION = "0.5.0"
CODE_VERSION_KEY = "relformer_code_version"
# The newest transformers minor release this code was tested with. Run as a checkpoint's shipped code (remote code)
# on a newer one, the config prints one line suggesting `relformer-upgrade` (transformers 5.24 renamed the cache
# argument, which broke the code of checkpoints saved before it).
TESTED_TRANSFORMERS = "5.25"

POSITION_EMBEDDING_TYPES = tuple(POSITION_SCHEMES)  # the registry's names
LAYER_NORM_POSITIONS = ("pre", "post")
NORM_TYPES = ("layer_norm", "rms_norm")
FEED_FORWARD_TYPES = ("plain", "gated")

# Fields checked by `RelformerConfig.validate` by kind (the others have their own checks there); the position
# schemes add the fields they read.
POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    *dict.fromkeys(name for scheme in POSITION_SCHEMES.values() for name in scheme.sizes),
)
BOOL_FIELDS = (
    "attention_bias",
    "mlp_bias",
    "scale_attention_scores",
    "scale_lm_head_input",
    "scale_embedding",
    "embedding_layer_norm",
    "tie_word_embeddings",
    "use_cache",
    "is_decoder",
    "is_encoder_decoder",
    *(name for scheme in POSITION_SCHEMES.values() for name in scheme.switches),
)

# Keys a config.json or a caller may carry besides the fields: read by transformers' own config code (or written by
# other tools), so not "unknown" (generation parameters are also known: transformers moves them to generation_config).
KNOWN_EXTRA_KEYS = (
    "model_type",
    "torch_dtype",
    "num_labels",
    "name_or_path",
    "output_attentions",
    "attn_implementation",
    "experts_implementation",
    "per_layer_config",
    "rope_scaling",
    "rope_theta",
    "partial_rotary_factor",
    "sep_token_id",
    "cls_token_id",
    "mask_token_id",
    "unk_token_id",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "finetuning_task",
    "use_return_dict",
    # written into config.json by transformers itself when a model is quantized, offloaded or distributed
    "quantization_config",
    "fusion_config",
    "distributed_config",
    CODE_VERSION_KEY,  # the version of the code the checkpoint shipped when it was saved
)

# Every Auto class a Relformer checkpoint can be loaded with, written into `config.auto_map` so that a checkpoint
# loads with `trust_remote_code=True` where the package is not installed.
AUTO_MAP = {
    "AutoConfig": "configuration_relformer.RelformerConfig",
    "AutoModel": "modeling_relformer.RelformerModel",
    "AutoModelForCausalLM": "modeling_relformer.RelformerForCausalLM",
    "AutoModelForSeq2SeqLM": "modeling_relformer.RelformerForConditionalGeneration",
    "AutoModelForMaskedLM": "modeling_relformer.RelformerForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_relformer.RelformerForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_relformer.RelformerForTokenClassification",
}


class RelformerConfig(PreTrainedConfig):
    r"""Configuration of a Relformer model.

    The form is chosen by two flags: `is_encoder_decoder=True` builds an encoder and a decoder; otherwise
    `is_decoder=True` (the default) builds a causal decoder-only model and `is_decoder=False` an encoder.
    An encoder-decoder has `encoder_layers` and `decoder_layers` (both default to `num_hidden_layers`; these names
    let `generate` size its cache from the decoder depth) and shares one embedding between encoder, decoder and
    output layer when `tie_word_embeddings=True`, as in Vaswani et al. (2017).

    Position schemes: `position_embedding_type` names one of the registry `positions_relformer.POSITION_SCHEMES`
    (its keys are the allowed values); each scheme names and checks the fields it reads (its `sizes` and
    `switches`; rotary: `rope_parameters`; learned: `max_position_embeddings`) and says which attention backends it
    runs. README's table lists every scheme, where it acts and its paper.

    Architecture switches: `layer_norm_position` ("pre" or "post"), `norm_type` ("layer_norm" or "rms_norm"),
    `feed_forward_type` ("plain" or "gated", gated = GLU such as SwiGLU with `hidden_act="silu"`),
    `attention_bias`, `mlp_bias`, `scale_attention_scores` (divide q·k by sqrt(head_dim); T5 does not),
    `scale_lm_head_input` (multiply the last hidden states by hidden_size**-0.5 before the LM head, as T5 does with
    tied embeddings), `scale_embedding` (multiply token embeddings by sqrt(hidden_size)),
    `embedding_layer_norm` (a norm right after the embeddings, as in BERT), `hidden_dropout`,
    `attention_dropout`, `layer_norm_eps`, and grouped-query attention through `num_key_value_heads`.
    `final_layer_norm` puts a norm after the last layer (default: pre-norm stacks only; `torch.nn.Transformer` has
    one after post-norm layers too), `head_dim` sets the head size when it is not `hidden_size /
    num_attention_heads` (default), and `type_vocab_size > 0` adds token-type (segment) embeddings as in BERT
    (default: 2 in an encoder, so sentence pairs work; 0 in the other forms).
    `randomized_position_range=N` trains on randomized positions (Ruoss et al. 2023): in training mode (with
    gradients), each sequence's position ids, and so every scheme's positions and distances, are a sorted sample
    without replacement from `[0, N)` instead of `0 .. L-1`; evaluation and `generate()` use the ordinary positions.
    N must be at least the training length, and at most what the scheme can read (learned: `max_position_embeddings`).
    `relative_attention_key_query=True` adds the key-side term `k_j·a_ij` to the keys term, the
    `relative_key_query` variant of Huang et al. (2020) that transformers 4 offered for BERT (encoders only).
    """

    model_type = "relformer"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the cache output (5.24 renamed it)

    vocab_size: int = 32000
    hidden_size: int = 512
    num_hidden_layers: int = 6
    encoder_layers: int | None = None
    decoder_layers: int | None = None
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 2048
    hidden_act: str = "gelu"
    max_position_embeddings: int = 1024
    randomized_position_range: int | None = None
    position_embedding_type: str = "relative"
    relative_attention_max_distance: int = 16
    relative_attention_values: bool = False
    relative_attention_per_head: bool = False
    relative_attention_key_query: bool = False
    relative_attention_num_buckets: int = 16
    rope_parameters: dict | None = None
    layer_norm_position: str = "pre"
    norm_type: str = "layer_norm"
    layer_norm_eps: float = 1e-5
    final_layer_norm: bool | None = None
    feed_forward_type: str = "plain"
    attention_bias: bool = True
    mlp_bias: bool = True
    scale_attention_scores: bool = True
    scale_lm_head_input: bool = False
    scale_embedding: bool = False
    embedding_layer_norm: bool = False
    type_vocab_size: int | None = None  # None: 2 for an encoder (BERT's segments), 0 otherwise
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    is_decoder: bool = True
    is_encoder_decoder: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    decoder_start_token_id: int | None = None

    def __post_init__(self, **kwargs):
        _require_dict_or_none("rope_parameters", self.rope_parameters)  # before transformers standardizes it
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _is_positive_int(self.num_attention_heads) and _is_positive_int(self.hidden_size):
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}), or head_dim must be given."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.type_vocab_size is None:
            self.type_vocab_size = 2 if self.is_decoder is False and self.is_encoder_decoder is False else 0
        if self.is_encoder_decoder is True:
            self.encoder_layers = self.num_hidden_layers if self.encoder_layers is None else self.encoder_layers
            self.decoder_layers = self.num_hidden_layers if self.decoder_layers is None else self.decoder_layers
        self.auto_map = {**AUTO_MAP, **(kwargs.pop("auto_map", None) or {})}
        _warn_about_unknown_fields(kwargs)
        _suggest_upgrade_if_outdated()
        super().__post_init__(**kwargs)
        self.validate()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "RelformerConfig":
        """A saved config.json without `type_vocab_size` predates the field: it keeps 0 (no token types), so it loads
        into the same model as before, whereas a new encoder config defaults to BERT's 2."""
        if "type_vocab_size" not in config_dict and "type_vocab_size" not in kwargs:
            config_dict = {**config_dict, "type_vocab_size": 0}
        return super().from_dict(config_dict, **kwargs)

    def validate(self) -> None:
        """Raise `ValueError` naming the field for any value the model cannot be built with (types, ranges and
        combinations). Runs at construction, on `save_pretrained`, and when a model is built from the config."""
        for name in POSITIVE_INT_FIELDS:
            _require_positive_int(name, getattr(self, name))
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        if self.is_encoder_decoder:
            _require_positive_int("encoder_layers", self.encoder_layers)
            _require_positive_int("decoder_layers", self.decoder_layers)
        else:
            for name in ("encoder_layers", "decoder_layers"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} applies to encoder-decoder configs (is_encoder_decoder=True); this config builds "
                        f"one stack of num_hidden_layers={self.num_hidden_layers} layers."
                    )
        _require_choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDING_TYPES)
        _require_choice("layer_norm_position", self.layer_norm_position, LAYER_NORM_POSITIONS)
        _require_choice("norm_type", self.norm_type, NORM_TYPES)
        _require_choice("feed_forward_type", self.feed_forward_type, FEED_FORWARD_TYPES)
        _require_choice("hidden_act", self.hidden_act, tuple(ACT2FN))
        _require_positive_int("head_dim", self.head_dim)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if (
            isinstance(self.type_vocab_size, bool)
            or not isinstance(self.type_vocab_size, int)
            or self.type_vocab_size < 0
        ):
            raise ValueError(f"type_vocab_size must be a non-negative integer, got {self.type_vocab_size!r}.")
        if self.final_layer_norm not in (None, True, False):
            raise ValueError(f"final_layer_norm must be true, false or null, got {self.final_layer_norm!r}.")
        _require_dict_or_none("rope_parameters", self.rope_parameters)  # it may have been set after construction
        for scheme in POSITION_SCHEMES.values():
            for name in scheme.switches:
                if getattr(self, name) and self.position_embedding_type != scheme.name:
                    raise ValueError(
                        f"{name}=True needs position_embedding_type={scheme.name!r}, got "
                        f"{self.position_embedding_type!r}."
                    )
        self.position_scheme.check(self)
        self._validate_randomized_positions()
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")
        for name in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}.")
        self._validate_token_ids()

    def _validate_randomized_positions(self) -> None:
        """`randomized_position_range` is null or a positive integer within what the scheme can read."""
        sampled = self.randomized_position_range
        if sampled is None:
            return
        _require_positive_int("randomized_position_range", sampled)
        limit = self.position_scheme.max_length(self)
        if limit is not None and sampled > limit:
            raise ValueError(
                f"randomized_position_range={sampled} samples positions up to {sampled - 1}, beyond what "
                f"position_embedding_type={self.position_embedding_type!r} can read ({limit} positions, "
                f"max_position_embeddings): set it to at most {limit}, or raise max_position_embeddings."
            )

    def _validate_token_ids(self) -> None:
        """Special token ids must be in the vocabulary: the embedding reads `pad_token_id` as its padding row and
        generation feeds the others to the model."""
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if value is None:
                continue
            for token in value if isinstance(value, list) and name == "eos_token_id" else [value]:
                if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                    raise ValueError(
                        f"{name} must be null or a token id in [0, {self.vocab_size}) (vocab_size)"
                        f"{', or a list of them' if name == 'eos_token_id' else ''}; got {value!r}."
                    )

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' `save_pretrained`, validating first: it would copy the code files before its own check."""
        self.validate()
        super().save_pretrained(save_directory, *args, **kwargs)

    def to_dict(self) -> dict:
        """transformers' `to_dict`, recording the version of this code (the code a save ships beside config.json)."""
        return {**super().to_dict(), CODE_VERSION_KEY: CODE_VERSION}

    @property
    def has_final_layer_norm(self) -> bool:
        """Whether each stack ends with a norm (`final_layer_norm`, by default only pre-norm stacks)."""
        if self.final_layer_norm is None:
            return self.layer_norm_position == "pre"
        return self.final_layer_norm

    @property
    def form(self) -> str:
        """`"encoder-decoder"`, `"decoder-only"` or `"encoder"`: the shape of model this config builds."""
        if self.is_encoder_decoder:
            return "encoder-decoder"
        return "decoder-only" if self.is_decoder else "encoder"

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor parallelism (`from_pretrained(..., tp_plan="auto")` under `torchrun`): each attention's q/k/v
        projections sharded by heads (column-wise) and its output projection row-wise, the feed-forward likewise;
        per-layer position tables are replicated (each rank reads its heads' rows) and their gradients all-reduced, as
        are the stack's (T5's table)."""
        stacks = ("encoder.", "decoder.") if self.is_encoder_decoder else ("",)
        projections = ("up_proj", "gate_proj") if self.feed_forward_type == "gated" else ("up_proj",)
        plan = {}
        for stack in stacks:
            layer = f"{stack}layers.*."
            for attention in ("self_attn", "cross_attn") if stack == "decoder." else ("self_attn",):
                plan |= {f"{layer}{attention}.{name}_proj": "colwise" for name in "qkv"}
                plan[f"{layer}{attention}.o_proj"] = "rowwise"
            plan |= {f"{layer}mlp.{name}": "colwise" for name in projections}
            plan[f"{layer}mlp.down_proj"] = "rowwise"
            parts = {"attention": f"{layer}self_attn.position", "stack": f"{stack}embed_positions"}
            for name in self.position_scheme.per_head_modules:
                part, _, child = name.partition(".")
                plan[parts[part] + (f".{child}" if child else "")] = "replicated_with_grad_allreduce"
        return plan

    @property
    def position_scheme(self):
        """The `PositionScheme` of `position_embedding_type` (see `positions_relformer.POSITION_SCHEMES`)."""
        return POSITION_SCHEMES[self.position_embedding_type]


def _warn_about_unknown_fields(kwargs: dict) -> None:
    """Fields this version does not know (a config.json from a newer version, or a typo) are kept as attributes and
    written back on save, but no model code reads them: say so, naming them."""
    known = set(KNOWN_EXTRA_KEYS) | set(GenerationConfig._get_default_generation_params())
    unknown = sorted(key for key in kwargs if key not in known and not key.startswith("_"))
    if unknown:
        logger.warning(
            f"RelformerConfig: ignoring unknown field(s) {', '.join(unknown)} (kept in the config, not used by the "
            "model). A config written by a newer hf_relformer may need that version, or a name may be misspelt."
        )


def _minor(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "5.24.0" or "5.25.0.dev0"; () when it has none."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else ()


def _suggest_upgrade_if_outdated() -> None:
    """Run as a checkpoint's shipped code (a `transformers_modules` module, loaded with trust_remote_code=True) on a
    transformers newer than `TESTED_TRANSFORMERS`, say once that the checkpoint's code may be out of date. Silent
    when the installed package's classes are used."""
    if not __name__.startswith("transformers_modules.") or _minor(transformers.__version__) <= _minor(
        TESTED_TRANSFORMERS
    ):
        return
    logger.warning_once(
        f"This checkpoint's Relformer code ({CODE_VERSION_KEY} {CODE_VERSION}) was tested with transformers up to "
        f"{TESTED_TRANSFORMERS}, not {transformers.__version__}: if it fails or decodes wrongly, replace its code with "
        "`pip install hf-relformer && relformer-upgrade PATH` (or `relformer-upgrade --repo-id ID`)."
    )


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _require_positive_int(name: str, value: object) -> None:
    if not _is_positive_int(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_dict_or_none(name: str, value: object) -> None:
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict or null, got {value!r}.")


def _require_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}.")


__all__ = ["RelformerConfig"]
