"""Relformer's attention engine: the mask, the backends, and how a position scheme's terms reach them.

- `AttentionMask` says which keys each query may see (causal or not, the keys already in the cache, padding, or a
  caller's 4-D mask). A stack builds one per forward (and one for its cross-attention); each backend renders it as it
  needs: additive rows (eager, SDPA) or a block mask (flex attention).
- A position scheme's attention part returns `PositionTerms` for one layer and forward: a bias for a block of query
  rows, the same bias as a flex `score_mod`, and a term added to the output, computed from the probabilities (eager)
  or from the kernel's log-sum-exp (flex): Shaw's values. The engine merges bias and mask; schemes never see the mask.
- Every backend is a function of one signature, `(module, query, key, value, attention_mask, scaling, dropout,
  position, **kwargs) -> (output [B, Lq, H, D], probabilities [B, H, Lq, Lk] or None)`, found in transformers'
  attention interface: `ALL_ATTENTION_FUNCTIONS` below is a local `AttentionInterface` (as transformers' Doge
  model has one) whose "eager", "sdpa" and "flex_attention" are Relformer's, since transformers' own functions take
  neither a mask description nor a values term. Adding a backend means adding a function here.

Eager and SDPA run a bias scheme over blocks of query rows (`in_query_blocks`), so that a long input never holds an
`[L, L]` bias; flex attention reads the terms from `O(L·R)` tensors and needs no blocks.
This file is shipped with every saved checkpoint (remote code): it imports only torch and transformers.
"""

import functools
from collections.abc import Callable

import torch
from torch import nn
from transformers.integrations.flex_attention import compile_friendly_flex_attention, get_flex_attention_lse_kwargs
from transformers.masking_utils import and_masks
from transformers.modeling_utils import AttentionInterface

FLEX_ATTENTION = "flex_attention"

# Bias schemes run in blocks of query rows whose position bias `[B, H, rows, Lk]` has at most BLOCK_ELEMENTS elements
# (2 MB in fp32), so that memory grows like L, not L², beyond short inputs; but never fewer than MIN_BLOCK_ROWS rows,
# below which per-block overhead dominates (measured: a forward at L = 8192 took 15.8 s with 8-row blocks, 9.7 s with
# 32-row blocks).
BLOCK_ELEMENTS = 2**19
MIN_BLOCK_ROWS = 32


NO_MASK = object()  # a built block mask that allows every pair (None: not built yet)


