"""cluster/: launcher YAMLs against the JSON schema shipped inside the ray package; KubeRay manifests' fields."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5|p5e)\.")


def _image_ok(image: str, gpu: bool) -> None:
    assert "ray-ml" not in image, f"{image}: ray-ml images are no longer published"
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray", image
    assert tag.startswith(f"{ray.__version__}-"), f"{image}: tag should match the installed Ray {ray.__version__}"
    assert ("gpu" in tag or "-cu" in tag) == gpu, image


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_yaml_matches_rays_schema(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    assert config["provider"]["type"] == name.split(".")[0]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_yaml_has_gpu_workers_idle_head_and_installs_the_repo(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    _image_ok(config["docker"]["image"], gpu=True)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert any("--num-cpus=0" in cmd for cmd in config["head_start_ray_commands"])
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    for kind, node in workers.items():
        if name == "aws.yaml":
            assert GPU_INSTANCE.match(node["node_config"]["InstanceType"]), kind
        else:
            assert node["resources"]["GPU"] >= 1, kind
            assert {"onHostMaintenance": "TERMINATE"} in node["node_config"]["scheduling"], kind
        assert node["min_workers"] <= node["max_workers"] <= config["max_workers"]
    assert config["file_mounts"]["/home/ray/raymoe"] == "."
    assert any("pip install" in c and "/home/ray/raymoe" in c for c in config["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"][1:])


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (head_container,) = head["template"]["spec"]["containers"]
    _image_ok(head_container["image"], gpu=False)
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265, 10001}
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        _image_ok(container["image"], gpu=True)
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]


def test_kuberay_raycluster_fields():
    doc = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    _check_ray_cluster_spec(doc["spec"])


def test_kuberay_rayjob_fields_and_entrypoint_is_a_valid_experiment():
    from raymoe.config.load import load_experiment

    doc = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    assert torch_pin in runtime_env["pip"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "raymoe.cli", "train"]
    config_path = ROOT / argv[4]
    assert config_path.is_file(), f"the entrypoint's config {argv[4]} is not in the repository"
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_experiment(config_path, overrides)
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"]
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers <= workers
