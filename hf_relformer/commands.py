"""The conventions every relformer command follows (`run_command`): a usage error exits with 2 and argparse's message,
a runtime problem (a damaged file, a failed check) with 1 and one line `PROG: error: ...`, Ctrl-C with 130; none
prints a traceback. Light on purpose: the conversion and Hub commands import it without the demo."""

import sys
from collections.abc import Callable


def run_command(prog: str, work: Callable[[], object], errors: tuple[type[Exception], ...], interrupted: str) -> int:
    """Run a command's work: `errors` (expected runtime problems) print `PROG: error: MESSAGE` and give exit code 1,
    Ctrl-C prints `PROG: interrupted; INTERRUPTED` and gives 130; success gives 0."""
    try:
        work()
    except errors as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return 130
    return 0
