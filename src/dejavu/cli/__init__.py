"""`dejavu ...`: the command line. parser.py holds every command's flags and the checks that
need no model; each command's module (generate.py, bench.py, ...) turns its flags into calls
to the library. Only DejavuError is a user error (message, exit status 2); any other exception
is a bug and keeps its traceback."""
from __future__ import annotations

import sys

from ..errors import DejavuError
from .parser import build_parser, check_args


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors: argparse prints them and exits with status 2
    try:
        check_args(args)
        args.func(args)
    except DejavuError as e:
        print(f"dejavu: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("\ndejavu: interrupted", file=sys.stderr)
        return 130
    return 0
