"""Position schemes of Relformer, each a pair of small modules behind one interface.

- The *stack part* runs once per forward of a stack of layers:
  `forward(inputs_embeds, position_ids, past_length, key_length) -> (inputs_embeds, layer_inputs)`.
  Absolute schemes add their table to the embeddings here; rotary computes cos/sin; relative computes the
  clipped-distance bucket index. `layer_inputs` is handed unchanged to every attention layer.
- The *attention part* lives in each self-attention module:
  `forward(query, key, layer_inputs) -> (query, key, attention_kwargs)`.
  Rotary rotates q and k; relative returns `position_bias` (the keys term) and, if enabled, `relative_values`
  (the values term, computed by `relative_values_term` inside eager attention).

Adding a scheme means writing its two parts and one line in `POSITION_SCHEMES`.
This file is shipped with every saved checkpoint (remote code): it imports only torch and transformers.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update


class NoStackPositions(nn.Module):
    """No position information at the stack level (used by `"none"` and `"relative"` embeddings)."""

    def __init__(self, config, causal: bool):
        super().__init__()

    def forward(self, inputs_embeds, position_ids, past_length, key_length):
        return inputs_embeds, None


class NoAttentionPositions(nn.Module):
    """No position term in attention (absolute schemes, `"none"`, and every cross-attention)."""

    def __init__(self, config, causal: bool):
        super().__init__()

    def forward(self, query, key, layer_inputs):
        return query, key, {}


# ---------------------------------------------------------------------------------------------------------------
# Absolute positions: added to the token embeddings
# ---------------------------------------------------------------------------------------------------------------


def float32_inv_freq(module: nn.Module, device: torch.device) -> torch.Tensor:
    """The module's `inv_freq` buffer in fp32 on `device`. `model.to(torch.float16)` casts buffers too, and frequencies
    rounded to half precision put the angle of position 1000 off by up to a radian: the buffer is then refilled in
    fp32 (once)."""
    if module.inv_freq.dtype != torch.float32:
        fresh = module.compute_inv_freq()
        module.inv_freq = (fresh[0] if isinstance(fresh, tuple) else fresh).to(module.inv_freq.device)
    return module.inv_freq if device is None else module.inv_freq.to(device)


class SinusoidalPositions(nn.Module):
    """Vaswani et al. (2017): PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)). Any length."""

    def __init__(self, config, causal: bool):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        """`[hidden_size / 2]` frequencies (a non-persistent buffer: refilled by `_init_weights` after loading)."""
        return 1.0 / (10000.0 ** (torch.arange(0, self.hidden_size, 2, dtype=torch.float) / self.hidden_size))

    def forward(self, inputs_embeds, position_ids, past_length, key_length):
        angles = position_ids[..., None].float() * float32_inv_freq(self, inputs_embeds.device)  # [B or 1, L, d/2]
        table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # interleaved sin, cos: [., L, d]
        return inputs_embeds + table.to(inputs_embeds.dtype), None


class LearnedPositions(nn.Module):
    """A learned table of `max_position_embeddings` rows; positions beyond it are an error."""

    def __init__(self, config, causal: bool):
        super().__init__()
        self.embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, inputs_embeds, position_ids, past_length, key_length):
        limit = self.embeddings.num_embeddings
        if position_ids.numel() and not torch.compiler.is_compiling() and int(position_ids.max()) >= limit:
            raise ValueError(
                f"Position {int(position_ids.max())} is beyond the learned position table "
                f"(max_position_embeddings={limit}). Use shorter inputs, or a scheme that works at any length "
                "(relative, sinusoidal, rotary, none)."
            )
        return inputs_embeds + self.embeddings(position_ids), None


# ---------------------------------------------------------------------------------------------------------------
# Rotary positions: q and k rotated by an angle proportional to the position
# ---------------------------------------------------------------------------------------------------------------


class RotaryPositions(nn.Module):
    """Computes the rotary cos/sin `[B or 1, L, head_dim]` once per forward, from `position_ids`.

    Every rope type in transformers' registry (`rope_parameters["rope_type"]`), with the same run-time updates as
    Llama's rotary module: "dynamic" (NTK) recomputes its frequencies when positions grow past
    `max_position_embeddings` (and returns to the original ones below it), "longrope" switches to its long factors
    past `original_max_position_embeddings`."""

    def __init__(self, config, causal: bool):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        inv_freq, self.attention_scaling = self.compute_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    def compute_inv_freq(self) -> tuple[torch.Tensor, float]:
        """`[head_dim / 2]` frequencies and the cos/sin scale of the configured rope type (at the configured length)."""
        rope = self.config.rope_parameters
        if rope.get("rope_type", "default") != "default":
            return ROPE_INIT_FUNCTIONS[rope["rope_type"]](self.config)
        dim = self.config.head_dim
        return 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    def forward(self, inputs_embeds, position_ids, past_length, key_length):
        return inputs_embeds, self.cos_sin(inputs_embeds, position_ids)

    @dynamic_rope_update  # dynamic / longrope: update inv_freq for these positions first (as Llama does)
    def cos_sin(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin `[B or 1, L, head_dim]` of `position_ids` `[B or 1, L]`, in the embeddings' dtype."""
        inv_freq = self.inv_freq.float() if self.rope_type in RUN_TIME_ROPE_TYPES else float32_inv_freq(self, None)
        freqs = position_ids[..., None].float() * inv_freq.to(inputs_embeds.device)  # [B or 1, L, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * self.attention_scaling).to(inputs_embeds.dtype)
        sin = (angles.sin() * self.attention_scaling).to(inputs_embeds.dtype)
        return cos, sin


