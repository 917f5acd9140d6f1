"""Sanity checks a training job runs on its own models, so that a broken decoding path fails loudly instead of
producing a table of zeros (e.g. a transformers release that passes the key/value cache under a name the model
does not read: cached decoding then sees only the newest token)."""

import torch
import transformers

from .modeling_relformer import RelformerForCausalLM


class DecodingCheckError(RuntimeError):
    """Cached generation disagrees with an uncached forward: the model's decoding path is broken."""


@torch.no_grad()
def check_cached_decoding(
    model: RelformerForCausalLM, input_ids: torch.Tensor, max_new_tokens: int = 8, tolerance: float = 1e-3
) -> float:
    """Greedy cached `generate()` from `input_ids` `[B, L]` (no padding) returns the logits of every step; one
    forward without a cache over the generated sequences must give the same logits (to `tolerance`, relative to their
    scale). Returns the largest difference; raises `DecodingCheckError` naming the cause otherwise."""
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
            return_dict_in_generate=True, output_logits=True, pad_token_id=model.config.pad_token_id,
        )  # fmt: skip
        cached = torch.stack(out.logits, dim=1).float()
        uncached = model(out.sequences[:, :-1], use_cache=False).logits[:, input_ids.shape[1] - 1 :].float()
    finally:
        model.train(was_training)
    difference = float((cached - uncached).abs().max())
    if not difference <= tolerance * max(1.0, float(uncached.abs().max())):
        raise DecodingCheckError(
            f"cached generate() disagrees with an uncached forward (largest logit difference {difference:.3g}): the "
            f"key/value cache is not used as it should be with transformers {transformers.__version__}; results "
            "computed with generate() would be wrong, so the run was stopped."
        )
    return difference
