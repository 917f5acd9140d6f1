"""`relformer demo`: what relative positions buy, shown in two parts with small causal Relformers, one per position
scheme of the registry (`POSITION_SCHEMES`, plus Shaw's values term), trained on the same data, for the same steps,
from the same init seed, with dropout 0.

1. Extrapolation on real text (Press et al. 2022, Fig. 1). A character-level LM (one token per character of *Hamlet*,
   plus `<s>` and `<unk>`) is trained on *Hamlet* with a context of `context` characters, then scored on *Macbeth*,
   which it never sees, with windows of 1x, 2x, 4x ... that context. The evaluated text (the first `eval_characters`
   characters of *Macbeth*, cut to a multiple of the longest window) is split into non-overlapping windows, each read
   after `<s>`, and every character is scored once: each column averages over exactly the same characters, and only
   the context each character sees grows. A table of learned positions has no row past its training length: "n/a".
2. Algorithmic length generalization on streaming tasks: after every input digit the model writes one output symbol
   that depends only on the last two inputs, so the attention distances a solution needs stay <= 4 (within the
   clipping distance k) at every length, while absolute positions are a shortcut at the training lengths:
   - delay:   `<s> 3 - 1 - 4 3 1 1 5 4`   each input is followed by the input two steps back (`-` for the first two)
   - pairsum: `<s> 3 3 1 4 4 5 1 5 5 6`   each input is followed by (it + the previous input) mod 10
   Models see 1 to `train_length` inputs and are scored on `eval_count` problems of 1x, 2x and 4x that many inputs.
   Exact match is that of greedy decoding (every input given, every output the model's own): it is read off one
   forward over the true sequence, which is the same thing, since greedy decoding first departs from the true
   sequence at the first wrongly predicted symbol. Per-symbol accuracy is that forward's (teacher forcing).
"""

import importlib.resources
import io
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, pipeline

from .checks import check_cached_decoding
from .configuration_relformer import RelformerConfig
from .model_card import count_parameters_of
from .model_card import model_card as render_model_card
from .modeling_relformer import RelformerForCausalLM
from .saving import ExtraFiles, Subfolder, save_pretrained_atomically
from .variants import scheme_variants, with_horizon

if TYPE_CHECKING:  # Python 3.11+ (3.10: importlib.abc)
    from importlib.resources.abc import Traversable
from .saving import output_problem as _folder_problem

# the plays, package data of hf_relformer (found in a source checkout and in an installed wheel alike)
TEXTS = importlib.resources.files("hf_relformer") / "data" / "shakespeare"


# The schemes the demo also trains on randomized positions (Ruoss et al. 2023), as "<scheme>+random": each sequence's
# positions a sorted sample from [0, N), N the longest length the part evaluates (a learned table then has N rows).
RANDOMIZED = ("learned", "rotary")
RANDOM_SUFFIX = "+random"

# scheme name -> config overrides: every scheme of the registry, its featured variants (relative values) and the
# randomized ones
SCHEMES = scheme_variants(featured_only=True) | {
    scheme + RANDOM_SUFFIX: {"position_embedding_type": scheme} for scheme in RANDOMIZED
}


