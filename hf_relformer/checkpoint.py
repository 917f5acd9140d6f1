"""The floor under the Hub tools and the converters: reading a saved checkpoint folder (its config, tensor shapes,
tokenizer and JSON files) with errors that name the file and the problem, the one rule for Hub names, the list of
code files a checkpoint ships (`MODEL_CODE`), the Auto class of each form, and the checks of a folder that loading
does not need (`checkpoint_problems`). `hf_relformer.hub` and `hf_relformer.conversion` build on it and never import
each other. Not shipped with checkpoints.
"""

import contextlib
import json
import pickle
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError, safe_open
from transformers.dynamic_module_utils import get_relative_import_files

from . import modeling_relformer
from .configuration_relformer import RelformerConfig
from .loading_relformer import CheckpointFit, pickle_refusal

PROBE_TEXT = "The quick brown fox jumps over the lazy dog near the river bank."  # a tokenizer must know its tokens

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
)

# What reading a damaged or hostile file raises: safetensors, torch.load (weights_only), transformers, GGUF, JSON
READ_ERRORS = (OSError, ValueError, RuntimeError, EOFError, struct.error, SafetensorError, pickle.UnpicklingError)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # a single-file checkpoint, in transformers' preference
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint folder (or a file in it) cannot be read or used: the message names the file and the problem."""


class UnreadableFile(CheckpointError):
    """A file that is there but cannot be read as what it should be (empty, truncated, corrupted, not JSON, a pickle
    that would run code). `path` and `reason` let a caller phrase it in its own list of problems."""

    def __init__(self, path: Path, reason: str, source: str = ""):
        super().__init__(f"{source}: cannot read {path}: {reason}" if source else f"cannot read {path}: {reason}")
        self.path, self.reason = Path(path), reason


def why_unreadable(error: BaseException, path: Path | None = None) -> str:
    """One line on why reading `path` failed with `error`: an empty file, a truncated one, invalid JSON, a pickle
    refused by `weights_only=True`, else the first sentence of the error."""
    text = str(error).strip()
    if path is not None and path.is_file() and path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    if refused_pickle(error):
        return (
            "it is a pickle that needs more than tensors to load, and unpickling it could run code, so it was refused"
            f" ({pickle_refusal(error) or 'weights_only=True'}); convert it to safetensors where you trust its origin"
        )
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON ({error})"
    if isinstance(error, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError):
        return "it is a folder, not a file"
    if isinstance(error, (EOFError, struct.error)):
        return f"the file ends too early (truncated?): {text or type(error).__name__}"
    first = text.splitlines()[0] if text else type(error).__name__
    end = first.find(". ", 120)  # long library messages: the first sentence that says what failed
    return first if end < 0 else first[: end + 1]


def refused_pickle(error: BaseException) -> bool:
    """Whether `error` is torch.load(weights_only=True) refusing a pickle that needs more than tensors."""
    return isinstance(error, pickle.UnpicklingError) and "weights_only" in str(error)


def read_json(path: Path, source: str = "") -> dict:
    """The JSON object in `path`; an `UnreadableFile` naming it when it is missing, empty, not JSON or no object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnreadableFile(path, why_unreadable(error, Path(path)), source) from error
    if not isinstance(data, dict):
        raise UnreadableFile(path, f"expected a JSON object, found {type(data).__name__}", source)
    return data


def safetensors_shapes(path: Path, source: str = "") -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the header of a safetensors file (no tensor is loaded); an `UnreadableFile`
    naming it when it is empty, truncated, corrupted or not safetensors."""
    try:
        with safe_open(path, framework="pt") as file:
            return {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        reason = why_unreadable(error, Path(path))
        if isinstance(error, SafetensorError) and reason != "the file is empty (0 bytes)":
            reason = f"not a complete safetensors file (truncated or corrupted; safetensors says: {error})"
        raise UnreadableFile(path, reason, source) from error


def folder_shapes(folder: Path, source: str = "") -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in the folder's safetensors files: an `UnreadableFile` for a damaged one, a
    `CheckpointError` when there is none."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no model.safetensors (weights are read from safetensors files only).")
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        shapes |= safetensors_shapes(path, source)
    return shapes


def check_weight_files(path: Path, source: str) -> None:
    """Refuse, naming it, a weight file that is empty or whose safetensors header is damaged (`path` a file, or a
    folder: its safetensors files, else its pickle files), before a loader gives a traceback or no file name."""
    files = [path]
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or [p for p in sorted(path.iterdir()) if p.suffix in PICKLE_SUFFIXES]
        if not files:
            raise CheckpointError(f"{source}: {path} has no weights ({' or '.join(WEIGHT_FILES)}).")
    for file in files:
        if file.stat().st_size == 0:
            raise UnreadableFile(file, "the file is empty (0 bytes)", source)
        if file.suffix == ".safetensors":
            safetensors_shapes(file, source)


def weights_file(folder: Path) -> Path | None:
    """The single weight file a folder's checkpoint is read from (safetensors preferred), or None."""
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)


