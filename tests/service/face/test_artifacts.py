"""The service refuses to start on a model that does not match its manifest."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service.face.artifacts import ArtifactError
from service.face.loader import load_models, load_pipeline
from service.settings import Settings

REPO = Path(__file__).resolve().parents[3] / "models" / "repository"


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    dst = tmp_path / "repository"
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns("facenet*"))
    return dst


def _current(repo: Path) -> Path:
    return repo / "towers" / (repo / "towers" / "CURRENT").read_text().strip()


def test_loads_when_everything_matches(repo_copy):
    models = load_models(Settings(models_dir=repo_copy, scoring="towers"))
    assert models.model_version.startswith("towers:") and models.threshold.far is not None
    fused = load_models(Settings(models_dir=repo_copy))   # the default: both families and the fusion
    assert fused.model_version.startswith("fusion:") and fused.threshold.far is not None
    # the detector and the towers are both resolved from the repository by version
    assert models.pipeline.detector_version == "yunet:1"   # the default IDV_DETECTOR


def test_loader_resolves_the_detector_version(repo_copy):
    (repo_copy / "mtcnn" / "2").mkdir()
    with pytest.raises(ArtifactError, match="no manifest"):
        load_pipeline(Settings(models_dir=repo_copy, detector="mtcnn", detector_version="2"))
    (repo_copy / "mtcnn" / "CURRENT").write_text("1\n")
    assert load_pipeline(Settings(models_dir=repo_copy, detector="mtcnn",
                                  detector_version="current")).detector_version == "mtcnn:1"


def test_refuses_a_tower_with_another_hash(repo_copy):
    folder = _current(repo_copy)
    onnx = folder / json.loads((folder / "manifest.json").read_text())["towers"]["live"]["file"]
    data = bytearray(onnx.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the weights
    onnx.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match"):
        load_pipeline(Settings(models_dir=repo_copy))


def test_refuses_an_edited_calibration_table(repo_copy):
    cal = _current(repo_copy) / "calibration.json"
    body = json.loads(cal.read_text())
    body["table"][0]["score"] -= 0.01
    cal.write_text(json.dumps(body))
    with pytest.raises(ArtifactError, match="does not match"):
        load_pipeline(Settings(models_dir=repo_copy))


def test_refuses_a_missing_version(repo_copy):
    (repo_copy / "towers" / "CURRENT").write_text("no-such-version\n")
    with pytest.raises(ArtifactError, match="no manifest"):
        load_pipeline(Settings(models_dir=repo_copy, scoring="towers"))
    (repo_copy / "fusion" / "CURRENT").write_text("no-such-version\n")
    with pytest.raises(ArtifactError, match="no manifest"):
        load_pipeline(Settings(models_dir=repo_copy))


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