class AttentionMask:
    """Which keys each query of one forward may attend to, described once per stack and rendered per backend.

    Queries sit at `past_length + arange(query_length)`, keys at `arange(key_length)`. `causal`: a query sees the keys
    at or before its own position. `padding` `[B, key_length]` (True = token) or None; `custom`: a 4-D mask given by
    the caller (`[B or 1, 1 or H, Lq, >= Lk]`, bool True = attend, or additive 0 = attend), used as it is.
    """

    def __init__(
        self,
        batch: int,
        query_length: int,
        key_length: int,
        causal: bool,
        past_length: int | torch.Tensor = 0,
        padding: torch.Tensor | None = None,
        custom: torch.Tensor | None = None,
    ):
        self.batch, self.query_length, self.key_length = batch, query_length, key_length
        self.causal, self.past_length, self.padding, self.custom = causal, past_length, padding, custom
        self._block_mask = None

    @classmethod
    def of(
        cls,
        attention_mask: torch.Tensor | None,
        batch: int,
        query_length: int,
        key_length: int,
        causal: bool,
        past_length: int | torch.Tensor = 0,
    ) -> "AttentionMask":
        """From a forward's `attention_mask`: 2-D `[B, <= key_length]` (1 = token; keys past its end, such as a static
        cache's empty slots, are not tokens), 4-D (kept as `custom`), or None (every key is a token)."""
        padding = custom = None
        if attention_mask is not None and attention_mask.dim() == 4:
            custom = attention_mask
        elif attention_mask is not None:
            tokens = attention_mask.bool()
            if torch.compiler.is_compiling() or tokens.shape[1] < key_length or not bool(tokens.all()):
                padding = nn.functional.pad(tokens, (0, max(0, key_length - tokens.shape[1])))[:, :key_length]
        return cls(batch, query_length, key_length, causal, past_length, padding, custom)

    def key_stop(self, stop: int) -> int:
        """How many keys the queries before `stop` can see: a causal block reads only the keys up to its last query."""
        if self.causal and self.custom is None and isinstance(self.past_length, int):
            return min(self.past_length + stop, self.key_length)
        return self.key_length

    def allowed(self, start: int, stop: int, key_stop: int, device: torch.device) -> torch.Tensor | None:
        """Bool `[B or 1, 1 or H, stop - start, key_stop]` (True = attend) for queries start..stop-1 against keys
        0..key_stop-1, or None when every pair is allowed."""
        if self.custom is not None:
            rows = self.custom[:, :, start:stop, :key_stop]
            return rows if rows.dtype == torch.bool else rows == 0
        allowed = None
        past = self.past_length
        if self.causal and not (isinstance(past, int) and key_stop <= past + start + 1):
            query_positions = torch.arange(start, stop, device=device)[:, None] + past
            allowed = (torch.arange(key_stop, device=device) <= query_positions)[None, None]
        if self.padding is not None:
            tokens = self.padding[:, None, None, :key_stop]
            allowed = tokens if allowed is None else allowed & tokens
        return allowed

    def additive(self, start: int, stop: int, key_stop: int, dtype: torch.dtype, device) -> torch.Tensor | None:
        """The same as `allowed`, as 0 (attend) and the dtype's minimum (masked), to add to the scores."""
        if self.custom is not None and self.custom.dtype != torch.bool:
            return self.custom[:, :, start:stop, :key_stop].to(dtype)
        allowed = self.allowed(start, stop, key_stop, device)
        if allowed is None:
            return None
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)

    def is_plain_causal(self, start: int) -> bool:
        """Whether the only masking of the queries from `start` on is causal with query i at key i (no cache, the
        first block), which a kernel's own `is_causal` does. Compares no sizes (compiling keeps them symbolic)."""
        plain = self.causal and self.custom is None and self.padding is None and isinstance(self.past_length, int)
        return plain and self.past_length == 0 and start == 0

    def mask_mod(self) -> Callable | None:
        """flex attention's `mask_mod(b, h, q_idx, kv_idx) -> allowed`, or None when every pair is allowed."""
        if self.custom is not None:
            allowed = self.allowed(0, self.query_length, self.key_length, self.custom.device)[:, 0]
            allowed = allowed.expand(self.batch, self.query_length, self.key_length)
            return lambda b, h, q_idx, kv_idx: allowed[b, q_idx, kv_idx]
        padding, past = self.padding, self.past_length
        if self.causal and padding is not None:
            return lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx + past) & padding[b, kv_idx]
        if self.causal:
            return lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + past
        if padding is not None:
            return lambda b, h, q_idx, kv_idx: padding[b, kv_idx]
        return None

    def block_mask(self, device: torch.device):
        """flex attention's `BlockMask` of `mask_mod` (built once per forward), or None when every pair is allowed."""
        if self._block_mask is None:
            mask_mod = self.mask_mod()
            self._block_mask = NO_MASK if mask_mod is None else self.block_mask_of(mask_mod, device)
        return None if self._block_mask is NO_MASK else self._block_mask

    def block_mask_of(self, mask_mod: Callable, device: torch.device):
        """A `BlockMask` of any `mask_mod` over this forward's queries and keys. Compiled off CPU, as transformers
        builds it (no `[B, Lq, Lk]` tensor); on CPU not (compiling costs seconds per new shape, and the unfused CPU
        kernel holds the scores anyway)."""
        from torch.nn.attention.flex_attention import create_block_mask

        compile_it = device.type != "cpu" and not torch.compiler.is_compiling()
        return create_block_mask(
            mask_mod, self.batch, None, self.query_length, self.key_length, device=device, _compile=compile_it
        )


