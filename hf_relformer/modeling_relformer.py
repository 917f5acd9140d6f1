"""Relformer: the Transformer with Shaw relative-position attention (and other position schemes) for transformers.

Reads in data-flow order: norms -> feed-forward -> attention function -> attention module -> layer ->
pretrained base (class flags, init) -> stack -> bare model (one class per form: single stack, encoder-decoder) ->
heads. Position schemes live in `positions_relformer.py`.
This file is shipped with every saved checkpoint (remote code): it imports only torch, transformers and its
sibling files through single-dot relative imports.
"""

import dataclasses
import functools
import os
import pickle
from collections.abc import Callable, Collection, Mapping

import torch
from safetensors import SafetensorError
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.integrations.flex_attention import compile_friendly_flex_attention, get_flex_attention_lse_kwargs
from transformers.masking_utils import (
    and_masks,
    create_bidirectional_mask,
    create_causal_mask,
    create_masks_for_generate,
)
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
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_relformer import RelformerConfig
from .positions_relformer import DistanceGrid, NoAttentionPositions, attention_scaling, relative_values_term

logger = logging.get_logger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# The key/value cache's name. transformers 5.24 renamed it from `past_key_values` to `cache`: `generate()` passes
# `cache=...` and reads `outputs.cache` (5.23: `past_key_values`). Every forward here takes `cache` and also accepts
# `past_key_values`, silently, on every version (`takes_either_cache_name`); outputs carry the cache in the
# installed version's field (`with_cache`, `cache_of`). This section is the only code that knows both names.
# ---------------------------------------------------------------------------------------------------------------

CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
LEGACY_CACHE_NAME = "past_key_values"


def takes_either_cache_name(forward: Callable) -> Callable:
    """Decorates a `forward(..., cache=None, ...)` so that callers may pass the cache as `past_key_values` too (its
    name before transformers 5.24, still used by code written for it), without a deprecation warning."""

    @functools.wraps(forward)
    def forward_taking_either_name(self, *args, **kwargs):
        if LEGACY_CACHE_NAME in kwargs:
            legacy = kwargs.pop(LEGACY_CACHE_NAME)
            given = kwargs.get("cache")
            if legacy is not None and given is not None and given is not legacy:
                raise ValueError(
                    f"Two key/value caches were given, as `cache` and as `{LEGACY_CACHE_NAME}` (its name before "
                    "transformers 5.24): pass one."
                )
            if legacy is not None:
                kwargs["cache"] = legacy
        return forward(self, *args, **kwargs)

    return forward_taking_either_name


def with_cache(cache: Cache | None) -> dict:
    """The cache as a keyword argument under the installed transformers' name (`cache=` from 5.24 on,
    `past_key_values=` before): for its output classes, which print a deprecation warning for the other name, and for
    layers, whose activation-checkpointing wrapper drops the cache by that name."""
    return {CACHE_NAME: cache}


def cache_of(outputs: ModelOutput) -> Cache | None:
    """The cache an output of the installed transformers carries (without the old name's deprecation warning)."""
    return getattr(outputs, CACHE_NAME)


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

    DECODE_LAYOUT_LINEARS = ("up_proj", "down_proj", "gate_proj")  # see use_decode_layout

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
    if scores.dtype == torch.float16:  # fp16's min plus a negative score is -inf: a row of them would give NaN
        scores = scores.clamp(min=torch.finfo(torch.float16).min)
    # at least fp32 (fp64 stays fp64: its mask minimum would be -inf in fp32 and a padded row's NaN would spread)
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
    attn_weights = nn.functional.softmax(scores, dim=-1, dtype=softmax_dtype).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    if relative_values is not None:
        attn_output = attn_output + relative_values_term(attn_weights, *relative_values)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


# ---------------------------------------------------------------------------------------------------------------
# Flex attention: each scheme's position term as a `score_mod` reading `O(L·R)` tensors, masks (causal, padding, the
# cache's offset) as block masks, and Shaw's values term from the kernel's log-sum-exp. On an accelerator no `[L, L]`
# tensor exists; on CPU torch runs flex attention unfused (it materialises the scores) and has no backward.
# ---------------------------------------------------------------------------------------------------------------

FLEX_ATTENTION = "flex_attention"