def load_relformer_config(folder: Path) -> RelformerConfig:
    """The `RelformerConfig` of a saved folder; a `CheckpointError` naming config.json when it is missing, not JSON,
    not a Relformer config or has invalid values."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no config.json.")
    model_type = read_json(config_file).get("model_type")
    if model_type != RelformerConfig.model_type:
        raise CheckpointError(
            f"{config_file} does not load as a RelformerConfig: model_type is {model_type!r}, expected "
            f"{RelformerConfig.model_type!r}."
        )
    try:
        return RelformerConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{config_file} does not load as a RelformerConfig: {why_unreadable(error)}") from error


@contextlib.contextmanager
def transformers_errors_only() -> Iterator[None]:
    """Silence transformers' warnings (its load report: `load_pretrained` reports those problems itself)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def load_tokenizer(path: Path, source: str, vocab_size: int | None = None, **kwargs):
    """The source folder's tokenizer, or None when the folder has no tokenizer files. A tokenizer that turns text into
    no known tokens (its vocabulary files missing or damaged), or into ids at or above `vocab_size` (the tokenizer of
    another model), is a `CheckpointError`."""
    found = [name for name in TOKENIZER_FILES if (path / name).is_file()]
    if "gguf_file" not in kwargs and not found:
        return None
    from transformers import AutoTokenizer

    where = f"{source}: the tokenizer in {path}" if source else f"the tokenizer in {path}"
    try:
        with transformers_errors_only():
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (*READ_ERRORS, KeyError, TypeError) as error:
        raise CheckpointError(f"{where} does not load: {why_unreadable(error)}") from error
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if not ids or set(ids) <= {tokenizer.unk_token_id}:
        raise CheckpointError(
            f"{where} turns text into no known tokens: its vocabulary is missing or damaged (files found: "
            f"{', '.join(found) or kwargs.get('gguf_file')})."
        )
    if vocab_size is not None and max(ids) >= vocab_size:
        raise CheckpointError(
            f"{where} gives token id {max(ids)}, but the model's vocabulary has {vocab_size} entries: the tokenizer "
            "belongs to another model."
        )
    return tokenizer


def is_hub_name(name: str) -> bool:
    """`owner/name` as the Hub spells repository ids (huggingface_hub's own check; a local path is not one)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


# The Auto class that loads a folder of each form (the model card's snippet, the upload's check of a folder loaded
# without the package).
AUTO_CLASS_OF_FORM = {
    "decoder-only": "AutoModelForCausalLM",
    "encoder": "AutoModel",  # any encoder head; the bare model where none is named
    "encoder-decoder": "AutoModelForSeq2SeqLM",
}


def shipped_code_files() -> tuple[str, ...]:
    """The code files `save_pretrained` copies into a checkpoint: the modeling file and every file it imports, as
    transformers finds them (`get_relative_import_files`), by name."""
    modeling = Path(modeling_relformer.__file__)
    imported = (Path(name).name for name in get_relative_import_files(str(modeling)))
    return tuple(sorted({modeling.name, *imported}))


MODEL_CODE = shipped_code_files()


def checkpoint_problems(config: RelformerConfig, stored: Mapping[str, tuple[int, ...]]) -> list[str]:
    """How the stored tensors (name -> shape) differ from those of the model the config describes (its
    `architectures`' class, built on the meta device): missing, unexpected and misshapen tensors (at most five of
    each), or [] when they fit."""
    head = (config.architectures or ["RelformerModel"])[0]
    model_class = getattr(modeling_relformer, head, None)
    if not (isinstance(model_class, type) and issubclass(model_class, modeling_relformer.RelformerPreTrainedModel)):
        return [f"config.architectures names {head!r}, which is not a Relformer class."]
    with torch.device("meta"):
        fit = CheckpointFit.of_shapes(model_class(config), stored)
    problems = []
    if fit.missing:
        problems.append(f"weights missing for the config: {', '.join(fit.missing[:5])}.")
    if fit.unexpected:
        problems.append(f"weights the config's model does not have: {', '.join(fit.unexpected[:5])}.")
    problems += [
        f"{name} has shape {stored}, the config needs {needed}." for name, stored, needed in fit.mismatched[:5]
    ]
    return problems
