"""Configuration you can check: a refused `IDV_` value ends `serve` and `migrate` with one line
naming the variable (no traceback) before the database is touched or a model is loaded;
`idverify config` prints the effective settings with secrets masked and checks them, the
database and the models (through the service's loader), one line per problem."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, inspect

from service import config_check
from service.face.loader import load_models
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "models" / "repository"


def _idverify(*args: str, env: dict[str, str], timeout: int = 180) -> subprocess.CompletedProcess:
    """`idverify ARGS` of this checkout, with only `env`'s IDV_ variables set."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("IDV_")}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_a_refused_scoring_stops_serve_before_the_database_or_the_models(tmp_path):
    db = tmp_path / "var" / "idverify.db"
    env = {"IDV_SCORING": "fusion", "IDV_DATABASE_URL": f"sqlite:///{db}",
           "IDV_MODELS_DIR": str(tmp_path / "no-models-here"), "IDV_PORT": "1"}
    for command in ("serve", "migrate"):
        out = _idverify(command, env=env)
        assert out.returncode == 2, out
        lines = out.stderr.strip().splitlines()
        assert lines == ["idverify: IDV_SCORING='fusion': input should be 'fused', 'towers' or 'sface'"], out.stderr
        assert "Traceback" not in out.stderr and out.stdout == ""
        # nothing was created, let alone migrated; no model folder was looked at (it does not exist)
        assert not db.exists() and not db.parent.exists()


def test_a_refused_setting_leaves_a_postgresql_database_unmigrated(pg_database_factory):
    url = pg_database_factory()
    out = _idverify("migrate", env={"IDV_SCORING": "fusion", "IDV_DATABASE_URL": url})
    assert out.returncode == 2 and "IDV_SCORING" in out.stderr and "Traceback" not in out.stderr
    engine = create_engine(url)
    try:
        assert inspect(engine).get_table_names() == []   # not even alembic_version
    finally:
        engine.dispose()