def flex_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask, grid
) -> tuple[torch.Tensor, None]:
    """query `[B, H, Lq, D]`, key/value `[B, H_kv, Lk, D]`, `block_mask` (a `BlockMask` or None: every key) and the
    stack's position inputs (a `DistanceGrid` for bias schemes) -> (output `[B, Lq, H, D]`, None: flex attention
    returns no probabilities)."""
    check_flex_can_run(module, query, key, value)
    position = module.position
    score_mod = position.score_mod(query, key, grid)
    output, lse = run_flex_attention(query, key, value, score_mod, block_mask, module.scaling, position.adds_values)
    if position.adds_values:
        mask_mod = None if block_mask is None else block_mask.mask_mod
        far_lse, far_mask_mod = None, position.far_mask_mod(grid)
        if far_mask_mod is not None:  # a second kernel call for the log-sum-exp of one more region
            far_mask_mod = far_mask_mod if mask_mod is None else and_masks(mask_mod, far_mask_mod)
            far_block = flex_block_mask(far_mask_mod, query.shape[0], query.shape[2], key.shape[2], query.device)
            far_lse = run_flex_attention(query, key, value, score_mod, far_block, module.scaling, True)[1]
        output = output + position.flex_values_term(query, key, grid, score_mod, mask_mod, lse, far_lse)
    return output.transpose(1, 2).contiguous(), None


def run_flex_attention(query, key, value, score_mod, block_mask, scaling: float, return_lse: bool):
    """torch's flex attention -> (output `[B, H, Lq, D]`, log-sum-exp `[B, H, Lq]` fp32 or None). Compiled (once,
    by transformers' wrapper) off CPU; on CPU unfused, since torch's compiled CPU kernel returns no log-sum-exp."""
    from torch.nn.attention.flex_attention import flex_attention

    kwargs = {
        "score_mod": score_mod,
        "block_mask": block_mask,
        "scale": scaling,
        "enable_gqa": query.shape[1] != key.shape[1],
        **get_flex_attention_lse_kwargs(return_lse),
    }
    if query.device.type == "cpu" or torch.compiler.is_compiling():
        result = flex_attention(query, key, value, **kwargs)
    else:
        result = compile_friendly_flex_attention(query, key, value, training=torch.is_grad_enabled(), **kwargs)
    if not return_lse:
        return result, None
    output, aux = result
    return output, getattr(aux, "lse", aux)  # torch >= 2.9 returns an AuxOutput, older torch the lse itself


def check_flex_can_run(module: nn.Module, query, key, value) -> None:
    """Raise for what flex attention cannot do: attention dropout, and gradients on CPU (no backward there)."""
    config = module.config
    others = " or ".join(repr(name) for name in config.position_scheme.backends(config) if name != FLEX_ATTENTION)
    if module.training and module.attention_dropout > 0:
        raise ValueError(
            f"attn_implementation='flex_attention' has no attention dropout (config.attention_dropout="
            f"{module.attention_dropout}): call model.eval(), set attention_dropout=0, or use {others}."
        )
    if query.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise NotImplementedError(
            "attn_implementation='flex_attention' cannot train on CPU: torch has no flex attention backward there. "
            f"Train with attn_implementation={others} (model.set_attn_implementation(...)) or on a GPU; on CPU, "
            "flex attention runs inference (under torch.no_grad())."
        )


def flex_block_mask(mask_mod: Callable, batch: int, query_length: int, key_length: int, device: torch.device):
    """A `BlockMask` of `mask_mod(b, h, q_idx, kv_idx)`. Compiled off CPU, as transformers builds it (no `[B, Lq, Lk]`
    tensor); on CPU not (compiling costs seconds per new shape, and the unfused CPU kernel holds the scores anyway)."""
    from torch.nn.attention.flex_attention import create_block_mask

    compile_it = device.type != "cpu" and not torch.compiler.is_compiling()
    return create_block_mask(mask_mod, batch, None, query_length, key_length, device=device, _compile=compile_it)


