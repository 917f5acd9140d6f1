"""The performance comparisons P1-P7 of the developers' performance notes, measured side by side in one run, and the
deployment ones: P10 (compiled static-cache decoding) and P11 (int8 weights).

    python -m benchmarks [--quick] [--only P1,P4] [--output benchmarks/results.json] [--threads 2]

Every time is the median of interleaved runs (A B A B ..., after a warm-up) of the two sides in this process, with
the same shapes, dtype (fp32 unless a row says int8) and thread count; every memory figure is the growth of the peak
resident set size while one forward (or forward+backward) runs, in a fresh subprocess per case. Prints a table
`id, what, ours, theirs, ratio, target, ok` and writes the same rows as JSON. `--only` replaces the rows of its cases
in the output file and keeps the others (a file of the other mode, full or --quick, is refused).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import hf_relformer  # noqa: F401  (registers the Auto classes)
from hf_relformer import (
    RelformerConfig,
    RelformerForCausalLM,
    RelformerForConditionalGeneration,
    RelformerModel,
)
from hf_relformer.attention_relformer import AttentionMask
from hf_relformer.saving import write_atomically
from hf_relformer.variants import scheme_variants, with_horizon

from .naive_shaw import gathered_relative_logits, naive_shaw_attention, skewed_relative_logits

MAX_DISTANCE = 64
SHAPES = {
    # the developers' "small-but-real" shape, and a smaller one for --quick
    "full": dict(vocab_size=32000, hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
    "quick": dict(vocab_size=8000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024),
}
SCHEMES = scheme_variants(featured_only=True)  # every scheme, and relative with values


@dataclass
class Row:
    id: str
    what: str
    ours: float
    theirs: float
    unit: str
    ratio: float
    target: str  # "<= x": ours/theirs at most x; ">= x": at least x; "report": a figure to report, no target
    ok: bool | None  # None for "report"


def make_row(case_id: str, what: str, ours: float, theirs: float, unit: str, target: str) -> Row:
    ratio = ours / theirs
    if target == "report":
        ok = None
    else:
        bound = float(target.split()[1])
        ok = ratio <= bound if target.startswith("<=") else ratio >= bound
    return Row(case_id, what, round(ours, 6), round(theirs, 6), unit, round(ratio, 3), target, ok)


# ---------------------------------------------------------------------------------------------------------------
# Models of the same shape
# ---------------------------------------------------------------------------------------------------------------


def relformer_config(shape: dict, scheme: str, **overrides) -> RelformerConfig:
    values = dict(
        **shape,
        max_position_embeddings=8192,
        hidden_act="gelu_new",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    horizon = with_horizon(SCHEMES[scheme], overrides.get("relative_attention_max_distance", MAX_DISTANCE))
    return RelformerConfig(**values | horizon | overrides)


def relformer_lm(shape: dict, scheme: str, **overrides) -> RelformerForCausalLM:
    torch.manual_seed(0)
    config = relformer_config(shape, scheme, **overrides)
    attn = "eager" if config.relative_attention_values else "sdpa"
    return RelformerForCausalLM._from_config(config, attn_implementation=attn).eval()


def gpt2_lm(shape: dict) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=shape["vocab_size"],
        n_embd=shape["hidden_size"],
        n_layer=shape["num_hidden_layers"],
        n_head=shape["num_attention_heads"],
        n_inner=shape["intermediate_size"],
        n_positions=8192,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").eval()


def llama_lm(shape: dict) -> LlamaForCausalLM:
    """transformers' Llama of the same shape (hidden size, layers, heads, MLP size, vocabulary) and fp32, its output
    layer tied to the embeddings as Relformer's is. Its MLP is gated (3 matrices where Relformer's default has 2),
    RMSNorm and no biases: Llama's own architecture, not a copy of ours."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"], intermediate_size=shape["intermediate_size"],
        max_position_embeddings=8192, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def relformer_seq2seq(shape: dict) -> RelformerForConditionalGeneration:
    torch.manual_seed(0)
    config = relformer_config(shape, "relative", is_encoder_decoder=True, decoder_start_token_id=1)
    return RelformerForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def bart_seq2seq(shape: dict) -> BartForConditionalGeneration:
    torch.manual_seed(0)
    layers, heads = shape["num_hidden_layers"], shape["num_attention_heads"]
    config = BartConfig(
        vocab_size=shape["vocab_size"], d_model=shape["hidden_size"], encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=shape["intermediate_size"],
        decoder_ffn_dim=shape["intermediate_size"], max_position_embeddings=1024, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        forced_eos_token_id=None,
    )  # fmt: skip
    return BartForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def t5_seq2seq(shape: dict) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    heads = shape["num_attention_heads"]
    config = T5Config(
        vocab_size=shape["vocab_size"], d_model=shape["hidden_size"], d_kv=shape["hidden_size"] // heads,
        d_ff=shape["intermediate_size"], num_layers=shape["num_hidden_layers"], num_heads=heads, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    return T5ForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


# ---------------------------------------------------------------------------------------------------------------
# Timing: interleaved, warm-up first, median
# ---------------------------------------------------------------------------------------------------------------


def median_times(
    ours: Callable[[], object],
    theirs: Callable[[], object],
    repeats: int,
    warmup: tuple[Callable, Callable] | None = None,
) -> tuple[float, float]:
    """Median seconds of `repeats` interleaved runs of each side, after one warm-up run (or the `warmup` pair)."""
    for fn in warmup or (ours, theirs):
        fn()
    times_ours, times_theirs = [], []
    for _ in range(repeats):
        for fn, times in ((ours, times_ours), (theirs, times_theirs)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_ours), statistics.median(times_theirs)


def forward_backward(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    return step


def forward(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            model(input_ids=ids)

    return step


def greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, **kwargs) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs
            )
        assert out.shape[1] >= new_tokens

    return step


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its forward compiled whole, as README's "compiled decoding" does (with a static cache)."""
    model.forward = torch.compile(model.forward, fullgraph=True)
    return model


def no_recompile(step: Callable[[], None]) -> Callable[[], None]:
    """`step`, failing if torch.compile compiles anything while it runs: a timed run of a compiled model must reuse
    the graphs of its warm-up (a recompile, or a fallback to eager after too many, would be timed instead)."""

    def run() -> None:
        with torch._dynamo.config.patch(error_on_recompile=True):
            step()

    return run


def token_ids(batch: int, length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# The comparisons
# ---------------------------------------------------------------------------------------------------------------


def p1_relative_overhead(settings: dict) -> list[Row]:
    shape, length, repeats = settings["shape"], settings["train_length"], settings["repeats"]
    ids = token_ids(settings["train_batch"], length, shape["vocab_size"])
    ours = relformer_lm(shape, "relative").train()
    plain = relformer_lm(shape, "none").train()
    t_ours, t_plain = median_times(forward_backward(ours, ids), forward_backward(plain, ids), repeats)
    what = f"fwd+bwd causal LM, relative k={MAX_DISTANCE} vs no position term, L={length}"
    return [make_row("P1", what, t_ours, t_plain, "s", "<= 1.25")]


def attention_layer_step(
    shape: dict, scheme: str, length: int
) -> tuple[Callable[[], None], torch.nn.Module, torch.Tensor]:
    """One causal self-attention layer of `scheme` (its stack part first), forward and backward, at `length`: the
    step, the layer and its input `[1, length, hidden]`."""
    torch.manual_seed(0)
    stack = RelformerModel._from_config(relformer_config(shape, scheme), attn_implementation="sdpa")
    attention = stack.layers[0].self_attn
    hidden = torch.randn(1, length, stack.config.hidden_size)
    mask = AttentionMask.of(None, 1, length, length, causal=True)
    position_ids = torch.arange(length)[None]

    def step() -> None:
        hidden.grad = None
        hidden.requires_grad_(True)
        _, inputs = stack.embed_positions(hidden, position_ids, 0, length)
        attention(hidden, mask, inputs)[0].sum().backward()

    return step, attention, hidden


def p2_naive_shaw(settings: dict) -> list[Row]:
    length, repeats = settings["naive_length"], settings["repeats"]
    ours, attention, hidden = attention_layer_step(settings["shape"], "relative", length)
    config = attention.config

    def naive() -> None:
        hidden.grad = None
        hidden.requires_grad_(True)
        shape_ = (1, length, -1, config.head_dim)
        q, k, v = (
            p(hidden).view(shape_).transpose(1, 2) for p in (attention.q_proj, attention.k_proj, attention.v_proj)
        )
        table = attention.position.relative_key_table
        out = naive_shaw_attention(q, k, v, table, MAX_DISTANCE)
        attention.o_proj(out.transpose(1, 2).reshape(1, length, -1)).sum().backward()

    query = torch.randn(1, config.num_attention_heads, length, config.head_dim)
    table = attention.position.relative_key_table.detach()
    t_gather, t_skew = median_times(
        lambda: gathered_relative_logits(query, table, MAX_DISTANCE),
        lambda: skewed_relative_logits(query, table, MAX_DISTANCE),
        repeats,
    )
    t_ours, t_naive = median_times(ours, naive, repeats)
    rows = [
        make_row(
            "P2",
            f"relative attention layer fwd+bwd vs naive [L,L,d] Shaw, L={length}",
            t_ours,
            t_naive,
            "s",
            "<= 0.333",
        )
    ]
    memory = {
        kind: peak_memory({"case": "attention", "kind": kind, "length": length, "quick": settings["quick"]})
        for kind in ("ours", "naive", "none")
    }
    ours_term, naive_term = memory["ours"] - memory["none"], memory["naive"] - memory["none"]
    target = f"<= {1 / config.head_dim:.4f}"
    rows.append(
        make_row(
            "P2m", f"position-term peak memory of a forward vs naive, L={length}", ours_term, naive_term, "MB", target
        )
    )
    skew_what = f"keys term alone: gather (ours) vs the skew of Huang et al., L={length}"
    rows.append(make_row("P2s", skew_what, t_gather, t_skew, "s", "<= 1.0"))
    return rows


def p2f_fire(settings: dict) -> list[Row]:
    """FIRE's layer (an MLP of the normalized log distance, read off one line of distances for queries below its
    threshold L = 512 and computed per block of query rows beyond) against relative and ALiBi."""
    length, repeats = settings["naive_length"], settings["repeats"]
    steps = {
        scheme: attention_layer_step(settings["shape"], scheme, length)[0] for scheme in ("fire", "relative", "alibi")
    }
    rows = []
    for other in ("relative", "alibi"):
        t_fire, t_other = median_times(steps["fire"], steps[other], repeats)
        what = f"FIRE attention layer fwd+bwd vs {other}, L={length} (queries from 512 on are past FIRE's L = 512)"
        rows.append(make_row("P2F", what, t_fire, t_other, "s", "report"))
    return rows


def p3_gpt2_same_shape(settings: dict) -> list[Row]:
    shape, length, repeats = settings["shape"], settings["train_length"], settings["repeats"]
    ids = token_ids(settings["train_batch"], length, shape["vocab_size"])
    ours, gpt2 = relformer_lm(shape, "learned"), gpt2_lm(shape)
    t_ours, t_gpt2 = median_times(forward(ours, ids), forward(gpt2, ids), repeats)
    rows = [make_row("P3", f"forward, learned positions vs GPT2LMHeadModel, L={length}", t_ours, t_gpt2, "s", "<= 1.0")]
    ours.train(), gpt2.train()
    t_ours, t_gpt2 = median_times(forward_backward(ours, ids), forward_backward(gpt2, ids), repeats)
    rows.append(
        make_row("P3", f"fwd+bwd, learned positions vs GPT2LMHeadModel, L={length}", t_ours, t_gpt2, "s", "<= 1.0")
    )
    return rows


def p4_generation(settings: dict) -> list[Row]:
    shape, new_tokens, repeats = settings["shape"], settings["new_tokens"], settings["generate_repeats"]
    gpt2 = gpt2_lm(shape)
    rows = []
    for batch in settings["generate_batches"]:
        prompt = token_ids(batch, 16, shape["vocab_size"])
        for scheme in settings["generate_schemes"]:
            ours = relformer_lm(shape, scheme)
            warmup = (greedy(ours, prompt, 8), greedy(gpt2, prompt, 8))
            t_ours, t_gpt2 = median_times(
                greedy(ours, prompt, new_tokens), greedy(gpt2, prompt, new_tokens), repeats, warmup
            )
            tokens = batch * new_tokens
            what = f"greedy generate() tokens/s, {scheme}, batch {batch}, {new_tokens} new vs GPT-2"
            rows.append(make_row("P4", what, tokens / t_ours, tokens / t_gpt2, "tok/s", ">= 1.0"))
    return rows


@torch.no_grad()
def column_major(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with every nn.Linear weight stored column-major (`[in, out]` in memory, GPT-2's Conv1D layout):
    the layout 0.2.1 switched to during `generate()` (for comparison only; the model keeps nn.Linear's)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.weight.data = module.weight.data.t().contiguous().t()
    return model


def p4l_weight_layout(settings: dict) -> list[Row]:
    """What the stored (row-major) weight layout costs or saves, in decoding and in training time, against the
    column-major one (the CPU decode layout of 0.2.1, dropped for its traps: README, Performance). `<= 1.0`: the
    stored layout is no slower."""
    shape, new_tokens, repeats = settings["shape"], settings["new_tokens"], settings["generate_repeats"]
    stored, column = relformer_lm(shape, "relative"), column_major(relformer_lm(shape, "relative"))
    rows = []
    for batch in settings["generate_batches"]:
        prompt = token_ids(batch, 16, shape["vocab_size"])
        t_stored, t_column = median_times(
            greedy(stored, prompt, new_tokens), greedy(column, prompt, new_tokens), repeats
        )
        what = f"greedy generate() time, stored vs column-major weights, relative, batch {batch}, {new_tokens} new"
        rows.append(make_row("P4L", what, t_stored, t_column, "s", "<= 1.0"))
    ids = token_ids(settings["train_batch"], settings["train_length"], shape["vocab_size"])
    stored.train(), column.train()
    t_stored, t_column = median_times(forward_backward(stored, ids), forward_backward(column, ids), repeats)
    what = f"fwd+bwd, stored vs column-major weights, relative, L={settings['train_length']}"
    rows.append(make_row("P4L", what, t_stored, t_column, "s", "<= 1.0"))
    return rows


def p5_memory(settings: dict) -> list[Row]:
    rows = []
    for length in settings["memory_lengths"]:
        spec = {"case": "forward", "length": length, "quick": settings["quick"]}
        absolute = peak_memory(spec | {"scheme": "learned"})
        for scheme in ("relative", "fire"):  # FIRE: its MLP runs per block of query rows, never on [L, L, 32]
            ours = peak_memory(spec | {"scheme": scheme})
            what = f"peak memory growth of a forward, {scheme} vs learned, L={length}"
            rows.append(make_row("P5", what, ours, absolute, "MB", "<= 1.2"))
    return rows


def p6_flop_utilization(settings: dict) -> list[Row]:
    shape, length, repeats = settings["shape"], settings["mfu_length"], settings["repeats"]
    ids = token_ids(1, length, shape["vocab_size"])
    model = relformer_lm(shape, "relative").train()
    step = forward_backward(model, ids)
    size = 1024
    a, b = torch.randn(size, size), torch.randn(size, size)

    def matmul() -> None:
        for _ in range(8):
            a @ b

    t_step, t_matmul = median_times(step, matmul, repeats)
    machine = 8 * 2 * size**3 / t_matmul  # fp32 FLOP/s of this machine, measured now
    hidden, layers, inner = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    per_token = layers * (4 * hidden * hidden + 2 * hidden * inner) + hidden * shape["vocab_size"]  # matmul weights
    attention = layers * 2 * length * hidden  # q·k and α·v per token (causal: half of L², counted as full)
    flops = 3 * 2 * length * (per_token + attention)  # forward + backward (2x forward)
    achieved = flops / t_step
    what = f"model FLOP utilization, fwd+bwd L={length} (machine {machine / 1e9:.1f} GFLOP/s fp32 matmul)"
    return [make_row("P6", what, achieved / 1e9, machine / 1e9, "GFLOP/s", ">= 0.4")]


def p7_seq2seq(settings: dict) -> list[Row]:
    shape, new_tokens, repeats = settings["shape"], settings["seq2seq_tokens"], settings["generate_repeats"]
    source = token_ids(1, 32, shape["vocab_size"])
    ours = relformer_seq2seq(shape)
    rows = []
    for name, theirs in (("BART", bart_seq2seq(shape)), ("T5", t5_seq2seq(shape))):
        run_ours = greedy(ours, source, new_tokens, num_beams=4)
        run_theirs = greedy(theirs, source, new_tokens, num_beams=4)
        t_ours, t_theirs = median_times(run_ours, run_theirs, repeats)
        what = f"seq2seq generate() with 4 beams tokens/s, relative vs {name}, {new_tokens} new"
        rows.append(make_row("P7", what, new_tokens / t_ours, new_tokens / t_theirs, "tok/s", ">= 1.0"))
    return rows


def p10_compiled_decoding(settings: dict) -> list[Row]:
    """Greedy decoding with `model.forward = torch.compile(model.forward, fullgraph=True)` and
    `generate(..., cache_implementation="static")`, against transformers' Llama of the same shape compiled the same
    way, and against the same Relformer in eager mode with the default (dynamic) cache: what compiling buys.

    transformers compiles `generate()` by itself only on accelerators (`_valid_auto_compile_criteria`: CUDA, XPU, MPS,
    ...; on CPU only with the private `CompileConfig._compile_all_devices`), so the forward is compiled explicitly. The
    compiles (prefill and decode graphs) happen in the warm-up pair of `median_times`; a timed run that compiled
    again would fail (`no_recompile`)."""
    shape, new_tokens, repeats = settings["shape"], settings["compile_tokens"], settings["compile_repeats"]
    rows = []
    for batch in settings["compile_batches"]:
        torch._dynamo.reset()  # static graphs of this batch size, not a dynamic-batch graph after an earlier size
        prompt = token_ids(batch, 16, shape["vocab_size"])
        llama = greedy(compiled(llama_lm(shape)), prompt, new_tokens, cache_implementation="static")
        tokens = batch * new_tokens
        for scheme in settings["compile_schemes"]:
            ours = greedy(compiled(relformer_lm(shape, scheme)), prompt, new_tokens, cache_implementation="static")
            eager = greedy(relformer_lm(shape, scheme), prompt, new_tokens)
            started = time.monotonic()
            t_ours, t_llama = median_times(no_recompile(ours), no_recompile(llama), repeats, warmup=(ours, llama))
            print(f"  P10 {scheme}, batch {batch}: {time.monotonic() - started:.0f} s with the compiles", flush=True)
            what = f"compiled static-cache greedy tokens/s, {scheme}, batch {batch}, {new_tokens} new vs compiled Llama"
            what += " (gated MLP)"
            rows.append(make_row("P10", what, tokens / t_ours, tokens / t_llama, "tok/s", ">= 1.0"))
            t_ours, t_eager = median_times(no_recompile(ours), eager, repeats)
            what = f"compiled static-cache vs eager greedy tokens/s, {scheme}, batch {batch}, {new_tokens} new"
            rows.append(make_row("P10", what, tokens / t_ours, tokens / t_eager, "tok/s", "report"))
    torch._dynamo.reset()
    return rows


def torchao_int8(model: torch.nn.Module) -> torch.nn.Module:
    """torchao's int8 weight-only quantization of every nn.Linear (the tied output layer included; the embedding
    stays fp32): int8 weights with one fp32 scale per output row, fp32 activations."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())
    return model


def dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """torch's own (deprecated) dynamic quantization: every nn.Linear becomes an int8 x int8 layer that quantizes its
    activations per call (fbgemm)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "torch.ao.quantization is deprecated ..."
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def p11_int8(settings: dict) -> list[Row]:
    """Eager greedy decoding (default cache) of int8 models against fp32 of the same model: torchao's int8
    weight-only layers and torch's dynamic int8 layers, for Relformer (relative) and Llama of the same shape."""
    shape, new_tokens, repeats = settings["shape"], settings["int8_tokens"], settings["int8_repeats"]
    models = {"Relformer relative": lambda: relformer_lm(shape, "relative"), "Llama": lambda: llama_lm(shape)}
    methods = {"torchao int8 weight-only": torchao_int8, "torch.ao dynamic int8": dynamic_int8}
    rows = []
    for batch in settings["int8_batches"]:
        prompt = token_ids(batch, 16, shape["vocab_size"])
        tokens = batch * new_tokens
        for name, build in models.items():
            fp32 = greedy(build(), prompt, new_tokens)
            for method, quantize in methods.items():
                int8 = greedy(quantize(build()), prompt, new_tokens)
                t_int8, t_fp32 = median_times(int8, fp32, repeats)
                what = f"greedy generate() tokens/s, {method} vs fp32, {name}, batch {batch}, {new_tokens} new"
                rows.append(make_row("P11", what, tokens / t_int8, tokens / t_fp32, "tok/s", "report"))
    return rows


CASES = {
    "P1": p1_relative_overhead,
    "P2": p2_naive_shaw,
    "P2F": p2f_fire,
    "P3": p3_gpt2_same_shape,
    "P4": p4_generation,
    "P4L": p4l_weight_layout,
    "P5": p5_memory,
    "P6": p6_flop_utilization,
    "P7": p7_seq2seq,
    "P10": p10_compiled_decoding,
    "P11": p11_int8,
}


def settings_for(quick: bool) -> dict:
    if quick:
        return dict(
            quick=True, shape=SHAPES["quick"], train_length=128, train_batch=2, naive_length=512, repeats=3,
            new_tokens=32, generate_repeats=3, generate_batches=(1,), generate_schemes=("relative", "learned"),
            memory_lengths=(512, 2048), mfu_length=256, seq2seq_tokens=16, compile_batches=(1,),
            compile_schemes=("relative",), compile_tokens=8, compile_repeats=2, int8_batches=(1,), int8_tokens=8,
            int8_repeats=2,
        )  # fmt: skip
    return dict(
        quick=False, shape=SHAPES["full"], train_length=512, train_batch=2, naive_length=1024, repeats=5,
        new_tokens=256, generate_repeats=5, generate_batches=(1, 8), generate_schemes=tuple(SCHEMES),
        memory_lengths=(512, 1024, 2048, 4096, 8192), mfu_length=512, seq2seq_tokens=64, compile_batches=(1, 8),
        compile_schemes=("relative", "rotary"), compile_tokens=64, compile_repeats=3, int8_batches=(1, 8),
        int8_tokens=64, int8_repeats=3,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Peak memory: one fresh process per case
# ---------------------------------------------------------------------------------------------------------------


def peak_memory(spec: dict) -> float:
    """Growth of the peak RSS (MB) while the case of `spec` runs once, measured in a fresh Python process."""
    command = [sys.executable, "-m", "benchmarks.run", "--memory-child", json.dumps(spec)]
    # A fixed mmap threshold: glibc then returns every large block to the system when it is freed, so the resident
    # set follows the live tensors (its default raises the threshold after frees and keeps freed memory resident).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1], env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_growth_mb"]


def memory_child(spec: dict) -> None:
    shape = SHAPES["quick" if spec["quick"] else "full"]
    length = spec["length"]
    if spec["case"] == "forward":
        config = relformer_config(shape, spec["scheme"])
        model = RelformerModel._from_config(config, attn_implementation="sdpa").eval()
        ids = token_ids(1, length, shape["vocab_size"])

        def run() -> None:
            with torch.no_grad():
                model(input_ids=ids)
    else:  # one attention layer's forward: ours, naive, or no position term
        scheme = "none" if spec["kind"] == "none" else "relative"
        config = relformer_config(shape, scheme)
        stack = RelformerModel._from_config(config, attn_implementation="sdpa")
        attention = stack.layers[0].self_attn.eval()
        hidden = torch.randn(1, length, config.hidden_size)
        position_ids = torch.arange(length)[None]

        def run() -> None:
            with torch.no_grad():
                if spec["kind"] == "naive":
                    view = (1, length, -1, config.head_dim)
                    q, k, v = (
                        p(hidden).view(view).transpose(1, 2)
                        for p in (attention.q_proj, attention.k_proj, attention.v_proj)
                    )
                    naive_shaw_attention(q, k, v, attention.position.relative_key_table, MAX_DISTANCE)
                else:
                    _, inputs = stack.embed_positions(hidden, position_ids, 0, length)
                    attention(hidden, None, inputs)

    run()  # warm-up: one-time allocations (thread pools, kernels) are not the case's memory
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    before = proc_status_kb("VmRSS")
    run()
    print(json.dumps({"peak_growth_mb": (proc_status_kb("VmHWM") - before) / 1024}))


def proc_status_kb(field: str) -> int:
    """A memory figure (kB) of this process from /proc/self/status (VmRSS: now; VmHWM: peak since the reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def format_table(rows: list[Row]) -> str:
    lines = ["| id | what | ours | theirs | unit | ratio | target | ok |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row.id} | {row.what} | {row.ours:.4g} | {row.theirs:.4g} | {row.unit} | {row.ratio:.3f} | "
            f"{row.target} | {OK_WORDS[row.ok]} |"
        )
    return "\n".join(lines)


OK_WORDS = {True: "yes", False: "no", None: "-"}


def case_of(row_id: str) -> str:
    """The case a row belongs to: its id, or the longest case id its id starts with (P2m and P2s: P2)."""
    return row_id if row_id in CASES else max((case for case in CASES if row_id.startswith(case)), key=len)


def previous_results(path: Path, quick: bool, machine: str) -> dict:
    """The results file that `--only` merges into (empty if there is none yet); a usage error (ValueError) when it
    holds the other mode's rows, was measured on another machine, thread count or torch, or is not a results file."""
    if not path.exists():
        return {"rows": [], "seconds": 0, "case_seconds": {}}
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        ids = [row["id"] for row in previous["rows"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a results file of this script ({error!r}): give another --output") from None
    strange = [row_id for row_id in ids if not any(str(row_id).startswith(case) for case in CASES)]
    if strange:
        raise ValueError(f"{path} holds rows of no case of this script ({', '.join(map(str, strange))})")
    if previous.get("quick") != quick:
        mode = "--quick" if previous.get("quick") else "full"
        raise ValueError(f"{path} holds {mode} results: give another --output, or run every case")
    if previous.get("machine") != machine:
        raise ValueError(
            f"{path} was measured on {previous.get('machine')!r}, this run is {machine!r}: give another --output, "
            "or run every case"
        )
    return previous


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller shape and fewer cases (about a minute)")
    parser.add_argument("--only", help="comma-separated case ids, e.g. P1,P4")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results.json"), help="JSON results file")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return 0
    selected = list(CASES) if not args.only else [case.strip().upper() for case in args.only.split(",")]
    unknown = [case for case in selected if case not in CASES]
    if unknown:
        parser.error(f"unknown case ids: {', '.join(unknown)} (choose from {', '.join(CASES)})")
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32"
    previous = {"rows": [], "seconds": 0, "case_seconds": {}}
    if args.only:  # checked before measuring: `--only` keeps the other cases' rows of the file
        try:
            previous = previous_results(args.output, args.quick, machine)
        except ValueError as error:
            parser.error(str(error))
    settings = settings_for(args.quick)
    rows: list[Row] = []
    case_seconds: dict[str, int] = {}
    started = time.monotonic()
    for case in selected:
        case_started = time.monotonic()
        new_rows = CASES[case](settings)
        rows.extend(new_rows)
        case_seconds[case] = round(time.monotonic() - case_started)
        load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"  # other work makes times noisy
        print(format_table(new_rows).split("\n", 2)[2], f"({case_seconds[case]} s, {load})", flush=True)
    table = format_table(rows)
    print("\n" + table)
    seconds = round(time.monotonic() - started)
    kept = [row for row in previous["rows"] if case_of(row["id"]) not in selected]
    order = list(CASES)
    all_rows = sorted(kept + [asdict(r) for r in rows], key=lambda row: order.index(case_of(row["id"])))  # stable
    old_seconds = previous.get("case_seconds", {})
    all_seconds = old_seconds | case_seconds
    results = {
        "machine": machine,
        "quick": args.quick,
        # the time of every measurement the file holds (a replaced case's earlier time, where known, taken out)
        "seconds": previous.get("seconds", 0) - sum(old_seconds.get(case, 0) for case in selected) + seconds,
        "case_seconds": {case: all_seconds[case] for case in CASES if case in all_seconds},
        "rows": all_rows,
    }
    write_atomically(args.output, json.dumps(results, indent=2) + "\n")
    merged = f" (with {len(kept)} rows of other cases kept)" if kept else ""
    print(f"\n{machine}; {seconds} s; written to {args.output}{merged}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
