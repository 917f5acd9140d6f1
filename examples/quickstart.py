"""Quickstart: build a small Relformer, teach it a paragraph, generate, save, reload, and run it in a pipeline.

    python examples/quickstart.py [--tokenizer assets/gpt2-tokenizer] [--output outputs/quickstart]

Uses the real GPT-2 BPE tokenizer (installed by `bash scripts/fetch_assets.sh`). Runs in well under a minute on
a laptop CPU.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2TokenizerFast, pipeline

from hf_relformer import RelformerConfig, RelformerForCausalLM
from hf_relformer.saving import save_pretrained_atomically

# Public domain: the opening of Lewis Carroll, "Alice's Adventures in Wonderland" (1865).
TEXT = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
    "once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations "
    "in it, 'and what is the use of a book,' thought Alice 'without pictures or conversations?' So she was "
    "considering in her own mind (as well as she could, for the hot day made her feel very sleepy and stupid), "
    "whether the pleasure of making a daisy-chain would be worth the trouble of getting up and picking the "
    "daisies, when suddenly a White Rabbit with pink eyes ran close by her."
)
PROMPT = "Alice was beginning to get very tired of"
ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "assets" / "gpt2-tokenizer")
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "quickstart")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.tokenizer / "vocab.json").is_file():
        parser.error(f"no GPT-2 tokenizer in {args.tokenizer}: run `bash scripts/fetch_assets.sh` first")
    if args.steps < 0:
        parser.error("--steps must be >= 0")

    torch.manual_seed(args.seed)
    tokenizer = GPT2TokenizerFast.from_pretrained(args.tokenizer)
    tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; batched pipelines need one
    config = RelformerConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        position_embedding_type="relative",
        relative_attention_max_distance=16,
        relative_attention_values=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = RelformerForCausalLM(config)
    print(
        f"Relformer: {model.num_parameters() / 1e6:.1f}M parameters, Shaw relative keys+values (k=16), "
        f"attention backend {model.config._attn_implementation}"
    )

    # 1. Teach it one paragraph (a few seconds), so that generation shows something real.
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (0, args.steps - 1):
            print(f"  step {step + 1:4d}  loss {loss.item():.3f}")
    model.eval()
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f}s on {ids.shape[1]} tokens")

    # 2. Generate with the key/value cache, and check it against decoding without the cache.
    prompt = tokenizer(PROMPT, return_tensors="pt")
    cached = model.generate(**prompt, max_new_tokens=30, do_sample=False)
    uncached = model.generate(**prompt, max_new_tokens=30, do_sample=False, use_cache=False)
    print("generate():", repr(tokenizer.decode(cached[0])))
    print("cached == uncached:", torch.equal(cached, uncached))

    # 3. Save (safetensors + modeling code + tokenizer), reload through the Auto classes, run a pipeline.
    save_pretrained_atomically(args.output, model, tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(args.output)
    with torch.no_grad():
        same = torch.equal(reloaded(cached).logits, model(cached).logits)
    print(f"saved to {args.output}; AutoModelForCausalLM reload gives identical logits: {same}")
    generator = pipeline("text-generation", model=str(args.output))
    result = generator(PROMPT, max_new_tokens=30, do_sample=False)[0]["generated_text"]
    print("pipeline('text-generation'):", repr(result))
    return 0 if torch.equal(cached, uncached) and same else 1


if __name__ == "__main__":
    sys.exit(main())
