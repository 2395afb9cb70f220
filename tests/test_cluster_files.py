"""Every file in cluster/ parses and carries what its tool requires.

Launcher configs go through Ray's own `prepare_config` + `validate_config` (the checks `ray up`
runs before it touches a cloud); KubeRay manifests are checked against the ray.io/v1 fields.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _docs(name: str) -> dict[str, dict]:
    """The YAML documents of a manifest, by kind."""
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def _containers(template: dict) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("image") and c.get("name") for c in containers)
    return containers


def _has_token_env(container: dict) -> bool:
    env = {e["name"]: e for e in container.get("env", [])}
    secret = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    return env.get("RAY_AUTH_MODE", {}).get("value") == "token" and bool(secret.get("name"))


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_launcher_configs_pass_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / name).read_text())
    assert raw["cluster_name"] and raw["provider"]["type"] and raw["max_workers"] >= 1
    config = prepare_config(raw)
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    assert raw["docker"]["image"] and "RAY_AUTH_MODE=token" in " ".join(
        raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    )
    assert "~/.ray/auth_token" in raw["file_mounts"]


def test_aws_config_autoscales_gpu_workers():
    raw = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    assert raw["provider"]["type"] == "aws"
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types
    gpu = [t for n, t in types.items() if n != raw["head_node_type"]]
    assert gpu and gpu[0]["min_workers"] < gpu[0]["max_workers"] <= raw["max_workers"]
    assert gpu[0]["node_config"]["InstanceType"].startswith(("g", "p"))  # GPU instance family


def test_local_config_names_its_machines():
    raw = yaml.safe_load((CLUSTER / "cluster-local.yaml").read_text())
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    assert "available_node_types" not in raw  # the local provider makes its own


def test_raycluster_manifest():
    docs = _docs("kuberay/raycluster.yaml")
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # map[string]string
    (head_container,) = _containers(head["template"])
    ports = {p["containerPort"] for p in head_container["ports"]}
    assert {6379, 8265, 10001} <= ports and _has_token_env(head_container)
    assert any(e["name"] == "RAY_AUTH_TOKEN" for e in spec["autoscalerOptions"]["env"])
    pvc = docs["PersistentVolumeClaim"]["metadata"]["name"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (worker,) = _containers(group["template"])
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1 and _has_token_env(worker)
    for template in [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        claims = [v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]  # fmt: skip
        mounts = {m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert claims == [pvc] and "/mnt/shared" in mounts
    assert "ReadWriteMany" in docs["PersistentVolumeClaim"]["spec"]["accessModes"]


def test_rayjob_manifest_runs_the_cli_on_shared_storage():
    job = _docs("kuberay/rayjob.yaml")["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec.get("rayClusterSpec") or spec.get("clusterSelector")
    cluster = _docs("kuberay/raycluster.yaml")["RayCluster"]["metadata"]["name"]
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster}
    train = spec["entrypoint"][spec["entrypoint"].index("python -m raysegbg.cli train") :]
    args = shlex.split(train)
    assert args[args.index("--address") + 1] == "auto"
    assert "logging.storage_path=/mnt/shared/runs" in args
    assert _has_token_env(_containers(spec["submitterPodTemplate"])[0])


def test_runtime_env_keys_are_rays():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(env) <= RuntimeEnv.known_fields
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())
    RuntimeEnv(**env)  # Ray's own validation of every field


def test_dockerfile_pins_python_and_stack():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11\.\d+-", text, re.M)
    lines = text.replace("\\\n", " ").splitlines()  # join continued RUN lines
    installs = " ".join(line.split("pip install", 1)[1] for line in lines if "pip install" in line)
    packages = [a.strip('"') for a in installs.split() if not a.startswith(("-", "&&", "."))]
    packages = [p for p in packages if p not in ("pip", "check")]
    assert packages and all("==" in p for p in packages), packages
    names = {p.split("==")[0].split("[")[0] for p in packages}
    assert {"torch", "ray", "segmentation-models-pytorch", "pyarrow", "tensorboard"} <= names
    assert "ray[default,train,tune]==2.60.0" in packages
    assert "pip install --no-deps ." in text