class PositionTerms:
    """What a position scheme adds to one attention call (one layer, one forward), made by its attention part after
    the cache update from the queries `[B, H, Lq, D]` and all keys `[B, H_kv, Lk, D]`. A scheme overrides what it
    adds: `adds_bias` (`bias` and `score_mod`), `adds_values` (`values` and `values_from_lse`)."""

    adds_bias = False
    adds_values = False

    def bias(self, start: int, stop: int, key_stop: int) -> torch.Tensor:
        """The term added to the scaled scores of queries start..stop-1 against keys 0..key_stop-1:
        `[B or 1, H, stop - start, key_stop]`."""
        raise NotImplementedError

    def score_mod(self) -> Callable:
        """flex attention's form of `bias`: `score_mod(score, b, h, q_idx, kv_idx)`, reading tensors of `O(L·R)`
        elements (never `[Lq, Lk]`). Written with broadcasting indexing, so it runs on index tensors of any shape."""
        raise NotImplementedError

    def values(self, probabilities: torch.Tensor, start: int, stop: int, key_stop: int) -> torch.Tensor:
        """The term added to the output `[B, H, rows, D]` of a block of rows, from its probabilities
        `[B, H, rows, key_stop]`."""
        raise NotImplementedError

    def values_from_lse(self, lse: torch.Tensor, mask_mod: Callable | None, lse_of: Callable) -> torch.Tensor:
        """The same term for all rows `[B, H, Lq, D]` from flex attention's log-sum-exp `[B, H, Lq]` of the scaled,
        modified, masked scores (`mask_mod`: its mask, None for every key); `lse_of(region_mask_mod)` runs the kernel
        again for the log-sum-exp over the allowed keys of a region."""
        raise NotImplementedError


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """`[B, H_kv, L, D]` -> `[B, H_kv * n_rep, L, D]` for grouped-query attention."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, length, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, length, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, length, head_dim)


def masked_bias(
    bias: torch.Tensor | None, attention_mask: AttentionMask, start: int, stop: int, key_stop: int, query: torch.Tensor
) -> torch.Tensor | None:
    """The position bias plus the mask's additive rows: one term `[B or 1, H or 1, rows, key_stop]` for the kernel."""
    mask = attention_mask.additive(start, stop, key_stop, query.dtype, query.device)
    if mask is None:
        return None if bias is None else bias.to(query.dtype)
    return mask if bias is None else bias.to(query.dtype) + mask


