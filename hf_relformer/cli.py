"""The `relformer` command line (`relformer demo`); it follows `commands.run_command`'s conventions."""

import argparse
import sys
from pathlib import Path

from .checks import DecodingCheckError
from .commands import run_command
from .demo import SCHEMES, TASKS, DemoSettings, output_problem, run_demo


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _choices(allowed: tuple[str, ...] | list[str]):
    def parse(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [v for v in values if v not in allowed]
        if not values or unknown:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text!r}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relformer", description="Relformer tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="compare every position scheme: perplexity on longer text, exact match on longer problems",
        description="Part 1: a character LM per position scheme, trained on Hamlet at a context of 64 characters, "
        "scored on Macbeth at 1x to 16x that context. Part 2: streaming tasks (delay, pairsum) trained on 1-12 "
        "inputs, exact match at 1x, 2x, 4x. Writes tables, report.md, perplexity.png, accuracy.png and "
        "results.json, saves the best task model with a card and reloads it.",
    )
    demo.add_argument("--quick", action="store_true", help="one seed, one task, fewer steps (about two minutes)")
    demo.add_argument("--output", type=Path, default=Path("relformer-demo"), help="output folder")
    demo.add_argument("--tasks", type=_choices(list(TASKS)), help=f"comma-separated, from {','.join(TASKS)}")
    demo.add_argument("--schemes", type=_choices(list(SCHEMES)), help=f"comma-separated, from {','.join(SCHEMES)}")
    demo.add_argument("--lengths", type=_int_list, help="multiples of the training length for the tasks (1,2,4)")
    demo.add_argument("--text-lengths", type=_int_list, help="multiples of the text context (1,2,4,8,16)")
    demo.add_argument("--seeds", type=_int_list, help="comma-separated seeds (full mode: 0,1,2)")
    demo.add_argument("--steps", type=int, help="training steps per model, both parts (full mode: 250)")
    demo.add_argument("--train-length", type=int, help="most inputs in a training problem (default 12)")
    demo.add_argument("--eval-count", type=int, help="problems per evaluated length")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    overrides = {
        "tasks": args.tasks,
        "schemes": args.schemes,
        "multipliers": args.lengths,
        "text_multipliers": args.text_lengths,
        "seeds": args.seeds,
        "steps": args.steps,
        "train_length": args.train_length,
        "eval_count": args.eval_count,
    }
    for name, value in overrides.items():
        if value is not None:
            if isinstance(value, int) and value < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1")
            setattr(settings, name, value)
    for name, values in (("lengths", settings.multipliers), ("text-lengths", settings.text_multipliers)):
        if 0 in values:
            parser.error(f"--{name} must be >= 1")
    problem = output_problem(args.output)
    if problem:
        parser.error(f"--output: {problem}")
    return run_command(
        "relformer demo",
        lambda: run_demo(settings, args.output, progress=not args.no_progress),
        (OSError, DecodingCheckError),  # the output cannot be written (disk full, permissions); a broken model
        f"{args.output} is unchanged.",
    )


if __name__ == "__main__":
    sys.exit(main())