# ---------------------------------------------------------------------------------------------------------------
# Settings and training, shared by both parts
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DemoSettings:
    schemes: list[str] = field(default_factory=lambda: list(SCHEMES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 250
    learning_rate: float = 3e-3
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    max_distance: int = 8
    # part 1: text
    context: int = 64
    text_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    text_batch_size: int = 32
    eval_characters: int = 16384
    # part 2: algorithmic tasks
    tasks: list[str] = field(default_factory=lambda: ["delay", "pairsum"])
    multipliers: list[int] = field(default_factory=lambda: [1, 2, 4])
    train_length: int = 12
    batch_size: int = 64
    eval_count: int = 100

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(seeds=[0], steps=120, text_multipliers=[1, 2, 4, 8], eval_characters=8192, tasks=["delay"],
                   eval_count=50)  # fmt: skip

    def config(
        self, scheme: str, vocab_size: int, longest: int, scale_embedding: bool = False, reach: int | None = None
    ) -> RelformerConfig:
        """The same model for every scheme; a learned table gets `longest` rows. A randomized variant samples its
        training positions from `[0, reach)`, `reach` being the longest length evaluated (and its table has as many)."""
        overrides = with_horizon(SCHEMES[scheme], self.max_distance)
        if scheme.endswith(RANDOM_SUFFIX):
            reach = reach or longest
            overrides, longest = overrides | {"randomized_position_range": reach}, max(longest, reach)
        return RelformerConfig(
            vocab_size=vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, intermediate_size=4 * self.hidden_size, max_position_embeddings=longest,
            hidden_dropout=0.0, attention_dropout=0.0, scale_embedding=scale_embedding, pad_token_id=PAD,
            bos_token_id=BOS, eos_token_id=EOS, **overrides,
        )  # fmt: skip


def train(model: RelformerForCausalLM, batches: Iterator[dict], settings: DemoSettings) -> RelformerForCausalLM:
    """AdamW with a linear decay over `settings.steps` batches; returns the model in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / settings.steps)
    model.train()
    for _ in range(settings.steps):
        model(**next(batches)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return model.eval()


def position_table_rows(model: RelformerForCausalLM) -> int | None:
    """How many positions the model can read, or None when any length works."""
    return model.config.position_scheme.max_length(model.config)


def mean_and_spread(values: list[float | None]) -> tuple[float, float] | None:
    """Mean and population standard deviation over seeds; None when any is missing (n/a)."""
    if any(value is None for value in values):
        return None
    return statistics.mean(values), statistics.pstdev(values)


# ---------------------------------------------------------------------------------------------------------------
# Part 1: extrapolation on real text
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Character ids of the training and the held-out play; id 0 is `<unk>`, id 1 `<s>`."""

    train: torch.Tensor  # [N_train]
    held_out: torch.Tensor  # [N_eval]
    vocab_size: int

    @classmethod
    def load(
        cls,
        train_file: "Path | Traversable" = TEXTS / "hamlet.txt",
        eval_file: "Path | Traversable" = TEXTS / "macbeth.txt",
    ) -> "Corpus":
        missing = [str(path) for path in (train_file, eval_file) if not path.is_file()]
        if missing:
            raise OSError(f"the demo's text is missing: {', '.join(missing)} (the installed package is incomplete)")
        train_text, eval_text = train_file.read_text(encoding="utf-8"), eval_file.read_text(encoding="utf-8")
        ids = {char: index + 2 for index, char in enumerate(sorted(set(train_text)))}
        encode_text = lambda text: torch.tensor([ids.get(char, 0) for char in text])  # noqa: E731
        return cls(encode_text(train_text), encode_text(eval_text), len(ids) + 2)


TEXT_BOS = 1


def with_bos(windows: torch.Tensor) -> torch.Tensor:
    """`[B, L]` -> `[B, 1 + L]` with `<s>` in front."""
    return torch.cat([torch.full((windows.shape[0], 1), TEXT_BOS), windows], dim=1)


def text_batches(corpus: Corpus, settings: DemoSettings, seed: int) -> Iterator[dict]:
    """Random windows of `context` characters of the training play, each after `<s>`; every character is a label."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(settings.context)
    while True:
        starts = torch.randint(
            0, len(corpus.train) - settings.context, (settings.text_batch_size, 1), generator=generator
        )
        batch = with_bos(corpus.train[starts + offsets])
        yield {"input_ids": batch, "labels": batch}


def evaluated_text(corpus: Corpus, settings: DemoSettings) -> torch.Tensor:
    """The first `eval_characters` held-out characters, cut to a multiple of the longest evaluation window."""
    longest = settings.context * max(settings.text_multipliers)
    count = min(settings.eval_characters, len(corpus.held_out)) // longest * longest
    if count == 0:
        raise ValueError(f"the held-out text is shorter than one evaluation window of {longest} characters")
    return corpus.held_out[:count]


@torch.no_grad()
def perplexity(model: RelformerForCausalLM, text: torch.Tensor, window: int) -> float | None:
    """Perplexity over every character of `text` `[N]` (N a multiple of `window`), read in non-overlapping windows
    after `<s>`; None where the windows do not fit the model's position table."""
    rows = position_table_rows(model)
    if rows is not None and window + 1 > rows:
        return None
    windows = with_bos(text.view(-1, window))
    total = 0.0
    for chunk in windows.split(max(1, 8192 // window)):
        logits = model(chunk).logits[:, :-1]
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
    return math.exp(total / text.numel())


def run_text_part(settings: DemoSettings, corpus: Corpus, progress: bool) -> list[dict]:
    """Train one LM per (scheme, seed) and score it at every multiple of the context; one record per run."""
    text = evaluated_text(corpus, settings)
    records = []
    runs = [(scheme, seed) for scheme in settings.schemes for seed in settings.seeds]
    for scheme, seed in tqdm(runs, desc="part 1: text", disable=not progress):
        start = time.perf_counter()
        torch.manual_seed(seed)
        # token embeddings scaled by sqrt(hidden): unscaled (std 0.02 at init), a sinusoidal table (amplitude 1)
        # drowns them and that model learns no text in this budget
        reach = settings.context * max(settings.text_multipliers) + 1  # the longest window, after <s>
        model = RelformerForCausalLM(settings.config(scheme, corpus.vocab_size, settings.context + 1, True, reach))
        model = train(model, text_batches(corpus, settings, seed), settings)
        check_cached_decoding(model, with_bos(text[: 4 * (settings.context // 2)].view(4, -1)))
        scores = {m: perplexity(model, text, m * settings.context) for m in settings.text_multipliers}
        records.append({"scheme": scheme, "seed": seed, "seconds": time.perf_counter() - start,
                        "perplexity": scores})  # fmt: skip
    return records


def summarize_text(records: list[dict], settings: DemoSettings) -> list[dict]:
    """One row per scheme: multiplier -> (mean, spread) of perplexity over seeds, or None (n/a)."""
    rows = []
    for scheme in settings.schemes:
        runs = [r for r in records if r["scheme"] == scheme]
        rows.append({"scheme": scheme} | {m: mean_and_spread([r["perplexity"][m] for r in runs])
                                          for m in settings.text_multipliers})  # fmt: skip
    return rows


def text_table(rows: list[dict], settings: DemoSettings) -> str:
    header = ["scheme", *[f"ppl @ {m}x ({m * settings.context})" for m in settings.text_multipliers]]
    lines = table_head(header)
    for row in rows:
        cells = [row["scheme"], *[format_cell(row[m], settings, "{:.2f}") for m in settings.text_multipliers]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Part 2: algorithmic length generalization
# ---------------------------------------------------------------------------------------------------------------

SYMBOLS = [str(d) for d in range(10)] + ["-"]
SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
VOCAB = {token: index for index, token in enumerate([*SPECIAL.values(), *SYMBOLS])}
PAD, BOS, EOS = (VOCAB[t] for t in SPECIAL.values())

# task -> output symbols from input digits (every output reads at most the last two inputs)
TASKS: dict[str, Callable[[list[int]], list[str]]] = {
    "delay": lambda x: ["-" if i < 2 else str(x[i - 2]) for i in range(len(x))],
    "pairsum": lambda x: [str((x[i] + (x[i - 1] if i else 0)) % 10) for i in range(len(x))],
}


def make_problem(task: str, size: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """(input digits, output symbols) of one problem with `size` inputs."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    digits = [rng.randrange(10) for _ in range(size)]
    return [str(d) for d in digits], TASKS[task](digits)


def interleave(inputs: list[str], outputs: list[str]) -> list[str]:
    """`x1 y1 x2 y2 ...`: every input followed by its output."""
    return [symbol for pair in zip(inputs, outputs, strict=True) for symbol in pair]


def encode(symbols: list[str]) -> list[int]:
    return [VOCAB[s] for s in symbols]


def problem_ids(inputs: list[str], outputs: list[str]) -> tuple[list[int], list[int]]:
    """Token ids `<s> x1 y1 ...` and labels (the outputs; -100 on `<s>` and the inputs)."""
    ids = [BOS, *encode(interleave(inputs, outputs))]
    return ids, [token if i and i % 2 == 0 else -100 for i, token in enumerate(ids)]


def training_batch(task: str, train_length: int, batch_size: int, rng: random.Random) -> dict[str, torch.Tensor]:
    """Right-padded `[B, L]` input_ids, attention_mask and labels (-100 on `<s>`, the inputs and the padding)."""
    rows = [problem_ids(*make_problem(task, rng.randint(1, train_length), rng)) for _ in range(batch_size)]
    length = max(len(ids) for ids, _ in rows)
    return {
        "input_ids": torch.tensor([ids + [PAD] * (length - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (length - len(labels)) for _, labels in rows]),
    }


def task_batches(settings: DemoSettings, task: str, seed: int) -> Iterator[dict]:
    rng = random.Random(seed)
    while True:
        yield training_batch(task, settings.train_length, settings.batch_size, rng)


@torch.no_grad()
def evaluate(model: RelformerForCausalLM, task: str, size: int, count: int, seed: int) -> dict[str, float]:
    """Exact match of greedy decoding and per-symbol accuracy (teacher forcing) on `count` problems of one size."""
    rng = random.Random(seed)
    rows = [problem_ids(*make_problem(task, size, rng)) for _ in range(count)]
    ids = torch.tensor([r[0] for r in rows])  # one size: no padding
    predicted = model(ids).logits.argmax(-1)[:, 1::2]  # after <s> x1, <s> x1 y1 x2, ...: the outputs y1, y2, ...
    correct = predicted == ids[:, 2::2]
    return {"exact": float(correct.all(-1).float().mean()), "symbol": float(correct.float().mean())}


def sanity_prompts(task: str, train_length: int, seed: int) -> torch.Tensor:
    """`[4, 2 * train_length]` prompts ending with an input, for the decoding check every trained model goes through."""
    rng = random.Random(seed)
    return torch.tensor([problem_ids(*make_problem(task, train_length, rng))[0][:-1] for _ in range(4)])


def train_one(settings: DemoSettings, task: str, scheme: str, seed: int) -> RelformerForCausalLM:
    """Train one model on one task; deterministic for a seed. A learned table covers the longest evaluation."""
    torch.manual_seed(seed)
    model = RelformerForCausalLM(task_config(settings, scheme))
    return train(model, task_batches(settings, task, seed), settings)


def task_config(settings: DemoSettings, scheme: str) -> RelformerConfig:
    """The config of a task model; a learned table covers the longest evaluation."""
    return settings.config(scheme, len(VOCAB), longest=2 * settings.train_length * max(settings.multipliers) + 1)


def run_rank(scores: dict, settings: DemoSettings) -> tuple[float, ...]:
    """How a run ranks for "best model": exact match at 2x, then the longer lengths, then 1x."""
    return tuple(scores[m]["exact"] for m in sorted(settings.multipliers, key=lambda m: (m == 1, m)))


def best_run(records: list[dict], task: str, settings: DemoSettings) -> tuple[str, int]:
    """(scheme, seed) of the best run on `task`; the first in run order wins a tie, as in `run_task_part`."""
    runs = [r for r in records if r["task"] == task]
    best = max(runs, key=lambda r: (run_rank(r["scores"], settings), -runs.index(r)))
    return best["scheme"], best["seed"]


def run_task_part(settings: DemoSettings, progress: bool) -> tuple[list[dict], dict]:
    """Train and evaluate every (task, scheme, seed); returns one record per run and the best model per task."""
    records, best = [], {}
    runs = [(t, s, seed) for t in settings.tasks for s in settings.schemes for seed in settings.seeds]
    for task, scheme, seed in tqdm(runs, desc="part 2: tasks", disable=not progress):
        start = time.perf_counter()
        model = train_one(settings, task, scheme, seed)
        check_cached_decoding(model, sanity_prompts(task, settings.train_length, seed))
        scores = {
            m: evaluate(model, task, settings.train_length * m, settings.eval_count, seed=10_000 + seed)
            for m in settings.multipliers
        }
        records.append({"task": task, "scheme": scheme, "seed": seed, "seconds": time.perf_counter() - start,
                        "scores": scores})  # fmt: skip
        key = run_rank(scores, settings)
        if task not in best or key > best[task][0]:
            best[task] = (key, scheme, seed, model)
    return records, {task: entry[1:] for task, entry in best.items()}


def summarize(records: list[dict], settings: DemoSettings) -> list[dict]:
    """Mean and spread of exact match over seeds, and mean per-symbol accuracy, one row per (task, scheme)."""
    rows = []
    for task in settings.tasks:
        for scheme in settings.schemes:
            runs = [r for r in records if r["task"] == task and r["scheme"] == scheme]
            row = {"task": task, "scheme": scheme}
            for m in settings.multipliers:
                row[f"{m}x"] = mean_and_spread([r["scores"][m]["exact"] for r in runs])
                row[f"{m}x_symbol"] = statistics.mean(r["scores"][m]["symbol"] for r in runs)
            rows.append(row)
    return rows


def markdown_table(rows: list[dict], settings: DemoSettings) -> str:
    header = ["task", "scheme", *[f"exact @ {m}x" for m in settings.multipliers]]
    lines = table_head(header + [f"symbols @ {m}x" for m in settings.multipliers])
    for row in rows:
        cells = [row["task"], row["scheme"], *[format_cell(row[f"{m}x"], settings) for m in settings.multipliers]]
        cells += [f"{row[f'{m}x_symbol']:.2f}" for m in settings.multipliers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Tables, plots, report
# ---------------------------------------------------------------------------------------------------------------


def table_head(header: list[str]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def format_cell(value: tuple[float, float] | None, settings: DemoSettings, number: str = "{:.2f}") -> str:
    if value is None:
        return "n/a"
    mean, spread = value
    return f"{number.format(mean)} ± {number.format(spread)}" if len(settings.seeds) > 1 else number.format(mean)


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit("relformer demo needs matplotlib for its plots: pip install 'hf-relformer[demo]'") from error
    return plt


def png(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    pyplot().close(figure)
    return buffer.getvalue()


def plot_lines(axis, rows: list[dict], xs: list[int], keys: list) -> None:
    """One line per row (scheme) with the spread over seeds as error bars; n/a points are left out."""
    for row in rows:
        points = [(x, row[key]) for x, key in zip(xs, keys, strict=True) if row[key] is not None]
        if points:
            axis.errorbar([x for x, _ in points], [v[0] for _, v in points], yerr=[v[1] for _, v in points],
                          marker="o", capsize=3, label=row["scheme"])  # fmt: skip
    axis.grid(alpha=0.3)


def plot_accuracy(rows: list[dict], settings: DemoSettings) -> bytes:
    """Exact match vs length, one line per scheme, one panel per task, as PNG."""
    figure, axes = pyplot().subplots(1, len(settings.tasks), figsize=(4.5 * len(settings.tasks), 3.6), squeeze=False)
    for axis, task in zip(axes[0], settings.tasks, strict=True):
        keys = [f"{m}x" for m in settings.multipliers]
        plot_lines(axis, [r for r in rows if r["task"] == task], settings.multipliers, keys)
        axis.set(title=f"{task} (trained on 1–{settings.train_length} inputs)", xlabel="× training length",
                 ylabel="exact match", ylim=(-0.05, 1.05), xticks=settings.multipliers)  # fmt: skip
    axes[0][-1].legend(fontsize=8)
    return png(figure)


def plot_perplexity(rows: list[dict], settings: DemoSettings) -> bytes:
    """Held-out perplexity vs evaluation window (log x), one line per scheme, as PNG."""
    figure, axis = pyplot().subplots(figsize=(5.5, 3.8))
    windows = [m * settings.context for m in settings.text_multipliers]
    plot_lines(axis, rows, windows, settings.text_multipliers)
    axis.set_xscale("log", base=2)
    axis.set(title=f"Macbeth, character LM trained on Hamlet at {settings.context}", xlabel="evaluation window "
             "(characters)", ylabel="perplexity", xticks=windows, xticklabels=[str(w) for w in windows])  # fmt: skip
    axis.axvline(settings.context, color="gray", linestyle=":", linewidth=1)
    axis.legend(fontsize=8)
    return png(figure)


def rise(row: dict, settings: DemoSettings) -> float | None:
    """Relative change of mean perplexity from 1x to the longest evaluated window, or None (n/a)."""
    first, last = row[settings.text_multipliers[0]], row[settings.text_multipliers[-1]]
    return None if first is None or last is None else last[0] / first[0] - 1


def report(text_rows: list[dict], task_rows: list[dict], settings: DemoSettings, minutes: float) -> str:
    """report.md: both tables, the setup, and which anchor directions this run reproduced, computed from the numbers."""
    longest = settings.text_multipliers[-1]
    rises = {row["scheme"]: rise(row, settings) for row in text_rows}
    lines = [
        "# relformer demo: report",
        "",
        f"Schemes: {', '.join(settings.schemes)}; seeds {settings.seeds}; {settings.steps} steps per model; "
        f"{settings.layers} layers, hidden {settings.hidden_size}, {settings.heads} heads, "
        f"k = {settings.max_distance}, dropout 0; {minutes:.1f} min.",
        "",
        f"## 1. Extrapolation: character LM, trained on Hamlet at {settings.context} characters, scored on Macbeth",
        "",
        f"Perplexity over the same {settings.eval_characters} characters in every column (non-overlapping windows of "
        f"n × {settings.context}); mean ± spread over seeds; n/a: past the learned table.",
        "",
        text_table(text_rows, settings),
        "",
        f"Change from 1x to {longest}x: "
        + ", ".join(f"{s} {'n/a' if r is None else f'{r:+.0%}'}" for s, r in rises.items())
        + ".",
    ]
    relative = rises.get("relative")
    for other in ("sinusoidal", "rotary"):
        if relative is not None and rises.get(other) is not None:
            verdict = "reproduced" if rises[other] > relative + 0.05 else "not reproduced"
            lines.append(f"- Press et al. 2022 (clipped relative ~ a bias scheme, flatter than {other} past L): "
                         f"{verdict} (relative {relative:+.0%}, {other} {rises[other]:+.0%}).")  # fmt: skip
    lines += [
        "",
        f"## 2. Algorithmic: exact match at 1x, 2x, 4x of 1–{settings.train_length} inputs ({settings.eval_count} "
        "problems per length)",
        "",
        markdown_table(task_rows, settings),
        "",
    ]
    if 2 in settings.multipliers:
        for task in settings.tasks:
            at_2x = {r["scheme"]: r["2x"][0] for r in task_rows if r["task"] == task}
            absolute = {s: at_2x[s] for s in ("learned", "sinusoidal") if s in at_2x}
            if "relative" in at_2x and absolute:
                met = at_2x["relative"] >= 0.9 and max(absolute.values()) <= 0.1
                lines.append(f"- {task}, target relative ≥ 0.90 at 2x where learned and sinusoidal ≤ 0.10: "
                             f"{'met' if met else 'missed'} (relative {at_2x['relative']:.2f}; "
                             + ", ".join(f"{s} {v:.2f}" for s, v in absolute.items()) + ").")  # fmt: skip
    lines += [
        "- Not run here: copy and reverse (their needed distances exceed k at 2x; Kazemnejad et al. 2023 found small "
        "models fail at copy with every scheme), and schemes not in the registry of this version.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The best model, its card, and the whole run
# ---------------------------------------------------------------------------------------------------------------


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per symbol; adds `<s>` in front, decodes without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\S"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL)


def model_card(settings: DemoSettings, table: str, task: str, scheme: str, seed: int) -> str:
    """The best task model's card: its task, scheme and seed, the exact-match table of the run, the settings."""
    inputs, outputs = make_problem(task, 5, random.Random(0))
    example, answer = "".join(interleave(inputs, outputs)[:-1]), outputs[-1]
    config = task_config(settings, scheme)
    summary = (
        f"A {settings.layers}-layer causal [Relformer](https://pypi.org/project/hf-relformer/) trained by `relformer "
        f"demo` on the streaming task `{task}` (data generated from a seed), with the position scheme that "
        f"generalized best to longer inputs in that run: **{scheme}** (seed {seed}).\n\nEvery input digit is "
        "followed by one output symbol. Prompts are symbols without spaces (written `<s>` + symbols by the "
        f"tokenizer) ending with an input; the model writes its output: for `{example}` the answer is `{answer}`."
    )
    usage = (
        "from transformers import pipeline\n"
        "import hf_relformer  # or pass trust_remote_code=True where the package is not installed\n\n"
        'generator = pipeline("text-generation", model="PATH")\n'
        f'generator("{example}", max_new_tokens=1, do_sample=False)'
    )
    sections = [
        ("Exact match of greedy decoding, at multiples of the training length", table),
        ("Settings", f"```json\n{json.dumps(asdict(settings), indent=2)}\n```"),
    ]
    card = render_model_card(
        config, count_parameters_of(RelformerForCausalLM, config),
        title=f"Relformer length-generalization demo: `{task}` with `{scheme}` positions", summary=summary,
        sections=sections, usage=usage, plots=["accuracy.png"], tags=["length-generalization"],
    )  # fmt: skip
    return str(card)


def model_card_from_results(results: dict) -> str:
    """The card `run_demo` saves with the best model, rebuilt from the run's results.json."""
    settings = DemoSettings(**results["settings"])
    records = [{**r, "scores": {int(m): s for m, s in r["scores"].items()}} for r in results["runs"]]  # JSON keys
    task = settings.tasks[0]
    scheme, seed = best_run(records, task, settings)
    return model_card(settings, markdown_table(summarize(records, settings), settings), task, scheme, seed)


OUTPUTS = ("accuracy.png", "perplexity.png", "results.json", "report.md", "best-model")  # what the demo writes


def output_problem(output: Path) -> str | None:
    """Why the demo cannot write `output`, or None. The folder is replaced as a whole (so that an interrupted run
    leaves the previous results intact), hence a folder holding anything else is refused rather than replaced."""
    problem = _folder_problem(output)
    if problem is None and output.is_dir():
        others = sorted(path.name for path in output.iterdir() if path.name not in OUTPUTS)
        if others:
            problem = (
                f"{output} holds files the demo did not write ({', '.join(others[:5])}); the demo replaces its output "
                "folder as a whole, so choose a new or empty folder"
            )
    return problem


def run_demo(settings: DemoSettings, output: Path, progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """The whole demo: both parts, tables, plots and report, the best task model saved with a card, reloaded through
    `AutoModelForCausalLM` and run in `pipeline("text-generation")`.

    `output` gets accuracy.png, perplexity.png, results.json, report.md and best-model/ in one atomic step at the
    end: an interrupted or failed run leaves a previous output folder exactly as it was."""
    output = Path(output)
    problem = output_problem(output)
    if problem:
        raise ValueError(problem)
    started = time.perf_counter()
    text_records = run_text_part(settings, Corpus.load(), progress)
    text_rows = summarize_text(text_records, settings)
    echo(text_table(text_rows, settings))
    task_records, best = run_task_part(settings, progress)
    task_rows = summarize(task_records, settings)
    table = markdown_table(task_rows, settings)
    echo(table)
    minutes = (time.perf_counter() - started) / 60
    accuracy_png, perplexity_png = plot_accuracy(task_rows, settings), plot_perplexity(text_rows, settings)
    results = json.dumps({"settings": asdict(settings), "text_runs": text_records, "runs": task_records,
                          "minutes": minutes}, indent=2)  # fmt: skip

    task = settings.tasks[0]
    scheme, seed, model = best[task]
    card = ExtraFiles({"README.md": model_card(settings, table, task, scheme, seed), "accuracy.png": accuracy_png})
    best_model = Subfolder("best-model", model, char_tokenizer(), card)
    files = {"accuracy.png": accuracy_png, "perplexity.png": perplexity_png, "results.json": results,
             "report.md": report(text_rows, task_rows, settings, minutes)}  # fmt: skip
    save_pretrained_atomically(output, ExtraFiles(files), best_model)
    model_dir = output / "best-model"
    echo(f"best on {task} (2x, then 1x): {scheme} (seed {seed}), saved to {model_dir}")
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = pipeline("text-generation", model=str(model_dir))
    rng = random.Random(1)
    examples = []
    for size in (settings.train_length, 2 * settings.train_length):
        inputs, outputs = make_problem(task, size, rng)
        prompt = "".join(interleave(inputs, outputs)[:-1])
        text = generator(prompt, max_new_tokens=1, do_sample=False)[0]["generated_text"]
        examples.append({"prompt": prompt, "expected": outputs[-1], "generated": text[len(prompt) :]})
        echo(f"  {prompt} -> {text[len(prompt) :]}   (expected {outputs[-1]})")
    summary = {"text_table": text_table(text_rows, settings), "table": table,
               "best": {"task": task, "scheme": scheme, "seed": seed}, "reloaded_class": type(reloaded).__name__,
               "examples": examples, "minutes": (time.perf_counter() - started) / 60}  # fmt: skip
    echo(f"done in {summary['minutes']:.1f} min; tables in report.md, plots and results.json in {output}")
    return summary
