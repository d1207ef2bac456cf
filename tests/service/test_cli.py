"""`idverify --help` lists every command, the lifecycle ones found through the
`idverify.commands` entry points included, with a description that is not cut short; a command
whose extra is not installed says which `pip install` brings it instead of `invalid choice`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service import cli

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("serve", "migrate", "config", "keys", "audit", "eval", "train", "adapt")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _without_extras(argv: list[str]) -> subprocess.CompletedProcess:
    """`idverify ARGV` in a process where the eval and train extras are not importable."""
    return _run("import sys\nfor name in ('matplotlib', 'scipy', 'tqdm', 'torch'): sys.modules[name] = None\n"
                f"from service.cli import main\nsys.exit(main({argv!r}))")


def test_help_lists_every_command_and_a_whole_description(capsys):
    try:
        cli.main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()]
    assert [c for c in listed if c in COMMANDS] == list(COMMANDS)
    assert " ".join(cli.DESCRIPTION.split()) in " ".join(out.split())   # reflowed, not cut
    assert cli.DESCRIPTION.endswith(".")


def test_a_command_whose_extra_is_missing_says_how_to_install_it():
    out = _without_extras(["eval", "--protocol", "lfw-ivs", "--folds", "9,10"])
    assert out.returncode == cli.NOT_INSTALLED and "invalid choice" not in out.stderr
    assert out.stderr.strip() == ("idverify eval needs the eval extra, which is not installed: pip install -e '.[eval]' "
                                  "from the repository root (or `make setup`, which installs them all)")
    adapt = _without_extras(["adapt", "--help"])
    assert adapt.returncode == cli.NOT_INSTALLED and "needs the train extra" in adapt.stderr
    listing = _without_extras(["--help"])
    assert listing.returncode == 0
    text = " ".join(listing.stdout.split())
    for name, extra in (("eval", "eval"), ("train", "train"), ("adapt", "train")):
        assert f"{name} not installed here: needs the {extra} extra (pip install -e '.[{extra}]')" in text
    # the service's own commands are unaffected
    assert _without_extras(["audit", "image-key"]).returncode == 0
