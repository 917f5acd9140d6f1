"""Music Transformer on the Bach chorales: held-out NLL of relative against absolute positions, then MIDI out.

    python examples/chorales.py --output outputs/chorales                 # 5 schemes x 3 seeds, table, generation
    python examples/chorales.py --output outputs/mine --prime my.mid      # the same, primed with your chorale
    python examples/chorales.py --model outputs/chorales --output outputs/more --prime my.musicxml   # generate only
    python examples/chorales.py --write-split                             # rebuild examples/data/chorales_split.json

Data (Huang et al. 2018, "Music Transformer"): the four-part Bach chorales in music21's corpus, quantized to a
16th-note grid and serialized per time step as soprano, alto, tenor, bass, then the next step. One token per MIDI
pitch (36-81, the range of the corpus) plus a rest token; there is no hold token: a held note repeats its pitch at
every 16th, so decoding merges repeated pitches into one note. The split by chorale is committed
(`examples/data/chorales_split.json`, with every dropped score and why). Training windows of `--block-size` tokens
start on a time step and are transposed by up to `--transpose` semitones (training split only).

Every scheme (relative keys, relative keys+values, sinusoidal, learned absolute, FIRE) is trained on the same windows,
for the same steps, from the same init seed; the held-out NLL per token (nats) and per 16th-note step (4 tokens) is
measured on non-overlapping blocks of the test chorales, beside a unigram baseline. The first model (relative keys,
first seed) is saved with a model card, reloaded through AutoModelForCausalLM, primed with the opening bars of a test
chorale (or `--prime FILE`, MusicXML or MIDI) and continued by sampling with the key/value cache; the continuation is
written as MIDI, MusicXML and a piano roll that marks where the primer ends, all in one atomic write of `--output`.
"""

import argparse
import io
import json
import math
import statistics
import sys
import tempfile
import time
import zlib
from collections import Counter
from fractions import Fraction
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hf_relformer import RelformerConfig, RelformerForCausalLM
from hf_relformer.checks import DecodingCheckError, check_cached_decoding
from hf_relformer.cli import run_command
from hf_relformer.demo import SCHEMES
from hf_relformer.model_card import count_parameters_of, model_card
from hf_relformer.saving import ExtraFiles, output_problem, save_pretrained_atomically
from hf_relformer.variants import with_horizon

try:
    import music21
except ImportError:  # an optional dependency: the examples extra
    music21 = None

SPLIT = Path(__file__).resolve().parent / "data" / "chorales_split.json"
VOICES = ("soprano", "alto", "tenor", "bass")
LOWEST, HIGHEST = 36, 81  # MIDI range of the four-part chorales in music21's corpus (C2 to A5)
PAD, REST = 0, 1
VOCAB_SIZE = 2 + HIGHEST - LOWEST + 1
SCORE_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn")  # the corpus' other Bach files are roman-numeral analyses
FULL_SCHEMES = ("relative", "relative_values", "sinusoidal", "learned", "fire")


class ChoraleError(ValueError):
    """A score that cannot be read as a four-voice chorale on the 16th-note grid of this vocabulary."""


def require_music21() -> None:
    if music21 is None:
        raise SystemExit("chorales.py needs music21: pip install 'hf-relformer[examples]' (or 'music21>=10.5')")


def pitch_name(midi: int) -> str:
    return f"{music21.pitch.Pitch(midi=midi).nameWithOctave} (MIDI {midi})"


