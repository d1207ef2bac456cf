"""Print the runtime requirements of pyproject.toml ([project].dependencies), one a line, for
the images' dependency layer: installed before the code is copied, so a code change does not
reinstall them. pyproject.toml stays the only dependency list.

    python requirements-from-pyproject.py pyproject.toml [--replace NAME=REQ ...]

--replace swaps one requirement for another (onnxruntime=onnxruntime-gpu>=1.18 in the GPU image);
a NAME that pyproject does not list is an error, so a renamed dependency cannot slip through.
"""
from __future__ import annotations

import argparse
import re
import sys
import tomllib


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not match:
        raise SystemExit(f"cannot read a name from requirement {req!r}")
    return canonical(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("--replace", nargs="*", default=[], metavar="NAME=REQ")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as fh:
        deps = tomllib.load(fh)["project"].get("dependencies", [])
    replace = {canonical(k): v for k, v in (item.split("=", 1) for item in args.replace)}
    missing = set(replace) - {requirement_name(req) for req in deps}
    if missing:
        raise SystemExit(f"--replace names what pyproject does not list: {sorted(missing)}")
    for req in deps:
        print(replace.get(requirement_name(req), req))
    return 0


if __name__ == "__main__":
    sys.exit(main())
