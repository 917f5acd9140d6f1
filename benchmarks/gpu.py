"""P8 and P9 of the performance notes, on a GPU: relative attention through `flex_attention` against no positions
(flex, and SDPA, which picks flash), SDPA with a materialized bias, eager attention and a naive Shaw; time and peak
memory, bf16, batch 1 and 8, L = 1k ... 32k, forward and forward+backward.

    python -m benchmarks.gpu [--output benchmarks/results-gpu.json] [--lengths 1024,4096,16384,32768]
                             [--batches 1,8] [--repeats 5]
    python -m benchmarks.gpu --smoke      # the same code on CPU at toy sizes, forward only (CI runs this)

Each model is one Relformer layer of the "small-but-real" shape (hidden 512, 8 heads, MLP 2048, k = 64) without an
LM head, so attention dominates; every case of one (batch, length) runs on the same input. Times are the median of
`--repeats` CUDA-synchronised calls after a warm-up call (which also compiles flex_attention's kernels); memory is the
growth of `torch.cuda.max_memory_allocated` during one call. The naive Shaw baseline times the attention operation
alone (its `[L, L, d]` gather), on the same q, k, v shapes; it runs only where that tensor fits. A case that runs out
of memory, or takes more than `--case-limit` seconds per call, is recorded as such, not retried.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hf_relformer import RelformerModel
from hf_relformer.saving import write_atomically

from .naive_shaw import naive_shaw_attention
from .run import MAX_DISTANCE, SHAPES, relformer_config

# (name, scheme variant, attention implementation): P8 compares the first four, P9 the last two with no-position flex
CASES = (
    ("relative keys, flex", "relative", "flex_attention"),
    ("no positions, flex", "none", "flex_attention"),
    ("no positions, sdpa (flash)", "none", "sdpa"),
    ("relative keys, sdpa + materialized bias", "relative", "sdpa"),
    ("relative keys + values, flex + LSE", "relative_values", "flex_attention"),
    ("relative keys + values, eager", "relative_values", "eager"),
)
NAIVE = "relative keys, naive Shaw (attention op only)"
TARGETS = {  # case -> (baseline case, largest time ratio): P8 and P9 of the performance notes
    "relative keys, flex": ("no positions, flex", 1.15),
    "relative keys + values, flex + LSE": ("no positions, flex", 1.5),
}


def one_layer(variant: str, attn: str, device: torch.device, dtype: torch.dtype, shape: dict) -> RelformerModel:
    torch.manual_seed(0)
    config = relformer_config(shape | {"num_hidden_layers": 1}, variant)
    return RelformerModel._from_config(config, attn_implementation=attn, dtype=dtype).to(device)


def model_call(model: RelformerModel, ids: torch.Tensor, backward: bool) -> Callable[[], None]:
    def call() -> None:
        if backward:
            model.zero_grad(set_to_none=True)
            model(input_ids=ids).last_hidden_state.float().square().mean().backward()
        else:
            with torch.no_grad():
                model(input_ids=ids)

    return call


def naive_call(batch: int, length: int, shape: dict, device, dtype, backward: bool) -> Callable[[], None]:
    heads = shape["num_attention_heads"]
    head_dim = shape["hidden_size"] // heads
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype, generator=generator) for _ in range(3)
    )
    table = torch.randn(MAX_DISTANCE + 1, head_dim, device=device, dtype=dtype, generator=generator)
    if backward:
        for tensor in (q, k, v, table):
            tensor.requires_grad_(True)

    def call() -> None:
        out = naive_shaw_attention(q, k, v, table, MAX_DISTANCE)
        if backward:
            out.float().square().mean().backward()

    return call


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(call: Callable[[], None], device: torch.device, repeats: int, limit: float) -> dict:
    """`{"seconds": median, "peak_mib": growth}` or `{"skipped": why}`."""
    try:
        synchronize(device)
        start = time.perf_counter()
        call()  # warm-up (and compilation)
        synchronize(device)
        if time.perf_counter() - start > limit * 4:
            return {"skipped": f"the warm-up call took {time.perf_counter() - start:.0f} s"}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            times.append(time.perf_counter() - start)
            if times[-1] > limit:
                break
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
        return {"seconds": statistics.median(times), "peak_mib": peak}
    except torch.OutOfMemoryError:
        return {"skipped": "out of memory"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = SHAPES["full"] if not args.smoke else SHAPES["quick"]
    passes = (False,) if args.forward_only else (False, True)
    rows = []
    for batch in args.batches:
        for length in args.lengths:
            ids = torch.randint(3, shape["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(0))
            ids = ids.to(device)
            for backward in passes:
                results = {}
                for name, variant, attn in CASES:
                    model = one_layer(variant, attn, device, dtype, shape)
                    results[name] = measure(model_call(model, ids, backward), device, args.repeats, args.case_limit)
                    del model
                naive_bytes = batch * shape["num_attention_heads"] * length * length * 4 * (3 if backward else 1)
                naive_bytes += length * length * (shape["hidden_size"] // shape["num_attention_heads"]) * 2
                results[NAIVE] = (
                    measure(naive_call(batch, length, shape, device, dtype, backward), device, args.repeats,
                            args.case_limit)
                    if naive_bytes < args.naive_limit_gib * 2**30
                    else {"skipped": f"its [L, L, d] gather needs ~{naive_bytes / 2**30:.0f} GiB"}
                )  # fmt: skip
                for name, result in results.items():
                    row = {"batch": batch, "length": length, "pass": "fwd+bwd" if backward else "fwd", "case": name}
                    row |= result
                    if name in TARGETS and "seconds" in result and "seconds" in results[TARGETS[name][0]]:
                        baseline, bound = TARGETS[name]
                        row["ratio"] = round(result["seconds"] / results[baseline]["seconds"], 3)
                        row["target"] = f"<= {bound} x {baseline}"
                        row["ok"] = row["ratio"] <= bound
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "dtype": args.dtype, "torch": torch.__version__, "shape": shape, "rows": rows}


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results-gpu.json"), help="JSON results file")
    parser.add_argument("--lengths", type=_ints, default=[1024, 4096, 16384, 32768])
    parser.add_argument("--batches", type=_ints, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--case-limit", type=float, default=10.0, help="seconds per call before a case stops")
    parser.add_argument("--naive-limit-gib", type=float, default=40.0, help="largest naive [L, L, d] gather")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, fp32, toy sizes, forward only, one repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.dtype, args.forward_only, args.repeats = "cpu", "float32", True, 1
        args.lengths, args.batches = [min(args.lengths[0], 96)], [1]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU machine, or --smoke for the CPU check of this script")
    results = run(args)
    write_atomically(args.output, json.dumps(results, indent=2) + "\n")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
