"""The `devise` command: argument parsing only; every command calls the Python API.

Heavy imports (Keras, JAX) happen inside the handlers so `devise --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys

from devise.errors import DeviseError


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=None if isinstance(obj, list) else 2))


# ---------------------------------------------------------------- handlers (one per command)

def cmd_doctor(args) -> int:
    from devise.doctor import run_doctor
    return run_doctor()


def cmd_setup_assets(args) -> int:
    from devise.datasets import prepare_assets
    prepare_assets()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devise", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("doctor", help="show which assets, backend and devices were found")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("setup-assets", help="fetch and build the offline assets into the data home")
    p.set_defaults(func=cmd_setup_assets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DeviseError as exc:
        print(f"devise: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("devise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