RUN_TIME_ROPE_TYPES = ("dynamic", "longrope")  # rope types whose frequencies change with the positions seen


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the channels: (x1, x2) -> (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryAttentionPositions(nn.Module):
    """Rotates queries and keys `[B, H, L, D]` by the cos/sin of their positions."""

    def __init__(self, config, causal: bool):
        super().__init__()

    def forward(self, query, key, layer_inputs):
        cos, sin = (t.unsqueeze(1) for t in layer_inputs)  # [B or 1, 1, L, D]
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin
        return query, key, {}


# ---------------------------------------------------------------------------------------------------------------
# Shaw relative positions
# ---------------------------------------------------------------------------------------------------------------


class BucketIndex:
    """Bucket index of the clipped distance `clip(j - i, k)` for queries i and keys j, by blocks of query rows.

    Queries sit at `past_length + arange(query_length)`, keys at `arange(key_length)`. A causal stack never attends
    to positive distances, so its tables have `k + 1` rows (distances -k..0) and positive distances map to row k
    (masked anyway); a bidirectional stack has `2k + 1` rows. The whole `[Lq, Lk]` index is built once per forward
    when it is small (`WHOLE_LIMIT` entries) and sliced by every layer; beyond that, each block is built when a layer
    needs it, so a long input never holds an `[L, L]` index.
    """

    WHOLE_LIMIT = 2**18

    def __init__(self, query_length, past_length, key_length, max_distance, causal, device):
        self.query_length, self.past_length, self.key_length = query_length, past_length, key_length
        self.max_distance, self.causal, self.device = max_distance, causal, device
        self.whole = self._build(0, query_length, key_length) if query_length * key_length <= self.WHOLE_LIMIT else None

    def block(self, start: int, stop: int, key_stop: int) -> torch.Tensor:
        """`[stop - start, key_stop]`: queries start..stop-1 of this forward against keys 0..key_stop-1."""
        if self.whole is not None:
            return self.whole[start:stop, :key_stop]
        return self._build(start, stop, key_stop)

    def _build(self, start: int, stop: int, key_stop: int) -> torch.Tensor:
        query_positions = torch.arange(start, stop, device=self.device) + self.past_length
        key_positions = torch.arange(key_stop, device=self.device)
        distance = key_positions[None, :] - query_positions[:, None]
        k = self.max_distance
        return distance.clamp(-k, 0 if self.causal else k) + k


class RelativeBuckets(nn.Module):
    """The stack part of relative positions: a `BucketIndex` shared by every layer of this forward."""

    def __init__(self, config, causal: bool):
        super().__init__()
        self.max_distance = config.relative_attention_max_distance
        self.causal = causal

    def forward(self, inputs_embeds, position_ids, past_length, key_length):
        query_length, device = inputs_embeds.shape[1], inputs_embeds.device
        index = BucketIndex(query_length, past_length, key_length, self.max_distance, self.causal, device)
        return inputs_embeds, index


class ShawRelativeAttention(nn.Module):
    """The relative tables of one self-attention layer and the keys term they add.

    `relative_key_table` (and `relative_value_table` when `relative_attention_values`) have shape
    `[R, head_dim]` shared by all heads (Shaw), or `[H, R, head_dim]` per head (Music Transformer), with
    `R = k + 1` (causal) or `2k + 1` (bidirectional). With `relative_attention_key_query` the keys term also gets
    the key-side product `k_j·a_ij` (same table; encoders only).
    """

    def __init__(self, config, causal: bool):
        super().__init__()
        k = config.relative_attention_max_distance
        rows = k + 1 if causal else 2 * k + 1
        shape = (
            (config.num_attention_heads, rows, config.head_dim)
            if config.relative_attention_per_head
            else (rows, config.head_dim)
        )
        self.per_head = config.relative_attention_per_head
        self.key_query = config.relative_attention_key_query
        self.scaling = config.head_dim**-0.5
        self.relative_key_table = nn.Parameter(torch.empty(shape))
        self.relative_value_table = nn.Parameter(torch.empty(shape)) if config.relative_attention_values else None

    def forward(self, query, key, layer_inputs):
        """query `[B, H, Lq, D]` and the bucket index `[Lq, Lk]` of a block of query rows (see `BucketIndex`) ->
        `position_bias` `[B, H, Lq, Lk]` (already scaled)."""
        bucket_index = layer_inputs
        scores = table_product(query, self.relative_key_table, self.per_head)  # [B, H, Lq, R]
        position_bias = scores.gather(-1, bucket_index.expand(*scores.shape[:2], *bucket_index.shape))
        if self.key_query:
            key_scores = table_product(key, self.relative_key_table, self.per_head)  # [B, H, Lk, R]
            key_index = bucket_index.T.expand(*key_scores.shape[:2], *bucket_index.T.shape)
            position_bias = position_bias + key_scores.gather(-1, key_index).transpose(-1, -2)
        kwargs = {"position_bias": position_bias.mul_(self.scaling)}  # in place: the gather made a new tensor
        if self.relative_value_table is not None:
            kwargs["relative_values"] = (bucket_index, self.relative_value_table, self.per_head)
        return query, key, kwargs


def table_product(query: torch.Tensor, table: torch.Tensor, per_head: bool) -> torch.Tensor:
    """`query [B, H, Lq, D]` times a relative table (`[R, D]` or `[H, R, D]`) transposed -> `[B, H, Lq, R]`."""
    if per_head:
        return torch.einsum("bhqd,hrd->bhqr", query, table.to(query.dtype))
    return query @ table.to(query.dtype).T


def relative_values_term(
    attn_weights: torch.Tensor, bucket_index: torch.Tensor, table: torch.Tensor, per_head: bool
) -> torch.Tensor:
    """Shaw's values term `Σ_j α_ij a^V[bucket(i, j)]`: probabilities `[B, H, Lq, Lk]` -> `[B, H, Lq, D]`.

    The probabilities of each row are summed into the `R` distance buckets (a scatter-add), then multiplied
    with the table: no `[Lq, Lk, D]` tensor is formed.
    """
    rows = table.shape[-2]
    index = bucket_index.expand_as(attn_weights)
    bucket_weights = attn_weights.new_zeros(*attn_weights.shape[:-1], rows).scatter_add_(-1, index, attn_weights)
    table = table.to(attn_weights.dtype)
    if per_head:
        return torch.einsum("bhqr,hrd->bhqd", bucket_weights, table)
    return bucket_weights @ table


# position_embedding_type -> (stack part, attention part)
POSITION_SCHEMES: dict[str, tuple[Callable[..., nn.Module], Callable[..., nn.Module]]] = {
    "relative": (RelativeBuckets, ShawRelativeAttention),
    "sinusoidal": (SinusoidalPositions, NoAttentionPositions),
    "learned": (LearnedPositions, NoAttentionPositions),
    "rotary": (RotaryPositions, RotaryAttentionPositions),
    "none": (NoStackPositions, NoAttentionPositions),
}
