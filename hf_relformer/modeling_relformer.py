"""Relformer: the Transformer with Shaw relative-position attention (and other position schemes) for transformers.

Reads in data-flow order: norms -> feed-forward -> attention function -> attention module -> layer ->
pretrained base (class flags, init) -> bare model -> heads. Position schemes live in `positions_relformer.py`.
This file is shipped with every saved checkpoint (remote code): it imports only torch, transformers and its
sibling files through single-dot relative imports.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_relformer import RelformerConfig
from .positions_relformer import (
    POSITION_SCHEMES,
    NoAttentionPositions,
    RotaryPositions,
    ShawRelativeAttention,
    SinusoidalPositions,
    relative_values_term,
)


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


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """`[B, H_kv, L, D]` -> `[B, H_kv * n_rep, L, D]` for grouped-query attention."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, length, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, length, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, length, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    relative_values: tuple[torch.Tensor, torch.Tensor, bool] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention with Shaw's relative terms.

    query `[B, H, Lq, D]`, key/value `[B, H_kv, Lk, D]`, `position_bias` `[B, H, Lq, Lk]` (keys term, already
    scaled), additive `attention_mask` `[B, 1, Lq, Lk]`, `relative_values` = (bucket index `[Lq, Lk]`, value
    table, per-head flag). Returns the output `[B, Lq, H, D]` and the probabilities `[B, H, Lq, Lk]`.
    """
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    attn_weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    if relative_values is not None:
        attn_output = attn_output + relative_values_term(attn_weights, *relative_values)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


class RelformerAttention(nn.Module):
    """Multi-head (grouped-query) attention: project, apply the position scheme, run the attention backend."""

    def __init__(self, config: RelformerConfig, layer_idx: int, is_causal: bool, is_cross_attention: bool = False):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = is_causal  # read by the SDPA backend when no mask is given
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        kv_size = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        # Shaw used relative positions in self-attention only, never in cross-attention.
        attention_part = (
            NoAttentionPositions if is_cross_attention else POSITION_SCHEMES[config.position_embedding_type][1]
        )
        self.position = attention_part(config, causal=is_causal)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_inputs: object = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states `[B, L, hidden]` -> (output `[B, L, hidden]`, probabilities `[B, H, L, Lk]` or None)."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        query, key, position_kwargs = self.position(query, key, position_inputs)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **position_kwargs,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class RelformerLayer(GradientCheckpointingLayer):
    """Self-attention and feed-forward, each in a residual branch with a pre- or post-norm."""

    def __init__(self, config: RelformerConfig, layer_idx: int, is_causal: bool):
        super().__init__()
        self.pre_norm = config.layer_norm_position == "pre"
        self.self_attn = RelformerAttention(config, layer_idx, is_causal=is_causal)
        self.self_attn_norm = build_norm(config)
        self.mlp = RelformerFeedForward(config)
        self.mlp_norm = build_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_inputs: object = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """hidden_states `[B, L, hidden]` -> `[B, L, hidden]`."""

        def attention(x: torch.Tensor) -> torch.Tensor:
            x, _ = self.self_attn(x, attention_mask, position_inputs, past_key_values, **kwargs)
            return x

        hidden_states = self._residual(hidden_states, attention, self.self_attn_norm)
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
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False  # flash attention cannot add the relative position bias
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False
    _can_record_outputs = {"hidden_states": RelformerLayer, "attentions": RelformerAttention}

    def _check_and_adjust_attn_implementation(
        self, attn_implementation: str | None, is_init_check: bool = False, allow_all_kernels: bool = False
    ) -> str:
        """Relative values need the attention probabilities: such configs run eager attention and refuse others."""
        config = self.config
        if config.position_embedding_type == "relative" and config.relative_attention_values:
            if attn_implementation not in (None, "eager"):
                raise ValueError(
                    f"attn_implementation={attn_implementation!r} cannot compute the relative values term "
                    "(relative_attention_values=True needs the attention probabilities): use 'eager', or set "
                    "relative_attention_values=False."
                )
            attn_implementation = "eager"
        return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, allow_all_kernels)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, ShawRelativeAttention):
            init.normal_(module.relative_key_table, mean=0.0, std=std)
            if module.relative_value_table is not None:
                init.normal_(module.relative_value_table, mean=0.0, std=std)
        elif isinstance(module, SinusoidalPositions):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, RotaryPositions):
            init.copy_(module.inv_freq, module.compute_inv_freq()[0])


def _require_form(config: RelformerConfig, head: str, form: str) -> None:
    """Raise a clear error when a head is given a config of a form it cannot serve."""
    actual = "encoder-decoder" if config.is_encoder_decoder else "decoder-only" if config.is_decoder else "encoder"
    if actual != form:
        flags = {
            "decoder-only": "is_decoder=True, is_encoder_decoder=False",
            "encoder": "is_decoder=False, is_encoder_decoder=False",
            "encoder-decoder": "is_encoder_decoder=True",
        }
        raise ValueError(f"{head} needs a {form} config ({flags[form]}); this config is {actual}.")


class RelformerModel(RelformerPreTrainedModel):
    """The bare Relformer stack: embeddings -> position scheme -> layers -> final norm.

    `is_decoder=True` gives a causal decoder (with a key/value cache), `is_decoder=False` a bidirectional encoder.
    Returns `last_hidden_state` `[B, L, hidden_size]`.
    """

    def __init__(self, config: RelformerConfig):
        super().__init__(config)
        if config.is_encoder_decoder:
            raise NotImplementedError(
                "The encoder-decoder form (is_encoder_decoder=True) is not available yet; "
                "use is_decoder=True (decoder-only) or is_decoder=False (encoder)."
            )
        self.is_causal = config.is_decoder
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_scale = config.hidden_size**0.5 if config.scale_embedding else 1.0
        self.embed_positions = POSITION_SCHEMES[config.position_embedding_type][0](config, causal=self.is_causal)
        self.embed_norm = build_norm(config) if config.embedding_layer_norm else None
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(
            [RelformerLayer(config, i, is_causal=self.is_causal) for i in range(config.num_hidden_layers)]
        )
        self.norm = build_norm(config) if config.layer_norm_position == "pre" else None
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        """input_ids `[B, L]` (or inputs_embeds `[B, L, hidden]`), attention_mask `[B, past + L]` (1 = token)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.embed_scale
        if not self.is_causal:
            use_cache, past_key_values = False, None
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        query_length = inputs_embeds.shape[1]
        past_length, key_length = 0, query_length
        if past_key_values is not None:
            past_length = past_key_values.get_seq_length()
            if isinstance(past_length, torch.Tensor):  # a static cache updates its length tensor in place
                past_length = past_length.clone()
            key_length = past_key_values.get_mask_sizes(query_length, 0)[0]
        if position_ids is None:
            position_ids = (torch.arange(query_length, device=inputs_embeds.device) + past_length).unsqueeze(0)

        hidden_states, position_inputs = self.embed_positions(inputs_embeds, position_ids, past_length, key_length)
        if self.embed_norm is not None:
            hidden_states = self.embed_norm(hidden_states)
        hidden_states = self.dropout(hidden_states)

        if self.is_causal:
            mask = create_causal_mask(self.config, inputs_embeds, attention_mask, past_key_values, position_ids)
        else:
            mask = create_bidirectional_mask(self.config, inputs_embeds, attention_mask)

        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_inputs=position_inputs,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class RelformerForCausalLM(RelformerPreTrainedModel, GenerationMixin):
    """Decoder-only Relformer with a language-modelling head (tied to the token embeddings by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RelformerConfig):
        _require_form(config, type(self).__name__, "decoder-only")
        super().__init__(config)
        self.model = RelformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """Logits `[B, L, vocab]`; with `labels` `[B, L]` (-100 ignored) also the next-token loss (shifted inside)."""
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["RelformerForCausalLM", "RelformerModel", "RelformerPreTrainedModel"]
