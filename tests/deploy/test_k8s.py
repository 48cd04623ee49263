"""deploy/k8s: assembled with `kubectl kustomize`, validated with kubernetes-validate, and cross-checked
with the plantsight config it carries (ports, streams, consumer groups, secrets)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from services.cli import parser as cli_parser
from shared.config import load_config
from shared.keys import Keys
from tests.support.deploy import CRDS, K8S, RUNNABLE, load_yaml, need, run

SECRET_EXAMPLES = K8S / "secret.example.yaml"
INGRESS_EXAMPLE = K8S / "ingress.example.yaml"


def kustomize(path: Path) -> list[dict]:
    kubectl = need("kubectl", "kubectl")
    res = run([kubectl, "kustomize", path])
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.fixture(scope="module")
def k8s_base():
    return kustomize(K8S)


@pytest.fixture(scope="module")
def k8s_gpu():
    return kustomize(K8S / "overlays" / "gpu")


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def config_of(docs: list[dict]):
    (cm,) = by_kind(docs, "ConfigMap").values()
    return load_config(data=yaml.safe_load(cm["data"]["plantsight.yaml"]), environ={"REDIS_PASSWORD": "x"})


def secret_refs(container: dict) -> dict[str, tuple[str, str]]:
    """env name -> (Secret name, key) of a container's secretKeyRef variables."""
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}


def example_secrets() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all(SECRET_EXAMPLES.read_text())}



def test_k8s_resources_validate(k8s_base, k8s_gpu):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    version = kv.latest_version()
    checked = 0
    for doc in k8s_base + k8s_gpu:
        if doc["kind"] in CRDS:
            continue
        kv.validate(doc, version, strict=True)  # raises ValidationError naming the field
        checked += 1
    assert checked >= 20
    for doc in yaml.safe_load_all(INGRESS_EXAMPLE.read_text()):  # applied by hand, so checked here
        kv.validate(doc, version, strict=True)
    for doc in example_secrets().values():
        kv.validate(doc, version, strict=True)
    broken = json.loads(json.dumps(by_kind(k8s_base, "Deployment")["infer"]))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/healthz"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, version, strict=True)


