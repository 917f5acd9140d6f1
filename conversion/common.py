"""What every converter shares: taking source tensors by name, building the Relformer, verifying it, writing it.

A converter (one module per source in this package) turns its input into a `Conversion`: the Relformer model with
the source's weights, a reference function that runs the source itself, and sample inputs. `verify` runs both and
reports the largest difference; `write_folder` writes the complete checkpoint folder in one atomic step.

Reading files is shared by every command (`read_json`, `safetensors_shapes`, `check_weight_files`, `load_pretrained`,
`load_tokenizer`, `read_state_dict`, `load_relformer_config`; how tensors fit a config is `modeling_relformer`'s
`CheckpointFit`): a damaged, empty, truncated or
mismatched file is a `ConversionError` (`UnreadableFile` for a file that cannot be read at all) naming the file and
the problem, and pickles are only ever read with `weights_only=True`.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_relformer import RelformerConfig
from hf_relformer.checkpoint import (  # the floor's folder readers, used by the converters too
    READ_ERRORS,
    TOKENIZER_FILES,
    WEIGHT_FILES,
    CheckpointError,
    UnreadableFile,
    check_weight_files,
    read_json,
    refused_pickle,
    transformers_errors_only,
    weights_file,
    why_unreadable,
)
from hf_relformer.loading_relformer import CheckpointFit
from hf_relformer.positions_relformer import POSITION_SCHEMES
from hf_relformer.saving import ExtraFiles, save_pretrained_atomically

TOLERANCE = 1e-4
SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Relative positions let a model compare tokens by their distance, not their index.",
]


class ConversionError(CheckpointError):
    """The input cannot be converted: the message names the file, tensor or setting at fault."""


class SourceTensors:
    """The source's state dict. Each tensor is taken once, by name, with its shape checked; `check_all_used`
    then refuses tensors nobody took (an architecture variant this converter does not know)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], source: str, progress: bool = True):
        self.tensors = dict(tensors)
        self.source = source
        self.used: set[str] = set()
        self.bar = tqdm(total=len(self.tensors), desc="Mapping tensors", unit="tensor", disable=not progress)

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor `name`, detached, as fp32 (a `ConversionError` naming it when missing or misshapen)."""
        if name not in self.tensors:
            raise ConversionError(f"{self.source}: tensor {name!r} is missing from the checkpoint.")
        tensor = self.tensors[name]
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ConversionError(
                f"{self.source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)} "
                "from the config."
            )
        if name not in self.used:
            self.used.add(name)
            self.bar.update()
        return tensor.detach().to(torch.float32)

    def skip(self, names: Iterable[str]) -> None:
        """Mark tensors the Relformer does not need (e.g. BERT's pooler) as handled."""
        for name in names:
            if name in self.tensors and name not in self.used:
                self.used.add(name)
                self.bar.update()

    def output_layer(self, name: str, target: str, tied: bool, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """An untied output layer as `{target: weight}`; a tied one is the token embedding, so nothing to map."""
        if tied:
            self.skip([name])
            return {}
        return {target: self.take(name, shape)}

    def has(self, name: str) -> bool:
        return name in self.tensors

    def check_all_used(self) -> None:
        self.bar.close()
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            shown = ", ".join(repr(name) for name in unused[:5])
            more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
            raise ConversionError(
                f"{self.source}: the checkpoint has tensors this converter does not know: {shown}{more} "
                "(an unsupported variant of the architecture)."
            )


@dataclass
class Conversion:
    """A converted model, the source it must agree with, and what to write beside it."""

    model: torch.nn.Module  # a Relformer model (any head), eval mode, fp32
    reference: Callable[[dict[str, torch.Tensor]], torch.Tensor]  # source output on the sample inputs
    inputs: dict[str, torch.Tensor]  # sample inputs; `attention_mask` marks the positions that are compared
    source: str  # converter name, e.g. "gpt2"
    source_name: str  # what the source calls itself (model name or folder name, never a full path)
    output_name: str = "logits"  # which model output is compared ("logits" or "last_hidden_state")
    tokenizer: object | None = None  # saved with the model when the source has no tokenizer files to copy
    tokenizer_dir: Path | None = None  # the source folder whose tokenizer files are copied
    generation_config: object | None = None
    notes: list[str] = field(default_factory=list)
    positions_reinitialised: bool = False
    compare_mask: torch.Tensor | None = None  # `[B, L]` output positions to compare (default: attention_mask)


def relformer_config(**kwargs) -> RelformerConfig:
    """A `RelformerConfig` for a converted model: no dropout (the source's are runtime settings), fp32. Special token
    ids outside the source's vocabulary (which transformers only warns about) are dropped with a warning."""
    kwargs.setdefault("hidden_dropout", 0.0)
    kwargs.setdefault("attention_dropout", 0.0)
    vocab_size = kwargs.get("vocab_size")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = kwargs.get(name)
        if isinstance(vocab_size, int) and isinstance(value, int) and not 0 <= value < vocab_size:
            warnings.warn(
                f"the source's {name}={value} is outside its vocabulary of {vocab_size}: dropped.", stacklevel=2
            )
            kwargs[name] = None
    try:
        return RelformerConfig(**kwargs)
    except ValueError as error:
        raise ConversionError(f"the source's settings give an invalid Relformer config: {error}") from error


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], allow_missing: Callable[[str], bool]):
    """Copy `state_dict` into `model`, refusing any name or shape the model does not have, and any model tensor
    left unset (other than tied ones and those `allow_missing` accepts, e.g. freshly initialised positions)."""
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    for name, tensor in state_dict.items():
        if name not in expected:
            raise ConversionError(f"internal mapping error: the Relformer has no tensor {name!r}.")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ConversionError(
                f"tensor {name!r}: the source gives shape {tuple(tensor.shape)}, the Relformer expects "
                f"{tuple(expected[name].shape)}."
            )
    missing = [n for n in expected if n not in state_dict and n not in tied and not allow_missing(n)]
    if missing:
        raise ConversionError(f"the source has no tensor for {', '.join(missing[:5])}.")
    model.load_state_dict(state_dict, strict=False)
    model.tie_weights()
    return model.eval()


