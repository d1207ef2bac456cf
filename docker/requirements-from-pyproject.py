"""Print the runtime requirements of pyproject.toml ([project].dependencies), one a line, for
the images' dependency layer: installed before the code is copied, so a code change does not
reinstall them. pyproject.toml stays the only dependency list.

    python requirements-from-pyproject.py pyproject.toml [--drop NAME ...] [--replace NAME=REQ ...]

--drop leaves a requirement out (names that pyproject does not list are ignored);
--replace swaps one for another (onnxruntime=onnxruntime-gpu>=1.18 in the GPU image).
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
    parser.add_argument("--drop", nargs="*", default=[])
    parser.add_argument("--replace", nargs="*", default=[], metavar="NAME=REQ")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as fh:
        deps = tomllib.load(fh)["project"].get("dependencies", [])
    drop = {canonical(n) for n in args.drop}
    replace = {canonical(k): v for k, v in (item.split("=", 1) for item in args.replace)}
    for req in deps:
        name = requirement_name(req)
        if name in drop:
            print(f"requirements-from-pyproject: leaving out {req}", file=sys.stderr)
            continue
        print(replace.get(name, req))
    return 0


if __name__ == "__main__":
    sys.exit(main())
