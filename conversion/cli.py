"""`python -m hf_relformer.conversion SOURCE INPUT OUTPUT [options]` (console script `relformer-convert`)."""

from __future__ import annotations

import argparse
import math
import textwrap
from pathlib import Path

from hf_relformer.checkpoint import CheckpointError
from hf_relformer.commands import run_command
from hf_relformer.positions_relformer import POSITION_SCHEMES
from hf_relformer.saving import output_problem

from .api import SOURCES, convert
from .common import TOLERANCE, Options
from .source import Flag

OUTPUT_FILES = (
    "The output folder holds model.safetensors, config.json, the tokenizer files of the source, the generation "
    "config, the modeling code (for trust_remote_code=True), a model card (README.md) and conversion.json (the "
    "verification)."
)


def epilog() -> str:
    """The sources, each with its help from the registry, then what the output folder holds."""
    width = max(map(len, SOURCES)) + 2
    wrap = textwrap.TextWrapper(width=118, initial_indent="  ", subsequent_indent=" " * (width + 2))
    lines = [wrap.fill(f"{name:<{width}}{source.help}") for name, source in SOURCES.items()]
    return "sources:\n" + "\n".join(lines) + "\n\n" + textwrap.fill(OUTPUT_FILES, width=118) + "\n"


def flags() -> dict[str, tuple[Flag, list[str]]]:
    """Every source-specific flag, with the sources that take it."""
    found: dict[str, tuple[Flag, list[str]]] = {}
    for name, source in SOURCES.items():
        for flag in source.flags:
            found.setdefault(flag.name, (flag, []))[1].append(name)
    return found


def position_settings() -> dict[str, list[str]]:
    """Every config field a position scheme reads (its sizes and switches), with the schemes that read it."""
    found: dict[str, list[str]] = {}
    for scheme in POSITION_SCHEMES.values():
        for name in scheme.settings:
            found.setdefault(name, []).append(scheme.name)
    return found


def is_size(name: str) -> bool:
    return any(name in scheme.sizes for scheme in POSITION_SCHEMES.values())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relformer-convert",
        description="Convert a checkpoint into a Relformer checkpoint, verified numerically against the source.",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", choices=list(SOURCES), help="kind of checkpoint to convert")
    parser.add_argument("input", type=Path, help="the source checkpoint (folder or file)")
    parser.add_argument("output", type=Path, help="the Relformer folder to write")
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run source and converted model on sample inputs and fail above --tolerance (default: on)",
    )
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help=f"max abs difference (default {TOLERANCE})")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument(
        "--position-embedding-type",
        choices=tuple(POSITION_SCHEMES),
        help="re-initialise positions with this scheme for fine-tuning (outputs then differ from the source)",
    )
    for name, schemes in position_settings().items():
        kind = dict(type=int, metavar="N") if is_size(name) else dict(action=argparse.BooleanOptionalAction)
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, **kind, help=f"{', '.join(schemes)}: the config's {name}"
        )
    for flag, sources in flags().values():
        parser.add_argument(
            flag.option, type=flag.type, metavar=flag.metavar, help=f"{', '.join(sources)}: {flag.help}"
        )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.tolerance < math.inf:
        parser.error(f"--tolerance must be a positive number, got {args.tolerance}")
    settings = {name: getattr(args, name) for name in position_settings() if getattr(args, name) is not None}
    for name, value in settings.items():
        if is_size(name) and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    source = SOURCES[args.source]
    for flag, sources in flags().values():
        if getattr(args, flag.name) is not None and args.source not in sources:
            parser.error(f"{flag.option} applies to the {' and '.join(sources)} source only")
    for flag in source.flags:
        if flag.required and getattr(args, flag.name) is None:
            parser.error(f"the {args.source} source needs {flag.option} {flag.metavar or ''} ({flag.help})")
    if not args.input.exists():
        parser.error(f"input {args.input} does not exist")
    for flag in source.flags:
        value = getattr(args, flag.name)
        problem = None if value is None else flag.check(value, args.input)
        if problem:
            parser.error(f"{flag.option}: {problem}")
    problem = output_problem(args.output)
    if problem:
        parser.error(f"output: {problem}")
    if args.no_progress:
        from transformers.utils import logging

        logging.disable_progress_bar()
    options = Options(
        position_embedding_type=args.position_embedding_type,
        position_settings=settings,
        **{name: getattr(args, name) for name in flags()},
        progress=not args.no_progress,
    )
    return run_command(
        "relformer-convert",
        lambda: convert(
            args.source,
            args.input,
            args.output,
            options,
            check=args.verify,
            tolerance=args.tolerance,
            force=args.force,
        ),
        (CheckpointError,),  # ConversionError, and what reading a folder or file raises
        f"nothing was written ({args.output} is as it was).",
    )