def score_grid(score, name: str, check_range: bool = True) -> list[tuple[int | None, ...]]:
    """One `(soprano, alto, tenor, bass)` tuple of MIDI pitches (None: rest) per 16th note of `score`.

    Raises ChoraleError naming the problem: not four parts, a chord within a part, an onset or duration finer than a
    16th note, or (with `check_range`) a pitch outside the vocabulary. Grace notes are left out (they take no time)."""
    parts = list(score.parts)
    if len(parts) != 4:
        raise ChoraleError(f"{name} has {len(parts)} parts; a chorale needs exactly four voices ({', '.join(VOICES)})")
    length = math.ceil(score.highestTime * 4)
    voices = []
    for voice, part in zip(VOICES, parts, strict=True):
        cells: list[int | None] = [None] * length
        for element in part.flatten().notesAndRests:
            if element.duration.isGrace:
                continue
            where = f"{name}, {voice} (part {VOICES.index(voice) + 1}), at quarter note {float(element.offset):g}"
            start, duration = Fraction(element.offset) * 4, Fraction(element.quarterLength) * 4
            if start.denominator != 1 or duration.denominator != 1:
                raise ChoraleError(f"{where}: onset or duration finer than a 16th note")
            if isinstance(element, music21.chord.Chord):
                raise ChoraleError(f"{where}: a chord; each voice must sing one note at a time")
            if isinstance(element, music21.note.Note):
                midi = element.pitch.midi
                if check_range and not LOWEST <= midi <= HIGHEST:
                    raise ChoraleError(
                        f"{where}: pitch {pitch_name(midi)} is outside the vocabulary "
                        f"({pitch_name(LOWEST)} to {pitch_name(HIGHEST)})"
                    )
                cells[int(start) : int(start + duration)] = [midi] * int(duration)
        voices.append(cells[:length])
    return list(zip(*voices, strict=True))


def encode(grid: list[tuple[int | None, ...]]) -> list[int]:
    """Token ids, four per step: soprano, alto, tenor, bass."""
    return [REST if midi is None else 2 + midi - LOWEST for step in grid for midi in step]


def decode(ids: list[int]) -> list[tuple[int | None, ...]]:
    """The grid of token ids (a length that is a multiple of 4, starting with a soprano)."""
    cells = [None if i in (PAD, REST) else i - 2 + LOWEST for i in ids]
    return [tuple(cells[i : i + 4]) for i in range(0, len(cells) - len(cells) % 4, 4)]


def corpus_root() -> Path:
    return Path(music21.common.getCorpusFilePath())


def parse(path: Path):
    try:
        return music21.converter.parse(path)
    except Exception as error:  # music21 raises many kinds on files it cannot read
        raise ChoraleError(f"{path}: cannot be read as MusicXML or MIDI ({type(error).__name__}: {error})") from None


def build_split() -> dict:
    """Every Bach score in music21's corpus: four-part chorales on the 16th grid, duplicates (identical notes)
    dropped, split 80/10/10 by a hash of the file name."""
    root = corpus_root()
    paths = sorted(p for p in music21.corpus.getComposer("bach") if p.suffix in SCORE_SUFFIXES)
    kept, dropped, seen, steps = [], {}, {}, 0
    for path in paths:
        name = path.relative_to(root).as_posix()
        try:
            grid = score_grid(parse(path), name)
        except ChoraleError as error:
            dropped[name] = str(error).removeprefix(f"{name}, ").removeprefix(f"{name} ")
            continue
        content = tuple(grid)
        if content in seen:
            dropped[name] = f"duplicate of {seen[content]} (identical notes)"
            continue
        seen[content] = name
        kept.append(name)
        steps += len(grid)
    split = {"train": [], "valid": [], "test": []}
    for name in kept:
        bucket = zlib.crc32(Path(name).name.encode()) % 10
        split["test" if bucket == 0 else "valid" if bucket == 1 else "train"].append(name)
    return {
        "about": "Bach chorales of music21's corpus: four voices on a 16th-note grid; split by chorale",
        "music21": music21.__version__,
        "score_files": len(paths),
        "kept": len(kept),
        "sixteenth_steps": steps,
        **split,
        "dropped": dropped,
    }


def load_chorales(names: list[str]) -> list[list[int]]:
    root = corpus_root()
    return [encode(score_grid(parse(root / name), name)) for name in names]


def transpose(ids: torch.Tensor, shift: int) -> torch.Tensor:
    return torch.where(ids > REST, ids + shift, ids)


