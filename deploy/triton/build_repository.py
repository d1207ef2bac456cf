#!/usr/bin/env python3
"""Populate the Triton model repository with the idverify towers.

    python deploy/triton/build_repository.py [--version VERSION] [--out DIR]

For each Triton model (idverify_id, idverify_live) it copies the tower's ONNX file from
models/repository/towers/<version>/ to <out>/<model>/1/model.onnx, checking the SHA-256 of
the source and of the copy against the version's manifest.json (`towers.<tower>.file`,
`towers.<tower>.sha256`). The version defaults to the one named in
models/repository/towers/CURRENT. The baseline version has one backbone.onnx for both
towers: it is copied into both models.

--out defaults to deploy/triton/model_repository, where the config.pbtxt files are committed
and the copies are git-ignored. Another --out gets those config.pbtxt files copied too. The
repository's top level also gets TOWERS.json (version and hashes; Triton only loads model
folders), so an image built from it says which towers it serves: the API must run with the
same IDV_TOWER_VERSION, whose calibration sets the decision threshold.

Standard library only; it never changes models/."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TOWERS_DIR = ROOT / "models" / "repository" / "towers"
TEMPLATE = HERE / "model_repository"
# Triton model name -> tower key in manifest.json
MODELS = {"idverify_id": "id", "idverify_live": "live"}
MODEL_VERSION = "1"
CHUNK = 1 << 20


class BuildError(Exception):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def current_version(towers_dir: Path = TOWERS_DIR) -> str:
    try:
        version = (towers_dir / "CURRENT").read_text().strip()
    except FileNotFoundError:
        raise BuildError(f"{towers_dir / 'CURRENT'} is missing: pass --version") from None
    if not version:
        raise BuildError(f"{towers_dir / 'CURRENT'} is empty: pass --version")
    return version


def _plain_name(name: str, what: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise BuildError(f"{what} {name!r} is not a plain file name")
    return name


def plan(version: str | None = None, towers_dir: Path = TOWERS_DIR) -> dict:
    """What would be copied: {"version", "models": {model: {"source", "sha256"}}}, read from
    the version's manifest.json (nothing is hashed or copied yet)."""
    version = _plain_name(version or current_version(towers_dir), "tower version")
    manifest_path = towers_dir / version / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise BuildError(f"no manifest for tower version {version!r}: {manifest_path}") from None
    towers = manifest.get("towers")
    if not isinstance(towers, dict):
        raise BuildError(f"{manifest_path}: no `towers` object")
    models = {}
    for model, tower in MODELS.items():
        entry = towers.get(tower)
        if not isinstance(entry, dict) or not entry.get("file") or not entry.get("sha256"):
            raise BuildError(f"{manifest_path}: towers.{tower} needs `file` and `sha256`")
        source = towers_dir / version / _plain_name(entry["file"], f"towers.{tower}.file")
        models[model] = {"tower": tower, "source": source, "sha256": str(entry["sha256"]).lower()}
    return {"version": version, "models": models}


def _copy_verified(source: Path, dest: Path, expected: str) -> None:
    """Copy source to dest (atomically, via a temporary file beside it), hashing the bytes as
    they are written; both the source and the written copy must hash to `expected`."""
    if not source.is_file():
        raise BuildError(f"missing tower file: {source}")
    actual = sha256_of(source)
    if actual != expected:
        raise BuildError(f"{source}: SHA-256 {actual} does not match the manifest's {expected}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".model.", suffix=".onnx.tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out, CHUNK)
        written = sha256_of(tmp)
        if written != expected:
            raise BuildError(f"{dest}: the copy hashes to {written}, not {expected}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def build(out: Path = TEMPLATE, version: str | None = None, towers_dir: Path = TOWERS_DIR) -> dict:
    """Populate `out`; returns what TOWERS.json records."""
    todo = plan(version, towers_dir)
    out = Path(out)
    record = {"tower_version": todo["version"], "models": {}}
    for model, item in todo["models"].items():
        config = TEMPLATE / model / "config.pbtxt"
        if not config.is_file():
            raise BuildError(f"missing {config}")
        if (out / model).resolve() != (TEMPLATE / model).resolve():
            (out / model).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(config, out / model / "config.pbtxt")
        _copy_verified(item["source"], out / model / MODEL_VERSION / "model.onnx", item["sha256"])
        record["models"][model] = {
            "tower": item["tower"],
            "file": f"{model}/{MODEL_VERSION}/model.onnx",
            "source": item["source"].name,
            "sha256": item["sha256"],
        }
    (out / "TOWERS.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", help="tower version folder (default: the one in CURRENT)")
    parser.add_argument("--out", type=Path, default=TEMPLATE,
                        help=f"model repository to populate (default: {TEMPLATE.relative_to(ROOT)})")
    parser.add_argument("--towers-dir", type=Path, default=TOWERS_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        record = build(args.out, args.version, args.towers_dir)
    except BuildError as exc:
        print(f"build_repository: {exc}", file=sys.stderr)
        return 1
    for model, item in record["models"].items():
        print(f"{model}: {item['source']} -> {args.out / item['file']} (sha256 {item['sha256'][:12]}…)")
    print(f"tower version {record['tower_version']}: run the API with "
          f"IDV_TOWER_VERSION={record['tower_version']} (or `current` while CURRENT names it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
