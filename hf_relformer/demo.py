"""`relformer demo`: train small causal Relformers on algorithmic tasks and compare position schemes on length
generalization (Ontañón et al. 2022; Kazemnejad et al. 2023).

Every model is trained on problems of size <= `train_length` and evaluated with cached greedy `generate()` at 1x, 2x
and 4x that size. The data is generated here, from a seed:
- copy:    `<s> 3 1 4 1 5 >`  ->  `3 1 4 1 5 </s>`
- reverse: `<s> 3 1 4 1 5 >`  ->  `5 1 4 1 3 </s>`
- add:     `<s> 2 1 + 5 7 =`  ->  `7 8 </s>`   (12 + 75 = 87, every number written least significant digit first)
"""

import io
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, pipeline

from .checks import check_cached_decoding
from .configuration_relformer import RelformerConfig
from .modeling_relformer import RelformerForCausalLM
from .saving import ExtraFiles, Subfolder, save_pretrained_atomically
from .saving import output_problem as _folder_problem

SYMBOLS = [str(d) for d in range(10)] + ["+", "=", ">"]
SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
VOCAB = {token: index for index, token in enumerate([*SPECIAL.values(), *SYMBOLS])}
PAD, BOS, EOS = (VOCAB[t] for t in SPECIAL.values())

# scheme name -> config overrides
SCHEMES = {
    "relative": {"position_embedding_type": "relative"},
    "relative_values": {"position_embedding_type": "relative", "relative_attention_values": True},
    "sinusoidal": {"position_embedding_type": "sinusoidal"},
    "learned": {"position_embedding_type": "learned"},
    "rotary": {"position_embedding_type": "rotary"},
    "none": {"position_embedding_type": "none"},
}


