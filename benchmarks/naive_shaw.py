"""A naive Shaw et al. (2018) relative attention, for comparison only: it gathers the full `[Lq, Lk, d]` tensor of
relative embeddings, as the paper's equations read. Never used by the model."""

import math

import torch


def naive_shaw_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_table: torch.Tensor, max_distance: int
) -> torch.Tensor:
    """Causal attention with relative keys. query/key/value `[B, H, L, D]`, key_table `[k + 1, D]` (distances -k..0).
    Returns `[B, H, L, D]`."""
    length, head_dim = query.shape[2], query.shape[3]
    positions = torch.arange(length, device=query.device)
    distance = positions[None, :] - positions[:, None]  # j - i
    rows = distance.clamp(-max_distance, 0) + max_distance
    a_key = key_table[rows]  # [L, L, D]: the tensor a memory-efficient implementation never builds
    scores = query @ key.transpose(-1, -2) + torch.einsum("bhid,ijd->bhij", query, a_key)
    scores = (scores / math.sqrt(head_dim)).masked_fill(distance > 0, float("-inf"))
    return scores.softmax(-1) @ value


def skewed_relative_logits(query: torch.Tensor, key_table: torch.Tensor, max_distance: int) -> torch.Tensor:
    """The keys term `q_i·a_{clip(j-i)}` of a causal model by Huang et al.'s (2018) skew: `q` times one table row per
    distance -(L-1)..0 (`[B, H, L, L]`, column c = distance c - (L-1)), then pad, reshape and slice so that entry
    (i, j) lands at distance j - i. Entries above the diagonal (j > i) are meaningless (masked in attention).
    query `[B, H, L, D]`, key_table `[k + 1, D]` -> `[B, H, L, L]`."""
    batch, heads, length, _ = query.shape
    distances = torch.arange(-(length - 1), 1, device=query.device).clamp(-max_distance, 0) + max_distance
    relative = query @ key_table[distances].T  # [B, H, L, L]
    padded = torch.nn.functional.pad(relative, (1, 0))  # [B, H, L, L + 1]
    return padded.reshape(batch, heads, length + 1, length)[:, :, 1:, :]


def gathered_relative_logits(query: torch.Tensor, key_table: torch.Tensor, max_distance: int) -> torch.Tensor:
    """The same keys term as the model computes it: `q @ a^Kᵀ` over the k + 1 table rows (`[B, H, L, k + 1]`), then one
    gather with the clipped-distance index. query `[B, H, L, D]` -> `[B, H, L, L]`."""
    length = query.shape[2]
    positions = torch.arange(length, device=query.device)
    index = (positions[None, :] - positions[:, None]).clamp(-max_distance, 0) + max_distance
    scores = query @ key_table.T
    return scores.gather(-1, index.expand(*scores.shape[:2], length, length))