def test_refused_values_are_named_by_their_variable(tmp_path):
    out = _idverify("migrate", env={"IDV_FAR_TARGET": "abc", "IDV_PORT": "0", "IDV_DETECTOR": "haar",
                                    "IDV_DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert any(line.startswith("idverify: IDV_FAR_TARGET='abc': input should be a valid number") for line in lines)
    assert any(line.startswith("idverify: IDV_PORT='0': input should be greater than or equal to 1") for line in lines)
    assert any("IDV_DETECTOR='haar'" in line and "'yunet' or 'mtcnn'" in line for line in lines)
    assert "far_target" not in out.stderr and not (tmp_path / "a.db").exists()


def test_serve_refuses_a_database_that_is_not_migrated(tmp_path):
    db = tmp_path / "a.db"
    out = _idverify("serve", env={"IDV_DATABASE_URL": f"sqlite:///{db}"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"idverify: IDV_DATABASE_URL: no database at {db}: run `idverify migrate`"]
    assert not db.exists()


def test_config_prints_the_effective_settings_and_checks_them(tmp_path):
    from service.records.engine import migrate

    url = f"sqlite:///{tmp_path / 'a.db'}"
    migrate(url)
    secret = "pepper-" + "s3cr3t" * 6
    env = {"IDV_DATABASE_URL": url, "IDV_KEY_PEPPER": secret, "IDV_FAR_TARGET": "0.01", "IDV_SCORRING": "fused"}
    out = _idverify("config", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "* IDV_FAR_TARGET=0.01" in lines and "  IDV_SCORING=fused" in lines and f"* IDV_DATABASE_URL={url}" in lines
    assert f"* IDV_KEY_PEPPER=(set, {len(secret)} characters, masked)" in lines and secret not in out.stdout
    assert "  IDV_BOOTSTRAP_ADMIN_KEY=(not set)" in lines
    assert "note: IDV_SCORRING is not an idverify setting (ignored)" in lines
    assert "  settings: ok" in lines and f"  database: ok, {url}, at the latest migration" in lines
    models = next(line for line in lines if line.startswith("  models: "))
    served = load_models(Settings(far_target=0.01))   # the default: the fusion, at the FAR 1e-2 row of its table
    assert models.startswith(f"  models: ok, {served.model_version}") and f"threshold {served.threshold.score:.4f}" in models
    assert not any(line.startswith("error:") for line in lines)

    # the same with a refused value and a password in the URL: both named, the password hidden
    env.update(IDV_SCORING="fusion", IDV_DATABASE_URL="postgresql+psycopg://idv:hunter2@127.0.0.1:1/none")
    out = _idverify("config", "--no-models", env=env)
    assert out.returncode == 1 and "hunter2" not in out.stdout and "Traceback" not in out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "* IDV_SCORING=fusion  <- refused, see below" in lines
    assert "* IDV_DATABASE_URL=postgresql+psycopg://idv:***@127.0.0.1:1/none" in lines
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors[0] == "error: IDV_SCORING='fusion': input should be 'fused', 'towers' or 'sface'"
    assert errors[1].startswith("error: IDV_DATABASE_URL: cannot use the database at "
                                "postgresql+psycopg://idv:***@127.0.0.1:1/none: ") and len(errors) == 2


def test_rules_between_settings_are_checked():
    assert config_check.rule_problems(Settings()) == []
    short = config_check.rule_problems(Settings(bootstrap_admin_key="x" * 10))
    assert short == ["IDV_BOOTSTRAP_ADMIN_KEY: must be at least 32 characters, not 10 (e.g. `openssl rand -hex 32`)"]
    (line,) = config_check.rule_problems(Settings(retain_images=True))
    assert line.startswith("IDV_RETAIN_IMAGES is on but IDV_IMAGE_KEY is not set")


def test_database_check_names_the_variable(db_url, tmp_path):
    assert config_check.database_problems(Settings(database_url=db_url))[1] == []
    empty = tmp_path / "empty.db"
    create_engine(f"sqlite:///{empty}").connect().close()   # a database, but no schema
    (line,) = config_check.database_problems(Settings(database_url=f"sqlite:///{empty}"))[1]
    assert line.startswith("IDV_DATABASE_URL: the database at ") and "not at the latest migration" in line


def _tampered_repository(tmp: Path) -> Path:
    """The served models' files (symlinked), the towers' manifest naming another live.onnx."""
    repo = tmp / "repository"
    current = (REPO / "towers" / "CURRENT").read_text().strip()
    (repo / "towers" / current).mkdir(parents=True)
    for name in ("yunet", "mtcnn"):
        (repo / name).symlink_to(REPO / name, target_is_directory=True)
    (repo / "towers" / "CURRENT").write_text(current + "\n")
    for f in (REPO / "towers" / current).iterdir():
        if f.name != "manifest.json":
            (repo / "towers" / current / f.name).symlink_to(f)
    manifest = json.loads((REPO / "towers" / current / "manifest.json").read_text())
    manifest["towers"]["live"]["sha256"] = "0" * 64
    (repo / "towers" / current / "manifest.json").write_text(json.dumps(manifest))
    return repo


def test_model_check_runs_the_loader_and_names_the_variable(tmp_path):
    models, problems = config_check.load_models(Settings(models_dir=_tampered_repository(tmp_path), scoring="towers"))
    assert models is None and len(problems) == 1
    assert problems[0].startswith("IDV_TOWER_VERSION: ") and "does not match manifest" in problems[0]
    assert config_check.load_models(Settings(models_dir=tmp_path / "nowhere"))[1] == [
        f"IDV_MODELS_DIR: no such folder: {tmp_path / 'nowhere'}"]
    (line,) = config_check.load_models(Settings(far_target=1e-9))[1]
    assert line.startswith("IDV_FAR_TARGET: calibration table cannot resolve FAR 1e-09")
