"""`idverify` command line. Each subcommand lives in the module that owns its job; a module
registers itself with `register(subparsers)` and keeps heavy imports (torch, onnxruntime)
inside the function it runs, so `idverify --help` stays fast.

The service's own commands are listed here. The model lifecycle's commands (`eval`, `train`,
`adapt`) are found through the `idverify.commands` entry-point group (pyproject.toml), so the
service never names models.eval or models.train; a group member whose dependencies are not
installed (a plain `pip install .` has no torch or matplotlib) is left out of the parser."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from importlib.metadata import entry_points

# module -> registers one or more subcommands
COMMAND_MODULES = [
    "service.app",             # serve
    "service.records.engine",  # migrate
    "service.records.keys",    # keys create|list|revoke
    "service.records.cli",     # audit verify|purge|image-key
]
COMMAND_GROUP = "idverify.commands"


def _plugins() -> list:
    """Modules of the entry-point group, in name order. One that cannot be imported here, or
    whose `REQUIRES` (top-level packages its commands run on) are not all installed, is skipped:
    that part of the project is not installed."""
    modules = []
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            module = ep.load()
        except ImportError:
            continue
        if all(importlib.util.find_spec(name) is not None for name in getattr(module, "REQUIRES", ())):
            modules.append(module)
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idverify", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for module in _plugins():
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
