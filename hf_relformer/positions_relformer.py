"""Position schemes of Relformer: one `PositionScheme` object per scheme, registered in `POSITION_SCHEMES`.

A scheme owns what a model needs of it: its name, the config fields it reads (their checks), its two modules, the
attention backends it supports, its weight init, its model-card settings, its maximum length and the names of its
tensors (for conversion). Nothing outside this file asks which scheme a model uses. What only the library needs (the
named variants the tests, the demo and the benchmarks run, README's catalog) lives outside the shipped files.

- The *stack part* runs once per forward of a stack of layers:
  `forward(inputs_embeds, position_ids, past_length, key_length) -> (inputs_embeds, layer_inputs)`.
  Absolute schemes add their table to the embeddings here; rotary computes cos/sin; the bias schemes build a
  `DistanceGrid` (distances key - query, turned into what the scheme needs: a bucket index, a bias).
  `layer_inputs` is handed unchanged to every attention layer.
- The *attention part* lives in each self-attention module and has two hooks around the key/value cache update:
  `before_cache(query, key, layer_inputs) -> (query, key)` (rotary rotates q and k), and, after it, its forward
  `(query, all keys, layer_inputs) -> PositionTerms or None`: what the scheme adds to attention (a bias for a block
  of query rows, the same as a flex `score_mod`, and Shaw's values term from the probabilities or the log-sum-exp).
  The attention engine (`attention_relformer.py`) hands the terms to every backend and merges them with the mask;
  a scheme never sees the mask or the backend.

Adding a scheme means writing its parts, one `PositionScheme` subclass and one entry in `POSITION_SCHEMES`.
This file is shipped with every saved checkpoint (remote code): it imports only torch and transformers.
"""

import copy
import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from .attention_relformer import PositionTerms, backends


class NoStackPositions(nn.Module):
    """No position information at the stack level (used by `"none"` and `"relative"` embeddings)."""

    def __init__(self, config, causal: bool):
        super().__init__()

    def forward(self, inputs_embeds, position_ids, past_length, key_length):
        return inputs_embeds, None


class NoAttentionPositions(nn.Module):
    """No position term in attention (absolute schemes, `"none"`, and every cross-attention); the base of every
    attention part, with its two hooks around the key/value cache update: `before_cache` (rotary rotates q and k) and,
    after it, the module's forward, which returns the scheme's `PositionTerms` for this layer and forward (or None)."""

    terms: type[PositionTerms] | None = None  # the class of what its forward returns (None: nothing)

    def __init__(self, config, causal: bool):
        super().__init__()

    def before_cache(self, query, key, layer_inputs):
        """query `[B, H, Lq, D]`, this step's key `[B, H_kv, Lq, D]` -> (query, key), before the cache update."""
        return query, key

    def forward(self, query, key, layer_inputs) -> PositionTerms | None:
        """query `[B, H, Lq, D]`, all keys `[B, H_kv, Lk, D]` and the stack part's `layer_inputs` -> the terms this
        scheme adds to attention, or None. Called as the module, so that module hooks run around it (accelerate's
        offloading loads the tables only then): the terms compute from tables read here."""
        return None


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


class RotaryAttentionPositions(NoAttentionPositions):
    """Rotates queries and keys `[B, H, L, D]` by the cos/sin of their positions (before the cache update)."""

    def before_cache(self, query, key, layer_inputs):
        cos, sin = (t.unsqueeze(1) for t in layer_inputs)  # [B or 1, 1, L, D]
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin
        return query, key


class XposPositions(RotaryPositions):
    """xPos's stack part (Sun et al. 2023): rotary's cos/sin, and in a causal stack the decay `ζ^(n/γ)` `[B or 1,
    L, head_dim]` of each position n, per dimension pair i: `ζ_i = (2i/D + 0.4) / 1.4`, `γ = SCALE_BASE`. Queries are
    multiplied by it and keys divided, so `q_n·k_m` carries `ζ^((n - m)/γ)`: a decay with the distance, whatever
    position the cache starts from. Uncentred positions keep that exact with a cache; in fp32 `ζ^(n/γ)` stays in range
    up to about 20k positions. A bidirectional stack (an encoder-decoder's encoder) rotates only: the decay of a key
    after the query would grow."""

    SCALE_BASE = 512  # γ, the paper's

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        self.decay = causal

    def forward(self, inputs_embeds, position_ids, past_length, key_length):
        cos, sin = self.cos_sin(inputs_embeds, position_ids)
        if not self.decay:
            return inputs_embeds, (cos, sin, None)
        dim = self.config.head_dim
        zeta = (torch.arange(0, dim, 2, device=inputs_embeds.device, dtype=torch.float) + 0.4 * dim) / (1.4 * dim)
        scale = zeta ** (position_ids[..., None].float() / self.SCALE_BASE)  # [B or 1, L, D/2]
        return inputs_embeds, (cos, sin, torch.cat((scale, scale), dim=-1))


