"""The Shakespeare training example end to end, shortened: Trainer lowers held-out perplexity, and the saved folder
(model, tokenizer, card, results) reloads into a pipeline that reproduces the sample."""

import json
import subprocess
import sys

from transformers import AutoModelForCausalLM

from helpers import REPO_ROOT


def test_short_run_trains_saves_and_reloads(tmp_path):
    output = tmp_path / "shakespeare"
    command = [sys.executable, str(REPO_ROOT / "examples" / "train_shakespeare.py"), "--output", str(output)]
    command += ["--steps", "30", "--eval-blocks", "16", "--block-size", "64"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reloaded pipeline reproduces the sample: True" in result.stdout
    results = json.loads((output / "results.json").read_text())
    assert results["perplexity_after"] < 0.5 * results["perplexity_before"]
    card = (output / "README.md").read_text()
    assert "Macbeth" in card and f"{results['perplexity_after']:.1f}" in card
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.position_embedding_type == "relative"
    assert (output / "tokenizer.json").is_file()


def test_missing_text_file_is_a_clear_error(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "examples" / "train_shakespeare.py"), "--output", str(tmp_path / "o")]
    result = subprocess.run([*command, "--train-files", str(tmp_path / "nope.txt")], capture_output=True, text=True)
    assert result.returncode != 0 and "text file not found" in result.stderr
    assert not (tmp_path / "o").exists()
