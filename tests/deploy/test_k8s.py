"""The Kubernetes manifests (docker/k8s/) validate against the Kubernetes API schemas and fit together.

Offline: the schemas are the ones the `kubernetes-validate` package ships (strict mode: an unknown or
misspelt field is an error). The ServiceMonitor is a Prometheus Operator CRD the package has no schema for:
its selector, port and path are checked against the Service here. Beyond the schemas: the Service selects
the Deployment's pods, the probes ask /health on the served port, every T2_* variable is a ServerConfig
field, the HPA targets the Deployment, and the CPU and CUDA files are the same objects except image,
engine, resources and GPU scheduling.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from server.config import ENV_PREFIX, ServerConfig

kv = pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).resolve().parents[2] / "docker" / "k8s"
VERSIONS = ("1.30.0", "1.37.0")      # an older supported release and the newest the package knows


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def by_kind(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in docs(name)}


MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml"))


def test_the_expected_files_are_there():
    assert {"t2-cpu.yaml", "t2-cuda.yaml", "servicemonitor.yaml", "hpa.yaml"} <= set(MANIFESTS)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", [m for m in MANIFESTS if m != "servicemonitor.yaml"])
def test_validates_against_the_kubernetes_schemas(name, version):
    for d in docs(name):
        kv.validate(d, version, strict=True)      # raises ValidationError naming the field


def test_strict_validation_catches_a_misspelt_field():
    dep = copy.deepcopy(by_kind("t2-cpu.yaml")["Deployment"])
    c = dep["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("name", ["t2-cpu.yaml", "t2-cuda.yaml"])
def test_service_probes_env_and_volume_fit_together(name):
    objs = by_kind(name)
    dep, svc, pvc = objs["Deployment"], objs["Service"], objs["PersistentVolumeClaim"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    server = next(c for c in pod["spec"]["containers"] if c["name"] == "server")
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    env = {e["name"]: e.get("value") for e in server["env"]}
    # the server listens where the container port and the Service point
    assert int(env["T2_PORT"]) == ports["http"] and env["T2_HOST"] == "0.0.0.0"
    assert all(p["targetPort"] in ports for p in svc["spec"]["ports"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = server[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ports, probe
    # every T2_* variable is one the server reads (ServerConfig field = flag = env var)
    fields = {ENV_PREFIX + f.upper() for f in ServerConfig.model_fields}
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - fields
    assert not unknown, f"not ServerConfig fields: {unknown}"
    for k, v in env.items():
        if k.startswith(ENV_PREFIX):          # and each value passes the config's validation
            ServerConfig(**{k[len(ENV_PREFIX):].lower(): v})
    # experts and the SVD cache live on the claimed volume, seeded by the init container
    claim = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
             if "persistentVolumeClaim" in v}
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    (vol, claim_name), = claim.items()
    assert claim_name == pvc["metadata"]["name"]
    assert env["T2_EXPERTS"].startswith(mounts[vol] + "/") and env["T2_CACHE_DIR"].startswith(mounts[vol] + "/")
    seed = pod["spec"]["initContainers"][0]
    assert seed["image"] == server["image"] and any(m["name"] == vol for m in seed["volumeMounts"])
    assert "resources" in server and server["resources"]["requests"]


def test_cpu_and_cuda_differ_only_where_they_must():
    cpu, cuda = by_kind("t2-cpu.yaml"), by_kind("t2-cuda.yaml")
    assert cpu.keys() == cuda.keys()
    assert cpu["Service"] == cuda["Service"]
    dc, dg = copy.deepcopy(cpu["Deployment"]), copy.deepcopy(cuda["Deployment"])
    pc, pg = dc["spec"]["template"]["spec"], dg["spec"]["template"]["spec"]
    sc, sg = pc["containers"][0], pg["containers"][0]
    assert sc["image"].endswith(":cpu") and sg["image"].endswith(":cuda")
    assert {e["name"]: e.get("value") for e in sg["env"]}["T2_ENGINE"] == "vllm"
    assert sg["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for s in (sc, sg):
        del s["image"], s["resources"]
        s["env"] = [e for e in s["env"] if e["name"] not in ("T2_ENGINE", "T2_DEVICE", "VLLM_CACHE_ROOT")]
        s["volumeMounts"] = [m for m in s["volumeMounts"] if m["name"] != "dshm"]
    for p in (pc, pg):
        p.pop("tolerations", None)
        p["volumes"] = [v for v in p["volumes"] if v["name"] != "dshm"]
        for c in p["initContainers"]:
            del c["image"]
    assert dc == dg


def test_service_monitor_scrapes_the_service_metrics_port():
    sm = by_kind("servicemonitor.yaml")["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = by_kind("t2-cpu.yaml")["Service"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["path"] == "/metrics" and ep["port"] in {p["name"] for p in svc["spec"]["ports"]}


def test_hpa_scales_the_deployment():
    hpa = by_kind("hpa.yaml")["HorizontalPodAutoscaler"]
    dep = by_kind("t2-cpu.yaml")["Deployment"]
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"], ref["apiVersion"]) == ("Deployment", dep["metadata"]["name"], dep["apiVersion"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # utilisation is relative to the pod's request: the container must request CPU
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
