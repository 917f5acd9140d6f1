"""`convert`: run one converter, verify it against its source, write the folder (all or nothing)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hf_relformer import __version__
from hf_relformer.model_card import conversion_card
from hf_relformer.saving import output_problem

from . import bert, bloom, gpt2, llama, t5, torch_transformer
from .common import TOLERANCE, Conversion, ConversionError, Options, model_output, verify, write_folder
from .source import Source

# Every converter, in the order `--help` lists them: a new source is its module plus one line here.
REGISTERED = (
    gpt2.SOURCE,
    bert.SOURCE,
    llama.SOURCE,
    bert.RELATIVE_V4,
    torch_transformer.SOURCE,
    t5.SOURCE,
    bloom.SOURCE,
)
SOURCES: dict[str, Source] = {source.name: source for source in REGISTERED}


def convert(
    source: str,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    options: Options | None = None,
    check: bool = True,
    tolerance: float = TOLERANCE,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Convert `input_path` (a checkpoint of kind `source`) into a Relformer folder at `output`.

    With `check` (the default) the converted model and the source run on sample inputs and the largest absolute
    difference must be <= `tolerance` (unless positions were re-initialised, when outputs are expected to differ);
    the written folder is reloaded and must give the same outputs before it replaces `output`. Returns the results
    that are also written to `output/conversion.json`. Raises `ConversionError` and leaves `output` untouched on
    any failure.
    """
    if source not in SOURCES:
        raise ConversionError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}.")
    input_path, output = Path(input_path), Path(output)
    if not input_path.exists():
        raise ConversionError(f"{source}: input {input_path} does not exist.")
    if output.exists() and not force:
        raise ConversionError(f"output {output} already exists (pass --force / force=True to replace it).")
    problem = output_problem(output)
    if problem:
        raise ConversionError(f"output: {problem}.")
    if output.resolve() == input_path.resolve() or input_path.resolve() in output.resolve().parents:
        raise ConversionError(f"output {output} must not be the input or inside it.")
    options = options or Options()
    started = time.monotonic()
    conversion = SOURCES[source](input_path, options)
    difference = verify(conversion) if check else None
    verified = difference is not None and difference <= tolerance
    if difference is not None:
        if conversion.positions_reinitialised:
            log(
                f"Positions re-initialised as {conversion.model.config.position_embedding_type!r}: outputs are "
                f"expected to differ from the source (max abs difference {difference:.3g}); fine-tune before use."
            )
        elif not verified:
            raise ConversionError(
                f"verification failed: the converted model differs from the source by {difference:.3g} "
                f"(max abs difference of {conversion.output_name}), above the tolerance {tolerance:g}. Nothing was "
                "written."
            )
        else:
            name = conversion.output_name
            log(f"Verified: max abs difference of {name} = {difference:.3g} (tolerance {tolerance:g}).")
    results = {
        "source": source,
        "source_name": conversion.source_name,
        "relformer_class": type(conversion.model).__name__,
        "compared_output": conversion.output_name,
        "max_abs_difference": difference,
        "tolerance": tolerance,
        "verified": verified,
        "positions_reinitialised": conversion.positions_reinitialised,
        "notes": conversion.notes,
        "hf_relformer_version": __version__,
    }
    card = str(conversion_card(conversion.model.config, conversion.model.num_parameters(), results))
    reload_check = _ReloadCheck(conversion) if check else None
    written = write_folder(conversion, output, card, results, reload_check, options.progress)
    results["seconds"] = round(time.monotonic() - started, 1)
    log(f"Wrote {written} in {results['seconds']} s.")
    return results


class _ReloadCheck:
    """Saved last into the staging folder: reloads the model from it and compares outputs, so a folder that does
    not load back identically never replaces the output."""

    def __init__(self, conversion: Conversion):
        self.conversion = conversion

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        model_class = type(self.conversion.model)
        reloaded = model_class.from_pretrained(save_directory, dtype=torch.float32).eval()
        inputs = self.conversion.inputs
        before = model_output(self.conversion, inputs)
        with torch.no_grad():
            after = getattr(reloaded(**inputs), self.conversion.output_name)
        if not torch.equal(before, after):
            raise ConversionError(
                f"the written folder does not reload to the same model (max abs difference "
                f"{float((before - after).abs().max()):.3g}); nothing was written."
            )
