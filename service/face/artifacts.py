"""Model repository: versioned folders with a manifest beside the files it names.

    models/repository/<name>/<version>/manifest.json
    models/repository/towers/CURRENT        -> the tower version the service serves

The service refuses to start when a file's SHA-256 differs from its manifest.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path



class ArtifactError(RuntimeError):
    """A model artifact is missing or does not match its manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_version(models_dir: Path, name: str, version: str) -> Path:
    if version == "current":
        pointer = models_dir / name / "CURRENT"
        if not pointer.exists():
            raise ArtifactError(f"{pointer} is missing: no current version of {name!r}")
        version = pointer.read_text().strip()
    folder = models_dir / name / version
    if not (folder / "manifest.json").exists():
        raise ArtifactError(f"no manifest at {folder / 'manifest.json'}")
    return folder


def load_manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


def verify_file(folder: Path, entry: dict) -> Path:
    """The file a manifest entry names, checked against its SHA-256. An entry with `version`
    names a file of that other version of the same model (a shared file, e.g. the pretrained
    live tower a distilled version keeps byte for byte)."""
    if entry.get("version"):
        if "/" in str(entry["version"]) or entry["version"] in ("", ".", ".."):
            raise ArtifactError(f"{folder}: bad version {entry['version']!r} in a manifest entry")
        folder = folder.parent / str(entry["version"])
    path = folder / entry["file"]
    if not path.exists():
        raise ArtifactError(f"{path} named in the manifest is missing")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise ArtifactError(f"{path}: SHA-256 {actual} does not match manifest {entry['sha256']}")
    return path


def artifact_version(manifest: dict) -> str:
    """`name:version`, as answers, audit records and reports name a model."""
    return f"{manifest['name']}:{manifest['version']}"


def flip_average(manifest: dict, side: str) -> bool:
    """Whether `side` ("id" or "live") is embedded flip-averaged: the manifest's
    `test_time.flip_average`, one bool for both sides or {"id": bool, "live": bool}."""
    flip = (manifest.get("test_time") or {}).get("flip_average", False)
    return bool(flip.get(side, False)) if isinstance(flip, dict) else bool(flip)


def centring(manifest: dict):
    """The mean embedding the service subtracts from every normalised output of both towers
    (`centring.mu` with `in_graph` false), or None (no centring, or the graphs do it)."""
    c = manifest.get("centring") or {}
    if not c or c.get("in_graph", True):
        return None
    import numpy as np

    return np.asarray(c["mu"], np.float32)


def artifact_calibration(manifest: dict, folder: Path) -> list[dict]:
    """The manifest's calibration table: a file beside it (`calibration.json`), inline, or none."""
    cal = manifest.get("calibration")
    if isinstance(cal, str):
        return json.loads((Path(folder) / cal).read_text())["table"]
    return cal or []


@dataclass
class Towers:
    id: "Tower"
    live: "Tower"
    manifest: dict
    folder: Path

    @property
    def version(self) -> str:
        return artifact_version(self.manifest)

    @property
    def calibration(self) -> list[dict]:
        return artifact_calibration(self.manifest, self.folder)


def load_towers(models_dir: Path, name: str, version: str, providers: list[str], threads: int = 0,
                make_tower=None) -> Towers:
    """`make_tower(side, path, flip_average, chip_size)`: builds each side's tower instead of a
    local ONNX Runtime session (the Triton backend); the files are checked all the same."""
    from service.face.embed import Tower

    folder = resolve_version(models_dir, name, version)
    manifest = load_manifest(folder)
    towers = manifest.get("towers") or {}
    if set(towers) != {"id", "live"}:
        raise ArtifactError(f"{folder}: manifest must name towers 'id' and 'live', got {sorted(towers)}")
    paths = {side: verify_file(folder, entry) for side, entry in towers.items()}
    if isinstance(manifest.get("calibration"), str):
        verify_file(folder, {"file": manifest["calibration"], "sha256": manifest["calibration_sha256"]})
    flip = {side: flip_average(manifest, side) for side in ("id", "live")}
    if make_tower is not None:
        size = int(manifest["template"]["size"])
        made = {side: make_tower(side, paths[side], flip[side], size) for side in ("id", "live")}
        for tower in made.values():
            tower.centre = centring(manifest)
        return Towers(id=made["id"], live=made["live"], manifest=manifest, folder=folder)
    fold = bool((manifest.get("runtime") or {}).get("fold_dequantize", False))
    centre = centring(manifest)
    built: dict[tuple[Path, bool], Tower] = {}
    sessions: dict[Path, object] = {}
    for side, p in paths.items():  # identical files share one session; identical options one tower
        if (p, flip[side]) not in built:
            built[(p, flip[side])] = Tower(p, providers, threads, flip_average=flip[side], fold_dequantize=fold,
                                           session=sessions.get(p), centre=centre)
            sessions[p] = built[(p, flip[side])].session
    return Towers(id=built[(paths["id"], flip["id"])], live=built[(paths["live"], flip["live"])],
                  manifest=manifest, folder=folder)