def sample_inputs(tokenizer, vocab_size: int, token_types: bool = False) -> dict[str, torch.Tensor]:
    """`SAMPLE_TEXT` through the source's tokenizer (right padding), or seeded random ids without one."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, vocab_size, (2, 16), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, -4:] = 0
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    tokenizer = copy.deepcopy(tokenizer)  # the padding settings below must not reach the saved tokenizer
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    batch = tokenizer(SAMPLE_TEXT, padding=True, return_tensors="pt", return_token_type_ids=token_types)
    return dict(batch)


def model_output(conversion: Conversion, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return getattr(conversion.model(**inputs), conversion.output_name)


def verify(conversion: Conversion) -> float:
    """Largest absolute difference between the converted model and the source over the real (unpadded) tokens."""
    with torch.no_grad():
        expected = conversion.reference(conversion.inputs).float()
    actual = model_output(conversion, conversion.inputs).float()
    if expected.shape != actual.shape:
        raise ConversionError(f"verification: source output {tuple(expected.shape)} vs {tuple(actual.shape)}.")
    real = (
        conversion.compare_mask if conversion.compare_mask is not None else conversion.inputs["attention_mask"]
    ).bool()
    if not bool(torch.isfinite(actual[real]).all()):
        return float("inf")
    return float((expected[real] - actual[real]).abs().max())


def write_folder(
    conversion: Conversion, output: Path, card: str, results: dict, check: object = None, progress: bool = True
) -> Path:
    """Model (safetensors, config, generation config, modeling code), tokenizer, card and results, atomically;
    `check` (an object with `save_pretrained(folder)`) runs last on the complete staging folder and may refuse it."""
    model = conversion.model
    if conversion.generation_config is not None:
        model.generation_config = conversion.generation_config
    objects: list = [model]
    if conversion.tokenizer_dir is not None and any((conversion.tokenizer_dir / n).is_file() for n in TOKENIZER_FILES):
        objects.append(_CopiedFiles(conversion.tokenizer_dir, TOKENIZER_FILES))
    elif conversion.tokenizer is not None:
        objects.append(conversion.tokenizer)
    objects.append(ExtraFiles({"README.md": card, "conversion.json": json.dumps(results, indent=2) + "\n"}))
    if check is not None:
        objects.append(check)
    with tqdm(total=len(objects), desc="Writing", unit="part", disable=not progress) as bar:
        try:
            return save_pretrained_atomically(output, *(_Counted(obj, bar) for obj in objects))
        except OSError as error:
            state = "is unchanged" if output.exists() else "was not created"
            raise ConversionError(f"cannot write {output}: {error}; {output} {state}.") from error


class _Counted:
    """Advances a progress bar once the wrapped object has been saved."""

    def __init__(self, obj, bar: tqdm):
        self.obj, self.bar = obj, bar

    def save_pretrained(self, save_directory: str | Path) -> None:
        self.obj.save_pretrained(save_directory)
        self.bar.update()


class _CopiedFiles:
    """Files copied unchanged from a source folder (tokenizer files), as one `save_pretrained` step."""

    def __init__(self, folder: Path, names: Iterable[str]):
        self.paths = [folder / name for name in names if (folder / name).is_file()]

    def save_pretrained(self, save_directory: str | Path) -> None:
        for path in self.paths:
            shutil.copyfile(path, Path(save_directory) / path.name)


@dataclass
class Options:
    """Converter settings shared by the CLI and the Python API."""

    position_embedding_type: str | None = None  # re-initialise positions with this scheme (outputs then differ)
    # config fields of the (new or kept) scheme, e.g. {"relative_attention_max_distance": 64}: a value that differs
    # from the source's re-initialises the positions too
    position_settings: dict[str, int | bool] = field(default_factory=dict)
    gguf_file: str | None = None  # llama: a GGUF file (inside INPUT, or INPUT itself)
    hparams: Path | None = None  # torch-transformer: JSON of the module's constructor arguments
    progress: bool = True


def read_config(path: Path, source: str, model_types: tuple[str, ...]) -> dict:
    """The source folder's config.json, checked to be one of `model_types`."""
    if not path.is_dir():
        raise ConversionError(f"{source}: {path} is not a folder (expected a saved transformers checkpoint).")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{source}: {path} has no config.json.")
    config = read_json(config_file, source)
    if config.get("model_type") not in model_types:
        raise ConversionError(
            f"{source}: expected model_type {' or '.join(map(repr, model_types))} in {config_file}, "
            f"got {config.get('model_type')!r}."
        )
    return config


