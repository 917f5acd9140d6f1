"""Render the model cards of the project's reference runs into `model_cards/reference/`, from what the repository
commits, with the one renderer (`hf_relformer.model_card`) through the functions the runs themselves call.

    python scripts/render_model_cards.py            # (re)write the cards
    python scripts/render_model_cards.py --check    # exit 1 if a committed card differs from what this renders

What each card is made from:

- `demo.md`: `docs/demo/results.json` (what `relformer demo` writes: settings, runs, minutes), through
  `hf_relformer.demo.model_card_from_results`, the card the demo saves with its best model. Rendered only when that
  file is committed; without it there is no demo card.
- `chorales.md`: the measured table and run time in README.md's "Music Transformer on the Bach chorales" section,
  `examples/data/chorales_split.json` and the defaults of `examples/chorales.py` (the README's run used them; its
  saved model is the first scheme and seed, relative keys, seed 0). No generation section: the run's
  results.json is not committed.
- `sentiment.md`: README.md's measured line of the sentiment example (held-out accuracy, held-out snippets,
  majority-class baseline, minutes), its snippet counts (training examples = all snippets - held-out ones) and the
  defaults of `examples/finetune_sentiment.py`; the vocabulary is all-MiniLM-L6-v2's (30,522 WordPiece tokens,
  padding id 0).
- `shakespeare.md`: README.md's measured line of the Trainer example (held-out perplexity before and after, steps,
  minutes; rounded as written there) and the defaults of `examples/train_shakespeare.py` (vocabulary: its
  `--vocab-size`). No sample: the run's results.json is not committed.
- Conversions: none. No converted folder or conversion.json is committed (README.md's table of measured differences
  names no configs), so there is no reference conversion card; `relformer-convert` writes one into every converted
  folder, and `relformer-card` on that folder renders the same card from its conversion.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "model_cards" / "reference"
sys.path.insert(0, str(ROOT / "examples"))  # the examples are scripts, not a package

import chorales  # noqa: E402
import finetune_sentiment  # noqa: E402
import train_shakespeare  # noqa: E402

from hf_relformer.demo import model_card_from_results  # noqa: E402

DEMO_RESULTS = ROOT / "docs" / "demo" / "results.json"
MINILM_VOCABULARY, MINILM_PAD = 30522, 0


def readme_match(pattern: str) -> re.Match:
    """The first match of `pattern` in README.md; a README that no longer says it is an error naming the pattern."""
    match = re.search(pattern, (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.DOTALL)
    if match is None:
        raise SystemExit(f"render_model_cards: README.md no longer matches {pattern!r}; update this script")
    return match


def number(text: str) -> float:
    return float(text.replace(",", ""))


def chorales_card() -> str:
    split = json.loads(chorales.SPLIT.read_text(encoding="utf-8"))
    table = readme_match(r"(\| positions \| test NLL / token.*?\| unigram baseline[^\n]*\|)\n").group(1)
    minutes = number(readme_match(r"one run of the command above, ([\d.]+) min").group(1))
    settings = vars(chorales.build_parser().parse_args([]))
    results = {
        "table": table, "minutes": minutes, "saved_model": {"scheme": settings["schemes"][0], "seed": 0},
        "chorales": {part: len(split[part]) for part in ("train", "valid", "test")}, "settings": settings,
    }  # fmt: skip
    return chorales.card_text(results, split)


def sentiment_card() -> str:
    match = readme_match(
        r"held-out accuracy \*\*([\d.]+)\*\*\s+on ([\d,]+) snippets against a majority-class baseline of ([\d.]+); "
        r"([\d.]+) min"
    )
    fresh, rotten = readme_match(r"\(([\d,]+) fresh / ([\d,]+) rotten").groups()
    accuracy, held_out, baseline, minutes = (number(group) for group in match.groups())
    results = {
        "accuracy": accuracy, "baseline": baseline, "eval_count": int(held_out),
        "train_count": int(number(fresh) + number(rotten) - held_out), "minutes": minutes,
    }  # fmt: skip
    args = finetune_sentiment.build_parser().parse_args([])
    config = finetune_sentiment.make_config(args, MINILM_VOCABULARY, MINILM_PAD)
    return finetune_sentiment.card_text(results, config)


def shakespeare_card() -> str:
    match = readme_match(r"held-out perplexity ([\d.]+) →\s+([\d.]+) after (\d+) steps, ([\d.]+) min")
    before, after, steps, minutes = (number(group) for group in match.groups())
    args = train_shakespeare.build_parser().parse_args([])
    results = {
        "perplexity_before": before, "perplexity_after": after, "steps": int(steps), "minutes": minutes,
        "settings": {key: str(value) for key, value in vars(args).items()},
    }  # fmt: skip
    config = train_shakespeare.make_config(args, args.vocab_size, None, None, None)
    return train_shakespeare.card_text(results, config)


def render_all() -> dict[str, str]:
    """File name in `model_cards/reference/` -> the card rendered now from the committed results."""
    cards = {"chorales.md": chorales_card(), "sentiment.md": sentiment_card(), "shakespeare.md": shakespeare_card()}
    if DEMO_RESULTS.is_file():
        cards["demo.md"] = model_card_from_results(json.loads(DEMO_RESULTS.read_text(encoding="utf-8")))
    return cards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed card is stale")
    args = parser.parse_args(argv)
    cards = render_all()
    committed = {path.name for path in OUTPUT.glob("*.md")}
    stale = sorted(
        name for name in committed | cards.keys() if not (OUTPUT / name).is_file() or (OUTPUT / name).read_text(
            encoding="utf-8") != cards.get(name)
    )  # fmt: skip
    if args.check:
        for name in stale:
            print(f"model_cards/reference/{name} is stale: run python scripts/render_model_cards.py", file=sys.stderr)
        return 1 if stale else 0
    OUTPUT.mkdir(exist_ok=True)
    for name in stale:
        if name in cards:
            (OUTPUT / name).write_text(cards[name], encoding="utf-8")
        else:
            (OUTPUT / name).unlink()  # a card whose results are no longer committed
        print(f"wrote model_cards/reference/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
