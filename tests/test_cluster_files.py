"""Cluster and job definitions, proven valid without a cloud, a Kubernetes API or Docker.

- cluster/aws.yaml: Ray's own cluster-config preparation and JSON-schema validation (the
  checks `ray up` runs first), plus every node_config against the EC2 RunInstances
  parameter model that boto3 ships; misspelt copies must fail.
- cluster/kuberay/*.yaml: the ray.io/v1 schemas of the KubeRay v1.7.0 CRDs copied into
  cluster/kuberay/crds/, closed with additionalProperties: false so that misspelt fields
  fail as they do under `kubectl apply` (strict validation); a few operator-side rules;
  the RayJob entrypoint parsed by mace-ray's own command line.
- cluster/Dockerfile: Ray base image = the Ray this project depends on.
- jobs/: concept lists (counts, disjointness), job configs (option names and values, read
  by `mace-ray erase --config`), the runtime env.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import typer
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from mace_core.concepts import ConceptType, read_concept_file
from mace_ray.cli.main import app

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
CRDS = KUBERAY / "crds"
JOBS = REPO / "jobs"

# Git blob ids of the unmodified KubeRay v1.7.0 CRDs (cluster/kuberay/crds/SOURCE.md).
CRD_BLOBS = {
    "ray.io_rayclusters.yaml": "ff0be58ada3bd457605eff1f258c16df21e61e21",
    "ray.io_rayjobs.yaml": "c7d3f081af8cf08c256a8c33a0c3b6ea28b816a0",
}
# KubeRay limits (ray-operator/controllers/ray/utils/constant.go): a RayJob's cluster is
# named <rayjob>-<6 characters>, and cluster names stay within 53 characters.
MAX_RAYJOB_NAME = 47
MAX_RAYCLUSTER_NAME = 53
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The paper's reference experiments; the other classes' scene words are ours.
CIFAR10_PAPER_ANCHORS = {"automobile": "sky", "ship": "ground", "bird": "street"}
TASKS = ["celebrities", "artists", "explicit", "cifar10"]

# Options of `mace-ray erase` that the cluster files use and that came with the distributed
# executor: should the command lack one, the entrypoint checks drop it with its value and
# check the rest. Each takes a value.
PENDING_OPTIONS = {"--config", "--gpus-per-worker", "--workers", "--address"}


# ----------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> Any:
    # libyaml's loader: the pure-Python one takes seconds per CRD file.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)


def erase_command():
    return typer.main.get_command(app).commands["erase"]


def erase_options() -> dict[str, Any]:
    """`--flag` -> parameter, for every option of `mace-ray erase` (both spellings of booleans)."""
    out = {}
    for p in erase_command().params:
        for opt in [*p.opts, *p.secondary_opts]:
            if opt.startswith("--"):
                out[opt] = p
    return out


def config_key(param) -> str:
    """The job-config key of a parameter: its long option name with underscores (`--type` -> type)."""
    if param.param_type_name == "argument":
        return param.name
    long = next(o for o in param.opts if o.startswith("--"))
    return long[2:].replace("-", "_")


def parse_erase(args: list[str]):
    """Parse `mace-ray erase ARGS` with the real command (names, types, ranges), run nothing."""
    return erase_command().make_context("erase", list(args))


def drop_pending(args: list[str]) -> list[str]:
    known = erase_options()
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in PENDING_OPTIONS and name not in known:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def close_objects(node: Any) -> None:
    """additionalProperties: false on every object schema that lists its properties.

    The CRDs leave it out (the API server prunes or, under strict validation, rejects
    unknown fields); without it jsonschema would accept `entrypont:`.
    """
    if isinstance(node, dict):
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for v in node.values():
            close_objects(v)
    elif isinstance(node, list):
        for v in node:
            close_objects(v)


@cache
def crd_validator(filename: str) -> jsonschema.protocols.Validator:
    path = CRDS / filename
    assert path.is_file(), (
        f"{path} is missing: the KubeRay CRDs are part of this repository "
        "(cluster/kuberay/crds/SOURCE.md says where they come from)"
    )
    crd = load_yaml(path)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    close_objects(schema)
    return jsonschema.validators.validator_for(schema)(schema)


def crd_errors(manifest: dict, filename: str) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in crd_validator(filename).iter_errors(manifest)
    ]


def raycluster() -> dict:
    return load_yaml(KUBERAY / "raycluster.yaml")


def rayjob() -> dict:
    return load_yaml(KUBERAY / "rayjob.yaml")


def cluster_specs() -> list[tuple[str, dict]]:
    return [("raycluster.yaml", raycluster()["spec"]), ("rayjob.yaml", rayjob()["spec"]["rayClusterSpec"])]


def pod_specs(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in spec["workerGroupSpecs"]
    ]


def pyproject() -> dict[str, Any]:
    """pyproject.toml's [project]: name, version, dependencies."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the installed (editable) metadata says the same
        meta = importlib.metadata.metadata("mace-ray")
        return {"version": meta["Version"], "dependencies": importlib.metadata.requires("mace-ray") or []}
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def project_requirements() -> list[Requirement]:
    return [Requirement(r) for r in pyproject()["dependencies"]]


