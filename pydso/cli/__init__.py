"""The ``pydso`` command line: batch jobs on stored datasets.

Each subcommand lives in its own module ``pydso.cli._<name>`` exposing ``add_parser(subparsers)`` (which sets
``func`` on its parser) so that importing the CLI stays cheap and subcommands stay independent.
"""

import argparse
import importlib
import sys

SUBCOMMANDS = ("inspect", "improve", "sysid")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pydso", description="Dynamical System Optimization on stored datasets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"pydso.cli._{name}")
        except ModuleNotFoundError as e:
            if e.name != f"pydso.cli._{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError) as e:
        print(f"pydso {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the checks could not foresee (disk full, permissions changed mid-run, ...)
        print(f"pydso {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