def key_mask_mod(attention_mask: torch.Tensor | None, batch: int, query_length: int, key_length: int):
    """`(b, q_idx, kv_idx) -> allowed` from a 2-D mask `[B, >= Lk - padding]` (1 = token; keys past its end are not
    tokens), or from a 4-D mask `[B or 1, 1 or H, Lq, >= Lk]` (bool: True = attend; additive: 0 = attend; its first
    head), or None when every key is a token."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        allowed = attention_mask[:, 0, :, :key_length]
        allowed = (allowed if allowed.dtype == torch.bool else allowed == 0).expand(batch, query_length, key_length)
        return lambda b, q_idx, kv_idx: allowed[b, q_idx, kv_idx]
    tokens = attention_mask.bool()
    if not torch.compiler.is_compiling() and bool(tokens.all()) and tokens.shape[1] >= key_length:
        return None
    tokens = nn.functional.pad(tokens, (0, max(0, key_length - tokens.shape[1])))[:, :key_length]
    return lambda b, q_idx, kv_idx: tokens[b, kv_idx]


def cache_lengths(cache: Cache | None, query_length: int) -> tuple[int | torch.Tensor, int]:
    """(`past_length`: keys in the self-attention cache before this forward, `key_length`: keys attention will see)."""
    if cache is None:
        return 0, query_length
    past_length = cache.get_seq_length()
    if isinstance(past_length, torch.Tensor):  # a static cache updates its length tensor in place
        past_length = past_length.clone()
    return past_length, cache.get_mask_sizes(query_length, 0)[0]


def causal_attention_mask(config, inputs_embeds, attention_mask, cache: Cache | None, position_ids):
    """transformers' `create_causal_mask`; under flex attention, a block mask: causal (query i of this forward sits
    after the cache's `past_length` keys) and padding (a 4-D mask is taken as it is, as transformers does)."""
    if config._attn_implementation != FLEX_ATTENTION:
        return create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids)
    batch, query_length = inputs_embeds.shape[:2]
    past_length, key_length = cache_lengths(cache, query_length)
    allowed = key_mask_mod(attention_mask, batch, query_length, key_length)
    if attention_mask is not None and attention_mask.dim() == 4:

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed(b, q_idx, kv_idx)
    else:

        def mask_mod(b, h, q_idx, kv_idx):
            causal = kv_idx <= q_idx + past_length
            return causal if allowed is None else causal & allowed(b, q_idx, kv_idx)

    return flex_block_mask(mask_mod, batch, query_length, key_length, inputs_embeds.device)


def masks_for_generate(config, inputs_embeds, attention_mask, **kwargs):
    """What `generate()` passes for a static cache: transformers' prepared mask; under flex attention the 2-D mask
    itself (each stack builds its block mask, uncompiled on CPU)."""
    if config._attn_implementation == FLEX_ATTENTION:
        return attention_mask
    return create_masks_for_generate(config, inputs_embeds, attention_mask, **kwargs)


def bidirectional_attention_mask(config, inputs_embeds, attention_mask, encoder_hidden_states=None):
    """transformers' `create_bidirectional_mask` (keys: the inputs, or `encoder_hidden_states` for cross-attention);
    under flex attention, a block mask of the padding, or None without padding."""
    if config._attn_implementation != FLEX_ATTENTION:
        return create_bidirectional_mask(
            config, inputs_embeds, attention_mask, encoder_hidden_states=encoder_hidden_states
        )
    batch, query_length = inputs_embeds.shape[:2]
    key_length = (inputs_embeds if encoder_hidden_states is None else encoder_hidden_states).shape[1]
    allowed = key_mask_mod(attention_mask, batch, query_length, key_length)
    if allowed is None:
        return None
    return flex_block_mask(
        lambda b, h, q_idx, kv_idx: allowed(b, q_idx, kv_idx), batch, query_length, key_length, inputs_embeds.device
    )


# Every bias scheme runs in blocks of query rows whose position bias `[B, H, rows, Lk]` has at most BLOCK_ELEMENTS
# elements (2 MB in fp32), so that memory grows like L, not L², beyond short inputs; but never fewer than
# MIN_BLOCK_ROWS rows, below which per-block overhead dominates (measured: a forward at L = 8192 took 15.8 s with
# 8-row blocks, 9.7 s with 32-row blocks).
BLOCK_ELEMENTS = 2**19
MIN_BLOCK_ROWS = 32


