"""infra/: every manifest parses and agrees with the code (entrypoints, images, resources, schedules)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

import ferray
from ferray.config import load_settings

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMAGE_REPO = "ferray/ferray"
CPU_IMAGE = f"{IMAGE_REPO}:{ferray.__version__}"
GPU_IMAGE = f"{CPU_IMAGE}-gpu"
RAY_PIN = next(re.search(r"==([\w.]+)", d).group(1) for d in PYPROJECT["project"]["dependencies"]  # type: ignore[union-attr]
               if d.startswith("ray["))

# Spec fields of KubeRay's ray.io/v1 CRDs that these manifests may use: a misspelt field would be
# pruned silently by the API server, so spelling is checked here.
RAYJOB_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}
RAYCLUSTER_FIELDS = {
    "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
    "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions", "authOptions",
}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "numOfHosts",
    "scaleStrategy", "idleTimeoutSeconds", "suspend",
}
# KubeRay v1.6's RayCronJob (`timeZone` is v1.7; the manifest targets 1.6).
RAYCRONJOB_FIELDS = {"schedule", "jobTemplate", "suspend"}


# ---------------------------------------------------------------------------------------------
# Helpers


def load(name: str) -> list[dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all((INFRA / name).read_text()) if doc is not None]
    assert docs, f"{name} is empty"
    return docs


def kube_docs() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(INFRA.glob("*.yaml")):
        for doc in load(path.name):
            if "apiVersion" in doc:
                yield path.name, doc


def by_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in kube_docs() if doc["kind"] == kind]


def rayjob_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayJob spec: the RayJob manifests and the RayCronJob's template."""
    specs = [(name, doc["spec"]) for name, doc in by_kind("RayJob")]
    specs += [(name, doc["spec"]["jobTemplate"]) for name, doc in by_kind("RayCronJob")]
    return specs


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [(name, doc["spec"]) for name, doc in by_kind("RayCluster")]
    return specs + [(name, spec["rayClusterSpec"]) for name, spec in rayjob_specs()]


