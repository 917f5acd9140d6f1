"""What a converter declares: a `Source` (its name, its line of CLI help, the flags only it takes) and, for a saved
transformers model, a `TransformersSource` that names only what differs between sources (the config.json settings it
refuses, its architectures, the Relformer config and the tensor mapping); `TransformersSource.convert` runs the steps
they share: read and check config.json, load the source, map its tensors, build the Relformer, load the tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_relformer import RelformerModel
from hf_relformer.checkpoint import load_tokenizer

from .common import (
    Conversion,
    ConversionError,
    Options,
    SourceTensors,
    finish,
    load_pretrained,
    pick_architecture,
    read_config,
    sample_inputs,
    source_name,
)

Tensors = dict[str, torch.Tensor]
# (tensors, the source's config, where its body sits in the state dict ("" or e.g. "transformer."), whether it is a
# head) -> Relformer tensors of the body (names relative to the bare model) and of the head (full names)
TensorMapping = Callable[[SourceTensors, object, str, bool], tuple[Tensors, Tensors]]


@dataclass(frozen=True)
class Flag:
    """A setting only some sources take: the `Options` field `name`, given on the command line as `--name`
    (underscores as dashes). `check(value, input_path)` says what is wrong with a given value, or None."""

    name: str
    help: str
    type: Callable[[str], object] = str
    metavar: str | None = None
    required: bool = False  # the source cannot convert without it
    check: Callable[[object, Path], str | None] = lambda value, input_path: None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True, kw_only=True)
class Source:
    """One converter as `api.SOURCES` and the CLI see it: its name, its line of help, the flags only it takes."""

    name: str
    help: str  # its entry in `relformer-convert --help`
    run: Callable[[Path, Options], Conversion] | None = None  # the converter (a subclass's `convert` instead)
    flags: tuple[Flag, ...] = ()

    def __call__(self, path: Path, options: Options) -> Conversion:
        return self.convert(path, options)

    def convert(self, path: Path, options: Options) -> Conversion:
        return self.run(path, options)


@dataclass
class Located:
    """Where a transformers source's files are and how to load them."""

    folder: Path
    config: dict  # config.json as read (or what stands for it)
    classes: tuple[type, type]  # (the transformers class, the Relformer class)
    load_kwargs: dict = field(default_factory=dict)  # for `from_pretrained` of the source and its tokenizer
    label: Path | None = None  # what names the source when it has no model name (default: the folder)
    tokenizer_dir: Path | None = None  # whose tokenizer files are copied (None: the loaded tokenizer is saved)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class TransformersSource(Source):
    """A saved transformers model: `convert` checks config.json (its model type, `refuse`, `architectures`), loads the
    source, maps its tensors (`tensors`), builds the Relformer from `config` and compares the two on sample text."""

    architectures: tuple[tuple[type, type], ...]  # (transformers class, Relformer class) for each it converts
    config: Callable[[torch.nn.Module, dict], dict]  # (source model, config.json) -> RelformerConfig kwargs
    tensors: TensorMapping
    refuse: Callable[[dict], str | None] = lambda config: None  # why config.json's settings cannot be converted
    token_types: bool = False  # the sample inputs carry token_type_ids

    def convert(self, path: Path, options: Options) -> Conversion:
        located = self.locate(path, options)
        source_class, head_class = located.classes
        source = load_pretrained(source_class, located.folder, self.name, **self.load_kwargs(located))
        tensors = SourceTensors(self.state_dict(source, located), self.name, options.progress)
        prefix = source.base_model_prefix
        body_prefix = f"{prefix}." if hasattr(source, prefix) else ""  # a head's body sits under it
        is_head = head_class is not RelformerModel
        body, head = self.tensors(tensors, source.config, body_prefix, is_head)
        tensors.check_all_used()
        config_kwargs = self.config(source, located.config)
        model, reinitialised = finish(config_kwargs, body, head_class, options, "model." if is_head else "", head)
        self.prepare_reference(source, tensors.tensors, located)
        vocab_size = source.config.vocab_size
        tokenizer = load_tokenizer(located.folder, self.name, vocab_size, **located.load_kwargs)
        output = "logits" if hasattr(model, "lm_head") else "last_hidden_state"
        conversion = Conversion(
            model=model,
            reference=lambda inputs: getattr(source(**inputs), output),
            inputs=sample_inputs(tokenizer, vocab_size, self.token_types),
            source=self.name,
            source_name=source_name(located.config or source.config, located.label or located.folder),
            output_name=output,
            tokenizer=tokenizer,
            tokenizer_dir=located.tokenizer_dir,
            generation_config=source.generation_config if model.can_generate() else None,
            notes=located.notes + self.notes(source, tensors.tensors),
            positions_reinitialised=reinitialised,
        )
        return self.complete(conversion, source)

    # The steps a source may replace (the defaults serve a plain transformers folder)

    def locate(self, path: Path, options: Options) -> Located:
        """The folder, its config.json (checked: model type, settings, architecture) and the classes to use."""
        model_type = self.architectures[0][0].config_class.model_type
        config = read_config(path, self.name, (model_type,))
        reason = self.refuse(config)
        if reason:
            raise ConversionError(f"{self.name}: {reason}")
        supported = {theirs.__name__: (theirs, ours) for theirs, ours in self.architectures}
        classes = supported[pick_architecture(config, self.name, supported)]
        return Located(folder=path, config=config, classes=classes, tokenizer_dir=path)

    def load_kwargs(self, located: Located) -> dict:
        return dict(located.load_kwargs)

    def state_dict(self, source: torch.nn.Module, located: Located) -> Tensors:
        """The source's tensors (once loaded, the source may be refused for what only loading tells)."""
        return source.state_dict()

    def prepare_reference(self, source: torch.nn.Module, state: Tensors, located: Located) -> None:
        """Make the loaded source compute what the checkpoint means (e.g. settings transformers no longer runs)."""

    def notes(self, source: torch.nn.Module, state: Tensors) -> list[str]:
        return []

    def complete(self, conversion: Conversion, source: torch.nn.Module) -> Conversion:
        """Adjust the verification (e.g. decoder inputs for an encoder-decoder)."""
        return conversion


def causal_lm_head(tensors: SourceTensors, config, hidden: int, is_head: bool) -> Tensors:
    """The `lm_head` of a causal LM head (nothing to map when it is tied or the model is bare)."""
    if not is_head:
        return {}
    shape = (config.vocab_size, hidden)
    return tensors.output_layer("lm_head.weight", "lm_head.weight", config.tie_word_embeddings, shape)


def unsupported(why: str, **refused: object) -> Callable[[dict], str | None]:
    """A `refuse` for settings the Relformer cannot reproduce: each `name=value` found in config.json, and why."""

    def refuse(config: dict) -> str | None:
        found = [f"{name}={value}" for name, value in refused.items() if name in config and config[name] == value]
        return f"{' and '.join(found)} {'is' if len(found) == 1 else 'are'} not supported ({why})." if found else None

    return refuse


def settings(config, *same: str, **renamed: str) -> dict:
    """RelformerConfig kwargs read from the source's config: the fields `same` under their own names, and each
    `renamed` Relformer field from the source field it names (`hidden_size="n_embd"`)."""
    renamed |= {name: name for name in same}
    return {ours: getattr(config, theirs) for ours, theirs in renamed.items()}


def decoder_settings(config) -> dict:
    """The RelformerConfig settings a decoder-only source gives as they are: its tie and special tokens."""
    return dict(
        tie_word_embeddings=config.tie_word_embeddings,
        is_decoder=True,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