class RelformerAttention(nn.Module):
    """Multi-head (grouped-query) attention: project, apply the position scheme, run the attention backend.

    Self-attention reads keys and values from its own input and owns the position scheme's attention part;
    cross-attention (`is_cross_attention=True`) reads them from the encoder output, once per generation, and has
    no position term (as in Shaw et al.).
    """

    DECODE_LAYOUT_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")  # see use_decode_layout

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
        attention_mask: torch.Tensor | None = None,
        position_inputs: object = None,
        cache: Cache | None = None,
        key_value_states: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states `[B, L, hidden]` (and for cross-attention the encoder output `key_value_states`
        `[B, Ls, hidden]`) -> (output `[B, L, hidden]`, probabilities `[B, H, L, Lk]` or None).

        One path for every scheme: project -> the scheme's before-cache hook -> cache -> its bias -> attend."""
        input_shape = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        if self.is_cross_attention:
            key, value = self._cross_key_value(key_value_states, cache)
        else:
            key, value = self._project_key_value(hidden_states)
            query, key = self.position.before_cache(query, key, position_inputs)
            key, value = self._update_cache(key, value, cache)
        if self.config._attn_implementation == FLEX_ATTENTION:
            attn_output, attn_weights = flex_attention_forward(self, query, key, value, attention_mask, position_inputs)
        else:
            attn_output, attn_weights = self._attend_in_blocks(
                query, key, value, attention_mask, position_inputs, kwargs
            )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    def _attend(self, query, key, value, attention_mask, position_kwargs: dict, kwargs: dict):
        """The configured backend: query `[B, H, Lq, D]`, key/value `[B, H_kv, Lk, D]` -> (`[B, Lq, H, D]`,
        probabilities `[B, H, Lq, Lk]` or None)."""
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        return attention_interface(
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

    def _attend_in_blocks(self, query, key, value, attention_mask, grid: DistanceGrid | None, kwargs: dict):
        """Attention with the scheme's bias over blocks of query rows, so that the `[B, H, rows, Lk]` position bias of
        one block stays under `BLOCK_ELEMENTS` (one block, the whole input, unless the input is long). A causal block
        reads only the keys up to its last query. Schemes without a bias attend in one call."""
        if not self.position.adds_bias:
            return self._attend(query, key, value, attention_mask, {}, kwargs)
        batch, heads, query_length = query.shape[:3]
        key_length = key.shape[2]
        rows = max(min(MIN_BLOCK_ROWS, query_length), BLOCK_ELEMENTS // (batch * heads * key_length))
        if rows >= query_length:
            position_kwargs = self.position(query, key, grid.block(0, query_length, key_length))
            return self._attend(query, key, value, attention_mask, position_kwargs, kwargs)
        past = int(grid.past_length)  # keys before this forward's queries (a cache)
        outputs, weights = [], []
        for start in range(0, query_length, rows):
            stop = min(start + rows, query_length)
            key_stop = min(past + stop, key_length) if self.is_causal else key_length
            block_query, block_key = query[:, :, start:stop], key[:, :, :key_stop]
            if attention_mask is not None:
                block_mask = attention_mask[:, :, start:stop, :key_stop]
                if block_mask.dtype == torch.bool:
                    block_mask = torch.zeros(block_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                        ~block_mask, torch.finfo(query.dtype).min
                    )
            elif self.is_causal:  # a backend would align an implicit causal mask to the block's corner: be explicit
                query_positions = torch.arange(start, stop, device=query.device)[:, None] + past
                allowed = torch.arange(key_stop, device=query.device) <= query_positions
                block_mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
                block_mask = block_mask.masked_fill(~allowed, torch.finfo(query.dtype).min)[None, None]
            else:
                block_mask = None
            # the mask is folded into the bias: the backend then makes no masked copy
            position_kwargs = self.position(block_query, block_key, grid.block(start, stop, key_stop), block_mask)
            output, block_weights = self._attend(
                block_query, block_key, value[:, :, :key_stop], None, position_kwargs, kwargs | {"is_causal": False}
            )
            outputs.append(output)
            if block_weights is not None:
                weights.append(nn.functional.pad(block_weights, (0, key_length - key_stop)))
        return torch.cat(outputs, dim=1), (torch.cat(weights, dim=2) if len(weights) == len(outputs) else None)

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
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
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
    _skip_keys_device_placement = ["cache", "past_key_values"]  # either name (see CACHE_NAME)
    _supports_sdpa = True
    _supports_flash_attn = False  # flash attention cannot add the relative position bias
    _supports_flex_attn = True  # every scheme: position terms as score_mods (see "Flex attention")
    _supports_attention_backend = False
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
        """transformers' `from_pretrained`, with errors that name the checkpoint and the problem: no config.json, a
        damaged weight file, a pickle that would run code, and tensors that do not fit config.json (other shapes;
        tensors of the model body missing, which transformers would initialise at random with a warning; or body
        tensors the config has no place for). `ignore_mismatched_sizes=True` re-initialises misshapen tensors,
        `allow_missing_weights=True` missing ones (e.g. after changing `position_embedding_type`), and
        `allow_unused_weights=True` drops surplus ones (e.g. after turning `relative_attention_values` off); a head's
        own new layers (a classifier on a language model's checkpoint) are always allowed. With
        `output_loading_info=True` only misshapen tensors raise: the rest is in the returned info (and a warning)."""
        allow_missing = kwargs.pop("allow_missing_weights", False)
        allow_unused = kwargs.pop("allow_unused_weights", False)
        allow_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        wants_info = kwargs.pop("output_loading_info", False)
        where = f"checkpoint {str(pretrained_model_name_or_path)!r}"
        folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if kwargs.get("config") is None and os.path.isdir(folder) and not os.path.isfile(f"{folder}/config.json"):
            raise OSError(f"The {where} has no config.json: the folder is incomplete.")
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below, by name
                **kwargs,
            )
        except SafetensorError as error:
            raise OSError(
                f"The weights of the {where} cannot be read: the .safetensors file is damaged or incomplete (an "
                f"interrupted download or copy?). Fetch or save it again. safetensors said: {error}"
            ) from error
        except pickle.UnpicklingError as error:
            raise OSError(
                f"The {where} has a pickle-based weight file (.bin / .pt) that holds more than tensors: loading it "
                "would run code, so it was refused (torch.load with weights_only=True). Use a .safetensors copy from "
                f"a source you trust. torch said: {pickle_refusal(error) or _last_line(error)}"
            ) from error
        # with output_loading_info the caller reads the report: only a shape mismatch still raises (as in transformers)
        fit = CheckpointFit.of_loading_info(info, counts=_body_keys(model))
        problems = fit.problems(allow_missing or wants_info, allow_mismatched, allow_unused or wants_info)
        if wants_info:
            unfit = fit.problems(allow_missing, True, allow_unused)
            if unfit:
                logger.warning(f"The tensors of the {where} do not all fit the model: {'; '.join(unfit)}.")
        if allow_mismatched and info.get("mismatched_keys"):
            shown = [f"{name} {tuple(stored)} -> {tuple(needed)}" for name, stored, needed in info["mismatched_keys"]]
            logger.warning(
                f"Re-initialised {len(shown)} tensor(s) of the {where} whose shape differs from this config "
                f"(ignore_mismatched_sizes=True): {', '.join(sorted(shown))}. Train them before use."
            )
        if problems:
            raise ValueError(
                f"The tensors of the {where} do not fit its config.json (an incomplete weight file, or a config "
                f"edited or copied from another checkpoint): {'; '.join(problems)}."
            )
        return (model, info) if wants_info else model

    def _check_and_adjust_attn_implementation(
        self, attn_implementation: str | None, is_init_check: bool = False, allow_all_kernels: bool = False
    ) -> str:
        """Relformer runs the backends its position scheme supports (eager and SDPA, or eager alone where the scheme
        needs the attention probabilities, e.g. relative values); such a config runs eager attention by itself.
        Any other backend is refused with the ones this config can use."""
        config = self.config
        scheme = config.position_scheme
        supported = scheme.backends(config)
        restricted = "sdpa" not in supported  # a scheme option that needs more than SDPA can give (relative values)
        if isinstance(attn_implementation, str) and attn_implementation not in supported:
            if restricted:
                raise ValueError(f"attn_implementation={attn_implementation!r} {scheme.backend_reason(config)}")
            raise ValueError(
                f"attn_implementation={attn_implementation!r} is not supported by Relformer (yet); this config "
                f"(position_embedding_type={config.position_embedding_type!r}) runs "
                f"{' or '.join(map(repr, supported))}."
            )
        if attn_implementation is None and restricted:
            attn_implementation = supported[0]  # chosen by itself, not transformers' default (SDPA)
        return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, allow_all_kernels)

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, **kwargs):
        """Read by `generate()` with a static cache (see `masks_for_generate`)."""
        return masks_for_generate(config, inputs_embeds, attention_mask, **kwargs)

    def train(self, mode: bool = True):
        """nn.Module's `train`; training runs on the stored weight layout (see `use_decode_layout`)."""
        if mode:
            use_stored_layout(self)
        return super().train(mode)

    def state_dict(self, *args, **kwargs):
        """nn.Module's `state_dict`, of the stored (contiguous) weight layout (see `use_decode_layout`)."""
        use_stored_layout(self)
        return super().state_dict(*args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        self.config.position_scheme.init_weights(module, self.config.initializer_range)


def _body_keys(model: nn.Module) -> Callable[[str], bool]:
    """Whether a key of the loading info belongs to the model body (keys of another head are not the body's): a
    head's body is under "model."; the bare model's, its own children."""
    prefix = model.base_model_prefix
    is_head = getattr(model, prefix, model) is not model
    children = {name for name, _ in model.named_children()}
    if is_head:
        return lambda key: key.startswith(f"{prefix}.")
    return lambda key: key.removeprefix(f"{prefix}.").split(".")[0] in children


@dataclasses.dataclass
class CheckpointFit:
    """How a checkpoint's tensors fit a model: the one check behind `from_pretrained`, the converters (a source's
    loading report) and the checks of a saved folder (`checkpoint_problems`: upload, card, upgrade). Names are sorted;
    `mismatched` holds (name, shape in the file, shape the model needs)."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    @classmethod
    def of_loading_info(
        cls, info: dict, tied: Collection[str] = (), counts: Callable[[str], bool] = lambda key: True
    ) -> "CheckpointFit":
        """From transformers' loading info. Tied copies are never stored; `counts` keeps the missing and unexpected
        keys that matter (a head's body; all but what a converter reads by itself)."""
        return cls(
            missing=sorted(key for key in info.get("missing_keys") or () if key not in tied and counts(key)),
            unexpected=sorted(key for key in info.get("unexpected_keys") or () if counts(key)),
            mismatched=sorted(
                (key, tuple(stored), tuple(needed)) for key, stored, needed in info.get("mismatched_keys") or ()
            ),
        )

    @classmethod
    def of_shapes(cls, model: nn.Module, stored: Mapping[str, tuple[int, ...]]) -> "CheckpointFit":
        """Stored tensor shapes (name -> shape, e.g. from safetensors headers) against `model`'s state dict."""
        expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        return cls(
            missing=sorted(set(expected) - set(stored) - tied),
            unexpected=sorted(set(stored) - set(expected)),
            mismatched=sorted(
                (name, tuple(stored[name]), expected[name])
                for name in set(stored) & set(expected)
                if tuple(stored[name]) != expected[name]
            ),
        )

    def problems(
        self, allow_missing: bool = False, allow_mismatched: bool = False, allow_unused: bool = False
    ) -> list[str]:
        """What is wrong, as `from_pretrained` reports it (with the argument that allows each kind)."""
        problems = []
        if self.mismatched and not allow_mismatched:  # body or head: a trained classifier is not re-drawn silently
            shown = [f"{name} is {stored} in the file, {needed} here" for name, stored, needed in self.mismatched]
            problems.append(
                f"{len(shown)} tensor(s) of another shape ({_listed(shown)}; ignore_mismatched_sizes=True "
                "re-initialises them)"
            )
        if self.missing and not allow_missing:
            problems.append(
                f"{len(self.missing)} tensor(s) missing ({_listed(self.missing)}; allow_missing_weights=True "
                "initialises them at random)"
            )
        if self.unexpected and not allow_unused:
            problems.append(
                f"{len(self.unexpected)} tensor(s) the model has no place for ({_listed(self.unexpected)}; "
                "allow_unused_weights=True drops them)"
            )
        return problems


def checkpoint_problems(config: RelformerConfig, stored: Mapping[str, tuple[int, ...]]) -> list[str]:
    """How the stored tensors (name -> shape) differ from those of the model the config describes (its
    `architectures`' class, built on the meta device): missing, unexpected and misshapen tensors (at most five of
    each), or [] when they fit."""
    head = (config.architectures or ["RelformerModel"])[0]
    model_class = globals().get(head)
    if not (isinstance(model_class, type) and issubclass(model_class, RelformerPreTrainedModel)):
        return [f"config.architectures names {head!r}, which is not a Relformer class."]
    with torch.device("meta"):
        fit = CheckpointFit.of_shapes(model_class(config), stored)
    problems = []
    if fit.missing:
        problems.append(f"weights missing for the config: {', '.join(fit.missing[:5])}.")
    if fit.unexpected:
        problems.append(f"weights the config's model does not have: {', '.join(fit.unexpected[:5])}.")
    problems += [
        f"{name} has shape {stored}, the config needs {needed}." for name, stored, needed in fit.mismatched[:5]
    ]
    return problems


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def pickle_refusal(error: Exception) -> str | None:
    """The line of torch's weights-only refusal that names what was blocked (its other lines advise unsafe loading),
    or None when it names nothing."""
    return next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line), None)


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
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, query_length, past_length, inputs_embeds.device)

        hidden_states, position_inputs = self.embed_positions(inputs_embeds, position_ids, past_length, key_length)
        if self.embed_norm is not None:
            hidden_states = self.embed_norm(hidden_states)
        hidden_states = self.dropout(hidden_states)

        if self.is_causal:
            mask = causal_attention_mask(self.config, inputs_embeds, attention_mask, self_attention_cache, position_ids)
        else:
            mask = bidirectional_attention_mask(self.config, inputs_embeds, attention_mask)
        if encoder_hidden_states is not None:
            encoder_attention_mask = bidirectional_attention_mask(
                self.config, inputs_embeds, encoder_attention_mask, encoder_hidden_states=encoder_hidden_states
            )

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


