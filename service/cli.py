"""`idverify` command line. Each subcommand lives in the module that owns its job; a module
registers itself with `register(subparsers)` and keeps heavy imports (torch, onnxruntime)
inside the function it runs, so `idverify --help` stays fast.

The service's own commands are listed here. The model lifecycle's commands (`eval`, `train`,
`adapt`) are found through the `idverify.commands` entry-point group (pyproject.toml), so the
service never names models.eval or models.train. A group member whose dependencies are not
installed (a plain `pip install .` has no torch or matplotlib) is still listed; run, it says
which extra brings it (the module's `EXTRA`, else the entry point's name). A setting that is
refused (a wrong `IDV_` value) ends any command with one line naming its variable, not a
traceback; a command that sets `check_config` (migrate) has every setting checked first."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from importlib.metadata import entry_points

from pydantic import ValidationError

# module -> registers one or more subcommands
COMMAND_MODULES = [
    "service.app",             # serve
    "service.records.engine",  # migrate
    "service.config_check",    # config
    "service.records.keys",    # keys create|list|revoke
    "service.records.cli",     # audit verify|purge|image-key
]
COMMAND_GROUP = "idverify.commands"
DESCRIPTION = ("idverify: does the photo on an ID card's chip show the person in front of the camera? "
               "Serve the API, manage the database, keys and audit trail, check the configuration; "
               "evaluate and train the models (with the eval and train extras).")
NOT_INSTALLED = 2   # exit status of a command whose extra is missing


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def install_hint(name: str, extra: str) -> str:
    return (f"idverify {name} needs the {extra} extra, which is not installed: "
            f"pip install -e '.[{extra}]' from the repository root (or `make setup`, which installs them all)")


class _Names:
    """Collects the names a module's `register` adds, without building their parsers."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add_parser(self, name: str, **_kw):
        self.names.append(name)
        return argparse.ArgumentParser(add_help=False)


def _plugins() -> tuple[list, dict[str, str]]:
    """(modules whose commands can run here, {command: the extra it needs} for those that cannot), in
    name order. A module that cannot be imported, or whose `REQUIRES` (top-level packages its
    commands run on) are not all installed, is missing its extra."""
    modules, missing = [], {}
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            module = ep.load()
        except ImportError:
            missing[ep.name] = ep.name
            continue
        if all(_installed(name) for name in getattr(module, "REQUIRES", ())):
            modules.append(module)
            continue
        names = _Names()
        module.register(names)
        for name in names.names or [ep.name]:
            missing[name] = getattr(module, "EXTRA", ep.name)
    return modules, missing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idverify", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    modules, missing = _plugins()
    for module in modules:
        module.register(sub)
    for name, extra in missing.items():
        p = sub.add_parser(name, help=f"not installed here: needs the {extra} extra (pip install -e '.[{extra}]')",
                           add_help=False)
        p.set_defaults(func=lambda _args, name=name, extra=extra: _not_installed(name, extra))
    parser.missing = missing
    return parser


def _not_installed(name: str, extra: str) -> int:
    print(install_hint(name, extra), file=sys.stderr)
    return NOT_INSTALLED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] in parser.missing:   # whatever its options: they belong to a parser not here
        return _not_installed(argv[0], parser.missing[argv[0]])
    args = parser.parse_args(argv)
    try:
        if getattr(args, "check_config", False):   # e.g. migrate: nothing done on refused settings
            from service.config_check import checked_settings

            checked_settings()
        result = args.func(args)
    except KeyboardInterrupt:   # Ctrl-C (uvicorn re-raises it after its graceful shutdown): no traceback
        return 130
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        from service.config_check import CONFIG_ERROR
        from service.settings import describe_errors

        for line in describe_errors(exc):
            print(f"idverify: {line}", file=sys.stderr)
        return CONFIG_ERROR
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