def pick_architecture(config: dict, source: str, supported: Mapping[str, object]) -> str:
    architectures = config.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in supported:
        raise ConversionError(
            f"{source}: unknown architecture {architectures or 'none given'}; this converter supports "
            f"{', '.join(supported)}."
        )
    return architectures[0]


def load_pretrained(
    model_class, path: Path, source: str, read_separately: Callable[[str], bool] | None = None, **kwargs
) -> torch.nn.Module:
    """`model_class.from_pretrained(path)` in fp32 eval mode. A damaged weight file, a pickle that would run code,
    tensors missing from the files, tensors the config's model does not have (except those the converter reads from
    the files itself: `read_separately`) and shapes that do not fit config.json are `ConversionError`s naming the file
    or tensor (transformers' own load report is not printed)."""
    target = path / kwargs["gguf_file"] if kwargs.get("gguf_file") else path
    check_weight_files(target, source)
    try:
        with transformers_errors_only():
            model, info = model_class.from_pretrained(
                path, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
    except READ_ERRORS as error:
        if refused_pickle(error):
            raise UnreadableFile(weights_file(path) or path, why_unreadable(error), source) from error
        raise ConversionError(f"{source}: cannot load {target}: {why_unreadable(error)}") from error
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    fit = CheckpointFit.of_loading_info(info, tied, lambda key: read_separately is None or not read_separately(key))
    if fit.missing:
        more = len(fit.missing) - 1
        raise ConversionError(
            f"{source}: tensor {fit.missing[0]!r} is missing from {path}" + (f" (and {more} more)." if more else ".")
        )
    if fit.mismatched:
        (name, stored, needed), more = fit.mismatched[0], len(fit.mismatched) - 1
        raise ConversionError(
            f"{source}: {path / 'config.json'} does not fit the weights: tensor {name!r} has the wrong shape (shape "
            f"{stored} in the weights, {needed} from the config)" + (f"; {more} more differ." if more else ".")
        )
    if fit.unexpected:
        shown = ", ".join(map(repr, fit.unexpected[:5]))
        more = f" and {len(fit.unexpected) - 5} more" if len(fit.unexpected) > 5 else ""
        raise ConversionError(
            f"{source}: the weights in {path} hold tensors the model of its config.json does not have: {shown}{more} "
            "(config.json does not fit the weights, or an unsupported variant of the architecture)."
        )
    return model.eval()


def finish(
    config_kwargs: dict,
    mapped: dict[str, torch.Tensor],
    head_class,
    options: Options,
    prefix: str,
    head: dict[str, torch.Tensor] | None = None,
    allow_missing: Callable[[str], bool] | None = None,
) -> tuple[torch.nn.Module, bool]:
    """Build the Relformer `head_class` from `config_kwargs` and load the mapped tensors (names relative to the bare
    model, `prefix` added for heads) and the `head` tensors (full names); `allow_missing` names model tensors that may
    keep their fresh initialisation. With `options.position_embedding_type`, positions are re-initialised as that
    scheme and the source's position tensors dropped. Returns (model, positions_reinitialised)."""
    name = options.position_embedding_type or config_kwargs.get("position_embedding_type")
    scheme = POSITION_SCHEMES[name]
    for setting in options.position_settings:
        if setting not in scheme.settings:
            raise ConversionError(
                f"{setting} is not a setting of position_embedding_type={name!r} (its settings: "
                f"{', '.join(scheme.settings) or 'none'})."
            )
    reinitialise = name != config_kwargs.get("position_embedding_type") or any(
        value != config_kwargs.get(setting, getattr(RelformerConfig, setting))
        for setting, value in options.position_settings.items()
    )
    if reinitialise:
        config_kwargs["position_embedding_type"] = name
        for other in POSITION_SCHEMES.values():
            if other is not scheme:  # the switches of the source's scheme do not carry over
                for switch in other.switches:
                    config_kwargs.pop(switch, None)
        config_kwargs.update(options.position_settings)
        mapped = {name: t for name, t in mapped.items() if not _is_position_tensor(name)}
    config = relformer_config(**config_kwargs)
    torch.manual_seed(0)  # re-initialised positions are reproducible
    model = head_class(config)
    state_dict = {prefix + name: tensor for name, tensor in mapped.items()} | (head or {})

    def missing_ok(name: str) -> bool:
        return (reinitialise and _is_position_tensor(name)) or (allow_missing is not None and allow_missing(name))

    return load_into(model, state_dict, missing_ok), reinitialise


def _is_position_tensor(name: str) -> bool:
    """Whether a Relformer tensor belongs to a position scheme (any of them: the source's, before re-initialising)."""
    return any(scheme.is_parameter(name) for scheme in POSITION_SCHEMES.values())


def source_name(config, path: Path) -> str:
    """The source's model name when it has a Hub-style one, else the folder's name (never a full local path)."""
    name = str(config.get("_name_or_path", "") if isinstance(config, dict) else getattr(config, "_name_or_path", ""))
    return name if name and not Path(name).is_absolute() and not Path(name).exists() else path.name


def read_state_dict(path: Path, source: str) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, or of a PyTorch file read with `weights_only=True` (no pickled code runs);
    a folder means its `model.safetensors` (or `pytorch_model.bin`)."""
    from safetensors.torch import load_file

    if path.is_dir():
        found = weights_file(path)
        if found is None:
            raise ConversionError(f"{source}: {path} has no {' or '.join(WEIGHT_FILES)}.")
        path = found
    if not path.is_file():
        raise ConversionError(f"{source}: {path} does not exist.")
    check_weight_files(path, source)
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a file
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except READ_ERRORS as error:
        reason = why_unreadable(error)
        if not refused_pickle(error):
            reason = f"not a complete PyTorch or safetensors file (truncated or corrupted; {reason})"
        raise UnreadableFile(path, reason, source) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ConversionError(f"{source}: {path} does not hold a state dict (a mapping of names to tensors).")
    return state