def check_token_inputs(
    config: RelformerConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
) -> None:
    """Raise `ValueError` naming the input for ids outside the vocabulary, empty inputs and shapes that do not fit:
    input_ids `[B, L]` of integers, inputs_embeds `[B, L, hidden_size]`, position_ids `[B or 1, L]`, token_type_ids
    `[B, L]` (an out-of-range id would otherwise stop with an opaque `IndexError`, or read another row on GPU)."""
    if input_ids is not None:
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(
                f"input_ids must be integer token ids of shape [batch, length]; got {input_ids.dtype} of shape "
                f"{tuple(input_ids.shape)} (a single sequence needs a batch dimension: ids[None])."
            )
        shape = tuple(input_ids.shape)
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape [batch, length, {config.hidden_size}] (hidden_size); got "
                f"{tuple(inputs_embeds.shape)}."
            )
        shape = tuple(inputs_embeds.shape[:2])
    if 0 in shape:
        raise ValueError(f"The input is empty (shape [batch, length] = {list(shape)}): give at least one token.")
    if input_ids is not None and not torch.compiler.is_compiling():
        low, high = (int(value) for value in torch.aminmax(input_ids))
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"input_ids must be in [0, {config.vocab_size}) (config.vocab_size); got ids from {low} to {high}. "
                "Was the text tokenized with another model's tokenizer?"
            )
    if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[-1] != shape[1]):
        raise ValueError(f"position_ids must have shape [batch or 1, {shape[1]}]; got {tuple(position_ids.shape)}.")
    if token_type_ids is not None and tuple(token_type_ids.shape) != shape:
        raise ValueError(f"token_type_ids must have the inputs' shape {list(shape)}; got {list(token_type_ids.shape)}.")


