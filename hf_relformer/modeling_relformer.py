"""Relformer: the Transformer with Shaw relative-position attention (and other position schemes) for transformers.

Reads in data-flow order: norms -> feed-forward -> attention module -> layer -> pretrained base (class flags, init) ->
stack -> bare model (one class per form: single stack, encoder-decoder) -> heads. The attention backends and the mask
live in `attention_relformer.py`, the position schemes in `positions_relformer.py`, the loading checks in
`loading_relformer.py`, the checks of a forward's inputs and the cache's two names in `inputs_relformer.py`.
This file is shipped with every saved checkpoint (remote code): it imports only torch, transformers and its
sibling files through single-dot relative imports.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention_relformer import (
    ALL_ATTENTION_FUNCTIONS,
    FLEX_ATTENTION,
    AttentionMask,
    backends,
    checked_backend,
    eager_attention,
)
from .configuration_relformer import RelformerConfig
from .inputs_relformer import (
    cache_of,
    check_attention_mask,
    check_labels,
    check_token_inputs,
    takes_either_cache_name,
    with_cache,
)
from .loading_relformer import load_checked
from .positions_relformer import NoAttentionPositions, attention_scaling


class RelformerRMSNorm(nn.Module):
    """Root-mean-square norm (no centring, no bias), computed in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden_states.to(input_dtype)


def build_norm(config: RelformerConfig) -> nn.Module:
    """The configured norm over `hidden_size`."""
    if config.norm_type == "rms_norm":
        return RelformerRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class RelformerFeedForward(nn.Module):
    """Position-wise feed-forward: `down(act(up(x)))`, or gated `down(act(gate(x)) * up(x))` (SwiGLU with silu)."""

    def __init__(self, config: RelformerConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        gated = config.feed_forward_type == "gated"
        self.gate_proj = (
            nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias) if gated else None
        )
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act_fn(self.up_proj(hidden_states)))
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


def cache_lengths(cache: Cache | None, query_length: int) -> tuple[int | torch.Tensor, int]:
    """(`past_length`: keys in the self-attention cache before this forward, `key_length`: keys attention will see)."""
    if cache is None:
        return 0, query_length
    past_length = cache.get_seq_length()
    if isinstance(past_length, torch.Tensor):  # a static cache updates its length tensor in place
        past_length = past_length.clone()
    return past_length, cache.get_mask_sizes(query_length, 0)[0]


