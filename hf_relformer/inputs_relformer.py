"""A forward's inputs: checks that raise `ValueError` naming the input and what it must be, where torch or
transformers would fail with an opaque index or shape error (or read another row on a GPU), and the key/value
cache's two names.

This file is shipped with every saved checkpoint (remote code): it imports only torch and transformers.
"""

import dataclasses
import functools
import warnings
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

# ---------------------------------------------------------------------------------------------------------------
# The key/value cache's name. transformers 5.24 renamed it from `past_key_values` to `cache`: `generate()` passes
# `cache=...` and reads `outputs.cache` (5.23: `past_key_values`). Every forward here takes `cache` and also accepts
# `past_key_values` (`takes_either_cache_name`): silently on 5.23, with the deprecation warning of transformers' own
# models from 5.24 on; outputs carry the cache in the installed version's field (`with_cache`, `cache_of`). This
# section is the only code that knows both names.
# ---------------------------------------------------------------------------------------------------------------

CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
LEGACY_CACHE_NAME = "past_key_values"


def takes_either_cache_name(forward: Callable) -> Callable:
    """Decorates a `forward(..., cache=None, ...)` so that callers may pass the cache as `past_key_values` too (its
    name before transformers 5.24, still used by code written for it). Where the installed transformers renamed it,
    that name gets the FutureWarning its own models give (GPT-2's `deprecate_kwarg`), in their words."""

    @functools.wraps(forward)
    def forward_taking_either_name(self, *args, **kwargs):
        if LEGACY_CACHE_NAME in kwargs:
            if CACHE_NAME != LEGACY_CACHE_NAME and not torch.compiler.is_compiling():
                warnings.warn(
                    f"`{LEGACY_CACHE_NAME}` is deprecated for `{type(self).__name__}.{forward.__name__}` (transformers "
                    f"5.24 renamed it). Use `{CACHE_NAME}` instead.",
                    FutureWarning,
                    stacklevel=2,
                )
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


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------


def check_token_inputs(
    config,
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
