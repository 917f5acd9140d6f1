"""The `relformer` command line."""

import argparse
import sys
from pathlib import Path

from .demo import SCHEMES, TASKS, DemoSettings, run_demo


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
        help="train small models on algorithmic tasks and compare position schemes on longer inputs",
        description="Train causal Relformers on copy / reverse / addition with every position scheme, evaluate "
        "exact-match accuracy at multiples of the training length, plot, save and reload the best model.",
    )
    demo.add_argument("--quick", action="store_true", help="one task, one seed, fewer steps (about a minute)")
    demo.add_argument("--output", type=Path, default=Path("relformer-demo"), help="output folder")
    demo.add_argument("--tasks", type=_choices(TASKS), help=f"comma-separated, from {','.join(TASKS)}")
    demo.add_argument("--schemes", type=_choices(list(SCHEMES)), help=f"comma-separated, from {','.join(SCHEMES)}")
    demo.add_argument("--lengths", type=_int_list, help="multiples of the training length to evaluate (1,2,4)")
    demo.add_argument("--seeds", type=_int_list, help="comma-separated seeds (full mode: 0,1,2)")
    demo.add_argument("--steps", type=int, help="training steps per model")
    demo.add_argument("--train-length", type=int, help="largest training size (default 8)")
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
    if 0 in settings.multipliers:
        parser.error("--lengths must be >= 1")
    if args.output.exists() and not args.output.is_dir():
        parser.error(f"--output {args.output} exists and is not a folder")
    run_demo(settings, args.output, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
