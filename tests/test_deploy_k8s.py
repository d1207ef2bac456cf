"""Scale-out files under deploy/, checked offline (no cluster, no GPU, no network).

- Every Kubernetes resource under deploy/ is validated strictly (no unknown fields) against the
  schemas that the `kubernetes-validate` package bundles, for the oldest Kubernetes minor we
  support (K8S_MIN) and the newest the package carries. Skipped, with that reason, where the
  package is not installed.
- Each kustomization (base, migrate, overlays) is rendered here by `render()`: the files under
  deploy/ use only `resources` and JSON6902 `patches` (asserted below), which is all it
  implements. The rendered output is validated too, and where `kubectl` (built-in kustomize) or
  `kustomize` is on PATH, it must equal what that tool renders.
- The semantic points: probe paths, selectors against labels, HPA and PDB targets, the migrate
  Job's command, IDV_* settings only, the Secret kept out of every kustomization, the GPU and
  Triton overlays.
- deploy/triton: each config.pbtxt is parsed by a small protobuf-text-format parser here and,
  where `tritonclient` is installed, by protobuf against Triton's own model_config.proto
  (tritonclient ships its compiled model_config_pb2); its input/output must match the towers'
  manifest and ONNX graphs. build_repository.py is run on small fake towers.
- A real Triton server is started where one with the ONNX Runtime backend and a GPU exist
  (tritonserver on PATH, or nvidia-pytriton's bundled one); otherwise skipped with the reason.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the manifests")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
TRITON = DEPLOY / "triton"
TOWERS = ROOT / "models" / "repository" / "towers"
REPO_MODELS = ROOT / "models" / "repository"
KUSTOMIZATIONS = ["base", "migrate", "overlays/gpu", "overlays/triton"]
K8S_MIN = "1.30.0"
# settings manifests may set that service/settings.py does not have yet (none now: the Triton
# ones, issue 11 item 5, have landed)
PENDING_SETTINGS: set[str] = set()
API = {"app.kubernetes.io/name": "idverify", "app.kubernetes.io/component": "api"}


# --- loading and rendering ------------------------------------------------------------------

def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _load(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _is_kustomization(path: Path) -> bool:
    return path.name in ("kustomization.yaml", "kustomization.yml")


def _is_patch(path: Path) -> bool:
    return path.name.endswith((".patch.yaml", ".patch.yml"))


def _resource_files() -> list[Path]:
    return [p for p in _yaml_files() if not _is_kustomization(p) and not _is_patch(p)]


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _walk(doc, parts):
    for part in parts:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def apply_json6902(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add / replace / remove / test: what the overlays use."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        parent, last = _walk(doc, parts[:-1]), parts[-1]
        kind = op["op"]
        if kind == "test":
            assert _walk(doc, parts) == op["value"], f"JSON6902 test failed at {op['path']}"
        elif kind == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "replace":
            index = int(last) if isinstance(parent, list) else last
            if not isinstance(parent, list):
                assert last in parent, f"JSON6902 replace of a missing {op['path']}"
            parent[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        else:
            raise AssertionError(f"JSON6902 op {kind!r} is not used here")
    return doc


def render(directory: Path) -> list[dict]:
    """The kustomization in `directory`, rendered (resources, then JSON6902 patches)."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for entry in kust.get("resources", []):
        target = (directory / entry).resolve()
        docs.extend(render(target) if target.is_dir() else _load(target))
    for patch in kust.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        selector = patch["target"]
        hits = [i for i, d in enumerate(docs)
                if d["kind"] == selector["kind"] and d["metadata"]["name"] == selector["name"]]
        assert len(hits) == 1, f"{directory}: patch target {selector} matches {len(hits)} resources"
        docs[hits[0]] = apply_json6902(docs[hits[0]], ops)
    return docs


def _by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    out = {}
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in out, f"duplicate {key}"
        out[key] = doc
    return out


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict]:
    return {name: _by_kind(render(DEPLOY / name)) for name in KUSTOMIZATIONS}


# --- schema validation ----------------------------------------------------------------------

def _validator():
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate (test extra) is not installed: no bundled Kubernetes schemas")