def project_version() -> str:
    return pyproject()["version"]


def ray_requirement() -> Requirement:
    return next(r for r in project_requirements() if r.name == "ray")


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of cluster/Dockerfile, continuation lines joined."""
    text = (CLUSTER / "Dockerfile").read_text(encoding="utf-8")
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def docker_base_image() -> tuple[str, str]:
    (image,) = [args.split()[-1] for ins, args in dockerfile() if ins == "FROM"]
    repo, _, tag = image.partition(":")
    return repo, tag


def image_refs() -> dict[str, str]:
    """Every place a cluster file names the mace-ray image."""
    refs = {"aws.yaml docker.image": load_yaml(CLUSTER / "aws.yaml")["docker"]["image"]}
    for name, spec in cluster_specs():
        for i, pod in enumerate(pod_specs(spec)):
            for c in pod["containers"]:
                refs[f"{name} pod {i} container {c['name']}"] = c["image"]
    return refs


# ---------------------------------------------------------------- cluster/aws.yaml


def prepared_aws(config: dict) -> dict:
    """What `ray up` does before it touches AWS: fill defaults, then Ray's schema check."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_aws_yaml_passes_rays_own_validation():
    config = load_yaml(CLUSTER / "aws.yaml")
    prepared = prepared_aws(config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["idle_timeout_minutes"] > 0
    # Every command list is ours: nothing of Ray's defaults.yaml (a nightly wheel install,
    # a boto3 install) leaks into a cluster whose image already holds everything.
    assert prepared["head_setup_commands"] == config["setup_commands"] + config["head_setup_commands"]
    assert prepared["worker_setup_commands"] == config["setup_commands"] + config["worker_setup_commands"]
    assert not any("ray-wheels" in c or "pip install" in c for c in prepared["head_setup_commands"])
    # Without --autoscaling-config the head would never add a worker.
    assert any(
        "--autoscaling-config=~/ray_bootstrap_config.yaml" in c for c in config["head_start_ray_commands"]
    )


@pytest.mark.parametrize(
    "where, good, bad",
    [
        ((), "idle_timeout_minutes", "idle_timeout_minute"),
        ((), "max_workers", "max_worker"),
        (("available_node_types", "ray.worker.gpu"), "max_workers", "max_worker"),
        (("available_node_types", "ray.worker.gpu"), "min_workers", "min_worker"),
        (("docker",), "run_options", "run_option"),
        (("docker",), "worker_run_options", "worker_run_option"),
    ],
)
def test_aws_yaml_with_a_misspelt_key_fails_rays_validation(where, good, bad):
    config = load_yaml(CLUSTER / "aws.yaml")
    node = config
    for key in where:
        node = node[key]
    node[bad] = node.pop(good)
    with pytest.raises(jsonschema.ValidationError, match=bad):
        prepared_aws(config)


def run_instances_errors(node_config: dict) -> str:
    """Check a node_config as Ray's AWS provider sends it: ec2.create_instances(**node_config)."""
    import botocore.session
    from botocore.validate import ParamValidator

    params = copy.deepcopy(node_config)
    params.pop("SubnetIds", None)  # Ray's own key: it picks one subnet and sets SubnetId
    params.update(MinCount=1, MaxCount=1)
    model = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    report = ParamValidator().validate(params, model.input_shape)
    return report.generate_report() if report.has_errors() else ""


def test_aws_node_configs_are_valid_ec2_run_instances_parameters():
    # Ray's schema leaves node_config open; EC2 would reject a typo only at launch time.
    config = load_yaml(CLUSTER / "aws.yaml")
    for name, node_type in config["available_node_types"].items():
        assert run_instances_errors(node_type["node_config"]) == "", name
    bad = copy.deepcopy(config["available_node_types"]["ray.worker.gpu"]["node_config"])
    bad["IamInstanceProfil"] = bad.pop("IamInstanceProfile")
    assert "IamInstanceProfil" in run_instances_errors(bad)


def test_aws_yaml_has_a_cpu_head_and_autoscaling_gpu_workers_on_demand_and_spot():
    config = load_yaml(CLUSTER / "aws.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"], "the head must be on-demand"
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "the head needs no GPU"
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    spot = {
        k
        for k, v in workers.items()
        if v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    }
    on_demand = set(workers) - spot
    assert spot and on_demand
    for name, w in workers.items():
        assert w["node_config"]["InstanceType"].startswith(("g", "p")), f"{name}: not a GPU instance"
        assert w["min_workers"] == 0, f"{name}: GPU nodes must scale to zero"
        assert w["max_workers"] <= config["max_workers"]
    assert max(workers[k]["max_workers"] for k in on_demand) > 0
    # Every node gets an instance profile (S3 and the image registry need one).
    for name, t in types.items():
        arn = t["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), name


def test_aws_yaml_docker_section():
    config = load_yaml(CLUSTER / "aws.yaml")
    docker = config["docker"]
    assert docker["image"] and docker["container_name"]
    assert any(o.startswith("--shm-size=") for o in docker["run_options"]), "object store needs /dev/shm"
    # `--gpus all` only where there are GPUs: on the CPU head `docker run` would fail.
    assert "--gpus all" in docker["worker_run_options"]
    assert not any("--gpus" in o for o in docker["run_options"] + docker.get("head_run_options", []))
    assert "-e NVIDIA_VISIBLE_DEVICES=void" in docker["head_run_options"]
    # Token auth on: the token reaches every node, and Ray processes run in token mode.
    assert "-e RAY_AUTH_MODE=token" in docker["run_options"]
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


# ------------------------------------------------------------------- KubeRay manifests


@pytest.mark.parametrize("filename, blob", sorted(CRD_BLOBS.items()))
def test_crd_copies_are_the_unmodified_kuberay_files(filename, blob):
    path = CRDS / filename
    assert path.is_file(), f"{path} is missing (see cluster/kuberay/crds/SOURCE.md)"
    assert git_blob_id(path) == blob, f"{path} differs from KubeRay v1.7.0"
    assert (CRDS / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_raycluster_validates_against_the_v1_crd():
    manifest = raycluster()
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert crd_errors(manifest, "ray.io_rayclusters.yaml") == []


def test_rayjob_validates_against_the_v1_crd():
    manifest = rayjob()
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    assert crd_errors(manifest, "ray.io_rayjobs.yaml") == []


@pytest.mark.parametrize(
    "filename, path, good, bad",
    [
        ("rayjob.yaml", ("spec",), "entrypoint", "entrypont"),
        ("rayjob.yaml", ("spec",), "shutdownAfterJobFinishes", "shutdownAfterJobFinished"),
        (
            "rayjob.yaml",
            ("spec", "rayClusterSpec", "autoscalerOptions"),
            "idleTimeoutSeconds",
            "idleTimeoutSecond",
        ),
        ("raycluster.yaml", ("spec",), "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
        ("raycluster.yaml", ("spec", "workerGroupSpecs", 0), "maxReplicas", "maxReplica"),
        (
            "raycluster.yaml",
            ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0),
            "resources",
            "resource",
        ),
    ],
)
def test_a_misspelt_field_fails_crd_validation(filename, path, good, bad):
    manifest = load_yaml(KUBERAY / filename)
    node = manifest
    for key in path:
        node = node[key]
    node[bad] = node.pop(good)
    crd = "ray.io_rayjobs.yaml" if manifest["kind"] == "RayJob" else "ray.io_rayclusters.yaml"
    errors = crd_errors(manifest, crd)
    assert any(f"'{bad}' was unexpected" in e for e in errors), errors


def test_crd_validation_catches_wrong_types_and_quantities():
    manifest = raycluster()
    group = manifest["spec"]["workerGroupSpecs"][0]
    group["maxReplicas"] = "four"
    group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "24 GB"
    errors = crd_errors(manifest, "ray.io_rayclusters.yaml")
    assert any("maxReplicas" in e for e in errors) and any("24 GB" in e for e in errors), errors


@pytest.mark.parametrize("name, spec", cluster_specs())
def test_cluster_specs_autoscale_gpu_workers_from_zero_with_autoscaler_v2(name, spec):
    assert spec["enableInTreeAutoscaling"] is True, name
    opts = spec["autoscalerOptions"]
    assert opts["version"] == "v2" and opts["upscalingMode"] in {"Default", "Aggressive", "Conservative"}
    assert opts["idleTimeoutSeconds"] > 0
    # KubeRay 1.7 rejects the old env-var switch next to autoscalerOptions.version, and v2
    # needs pods that never restart in place.
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "RAY_enable_autoscaler_v2" not in {e["name"] for e in head.get("env", [])}, name
    for pod in pod_specs(spec):
        assert pod.get("restartPolicy", "Never") == "Never", name
    # Token auth needs Ray >= 2.52, and rayVersion must be the image's Ray.
    assert spec["authOptions"]["mode"] == "token"
    assert Version(spec["rayVersion"]) >= Version("2.52.0")
    assert spec["rayVersion"] == docker_base_image()[1].split("-")[0], name
    # The head has no GPU; the GPU group scales between 0 and maxReplicas.
    assert not any(
        "nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in pod_specs(spec)[0]["containers"]
    )
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups, f"{name}: no GPU worker group"
    for g in gpu_groups:
        assert (
            g["minReplicas"] == 0 and 0 <= g.get("replicas", 0) <= g["maxReplicas"] and g["maxReplicas"] >= 1
        )
    # Ray's object store needs a memory-backed /dev/shm in every pod.
    for pod in pod_specs(spec):
        shm = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
        mounts = {
            m["name"]
            for c in pod["containers"]
            for m in c.get("volumeMounts", [])
            if m["mountPath"] == "/dev/shm"
        }
        assert shm & mounts, name


def test_rayjob_runs_on_its_own_cluster_and_cleans_up():
    manifest = rayjob()
    spec = manifest["spec"]
    name = manifest["metadata"]["name"]
    assert DNS1035.match(name) and len(name) <= MAX_RAYJOB_NAME
    assert len(raycluster()["metadata"]["name"]) <= MAX_RAYCLUSTER_NAME
    assert "rayClusterSpec" in spec and "clusterSelector" not in spec
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["entrypoint"].split()[:2] == ["mace-ray", "erase"]


def entrypoint_args() -> list[str]:
    words = shlex.split(rayjob()["spec"]["entrypoint"])
    assert words[:2] == ["mace-ray", "erase"], words
    return words[2:]


def option_value(args: list[str], option: str) -> str | None:
    for i, a in enumerate(args):
        if a == option:
            return args[i + 1]
        if a.startswith(option + "="):
            return a.split("=", 1)[1]
    return None


def test_rayjob_entrypoint_is_an_erase_command_the_cli_accepts(monkeypatch):
    # The job's working dir is the image's copy of the repo: relative paths resolve as here.
    monkeypatch.chdir(REPO)
    args = drop_pending(entrypoint_args())
    ctx = parse_erase(args)
    assert (REPO / ctx.params["concepts"]).is_file()
    assert str(ctx.params["output"]).startswith("s3://"), "a RayJob's cluster is deleted: output must be S3"
    if "--config" in erase_options():
        assert ctx.params["config"] is not None and (REPO / ctx.params["config"]).is_file()
    # Scale: one worker per GPU pod, as many as the GPU group may have.
    workers = option_value(entrypoint_args(), "--workers")
    if workers is not None:
        group = rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        assert int(workers) == group["maxReplicas"]


def test_rayjob_entrypoint_with_a_misspelt_option_is_rejected(monkeypatch):
    monkeypatch.chdir(REPO)
    args = [a.replace("--output", "--ouput") for a in drop_pending(entrypoint_args())]
    with pytest.raises(Exception, match="ouput"):
        parse_erase(args)


def test_rayjob_runtime_env_is_a_valid_ray_runtime_env_in_the_images_repo_copy():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"])
    assert set(env) <= RuntimeEnv.known_fields
    (workdir,) = [args for ins, args in dockerfile() if ins == "WORKDIR"]
    assert env["working_dir"] == workdir
    # Ray checks that a local working_dir exists; the image's copy of the repo is this repo.
    RuntimeEnv(**{**env, "working_dir": str(REPO)})


def test_serviceaccount_is_the_one_the_pods_use():
    sa = load_yaml(KUBERAY / "serviceaccount.yaml")
    assert sa["apiVersion"] == "v1" and sa["kind"] == "ServiceAccount"
    for name, spec in cluster_specs():
        assert {p["serviceAccountName"] for p in pod_specs(spec)} == {sa["metadata"]["name"]}, name


# ------------------------------------------------------------------------------ image


def test_dockerfile_base_image_is_the_ray_this_project_depends_on():
    repo, tag = docker_base_image()
    assert repo == "rayproject/ray", "rayproject/ray-ml images are no longer published"
    m = re.fullmatch(r"(\d+\.\d+\.\d+)-py311-gpu", tag)
    assert m, f"unexpected base image tag {tag!r}"
    version = Version(m.group(1))
    spec = ray_requirement().specifier
    assert version in spec, f"ray {version} does not satisfy pyproject's {spec}"
    lower = min(Version(s.version) for s in spec if s.operator in (">=", "=="))
    assert version == lower, f"base image ray {version} != pyproject's lowest ray {lower}"
    # `ray up` and `ray job submit` want the laptop's Ray to be the cluster's.
    assert Version(ray.__version__) == version, f"installed ray {ray.__version__} != image ray {version}"


def test_dockerfile_installs_this_package_and_the_tested_torch():
    instructions = dockerfile()
    runs = " ".join(args for ins, args in instructions if ins == "RUN")
    assert re.search(r"pip install [^&]*\s\.(\s|$)", runs), "the image must `pip install .` this repo"
    assert any(ins == "COPY" and args.split()[-2:] == [".", "."] for ins, args in instructions)
    # Dependencies in a layer before the source, so that a code edit does not reinstall them.
    source = next(i for i, (ins, args) in enumerate(instructions) if ins == "COPY" and args.endswith(". ."))
    deps = next(
        i for i, (ins, args) in enumerate(instructions) if ins == "RUN" and "requirements.txt" in args
    )
    assert deps < source and "--no-deps" in instructions[source + 1][1]
    setup = (REPO / "scripts" / "setup.sh").read_text()
    torch_pin = re.search(r"MACE_TORCH:-([^}]+)\}", setup).group(1)
    vision_pin = re.search(r"MACE_TORCHVISION:-([^}]+)\}", setup).group(1)
    (torch_arg,) = [a for ins, a in instructions if ins == "ARG" and a.startswith("TORCH=")]
    assert torch_arg.split("=", 1)[1].strip('"').split() == [torch_pin, vision_pin]


def test_every_cluster_file_names_the_same_image_tagged_with_the_package_version():
    refs = image_refs()
    assert len(set(refs.values())) == 1, refs
    image = next(iter(refs.values()))
    assert image.rsplit(":", 1)[1] == project_version(), image


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    patterns = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {
        ".git",
        ".venv",
        "mace-runs",
        "runs",
        ".pytest_cache",
        ".ruff_cache",
        "**/__pycache__",
    } <= patterns


# ---------------------------------------------------------------------------- jobs/


def concepts_of(path: Path, default_type: ConceptType = ConceptType.OBJECT):
    clist = read_concept_file(path, default_type)
    assert clist.duplicates == [], f"{path}: duplicate lines {clist.duplicates}"
    return clist.concepts


def test_cifar10_objects_and_one_file_per_class():
    objects = concepts_of(JOBS / "cifar10" / "objects.txt")
    assert [c.text for c in objects] == CIFAR10
    assert {c.type for c in objects} == {ConceptType.OBJECT}
    anchors = {c.text: c.anchor for c in objects}
    assert all(anchors[c] and anchors[c] != "scene" for c in CIFAR10), "each class needs its scene word"
    assert {k: anchors[k] for k in CIFAR10_PAPER_ANCHORS} == CIFAR10_PAPER_ANCHORS
    for c in objects:
        (alone,) = concepts_of(JOBS / "cifar10" / f"{c.text}.txt")
        assert alone == c


@pytest.mark.parametrize(
    "task, type_", [("celebrities", ConceptType.CELEBRITY), ("artists", ConceptType.STYLE)]
)
def test_erase_and_retain_lists_have_100_each_and_are_disjoint(task, type_):
    erase = concepts_of(JOBS / task / "erase.txt")
    retain = concepts_of(JOBS / task / "retain.txt")
    assert len(erase) == 100 and len(retain) == 100
    assert {c.type for c in erase + retain} == {type_}, "every line names its type"
    assert not {c.key for c in erase} & {c.key for c in retain}


def test_explicit_list():
    concepts = concepts_of(JOBS / "explicit" / "erase.txt")
    assert [c.text for c in concepts] == ["nudity", "naked", "erotic", "sexual"]
    assert {(c.type, c.anchor) for c in concepts} == {(ConceptType.EXPLICIT, "a person wearing clothes")}


def test_example_concepts_still_load():
    assert len(concepts_of(JOBS / "example_concepts.txt")) == 3


@pytest.mark.parametrize("task", TASKS)
def test_job_config_keys_are_erase_options_and_values_parse(task, monkeypatch):
    monkeypatch.chdir(REPO)
    path = JOBS / task / "job.yaml"
    config = yaml.safe_load(path.read_text())
    params = {config_key(p): p for p in erase_command().params}
    unknown = set(config) - set(params)
    assert not unknown, f"{path}: not options of `mace-ray erase`: {sorted(unknown)}"
    for key in ("concepts", "retain"):
        if key in config:
            assert (REPO / config[key]).is_file(), f"{path}: {key} {config[key]!r} does not exist"
    # The whole config as command-line options, through the real parser (types, ranges).
    args = [str(config.get("concepts", "jobs/cifar10/dog.txt"))]
    for key, value in config.items():
        if key == "concepts":
            continue
        option = next(o for o in params[key].opts if o.startswith("--"))
        if isinstance(value, bool):
            args.append(option if value else params[key].secondary_opts[0])
        else:
            args += [option, str(value)]
    ctx = parse_erase(args)
    assert ctx.params["type_"].value == config["type"]
    # YAML reads `1e-4` (no dot) as a string: a numeric option must get a YAML number.
    for key, value in config.items():
        parsed = ctx.params[params[key].name]
        if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (
                f"{path}: {key}: {value!r}"
            )


@pytest.mark.parametrize("task", TASKS)
def test_job_config_loads_through_erase_config(task, monkeypatch):
    """`mace-ray erase --config jobs/<task>/job.yaml` (the lead's loader), values arriving intact."""
    if "--config" not in erase_options():
        # Until the option exists the test above already checks every key and value.
        assert "--config" in PENDING_OPTIONS
        return
    monkeypatch.chdir(REPO)
    config = yaml.safe_load((JOBS / task / "job.yaml").read_text())
    ctx = parse_erase([config.get("concepts", "jobs/cifar10/dog.txt"), "--config", f"jobs/{task}/job.yaml"])
    for key, value in config.items():
        name = "type_" if key == "type" else key
        got = ctx.params[name]
        got = got.value if isinstance(got, ConceptType) else got
        if key == "concepts_per_batch":  # a number or auto, parsed after the options
            got, value = str(got), str(value)
        assert (str(got) if isinstance(got, Path) else got) == value, key


def test_paper_hyper_parameters():
    """The paper's published training configurations (SD v1.4)."""
    jobs = {t: yaml.safe_load((JOBS / t / "job.yaml").read_text()) for t in TASKS}
    for t in TASKS:
        assert jobs[t]["model"] == "CompVis/stable-diffusion-v1-4"
        assert jobs[t]["images"] == 8 and jobs[t]["rank"] == 1
    assert (jobs["celebrities"]["lr"], jobs["celebrities"]["train_steps"]) == (1e-4, 50)
    assert (jobs["artists"]["lr"], jobs["artists"]["train_steps"]) == (1e-4, 50)
    assert (jobs["explicit"]["lr"], jobs["explicit"]["train_steps"]) == (1e-5, 120)
    assert (jobs["cifar10"]["lr"], jobs["cifar10"]["train_steps"]) == (1e-5, 50)
    assert jobs["celebrities"]["retain"] == "jobs/celebrities/retain.txt"
    assert jobs["artists"]["retain"] == "jobs/artists/retain.txt"
    assert "retain" not in jobs["explicit"] and "retain" not in jobs["cifar10"]
    assert jobs["artists"]["masker"] == "whole-image"
    # The closed forms take the paper's per-type weights (closed_form_weights): a job that
    # set its own would silently leave them.
    for t in TASKS:
        assert not {k for k in jobs[t] if "weight" in k or "ridge" in k}, t
    assert jobs["cifar10"]["type"] == "object" and jobs["celebrities"]["type"] == "celebrity"


def test_runtime_env_example_is_a_valid_ray_runtime_env(monkeypatch):
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    monkeypatch.chdir(REPO)
    env = parse_runtime_env_args(
        runtime_env="jobs/runtime_env.yaml"
    )  # what `ray job submit --runtime-env` reads
    assert set(env) <= RuntimeEnv.known_fields
    assert env["working_dir"] == "."
    RuntimeEnv(**env)


def test_readme_commands_name_existing_files_and_options(monkeypatch):
    """Every `mace-ray erase ...` in jobs/README.md parses, and the files it names exist."""
    monkeypatch.chdir(REPO)
    text = (JOBS / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            if "mace-ray erase" in line:
                commands.append(line.split("mace-ray erase", 1)[1].split(";")[0])
    assert len(commands) >= 5, commands
    for command in commands:
        # Shell variables of the examples: a class of the CIFAR-10 loop, the checkout.
        command = command.replace("${c}", "dog").replace("$c", "dog").replace('"$PWD', f'"{REPO}')
        args = shlex.split(command)
        assert args and "$" not in command, command
        if args[0].endswith(".txt"):
            assert (REPO / args[0]).is_file(), command
        ctx = parse_erase(drop_pending(args))
        if ctx.params.get("config"):
            assert (REPO / ctx.params["config"]).is_file(), command