class Windows:
    """Training batches: windows of `block` tokens starting on a time step of a random training chorale (chosen in
    proportion to its length), transposed by a random shift in [-max_shift, max_shift] that keeps every pitch in the
    vocabulary. Shorter chorales are padded (labels -100). Deterministic for a seed, and the same for every model."""

    def __init__(self, chorales: list[list[int]], block: int, max_shift: int, seed: int):
        self.chorales = [torch.tensor(c) for c in chorales]
        self.block, self.max_shift = block, max_shift
        self.weights = torch.tensor([len(c) for c in chorales], dtype=torch.float)
        self.generator = torch.Generator().manual_seed(seed)

    def shift_range(self, ids: torch.Tensor) -> tuple[int, int]:
        pitches = ids[ids > REST] - 2 + LOWEST
        if len(pitches) == 0:
            return 0, 0
        return max(-self.max_shift, LOWEST - int(pitches.min())), min(self.max_shift, HIGHEST - int(pitches.max()))

    def batch(self, size: int) -> dict[str, torch.Tensor]:
        rows = torch.full((size, self.block), PAD)
        picks = torch.multinomial(self.weights, size, replacement=True, generator=self.generator)
        for row, pick in enumerate(picks.tolist()):
            chorale = self.chorales[pick]
            steps = max(1, (len(chorale) - self.block) // 4 + 1)
            start = 4 * int(torch.randint(steps, (), generator=self.generator))
            window = chorale[start : start + self.block]
            low, high = self.shift_range(window)
            shift = int(torch.randint(low, high + 1, (), generator=self.generator))
            rows[row, : len(window)] = transpose(window, shift)
        mask = (rows != PAD).long()
        return {"input_ids": rows, "attention_mask": mask, "labels": rows.masked_fill(mask == 0, -100)}


def blocks(chorales: list[list[int]], block: int) -> list[list[int]]:
    """Non-overlapping evaluation blocks of each chorale (the last one shorter); every block starts on a step."""
    return [c[i : i + block] for c in chorales for i in range(0, len(c), block) if len(c[i : i + block]) > 1]


@torch.no_grad()
def heldout_nll(model: RelformerForCausalLM, chorales: list[list[int]], block: int, batch: int = 32) -> float:
    """Mean NLL (nats) of every token but the first of each block, given the tokens before it in its block."""
    model.eval()
    total, count = 0.0, 0
    pieces = blocks(chorales, block)
    for i in range(0, len(pieces), batch):
        group = pieces[i : i + batch]
        ids = torch.full((len(group), max(len(p) for p in group)), PAD)
        for row, piece in enumerate(group):
            ids[row, : len(piece)] = torch.tensor(piece)
        mask = (ids != PAD).long()
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum"))
        count += int((targets != -100).sum())
    return total / count


def unigram_nll(train: list[list[int]], heldout: list[list[int]], block: int) -> float:
    """NLL of the same held-out tokens under the training split's token frequencies (add-one smoothed)."""
    counts = Counter(token for chorale in train for token in chorale)
    total = sum(counts.values()) + VOCAB_SIZE - 1  # every token but PAD gets one extra count
    targets = [token for piece in blocks(heldout, block) for token in piece[1:]]
    return -sum(math.log((counts[t] + 1) / total) for t in targets) / len(targets)


def make_config(scheme: str, args: argparse.Namespace) -> RelformerConfig:
    return RelformerConfig(
        vocab_size=VOCAB_SIZE, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden_size,
        max_position_embeddings=max(args.block_size, 1024), hidden_dropout=args.dropout, attention_dropout=0.0,
        scale_embedding=True, pad_token_id=PAD, bos_token_id=None, eos_token_id=None,
        **with_horizon(SCHEMES[scheme], args.max_distance),
    )  # fmt: skip


def train_one(scheme: str, seed: int, train: list[list[int]], args: argparse.Namespace) -> RelformerForCausalLM:
    """AdamW with warm-up and linear decay; deterministic for a seed; every scheme sees the same batches."""
    torch.manual_seed(seed)
    model = RelformerForCausalLM(make_config(scheme, args))
    windows = Windows(train, args.block_size, args.transpose, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, (args.steps - step) / (args.steps - warmup + 1))
    )
    model.train()
    for _ in range(args.steps):
        model(**windows.batch(args.batch_size)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return model.eval()


def primer_grid(path: Path, bars: int) -> tuple[list[tuple[int | None, ...]], int]:
    """The first `bars` full bars (plus any pickup) of the chorale in `path`, and the 16th steps per bar."""
    score = parse(path)
    grid = score_grid(score, str(path))
    signature = next(iter(score.recurse().getElementsByClass(music21.meter.TimeSignature)), None)
    bar = int(signature.barDuration.quarterLength * 4) if signature else 16
    measures = list(score.parts[0].getElementsByClass(music21.stream.Measure))
    pickup = int(measures[0].duration.quarterLength * 4) if measures and measures[0].number == 0 else 0
    steps = pickup + bars * bar
    if len(grid) < steps:
        raise ChoraleError(f"{path} has {len(grid)} sixteenth steps, fewer than the {steps} of {bars} bars to prime")
    return grid[:steps], bar


def to_score(grid: list[tuple[int | None, ...]], bar: int):
    """A four-part music21 score of the grid: repeated pitches are merged into one note (there is no hold token)."""
    score = music21.stream.Score()
    signature = f"{bar // 4}/4" if bar % 4 == 0 else f"{bar // 2}/8"
    for index, voice in enumerate(VOICES):
        part = music21.stream.Part(id=voice)
        part.partName = voice.capitalize()
        part.append(music21.meter.TimeSignature(signature))
        cells = [step[index] for step in grid]
        start = 0
        while start < len(cells):
            end = start
            while end < len(cells) and cells[end] == cells[start]:
                end += 1
            element = music21.note.Rest() if cells[start] is None else music21.note.Note(midi=cells[start])
            element.quarterLength = (end - start) / 4
            part.append(element)
            start = end
        score.insert(0, part)
    return score


def written(score, fmt: str, suffix: str) -> bytes:
    with tempfile.TemporaryDirectory() as scratch:
        return Path(score.write(fmt, fp=Path(scratch) / f"out{suffix}")).read_bytes()


def piano_roll(grid: list[tuple[int | None, ...]], primer_steps: int, bar: int, title: str) -> bytes:
    """PNG: one colour per voice, time in bars, a line where the primer ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 3.4))
    for index, (voice, colour) in enumerate(zip(VOICES, ("C3", "C2", "C0", "C4"), strict=True)):
        cells = [step[index] for step in grid]
        spans, start = [], 0
        while start < len(cells):
            end = start
            while end < len(cells) and cells[end] == cells[start]:
                end += 1
            if cells[start] is not None:
                spans.append((start, end - start, cells[start]))
            start = end
        for pitch in {p for _, _, p in spans}:
            bars = [(s / bar, n / bar * 0.97) for s, n, p in spans if p == pitch]
            axis.broken_barh(bars, (pitch - 0.4, 0.8), color=colour, label=voice if pitch == spans[0][2] else None)
    axis.axvline(primer_steps / bar, color="black", linestyle="--", linewidth=1)
    axis.text(primer_steps / bar, HIGHEST + 1, " primer ends", va="bottom", fontsize=8)
    axis.set(xlabel="bars", ylabel="MIDI pitch", title=title, ylim=(LOWEST - 2, HIGHEST + 4))
    axis.set_xlim(0, len(grid) / bar)
    axis.grid(alpha=0.25)
    axis.legend(fontsize=8, loc="lower right", ncol=4)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


def continue_chorale(model, primer: list[tuple[int | None, ...]], bar: int, bars: int, seed: int) -> list[int]:
    """Sample `bars` bars after the primer with cached generate() (temperature 1, no padding token)."""
    torch.manual_seed(seed)
    prompt = torch.tensor([encode(primer)])
    out = model.generate(prompt, max_new_tokens=4 * bar * bars, do_sample=True, top_k=0, suppress_tokens=[PAD],
                         pad_token_id=PAD)  # fmt: skip
    return out[0].tolist()


def generation_files(model, primer_path: Path, args: argparse.Namespace) -> tuple[dict[str, bytes | str], dict]:
    """Generate from `model` (already reloaded from its folder) and return the files of the continuation."""
    primer, bar = primer_grid(primer_path, args.prime_bars)
    ids = continue_chorale(model, primer, bar, args.bars, args.seeds[0])
    grid = decode(ids)
    score = to_score(grid, bar)
    title = f"{primer_path.name}: {args.prime_bars} bars primed, {args.bars} bars sampled"
    files = {
        "continuation.mid": written(score, "midi", ".mid"),
        "continuation.musicxml": written(score, "musicxml", ".musicxml"),
        "piano_roll.png": piano_roll(grid, len(primer), bar, title),
    }
    about = {"primer": primer_path.name, "primer_steps": len(primer), "steps_per_bar": bar, "bars": args.bars,
             "generated_steps": len(grid) - len(primer)}  # fmt: skip
    return files, about


def summarize(records: list[dict], schemes: list[str]) -> list[dict]:
    """Mean and spread (population std) over seeds of the held-out NLL, one row per scheme."""
    rows = []
    for scheme in schemes:
        values = [r["test_nll"] for r in records if r["scheme"] == scheme]
        valid = [r["valid_nll"] for r in records if r["scheme"] == scheme]
        rows.append({"scheme": scheme, "seeds": len(values), "mean": statistics.mean(values),
                     "spread": statistics.pstdev(values), "valid_mean": statistics.mean(valid),
                     "seconds": statistics.mean(r["seconds"] for r in records if r["scheme"] == scheme)})  # fmt: skip
    return rows


SCHEME_LABELS = {
    "relative": "relative keys (Shaw)",
    "relative_values": "relative keys + values",
    "sinusoidal": "sinusoidal absolute",
    "learned": "learned absolute",
    "fire": "FIRE (learned MLP of the log distance)",
}


def markdown_table(rows: list[dict], unigram: float, max_distance: int) -> str:
    lines = [
        "| positions | test NLL / token (nats) | test NLL / 16th step | valid NLL / token | train time / model |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        label = SCHEME_LABELS.get(row["scheme"], row["scheme"])
        if row["scheme"].startswith("relative"):
            label += f", k = {max_distance}"
        lines.append(
            f"| {label} | {row['mean']:.3f} ± {row['spread']:.3f} | {4 * row['mean']:.3f} ± {4 * row['spread']:.3f} "
            f"| {row['valid_mean']:.3f} | {row['seconds']:.0f} s |"
        )
    lines.append(f"| unigram baseline (training frequencies) | {unigram:.3f} | {4 * unigram:.3f} | — | — |")
    return "\n".join(lines)


USAGE = """import torch
from transformers import AutoModelForCausalLM
import hf_relformer  # or pass trust_remote_code=True where the package is not installed

model = AutoModelForCausalLM.from_pretrained("PATH")
primer = torch.tensor([[38, 33, 30, 14] * 8])  # 8 sixteenths of a C major chord: C5 G4 E4 C3 (ids = MIDI - 34)
ids = model.generate(primer, max_new_tokens=64, do_sample=True, top_k=0, suppress_tokens=[0], pad_token_id=0)"""


def card_text(results: dict, split: dict) -> str:
    """The saved model's card, from what the run writes to results.json (settings, table, chorale counts, saved
    model, minutes, and generation when there was one) and the committed split."""
    args = argparse.Namespace(**results["settings"])
    scheme, seed = results["saved_model"]["scheme"], results["saved_model"]["seed"]
    config = make_config(scheme, args)
    counts, generation = results["chorales"], results.get("generation")
    summary = (
        "A causal [Relformer](https://pypi.org/project/hf-relformer/) trained from scratch by `examples/chorales.py` "
        f"on the four-part J.S. Bach chorales of music21's corpus (music21 {split['music21']}; the scores are public "
        'domain), as in Huang et al. 2018 ("Music Transformer"): a 16th-note grid, four tokens per step (soprano, '
        "alto, tenor, bass), one token per MIDI pitch 36–81 plus a rest token (id 1; id 0 is padding), no hold "
        "token (a held note repeats its pitch every 16th). Token id = MIDI pitch − 34."
    )
    data = (
        f"Of {split['score_files']} Bach score files, {split['kept']} are kept: {len(split['dropped'])} are dropped "
        "(not four parts, an onset or duration finer than a 16th, or a duplicate of another chorale's notes; the "
        f"list and reasons are in `examples/data/chorales_split.json`). Split by chorale, fixed and committed: "
        f"{counts['train']} train, {counts['valid']} valid, {counts['test']} test used here. Training windows of "
        f"{args.block_size} tokens ({args.block_size // 4} sixteenths) start on a time step and are transposed by up "
        f"to ±{args.transpose} semitones (training split only)."
    )
    settings = (
        f"{args.layers} layers, hidden {args.hidden_size}, {args.heads} heads, MLP 4× hidden, token embeddings scaled "
        f"by sqrt(hidden), dropout {args.dropout}; k = {args.max_distance} tokens for relative positions; AdamW, "
        f"learning rate {args.learning_rate}, warm-up then linear decay, {args.steps} steps of {args.batch_size} "
        f"windows; seeds {', '.join(map(str, args.seeds))}. Every scheme saw the same windows for a seed. Held-out "
        f"NLL: non-overlapping blocks of {args.block_size} tokens of the test chorales, every token but each block's "
        "first."
    )
    table = (
        f"{results['table']}\n\nMean ± spread (population std) over the seeds. The whole run took "
        f"{results['minutes']:.1f} min on a 2-core CPU machine shared with other jobs."
    )
    sections = [("Data and split", data), ("Settings", settings), ("Held-out NLL", table)]
    if generation:
        sections.append(("Generation", (
            f"Primed with {generation['primer_steps']} sixteenths of `{generation['primer']}` and sampled for "
            f"{generation['bars']} bars (temperature 1, cached `generate()`): `continuation.mid`, "
            "`continuation.musicxml` and `piano_roll.png` in this folder."
        )))  # fmt: skip
    card = model_card(
        config, count_parameters_of(RelformerForCausalLM, config),
        title=f"Relformer Bach chorale model ({SCHEME_LABELS.get(scheme, scheme)}, seed {seed})", summary=summary,
        sections=sections, usage=USAGE, tags=["music", "bach-chorales"], plots=["piano_roll.png"] if generation else [],
        intended_use="A small demonstration of relative attention on symbolic music; it writes chorale-flavoured "
        "exercises.",
    )  # fmt: skip
    return str(card)


def run(args: argparse.Namespace) -> None:
    """Train every scheme and seed, evaluate, save the first model with its card, reload it, generate."""
    started = time.monotonic()
    split = json.loads(SPLIT.read_text(encoding="utf-8"))
    limit = args.limit or None
    names = {part: split[part][:limit] for part in ("train", "valid", "test")}
    if args.prime is not None:
        primer_grid(args.prime, args.prime_bars)  # a bad primer fails now, not after training
    data = {part: load_chorales(names[part]) for part in names}
    print(f"{', '.join(f'{len(data[p])} {p}' for p in data)} chorales "
          f"({sum(len(c) for c in data['train']) // 4} training steps of a 16th); loaded in "
          f"{time.monotonic() - started:.0f} s")  # fmt: skip
    unigram = unigram_nll(data["train"], data["test"], args.block_size)
    records, kept = [], None
    for scheme in args.schemes:
        for seed in args.seeds:
            start = time.monotonic()
            model = train_one(scheme, seed, data["train"], args)
            seconds = time.monotonic() - start
            check_cached_decoding(model, torch.tensor([data["test"][0][:32]]))
            record = {"scheme": scheme, "seed": seed, "seconds": seconds,
                      "valid_nll": heldout_nll(model, data["valid"], args.block_size),
                      "test_nll": heldout_nll(model, data["test"], args.block_size)}  # fmt: skip
            records.append(record)
            print(f"{scheme:>16} seed {seed}: test NLL {record['test_nll']:.4f} nats/token, "
                  f"valid {record['valid_nll']:.4f} ({seconds:.0f} s)", flush=True)  # fmt: skip
            if kept is None:
                kept = (scheme, seed, model)
    rows = summarize(records, args.schemes)
    table = markdown_table(rows, unigram, args.max_distance)
    print(table)

    scheme, seed, model = kept
    primer_path = args.prime or corpus_root() / names["test"][0]
    results = {
        "table": table, "rows": rows, "runs": records, "unigram_nll": unigram,
        "chorales": {part: len(names[part]) for part in names}, "saved_model": {"scheme": scheme, "seed": seed},
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:  # generation runs on the model as reloaded from a saved folder
        model.save_pretrained(scratch)
        reloaded = AutoModelForCausalLM.from_pretrained(scratch)
        files, results["generation"] = generation_files(reloaded, primer_path, args)
    results["minutes"] = (time.monotonic() - started) / 60
    card = card_text(results, split)
    extra = {"README.md": card, "results.json": json.dumps(results, indent=2) + "\n", **files}
    save_pretrained_atomically(args.output, reloaded, ExtraFiles(extra))
    print(f"saved {scheme} (seed {seed}) with continuation.mid, continuation.musicxml and piano_roll.png to "
          f"{args.output} ({results['minutes']:.1f} min)")  # fmt: skip


def generate_only(args: argparse.Namespace) -> None:
    """Continue a chorale with a saved model folder; writes the continuation files to `--output`."""
    primer_path = args.prime or corpus_root() / json.loads(SPLIT.read_text(encoding="utf-8"))["test"][0]
    primer_grid(primer_path, args.prime_bars)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    files, about = generation_files(model, primer_path, args)
    save_pretrained_atomically(args.output, ExtraFiles({**files, "generation.json": json.dumps(about, indent=2)}))
    print(f"wrote continuation.mid, continuation.musicxml and piano_roll.png to {args.output}")


def write_split() -> None:
    split = build_split()
    SPLIT.write_text(json.dumps(split, indent=1) + "\n", encoding="utf-8")
    counts = ", ".join(f"{len(split[part])} {part}" for part in ("train", "valid", "test"))
    print(f"{split['kept']} of {split['score_files']} scores kept: {counts}; {len(split['dropped'])} dropped")
    print(f"wrote {SPLIT}")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chorales.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("outputs/chorales"), help="output folder")
    parser.add_argument("--prime", type=Path, help="a four-voice chorale (MusicXML or MIDI) to continue")
    parser.add_argument("--model", type=Path, help="generate only, with this saved model folder")
    parser.add_argument("--write-split", action="store_true", help=f"rebuild {SPLIT.name} from the corpus and exit")
    parser.add_argument("--schemes", nargs="+", default=list(FULL_SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=positive, default=300)
    parser.add_argument("--batch-size", type=positive, default=8)
    parser.add_argument("--block-size", type=positive, default=256, help="tokens per window (4 per 16th step)")
    parser.add_argument("--hidden-size", type=positive, default=128)
    parser.add_argument("--layers", type=positive, default=3)
    parser.add_argument("--heads", type=positive, default=4)
    parser.add_argument("--max-distance", type=positive, default=64, help="k of relative positions, in tokens")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--transpose", type=int, default=3, help="largest transposition (semitones) in training")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N chorales of each split (0 = all)")
    parser.add_argument("--prime-bars", type=positive, default=2, help="full bars of the primer (after any pickup)")
    parser.add_argument("--bars", type=positive, default=4, help="bars to sample after the primer")
    parser.add_argument("--threads", type=positive, help="torch CPU threads (1 was fastest on a busy 2-core machine)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    require_music21()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.write_split:
        write_split()
        return 0
    if args.block_size % 4:
        parser.error("--block-size must be a multiple of 4 (one token per voice and step)")
    problem = output_problem(args.output)
    if problem:
        parser.error(f"--output: {problem}")
    if args.prime is not None and not args.prime.is_file():
        parser.error(f"--prime: {args.prime} is not a file")
    work = (lambda: generate_only(args)) if args.model else (lambda: run(args))
    return run_command("chorales.py", work, (ChoraleError, OSError, DecodingCheckError), f"{args.output} is unchanged.")


if __name__ == "__main__":
    sys.exit(main())