class XposAttentionPositions(RotaryAttentionPositions):
    """Rotates queries and keys as rotary does, then scales queries by xPos's decay and divides keys by it (before
    the cache update)."""

    def before_cache(self, query, key, layer_inputs):
        cos, sin, scale = layer_inputs
        query, key = super().before_cache(query, key, (cos, sin))
        if scale is None:
            return query, key
        scale = scale.unsqueeze(1)  # [B or 1, 1, L, D]
        return (query.float() * scale).to(query.dtype), (key.float() / scale).to(key.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Shaw relative positions
# ---------------------------------------------------------------------------------------------------------------


class DistanceGrid:
    """The distances `j - i` between the positions of the queries and keys of one forward, turned into what a bias
    scheme needs (a bucket index, or the bias itself), by blocks of query rows.

    Query k of this forward sits in cache slot `past_length + k` at `query_positions[:, k]`, the key in slot s at
    `key_positions[:, s]` (`[P, Lq]` and `[P, Lk]`, P = 1 when every row has the same positions, else the batch):
    the positions a forward is given (`position_ids`), so distance-based schemes see what the absolute ones see
    (randomized training positions included). `transform` maps the `[P, rows, keys]` distances to the scheme's
    `[P, rows, keys]` index or `[P, H, rows, keys]` bias, without gradients: it is shared by every layer. The whole
    grid is built once per forward when it is small (`WHOLE_LIMIT` elements) and sliced by every layer; beyond that,
    each block is built when a layer needs it, so a long input never holds an `[L, L]` grid. A learned lookup
    (`lookup`: index -> `[P, H, ..., keys]` bias, e.g. T5's table) runs at every read, inside the layer that reads it:
    activation checkpointing recomputes it with the layer, and no graph is shared between layers (a shared one is
    freed by the first layer's recomputation under reentrant checkpointing).
    """

    WHOLE_LIMIT = 2**18

    def __init__(
        self,
        query_positions: torch.Tensor,
        key_positions: torch.Tensor,
        past_length: int | torch.Tensor,
        transform: Callable,
        lookup: Callable | None = None,
    ):
        self.query_positions, self.key_positions, self.past_length = query_positions, key_positions, past_length
        (rows, self.query_length), self.key_length = query_positions.shape, key_positions.shape[1]
        self.transform, self.lookup, self.device = transform, lookup, query_positions.device
        self._line = self._line_offset = None
        small = rows * self.query_length * self.key_length <= self.WHOLE_LIMIT
        self.whole = self._build(0, self.query_length, self.key_length) if small else None

    @classmethod
    def of(
        cls,
        position_ids: torch.Tensor,
        past_length: int | torch.Tensor,
        key_length: int,
        transform: Callable,
        lookup: Callable | None = None,
    ) -> "DistanceGrid":
        """The grid of a forward whose queries have `position_ids` `[B or 1, Lq]`: the keys in the queries' own slots
        are at the queries' positions; the other slots (the cache's earlier tokens, a static cache's empty slots) are
        counted on from the first query, as the cache holds consecutive positions."""
        several = position_ids.shape[0] > 1 and not torch.compiler.is_compiling()
        if several and bool((position_ids == position_ids[:1]).all()):  # one row serves (generate passes [B, L])
            position_ids = position_ids[:1]
        query_length = position_ids.shape[1]
        if isinstance(past_length, int) and past_length == 0 and key_length == query_length:
            return cls(position_ids, position_ids, past_length, transform, lookup)
        slots = torch.arange(key_length, device=position_ids.device)
        key_positions = (slots - past_length + position_ids[:, :1]).contiguous()
        own_slots = (torch.arange(query_length, device=position_ids.device) + past_length).expand_as(position_ids)
        key_positions = key_positions.scatter(1, own_slots, position_ids)
        return cls(position_ids, key_positions, past_length, transform, lookup)

    def distances(self, start: int, stop: int, key_stop: int) -> torch.Tensor:
        """`[P, stop - start, key_stop]`: key minus query positions, queries start..stop-1, keys 0..key_stop-1."""
        return self.key_positions[:, None, :key_stop] - self.query_positions[:, start:stop, None]

    def block(self, start: int, stop: int, key_stop: int) -> torch.Tensor:
        """`[P, ..., stop - start, key_stop]`: queries start..stop-1 of this forward against keys 0..key_stop-1."""
        index = self.whole[..., start:stop, :key_stop] if self.whole is not None else self._build(start, stop, key_stop)
        return index if self.lookup is None else self.lookup(index)

    def with_lookup(self, lookup: Callable) -> "DistanceGrid":
        """This grid read through another `lookup` (a layer's own parameters), sharing what is built."""
        grid = copy.copy(self)
        grid.lookup = lookup
        return grid

    @property
    def line_offset(self) -> int:
        """The largest distance, either way, between a query and a key of this forward (found once): `line()` spans
        `-line_offset .. line_offset`."""
        if self._line_offset is None:
            queries, keys = self.query_positions, self.key_positions
            self._line_offset = max(int(keys.max() - queries.min()), int(queries.max() - keys.min()), 0)
        return self._line_offset

    def line(self) -> torch.Tensor:
        """The transform of every distance a query-key pair of this forward can have, `-span .. span`, as one row
        (`[1, 1, 2·span + 1]` index or `[1, H, 1, 2·span + 1]` bias), built once per forward: what flex attention's
        score_mods read instead of an `[Lq, Lk]` grid. `line_index` finds a pair's entry."""
        if self._line is None:
            distances = torch.arange(-self.line_offset, self.line_offset + 1, device=self.device)[None, None]
            with torch.no_grad():
                self._line = self.transform(distances)
        return self._line if self.lookup is None else self.lookup(self._line)

    def line_index(self, b: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """The entry of `line()` for row `b`'s query `q_idx` (counted in this forward) and key
        `kv_idx`: their distance, shifted by the span."""
        return self.position_distance(b, q_idx, kv_idx) + self.line_offset

    def position_distance(self, b: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Key position minus query position of row `b`'s query `q_idx` and key `kv_idx` (index tensors)."""
        return self.key_position(b, kv_idx) - self.query_position(b, q_idx)

    def query_position(self, b: torch.Tensor, q_idx: torch.Tensor) -> torch.Tensor:
        """The position of row `b`'s query `q_idx` (index tensors, as flex attention's score_mod gets them)."""
        return self.query_positions[b if self.query_positions.shape[0] > 1 else 0, q_idx]

    def key_position(self, b: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """The position of row `b`'s key `kv_idx`."""
        return self.key_positions[b if self.key_positions.shape[0] > 1 else 0, kv_idx]

    def _build(self, start: int, stop: int, key_stop: int) -> torch.Tensor:
        with torch.no_grad():
            return self.transform(self.distances(start, stop, key_stop))


class DistanceGridPositions(nn.Module):
    """The stack part of a bias scheme: a `DistanceGrid` shared by every layer of this forward, built from
    `self.transform` (distances `[P, rows, keys]` -> the scheme's index or bias, without gradients) and, for a learned
    table, `self.lookup` (index -> bias, read in each layer)."""

    lookup = None

    def __init__(self, config, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, inputs_embeds, position_ids, past_length, key_length):
        position_ids = position_ids.to(inputs_embeds.device)
        return inputs_embeds, DistanceGrid.of(position_ids, past_length, key_length, self.transform, self.lookup)

    def transform(self, distance: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
# Shaw relative positions
# ---------------------------------------------------------------------------------------------------------------


class RelativeBuckets(DistanceGridPositions):
    """The stack part of relative positions: the bucket index `clip(j - i, k) + k` of every query-key pair.

    A causal stack never attends to positive distances, so its tables have `k + 1` rows (distances -k..0) and
    positive distances map to row k (masked anyway); a bidirectional stack has `2k + 1` rows.
    """

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        self.max_distance = config.relative_attention_max_distance

    def transform(self, distance: torch.Tensor) -> torch.Tensor:
        k = self.max_distance
        return distance.clamp(-k, 0 if self.causal else k) + k


class ShawTerms(PositionTerms):
    """Shaw's terms for one layer and forward: the keys term `q_i·a^K[bucket(i, j)]` (plus `k_j·a^K` with
    `key_query`) gathered from `[B, H, L, R]` products, and with a values table the values term
    `Σ_j α_ij a^V[bucket(i, j)]`, from the probabilities or from flex attention's log-sum-exp."""

    adds_bias = True

    def __init__(self, part: "ShawRelativeAttention", query, key, grid, query_scores, key_scores, value_table):
        self.per_head, self.max_distance, self.causal, self.scaling = (
            part.per_head, part.max_distance, part.causal, part.scaling
        )  # fmt: skip
        self.query, self.key, self.grid = query, key, grid
        self.query_scores, self.key_scores, self.value_table = query_scores, key_scores, value_table
        self.adds_values = value_table is not None

    def bias(self, start, stop, key_stop):
        bucket_index = self.grid.block(start, stop, key_stop)[:, None]  # [P, 1, rows, keys]
        scores = self.query_scores[:, :, start:stop]
        position_bias = scores.gather(-1, bucket_index.expand(*scores.shape[:2], *bucket_index.shape[2:]))
        if self.key_scores is not None:
            key_scores = self.key_scores[:, :, :key_stop]
            key_index = bucket_index.transpose(-1, -2)
            key_index = key_index.expand(*key_scores.shape[:2], *key_index.shape[2:])
            position_bias = position_bias + key_scores.gather(-1, key_index).transpose(-1, -2)
        return position_bias

    def score_mod(self):
        """Adds `(q_i·a^K)[bucket(i, j)]` (and `k_j·a^K` with `key_query`), read from the `[B, H, L, R]` products."""
        grid, bucket = self.grid, self.grid.line()[0, 0]  # [2·span + 1]: the bucket of each distance
        scores, key_scores = self.query_scores, self.key_scores

        def add_relative_keys(score, b, h, q_idx, kv_idx):
            index = bucket[grid.line_index(b, q_idx, kv_idx)]
            score = score + scores[b, h, q_idx, index].to(score.dtype)
            if key_scores is not None:
                score = score + key_scores[b, h, kv_idx, index].to(score.dtype)
            return score

        return add_relative_keys

    def values(self, probabilities, start, stop, key_stop):
        bucket_index = self.grid.block(start, stop, key_stop)
        return relative_values_term(probabilities, bucket_index, self.value_table, self.per_head)

    def values_from_lse(self, lse, mask_mod, lse_of):
        """Without the probabilities `α`: only keys within distance `k - 1` have buckets of their own (a band of
        `W = k` keys causal, `2k - 1` bidirectional); their probabilities are `exp(score - lse)` with the band's scores
        recomputed (`O(Lq·W·D)`); the clipped buckets get the rest: causal `1 - Σ band`, bidirectional the mass at
        distances `<= -k` (a second kernel call, `lse_of`) and `1 - Σ band - that` (distances `>= k`)."""
        query, key, grid, k = self.query, self.key, self.grid, self.max_distance
        (batch, heads, query_length, _), key_length = query.shape, key.shape[2]
        if key.shape[1] != heads:  # grouped-query attention: head h reads key head h // (H / H_kv)
            key = key.repeat_interleave(heads // key.shape[1], dim=1)
        device = query.device
        offsets = torch.arange(1 - k, 1 if self.causal else k, device=device)  # band distances; bucket = offset + k
        q_idx = torch.arange(query_length, device=device)[:, None]
        kv_idx = q_idx + grid.past_length + offsets  # [Lq, W]
        inside = (kv_idx >= 0) & (kv_idx < key_length)
        kv_idx = kv_idx.clamp(0, key_length - 1)
        band_keys = key[:, :, kv_idx]  # [B, H, Lq, W, D]
        scores = torch.einsum("bhqd,bhqwd->bhqw", query, band_keys).float() * self.scaling  # as the kernel scales
        b = torch.arange(batch, device=device)[:, None, None, None]
        h = torch.arange(heads, device=device)[None, :, None, None]
        scores = self.score_mod()(scores, b, h, q_idx[None, None], kv_idx[None, None])
        allowed = inside if mask_mod is None else inside & mask_mod(b, h, q_idx[None, None], kv_idx[None, None])
        lse = lse.float()
        seen = torch.isfinite(lse)[..., None]  # a query that sees no key at all (a causal pad) has lse = -inf
        band = torch.where(allowed & seen, torch.exp(scores - lse.where(seen[..., 0], 0.0)[..., None]), 0.0)
        beyond = 1.0 - band.sum(-1)
        # the band's buckets from the positions (consecutive ones: offset + k; sorted random ones may clip inside it)
        band_buckets = grid.transform(grid.key_positions[:, kv_idx] - grid.query_positions[:, :, None])[:, None]
        bucket_weights = band.new_zeros(*band.shape[:-1], self.value_table.shape[-2])  # [B, H, Lq, R]
        bucket_weights.scatter_add_(-1, band_buckets.expand_as(band), band)
        if self.causal:
            bucket_weights[..., 0] += beyond
        else:
            far_region = lambda b, h, q_idx, kv_idx: kv_idx - q_idx - grid.past_length <= -k  # noqa: E731
            far = torch.exp(lse_of(far_region).float() - lse.where(seen[..., 0], 0.0)) * seen[..., 0]
            bucket_weights[..., 0] += far
            bucket_weights[..., -1] += beyond - far
        return relative_values_term_of_buckets(bucket_weights, self.value_table, self.per_head).to(query.dtype)


class ShawRelativeAttention(NoAttentionPositions):
    """The relative tables of one self-attention layer and the keys term they add.

    `relative_key_table` (and `relative_value_table` when `relative_attention_values`) have shape
    `[R, head_dim]` shared by all heads (Shaw), or `[H, R, head_dim]` per head (Music Transformer), with
    `R = k + 1` (causal) or `2k + 1` (bidirectional). With `relative_attention_key_query` the keys term also gets
    the key-side product `k_j·a_ij` (same table; encoders only).
    """

    terms = ShawTerms

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        k = config.relative_attention_max_distance
        rows = k + 1 if causal else 2 * k + 1
        shape = (
            (config.num_attention_heads, rows, config.head_dim)
            if config.relative_attention_per_head
            else (rows, config.head_dim)
        )
        self.per_head, self.num_heads = config.relative_attention_per_head, config.num_attention_heads
        self.key_query = config.relative_attention_key_query
        self.max_distance, self.causal = k, causal
        self.scaling = attention_scaling(config)
        self.relative_key_table = nn.Parameter(torch.empty(shape))
        self.relative_value_table = nn.Parameter(torch.empty(shape)) if config.relative_attention_values else None

    def forward(self, query, key, grid) -> ShawTerms:
        """query `[B, H, Lq, D]`, all keys `[B, H_kv, Lk, D]` and the stack's bucket-index `DistanceGrid` -> the keys
        term's products with the tables `[B, H, L, R]` (scaled), from which every block's bias is gathered."""
        key_table, value_table = self.relative_key_table, self.relative_value_table
        if self.per_head:  # this rank's heads under tensor parallelism
            heads = local_heads(query, self.num_heads)
            key_table, value_table = key_table[heads], None if value_table is None else value_table[heads]
        query_scores = table_product(query, key_table, self.per_head) * self.scaling
        key_scores = None
        if self.key_query:
            key_scores = table_product(key, key_table, self.per_head) * self.scaling
        return self.terms(self, query, key, grid, query_scores, key_scores, value_table)


def attention_scaling(config) -> float:
    """The factor of the attention scores: `head_dim**-0.5`, or 1 with `scale_attention_scores=False` (T5)."""
    return config.head_dim**-0.5 if getattr(config, "scale_attention_scores", True) else 1.0


def local_heads(query: torch.Tensor, total: int) -> slice:
    """Which of the model's `total` heads `query [B, H, Lq, D]` holds: all of them, or under tensor parallelism
    (q/k/v sharded by heads, transformers' `tp_plan`) this rank's contiguous share, the tensor-parallel rank being
    the innermost index of the process mesh (`rank % shards`), as transformers lays its mesh out."""
    heads = query.shape[1]
    if heads == total:
        return slice(None)
    shard = torch.distributed.get_rank() % (total // heads)
    return slice(shard * heads, (shard + 1) * heads)


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
    index = bucket_index[:, None].expand_as(attn_weights)  # [P, rows, keys] -> [B, H, rows, keys]
    bucket_weights = attn_weights.new_zeros(*attn_weights.shape[:-1], rows).scatter_add_(-1, index, attn_weights)
    return relative_values_term_of_buckets(bucket_weights, table, per_head)


def relative_values_term_of_buckets(bucket_weights: torch.Tensor, table: torch.Tensor, per_head: bool) -> torch.Tensor:
    """The probability mass of each distance bucket `[B, H, Lq, R]` times the values table -> `[B, H, Lq, D]`."""
    table = table.to(bucket_weights.dtype)
    if per_head:
        return torch.einsum("bhqr,hrd->bhqd", bucket_weights, table)
    return bucket_weights @ table


# ---------------------------------------------------------------------------------------------------------------
# Scalar biases per head: T5's bucketed table and ALiBi's linear slopes
# ---------------------------------------------------------------------------------------------------------------


class GridTerms(PositionTerms):
    """The bias of a `DistanceGrid` that holds it (`[P, H, rows, keys]` per block, `[1, H, 1, 2·span + 1]` as its
    line)."""

    adds_bias = True

    def __init__(self, grid, dtype: torch.dtype, heads: slice = slice(None)):
        self.grid, self.dtype, self.heads = grid, dtype, heads  # heads: this rank's, under tensor parallelism

    def bias(self, start, stop, key_stop):
        return self.grid.block(start, stop, key_stop)[:, self.heads].to(self.dtype)  # [P, H, rows, keys]

    def score_mod(self):
        """Adds the bias of each pair's distance, read from the grid's `[H, 2·span + 1]` line."""
        grid, bias = self.grid, self.grid.line()[0, self.heads, 0].to(self.dtype)

        def add_bias(score, b, h, q_idx, kv_idx):
            return score + bias[h, grid.line_index(b, q_idx, kv_idx)].to(score.dtype)

        return add_bias


class GridBias(NoAttentionPositions):
    """The attention part of a scheme whose stack part computes the bias itself (`[P, H, rows, keys]` per block of the
    `DistanceGrid`): the same bias for every layer of the stack, added to the scores."""

    terms = GridTerms

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        self.num_heads = config.num_attention_heads

    def forward(self, query, key, grid) -> GridTerms:
        return self.terms(grid, query.dtype, local_heads(query, self.num_heads))


def t5_relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of the distance `j - i` (Raffel et al. 2020), exactly as transformers'
    `T5Attention._relative_position_bucket` (from Mesh TensorFlow's `_relative_position_bucket`) computes it.

    Bidirectional: half the buckets for keys after the query. Of the buckets of one direction, the first half hold
    the distances 0, 1, ... exactly; the other half grow logarithmically up to `max_distance`, and every larger
    distance shares the last bucket. Unidirectional (a decoder): distances `j > i` fall in bucket 0 (masked anyway).
    """
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    return relative_buckets + torch.where(is_small, relative_position, relative_position_if_large)


class T5Buckets(DistanceGridPositions):
    """The stack part of T5's bias: one learned scalar per head and bucket (`relative_attention_bias`,
    `[num_buckets, H]`), the same for every layer of the stack, as T5 computes it in its first layer and passes it
    on; the bucket index is built once per forward, the table read in each layer (see `DistanceGrid`).
    Bidirectional buckets in an encoder, unidirectional in a decoder."""

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.relative_attention_bias = nn.Embedding(self.num_buckets, config.num_attention_heads)

    def transform(self, distance: torch.Tensor) -> torch.Tensor:
        return t5_relative_position_bucket(distance, not self.causal, self.num_buckets, self.max_distance)

    def lookup(self, buckets: torch.Tensor) -> torch.Tensor:
        """Bucket index `[P, rows, keys]` -> bias `[P, H, rows, keys]`."""
        return self.relative_attention_bias(buckets).permute(0, 3, 1, 2)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Press et al. (2022)'s head slopes `[H]`: for `n` heads, a power of two, the geometric sequence
    `2^(-8/n), 2^(-16/n), ..., 2^(-8)`; otherwise the slopes of the closest power of two below `n`, then every other
    slope of twice that many heads, as many as are missing (the rule of the paper's code). Computed as BLOOM's
    `build_alibi_tensor` computes them (fp32 powers of the base), so converted BLOOM checkpoints agree exactly."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        extra_powers = torch.arange(1, 1 + 2 * min(closest, num_heads - closest), 2, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(extra_base, extra_powers)])
    return slopes


class AlibiSlopes(DistanceGridPositions):
    """The stack part of ALiBi: the bias `-m_h·|j - i|` `[P, H, rows, keys]`, one slope `m_h` per head (a non-persistent
    buffer). A causal stack sees only `j <= i`, where this is Press et al.'s `-m·(i - j)`; an encoder sees both sides
    (the symmetric form). The same bias serves every layer of the stack."""

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        self.num_heads = config.num_attention_heads
        self.register_buffer("slopes", alibi_slopes(self.num_heads), persistent=False)

    def transform(self, distance: torch.Tensor) -> torch.Tensor:
        slopes = self.slopes.float().to(distance.device)  # fp32 even in a half-precision model
        return -slopes[:, None, None] * distance.abs()[:, None]  # [P, H, rows, keys]


class Distances(DistanceGridPositions):
    """The stack part of a scheme whose layers turn the distances into a bias with parameters of their own: the
    distances `j - i` `[P, rows, keys]` themselves."""

    def transform(self, distance: torch.Tensor) -> torch.Tensor:
        return distance


class KerpleBias(NoAttentionPositions):
    """KERPLE's logarithmic kernel (Chi et al. 2022) in one layer: the bias `-r1·log(1 + r2·|j - i|)` with `r1`
    (`kerple_power`) and `r2` (`kerple_scale`) learned per head, clamped at `EPS` from below as the paper's code does.
    The paper defines it with `|j - i|`: a causal stack sees `j <= i`, an encoder both sides (the symmetric form)."""

    terms = GridTerms
    EPS = 1e-2

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        self.num_heads = config.num_attention_heads
        self.kerple_power = nn.Parameter(torch.empty(self.num_heads))
        self.kerple_scale = nn.Parameter(torch.empty(self.num_heads))

    def forward(self, query, key, grid) -> GridTerms:
        heads = local_heads(query, self.num_heads)  # this rank's, under tensor parallelism
        power = self.kerple_power[heads].float().clamp(min=self.EPS)[:, None, None]
        scale = self.kerple_scale[heads].float().clamp(min=self.EPS)[:, None, None]

        def kernel(distance: torch.Tensor) -> torch.Tensor:  # [P, rows, keys] -> [P, H, rows, keys]
            return -power * torch.log1p(scale * distance.abs()[:, None])

        return self.terms(grid.with_lookup(kernel), query.dtype)


class FireTerms(PositionTerms):
    """FIRE's bias for one layer and forward, from the grid's distances and query positions: by blocks of query rows
    (the MLP runs on `[P, rows, keys, width]`, never on the whole `[Lq, Lk]`), and as a flex `score_mod` that
    computes the MLP per score, unit by unit."""

    adds_bias = True

    def __init__(self, part: "FireBias", grid: DistanceGrid, heads: slice, dtype: torch.dtype):
        self.grid, self.dtype, self.eps = grid, dtype, part.EPS
        self.log_scale = part.fire_log_scale.float()[0]  # c
        self.threshold = (part.fire_threshold_scale.float()[0] * part.THRESHOLD).abs()  # L
        self.hidden_weight, self.hidden_bias = part.fire_hidden_weight.float(), part.fire_hidden_bias.float()
        self.output_weight = part.fire_output_weight[heads].float()  # [H, width]: this rank's heads
        self.output_bias = part.fire_output_bias[heads].float()
        self._line_bias = self._queries_below = None

    def normalized(self, distance: torch.Tensor, query_position: torch.Tensor) -> torch.Tensor:
        """`ψ(|j - i|) / ψ(max(L, i))`, `ψ(x) = log(1 + |c·x|)`, of broadcastable distances and query positions."""
        c = self.log_scale
        numerator = torch.log1p((c * distance).abs())
        return numerator / (torch.log1p((c * torch.maximum(query_position, self.threshold)).abs()) + self.eps)

    def mlp(self, inputs: torch.Tensor) -> torch.Tensor:
        """`f`: normalized distances `[...]` -> `[..., H]`."""
        hidden = torch.relu(inputs[..., None] * self.hidden_weight + self.hidden_bias)  # [..., width]
        return hidden @ self.output_weight.T + self.output_bias

    def bias(self, start, stop, key_stop):
        distance = self.grid.block(start, stop, key_stop)  # [P, rows, keys]
        if self.below_threshold(stop):  # max(L, i) = L: a function of the distance, read off one line
            bias = self.line_bias()[:, distance + self.grid.line_offset]  # [H, P, rows, keys]
            return bias.transpose(0, 1).to(self.dtype)
        query_position = self.grid.query_positions[:, start:stop, None].float()
        bias = self.mlp(self.normalized(distance.float(), query_position))  # [P, rows, keys, H]
        return bias.permute(0, 3, 1, 2).to(self.dtype)

    def below_threshold(self, stop: int) -> bool:
        """Whether every query before `stop` sits below the threshold L; how many leading queries do is found once per
        layer and forward (eager only: a compiled forward computes the MLP for every pair)."""
        if torch.compiler.is_compiling():
            return False
        if self._queries_below is None:
            past = (self.grid.query_positions >= self.threshold.detach()).any(0)  # [Lq]
            self._queries_below = int(torch.cat([past, past.new_ones(1)]).int().argmax())  # the first past L, or Lq
        return stop <= self._queries_below

    def line_bias(self) -> torch.Tensor:
        """`[H, 2·span + 1]`: the bias of every distance of this forward for a query below L, computed once."""
        if self._line_bias is None:
            distances = self.grid.line()[0, 0].float()  # the distances themselves (FIRE's stack part keeps them)
            self._line_bias = self.mlp(self.normalized(distances, torch.zeros((), device=distances.device))).T
        return self._line_bias

    def score_mod(self):
        """Adds the MLP's output for the pair, as a sum over the hidden units (elementwise, as the fused kernel
        needs)."""
        grid, hidden_weight, hidden_bias = self.grid, self.hidden_weight, self.hidden_bias
        output_weight, output_bias = self.output_weight, self.output_bias

        def add_fire_bias(score, b, h, q_idx, kv_idx):
            distance = grid.position_distance(b, q_idx, kv_idx).float()
            inputs = self.normalized(distance, grid.query_position(b, q_idx).float())
            bias = output_bias[h]
            for unit in range(hidden_weight.shape[0]):
                bias = bias + output_weight[h, unit] * torch.relu(inputs * hidden_weight[unit] + hidden_bias[unit])
            return score + bias.to(self.dtype).to(score.dtype)

        return add_fire_bias


class FireBias(NoAttentionPositions):
    """FIRE (Li et al. 2023, "Functional Interpolation for Relative Positions") in one layer: the bias
    `f(ψ(|j - i|) / ψ(max(L, i)))` with `ψ(x) = log(1 + |c·x|)` and `f` an MLP `1 -> WIDTH (ReLU) -> H` (one output
    per head); `c` (`fire_log_scale`) and the threshold `L = |THRESHOLD · fire_threshold_scale|` learned, initialised
    as the community implementation (mcleish7/arithmetic) does: c = 0.1, L = 512 times a learned 1.0, the MLP as
    torch's `nn.Linear`. Each layer has its own (as KERPLE here; one shared by the layers, as T5's table, is not
    offered). Causal stacks see `j <= i`, as the paper defines it; an encoder sees both sides through `|j - i|`
    (symmetric, as KERPLE and ALiBi here), with the normalizer of the query's own position."""

    terms = FireTerms
    WIDTH = 32
    THRESHOLD = 512.0
    EPS = 1e-6

    def __init__(self, config, causal: bool):
        super().__init__(config, causal)
        self.num_heads = config.num_attention_heads
        self.fire_log_scale = nn.Parameter(torch.empty(1))
        self.fire_threshold_scale = nn.Parameter(torch.empty(1))
        self.fire_hidden_weight = nn.Parameter(torch.empty(self.WIDTH))
        self.fire_hidden_bias = nn.Parameter(torch.empty(self.WIDTH))
        self.fire_output_weight = nn.Parameter(torch.empty(self.num_heads, self.WIDTH))
        self.fire_output_bias = nn.Parameter(torch.empty(self.num_heads))

    def forward(self, query, key, grid) -> FireTerms:
        return self.terms(self, grid, local_heads(query, self.num_heads), query.dtype)


# ---------------------------------------------------------------------------------------------------------------
# The schemes
# ---------------------------------------------------------------------------------------------------------------


class PositionScheme:
    """One position scheme, whole: what the config, the model, the converters, the tests, the demo and the
    benchmarks need to know about it. Subclasses set the class attributes and override what differs."""

    name = ""
    stack_part: type[nn.Module] = NoStackPositions
    attention_part: type[nn.Module] = NoAttentionPositions
    sizes: tuple[str, ...] = ()  # positive-integer config fields it reads (the config checks them)
    switches: tuple[str, ...] = ()  # boolean config fields it reads; True needs this scheme
    parameter_names: tuple[str, ...] = ()  # fragments of the names of its tensors (for conversion)
    # its modules whose parameters attention reads by head, named from its parts ("attention", "stack.<child>"):
    # tensor parallelism replicates them (each rank reads its heads' rows) and sums their gradients over the ranks
    per_head_modules: tuple[str, ...] = ()
    translation_invariant = False  # the outputs depend only on distances: shifting every position changes nothing
    absolute = False  # positions come from `position_ids` (so those change the outputs)

    @property
    def settings(self) -> tuple[str, ...]:
        """The config fields of this scheme alone (what a converter may set for it)."""
        return self.sizes + self.switches

    def check(self, config) -> None:
        """Raise `ValueError` naming the field for a config this scheme cannot be built with."""

    def backends(self, config) -> tuple[str, ...]:
        """The attention implementations this scheme can run with this config (the attention engine's; when some are
        missing, the first is the default)."""
        return backends()

    def backend_reason(self, config) -> str:
        """Why a backend missing from `backends` is missing (for the error message)."""
        return ""

    def card_settings(self, config) -> str:
        """This scheme's settings in a model card's architecture table (its horizon, buckets, slopes, ...)."""
        return "none"

    def max_length(self, config) -> int | None:
        """How many positions a model of this scheme can read (a table past which it cannot), or None: any length."""
        return None

    def runs_registered_functions(self, config) -> bool:
        """Whether any attention function registered in transformers' registry (one that takes q, k and v alone, as a
        serving engine's) runs this scheme: yes when its positions act on the embeddings or on q and k, no when it adds
        position terms to attention."""
        return self.attention_part.terms is None

    def init_weights(self, module: nn.Module, std: float) -> None:
        """Initialise this scheme's tensors in `module` (called for every module of the model)."""

    def is_parameter(self, name: str) -> bool:
        """Whether the tensor `name` of a Relformer state dict belongs to this scheme."""
        return any(fragment in name for fragment in self.parameter_names)


def _require_even(config, size: int, what: str) -> None:
    if size % 2:
        raise ValueError(
            f"position_embedding_type={config.position_embedding_type!r} needs an even {what}, got {size}."
        )


class RelativeScheme(PositionScheme):
    """Shaw et al. 2018: learned tables of clipped distances for the keys (and values); per head: Huang et al. 2018."""

    name = "relative"
    stack_part = RelativeBuckets
    attention_part = ShawRelativeAttention
    sizes = ("relative_attention_max_distance",)
    switches = ("relative_attention_values", "relative_attention_per_head", "relative_attention_key_query")
    parameter_names = (".position.relative_",)
    per_head_modules = ("attention",)
    translation_invariant = True

    def check(self, config) -> None:
        if config.relative_attention_key_query and (config.is_decoder or config.is_encoder_decoder):
            raise ValueError(
                "relative_attention_key_query=True is supported in encoders only (is_decoder=False, "
                "is_encoder_decoder=False)."
            )
        if config.relative_attention_key_query and config.num_key_value_heads != config.num_attention_heads:
            raise ValueError("relative_attention_key_query=True needs num_key_value_heads == num_attention_heads.")

    def backends(self, config) -> tuple[str, ...]:
        return backends(values_term=config.relative_attention_values)

    def card_settings(self, config) -> str:
        terms = "keys and values" if config.relative_attention_values else "keys"
        tables = "a table per head" if config.relative_attention_per_head else "tables shared by the heads"
        return f"k = {config.relative_attention_max_distance}; {terms}; {tables}"

    def backend_reason(self, config) -> str:
        return (
            "cannot compute the relative values term (relative_attention_values=True needs the attention "
            f"probabilities or their log-sum-exp): use {' or '.join(map(repr, self.backends(config)))}, or set "
            "relative_attention_values=False."
        )

    def init_weights(self, module: nn.Module, std: float) -> None:
        if isinstance(module, ShawRelativeAttention):
            init.normal_(module.relative_key_table, mean=0.0, std=std)
            if module.relative_value_table is not None:
                init.normal_(module.relative_value_table, mean=0.0, std=std)


class SinusoidalScheme(PositionScheme):
    """Vaswani et al. 2017: a fixed sin/cos table added to the token embeddings."""

    name = "sinusoidal"
    stack_part = SinusoidalPositions
    absolute = True

    def check(self, config) -> None:
        _require_even(config, config.hidden_size, "hidden_size")

    def card_settings(self, config) -> str:
        return "fixed sin/cos table, any length"

    def init_weights(self, module: nn.Module, std: float) -> None:
        if isinstance(module, SinusoidalPositions):
            init.copy_(module.inv_freq, module.compute_inv_freq())


class LearnedScheme(PositionScheme):
    """Vaswani et al. 2017, Gehring et al. 2017: a learned table added to the token embeddings."""

    name = "learned"
    stack_part = LearnedPositions
    parameter_names = ("embed_positions.",)
    absolute = True

    def card_settings(self, config) -> str:
        return f"{config.max_position_embeddings} learned positions"

    def max_length(self, config) -> int | None:
        return config.max_position_embeddings


class RotaryScheme(PositionScheme):
    """Su et al. 2021 (RoFormer): q and k rotated by their positions, every rope type of transformers."""

    name = "rotary"
    stack_part = RotaryPositions
    attention_part = RotaryAttentionPositions
    translation_invariant = True

    def check(self, config) -> None:
        _require_even(config, config.head_dim, "head_dim (hidden_size / num_attention_heads)")
        rope = config.rope_parameters
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_parameters['rope_type'] must be one of {', '.join(map(repr, ROPE_TYPES))}; got {rope_type!r}."
            )
        theta = rope.get("rope_theta")
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
            raise ValueError(f"rope_parameters['rope_theta'] must be a positive number, got {theta!r}.")
        try:  # transformers' own check of the keys each rope_type needs (e.g. 'factor')
            config.validate_rope()
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"rope_parameters {rope!r} are invalid: {error}") from None

    def card_settings(self, config) -> str:
        rope = config.rope_parameters
        extra = "".join(f", {key} {value}" for key, value in rope.items() if key not in ("rope_type", "rope_theta"))
        return f"rope_type {rope.get('rope_type', 'default')}, θ = {rope.get('rope_theta')}{extra}"

    def init_weights(self, module: nn.Module, std: float) -> None:
        if isinstance(module, RotaryPositions):
            inv_freq = module.compute_inv_freq()[0]
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)


class XposScheme(RotaryScheme):
    """Sun et al. 2023 (xPos, "A Length-Extrapolatable Transformer"): rotary with a per-dimension exponential decay
    of the distance; causal (decoder-only, and an encoder-decoder's decoder; its encoder rotates only)."""

    name = "xpos"
    stack_part = XposPositions
    attention_part = XposAttentionPositions

    def check(self, config) -> None:
        super().check(config)
        if not config.is_decoder and not config.is_encoder_decoder:
            raise ValueError(
                "position_embedding_type='xpos' is causal: its decay ζ^((n - m)/γ) grows without bound for keys after "
                "the query, so an encoder (is_decoder=False) cannot use it. Use 'rotary' (xPos without the decay) or "
                "an encoder-decoder, whose decoder gets xPos."
            )
        if config.rope_parameters.get("rope_type", "default") != "default":
            raise ValueError(
                "position_embedding_type='xpos' takes rope_parameters with rope_type 'default' (its own decay "
                f"replaces the scaling types), got {config.rope_parameters.get('rope_type')!r}."
            )

    def card_settings(self, config) -> str:
        return f"θ = {config.rope_parameters.get('rope_theta')}, decay ζ^((n - m)/{XposPositions.SCALE_BASE})"


class T5Scheme(PositionScheme):
    """Raffel et al. 2020 (T5): a learned scalar per head and log-spaced distance bucket."""

    name = "t5"
    stack_part = T5Buckets
    attention_part = GridBias
    sizes = ("relative_attention_num_buckets", "relative_attention_max_distance")
    parameter_names = ("embed_positions.relative_attention_bias.",)
    per_head_modules = ("stack.relative_attention_bias",)
    translation_invariant = True

    def check(self, config) -> None:
        buckets, distance = config.relative_attention_num_buckets, config.relative_attention_max_distance
        if buckets < 4 or distance <= buckets // 2:  # T5's log spacing divides by log(max_distance / exact ones)
            raise ValueError(
                "position_embedding_type='t5' needs relative_attention_num_buckets >= 4 and "
                "relative_attention_max_distance above the distances bucketed exactly (num_buckets / 2 in a decoder, "
                f"num_buckets / 4 in an encoder); got {buckets} and {distance}."
            )

    def card_settings(self, config) -> str:
        return (
            f"{config.relative_attention_num_buckets} buckets per head up to distance "
            f"{config.relative_attention_max_distance}"
        )

    def init_weights(self, module: nn.Module, std: float) -> None:
        if isinstance(module, T5Buckets):
            init.normal_(module.relative_attention_bias.weight, mean=0.0, std=std)


class AlibiScheme(PositionScheme):
    """Press et al. 2022 (ALiBi): a fixed slope per head times the distance."""

    name = "alibi"
    stack_part = AlibiSlopes
    attention_part = GridBias
    translation_invariant = True

    def card_settings(self, config) -> str:
        slopes = alibi_slopes(config.num_attention_heads)
        return f"fixed slopes per head {', '.join(f'{float(m):.4g}' for m in slopes)}"

    def init_weights(self, module: nn.Module, std: float) -> None:
        if isinstance(module, AlibiSlopes):
            init.copy_(module.slopes, alibi_slopes(module.num_heads))


class KerpleScheme(PositionScheme):
    """Chi et al. 2022 (KERPLE, its log variant): a learned kernel of the distance per head and layer."""

    name = "kerple"
    stack_part = Distances
    attention_part = KerpleBias
    parameter_names = (".position.kerple_",)
    per_head_modules = ("attention",)
    translation_invariant = True

    def card_settings(self, config) -> str:
        return "-r1·log(1 + r2·|i - j|), r1 and r2 learned per head and layer"

    def init_weights(self, module: nn.Module, std: float) -> None:
        if isinstance(module, KerpleBias):  # as the paper's code: r1 ~ U(0, 2), r2 ~ U(0, 1)
            init.uniform_(module.kerple_power, 0.0, 2.0)
            init.uniform_(module.kerple_scale, 0.0, 1.0)


class FireScheme(PositionScheme):
    """Li et al. 2023 (FIRE): a learned MLP of the log distance, normalized by the log query position, per layer."""

    name = "fire"
    stack_part = Distances
    attention_part = FireBias
    parameter_names = (".position.fire_",)
    per_head_modules = ("attention",)

    def card_settings(self, config) -> str:
        return (
            f"MLP 1→{FireBias.WIDTH}→H of log(1 + c·|i - j|) / log(1 + c·max(L, i)), c and L learned per layer "
            f"(init 0.1 and {FireBias.THRESHOLD:g})"
        )

    def init_weights(self, module: nn.Module, std: float) -> None:
        if isinstance(module, FireBias):  # as the community code: nn.Linear's own init, c = 0.1, L = 512 · 1.0
            init.constant_(module.fire_log_scale, 0.1)
            init.constant_(module.fire_threshold_scale, 1.0)
            init.uniform_(module.fire_hidden_weight, -1.0, 1.0)  # 1 / sqrt(fan_in = 1)
            init.uniform_(module.fire_hidden_bias, -1.0, 1.0)
            bound = 1 / math.sqrt(module.WIDTH)
            init.uniform_(module.fire_output_weight, -bound, bound)
            init.uniform_(module.fire_output_bias, -bound, bound)


class NoPositionScheme(PositionScheme):
    """Haviv et al. 2022: no positions (causal masking alone)."""

    name = "none"
    translation_invariant = True


# Every rotary variant of the installed transformers (dynamic and longrope update their frequencies at run time).
ROPE_TYPES = ("default", *ROPE_INIT_FUNCTIONS)

# position_embedding_type -> its scheme
POSITION_SCHEMES: dict[str, PositionScheme] = {
    scheme.name: scheme
    for scheme in (
        RelativeScheme(),
        SinusoidalScheme(),
        LearnedScheme(),
        RotaryScheme(),
        NoPositionScheme(),
        T5Scheme(),
        AlibiScheme(),
        KerpleScheme(),
        XposScheme(),
        FireScheme(),
    )
}
