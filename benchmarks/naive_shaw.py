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
