"""A short run of examples/finetune_bible.py on the real KJV -> WEB verse pairs: the loss goes down, the saved
folder reloads, and the relformer-text2text pipeline translates a held-out verse."""

import json

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

from hf_relformer import RelformerForConditionalGeneration

from helpers import load_example


def test_data_split_is_by_book():
    example = load_example("finetune_bible")
    train, held_out = example.load_pairs()
    assert len(train) + len(held_out) > 31_000
    assert 200 < len(held_out) < 1_000
    train_sources = {source for source, _ in train}
    assert held_out[0][0].startswith("Now it came to pass in the days when the judges ruled")  # Ruth 1:1
    assert held_out[0][0] not in train_sources


def test_short_finetuning_run(tmp_path):
    example = load_example("finetune_bible")
    output = tmp_path / "bible"
    argv = ["--max-steps", "60", "--train-limit", "2000", "--eval-limit", "4", "--hidden-size", "64", "--layers", "1",
            "--vocab-size", "800", "--batch-size", "16", "--learning-rate", "3e-3", "--max-length", "48",
            "--output", str(output)]  # fmt: skip
    assert example.main(argv) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["last_loss"] < results["first_loss"] - 0.5
    assert results["copy_baseline"]["bleu"] > 30  # the two translations share most words
    model = AutoModelForSeq2SeqLM.from_pretrained(output)
    assert isinstance(model, RelformerForConditionalGeneration)
    assert model.config.position_embedding_type == "relative"
    tokenizer = AutoTokenizer.from_pretrained(output)
    verse = "In the beginning God created the heaven and the earth."
    translated = pipeline("relformer-text2text", model=str(output))(verse, max_new_tokens=20)[0]["generated_text"]
    expected = model.generate(**tokenizer(verse, return_tensors="pt"), max_new_tokens=20)
    assert translated == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert translated.strip()
    assert torch.equal(expected[0, :1], torch.tensor([model.config.decoder_start_token_id]))