class RelformerAttention(nn.Module):
    """Multi-head (grouped-query) attention: project, apply the position scheme, run the attention backend.

    Self-attention reads keys and values from its own input and owns the position scheme's attention part;
    cross-attention (`is_cross_attention=True`) reads them from the encoder output, once per generation, and has
    no position term (as in Shaw et al.).
    """

    # DeepSpeed ZeRO-3: a leaf module, whose parameters (the position tables too) are gathered for its whole forward
    # and backward; the scheme's terms read the tables after the position module's forward has returned.
    _z3_leaf = True

    def __init__(self, config: RelformerConfig, layer_idx: int, is_causal: bool, is_cross_attention: bool = False):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = is_causal  # read by the SDPA backend when no mask is given
        self.is_cross_attention = is_cross_attention
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = attention_scaling(config)
        self.attention_dropout = config.attention_dropout
        q_size = config.num_attention_heads * self.head_dim
        kv_size = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_bias)
        attention_part = NoAttentionPositions if is_cross_attention else config.position_scheme.attention_part
        self.position = attention_part(config, causal=is_causal)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: AttentionMask | None = None,
        position_inputs: object = None,
        cache: Cache | None = None,
        key_value_states: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states `[B, L, hidden]` (and for cross-attention the encoder output `key_value_states`
        `[B, Ls, hidden]`) -> (output `[B, L, hidden]`, probabilities `[B, H, L, Lk]` or None). Without an
        `attention_mask` (the stack's description), every key is a token: causal if this module is.

        One path for every scheme and backend: project -> the scheme's before-cache hook -> cache -> its terms ->
        the backend (`attention_relformer.ALL_ATTENTION_FUNCTIONS`)."""
        input_shape = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        if self.is_cross_attention:
            key, value = self._cross_key_value(key_value_states, cache)
        else:
            key, value = self._project_key_value(hidden_states)
            query, key = self.position.before_cache(query, key, position_inputs)
            key, value = self._update_cache(key, value, cache)
        if attention_mask is None:
            batch, query_length, key_length = query.shape[0], query.shape[2], key.shape[2]
            past_length = key_length - query_length if self.is_causal else 0
            attention_mask = AttentionMask(batch, query_length, key_length, self.is_causal, past_length)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
            position=self.position(query, key, position_inputs),
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1)
        return self.o_proj(attn_output), attn_weights

    def _update_cache(self, key, value, cache: Cache | None):
        """Append this step's keys/values `[B, H_kv, L, D]` to the self-attention cache; returns all of them."""
        if cache is None:
            return key, value
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        return cache.update(key, value, self.layer_idx)

    def _project_key_value(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, L, hidden]` -> keys and values `[B, H_kv, L, D]`."""
        shape = (*states.shape[:-1], -1, self.head_dim)
        return self.k_proj(states).view(shape).transpose(1, 2), self.v_proj(states).view(shape).transpose(1, 2)

    def _cross_key_value(self, encoder_states: torch.Tensor, cache: Cache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values: projected from the encoder output once, then read from the cache."""
        if not isinstance(cache, EncoderDecoderCache):
            return self._project_key_value(encoder_states)
        cross_cache = cache.cross_attention_cache
        if cache.is_updated.get(self.layer_idx):
            return cross_cache.layers[self.layer_idx].keys, cross_cache.layers[self.layer_idx].values
        key, value = cross_cache.update(*self._project_key_value(encoder_states), self.layer_idx)
        cache.is_updated[self.layer_idx] = True
        return key, value


class RelformerLayer(GradientCheckpointingLayer):
    """Self-attention, cross-attention (decoder of an encoder-decoder only) and feed-forward, each in a residual
    branch with a pre- or post-norm."""

    def __init__(self, config: RelformerConfig, layer_idx: int, is_causal: bool, has_cross_attention: bool = False):
        super().__init__()
        self.pre_norm = config.layer_norm_position == "pre"
        self.self_attn = RelformerAttention(config, layer_idx, is_causal=is_causal)
        self.self_attn_norm = build_norm(config)
        if has_cross_attention:
            self.cross_attn = RelformerAttention(config, layer_idx, is_causal=False, is_cross_attention=True)
            self.cross_attn_norm = build_norm(config)
        else:
            self.cross_attn = self.cross_attn_norm = None
        self.mlp = RelformerFeedForward(config)
        self.mlp_norm = build_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    @takes_either_cache_name
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: AttentionMask,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: AttentionMask | None = None,
        position_inputs: object = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """hidden_states `[B, L, hidden]` -> `[B, L, hidden]`."""

        def self_attention(x: torch.Tensor) -> torch.Tensor:
            return self.self_attn(x, attention_mask, position_inputs, cache, **kwargs)[0]

        def cross_attention(x: torch.Tensor) -> torch.Tensor:
            return self.cross_attn(
                x,
                encoder_attention_mask,
                cache=cache,
                key_value_states=encoder_hidden_states,
                **kwargs,
            )[0]

        hidden_states = self._residual(hidden_states, self_attention, self.self_attn_norm)
        if self.cross_attn is not None:
            hidden_states = self._residual(hidden_states, cross_attention, self.cross_attn_norm)
        return self._residual(hidden_states, self.mlp, self.mlp_norm)

    def _residual(self, hidden_states: torch.Tensor, sublayer: Callable, norm: nn.Module) -> torch.Tensor:
        if self.pre_norm:
            return hidden_states + self.dropout(sublayer(norm(hidden_states)))
        return norm(hidden_states + self.dropout(sublayer(hidden_states)))


class RelformerPreTrainedModel(PreTrainedModel):
    config_class = RelformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RelformerLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]  # either name (inputs_relformer.CACHE_NAME)
    # what the attention engine implements (flash attention cannot add a position bias: not among them)
    _supports_sdpa = "sdpa" in backends()
    _supports_flash_attn = any(name.startswith("flash_attention") for name in backends())
    _supports_flex_attn = FLEX_ATTENTION in backends()
    _supports_attention_backend = True  # any registered function runs the schemes without attention terms
    _can_compile_fullgraph = True  # tested: compiled static-cache decoding == eager
    _can_record_outputs = {
        "hidden_states": RelformerLayer,
        "attentions": OutputRecorder(RelformerAttention, index=1, layer_name="self_attn"),
        "cross_attentions": OutputRecorder(RelformerAttention, index=1, layer_name="cross_attn"),
    }

    def __init__(self, config: RelformerConfig, *inputs, **kwargs):
        config.validate()  # a field may have been changed after the config was built
        super().__init__(config, *inputs, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' `from_pretrained`, with errors that name the checkpoint and the problem (see
        `loading_relformer.load_checked`: `allow_missing_weights`, `allow_unused_weights`, `ignore_mismatched_sizes`,
        `output_loading_info`)."""
        model, info = load_checked(super().from_pretrained, pretrained_model_name_or_path, *model_args, **kwargs)
        return model if info is None else (model, info)

    def _check_and_adjust_attn_implementation(
        self, attn_implementation: str | None, is_init_check: bool = False, allow_all_kernels: bool = False
    ) -> str:
        """transformers' choice, of the backends this config can run (`attention_relformer.checked_backend`)."""
        attn_implementation = checked_backend(attn_implementation, self.config)
        return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, allow_all_kernels)

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, **kwargs):
        """What `generate()` passes with a static cache: the 2-D mask itself (each stack describes its mask once per
        forward, `AttentionMask`, and every backend renders it)."""
        return attention_mask

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        self.config.position_scheme.init_weights(module, self.config.initializer_range)


def _require_form(config: RelformerConfig, head: str, form: str) -> None:
    """Raise a clear error when a head is given a config of a form it cannot serve."""
    if config.form != form:
        flags = {
            "decoder-only": "is_decoder=True, is_encoder_decoder=False",
            "encoder": "is_decoder=False, is_encoder_decoder=False",
            "encoder-decoder": "is_encoder_decoder=True",
        }
        article = "an" if form[0] in "ae" else "a"
        raise ValueError(f"{head} needs {article} {form} config ({flags[form]}); this config is {config.form}.")


class RelformerStack(RelformerPreTrainedModel):
    """One stack of layers: token (+ token-type) embeddings -> position scheme -> layers -> final norm.

    A causal decoder (key/value cache; with `has_cross_attention`, the decoder of an encoder-decoder) or a
    bidirectional encoder. Returns `last_hidden_state` `[B, L, hidden_size]`.
    """

    def __init__(
        self,
        config: RelformerConfig,
        is_causal: bool,
        num_layers: int,
        has_cross_attention: bool = False,
    ):
        super().__init__(config)
        self.is_causal = is_causal
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_scale = config.hidden_size**0.5 if config.scale_embedding else 1.0
        self.embed_token_types = (
            nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size else None
        )
        self.embed_positions = config.position_scheme.stack_part(config, causal=is_causal)
        self.embed_norm = build_norm(config) if config.embedding_layer_norm else None
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(
            [RelformerLayer(config, i, is_causal, has_cross_attention) for i in range(num_layers)]
        )
        self.norm = build_norm(config) if config.has_final_layer_norm else None
        self.gradient_checkpointing = False
        self.post_init()
        if config.is_encoder_decoder:  # the config's plan names both stacks: this stack's entries, as its own names
            own, stacks = ("decoder." if is_causal else "encoder."), ("encoder.", "decoder.")
            plan = self._tp_plan or {}
            self._tp_plan = {
                k.removeprefix(own): v for k, v in plan.items() if k.startswith(own) or not k.startswith(stacks)
            }

    @takes_either_cache_name
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """input_ids `[B, L]` (or inputs_embeds `[B, L, hidden]`), attention_mask `[B, past + L]` (1 = token),
        token_type_ids `[B, L]` (segments, when `type_vocab_size > 0`); for a decoder with cross-attention,
        encoder_hidden_states `[B, Ls, hidden]` and encoder_attention_mask `[B, Ls]`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        check_token_inputs(self.config, input_ids, inputs_embeds, position_ids, token_type_ids)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.embed_scale
        inputs_embeds = self._add_token_types(inputs_embeds, token_type_ids)
        if not self.is_causal:
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
            if encoder_hidden_states is not None:
                cache = EncoderDecoderCache(cache, DynamicCache(config=self.config))
        self_attention_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache

        query_length = inputs_embeds.shape[1]
        past_length, key_length = cache_lengths(self_attention_cache, query_length)
        if not torch.compiler.is_compiling():  # a static cache's length is data: a compiled step skips the check
            check_attention_mask(attention_mask, inputs_embeds.shape[0], int(past_length) + query_length)
        if encoder_hidden_states is not None:
            check_attention_mask(
                encoder_attention_mask, encoder_hidden_states.shape[0], encoder_hidden_states.shape[1], "encoder "
            )
        if position_ids is None:  # randomized where the model learns (training mode, gradients on): not in generate
            randomized = self.config.randomized_position_range if self.training and torch.is_grad_enabled() else None
            position_ids = default_position_ids(
                attention_mask, inputs_embeds.shape[:2], past_length, inputs_embeds.device, randomized
            )

        hidden_states, position_inputs = self.embed_positions(inputs_embeds, position_ids, past_length, key_length)
        if self.embed_norm is not None:
            hidden_states = self.embed_norm(hidden_states)
        hidden_states = self.dropout(hidden_states)

        batch = inputs_embeds.shape[0]
        mask = AttentionMask.of(attention_mask, batch, query_length, key_length, self.is_causal, past_length)
        if encoder_hidden_states is not None:
            source_length = encoder_hidden_states.shape[1]
            encoder_attention_mask = AttentionMask.of(encoder_attention_mask, batch, query_length, source_length, False)

        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                mask,
                encoder_hidden_states,  # positional, for activation checkpointing
                encoder_attention_mask=encoder_attention_mask,
                position_inputs=position_inputs,
                use_cache=use_cache,
                **with_cache(cache),  # by the installed name: the checkpointing wrapper drops it by that name
                **kwargs,
            )
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, **with_cache(cache))

    def _add_token_types(self, inputs_embeds: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """Adds the token-type embeddings (type 0 where no ids are given, as BERT does)."""
        if self.embed_token_types is None:
            if token_type_ids is not None and bool(token_type_ids.any()):
                raise ValueError(
                    "token_type_ids other than 0 were given, but this model has no token-type embeddings "
                    "(config.type_vocab_size=0)."
                )
            return inputs_embeds
        if token_type_ids is None:
            return inputs_embeds + self.embed_token_types.weight[0]
        if int(token_type_ids.max()) >= self.embed_token_types.num_embeddings or int(token_type_ids.min()) < 0:
            raise ValueError(
                f"token_type_ids must be in [0, {self.embed_token_types.num_embeddings}) (config.type_vocab_size), "
                f"got values in [{int(token_type_ids.min())}, {int(token_type_ids.max())}]."
            )
        return inputs_embeds + self.embed_token_types(token_type_ids)


def default_position_ids(
    attention_mask: torch.Tensor | None,
    shape: tuple[int, int],
    past_length: int | torch.Tensor,
    device: torch.device,
    randomized_range: int | None = None,
) -> torch.Tensor:
    """Positions `[B or 1, L]` of the queries of a `[B, L]` input: counted over real tokens when a 2-D mask is given
    (so padding never shifts an absolute position), else `past_length + arange(L)`. With `randomized_range` N (Ruoss et
    al. 2023's randomized positions, `config.randomized_position_range`, in training) and no cache before, each row's
    real tokens get a sorted sample without replacement from `[0, N)` instead."""
    batch, query_length = shape
    if attention_mask is not None and attention_mask.dim() == 2:
        counts = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_length:]
    else:
        counts = (torch.arange(query_length, device=device) + past_length).unsqueeze(0)
    if randomized_range is None or not (isinstance(past_length, int) and past_length == 0):
        return counts
    if randomized_range < query_length:
        raise ValueError(
            f"randomized_position_range={randomized_range} is smaller than this training input's {query_length} "
            f"positions: it samples {query_length} distinct positions from [0, randomized_position_range). Set it to "
            "at least the longest training length (and to the longest length you will evaluate, so that training "
            "sees every position evaluation reads)."
        )
    sample = torch.rand(batch, randomized_range, device=device).argsort(-1)[:, :query_length].sort(-1).values
    return sample.gather(1, counts.expand(batch, -1))


class RelformerModel(RelformerPreTrainedModel):
    """The bare Relformer, the one class registered for `AutoModel`: `RelformerModel(config)` (and `from_pretrained`)
    builds the class of the config's form, a subclass of this one.

    - decoder-only (`is_decoder=True`) or encoder (`is_decoder=False`): `RelformerSingleStackModel`, one stack;
      `forward(input_ids, attention_mask, ...)` returns `last_hidden_state` `[B, L, hidden_size]`.
    - encoder-decoder (`is_encoder_decoder=True`): `RelformerEncoderDecoderModel`, an `encoder` and a `decoder`
      stack; `forward(input_ids, attention_mask, decoder_input_ids, ...)` returns the decoder's `last_hidden_state`
      `[B, Lt, hidden_size]` with the encoder's output.

    Either saves as `RelformerModel` (config.architectures, auto_map), so that loading picks the form again.
    """

    def __new__(cls, config: RelformerConfig | None = None, *args, **kwargs):
        if cls is RelformerModel and config is not None:  # no config: copy and pickle rebuild a built model's class
            cls = RelformerEncoderDecoderModel if config.is_encoder_decoder else RelformerSingleStackModel
        return super().__new__(cls)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        """The forward of the form's class (`RelformerModel(config)` always builds one), which overrides this one; here
        for the signature transformers reads off the class (the main input first)."""
        raise NotImplementedError(
            f"{type(self).__name__} is built through RelformerModel(config), which picks its form."
        )

    def save_pretrained(self, *args, **kwargs) -> None:
        """transformers' `save_pretrained` (which writes `type(self).__name__` into config.architectures and
        auto_map), run while this model is a `RelformerModel`: every form saves under the registered name."""
        form_class = type(self)
        self.__class__ = RelformerModel
        try:
            super().save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = form_class


class RelformerSingleStackModel(RelformerModel, RelformerStack):
    """The bare decoder-only or encoder Relformer: one `RelformerStack` (causal for `is_decoder=True`), its tensors
    at the top level (`embed_tokens`, `layers.N`, `norm`)."""

    def __init__(self, config: RelformerConfig):
        super().__init__(config, is_causal=config.is_decoder, num_layers=config.num_hidden_layers)

    @takes_either_cache_name
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """input_ids `[B, L]` (or inputs_embeds), attention_mask `[B, past + L]` -> `last_hidden_state`
        `[B, L, hidden_size]`; the decoder_* inputs and encoder_outputs of an encoder-decoder are refused."""
        seq2seq_inputs = (decoder_input_ids, decoder_attention_mask, decoder_inputs_embeds, encoder_outputs)
        if any(value is not None for value in seq2seq_inputs):
            raise ValueError("decoder_* inputs and encoder_outputs need an encoder-decoder config.")
        return RelformerStack.forward(  # not RelformerModel's: the stack's, next in the method order
            self,
            return_dict=True,  # a dict inside; can_return_tuple applies the caller's choice
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            token_type_ids=token_type_ids,
            **kwargs,
        )


class RelformerEncoderDecoderModel(RelformerModel):
    """The bare encoder-decoder Relformer (as BART's and T5's base models): a bidirectional `encoder` stack and a
    causal `decoder` stack with cross-attention, sharing one token embedding when `tie_word_embeddings`."""

    def __init__(self, config: RelformerConfig):
        super().__init__(config)
        # on the instance, not the class: `save_pretrained` reads it while the model is saved as `RelformerModel`
        self._tied_weights_keys = {"decoder.embed_tokens.weight": "encoder.embed_tokens.weight"}
        self.encoder = RelformerStack(config, is_causal=False, num_layers=config.encoder_layers)
        self.decoder = RelformerStack(
            config, is_causal=True, num_layers=config.decoder_layers, has_cross_attention=True
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Sets the token embeddings. With `tie_word_embeddings=False` the decoder keeps its own table, resized to the
        new vocabulary (as `resize_token_embeddings` expects); tied, both stacks share `value`."""
        if self.config.tie_word_embeddings:
            self.encoder.embed_tokens = self.decoder.embed_tokens = value
            return
        self.encoder.embed_tokens = value
        if self.decoder.embed_tokens.num_embeddings != value.num_embeddings:
            self.decoder.embed_tokens = self._get_resized_embeddings(
                self.decoder.embed_tokens, value.num_embeddings, mean_resizing=False
            )

    @takes_either_cache_name
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqModelOutput:
        """Source input_ids `[B, Ls]` (or inputs_embeds, or `encoder_outputs` already computed), attention_mask
        `[B, Ls]`, decoder_input_ids `[B, Lt]` (or decoder_inputs_embeds) -> the decoder's `last_hidden_state`
        `[B, Lt, hidden_size]`, the cache, and the encoder's output."""
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            raise ValueError(
                "An encoder-decoder Relformer needs decoder_input_ids (or decoder_inputs_embeds, or labels for "
                "RelformerForConditionalGeneration, which are shifted into decoder inputs)."
            )
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                return_dict=True,  # a dict inside; can_return_tuple applies the caller's choice
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                token_type_ids=token_type_ids,
                **kwargs,
            )
        elif not isinstance(encoder_outputs, ModelOutput):  # a tuple (last_hidden_state, hidden_states, attentions)
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        decoder_outputs = self.decoder(
            return_dict=True,  # a dict inside; can_return_tuple applies the caller's choice
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            cache=cache,
            inputs_embeds=decoder_inputs_embeds,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            use_cache=use_cache,
            **kwargs,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            **with_cache(cache_of(decoder_outputs)),
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


class RelformerForCausalLM(RelformerPreTrainedModel, GenerationMixin):
    """Decoder-only Relformer with a language-modelling head (tied to the token embeddings by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # with the base model's config.base_model_tp_plan

    def __init__(self, config: RelformerConfig):
        _require_form(config, type(self).__name__, "decoder-only")
        super().__init__(config)
        self.model = RelformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @takes_either_cache_name
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """Logits `[B, L, vocab]`; with `labels` `[B, L]` (-100 ignored) also the next-token loss (shifted inside)."""
        outputs = self.model(
            return_dict=True,  # a dict inside; can_return_tuple applies the caller's choice
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(
            lm_head_input(self.config, slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        )
        loss = None
        if labels is not None:
            check_labels(labels, logits.shape[:2], self.config.vocab_size, "input token")
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **with_cache(cache_of(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def lm_head_input(config: RelformerConfig, hidden_states: torch.Tensor) -> torch.Tensor:
    """The last hidden states, times hidden_size**-0.5 with `scale_lm_head_input` (T5 with tied embeddings)."""
    return hidden_states * config.hidden_size**-0.5 if config.scale_lm_head_input else hidden_states


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int | None, decoder_start_token_id: int | None):
    """Decoder inputs `[B, Lt]` from labels: `decoder_start_token_id`, then labels[:, :-1] (-100 -> pad)."""
    if decoder_start_token_id is None or pad_token_id is None:
        raise ValueError(
            "Building decoder inputs from labels needs config.decoder_start_token_id and config.pad_token_id."
        )
    shifted = labels.new_full(labels.shape, decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_token_id)


class RelformerForConditionalGeneration(RelformerPreTrainedModel, GenerationMixin):
    """Encoder-decoder Relformer with a language-modelling head: the Transformer of Vaswani et al. (2017)."""

    _tied_weights_keys = {"lm_head.weight": "model.encoder.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # with the base model's config.base_model_tp_plan

    def __init__(self, config: RelformerConfig):
        _require_form(config, type(self).__name__, "encoder-decoder")
        super().__init__(config)
        self.loss_type = "ForMaskedLM"  # labels are already aligned with the logits: no second shift
        self.model = RelformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    @takes_either_cache_name
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqLMOutput:
        """Logits `[B, Lt, vocab]`; `labels` `[B, Lt]` (-100 ignored) are shifted into decoder inputs when those
        are not given, and the loss compares logit t with label t."""
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        outputs = self.model(
            return_dict=True,  # a dict inside; can_return_tuple applies the caller's choice
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=cache,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(
            lm_head_input(self.config, slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        )
        loss = None
        if labels is not None:
            check_labels(labels, logits.shape[:2], self.config.vocab_size, "decoder input token")
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            **with_cache(cache_of(outputs)),
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
        )


class RelformerMaskedLMHead(nn.Module):
    """BERT-style prediction head: dense -> activation -> norm -> vocabulary projection (tied) + bias."""

    def __init__(self, config: RelformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]
        self.norm = build_norm(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[B, L, hidden]` -> logits `[B, L, vocab]`."""
        return self.decoder(self.norm(self.act_fn(self.dense(hidden_states))))


class RelformerForMaskedLM(RelformerPreTrainedModel):
    """Encoder Relformer with a masked-language-modelling head (decoder tied to the token embeddings)."""

    _tied_weights_keys = {"lm_head.decoder.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head.decoder": "colwise_gather_output"}  # with the base model's config.base_model_tp_plan

    def __init__(self, config: RelformerConfig):
        _require_form(config, type(self).__name__, "encoder")
        super().__init__(config)
        self.model = RelformerModel(config)
        self.lm_head = RelformerMaskedLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head.decoder = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        """Logits `[B, L, vocab]`; `labels` `[B, L]` (-100 = not masked) give the masked-token loss."""
        outputs = self.model(
            return_dict=True,  # a dict inside; can_return_tuple applies the caller's choice
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            token_type_ids=token_type_ids,
            **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            check_labels(labels, logits.shape[:2], self.config.vocab_size, "input token")
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class RelformerForSequenceClassification(RelformerPreTrainedModel):
    """Sequence classification or regression.

    Encoder: the first token's state goes through a pooler (dense + tanh), as in BERT. Decoder-only: the state of the
    last non-padding token, as in GPT-2 (padding found from `attention_mask`, else from `pad_token_id`).
    """

    def __init__(self, config: RelformerConfig):
        if config.is_encoder_decoder:
            _require_form(config, type(self).__name__, "encoder")
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = RelformerModel(config)
        self.pooler = None if config.is_decoder else nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        """Logits `[B, num_labels]`; `labels` `[B]` (or `[B, num_labels]` for regression / multi-label)."""
        kwargs.pop("use_cache", None)
        outputs = self.model(
            return_dict=True,  # a dict inside; can_return_tuple applies the caller's choice
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            token_type_ids=token_type_ids,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if self.pooler is not None:
            pooled = torch.tanh(self.pooler(hidden_states[:, 0]))
        else:
            pooled = hidden_states[torch.arange(hidden_states.shape[0]), self._last_token(input_ids, attention_mask)]
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if labels.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"labels must have one entry per sequence ({logits.shape[0]}); got {list(labels.shape)}."
                )
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config, **kwargs)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def _last_token(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Index `[B]` of each row's last real token (rows may be left- or right-padded)."""
        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask.bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        else:
            return torch.full((1,), -1, dtype=torch.long)
        positions = torch.arange(real.shape[1], device=real.device)
        return torch.where(real, positions, -1).max(-1).values.clamp(min=0)


class RelformerForTokenClassification(RelformerPreTrainedModel):
    """Encoder Relformer with a per-token classifier (tagging, NER)."""

    def __init__(self, config: RelformerConfig):
        _require_form(config, type(self).__name__, "encoder")
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = RelformerModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> TokenClassifierOutput:
        """Logits `[B, L, num_labels]`; `labels` `[B, L]` (-100 ignored)."""
        outputs = self.model(
            return_dict=True,  # a dict inside; can_return_tuple applies the caller's choice
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            token_type_ids=token_type_ids,
            **kwargs,
        )
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            check_labels(labels, logits.shape[:2], self.config.num_labels, "input token")
            loss = self.loss_function(logits=logits, labels=labels, config=self.config, **kwargs)
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "RelformerEncoderDecoderModel",
    "RelformerForCausalLM",
    "RelformerForConditionalGeneration",
    "RelformerForMaskedLM",
    "RelformerForSequenceClassification",
    "RelformerForTokenClassification",
    "RelformerModel",
    "RelformerPreTrainedModel",
    "RelformerSingleStackModel",
    "RelformerStack",
]
