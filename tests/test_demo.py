"""`relformer demo --quick` (seeded): artifacts exist and load, and the run shows the direction it is built to show —
relative positions extrapolate on text (perplexity at 4x the context below sinusoidal's) and generalize on the
streaming task (exact match at 2x above learned positions'). A regression that flattens the demo fails here."""

import json
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_relformer.cli import main
from hf_relformer.demo import (
    SCHEMES,
    VOCAB,
    DemoSettings,
    evaluate,
    interleave,
    make_problem,
    problem_ids,
    train_one,
    training_batch,
)
from hf_relformer.positions_relformer import POSITION_SCHEMES


def test_problems_are_what_the_docstring_says():
    class Digits(random.Random):  # draws the docstring's inputs 3 1 4 1 5
        def __init__(self):
            super().__init__()
            self.digits = iter([3, 1, 4, 1, 5])

        def randrange(self, stop):
            return next(self.digits)

    for task, expected in (("delay", "3-1-431154"), ("pairsum", "3314451556")):
        assert "".join(interleave(*make_problem(task, 5, Digits()))) == expected
    ids, labels = problem_ids(*make_problem("delay", 3, random.Random(0)))
    assert ids[0] == VOCAB["<s>"] and labels[:2] == [-100, -100] and labels[2] == VOCAB["-"] == ids[2]
    assert labels[1::2] == [-100] * 3 and labels[2::2] == ids[2::2]  # only the outputs are labels
    batch = training_batch("pairsum", 8, 4, random.Random(1))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


def test_every_registry_scheme_is_compared():
    assert set(POSITION_SCHEMES) <= set(SCHEMES) and "relative_values" in SCHEMES


@pytest.mark.parametrize("scheme", ["learned", "rotary"])
def test_randomized_variants_sample_up_to_the_longest_evaluated_length(scheme):
    """`<scheme>+random` trains on positions sampled from [0, reach), reach the longest evaluated input; a learned
    table then has that many rows, where the plain variant keeps the training length's."""
    settings = DemoSettings()
    config = settings.config(f"{scheme}+random", 40, longest=65, reach=1025)
    assert config.position_embedding_type == scheme and config.randomized_position_range == 1025
    assert config.position_scheme.max_length(config) in (None, 1025)
    plain = settings.config(scheme, 40, longest=65, reach=1025)
    assert plain.randomized_position_range is None and plain.position_scheme.max_length(plain) in (None, 65)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--quick", "--output", str(output), "--no-progress"]) == 0
    return output, json.loads((output / "results.json").read_text())


def mean_score(runs, scheme, read):
    return sum(read(run) for run in runs if run["scheme"] == scheme) / len([r for r in runs if r["scheme"] == scheme])


def test_quick_demo_shows_the_extrapolation_and_the_algorithmic_gap(quick_run):
    _, results = quick_run
    text = results["text_runs"]
    assert {run["scheme"] for run in text} == set(SCHEMES)
    relative_4x = mean_score(text, "relative", lambda run: run["perplexity"]["4"])
    assert relative_4x < mean_score(text, "sinusoidal", lambda run: run["perplexity"]["4"])
    assert relative_4x < 1.1 * mean_score(text, "relative", lambda run: run["perplexity"]["1"])  # stays flat
    learned = next(run for run in text if run["scheme"] == "learned")["perplexity"]
    assert learned["1"] is not None and learned["2"] is None  # n/a past its table, not a crash
    tasks = results["runs"]
    relative_2x = mean_score(tasks, "relative", lambda run: run["scores"]["2"]["exact"])
    assert relative_2x >= 0.9 and relative_2x > mean_score(tasks, "learned", lambda run: run["scores"]["2"]["exact"])


def test_quick_demo_artifacts_load(quick_run):
    output, results = quick_run
    for name in ("accuracy.png", "perplexity.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (output / "report.md").read_text()
    assert "ppl @ 4x (256)" in report and "exact @ 2x" in report and "Press et al." in report
    model_dir = output / "best-model"
    card = (model_dir / "README.md").read_text()
    assert "exact @ 2x" in card and "accuracy.png" in card and (model_dir / "accuracy.png").is_file()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer("3-1").input_ids == [VOCAB["<s>"], VOCAB["3"], VOCAB["-"], VOCAB["1"]]
    # the saved model is the trained one: re-evaluating it gives the recorded scores exactly
    run = next(r for r in results["runs"] if r["scheme"] == model.config.position_embedding_type)
    assert evaluate(model, "delay", 12, 50, seed=10_000 + run["seed"]) == run["scores"]["1"]


def test_settings_are_deterministic():
    settings = DemoSettings(schemes=["relative"], seeds=[0], steps=3, eval_count=2)
    first, second = (train_one(settings, "delay", "relative", 0) for _ in range(2))
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--tasks", "sort"], "choose from delay, pairsum"),
        (["demo", "--lengths", "1,x"], "comma-separated integers"),
        (["demo", "--text-lengths", "0,1"], "--text-lengths must be >= 1"),
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