def make_problem(task: str, size: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """(prompt symbols, answer symbols) of one problem of the given size (digits, or digits per operand)."""
    digits = [str(rng.randrange(10)) for _ in range(size)]
    if task == "copy":
        return [*digits, ">"], digits
    if task == "reverse":
        return [*digits, ">"], digits[::-1]
    if task == "add":
        other = [str(rng.randrange(10)) for _ in range(size)]
        total = int("".join(digits[::-1])) + int("".join(other[::-1]))
        return [*digits, "+", *other, "="], list(str(total)[::-1])
    raise ValueError(f"unknown task {task!r}; choose from copy, reverse, add")


TASKS = ("copy", "reverse", "add")


def encode(symbols: list[str]) -> list[int]:
    return [VOCAB[s] for s in symbols]


def training_batch(task: str, train_length: int, batch_size: int, rng: random.Random) -> dict[str, torch.Tensor]:
    """Right-padded `[B, L]` input_ids, attention_mask and labels (-100 on the prompt and the padding)."""
    rows, labels = [], []
    for _ in range(batch_size):
        prompt, answer = make_problem(task, rng.randint(1, train_length), rng)
        prompt_ids, answer_ids = [BOS, *encode(prompt)], [*encode(answer), EOS]
        rows.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
    length = max(map(len, rows))
    return {
        "input_ids": torch.tensor([r + [PAD] * (length - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
        "labels": torch.tensor([r + [-100] * (length - len(r)) for r in labels]),
    }


@torch.no_grad()
def evaluate(model: RelformerForCausalLM, task: str, size: int, count: int, seed: int) -> dict[str, float]:
    """Exact-match and per-symbol accuracy of cached greedy decoding on `count` problems of one size."""
    rng = random.Random(seed)
    problems = [make_problem(task, size, rng) for _ in range(count)]
    prompts = torch.tensor([[BOS, *encode(p)] for p, _ in problems])  # one size: no padding needed
    longest = max(len(a) for _, a in problems)
    out = model.generate(prompts, max_new_tokens=longest + 1, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    exact, symbols, total = 0, 0, 0
    for row, (_, answer) in zip(out[:, prompts.shape[1] :].tolist(), problems, strict=True):
        expected = [*encode(answer), EOS]
        got = (row + [PAD] * len(expected))[: len(expected)]
        exact += got == expected
        symbols += sum(g == e for g, e in zip(got, expected, strict=True))
        total += len(expected)
    return {"exact": exact / count, "symbol": symbols / total}


def sanity_prompts(task: str, train_length: int, seed: int) -> torch.Tensor:
    """`[4, L]` prompts of the training size, for the decoding check every trained model goes through."""
    rng = random.Random(seed)
    return torch.tensor([[BOS, *encode(make_problem(task, train_length, rng)[0])] for _ in range(4)])


@dataclass
class DemoSettings:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    schemes: list[str] = field(default_factory=lambda: list(SCHEMES))
    multipliers: list[int] = field(default_factory=lambda: [1, 2, 4])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train_length: int = 8
    steps: int = 400
    batch_size: int = 64
    eval_count: int = 100
    learning_rate: float = 3e-3
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    max_distance: int = 16

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(tasks=["copy"], seeds=[0], steps=300, eval_count=50)

    def size(self, task: str, multiplier: int) -> int:
        """Problem size at a multiple of the training length (addition counts digits per operand)."""
        return (self.train_length // 2 if task == "add" else self.train_length) * multiplier

    def config(self, scheme: str) -> RelformerConfig:
        longest = 2 * self.size("add", max(self.multipliers)) + 4
        longest = max(longest, 2 * self.train_length * max(self.multipliers) + 4)
        return RelformerConfig(
            vocab_size=len(VOCAB), hidden_size=self.hidden_size, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, intermediate_size=4 * self.hidden_size,
            max_position_embeddings=longest, relative_attention_max_distance=self.max_distance,
            hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
            **SCHEMES[scheme],
        )  # fmt: skip


def train_one(settings: DemoSettings, task: str, scheme: str, seed: int) -> RelformerForCausalLM:
    """Train one model with AdamW and a linear decay; deterministic for a seed."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = RelformerForCausalLM(settings.config(scheme))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / settings.steps)
    model.train()
    for _ in range(settings.steps):
        loss = model(**training_batch(task, settings.train_length, settings.batch_size, rng)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return model.eval()


def run_experiment(settings: DemoSettings, progress: bool = True) -> tuple[list[dict], dict]:
    """Train and evaluate every (task, scheme, seed); returns one record per run and the best model per task."""
    records, best = [], {}
    runs = [(t, s, seed) for t in settings.tasks for s in settings.schemes for seed in settings.seeds]
    for task, scheme, seed in tqdm(runs, desc="training", disable=not progress):
        start = time.perf_counter()
        model = train_one(settings, task, scheme, seed)
        check_cached_decoding(model, sanity_prompts(task, settings.train_length, seed))
        scores = {
            m: evaluate(model, task, settings.size(task, m), settings.eval_count, seed=10_000 + seed)
            for m in settings.multipliers
        }
        records.append({"task": task, "scheme": scheme, "seed": seed, "seconds": time.perf_counter() - start,
                        "scores": scores})  # fmt: skip
        key = tuple(scores[m]["exact"] for m in sorted(settings.multipliers, key=lambda m: (m == 1, m)))
        if task not in best or key > best[task][0]:
            best[task] = (key, scheme, seed, model)
    return records, {task: entry[1:] for task, entry in best.items()}


def summarize(records: list[dict], settings: DemoSettings) -> list[dict]:
    """Mean and spread (population std) of exact-match accuracy over seeds, one row per (task, scheme)."""
    rows = []
    for task in settings.tasks:
        for scheme in settings.schemes:
            runs = [r for r in records if r["task"] == task and r["scheme"] == scheme]
            row = {"task": task, "scheme": scheme}
            for m in settings.multipliers:
                values = [r["scores"][m]["exact"] for r in runs]
                row[f"{m}x"] = (statistics.mean(values), statistics.pstdev(values))
                row[f"{m}x_symbol"] = statistics.mean(r["scores"][m]["symbol"] for r in runs)
            rows.append(row)
    return rows


def markdown_table(rows: list[dict], settings: DemoSettings) -> str:
    spread = len(settings.seeds) > 1
    header = ["task", "scheme", *[f"exact @ {m}x" for m in settings.multipliers]]
    header += [f"symbols @ {m}x" for m in settings.multipliers]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["task"], row["scheme"]]
        for m in settings.multipliers:
            mean, std = row[f"{m}x"]
            cells.append(f"{mean:.2f} ± {std:.2f}" if spread else f"{mean:.2f}")
        cells += [f"{row[f'{m}x_symbol']:.2f}" for m in settings.multipliers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], settings: DemoSettings) -> bytes:
    """Accuracy vs length, one line per scheme, one panel per task, as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit("relformer demo needs matplotlib for its plot: pip install 'hf-relformer[demo]'") from error
    figure, axes = plt.subplots(1, len(settings.tasks), figsize=(4.5 * len(settings.tasks), 3.6), squeeze=False)
    for axis, task in zip(axes[0], settings.tasks, strict=True):
        for row in (r for r in rows if r["task"] == task):
            means = [row[f"{m}x"][0] for m in settings.multipliers]
            stds = [row[f"{m}x"][1] for m in settings.multipliers]
            axis.errorbar(settings.multipliers, means, yerr=stds, marker="o", capsize=3, label=row["scheme"])
        axis.set(title=f"{task} (trained on size ≤ {settings.size(task, 1)})", xlabel="× training length",
                 ylabel="exact-match accuracy", ylim=(-0.05, 1.05), xticks=settings.multipliers)  # fmt: skip
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per symbol; adds `<s>` in front, decodes without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\S"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL)


def model_card(settings: DemoSettings, table: str, task: str, scheme: str, seed: int) -> str:
    template = (Path(__file__).parent / "model_cards" / "demo.md").read_text(encoding="utf-8")
    return template.format(
        task=task, scheme=scheme, seed=seed, table=table, settings=json.dumps(asdict(settings), indent=2),
        example=" ".join(make_problem(task, 5, random.Random(0))[0]),
    )  # fmt: skip


OUTPUTS = ("accuracy.png", "results.json", "best-model")  # what the demo writes in its output folder


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
    """The whole demo: train, evaluate, table + plot, save the best model with a card, reload it, generate.

    `output` gets accuracy.png, results.json and best-model/ in one atomic step at the end: an interrupted or failed
    run leaves a previous output folder exactly as it was."""
    output = Path(output)
    problem = output_problem(output)
    if problem:
        raise ValueError(problem)
    started = time.perf_counter()
    records, best = run_experiment(settings, progress)
    rows = summarize(records, settings)
    table = markdown_table(rows, settings)
    echo(table)
    png = plot(rows, settings)
    results = json.dumps({"settings": asdict(settings), "runs": records}, indent=2)

    task = settings.tasks[0]
    scheme, seed, model = best[task]
    card = ExtraFiles({"README.md": model_card(settings, table, task, scheme, seed), "accuracy.png": png})
    best_model = Subfolder("best-model", model, char_tokenizer(), card)
    save_pretrained_atomically(output, ExtraFiles({"accuracy.png": png, "results.json": results}), best_model)
    model_dir = output / "best-model"
    echo(f"best on {task} (2x, then 1x): {scheme} (seed {seed}), saved to {model_dir}")
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = pipeline("text-generation", model=str(model_dir))
    rng = random.Random(1)
    examples = []
    for size in (settings.size(task, 1), settings.size(task, 2)):
        prompt, answer = make_problem(task, size, rng)
        text = generator("".join(prompt), max_new_tokens=len(answer) + 1, do_sample=False)[0]["generated_text"]
        examples.append({"prompt": "".join(prompt), "expected": "".join(answer), "generated": text[len(prompt) :]})
        echo(f"  {''.join(prompt)} -> {text[len(prompt) :]}   (expected {''.join(answer)})")
    summary = {"table": table, "best": {"task": task, "scheme": scheme, "seed": seed},
               "reloaded_class": type(reloaded).__name__, "examples": examples,
               "minutes": (time.perf_counter() - started) / 60}  # fmt: skip
    echo(f"done in {summary['minutes']:.1f} min; table, accuracy.png and results.json in {output}")
    return summary
