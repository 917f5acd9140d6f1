"""examples/chorales.py on a few real Bach chorales from music21's corpus: a short run beats the unigram baseline,
writes MIDI that parses back to four parts, and saves a folder AutoModelForCausalLM reloads; bad primers are refused
with one line naming the problem."""

import json
import math
import subprocess
import sys

import music21
import pytest
from transformers import AutoModelForCausalLM

from helpers import REPO_ROOT, load_example

SCRIPT = REPO_ROOT / "examples" / "chorales.py"


def test_split_is_committed_and_disjoint():
    split = json.loads((REPO_ROOT / "examples" / "data" / "chorales_split.json").read_text())
    parts = [set(split[name]) for name in ("train", "valid", "test")]
    assert sum(map(len, parts)) == split["kept"] == len(set.union(*parts)) > 300
    assert not parts[0] & parts[2] and not parts[1] & parts[2] and not parts[0] & parts[1]
    assert split["kept"] + len(split["dropped"]) == split["score_files"]
    assert any("duplicate of" in why for why in split["dropped"].values())


def test_grid_round_trip():
    example = load_example("chorales")
    grid = [(72, 67, 64, 48), (72, 67, None, 48), (74, 65, 62, 47), (74, 65, 62, 47)]
    ids = example.encode(grid)
    assert len(ids) == 16 and ids[6] == example.REST and example.decode(ids) == grid
    score = example.to_score(grid, bar=16)
    assert example.score_grid(score, "round trip") == grid


def test_short_run_beats_unigram_and_writes_four_part_midi(tmp_path):
    output = tmp_path / "chorales"
    command = [sys.executable, str(SCRIPT), "--output", str(output), "--limit", "10", "--steps", "40"]
    command += ["--seeds", "0", "--schemes", "relative", "--hidden-size", "64", "--layers", "2", "--block-size", "128"]
    command += ["--learning-rate", "3e-3", "--prime-bars", "1", "--bars", "2", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((output / "results.json").read_text())
    nll = results["runs"][0]["test_nll"]
    assert math.isfinite(nll) and nll < results["unigram_nll"]
    midi = music21.converter.parse(output / "continuation.mid")
    assert len(midi.parts) == 4
    assert len(music21.converter.parse(output / "continuation.musicxml").parts) == 4
    assert (output / "piano_roll.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{nll:.3f}" in (output / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.position_embedding_type == "relative"

    more = tmp_path / "more"  # generation only, primed with the MIDI just written
    example = load_example("chorales")
    argv = ["--model", str(output), "--prime", str(output / "continuation.mid"), "--output", str(more), "--bars", "1"]
    assert example.main([*argv, "--prime-bars", "1"]) == 0
    assert len(music21.converter.parse(more / "continuation.mid").parts) == 4
    assert json.loads((more / "generation.json").read_text())["generated_steps"] == 16


def three_voices(path):
    score = music21.stream.Score()
    for pitch in ("C5", "E4", "C3"):
        part = music21.stream.Part()
        part.append(music21.note.Note(pitch, quarterLength=16))
        score.insert(0, part)
    score.write("musicxml", fp=path)


def out_of_range(path):
    score = music21.stream.Score()
    for pitch in ("C7", "E4", "G3", "C3"):  # C7 (MIDI 96) is above the highest soprano note of the chorales
        part = music21.stream.Part()
        part.append(music21.note.Note(pitch, quarterLength=16))
        score.insert(0, part)
    score.write("midi", fp=path)


@pytest.mark.parametrize(
    ("make", "name", "message"),
    [
        (three_voices, "three.musicxml", "has 3 parts; a chorale needs exactly four voices"),
        (out_of_range, "high.mid", "pitch C7 (MIDI 96) is outside the vocabulary"),
    ],
)
def test_bad_primer_is_one_clear_error(tmp_path, capsys, make, name, message):
    make(tmp_path / name)
    example = load_example("chorales")
    code = example.main(["--output", str(tmp_path / "out"), "--prime", str(tmp_path / name), "--limit", "2"])
    error = capsys.readouterr().err.strip()
    assert code == 1 and len(error.splitlines()) == 1, error
    assert error.startswith("chorales.py: error: ") and message in error and name in error
    assert not (tmp_path / "out").exists()
