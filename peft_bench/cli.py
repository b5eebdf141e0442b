"""The `peft-bench` command line. Bad input: one line on stderr, exit status 2, nothing written."""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def _cmd_list(args: argparse.Namespace) -> int:
    from .methods import list_methods

    print("methods:")
    for name in list_methods():
        print(f"  {name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-bench", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list methods, workloads and unsupported combinations").set_defaults(func=_cmd_list)
    return p


class _Parser(argparse.ArgumentParser):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"peft-bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