def check_attention_mask(mask: torch.Tensor | None, batch: int, key_length: int, which: str = "") -> None:
    """A 2-D mask must be `[B, key_length]` (past + current tokens) of 1 (token) and 0 (padding); a 4-D mask, as
    transformers accepts it, `[B or 1, 1 or H, Lq, key_length or more]`. Raises `ValueError` naming the problem."""
    if mask is None:
        return
    name = f"{which}attention_mask"
    if mask.dim() == 4:
        if mask.shape[0] not in (1, batch) or mask.shape[-1] < key_length:
            raise ValueError(
                f"A 4-D {name} must have shape [{batch} or 1, 1 or heads, query length, {key_length} or more]; got "
                f"{list(mask.shape)}."
            )
        return
    if mask.dim() != 2 or tuple(mask.shape) != (batch, key_length):
        raise ValueError(
            f"{name} must have shape [batch, length] = [{batch}, {key_length}] (1 for tokens, 0 for padding; with a "
            f"cache, the length counts the cached tokens too); got {list(mask.shape)}."
        )
    if mask.dtype == torch.bool or torch.compiler.is_compiling():
        return
    if mask.dtype.is_floating_point:
        valid = bool(((mask == 0) | (mask == 1)).all())
    else:  # integers in [0, 1] are 0 or 1: one reduction
        low, high = torch.aminmax(mask)
        valid = int(low) >= 0 and int(high) <= 1
    if not valid:
        raise ValueError(
            f"{name} must hold 1 for tokens and 0 for padding; got other values (min {mask.min().item()}, max "
            f"{mask.max().item()}). An additive mask (0 / -inf) is not accepted here."
        )


