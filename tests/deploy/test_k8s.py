"""The Kubernetes manifests (deploy/k8s/) render, validate against the Kubernetes API
schemas, and agree with the gateway: ports, probes, config keys, paths, security.

Rendering uses `kubectl kustomize` (the machine image has kubectl); schema validation
uses kubernetes-validate (PyPI: the published OpenAPI schemas, strict — unknown fields
fail). kubeconform is in neither Debian nor PyPI, so it is not used.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import check_security, parse, pin_env_name
from gateway.server import ADMIN_SERVICE, CRYPTO_SERVICE

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
KUBERNETES_VERSION = "1.32"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (for `kubectl kustomize`) is not installed")
DOC_CIDRS = ("192.0.2.", "198.51.100.", "203.0.113.")  # RFC 5737: placeholders the overlays must replace
CONFIG_DIR = "/etc/hsmgw"


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str = "hsmgw") -> dict[str, Any]:
    """The ``kind`` named ``name`` (a generated ConfigMap's name carries a content hash)."""
    found = [d for d in docs if d["kind"] == kind and re.fullmatch(re.escape(name) + r"(-[a-z0-9]{10})?",
                                                                      d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return copy.deepcopy(found[0])


def pod_spec(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def gateway_container(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    containers = {c["name"]: c for c in pod_spec(docs)["containers"]}
    return containers["hsmgw"]


def gateway_config(docs: tuple[dict[str, Any], ...]) -> tuple[str, Any]:
    text = one(docs, "ConfigMap", "hsmgw-config")["data"]["hsmgw.toml"]
    return text, parse(tomllib.loads(text), Path(CONFIG_DIR))


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


# -- every YAML file ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict)


def _source_manifests() -> list[Path]:
    return sorted(p for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", _source_manifests(), ids=lambda p: p.name)
def test_base_manifests_are_valid_kubernetes_objects(path: Path) -> None:
    import kubernetes_validate

    for doc in yaml.safe_load_all(path.read_text()):
        assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path.name}: missing apiVersion/kind/metadata"
        assert doc["metadata"].get("name"), f"{path.name}: {doc['kind']} has no name"
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_schema_validator_rejects_a_misspelled_field() -> None:
    """Strict validation is real: a typo in a probe would not slip through."""
    import kubernetes_validate

    doc = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# -- rendered overlays ---------------------------------------------------------------------------


def test_there_is_an_overlay_per_region_and_they_cover_each_other() -> None:
    assert len(OVERLAYS) >= 2
    homes = {}
    for overlay in OVERLAYS:
        config = parse(tomllib.loads((K8S / "overlays" / overlay / "hsmgw.toml").read_text()), Path(CONFIG_DIR))
        assert config.home_region == overlay, "an overlay is named after its gateway's home region"
        homes[overlay] = config
    clusters = {tuple(sorted((c.name, c.region, c.token_label) for c in cfg.clusters)) for cfg in homes.values()}
    assert len(clusters) == 1, "every region's gateways must know every cluster (same names, regions, labels)"
    for region, config in homes.items():
        assert config.dr_regions, f"{region} has no DR region"
        assert set(config.dr_regions) <= set(homes) - {region}, "each DR region runs gateways of its own"


def test_one_region_creates_keys_on_the_shared_table() -> None:
    """The overlays share one global table, whose regions do not check each other's conditional
    writes: two creating regions could each make one key id, and replication would keep one."""
    configs = {overlay: parse(tomllib.loads((K8S / "overlays" / overlay / "hsmgw.toml").read_text()),
                              Path(CONFIG_DIR)) for overlay in OVERLAYS}
    tables = {cfg.store.url.split("?")[0] for cfg in configs.values()}
    assert len(tables) == 1, "the overlays share one placement table"
    assert [region for region, cfg in configs.items() if cfg.creates_keys] == ["us-east-1"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_validates_against_kubernetes_schemas(overlay: str) -> None:
    import kubernetes_validate

    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "NetworkPolicy", "CronJob"} <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "hsmgw", f"{doc['kind']} outside the hsmgw namespace"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_toml_is_a_valid_gateway_config_for_the_container(overlay: str) -> None:
    """The embedded TOML passes the gateway's own parser and start-up security checks, and
    every path it names exists in the pod: a mount, a ConfigMap key, or the image."""
    docs = render(overlay)
    _, config = gateway_config(docs)
    check_security(config)  # TLS on a non-loopback listener, with a policy
    assert config.home_region == overlay
    assert config.store.url.startswith("dynamodb://") and f"region={overlay}" in config.store.url
    assert config.cloudwatch.enabled

    spec = pod_spec(docs)
    container = gateway_container(docs)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    configmap = one(docs, "ConfigMap", "hsmgw-config")

    def mount_of(path: Path) -> dict[str, Any]:
        for mount_path, mount in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if path == Path(mount_path) or Path(mount_path) in path.parents:
                return mount
        raise AssertionError(f"{path} is on no volume of the gateway container")

    # The config file itself and the policy come from the ConfigMap mounted at /etc/hsmgw.
    config_mount = mount_of(Path(CONFIG_DIR) / "hsmgw.toml")
    assert volumes[config_mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert config.auth.policy_file is not None and config.auth.policy_file.parent == Path(CONFIG_DIR)
    assert config.auth.policy_file.name in configmap["data"]
    from gateway.auth import parse_policy

    parse_policy(tomllib.loads(configmap["data"][config.auth.policy_file.name]), "policy.toml")

    # TLS files: on the memory volume the init container fills, under the names it copies.
    assert config.server.tls is not None
    init = {c["name"]: c for c in spec["initContainers"]}["tls-files"]
    script = " ".join(init["command"])
    for path in (config.server.tls.cert_file, config.server.tls.key_file, config.server.tls.client_ca_file):
        mount = mount_of(path)
        assert "emptyDir" in volumes[mount["name"]], f"{path}: TLS files are copied to an emptyDir"
        copied = script.split("for f in", 1)[1].split(";", 1)[0].split()
        assert path.name in copied, f"the init container does not copy {path.name}"
        assert any(m["name"] == mount["name"] and not m.get("readOnly") for m in init["volumeMounts"])

    # Writable state on a writable volume (the root filesystem is read-only).
    for path in (config.base_dir / config.admin.audit_log,):
        mount = mount_of(path)
        assert not mount.get("readOnly"), f"{path} must be writable"
        assert "emptyDir" in volumes[mount["name"]] or "persistentVolumeClaim" in volumes[mount["name"]]

    # The PKCS #11 module is installed by the CloudHSM image the overlays deploy.
    cloudhsm_image = (DEPLOY / "container" / "cloudhsm.Dockerfile").read_text()
    assert "hsmgw-cloudhsm" in container["image"]
    assert f"test -f {config.pkcs11.module}" in cloudhsm_image

    # Ports: the gateway's listen and metrics ports are the container's named ports.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == config.server.port
    assert ports["metrics"] == port_of(config.metrics.listen)
    assert config.server.host == "0.0.0.0", "the pod must accept connections from the Service"

    # PINs come from the hsmgw-pins Secret, one HSMGW_PIN_<CLUSTER> per cluster (the
    # README's `kubectl create secret` names each of them).
    assert {"secretRef": {"name": "hsmgw-pins"}} in container["envFrom"]
    readme = (DEPLOY / "README.md").read_text()
    for cluster in config.clusters:
        assert f"--from-literal={pin_env_name(cluster.name)}=" in readme, pin_env_name(cluster.name)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_check_grpc_health_on_the_gateway_port(overlay: str) -> None:
    """Every probe runs the grpc.health.v1 check of deploy/container/healthcheck.py against
    the config the gateway serves (so, its port, over its mutual TLS)."""
    docs = render(overlay)
    container = gateway_container(docs)
    args = container["args"]
    served = Path(args[args.index("--config") + 1])
    assert served == Path(CONFIG_DIR) / "hsmgw.toml"
    dockerfile = (DEPLOY / "container" / "Dockerfile").read_text()
    assert "COPY deploy/container/healthcheck.py /opt/hsmgw/healthcheck.py" in dockerfile
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[probe_name]
        command = probe["exec"]["command"]
        assert command[:2] == ["/opt/hsmgw/bin/python", "/opt/hsmgw/healthcheck.py"], probe_name
        assert Path(command[command.index("--config") + 1]) == served, probe_name
        assert probe["timeoutSeconds"] >= 3, probe_name
    readiness = container["readinessProbe"]["exec"]["command"]
    assert readiness[readiness.index("--service") + 1] == CRYPTO_SERVICE
    # CryptoService (and "") is NOT_SERVING while no cluster can serve: a restart would not
    # bring the HSMs back, so start-up and liveness ask for what only reflects the process.
    for probe_name in ("startupProbe", "livenessProbe"):
        command = container[probe_name]["exec"]["command"]
        assert "--service" in command and command[command.index("--service") + 1] == ADMIN_SERVICE, probe_name
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", dockerfile, re.M | re.S)
    assert healthcheck, "the image has a HEALTHCHECK"
    command = json.loads(healthcheck.group(1).replace("\\\n", " "))
    assert command[command.index("--service") + 1] == ADMIN_SERVICE
    # The probe's client certificate and the CA it trusts are on the TLS volume.
    env = {e["name"]: e["value"] for e in container["env"]}
    init_script = " ".join({c["name"]: c for c in pod_spec(docs)["initContainers"]}["tls-files"]["command"])
    for name in ("HSMGW_PROBE_CA", "HSMGW_PROBE_CERT", "HSMGW_PROBE_KEY"):
        assert env[name].startswith("/run/hsmgw/tls/") and Path(env[name]).name in init_script


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_operators_reach_every_gateway_pod_while_none_is_ready(overlay: str) -> None:
    """Readiness follows the clusters: while a region's HSMs are down its application Services
    have no endpoints. The operators' Service keeps every gateway pod, so hsmctl reaches the
    AdminService there, under a name the documented server certificate covers."""
    docs = render(overlay)
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    admin = one(docs, "Service", "hsmgw-admin")
    namespace = admin["metadata"]["namespace"]
    assert admin["spec"]["publishNotReadyAddresses"] is True
    assert admin["spec"]["selector"].items() <= pod_labels.items()
    for name in ("hsmgw", "hsmgw-pods"):  # applications never get a pod that cannot serve them
        assert not one(docs, "Service", name)["spec"].get("publishNotReadyAddresses")
    readme = (ROOT / "deploy" / "README.md").read_text()
    certs = re.search(r"hsmgw dev certs .*?```", readme, re.S)
    assert certs and f"--host hsmgw-admin.{namespace}.svc " in certs.group(0)
    assert f"`hsmctl` against `hsmgw-admin.{namespace}.svc:{admin['spec']['ports'][0]['port']}`" in readme


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_and_network_policy_use_the_gateway_port(overlay: str) -> None:
    docs = render(overlay)
    _, config = gateway_config(docs)
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    services = [d for d in docs if d["kind"] == "Service"]
    assert services
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["grpc"]
        assert service["spec"]["ports"][0].get("appProtocol") == "grpc"

    policy = one(docs, "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    ingress_ports = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert ingress_ports == {config.server.port, port_of(config.metrics.listen)}
    for rule in policy["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` would admit every namespace"
        assert all("namespaceSelector" in peer and peer["namespaceSelector"].get("matchLabels")
                   for peer in rule["from"])
    cidrs = [peer["ipBlock"]["cidr"] for rule in policy["egress"] for peer in rule.get("to", []) if "ipBlock" in peer]
    assert cidrs, "egress to the HSM subnets"
    assert not [c for c in cidrs if c.startswith(DOC_CIDRS)], "the overlay left a documentation CIDR in place"
    assert "0.0.0.0/0" not in cidrs
    hsm_rules = [r for r in policy["egress"] if any(p.get("port") == 2223 and p.get("endPort") == 2225
                                                     for p in r.get("ports", []))]
    assert len(hsm_rules) == 1 and len(hsm_rules[0]["to"]) >= 2, "HSM subnets of the home and the DR region"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_availability_pdb_topology_spread_autoscaling_resources(overlay: str) -> None:
    docs = render(overlay)
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable")
    # Unready pods (no HSM reachable) serve nothing: an outage must not block node drains.
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"

    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert hpa["minReplicas"] >= 3 and hpa["maxReplicas"] > hpa["minReplicas"]

    spec = deployment["spec"]["template"]["spec"]
    zone = [c for c in spec["topologySpreadConstraints"] if c["topologyKey"] == "topology.kubernetes.io/zone"]
    assert zone and zone[0]["whenUnsatisfiable"] == "DoNotSchedule" and zone[0]["maxSkew"] == 1
    assert zone[0]["labelSelector"]["matchLabels"].items() <= pod_labels.items()

    for container in spec["containers"] + spec["initContainers"]:
        requests = container["resources"]["requests"]
        assert requests.get("cpu") and requests.get("memory"), f"{container['name']}: requests"
        assert container["resources"]["limits"].get("memory"), f"{container['name']}: memory limit"

    # Shutdown: preStop + the gateway's --grace + what a stop may take after it (calls stuck in
    # a hung HSM, the pools' close, the exit; the supervisor's own limit) fit in the grace period.
    from gateway.workers import STOP_AFTER_GRACE

    container = gateway_container(docs)
    grace = float(container["args"][container["args"].index("--grace") + 1])
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pre_stop + grace + STOP_AFTER_GRACE <= spec["terminationGracePeriodSeconds"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_non_root_with_a_read_only_root(overlay: str) -> None:
    docs = render(overlay)
    spec = pod_spec(docs)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0 and pod["runAsGroup"] != 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    for container in spec["containers"] + spec["initContainers"]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert security.get("runAsUser", pod["runAsUser"]) != 0
    namespace = one(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # The image's own user is the one the pod runs as.
    user = re.findall(r"^USER\s+(\S+)", (DEPLOY / "container" / "Dockerfile").read_text(), re.M)[-1]
    assert user.split(":")[0] == str(pod["runAsUser"])
    sa = one(docs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(overlay)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_mount_has_a_volume_and_secrets_are_not_in_the_config(overlay: str) -> None:
    docs = render(overlay)
    spec = pod_spec(docs)
    volumes = {v["name"] for v in spec["volumes"]}
    for container in spec["containers"] + spec["initContainers"]:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{container['name']}: no volume {mount['name']}"
    text, config = gateway_config(docs)
    assert "user_pin" not in text and config.secrets.file is None, "PINs come from the hsmgw-pins Secret (env)"
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created by the operator, never committed"


# -- the alarms check ---------------------------------------------------------------------------

ALARMS_CHECK = "hsmgw-alarms-check"
ALARMS_CHECK_POLICY = DEPLOY / "cloudwatch" / "iam-alarms-check.json"


def alarms_check_args(docs: tuple[dict[str, Any], ...]) -> list[str]:
    """The check's command line, as the CronJob runs it (after the image's entrypoint, hsmgw)."""
    (container,) = one(docs, "CronJob", ALARMS_CHECK)["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return list(container["args"])


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_alarms_check_runs_every_15_minutes_with_the_config_and_nothing_else(overlay: str) -> None:
    """`hsmgw alarms check` as a CronJob: the gateway's config, this region's clusters, a read-only
    role of its own; no PINs, no TLS material, no route to the HSMs, and not one of the gateway's pods."""
    docs = render(overlay)
    cron = one(docs, "CronJob", ALARMS_CHECK)
    assert cron["spec"]["schedule"] == "*/15 * * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0, "exit 1 is a finding: retrying it pages twice"
    assert 0 < job["activeDeadlineSeconds"] <= 300
    spec = job["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    labels = job["template"]["metadata"]["labels"]

    # The command: `hsmgw alarms check` on the gateway's own config, from the gateway's image.
    (container,) = spec["containers"]
    args = alarms_check_args(docs)
    assert args[:2] == ["alarms", "check"]
    assert container["image"] == gateway_container(docs)["image"]
    _, config = gateway_config(docs)
    assert Path(args[args.index("--config") + 1]) == Path(CONFIG_DIR) / "hsmgw.toml"
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_DIR]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mount["name"]]["configMap"]["name"] == one(docs, "ConfigMap", "hsmgw-config")["metadata"]["name"]
    assert all(m["name"] in volumes for m in container["volumeMounts"])
    # This region's CloudHSM clusters, each once; alarm actions in this region.
    pairs = [args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--cloudhsm"]
    assert sorted(name for name, _ in pairs) == sorted(c.name for c in config.clusters if c.region == overlay)
    assert all(re.fullmatch(r"cluster-[a-z0-9]+", cluster_id) for _, cluster_id in pairs), pairs
    actions = [args[i + 1] for i, a in enumerate(args) if a == "--alarm-action"]
    assert actions and all(a.startswith(f"arn:aws:sns:{overlay}:") for a in actions)

    # Nothing secret: no PINs (env), no TLS (secret volumes), and the role is not the gateway's.
    assert "envFrom" not in container and not [v for v in spec["volumes"] if "secret" in v or "projected" in v]
    assert not [e for e in container.get("env", []) if "valueFrom" in e or "PIN" in e["name"]]
    account = one(docs, "ServiceAccount", ALARMS_CHECK)
    assert spec["serviceAccountName"] == ALARMS_CHECK and account["automountServiceAccountToken"] is False
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert role.endswith(overlay) and role != one(docs, "ServiceAccount")["metadata"]["annotations"][
        "eks.amazonaws.com/role-arn"]
    allowed = {a for s in json.loads(ALARMS_CHECK_POLICY.read_text())["Statement"] for a in s["Action"]}
    assert allowed == {"cloudwatch:DescribeAlarms", "cloudhsm:DescribeClusters"}, "read-only"

    # Hardened like the gateway's pods.
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == pod_spec(docs)["securityContext"]["runAsUser"]
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"].get("memory")

    # Its own NetworkPolicy: no ingress; out only DNS and HTTPS to the endpoints. The gateway's
    # Services, PodDisruptionBudget and NetworkPolicy do not take its pods for gateways.
    policy = one(docs, "NetworkPolicy", ALARMS_CHECK)["spec"]
    assert _selects(policy["podSelector"]["matchLabels"], labels)
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"} and not policy.get("ingress")
    assert {p["port"] for rule in policy["egress"] for p in rule["ports"]} == {53, 443}
    cidrs = [peer["ipBlock"]["cidr"] for rule in policy["egress"] for peer in rule["to"] if "ipBlock" in peer]
    assert cidrs and not [c for c in cidrs if c.startswith(DOC_CIDRS) or c == "0.0.0.0/0"], cidrs
    assert not _selects(one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], labels)
    assert not _selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    assert not [s for s in docs if s["kind"] == "Service" and _selects(s["spec"]["selector"], labels)]
