"""Checks of a saved checkpoint folder that loading does not need (the upload, the card and the upgrade run them);
not shipped with checkpoints."""

from collections.abc import Mapping
from pathlib import Path

import torch
from transformers.dynamic_module_utils import get_relative_import_files

from . import modeling_relformer
from .configuration_relformer import RelformerConfig
from .loading_relformer import CheckpointFit


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