def default_position_ids(
    attention_mask: torch.Tensor | None, query_length: int, past_length: int | torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Positions `[B or 1, L]` of the queries: counted over real tokens when a 2-D mask is given (so padding
    never shifts an absolute position), else `past_length + arange(L)`."""
    if attention_mask is not None and attention_mask.dim() == 2:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_length:]
    return (torch.arange(query_length, device=device) + past_length).unsqueeze(0)


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
        return super().forward(
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


# ---------------------------------------------------------------------------------------------------------------
# Decoding on CPU: the layout of the weight matrices. A decode step of one sequence multiplies one row with every
# weight matrix (a matrix-vector product that streams the matrix from memory), and torch's CPU kernels stream
# nn.Linear's stored `[out, in]` (row-major) matrices up to twice as slowly as their transpose, the layout GPT-2's
# Conv1D stores (measured at hidden 512, fp32: the tied `[32000, 512]` LM head 4.3 ms row-major against 2.2 ms); the
# same holds up to 4 rows per step (a small batch, or beams), while from 8 rows on the stored layout is as fast or
# faster. So `generate()` of at most `DECODE_LAYOUT_MAX_ROWS` rows per step stores, on CPU, the weights of
# Relformer's own projections (the `DECODE_LAYOUT_LINEARS` of each module: attention, feed-forward, LM head)
# column-major, and any other `generate()` the stored layout: same shapes, same Parameter objects, names and values
# (optimizers, PEFT and tied weights see nothing change), only the strides. `state_dict()` (hence
# `save_pretrained`, Trainer's and PEFT's saving) and `train()` put the stored contiguous layout back first. A
# projection with hooks (accelerate's offloading), of another class (a quantized or adapter layer), off CPU, or whose
# weight is a view of a larger tensor is left alone. README's Performance has the measurements.
# ---------------------------------------------------------------------------------------------------------------

DECODE_LAYOUT_MARK = "_relformer_decode_layout"  # set on a weight Parameter while it is stored column-major
DECODE_LAYOUT_MAX_ROWS = 4  # rows per decode step (sequences x beams) up to which the column-major layout is faster


def _decode_layout_weight(module: nn.Module | None) -> nn.Parameter | None:
    """The weight of a plain CPU `nn.Linear` that may be stored column-major, or None."""
    if type(module) is not nn.Linear:  # None (an absent projection), or a quantized / adapter subclass
        return None
    if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
        return None
    weight = module.weight
    whole = weight.storage_offset() == 0 and weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
    if weight.device.type != "cpu" or not weight.is_contiguous() or not whole or min(weight.shape) < 2:
        return None
    return weight


def use_decode_layout(model: nn.Module) -> None:
    """Store the `[out, in]` weights of the model's own CPU projections column-major (see above)."""
    for module in model.modules():
        for name in getattr(module, "DECODE_LAYOUT_LINEARS", ()):
            weight = _decode_layout_weight(getattr(module, name))
            if weight is not None:
                weight.data = weight.data.t().contiguous().t()
                setattr(weight, DECODE_LAYOUT_MARK, True)


def use_stored_layout(model: nn.Module) -> None:
    """Undo `use_decode_layout`: the weights it stored column-major become contiguous `[out, in]` again."""
    for parameter in model.parameters():
        if getattr(parameter, DECODE_LAYOUT_MARK, False):
            parameter.data = parameter.data.contiguous()
            delattr(parameter, DECODE_LAYOUT_MARK)


class RelformerGenerationMixin(GenerationMixin):
    """transformers' `GenerationMixin`; `generate()` first chooses the weights' layout (see `use_decode_layout`)."""

    DECODE_LAYOUT_LINEARS = ("lm_head",)  # see use_decode_layout

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, *args, **kwargs):
        """transformers' `generate()` (same arguments and outputs), in the CPU decode layout when each step decodes at
        most `DECODE_LAYOUT_MAX_ROWS` rows (see `use_decode_layout`), else in the stored layout."""
        rows = decode_rows(self, inputs, generation_config, kwargs)
        if rows is not None and rows <= DECODE_LAYOUT_MAX_ROWS:
            use_decode_layout(self)
        else:
            use_stored_layout(self)
        return super().generate(inputs, generation_config, *args, **kwargs)


