"""`relformer demo --quick`-sized run: artifacts exist and load, and a trained relative model beats chance at 1x.
Which scheme wins at 2x is the experiment's result (README), not asserted here."""

import json
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_relformer.cli import main
from hf_relformer.demo import VOCAB, DemoSettings, evaluate, make_problem, train_one, training_batch


def test_problems_are_what_the_docstring_says():
    rng = random.Random(0)
    prompt, answer = make_problem("reverse", 5, rng)
    assert prompt[-1] == ">" and answer == prompt[:-1][::-1]
    prompt, answer = make_problem("add", 3, rng)
    a, b = "".join(prompt[:3])[::-1], "".join(prompt[4:7])[::-1]
    assert prompt[3] == "+" and prompt[-1] == "=" and "".join(answer)[::-1] == str(int(a) + int(b))
    batch = training_batch("copy", 8, 4, random.Random(1))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    labelled = batch["labels"][batch["labels"] != -100]
    assert (labelled == VOCAB["</s>"]).sum() == 4  # every answer ends with </s>


def test_quick_demo_artifacts_load_and_relative_beats_chance(tmp_path):
    output = tmp_path / "demo"
    argv = ["demo", "--quick", "--schemes", "relative,learned", "--output", str(output), "--no-progress"]
    assert main(argv) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["settings"]["tasks"] == ["copy"] and len(results["runs"]) == 2
    assert (output / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model_dir = output / "best-model"
    card = (model_dir / "README.md").read_text()
    assert "exact @ 2x" in card and "accuracy.png" in card and (model_dir / "accuracy.png").is_file()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer("123>").input_ids == [VOCAB["<s>"], VOCAB["1"], VOCAB["2"], VOCAB["3"], VOCAB[">"]]
    relative = next(run for run in results["runs"] if run["scheme"] == "relative")
    chance = 1 / 11  # ten digits and </s>
    assert relative["scores"]["1"]["symbol"] > 3 * chance
    assert relative["scores"]["1"]["exact"] > 0.1
    # the saved model is the trained one: re-evaluating it gives the recorded scores exactly
    run = next(r for r in results["runs"] if r["scheme"] == model.config.position_embedding_type)
    assert evaluate(model, "copy", 8, 50, seed=10_000 + run["seed"]) == run["scores"]["1"]


def test_settings_are_deterministic():
    settings = DemoSettings(tasks=["copy"], schemes=["relative"], seeds=[0], steps=3, eval_count=2)
    first, second = (train_one(settings, "copy", "relative", 0) for _ in range(2))
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--tasks", "sort"], "choose from copy, reverse, add"),
        (["demo", "--lengths", "1,x"], "comma-separated integers"),
        (["demo", "--steps", "0"], "--steps must be >= 1"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_flags_are_usage_errors(argv, message):
    result = subprocess.run([sys.executable, "-m", "hf_relformer.cli", *argv], capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_broken_decoding_path_stops_the_demo_loudly(tmp_path, monkeypatch, capsys):
    """A model whose cache is ignored (what transformers 5.24's renamed argument did) must not give a table of zeros
    and exit 0: the check after training stops the run with exit code 1, naming the cause, and writes nothing."""
    from hf_relformer.modeling_relformer import RelformerAttention

    argv = ["demo", "--quick", "--schemes", "relative", "--steps", "20", "--output", str(tmp_path / "demo"),
            "--no-progress"]  # fmt: skip
    monkeypatch.setattr(RelformerAttention, "_update_cache", lambda self, key, value, cache: (key, value))
    assert main(argv) == 1
    assert "cached generate() disagrees with an uncached forward" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
    monkeypatch.undo()
    assert main(argv) == 0
