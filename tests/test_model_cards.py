"""The one card renderer: the templates ship with the package, every source's card comes from it, an
encoder-decoder's card counts encoder and decoder layers, and the committed reference cards are what
scripts/render_model_cards.py renders now (so they cannot go stale)."""

import json
from dataclasses import asdict
from importlib import resources

import pytest

from hf_relformer.demo import DemoSettings, model_card_from_results, run_demo
from hf_relformer.hub.card import count_parameters, render_card
from hf_relformer.model_card import TEMPLATE, conversion_card, count_parameters_of, model_card

from helpers import load_example, tiny_lm, tiny_seq2seq


def test_the_template_is_reachable_through_the_installed_package():
    template = resources.files("hf_relformer.model_cards").joinpath(TEMPLATE)
    assert template.is_file() and "{{ card_data }}" in template.read_text(encoding="utf-8")


def test_the_committed_reference_cards_are_what_the_script_renders_now():
    script = load_example("render_model_cards", folder="scripts")
    cards = script.render_all()
    committed = {path.name: path.read_text(encoding="utf-8") for path in script.OUTPUT.glob("*.md")}
    assert committed == cards, "stale cards: run python scripts/render_model_cards.py"
    assert script.main(["--check"]) == 0


def test_an_encoder_decoder_card_counts_encoder_and_decoder_layers(tmp_path):
    model = tiny_seq2seq("relative", encoder_layers=2, decoder_layers=3)
    model.save_pretrained(tmp_path)
    text = str(render_card(tmp_path))
    assert "| encoder-decoder |" in text and "| 2 encoder + 3 decoder |" in text
    config = model.config
    assert "| 2 encoder + 3 decoder |" in str(model_card(config, 1, title="t", summary="s"))


def test_a_converted_folder_gets_the_card_the_converter_wrote(tmp_path):
    """relformer-convert renders `conversion_card`; relformer-card on the written folder renders the same card."""
    model = tiny_lm("relative")
    model.save_pretrained(tmp_path)
    results = {"source": "gpt2", "source_name": "openai-community/gpt2", "relformer_class": "RelformerForCausalLM",
               "compared_output": "logits", "max_abs_difference": 1.5e-7, "tolerance": 1e-4,
               "positions_reinitialised": False, "notes": ["a note of the converter"]}  # fmt: skip
    (tmp_path / "conversion.json").write_text(json.dumps(results))
    written = str(conversion_card(model.config, model.num_parameters(), results))
    assert count_parameters(tmp_path) == model.num_parameters()
    assert str(render_card(tmp_path)) == written
    assert "## Verification" in written and "**1.5e-07**" in written and "- a note of the converter" in written
    assert "base_model: openai-community/gpt2" in written and "- converted" in written


def test_the_demo_card_is_rebuilt_from_the_demos_results_json():
    """docs/demo/results.json (the shape `run_demo` writes, integer keys turned to strings by JSON) gives the
    card of the best run: best at 2x, then 1x, the first run winning a tie."""
    settings = DemoSettings.quick()
    settings.schemes = ["learned", "relative"]

    def run(scheme, exact_1x, exact_2x):
        scores = {m: {"exact": e, "symbol": e} for m, e in zip(settings.multipliers, [exact_1x, exact_2x, 0.5])}
        return {"task": "delay", "scheme": scheme, "seed": 0, "seconds": 1.0, "scores": scores}

    results = json.loads(json.dumps({"settings": asdict(settings), "text_runs": [], "minutes": 2.0,
                                     "runs": [run("learned", 1.0, 0.1), run("relative", 0.9, 0.8)]}))  # fmt: skip
    card = model_card_from_results(results)
    assert "`delay` with `relative` positions" in card and "exact @ 2x" in card and "| delay | relative |" in card
    assert "![accuracy.png](accuracy.png)" in card


def test_the_demo_saves_the_card_its_results_json_rebuilds(tmp_path):
    """A tiny real run (2 steps per model): best-model/README.md == the card rebuilt from results.json."""
    settings = DemoSettings(schemes=["relative", "learned"], seeds=[0, 1], steps=2, text_multipliers=[1],
                            eval_characters=256, tasks=["delay"], multipliers=[1, 2], eval_count=2)  # fmt: skip
    run_demo(settings, tmp_path / "out", progress=False, echo=lambda _: None)
    card = (tmp_path / "out" / "best-model" / "README.md").read_text(encoding="utf-8")
    assert card == model_card_from_results(json.loads((tmp_path / "out" / "results.json").read_text()))


@pytest.mark.parametrize("scheme", ["relative", "learned"])
def test_parameters_counted_from_a_config_match_the_model(scheme):
    model = tiny_lm(scheme)
    assert count_parameters_of(type(model), model.config) == model.num_parameters()


@pytest.mark.parametrize(
    ("scheme", "settings"),
    [
        ("t5", "| t5 | 8 buckets per head up to distance 12 |"),
        ("alibi", "| alibi | fixed slopes per head 0.25, 0.0625, 0.01562, 0.003906 |"),  # 2^(-8h/4)
        ("relative_values_per_head", "| relative | k = 3; keys and values; a table per head |"),
        ("learned", "| learned | 64 learned positions |"),
        ("rotary", "| rotary | rope_type default, θ = 10000.0 |"),
        ("none", "| none | none |"),
    ],
)
def test_a_card_shows_the_settings_of_its_scheme(scheme, settings, tmp_path):
    """The scheme says what its card shows (T5's buckets, ALiBi's slopes, Shaw's horizon), not the card renderer;
    and the card lists the code files a checkpoint ships."""
    card = str(model_card(tiny_lm(scheme).config, 1, title="tiny", summary="a tiny model"))
    assert settings in card
    assert "`attention_relformer.py`" in card and "`modeling_relformer.py`" in card