def decode_rows(model: nn.Module, inputs: torch.Tensor | None, generation_config, kwargs: dict) -> int | None:
    """The rows of one decode step of `generate(inputs, generation_config, **kwargs)`: sequences times beams (or
    returned sequences); None when the batch cannot be read off the arguments."""
    given = (inputs, kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
    batch = next((value.shape[0] for value in given if isinstance(value, torch.Tensor)), None)
    config = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    per_input = max(
        kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1,
        kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1,
    )
    return None if batch is None else batch * per_input


class RelformerForCausalLM(RelformerPreTrainedModel, RelformerGenerationMixin):
    """Decoder-only Relformer with a language-modelling head (tied to the token embeddings by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

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


def check_labels(labels: torch.Tensor, shape: tuple[int, ...], num_classes: int, what: str) -> None:
    """Raise `ValueError` unless `labels` has `shape` (one per `what`) and holds -100 (ignored) or a class in
    `[0, num_classes)` (transformers' loss would fail with an opaque batch-size or index error)."""
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels must have shape {list(shape)} (one per {what}); got {list(labels.shape)}.")
    if labels.dtype.is_floating_point or torch.compiler.is_compiling():
        return
    valid = (labels == -100) | ((labels >= 0) & (labels < num_classes))
    if not bool(valid.all()):
        bad = labels[~valid]
        raise ValueError(
            f"labels must be -100 (ignored) or in [0, {num_classes}); got {bad.numel()} other value(s), e.g. "
            f"{int(bad[0])}."
        )


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int | None, decoder_start_token_id: int | None):
    """Decoder inputs `[B, Lt]` from labels: `decoder_start_token_id`, then labels[:, :-1] (-100 -> pad)."""
    if decoder_start_token_id is None or pad_token_id is None:
        raise ValueError(
            "Building decoder inputs from labels needs config.decoder_start_token_id and config.pad_token_id."
        )
    shifted = labels.new_full(labels.shape, decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_token_id)


class RelformerForConditionalGeneration(RelformerPreTrainedModel, RelformerGenerationMixin):
    """Encoder-decoder Relformer with a language-modelling head: the Transformer of Vaswani et al. (2017)."""

    _tied_weights_keys = {"lm_head.weight": "model.encoder.embed_tokens.weight"}

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
