"""Command line: `ihgrpo demo` (more commands arrive with the trainer and the evaluator)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ihgrpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded main job")
    demo.add_argument("--out", default=None, help="directory for the outputs")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ihgrpo.demo.walkthrough import main as walkthrough

        return walkthrough(args.out)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