def test_k8s_deployments(k8s_base):
    deployments = by_kind(k8s_base, "Deployment")
    assert set(deployments) == set(RUNNABLE)
    (cm,) = by_kind(k8s_base, "ConfigMap").values()
    cfg = load_config(data=yaml.safe_load(cm["data"]["plantsight.yaml"]), environ={"REDIS_PASSWORD": "x"})
    secret_names = {d["metadata"]["name"] for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text())}
    services = by_kind(k8s_base, "Service")
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        args = cli_parser().parse_args(c["args"])
        assert args.service == name
        port = next(p for p in c["ports"] if p["name"] == "http")["containerPort"]
        assert port == cfg.port(name)
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert c["securityContext"]["allowPrivilegeEscalation"] is False  # Pod Security "restricted":
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})  # the base is CPU
        refs = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e]
        assert any(r["name"] == "plantsight-redis" and r["key"] == "redis-password" for r in refs)
        assert {r["name"] for r in refs} <= secret_names
        for e in c["env"]:  # no secret values inline
            assert not ("value" in e and re.search("PASSWORD|TOKEN|SECRET", e["name"])), (name, e["name"])
        (vol,) = [v for v in pod["volumes"] if "configMap" in v]
        assert vol["configMap"]["name"] == cm["metadata"]["name"]  # the generated, hashed name
        mount = next(m for m in c["volumeMounts"] if m["name"] == vol["name"])
        assert args.config == f"{mount['mountPath']}/plantsight.yaml"
        assert services[name]["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert "Secret" not in {d["kind"] for d in k8s_base}  # the operator creates it
    for kustomization in K8S.rglob("kustomization.yaml"):
        assert "secret.example.yaml" not in load_yaml(kustomization).get("resources", []), kustomization
    pdbs = by_kind(k8s_base, "PodDisruptionBudget")
    assert {p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for p in pdbs.values()} == {
        name for name, dep in deployments.items() if dep["spec"].get("replicas") != 1}  # infer: KEDA's replicas
    assert {"preprocess", "infer", "viewer"} <= {p["metadata"]["name"] for p in pdbs.values()}


def test_k8s_gpu_overlay(k8s_gpu):
    (c,) = by_kind(k8s_gpu, "Deployment")["infer"]["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "PLANTSIGHT_INFERENCE__DEVICE", "value": "cuda"} in c["env"]
    assert c["image"].endswith("-cuda")
    assert any(e["name"] == "REDIS_PASSWORD" for e in c["env"])  # the patch merges, it does not replace
    for name in ("ingest", "preprocess", "alert", "viewer"):
        (other,) = by_kind(k8s_gpu, "Deployment")[name]["spec"]["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in other["resources"].get("limits", {})


def test_k8s_podmonitor_and_keda(k8s_base):
    (pm,) = by_kind(k8s_base, "PodMonitor").values()
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    labels = pm["spec"]["selector"]["matchLabels"]
    deployments = by_kind(k8s_base, "Deployment")
    for name, dep in deployments.items():
        tmpl = dep["spec"]["template"]
        assert labels.items() <= tmpl["metadata"]["labels"].items(), f"{name} is not scraped"
        assert tmpl["metadata"]["labels"][pm["spec"]["jobLabel"]] == f"plantsight-{name}"  # rules' job names
        ports = {p["name"] for p in tmpl["spec"]["containers"][0]["ports"]}
        assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports
    assert all(e["path"] == "/metrics" for e in pm["spec"]["podMetricsEndpoints"])

    (so,) = by_kind(k8s_base, "ScaledObject").values()
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"]["name"] == "infer" and "infer" in deployments
    assert 1 <= so["spec"]["minReplicaCount"] < so["spec"]["maxReplicaCount"]
    (cm,) = by_kind(k8s_base, "ConfigMap").values()
    cfg = load_config(data=yaml.safe_load(cm["data"]["plantsight.yaml"]), environ={"REDIS_PASSWORD": "x"})
    auths = by_kind(k8s_base, "TriggerAuthentication")
    triggered = set()
    for trig in so["spec"]["triggers"]:
        assert trig["type"] == "redis-streams"
        meta = trig["metadata"]
        task = meta["consumerGroup"].removeprefix("infer-")
        assert meta["stream"] == Keys(cfg.redis.prefix).prepared(task)
        assert int(meta["pendingEntriesCount"]) > 0
        assert meta["address"].split(":")[0] in cfg.redis.url
        assert trig["authenticationRef"]["name"] in auths
        triggered.add(task)
    assert triggered == set(cfg.tasks())
    for auth in auths.values():
        assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"password"}


def test_k8s_viewer_tokens_evidence_and_ingress(k8s_base):
    deployments = by_kind(k8s_base, "Deployment")
    cfg = config_of(k8s_base)
    secrets = example_secrets()
    viewer, alert = (deployments[n]["spec"]["template"]["spec"] for n in ("viewer", "alert"))
    (vc,), (ac,) = viewer["containers"], alert["containers"]
    # Tokens: both from the Secret plantsight-viewer, whose example has both keys; the operator token for alert too.
    refs = secret_refs(vc)
    assert refs["PLANTSIGHT_VIEWER_TOKEN"] == ("plantsight-viewer", "token")
    assert refs["PLANTSIGHT_VIEWER_OPERATOR_TOKEN"] == ("plantsight-viewer", "operator-token")
    assert secret_refs(ac)["PLANTSIGHT_VIEWER_OPERATOR_TOKEN"] == ("plantsight-viewer", "operator-token")
    assert set(secrets["plantsight-viewer"]["stringData"]) == {"token", "operator-token"}
    for c in (vc, ac):
        for name, (secret, key) in secret_refs(c).items():
            assert key in secrets[secret]["stringData"], f"{c['name']}: {name} reads {secret}/{key}"
    # Evidence: one claim, mounted at alerts.evidence_dir: read-write in alert, read-only in viewer, nowhere else.
    (pvc,) = by_kind(k8s_base, "PersistentVolumeClaim").values()
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # alert and the viewer replicas on any node
    mounts = {}
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        for vol in pod["volumes"]:
            if vol.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]:
                (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == vol["name"]]
                assert mount["mountPath"] == str(cfg.alerts.evidence_dir), name
                mounts[name] = bool(mount.get("readOnly")) and bool(vol["persistentVolumeClaim"].get("readOnly"))
    assert mounts == {"alert": False, "viewer": True}
    assert str(cfg.alerts.evidence_dir) == "/evidence"
    # The Service and the example Ingress reach the viewer's port.
    service = by_kind(k8s_base, "Service")["viewer"]
    (port,) = service["spec"]["ports"]
    assert next(p for p in vc["ports"] if p["name"] == port["targetPort"])["containerPort"] == cfg.port("viewer")
    (ingress,) = yaml.safe_load_all(INGRESS_EXAMPLE.read_text())
    assert ingress["metadata"]["namespace"] == by_kind(k8s_base, "Namespace")["plantsight"]["metadata"]["name"]
    backends = [p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert backends == [{"name": "viewer", "port": {"name": port["name"]}}]
    assert ingress["spec"]["tls"]
    for kustomization in K8S.rglob("kustomization.yaml"):
        assert INGRESS_EXAMPLE.name not in load_yaml(kustomization).get("resources", []), kustomization