def ray_pods(cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, pod spec) of the head and every worker group."""
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?$")
CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def valid_cron(expression: str) -> bool:
    """A standard 5-field cron expression with numeric fields (`*`, `a`, `a-b`, `/step`, lists)."""
    fields = expression.split()
    if len(fields) != 5:
        return False
    for field, (low, high) in zip(fields, CRON_RANGES, strict=True):
        for part in field.split(","):
            match = CRON_FIELD.match(part)
            if not match:
                return False
            numbers = [int(n) for n in re.findall(r"\d+", match.group(1))]
            step = match.group(3)
            if any(not low <= n <= high for n in numbers) or (len(numbers) == 2 and numbers[0] > numbers[1]):
                return False
            if step is not None and int(step[1:]) == 0:
                return False
    return True


def entry_script(entrypoint: str) -> str:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python", entrypoint
    return argv[1]


# ---------------------------------------------------------------------------------------------
# Parsing and the entry points


def test_every_yaml_parses() -> None:
    names = sorted(p.name for p in INFRA.glob("*.yaml"))
    assert {"runtime_env.yaml", "raycluster.yaml", "rayjob-retrain.yaml", "rayjob-annotate.yaml",
            "raycronjob-retrain.yaml", "cronjob-retrain.yaml", "cluster-aws.yaml", "k8s-base.yaml",
            "ferray.yaml"} <= set(names)
    for name in names:
        load(name)
    for name, doc in kube_docs():
        assert doc.get("metadata", {}).get("name") or doc.get("metadata", {}).get("generateName"), name


def test_entrypoints_exist_and_read_the_mounted_config() -> None:
    specs = rayjob_specs()
    assert {name for name, _ in specs} == {"rayjob-retrain.yaml", "rayjob-annotate.yaml", "raycronjob-retrain.yaml"}
    for name, spec in specs:
        script = entry_script(spec["entrypoint"])
        assert re.fullmatch(r"jobs/\w+\.py", script), f"{name}: {script}"
        assert (REPO / script).is_file(), f"{name}: {script} does not exist"
        argv = shlex.split(spec["entrypoint"])
        config = argv[argv.index("--config") + 1]
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in head["volumes"]}
        folder = str(Path(config).parent)
        assert folder in mounts, f"{name}: {config} is not on a mounted volume"
        source = volumes[mounts[folder]]["configMap"]
        configmaps = {doc["metadata"]["name"]: doc for _, doc in by_kind("ConfigMap")}
        assert Path(config).name in configmaps[source["name"]]["data"], f"{name}: ConfigMap lacks {config}"
    assert entry_script(dict(specs)["rayjob-retrain.yaml"]["entrypoint"]) == "jobs/retrain.py"
    assert entry_script(dict(specs)["rayjob-annotate.yaml"]["entrypoint"]) == "jobs/annotate.py"


def test_retrain_promotes_into_the_registry_annotate_reads() -> None:
    settings = load_settings(INFRA / "ferray.yaml")
    assert settings.pipeline.train is not None, "jobs/retrain.py needs pipeline.train in the cluster's settings"
    words = dict(rayjob_specs())["rayjob-annotate.yaml"]["entrypoint"].split()
    assert words[words.index("jobs/annotate.py") + 1] == settings.retrain.registry


def test_settings_file_is_valid_and_the_configmap_carries_it() -> None:
    load_settings(INFRA / "ferray.yaml")  # raises ConfigError on any unknown or invalid key
    configmap = dict((doc["metadata"]["name"], doc) for _, doc in by_kind("ConfigMap"))["ferray-config"]
    assert yaml.safe_load(configmap["data"]["ferray.yaml"]) == yaml.safe_load((INFRA / "ferray.yaml").read_text())
    accounts = {doc["metadata"]["name"] for _, doc in by_kind("ServiceAccount")}
    for name, cluster in cluster_specs():
        for group, pod in ray_pods(cluster):
            assert pod.get("serviceAccountName") in accounts, f"{name}/{group}: unknown service account"


def test_runtime_envs_are_valid_for_ray() -> None:
    from ray.runtime_env import RuntimeEnv

    envs = [("runtime_env.yaml", load("runtime_env.yaml")[0])]
    envs += [(name, yaml.safe_load(spec["runtimeEnvYAML"])) for name, spec in rayjob_specs()]
    for name, env in envs:
        RuntimeEnv(**env)  # Ray's own validation of field names and types
        assert all(isinstance(v, str) for v in env["env_vars"].values()), name
        assert env["env_vars"]["FERRAY_RAY__ADDRESS"] == "auto", f"{name}: jobs must join the job's cluster"
        assert "pip" not in env and "conda" not in env, f"{name}: dependencies come from the image"
    excludes = envs[0][1]["excludes"]
    assert "/.venv/" in excludes and "/.git/" in excludes


# ---------------------------------------------------------------------------------------------
# KubeRay manifests


def test_kuberay_fields_are_spelt_as_in_the_crds() -> None:
    for name, spec in rayjob_specs():
        assert set(spec) <= RAYJOB_FIELDS, f"{name}: {set(spec) - RAYJOB_FIELDS}"
    for name, cluster in cluster_specs():
        assert set(cluster) <= RAYCLUSTER_FIELDS, f"{name}: {set(cluster) - RAYCLUSTER_FIELDS}"
        for group in cluster["workerGroupSpecs"]:
            assert set(group) <= WORKER_GROUP_FIELDS, f"{name}: {set(group) - WORKER_GROUP_FIELDS}"
    for name, doc in by_kind("RayCronJob"):
        assert doc["apiVersion"] == "ray.io/v1"
        assert set(doc["spec"]) <= RAYCRONJOB_FIELDS, f"{name}: {set(doc['spec']) - RAYCRONJOB_FIELDS}"


def test_images_and_versions_agree_with_the_code() -> None:
    assert RAY_PIN == __import__("ray").__version__
    seen = set()
    for name, cluster in cluster_specs():
        assert cluster["rayVersion"] == RAY_PIN, name
        for group, pod in ray_pods(cluster):
            image = pod["containers"][0]["image"]
            seen.add(image)
            assert image == (GPU_IMAGE if group == "gpu" else CPU_IMAGE), f"{name}/{group}: {image}"
    aws = load("cluster-aws.yaml")[0]
    seen |= {aws["docker"]["image"], aws["available_node_types"]["gpu_worker"]["docker"]["worker_image"]}
    assert seen == {CPU_IMAGE, GPU_IMAGE}


def test_resources_are_declared_and_gpu_groups_request_gpus() -> None:
    gpu_groups = 0
    for name, cluster in cluster_specs():
        assert cluster.get("enableInTreeAutoscaling") is True, name
        for group, pod in ray_pods(cluster):
            container = pod["containers"][0]
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(requests) and {"cpu", "memory"} <= set(limits), f"{name}/{group}"
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/dev/shm" in mounts, f"{name}/{group}: Ray's object store needs a real /dev/shm"
            if group == "gpu":
                gpu_groups += 1
                assert int(limits["nvidia.com/gpu"]) >= 1 and requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
                assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), f"{name}/{group}"
            else:
                assert "nvidia.com/gpu" not in limits, f"{name}/{group}: a CPU group must not hold GPUs"
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0", f"{name}: job submission needs the dashboard"
        for group in cluster["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{name}/{group['groupName']}"
    assert gpu_groups == len(cluster_specs()), "every cluster has a GPU worker group"


def test_rayjobs_clean_up_after_themselves() -> None:
    for name, spec in rayjob_specs():
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert spec["ttlSecondsAfterFinished"] > 0, name
        assert spec["activeDeadlineSeconds"] > 0, name
    for name, doc in by_kind("RayJob"):
        # `kubectl create` of the same file, again and again (by hand or by the CronJob).
        assert "generateName" in doc["metadata"] and "name" not in doc["metadata"], name


def test_head_workdir_is_the_images_jobs_folder() -> None:
    workdir = re.search(r"^WORKDIR\s+(\S+)", (INFRA / "Dockerfile").read_text(), re.M).group(1)  # type: ignore[union-attr]
    for name, cluster in cluster_specs():
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head.get("workingDir") == workdir, f"{name}: `python jobs/<x>.py` runs from the head's workdir"


# ---------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("expression, ok", [
    ("0 3 * * *", True), ("*/15 1-5 1,15 * 0-6", True), ("0 0 * * 7", True),
    ("0 3 * *", False), ("60 3 * * *", False), ("0 24 * * *", False), ("0 3 0 * *", False),
    ("5-1 * * * *", False), ("*/0 * * * *", False), ("@daily", False),
])
def test_cron_validator(expression: str, ok: bool) -> None:
    assert valid_cron(expression) is ok


def test_schedules_are_valid_and_agree() -> None:
    cron = by_kind("CronJob")
    raycron = by_kind("RayCronJob")
    assert cron and raycron
    schedules = {doc["spec"]["schedule"] for _, doc in cron + raycron}
    assert all(valid_cron(s) for s in schedules), schedules
    assert len(schedules) == 1, "the two ways of scheduling retraining must run at the same time"
    retrain = dict(rayjob_specs())["rayjob-retrain.yaml"]
    assert raycron[0][1]["spec"]["jobTemplate"] == retrain, "RayCronJob must run exactly the retrain RayJob"


def test_cronjob_creates_the_retrain_rayjob_with_least_privilege() -> None:
    docs = load("cronjob-retrain.yaml")
    kinds = {doc["kind"]: doc for doc in docs}
    assert set(kinds) == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
    cron = kinds["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    assert container["command"][:3] == ["kubectl", "create", "-f"]
    manifest = Path(container["command"][3])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(manifest.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    # The ConfigMap is made from infra/rayjob-retrain.yaml under the key the command reads.
    configmap, key = volume["configMap"]["name"], manifest.name
    assert f"kubectl create configmap {configmap} --from-file={key}=infra/rayjob-retrain.yaml" in \
        (INFRA / "cronjob-retrain.yaml").read_text()
    # Runs cannot overlap: the RayJob is stopped before the next daily tick.
    assert dict(rayjob_specs())["rayjob-retrain.yaml"]["activeDeadlineSeconds"] < 24 * 3600
    role = kinds["Role"]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}]
    binding = kinds["RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": kinds["ServiceAccount"]["metadata"]["name"]}]


# ---------------------------------------------------------------------------------------------
# Dockerfiles and the AWS launcher


@pytest.mark.parametrize("dockerfile, extra", [("Dockerfile", "."), ("Dockerfile.gpu", ".[gpu]")])
def test_dockerfiles_agree_with_the_package(dockerfile: str, extra: str) -> None:
    text = (INFRA / dockerfile).read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M), "one Python for every node: Ray requires it"
    for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile}: COPY {source} does not exist"
    assert re.search(rf'^RUN pip install "?{re.escape(extra)}"?$', text, re.M)
    if extra != ".":
        assert extra[2:-1] in PYPROJECT["project"]["optional-dependencies"]
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])$", text, re.M).group(1)  # type: ignore[union-attr]
    assert yaml.safe_load(entry) == ["ferray"] and "ferray" in PYPROJECT["project"]["scripts"]
    assert re.search(r"^COPY .*\bjobs\b", text, re.M), "RayJobs run jobs/<x>.py from the image"


def test_aws_cluster_config_is_valid_for_ray_up() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("cluster-aws.yaml")[0]
    validate_config(prepare_config(config))  # Ray's schema, after Ray's own AWS defaults are merged
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0
    gpu = types["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["docker"]["worker_image"] == GPU_IMAGE
    assert "--gpus all" in gpu["docker"]["worker_run_options"]
    assert types["cpu_worker"]["resources"].get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for t in workers)
    for target, source in config["file_mounts"].items():
        assert (REPO / source).exists(), f"file_mounts {target}: {source} does not exist"
    assert config["setup_commands"] == [], "the image holds every dependency"
