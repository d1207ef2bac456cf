"""The service refuses to start on a model that does not match its manifest."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service.face.artifacts import ArtifactError
from service.face.pipeline import Pipeline
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent / "models" / "repository"


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    dst = tmp_path / "repository"
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns("facenet*"))
    return dst


def _current(repo: Path) -> Path:
    return repo / "towers" / (repo / "towers" / "CURRENT").read_text().strip()


def test_loads_when_everything_matches(repo_copy):
    pipeline = Pipeline.from_settings(Settings(models_dir=repo_copy))
    assert pipeline.model_version.startswith("towers:") and pipeline.threshold.far is not None


def test_refuses_a_tower_with_another_hash(repo_copy):
    folder = _current(repo_copy)
    onnx = folder / json.loads((folder / "manifest.json").read_text())["towers"]["live"]["file"]
    data = bytearray(onnx.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the weights
    onnx.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match"):
        Pipeline.from_settings(Settings(models_dir=repo_copy))


def test_refuses_an_edited_calibration_table(repo_copy):
    cal = _current(repo_copy) / "calibration.json"
    body = json.loads(cal.read_text())
    body["table"][0]["score"] -= 0.01
    cal.write_text(json.dumps(body))
    with pytest.raises(ArtifactError, match="does not match"):
        Pipeline.from_settings(Settings(models_dir=repo_copy))


def test_refuses_a_missing_version(repo_copy):
    (repo_copy / "towers" / "CURRENT").write_text("no-such-version\n")
    with pytest.raises(ArtifactError, match="no manifest"):
        Pipeline.from_settings(Settings(models_dir=repo_copy))


def test_app_does_not_start_on_a_mismatch(repo_copy, tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.records.engine import migrate

    (repo_copy / "mtcnn" / "1" / "onet.onnx").write_bytes(b"not the model")
    url = f"sqlite:///{tmp_path / 'a.db'}"
    migrate(url)
    with pytest.raises(ArtifactError):
        with TestClient(create_app(Settings(models_dir=repo_copy, database_url=url))):
            pass