def in_query_blocks(kernel: Callable) -> Callable:
    """An attention function from `kernel(module, query, key, value, attention_mask, start, stop, bias, scaling,
    dropout) -> (output [B, H, rows, D], probabilities [B, H, rows, keys] or None)` for one block of query rows.
    A scheme with a bias runs in blocks of at most `BLOCK_ELEMENTS` bias elements (one block unless the input is
    long), each against the keys it can see; anything else in one call. Adds the scheme's values term."""

    @functools.wraps(kernel)
    def attend(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: AttentionMask,
        scaling: float,
        dropout: float = 0.0,
        position: PositionTerms | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = repeat_kv(key, module.num_key_value_groups)
        value = repeat_kv(value, module.num_key_value_groups)
        (batch, heads, query_length), key_length = query.shape[:3], key.shape[2]
        rows = query_length
        if position is not None and position.adds_bias:
            rows = max(min(MIN_BLOCK_ROWS, query_length), BLOCK_ELEMENTS // (batch * heads * key_length))
        outputs, weights = [], []
        for start in range(0, query_length, rows):
            stop = min(start + rows, query_length)
            key_stop = attention_mask.key_stop(stop)
            bias = position.bias(start, stop, key_stop) if position is not None and position.adds_bias else None
            output, probabilities = kernel(
                module, query[:, :, start:stop], key[:, :, :key_stop], value[:, :, :key_stop], attention_mask,
                start, stop, bias, scaling, dropout,
            )  # fmt: skip
            if position is not None and position.adds_values:
                output = output + position.values(probabilities, start, stop, key_stop)
            outputs.append(output)
            if probabilities is not None:  # as they are where no keys are missing (retain_grad() reaches them)
                missing = key_length - key_stop
                weights.append(nn.functional.pad(probabilities, (0, missing)) if missing else probabilities)
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        probabilities = None
        if weights:
            probabilities = weights[0] if len(weights) == 1 else torch.cat(weights, dim=2)
        return output.transpose(1, 2), probabilities

    return attend


@in_query_blocks
def eager_attention(module, query, key, value, attention_mask, start, stop, bias, scaling, dropout):
    """Scores, plus bias and mask, softmax in at least fp32, dropout, times the values: the probabilities are kept
    (for `output_attentions` and a values term)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    term = masked_bias(bias, attention_mask, start, stop, key.shape[2], query)
    if term is not None:
        scores = scores + term
    if scores.dtype == torch.float16:  # fp16's min plus a negative score is -inf: a row of them would give NaN
        scores = scores.clamp(min=torch.finfo(torch.float16).min)
    # at least fp32 (fp64 stays fp64: its mask minimum would be -inf in fp32 and a padded row's NaN would spread)
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
    probabilities = nn.functional.softmax(scores, dim=-1, dtype=softmax_dtype).to(query.dtype)
    probabilities = nn.functional.dropout(probabilities, p=dropout, training=module.training)
    return torch.matmul(probabilities, value), probabilities


@in_query_blocks
def sdpa_attention(module, query, key, value, attention_mask, start, stop, bias, scaling, dropout):
    """torch's `scaled_dot_product_attention` with the bias and mask as one additive term (its own causal mode when
    the mask is plainly causal and there is no bias, which lets it skip the masked half)."""
    is_causal = bias is None and attention_mask.is_plain_causal(start)
    term = None if is_causal else masked_bias(bias, attention_mask, start, stop, key.shape[2], query)
    output = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=term, dropout_p=dropout, is_causal=is_causal, scale=scaling
    )
    # torch picks its kernel by the inputs (a mask that needs gradients: the math one), and the kernels lay their
    # outputs out differently; a tracer (torch.export, ONNX) that records one kernel's strides and runs another's
    # would then reshape a view that does not exist. A plain `[B, H, rows, D]` copy has one layout for every kernel.
    return output.clone(memory_format=torch.contiguous_format), None


def flex_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: AttentionMask,
    scaling: float,
    dropout: float = 0.0,
    position: PositionTerms | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """torch's flex attention: the mask as a block mask, the bias as a `score_mod`, a values term from the kernel's
    log-sum-exp. On an accelerator no `[L, L]` tensor exists; on CPU torch runs it unfused and has no backward."""
    check_flex_can_run(module, query, key, value, dropout)
    score_mod = position.score_mod() if position is not None and position.adds_bias else None
    adds_values = position is not None and position.adds_values
    block_mask = attention_mask.block_mask(query.device)
    output, lse = run_flex_attention(query, key, value, score_mod, block_mask, scaling, adds_values)
    if adds_values:
        mask_mod = attention_mask.mask_mod()

        def lse_of(region: Callable) -> torch.Tensor:
            region = region if mask_mod is None else and_masks(mask_mod, region)
            region_mask = attention_mask.block_mask_of(region, query.device)
            return run_flex_attention(query, key, value, score_mod, region_mask, scaling, True)[1]

        output = output + position.values_from_lse(lse, mask_mod, lse_of)
    return output.transpose(1, 2), None


def run_flex_attention(query, key, value, score_mod, block_mask, scaling: float, return_lse: bool):
    """torch's flex attention -> (output `[B, H, Lq, D]`, log-sum-exp `[B, H, Lq]` fp32 or None). Compiled (once,
    by transformers' wrapper) off CPU; on CPU unfused, since torch's compiled CPU kernel returns no log-sum-exp."""
    from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

    kwargs = {
        "score_mod": score_mod,
        "block_mask": block_mask,
        "scale": scaling,
        "enable_gqa": query.shape[1] != key.shape[1],
        **get_flex_attention_lse_kwargs(return_lse),
    }
    if query.device.type == "cpu" or torch.compiler.is_compiling():
        result = torch_flex_attention(query, key, value, **kwargs)
    else:
        result = compile_friendly_flex_attention(query, key, value, training=torch.is_grad_enabled(), **kwargs)
    if not return_lse:
        return result, None
    output, aux = result
    return output, getattr(aux, "lse", aux)  # torch >= 2.9 returns an AuxOutput, older torch the lse itself


def check_flex_can_run(module: nn.Module, query, key, value, dropout: float) -> None:
    """Raise for what flex attention cannot do: attention dropout, and gradients on CPU (no backward there)."""
    config = module.config
    others = " or ".join(repr(name) for name in config.position_scheme.backends(config) if name != FLEX_ATTENTION)
    if dropout > 0:
        raise ValueError(
            f"attn_implementation='flex_attention' has no attention dropout (config.attention_dropout={dropout}): "
            f"call model.eval(), set attention_dropout=0, or use {others}."
        )
    if query.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise NotImplementedError(
            "attn_implementation='flex_attention' cannot train on CPU: torch has no flex attention backward there. "
            f"Train with attn_implementation={others} (model.set_attn_implementation(...)) or on a GPU; on CPU, "
            "flex attention runs inference (under torch.no_grad())."
        )


def registered_function(function: Callable) -> Callable:
    """An attention function registered in transformers' registry by someone else (a serving engine's: vLLM and
    SGLang register theirs), called as transformers calls it: the mask as transformers' bool mask `[B or 1, 1, Lq, Lk]`
    (True = attend), or None when only causal masking is needed, which such a function does itself (it reads
    `module.is_causal`). It takes q, k and v alone: a scheme with position terms is refused before it gets here."""

    @functools.wraps(function)
    def attend(module, query, key, value, attention_mask: AttentionMask, scaling: float, dropout: float = 0.0,
               position: PositionTerms | None = None, **kwargs):  # fmt: skip
        if position is not None:
            raise ValueError(f"{function.__name__} takes q, k and v alone: it cannot add a position term.")
        (query_length, key_length), device = (query.shape[2], key.shape[2]), query.device
        only_causal = attention_mask.is_plain_causal(0)
        mask = None if only_causal else attention_mask.allowed(0, query_length, key_length, device)
        return function(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)

    return attend


class RelformerAttentionInterface(AttentionInterface):
    """transformers' registry (`AttentionInterface`), with Relformer's own functions under the names of the backends
    they implement (a local override: other models keep transformers' own), and every other registered function
    reached through `registered_function`. The attention layer looks its backend up here."""

    def get_interface(self, attn_implementation: str, default: Callable) -> Callable:
        function = super().get_interface(attn_implementation, default)
        return function if attn_implementation in BACKENDS else registered_function(function)


# Relformer's backends, by the names transformers gives them, in order of preference for a config that cannot run the
# first choice of transformers (SDPA).
BACKENDS: dict[str, Callable] = {"eager": eager_attention, "sdpa": sdpa_attention, FLEX_ATTENTION: flex_attention}
# The backends that can add a values term to the output (they have the probabilities, or the log-sum-exp).
VALUES_TERM_BACKENDS = ("eager", FLEX_ATTENTION)

ALL_ATTENTION_FUNCTIONS = RelformerAttentionInterface()
for _name, _function in BACKENDS.items():
    ALL_ATTENTION_FUNCTIONS[_name] = _function


def backends(values_term: bool = False) -> tuple[str, ...]:
    """The names of Relformer's backends; with `values_term`, of those that can add a values term."""
    return tuple(name for name in BACKENDS if not values_term or name in VALUES_TERM_BACKENDS)


def is_registered_elsewhere(attn_implementation: str) -> bool:
    """Whether a name is a function registered in transformers' registry by someone else (a serving engine): neither
    one of Relformer's backends nor one of transformers' own kernels (flash and paged attention, which need hardware
    and flags of their own and are not run by Relformer)."""
    own = attn_implementation in BACKENDS or attn_implementation.startswith(("flash_attention", "paged|"))
    return not own and attn_implementation in AttentionInterface()  # the global registry


def checked_backend(attn_implementation: str | dict | None, config) -> str | dict | None:
    """The backend a config asks for, checked: one of Relformer's that its position scheme supports (all, or those
    that can add a values term, e.g. for relative values: such a config runs the first, eager, by itself), or, for a
    scheme without position terms in attention, any other function registered in transformers' registry (a serving
    engine's). Anything else raises `ValueError`, in transformers' words, then with the ones this config can use.
    None (no choice) stays None where transformers' default (SDPA) can run."""
    scheme = config.position_scheme
    supported = scheme.backends(config)
    restricted = supported != backends()  # an option that needs more than every backend gives (relative values)
    if attn_implementation is None and restricted:
        return supported[0]
    if not isinstance(attn_implementation, str) or attn_implementation in supported:  # None, or per sub-config
        return attn_implementation
    refused = f'Specified `attn_implementation="{attn_implementation}"` is not supported.'
    runs = " or ".join(map(repr, supported))
    if is_registered_elsewhere(attn_implementation) and not scheme.runs_registered_functions(config):
        raise ValueError(
            f"{refused} position_embedding_type={config.position_embedding_type!r} adds position terms to attention, "
            f"which {attn_implementation!r} (a function that takes q, k and v alone, as a serving engine's) would "
            f"drop: the model would return wrong outputs. This config runs with {runs}."
        )
    if restricted:
        raise ValueError(f"{refused} attn_implementation={attn_implementation!r} {scheme.backend_reason(config)}")
    if not is_registered_elsewhere(attn_implementation):
        raise ValueError(
            f"{refused} Relformer runs this config (position_embedding_type={config.position_embedding_type!r}) "
            f"with {runs}."
        )
    return attn_implementation
