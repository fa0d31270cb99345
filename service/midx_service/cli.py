"""The `midx-sampler` command line: one subcommand per module in midx_service.commands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Each module defines `add_arguments(parser)` and `run(args) -> int`, and a one-line docstring used as help.
COMMANDS = {
    "serve": "midx_service.commands.serve",
    "bench": "midx_service.commands.bench",
    "demo": "midx_service.commands.demo",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="midx-sampler", description="MIDX adaptive negative-sampling service")
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue  # a command whose module is not part of this build
        modules[name] = module
        doc = (module.__doc__ or "").strip().splitlines()
        command_parser = subparsers.add_parser(name, help=doc[0] if doc else None, description=doc[0] if doc else None)
        module.add_arguments(command_parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
