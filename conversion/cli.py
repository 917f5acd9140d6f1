"""`python -m hf_relformer.conversion SOURCE INPUT OUTPUT [options]` (console script `relformer-convert`)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from hf_relformer.commands import run_command
from hf_relformer.positions_relformer import POSITION_SCHEMES
from hf_relformer.saving import output_problem

from .api import SOURCES, convert
from .common import TOLERANCE, ConversionError, Options

EPILOG = """sources:
  gpt2               a transformers GPT2LMHeadModel / GPT2Model folder
  bert               a transformers BertModel / BertForMaskedLM folder (absolute positions)
  llama              a transformers LlamaForCausalLM / LlamaModel folder, or a GGUF file (INPUT.gguf, or
                     INPUT folder + --gguf-file NAME), dequantized by transformers' GGUF loader
  bert-relative-v4   a BERT folder saved by transformers 4 with position_embedding_type relative_key or
                     relative_key_query (transformers 5 no longer runs these)
  torch-transformer  a torch.nn.Transformer / nn.TransformerEncoder state dict (.safetensors, or .pt read with
                     weights_only=True) and --hparams FILE.json with its constructor arguments
  t5                 a transformers T5ForConditionalGeneration / T5EncoderModel folder (t5 positions)
  bloom              a transformers BloomForCausalLM / BloomModel folder (alibi positions)

The output folder holds model.safetensors, config.json, the tokenizer files of the source, the generation config,
the modeling code (for trust_remote_code=True), a model card (README.md) and conversion.json (the verification).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relformer-convert",
        description="Convert a checkpoint into a Relformer checkpoint, verified numerically against the source.",
        epilog=EPILOG,
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
    parser.add_argument("--relative-attention-max-distance", type=int, metavar="K", help="k of relative positions")
    parser.add_argument("--gguf-file", help="llama: name of the GGUF file inside INPUT")
    parser.add_argument("--hparams", type=Path, help="torch-transformer: JSON of the module's constructor arguments")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.tolerance < math.inf:
        parser.error(f"--tolerance must be a positive number, got {args.tolerance}")
    if args.relative_attention_max_distance is not None and args.relative_attention_max_distance < 1:
        parser.error("--relative-attention-max-distance must be a positive integer")
    if args.gguf_file and args.source != "llama":
        parser.error("--gguf-file applies to the llama source only")
    if args.hparams and args.source != "torch-transformer":
        parser.error("--hparams applies to the torch-transformer source only")
    if args.source == "torch-transformer" and not args.hparams:
        parser.error("the torch-transformer source needs --hparams FILE.json (the module's constructor arguments)")
    if not args.input.exists():
        parser.error(f"input {args.input} does not exist")
    if args.hparams and not args.hparams.is_file():
        parser.error(f"--hparams {args.hparams} is not a file")
    if args.gguf_file and args.input.is_dir() and not (args.input / args.gguf_file).is_file():
        parser.error(f"--gguf-file: {args.input / args.gguf_file} does not exist")
    problem = output_problem(args.output)
    if problem:
        parser.error(f"output: {problem}")
    if args.no_progress:
        from transformers.utils import logging

        logging.disable_progress_bar()
    options = Options(
        position_embedding_type=args.position_embedding_type,
        relative_attention_max_distance=args.relative_attention_max_distance,
        gguf_file=args.gguf_file,
        hparams=args.hparams,
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
        (ConversionError,),
        f"nothing was written ({args.output} is as it was).",
    )
