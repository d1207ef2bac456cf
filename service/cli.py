"""`idverify` command line. Each subcommand lives in the module that owns its job; a module
registers itself with `register(subparsers)` and keeps heavy imports (torch, onnxruntime)
inside the function it runs, so `idverify --help` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

# module -> registers one or more subcommands
COMMAND_MODULES = [
    "service.app",          # serve
    "service.db",           # migrate
    "service.keys",         # keys create|list|revoke
    "service.audit_cli",    # audit verify|purge
    "service.evaluate",     # eval
    "models.train.cli",     # train, adapt
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idverify", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name or name.startswith(f"{exc.name}."):
                continue  # that part of the project is not installed here
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
