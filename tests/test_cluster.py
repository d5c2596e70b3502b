"""cluster/: the autoscaler YAMLs against Ray's own schema, the KubeRay manifests against the
KubeRay v1.7.0 CRDs' OpenAPI schemas, and the runtime env against Ray's RuntimeEnv parser.

Each schema check is paired with broken copies that the same validator must reject, so a
validator that accepts everything cannot pass here.
"""
from __future__ import annotations

import copy
import json
import os
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
# ../shared beside the checkout (as CI lays it out) holds the KubeRay CRDs.
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
AUTOSCALER_YAMLS = ["aws.yaml", "gcp.yaml"]
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


def load(name: str) -> dict[str, Any]:
    with open(CLUSTER / name) as f:
        return yaml.safe_load(f)


def errors(validator: jsonschema.protocols.Validator, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# ----------------------------------------------------------------------------- autoscaler YAMLs

@pytest.fixture(scope="module")
def ray_schema_validator() -> jsonschema.Draft7Validator:
    import ray

    path = Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json"
    schema = json.loads(path.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("name", AUTOSCALER_YAMLS)
def test_autoscaler_yaml_matches_ray_schema(name, ray_schema_validator):
    cfg = load(name)
    assert errors(ray_schema_validator, cfg) == []
    # What `ray up` does before launching anything: merge the provider defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(cfg)
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", AUTOSCALER_YAMLS)
def test_autoscaler_yaml_cpu_head_and_gpu_workers_from_zero(name):
    cfg = load(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_groups = {k: t for k, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_groups, f"{name}: no GPU worker group"
    for k, t in gpu_groups.items():
        assert t["min_workers"] == 0, f"{name}: {k} must scale from zero"
        assert 1 <= t["max_workers"] <= cfg["max_workers"]
    assert cfg["cluster_name"] == "hello-ray"


@pytest.mark.parametrize("name", AUTOSCALER_YAMLS)
def test_autoscaler_yaml_installs_this_package(name):
    cfg = load(name)
    assert cfg["docker"]["image"].startswith("rayproject/ray:") and cfg["docker"]["image"].endswith("-gpu")
    # The checkout is mounted at a remote path and that same path is pip-installed everywhere.
    (remote, local), = cfg["file_mounts"].items()
    assert local == "."
    assert any(c.startswith("pip install") and c.split()[-1] == remote and "-e" in c.split()
               for c in cfg["setup_commands"]), cfg["setup_commands"]
    assert {"artifacts", ".venv", ".git"} <= set(cfg["rsync_exclude"])


def test_fake_multinode_yaml_matches_ray_schema(ray_schema_validator):
    """The local autoscaling rehearsal (tests/test_multinode.py): Ray's schema, a head with no
    CPUs (stage work must go to workers), workers from zero. Not through ``prepare_config``: it
    merges the fake provider's defaults from an example.yaml that the Ray wheel does not ship."""
    cfg = load("fake-multinode.yaml")
    assert errors(ray_schema_validator, cfg) == []
    assert cfg["provider"]["type"] == "fake_multinode"
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["CPU"] == 0
    workers = [t for k, t in types.items() if k != cfg["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 and t["resources"]["CPU"] >= 1 for t in workers)


BROKEN_AUTOSCALER = [
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU="1"), "string resource",
     "is not of type 'integer'"),
    (lambda c: c.update(max_worker=8), "unknown top-level key", "'max_worker' was unexpected"),
    (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"), "missing node_config",
     "'node_config' is a required property"),
    (lambda c: c["docker"].update(imgae="rayproject/ray"), "typo in docker", "'imgae' was unexpected"),
    (lambda c: c.pop("provider"), "missing provider", "'provider' is a required property"),
]


@pytest.mark.parametrize("mutate, what, expect", BROKEN_AUTOSCALER, ids=[w for _, w, _ in BROKEN_AUTOSCALER])
def test_ray_schema_rejects_broken_configs(mutate, what, expect, ray_schema_validator):
    cfg = load("aws.yaml")
    mutate(cfg)
    found = errors(ray_schema_validator, cfg)
    assert any(expect in e for e in found), f"{what}: expected an error with {expect!r}, got {found}"


def test_ray_rejects_head_type_missing_from_node_types():
    from ray.autoscaler._private.util import validate_config

    cfg = load("gcp.yaml")
    cfg["head_node_type"] = "head_gpu"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(cfg)


# ----------------------------------------------------------------------------- KubeRay manifests

def openapi_to_jsonschema(node: Any) -> Any:
    """A CRD's OpenAPI v3 schema as a JSON schema that checks what the API server checks.

    - ``nullable: true`` -> the type also admits null;
    - ``format: int32/int64`` -> explicit ranges (jsonschema ignores unknown formats);
    - an object with ``properties`` and neither ``additionalProperties`` nor
      ``x-kubernetes-preserve-unknown-fields`` gets ``additionalProperties: false``: the API
      server (kubectl's default --validate=strict) rejects unknown fields there, and this is
      what turns a typo like ``minReplica`` into an error;
    - ``x-kubernetes-int-or-string`` already comes with ``anyOf: [integer, string]`` (+ the
      quantity ``pattern``, which applies to strings), so it works as is; the other
      ``x-kubernetes-*`` keys (list types, CEL rules) are dropped: jsonschema cannot run CEL.
    """
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    fmt = node.get("format")
    if node.get("type") == "integer" and fmt in ("int32", "int64"):
        lo, hi = INT32 if fmt == "int32" else INT64
        out.setdefault("minimum", lo)
        out.setdefault("maximum", hi)
    if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_validator(file: str, kind: str) -> jsonschema.Draft7Validator:
    path = CRD_DIR / file
    assert path.is_file(), f"KubeRay CRD {path} is missing (expected beside the repo in shared/)"
    crd = yaml.safe_load(path.read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = openapi_to_jsonschema(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def raycluster_validator() -> jsonschema.Draft7Validator:
    return crd_validator("ray.io_rayclusters.yaml", "RayCluster")


@pytest.fixture(scope="module")
def rayjob_validator() -> jsonschema.Draft7Validator:
    return crd_validator("ray.io_rayjobs.yaml", "RayJob")


def test_raycluster_matches_crd(raycluster_validator):
    doc = load("kuberay-raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert errors(raycluster_validator, doc) == []


def test_rayjob_matches_crd(rayjob_validator):
    doc = load("kuberay-rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert errors(rayjob_validator, doc) == []


def _worker(doc: dict) -> dict:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["workerGroupSpecs"][0]


BROKEN_CLUSTERS = [
    (lambda d: _worker(d).pop("maxReplicas"), "missing required maxReplicas",
     "'maxReplicas' is a required property"),
    (lambda d: _worker(d).update(minReplicas="0"), "minReplicas as a string", "'0' is not of type 'integer'"),
    (lambda d: _worker(d).update(maxReplicas=2**40), "maxReplicas beyond int32", "greater than the maximum"),
    (lambda d: d["spec"].get("rayClusterSpec", d["spec"]).update(enableInTreeAutoScaling=True),
     "misspelt field", "'enableInTreeAutoScaling' was unexpected"),
    (lambda d: d["spec"].get("rayClusterSpec", d["spec"])["headGroupSpec"].pop("template"),
     "head group without pod template", "'template' is a required property"),
    (lambda d: _worker(d)["template"]["spec"]["containers"][0]["resources"]["limits"]
     .update({"nvidia.com/gpu": "one"}), "quantity that is not a quantity", "'one' does not match"),
    (lambda d: _worker(d)["template"]["spec"]["containers"][0]["env"][0].pop("name"),
     "env var without a name", "'name' is a required property"),
    (lambda d: d["spec"].get("rayClusterSpec", d["spec"])["authOptions"].update(mode="on"),
     "auth mode that does not exist", "'on' is not one of ['disabled', 'token']"),
]
BROKEN_JOBS = BROKEN_CLUSTERS + [
    (lambda d: d["spec"].update(entrypoint=["python", "jobs/distill.py"]), "list entrypoint",
     "is not of type 'string'"),
    (lambda d: d["spec"].update(shutdownAfterJobFinish=True), "misspelt RayJob field",
     "'shutdownAfterJobFinish' was unexpected"),
]


def _assert_rejected(validator, doc, mutate, what, expect) -> None:
    mutate(doc)
    found = errors(validator, doc)
    assert any(expect in e for e in found), f"{what}: expected an error with {expect!r}, got {found}"


@pytest.mark.parametrize("mutate, what, expect", BROKEN_CLUSTERS, ids=[w for _, w, _ in BROKEN_CLUSTERS])
def test_raycluster_schema_rejects_broken_manifests(mutate, what, expect, raycluster_validator):
    _assert_rejected(raycluster_validator, load("kuberay-raycluster.yaml"), mutate, what, expect)


@pytest.mark.parametrize("mutate, what, expect", BROKEN_JOBS, ids=[w for _, w, _ in BROKEN_JOBS])
def test_rayjob_schema_rejects_broken_manifests(mutate, what, expect, rayjob_validator):
    _assert_rejected(rayjob_validator, load("kuberay-rayjob.yaml"), mutate, what, expect)


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_cpu_head_autoscaled_gpu_workers_with_s3_secret(name):
    doc = load(name)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), "the head is a CPU pod"
    worker = spec["workerGroupSpecs"][0]
    assert worker["minReplicas"] == 0 and worker["maxReplicas"] >= 1
    wc = worker["template"]["spec"]["containers"][0]
    assert int(wc["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    images = {head["image"], wc["image"]}
    assert all(i.startswith(f"rayproject/ray:{spec['rayVersion']}-") for i in images), images
    for container in (head, wc):
        env = {e["name"]: e for e in container["env"]}
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["key"] == var and ref["name"] == "hello-ray-s3", (container["name"], var)
        assert not any("value" in e for e in container["env"]), "no credential in plain text"


def _secret_refs(node: Any, container: str = "") -> list[tuple[str, str]]:
    """(container name, Secret name) of every secretKeyRef / secretRef in a manifest."""
    out = []
    if isinstance(node, dict):
        container = node["name"] if "image" in node and "name" in node else container
        for k, v in node.items():
            if k in ("secretKeyRef", "secretRef") and isinstance(v, dict):
                out.append((container, v["name"]))
            else:
                out += _secret_refs(v, container)
    elif isinstance(node, list):
        for v in node:
            out += _secret_refs(v, container)
    return out


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_token_auth_internal_dashboard_and_s3_secret_only_in_ray_pods(name):
    doc = load(name)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert spec["authOptions"] == {"mode": "token", "secretName": "hello-ray-auth"}
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    assert "ingressOptions" not in head and "headService" not in head
    containers = [head["template"]["spec"]["containers"]] + [
        g["template"]["spec"]["containers"] for g in spec["workerGroupSpecs"]]
    assert not any("hostPort" in p for cs in containers for c in cs for p in c.get("ports", []))
    # The S3 Secret reaches the Ray containers (driver, Data tasks, Train ranks) and nothing else
    # (a RayJob's submitter only talks to the Jobs API); the key pair may be absent (IRSA).
    refs = _secret_refs(doc)
    assert {c for c, s in refs if s == "hello-ray-s3"} == {"ray-head", "ray-worker"}, refs
    assert "submitterPodTemplate" not in doc["spec"]
    head_env = {e["name"]: e for e in head["template"]["spec"]["containers"][0]["env"]}
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert head_env[var]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_rayjob_cluster_is_the_raycluster():
    """The two manifests describe one cluster; a change to one must go to the other."""
    assert load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"] == load("kuberay-raycluster.yaml")["spec"]


def test_rayjob_entrypoint_is_a_valid_distill_run():
    from hello_ray.pipeline import parse_args

    spec = load("kuberay-rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/distill.py"] and (ROOT / argv[1]).is_file()
    cfg = parse_args(argv[2:])  # exits (SystemExit) on an unknown key or a bad value
    assert cfg.store.startswith("s3://") and cfg.data.source.startswith("s3://")
    assert spec["shutdownAfterJobFinishes"] is True


# ----------------------------------------------------------------------------- runtime env

def _check_runtime_env(env: dict[str, Any]) -> None:
    from ray.runtime_env import RuntimeEnv

    unknown = set(env) - RuntimeEnv.known_fields
    assert not unknown, f"unknown runtime_env fields {unknown}"
    RuntimeEnv(**env)  # Ray's own parsing: field types, pip fields, working_dir URI/path


def _pyproject_deps_without_ray() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return {r.name.lower(): str(r.specifier) for r in reqs if r.name.lower() != "ray"}


def _pip_deps(env: dict[str, Any]) -> dict[str, str]:
    reqs = [Requirement(p) for p in env["pip"]["packages"]]
    return {r.name.lower(): str(r.specifier) for r in reqs}


def test_runtime_env_names_the_working_dir_and_the_package_deps():
    env = load("runtime_env.yaml")
    _check_runtime_env(env)
    # Used from the repository root: its working dir is the checkout with the job and the package.
    wd = (ROOT / env["working_dir"]).resolve()
    assert wd == ROOT and (wd / "jobs" / "distill.py").is_file() and (wd / "hello_ray").is_dir()
    assert {"artifacts/", ".venv/", ".git/"} <= set(env["excludes"])
    assert _pip_deps(env) == _pyproject_deps_without_ray()
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def test_rayjob_runtime_env_is_runtime_env_yaml_with_the_code_in_s3():
    base = load("runtime_env.yaml")
    job_env = yaml.safe_load(load("kuberay-rayjob.yaml")["spec"]["runtimeEnvYAML"])
    _check_runtime_env(job_env)  # Ray parses working_dir as a remote package URI here
    uri = urlparse(job_env["working_dir"])
    assert uri.scheme == "s3" and uri.netloc and uri.path.endswith(".zip"), job_env["working_dir"]
    assert job_env["pip"] == base["pip"] and job_env["env_vars"] == base["env_vars"]


# ----------------------------------------------------------------------------- AWS worker IAM policy

def _allows(policy: dict, action: str, resource: str) -> bool:
    """IAM's answer for an Allow-only identity policy without conditions: some statement's
    Action and Resource patterns (``*`` / ``?`` wildcards) match."""
    import fnmatch

    def listed(value: str | list[str]) -> list[str]:
        return [value] if isinstance(value, str) else value

    return any(st["Effect"] == "Allow"
               and any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in listed(st["Action"]))
               and any(fnmatch.fnmatchcase(resource, r) for r in listed(st["Resource"]))
               for st in policy["Statement"])


def test_aws_workers_run_as_a_role_limited_to_the_buckets():
    cfg = load("aws.yaml")
    worker = cfg["available_node_types"]["gpu_worker"]["node_config"]
    assert worker["IamInstanceProfile"] == {"Name": "hello-ray-worker"}  # not Ray's EC2+S3 default
    policy = json.loads((CLUSTER / "aws-worker-policy.json").read_text())
    assert policy["Version"] == "2012-10-17"
    assert all("Condition" not in st and "NotAction" not in st and "NotResource" not in st
               for st in policy["Statement"]), "the evaluator below handles plain statements only"
    # The buckets of the usage line at the top of aws.yaml: the dataset read, the store read/write.
    text = (CLUSTER / "aws.yaml").read_text()
    data = urlparse(next(w.split("=", 1)[1] for w in text.split() if w.startswith("data.source=")))
    store = urlparse(next(w.split("=", 1)[1] for w in text.split() if w.startswith("store=")))
    bucket = f"arn:aws:s3:::{data.netloc}"
    assert store.netloc == data.netloc
    data_obj, store_obj = f"{bucket}{data.path}/train/x.JPEG", f"{bucket}{store.path}/teachers-0/a.pt"
    needed = [("s3:ListBucket", bucket), ("s3:GetObject", data_obj), ("s3:GetObject", store_obj),
              ("s3:PutObject", store_obj), ("s3:DeleteObject", store_obj),  # Ray Train prunes checkpoints
              ("s3:AbortMultipartUpload", store_obj)]
    for action, resource in needed:
        assert _allows(policy, action, resource), (action, resource)
    refused = [("s3:PutObject", data_obj), ("s3:DeleteObject", data_obj),  # the dataset is read-only
               ("s3:GetObject", "arn:aws:s3:::another-bucket/x"), ("s3:ListBucket", "arn:aws:s3:::another-bucket"),
               ("s3:DeleteBucket", bucket), ("s3:PutBucketPolicy", bucket), ("ec2:RunInstances", "*"),
               ("iam:PassRole", "*"), ("s3:GetObject", f"{bucket}/elsewhere/x")]
    for action, resource in refused:
        assert not _allows(policy, action, resource), (action, resource)
    assert "cluster/aws-worker-policy.json" in text


def test_every_cluster_file_is_checked_here():
    """A new file in cluster/ needs its own checks in this module."""
    checked = {*AUTOSCALER_YAMLS, "fake-multinode.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "runtime_env.yaml", "README.md",
               "aws-worker-policy.json"}
    assert {p.name for p in CLUSTER.iterdir()} == checked