def _k8s_versions(kv) -> list[str]:
    bundled = importlib.import_module("kubernetes_validate.utils").all_versions()
    assert K8S_MIN in bundled, f"kubernetes-validate bundles {bundled}, not {K8S_MIN}"
    return sorted({K8S_MIN, kv.latest_version()})


def test_every_resource_file_validates_strictly():
    kv = _validator()
    files = _resource_files()
    kinds = {doc["kind"] for path in files for doc in _load(path)}
    assert kinds == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget", "Job", "Secret"}, kinds
    for version in _k8s_versions(kv):
        for path in files:
            for doc in _load(path):
                try:
                    kv.validate(doc, version, strict=True)
                except Exception as exc:  # ValidationError, or an unknown kind/apiVersion
                    pytest.fail(f"{path.relative_to(ROOT)} {doc.get('kind')}/{doc.get('metadata', {}).get('name')} "
                                f"against Kubernetes {version}: {str(exc).splitlines()[0]}")


def test_strict_validation_rejects_a_misspelt_field():
    kv = _validator()
    doc = copy.deepcopy(_load(DEPLOY / "base" / "deployment.yaml")[0])
    probe = {"httpGet": {"path": "/readyz", "port": 8000}}
    doc["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = probe
    with pytest.raises(Exception, match="readinessprobe"):
        kv.validate(doc, K8S_MIN, strict=True)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rendered_kustomization_validates_strictly(name, rendered):
    kv = _validator()
    for version in _k8s_versions(kv):
        for (kind, res), doc in rendered[name].items():
            try:
                kv.validate(doc, version, strict=True)
            except Exception as exc:
                pytest.fail(f"{name}: {kind}/{res} against Kubernetes {version}: {str(exc).splitlines()[0]}")


def test_kustomizations_use_only_what_render_implements():
    dirs = {p.parent for p in _yaml_files() if _is_kustomization(p)}
    assert dirs == {DEPLOY / name for name in KUSTOMIZATIONS}
    for directory in dirs:
        kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
        assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
        assert set(kust) <= {"apiVersion", "kind", "resources", "patches"}, directory
        for entry in kust["resources"]:
            assert (directory / entry).exists(), (directory, entry)
        for patch in kust.get("patches", []):
            assert set(patch) == {"path", "target"} and set(patch["target"]) == {"kind", "name"}, patch
            assert _is_patch(directory / patch["path"]), patch
    # every patch file is used, and is a list of JSON6902 operations
    used = {(d / p["path"]).resolve() for d in dirs
            for p in (yaml.safe_load((d / "kustomization.yaml").read_text()).get("patches") or [])}
    for path in (p for p in _yaml_files() if _is_patch(p)):
        assert path.resolve() in used, f"{path} is not listed in a kustomization"
        ops = yaml.safe_load(path.read_text())
        assert isinstance(ops, list) and ops
        for op in ops:
            assert op["op"] in {"add", "replace", "remove", "test"} and op["path"].startswith("/"), op


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_render_matches_kustomize(name, rendered):
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is on PATH: only this file's own rendering is checked")
    proc = subprocess.run([*command, str(DEPLOY / name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert _by_kind(_load_text(proc.stdout)) == rendered[name]


def _load_text(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


# --- what the manifests say -----------------------------------------------------------------

def _container(deployment: dict, name: str) -> dict:
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    return containers[name]


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _quantity(value) -> float:
    """A Kubernetes quantity or a compose size (`2G` is GiB in Docker) in bytes or cores."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match, value
    number, unit = float(match[1]), match[2]
    return number * units[unit] if unit else number


def _settings_fields() -> set[str] | None:
    try:
        from service.settings import Settings
    except ImportError:
        return None
    return {f"IDV_{name.upper()}" for name in Settings.model_fields}


def test_no_namespace_anywhere():
    for path in _yaml_files():
        for doc in _load(path):
            if isinstance(doc, dict):
                assert "namespace" not in doc.get("metadata", {}) and "namespace" not in doc, path


def test_api_deployment(rendered):
    res = rendered["base"]
    dep = res[("Deployment", "idverify")]
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"] == API and _matches(API, labels)
    assert spec["replicas"] == 2
    assert spec["strategy"]["type"] == "RollingUpdate" and spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    api = _container(dep, "api")
    assert api["image"].startswith("idverify:") and api["command"] == ["idverify", "serve"]
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert ports == {"http": 8000}
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = api["startupProbe"]
    assert startup["httpGet"]["path"] in ("/healthz", "/readyz")
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "model loading needs minutes"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert api[probe]["httpGet"]["port"] in ("http", 8000)

    # non-root, read-only root filesystem with a writable /tmp
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    sc = api["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmp = [m for m in api["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and "emptyDir" in volumes[tmp[0]["name"]]

    # resources: both set; the memory limit is the compose file's (2G there, GiB in Docker)
    resources = api["resources"]
    for key in ("cpu", "memory"):
        assert key in resources["requests"] and key in resources["limits"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    compose_mem = compose["services"]["api"]["deploy"]["resources"]["limits"]["memory"]
    m = re.fullmatch(r"\$\{[A-Z_]+:-([^}]+)\}", compose_mem)  # an overridable default: ${IDV_API_MEMORY:-2G}
    compose_mem = m.group(1) if m else compose_mem
    assert _quantity(resources["limits"]["memory"]) == _quantity(compose_mem.replace("G", "Gi"))
    # onnxruntime's threads pinned to the CPU limit: two photos analysed at once per request
    config = res[("ConfigMap", "idverify")]["data"]
    assert 2 * _quantity(config["IDV_ONNX_THREADS"]) == _quantity(resources["limits"]["cpu"])


def test_env_is_idv_settings_from_configmap_and_secret(rendered):
    secret = _load(DEPLOY / "secret.example.yaml")[0]
    fields = _settings_fields()
    for name, res in rendered.items():
        configmaps = {n: d for (k, n), d in res.items() if k == "ConfigMap"}
        for (kind, _), doc in res.items():
            if kind not in ("Deployment", "Job"):
                continue
            for c in doc["spec"]["template"]["spec"]["containers"]:
                if c["name"] == "triton":
                    assert not c.get("env") and not c.get("envFrom")
                    continue
                names = [e["name"] for e in c.get("env", [])]
                for source in c.get("envFrom", []):
                    ref = source["configMapRef"]["name"]
                    assert ref in configmaps, (name, ref)
                    names += list(configmaps[ref]["data"])
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] == secret["metadata"]["name"]
                        assert ref["key"] in secret["stringData"], ref
                        assert ref.get("optional", False) == (e["name"] != "IDV_DATABASE_URL"), e
                assert "IDV_DATABASE_URL" in names
                assert len(names) == len(set(names)), names
                for var in names:
                    assert var.startswith("IDV_"), (name, var)
                    if fields is not None:
                        assert var in fields or var in PENDING_SETTINGS, f"{name}: {var} is not a setting"


def test_secret_is_a_template_kept_out_of_kustomizations(rendered):
    secret = _load(DEPLOY / "secret.example.yaml")[0]
    assert secret["kind"] == "Secret" and secret["type"] == "Opaque" and "data" not in secret
    assert set(secret["stringData"]) == {"database-url", "bootstrap-admin-key", "image-key", "key-pepper"}
    assert all("CHANGE-ME" in value for value in secret["stringData"].values())
    for res in rendered.values():
        assert not [k for k in res if k[0] == "Secret"], "a kustomization would overwrite the real Secret"


def test_service_hpa_pdb_select_the_api(rendered):
    res = rendered["base"]
    dep = res[("Deployment", "idverify")]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = res[("Service", "idverify")]
    assert svc["spec"]["type"] == "ClusterIP" and _matches(svc["spec"]["selector"], pod_labels)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(8000, "http")]

    hpa = res[("HorizontalPodAutoscaler", "idverify")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "idverify"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert hpa["spec"]["minReplicas"] <= dep["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}

    pdb = res[("PodDisruptionBudget", "idverify")]
    assert pdb["spec"]["minAvailable"] == 1 < hpa["spec"]["minReplicas"]
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_migrate_job(rendered):
    job = rendered["migrate"][("Job", "idverify-migrate")]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["idverify", "migrate"]
    assert container["image"] == _container(rendered["base"][("Deployment", "idverify")], "api")["image"]
    assert spec["backoffLimit"] >= 1 and spec["ttlSecondsAfterFinished"] > 0
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert pod["securityContext"]["runAsNonRoot"] is True
    # its pods are not API pods: neither the Service nor the PDB may pick them up
    assert not _matches(API, job["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("name", ["base", "overlays/gpu", "overlays/triton"])
def test_configured_scoring_can_load_its_models(rendered, name):
    """A fused deployment must load the towers its fusion was fit on (else the service refuses
    to start): an overlay that pins another towers version scores with the towers alone."""
    from service.face.fusion import load_fusion
    from service.settings import Settings

    data = rendered[name][("ConfigMap", "idverify")]["data"]
    scoring = data.get("IDV_SCORING", Settings().scoring)
    version = data.get("IDV_TOWER_VERSION", "current")
    if scoring == "fused":
        fusion = load_fusion(REPO_MODELS, data.get("IDV_FUSION_VERSION", "current"))
        assert version in ("current", fusion.manifest["members"]["towers"]["version"]), (name, version)
    else:
        assert scoring == "towers" and (REPO_MODELS / "towers" / version / "manifest.json").exists() \
            or version == "current", (name, scoring, version)


def test_gpu_overlay(rendered):
    res = rendered["overlays/gpu"]
    api = _container(res[("Deployment", "idverify")], "api")
    assert api["image"] == "idverify:gpu"
    assert api["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert res[("ConfigMap", "idverify")]["data"]["IDV_PROVIDERS"] == "cuda"
    assert float(res[("ConfigMap", "idverify")]["data"]["IDV_BATCH_WAIT_MS"]) > 0   # tower calls batched
    base = rendered["base"][("Deployment", "idverify")]
    assert res[("Deployment", "idverify")]["spec"]["template"]["spec"]["securityContext"] == \
        base["spec"]["template"]["spec"]["securityContext"]


def test_triton_overlay(rendered):
    res = rendered["overlays/triton"]
    data = res[("ConfigMap", "idverify")]["data"]
    assert data["IDV_TOWER_BACKEND"] == "triton"
    host, port = data["IDV_TRITON_URL"].rsplit(":", 1)
    svc = res[("Service", host)]
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"] == int(port)
    triton = res[("Deployment", "idverify-triton")]
    labels = triton["spec"]["template"]["metadata"]["labels"]
    assert _matches(svc["spec"]["selector"], labels)
    # the API's Service, PDB and HPA do not take in Triton pods, nor Triton's Service API pods
    assert not _matches(res[("Service", "idverify")]["spec"]["selector"], labels)
    assert not _matches(res[("PodDisruptionBudget", "idverify")]["spec"]["selector"]["matchLabels"], labels)
    api_labels = res[("Deployment", "idverify")]["spec"]["template"]["metadata"]["labels"]
    assert not _matches(svc["spec"]["selector"], api_labels)

    server = _container(triton, "triton")
    assert server["command"] == ["tritonserver"] and "--model-repository=/models" in server["args"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    container_ports = {p["name"] for p in server["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports
    # the image's Dockerfile bakes the repository in at the path the server is given
    assert "COPY model_repository /models" in (TRITON / "Dockerfile").read_text()


# --- Triton model repository ----------------------------------------------------------------

_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|[{}\[\]:,;<>]|[^\s{}\[\]:,;<>"#]+')


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format, structurally: {field: [values]} with nested messages as dicts,
    strings unquoted, numbers as int/float and enum names as str. Repeated fields (`f [a, b]`,
    or a field given more than once) become one list. Raises ValueError on a syntax error."""
    pieces = _TOKEN.findall(text)
    if "".join(pieces) != text:  # a character no token takes, e.g. an unclosed string
        raise ValueError("unreadable text")
    tokens = [t for t in pieces if t.strip() and not t.startswith("#")]
    pos = 0

    def scalar(token: str):
        if token.startswith('"'):
            return bytes(token[1:-1], "utf-8").decode("unicode_escape")
        for cast in (int, float):
            try:
                return cast(token)
            except ValueError:
                pass
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", token):
            raise ValueError(f"bad value {token!r}")
        return token

    def value():
        nonlocal pos
        token = tokens[pos]
        if token in ("{", "<"):
            close = "}" if token == "{" else ">"
            pos += 1
            return message(close)
        pos += 1
        return scalar(token)

    def message(close: str | None) -> dict:
        nonlocal pos
        fields: dict = {}
        while pos < len(tokens):
            token = tokens[pos]
            if token == close:
                pos += 1
                return fields
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", token):
                raise ValueError(f"expected a field name, got {token!r}")
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            elif tokens[pos] not in ("{", "<", "["):
                raise ValueError(f"expected ':' after {token}")
            items = fields.setdefault(token, [])
            if tokens[pos] == "[":
                pos += 1
                while tokens[pos] != "]":
                    items.append(value())
                    if tokens[pos] == ",":
                        pos += 1
                    elif tokens[pos] != "]":
                        raise ValueError(f"expected ',' or ']' in {token}")
                pos += 1
            else:
                items.append(value())
            if pos < len(tokens) and tokens[pos] in (",", ";"):
                pos += 1
        if close is not None:
            raise ValueError("unclosed message")
        return fields

    return message(None)


def _builder():
    spec = importlib.util.spec_from_file_location("build_repository", TRITON / "build_repository.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _configs() -> dict[str, Path]:
    return {p.parent.name: p for p in sorted((TRITON / "model_repository").glob("*/config.pbtxt"))}


def test_parse_pbtxt_is_strict_enough():
    parsed = parse_pbtxt('name: "m" a [ 1, 2 ] b { c: X } b { c: Y } d: 1.5 # note\n')
    assert parsed == {"name": ["m"], "a": [1, 2], "b": [{"c": ["X"]}, {"c": ["Y"]}], "d": [1.5]}
    for bad in ('name "m"', "a { b: 1", "a [ 1 2 ]", "1: 2", 'name: "m'):
        with pytest.raises((ValueError, IndexError)):
            parse_pbtxt(bad)


def test_triton_configs_match_the_towers():
    builder = _builder()
    configs = _configs()
    assert set(configs) == set(builder.MODELS) == {"idverify_id", "idverify_live"}
    manifest = json.loads((TOWERS / (TOWERS / "CURRENT").read_text().strip() / "manifest.json").read_text())
    size = manifest["input"]["size"]
    for model, path in configs.items():
        cfg = parse_pbtxt(path.read_text())
        one = {k: v[0] for k, v in cfg.items() if len(v) == 1}
        assert one["name"] == model and one["platform"] == "onnxruntime_onnx"
        max_batch = one["max_batch_size"]
        assert isinstance(max_batch, int) and max_batch >= 8
        [inp], [out] = cfg["input"], cfg["output"]
        # with max_batch_size > 0 the dims leave out the batch dimension
        assert inp["name"] == [manifest["input"]["name"]] and inp["data_type"] == ["TYPE_FP32"]
        assert manifest["input"]["layout"] == "NHWC" and inp["dims"] == [size[0], size[1], 3]
        assert out["name"] == [manifest["output"]["name"]] and out["data_type"] == ["TYPE_FP32"]
        assert out["dims"] == [manifest["output"]["dim"]]
        [batching] = cfg["dynamic_batching"]
        assert batching["max_queue_delay_microseconds"][0] > 0
        preferred = batching["preferred_batch_size"]
        assert preferred and all(0 < b <= max_batch for b in preferred) and preferred == sorted(preferred)
        groups = cfg["instance_group"]
        assert groups and all(g["kind"] == ["KIND_GPU"] for g in groups)


def test_triton_configs_parse_with_tritons_model_config_proto():
    tritonclient = pytest.importorskip(
        "tritonclient", reason="tritonclient is not installed: Triton's model_config.proto is not "
                               "here, so the configs are checked by this file's structural parser only")
    text_format = pytest.importorskip("google.protobuf.text_format")
    # the compiled proto, loaded by path: tritonclient.grpc's __init__ would want grpcio
    pb2_path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", pb2_path)
    pb2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb2)
    for model, path in _configs().items():
        config = text_format.Parse(path.read_text(), pb2.ModelConfig())  # unknown fields raise
        assert config.name == model and config.platform == "onnxruntime_onnx"
        assert config.input[0].data_type == pb2.TYPE_FP32 and list(config.input[0].dims) == [150, 150, 3]
        assert config.output[0].data_type == pb2.TYPE_FP32 and list(config.output[0].dims) == [128]
        assert config.HasField("dynamic_batching")
        assert config.dynamic_batching.max_queue_delay_microseconds > 0
        assert all(g.kind == pb2.ModelInstanceGroup.KIND_GPU for g in config.instance_group)


def test_triton_configs_match_the_onnx_graphs():
    onnx = pytest.importorskip("onnx", reason="onnx is not installed: the graphs' shapes are not checked")
    builder = _builder()
    plan = builder.plan()
    for model, item in plan["models"].items():
        cfg = parse_pbtxt(_configs()[model].read_text())
        graph = onnx.load(str(item["source"]), load_external_data=False).graph
        [inp], [out] = graph.input, graph.output

        def dims(value):
            return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

        assert inp.name == cfg["input"][0]["name"][0] and out.name == cfg["output"][0]["name"][0]
        assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        # dynamic batch dimension first, then the config's dims
        assert isinstance(dims(inp)[0], str) and dims(inp)[1:] == cfg["input"][0]["dims"]
        assert isinstance(dims(out)[0], str) and dims(out)[1:] == cfg["output"][0]["dims"]


def test_model_copies_are_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["deploy/triton/model_repository/idverify_id/1/model.onnx",
             "deploy/triton/model_repository/idverify_live/1/model.onnx",
             "deploy/triton/model_repository/TOWERS.json"]
    proc = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.split() == paths
    tracked = subprocess.run(["git", "ls-files", "deploy/triton"], cwd=ROOT, capture_output=True, text=True)
    assert not [p for p in tracked.stdout.split() if p.endswith(".onnx")]


# --- build_repository.py --------------------------------------------------------------------

def _fake_towers(tmp_path: Path, shared: bool = False) -> Path:
    towers = tmp_path / "towers"
    version = towers / "v-test"
    version.mkdir(parents=True)
    entries = {}
    for tower in ("id", "live"):
        name = "backbone.onnx" if shared else f"{tower}.onnx"
        body = b"fake onnx " + name.encode()
        (version / name).write_bytes(body)
        entries[tower] = {"file": name, "sha256": hashlib.sha256(body).hexdigest()}
    (version / "manifest.json").write_text(json.dumps({"version": "v-test", "towers": entries}))
    (towers / "CURRENT").write_text("v-test\n")
    return towers


@pytest.mark.parametrize("shared", [False, True], ids=["two-files", "one-backbone"])
def test_build_repository_copies_and_verifies(tmp_path, shared):
    builder = _builder()
    towers = _fake_towers(tmp_path, shared)
    out = tmp_path / "repo"
    record = builder.build(out, towers_dir=towers)
    assert record["tower_version"] == "v-test"
    for model, tower in builder.MODELS.items():
        source = towers / "v-test" / ("backbone.onnx" if shared else f"{tower}.onnx")
        assert (out / model / "1" / "model.onnx").read_bytes() == source.read_bytes()
        assert (out / model / "config.pbtxt").read_text() == _configs()[model].read_text()
        assert record["models"][model]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert json.loads((out / "TOWERS.json").read_text()) == record
    assert not list(out.rglob("*.tmp"))


def test_build_repository_refuses_a_hash_mismatch(tmp_path, capsys):
    builder = _builder()
    towers = _fake_towers(tmp_path)
    (towers / "v-test" / "live.onnx").write_bytes(b"tampered")
    out = tmp_path / "repo"
    assert builder.main(["--out", str(out), "--towers-dir", str(towers)]) == 1
    assert "does not match the manifest" in capsys.readouterr().err
    assert not (out / "idverify_live" / "1" / "model.onnx").exists()
    assert not list(out.rglob("*.tmp"))


def test_build_repository_rejects_bad_manifests(tmp_path):
    builder = _builder()
    towers = _fake_towers(tmp_path)
    manifest = towers / "v-test" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["towers"]["id"]["file"] = "../../escape.onnx"
    manifest.write_text(json.dumps(data))
    with pytest.raises(builder.BuildError, match="plain file name"):
        builder.plan(towers_dir=towers)
    del data["towers"]["live"]
    manifest.write_text(json.dumps(data))
    with pytest.raises(builder.BuildError):
        builder.plan(towers_dir=towers)
    with pytest.raises(builder.BuildError, match="no manifest"):
        builder.plan("missing", towers_dir=towers)


def test_build_repository_plan_for_the_current_towers():
    """The real CURRENT version: the manifest names files that exist and hash as it says."""
    builder = _builder()
    plan = builder.plan()
    assert plan["version"] == (TOWERS / "CURRENT").read_text().strip()
    for item in plan["models"].values():
        assert builder.sha256_of(item["source"]) == item["sha256"]


# --- a real Triton server -------------------------------------------------------------------

def _tritonserver() -> tuple[Path | None, str]:
    """A tritonserver binary that has the ONNX Runtime backend, or None and why not."""
    reasons = []
    candidates = []
    on_path = shutil.which("tritonserver")
    if on_path:
        binary = Path(on_path).resolve()
        candidates.append((binary, [binary.parent.parent / "backends", Path("/opt/tritonserver/backends")]))
    else:
        reasons.append("no tritonserver on PATH")
    spec = importlib.util.find_spec("pytriton")
    if spec and spec.submodule_search_locations:
        bundled = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
        candidates.append((bundled / "bin" / "tritonserver", [bundled / "backends"]))
    else:
        reasons.append("nvidia-pytriton is not installed (and its 0.7.0 wheel, 55 MB, bundles a "
                       "tritonserver with the python backend only, no onnxruntime backend)")
    for binary, backend_dirs in candidates:
        if not binary.is_file():
            continue
        for backends in backend_dirs:
            if (backends / "onnxruntime").is_dir():
                return binary, str(backends)
        reasons.append(f"{binary} has no onnxruntime backend (looked in {', '.join(map(str, backend_dirs))})")
    return None, "; ".join(reasons)


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_json(url: str, body: dict | None = None, timeout: float = 30):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


@contextlib.contextmanager
def triton_server(tmp_path):
    """A real tritonserver on deploy/triton's model repository (built into tmp_path), ready to
    serve; skips with the reason where none can run. Yields (builder, plan, http_port, grpc_port)."""
    binary, backends = _tritonserver()
    if binary is None:
        pytest.skip(f"no Triton server with the ONNX Runtime backend can run here: {backends}")
    if not _has_gpu():
        pytest.skip("the Triton configs ask for KIND_GPU instances and this machine has no GPU (nvidia-smi -L)")
    builder = _builder()
    repo = tmp_path / "model_repository"
    plan = builder.build(repo)
    http_port, grpc_port = _free_port(), _free_port()
    server = subprocess.Popen(
        [str(binary), f"--model-repository={repo}", f"--backend-directory={backends}",
         f"--http-port={http_port}", f"--grpc-port={grpc_port}", "--allow-metrics=false",
         "--exit-on-error=true", "--strict-readiness=true"],
        stdout=open(tmp_path / "triton.log", "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "triton.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "Triton not ready in 180 s"
                time.sleep(1)
        yield builder, plan, http_port, grpc_port
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_real_triton_server_serves_the_towers(tmp_path):
    np = pytest.importorskip("numpy")
    ort = pytest.importorskip("onnxruntime")
    with triton_server(tmp_path) as (builder, plan, http_port, _grpc_port):
        base = f"http://127.0.0.1:{http_port}"
        rng = np.random.default_rng(0)
        batch = rng.uniform(0, 255, size=(3, 150, 150, 3)).astype(np.float32)
        for model, item in builder.plan(plan["tower_version"])["models"].items():
            config = _http_json(f"{base}/v2/models/{model}/config")
            assert config["max_batch_size"] == 32
            answer = _http_json(f"{base}/v2/models/{model}/infer", {
                "inputs": [{"name": "image", "shape": list(batch.shape), "datatype": "FP32",
                            "data": batch.ravel().tolist()}],
                "outputs": [{"name": "embedding"}]})
            [out] = answer["outputs"]
            assert out["shape"] == [3, 128]
            got = np.asarray(out["data"], dtype=np.float32).reshape(3, 128)
            session = ort.InferenceSession(str(item["source"]), providers=["CPUExecutionProvider"])
            want = session.run(["embedding"], {"image": batch})[0]
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
