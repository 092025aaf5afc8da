"""Deployment files checked without a cluster or Docker.

Every YAML parses; Ray, Python and torch versions agree between pyproject.toml, the
Makefile, the installed Ray, the Dockerfile and the manifests; every file a manifest or
docs/cluster.md names exists (and is in the image where the cluster needs it); the
KubeRay manifests validate against KubeRay's own CRD schema with unknown fields rejected
(as `kubectl apply` does with strict field validation); the `ray up` config passes Ray's
own validation; no credential is written anywhere.
"""
from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import typer
import yaml
from packaging.specifiers import SpecifierSet

from pipeline.cli import app
from sempart_core.config import load_config

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
KUBERAY = INFRA / "kuberay"
AWS = INFRA / "aws" / "cluster.yaml"
DOCS = REPO / "docs" / "cluster.md"
CRD_SCHEMA = REPO / "tests" / "data" / "kuberay_crd_v1.json"
RAY = importlib.metadata.version("ray")
CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def yaml_files() -> list[Path]:
    return sorted(INFRA.rglob("*.yaml")) + sorted((REPO / "jobs" / "configs").glob("*.yaml"))


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kube(kind: str) -> list[dict]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in load_docs(p) if d.get("kind") == kind]


def kustomization() -> dict:
    (doc,) = load_docs(KUBERAY / "kustomization.yaml")
    return doc


def configmap_literals() -> dict[str, dict[str, str]]:
    """The ConfigMaps that kustomization.yaml generates: name -> {key: value}."""
    return {g["name"]: dict(item.split("=", 1) for item in g["literals"]) for g in kustomization()["configMapGenerator"]}


def walk(node):
    """Every dict inside a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def containers(doc: dict) -> list[dict]:
    return [c for d in walk(doc) if isinstance(d.get("containers"), list) for c in d["containers"]]


def python_versions() -> list[str]:
    """The minor Python versions that pyproject's requires-python allows, e.g. ['3.11', '3.12']."""
    spec = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    return [f"3.{minor}" for minor in range(8, 30) if spec.contains(f"3.{minor}.0")]


def python_version() -> str:
    """The Python of the Docker image, CI and the Makefile: the lowest one allowed, e.g. '3.11'."""
    return python_versions()[0]


def py_tag() -> str:
    return "py" + python_version().replace(".", "")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in joined.splitlines()
            if line.strip()]


def app_dir() -> str:
    (workdir,) = [args for instr, args in dockerfile_instructions() if instr == "WORKDIR"]
    return workdir


def entrypoints() -> list[tuple[str, list[str]]]:
    """(RayJob name, entrypoint split like the submitter's shell splits it)."""
    return [(job["metadata"]["name"], shlex.split(job["spec"]["entrypoint"])) for job in kube("RayJob")]


def test_every_yaml_parses() -> None:
    files = yaml_files()
    assert {p.relative_to(REPO).as_posix() for p in files} >= {
        "infra/aws/cluster.yaml", "infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob-train.yaml",
        "infra/kuberay/rayjob-label.yaml", "infra/kuberay/kustomization.yaml", "jobs/configs/label.yaml",
        "jobs/configs/train_dino_s8.yaml", "jobs/configs/train_tiny_cpu.yaml",
    }
    for path in files:
        docs = load_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_ray_and_python_versions_agree() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (ray_req,) = [r for r in pyproject["dependencies"] if re.match(r"ray\[", r)]
    assert SpecifierSet(ray_req.split("]", 1)[1]).contains(RAY)  # pyproject admits the Ray in use
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in python_versions()

    froms = [args for instr, args in dockerfile_instructions() if instr == "FROM"]
    assert froms == [f"rayproject/ray:{RAY}-{py_tag()}-gpu"]
    assert f'"ray[data,train]=={RAY}"' in DOCKERFILE.read_text()  # pip may not swap the base image's Ray

    specs = [c["spec"] for c in kube("RayCluster")] + [j["spec"]["rayClusterSpec"] for j in kube("RayJob")
                                                        if "rayClusterSpec" in j["spec"]]
    assert specs and {s["rayVersion"] for s in specs} == {RAY}

    ours = f"ray{RAY}-{py_tag()}-gpu"
    images = [c["image"] for d in kube("RayCluster") + kube("RayJob") for c in containers(d)]
    assert images
    for image in images:
        name, tag = image.rsplit(":", 1)
        if name == "rayproject/ray":  # the job submitters: only need the same Ray CLI
            assert re.fullmatch(rf"{re.escape(RAY)}-{py_tag()}(-cpu|-gpu|-cu\d+)?", tag), image
        else:
            assert name == "sempart" and tag.endswith(ours), image
    (entry,) = kustomization()["images"]
    assert entry["name"] == "sempart" and entry["newTag"].endswith(ours)
    assert {img.rsplit(":", 1)[1] for img in images if img.startswith("sempart:")} == {entry["newTag"]}
    (aws,) = load_docs(AWS)
    assert aws["docker"]["image"].endswith(f"/sempart:{entry['newTag']}")


def test_torch_pins_match_the_makefile() -> None:
    (line,) = [line for line in (REPO / "Makefile").read_text().splitlines() if line.startswith("TORCH :=")]
    pins = set(line.split(":=", 1)[1].split())
    assert pins == {p for p in pins if re.fullmatch(r"torch(vision)?==[\w.+]+", p)} and len(pins) == 2
    installs = [args for instr, args in dockerfile_instructions() if instr == "RUN" and "pip install" in args]
    torch_installs = [set(re.findall(r"torch(?:vision)?==[\w.+]+", args)) for args in installs]
    assert torch_installs and all(found == pins for found in torch_installs if found)
    assert any('pip install ".[s3]"' in args for args in installs)  # the package with its S3 extra


def test_dockerfile_runs_as_the_ray_user() -> None:
    steps = dockerfile_instructions()
    users = [i for i, (instr, _) in enumerate(steps) if instr == "USER"]
    assert users and all(steps[i][1].split(":")[0] not in {"0", "root"} for i in users)
    first_run = min(i for i, (instr, _) in enumerate(steps) if instr == "RUN")
    assert users[0] < first_run  # nothing runs as root
    copies = [args for instr, args in steps if instr == "COPY"]
    assert copies and all(args.startswith("--chown=1000:100 ") for args in copies)


def test_paths_named_by_the_manifests_exist_in_the_repo_and_image() -> None:
    steps = dockerfile_instructions()
    copied = []
    for instr, args in steps:
        if instr == "COPY":
            *sources, _dest = args.split()[1:]  # drop --chown
            copied += sources
    for source in copied:
        assert (REPO / source).exists(), source
    prefix = app_dir() + "/"
    assert prefix == "/home/ray/sempart/"

    for name, argv in entrypoints():
        assert argv[0] == "python", name
        paths = [a for a in argv if a.startswith(prefix)]
        assert len(paths) == 2, name  # the job script and its --config
        for path in paths:
            rel = path.removeprefix(prefix)
            assert (REPO / rel).is_file(), path
            assert any(rel == src or rel.startswith(src.rstrip("/") + "/") for src in copied), f"{rel} not in the image"

    for resource in kustomization()["resources"]:
        assert (KUBERAY / resource).is_file(), resource
    named = set(re.findall(r"(?<![\w/.])((?:jobs|infra|tests)/[\w./-]+\.(?:py|yaml|sh|md))", DOCS.read_text()))
    assert len(named) >= 8
    for rel in named:
        assert (REPO / rel).is_file(), f"docs/cluster.md names {rel}"


def command_options(command: str) -> set[str]:
    params = typer.main.get_command(app).commands[command].params
    return {opt for p in params for opt in (*p.opts, *p.secondary_opts)}


def test_entrypoint_flags_and_configs_are_the_jobs_own() -> None:
    jobs = dict(entrypoints())
    assert set(jobs) == {"sempart-train", "sempart-label"}
    for name, argv in jobs.items():
        command = {"train_job.py": "train", "label_job.py": "label"}[Path(argv[1]).name]
        flags = {a for a in argv if a.startswith("--")}
        assert flags <= command_options(command) | {"--config"}, name
        config = REPO / argv[argv.index("--config") + 1].removeprefix(app_dir() + "/")
        if command == "train":
            assert load_config(config).backbone.name  # a SEMPART config file
        else:
            options = {p.name for p in typer.main.get_command(app).commands["label"].params}
            assert {str(k).replace("-", "_") for k in yaml.safe_load(config.read_text())} <= options


def test_bucket_paths_come_from_the_configmap() -> None:
    maps = configmap_literals()
    assert kustomization()["generatorOptions"]["disableNameSuffixHash"] is True  # names referred to as is
    for job in kube("RayJob"):
        variables = set(re.findall(r"\$\{?(\w+)", job["spec"]["entrypoint"]))
        assert variables, job["metadata"]["name"]
        (submitter,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
        refs = [e["configMapRef"]["name"] for e in submitter["envFrom"] if "configMapRef" in e]
        # The submitter's shell expands the variables: its env must hold every one.
        assert variables <= {key for ref in refs for key in maps[ref]}
    for doc in kube("RayCluster") + kube("RayJob"):
        for c in containers(doc):
            for e in c.get("envFrom", []):
                assert e.get("configMapRef", {}).get("name", "sempart-params") in maps
                assert e.get("secretRef", {}).get("name", "sempart-s3") == "sempart-s3"


def closed(node):
    """The schema with `additionalProperties: false` wherever properties are listed and
    nothing says otherwise: unknown (e.g. misspelled) fields become errors."""
    if isinstance(node, list):
        return [closed(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: closed(v) for k, v in node.items()}
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads(CRD_SCHEMA.read_text())
    return jsonschema.Draft202012Validator(closed({**schema[kind], "$defs": schema["$defs"]}))


def schema_errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(doc["kind"]).iter_errors(doc)]


def test_kuberay_manifests_match_the_crd_schema() -> None:
    source = json.loads(CRD_SCHEMA.read_text())["_source"]
    assert source["repository"].endswith("ray-project/kuberay") and len(source["commit"]) == 40
    docs = kube("RayCluster") + kube("RayJob")
    assert sorted(d["kind"] for d in docs) == ["RayCluster", "RayJob", "RayJob"]
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1"
        assert schema_errors(doc) == [], doc["metadata"]["name"]


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"].update(workerGroupSpec=d["spec"].pop("workerGroupSpecs")),  # misspelled field
    lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always"),
    lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),  # must be a string
    lambda d: d["spec"].update(enableInTreeAutoscaling="yes"),
    lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas="1"),
])
def test_schema_check_rejects_wrong_fields(mutate) -> None:
    (cluster,) = kube("RayCluster")
    broken = copy.deepcopy(cluster)
    mutate(broken)
    assert schema_errors(broken)


def test_kuberay_rules_the_schema_cannot_express() -> None:
    """Checks from KubeRay's validation.go and Kubernetes that a schema does not encode."""
    dns1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
    (cluster,) = kube("RayCluster")
    spec = cluster["spec"]
    assert dns1035.fullmatch(cluster["metadata"]["name"]) and len(cluster["metadata"]["name"]) <= 53
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        params = group.get("rayStartParams", {})
        assert not ({"num-cpus", "num-gpus", "memory", "resources"} & set(params) and group.get("resources"))
        worker = group["template"]["spec"]["containers"][0]
        limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
        if "nvidia.com/gpu" in limits:
            gpu_groups += 1
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
    assert gpu_groups >= 1
    assert "nvidia.com/gpu" not in str(spec["headGroupSpec"])  # a CPU head

    for job in kube("RayJob"):
        name = job["metadata"]["name"]
        assert dns1035.fullmatch(name) and len(name) <= 47
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        assert not {"backoffLimit", "shutdownAfterJobFinishes", "rayClusterSpec"} & set(job["spec"])
        assert job["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"  # submitter pod expands $VARS
        assert job["spec"]["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    for doc in kube("RayCluster") + kube("RayJob"):
        for c in containers(doc):
            assert c["securityContext"]["runAsNonRoot"] is True, c["name"]


def test_credentials_only_come_from_secrets() -> None:
    docs = [d for p in sorted(INFRA.rglob("*.yaml")) for d in load_docs(p)]
    assert not [d for d in docs if d.get("kind") == "Secret"]
    for doc in docs:
        for node in walk(doc):
            for entry in node.get("env", []) if isinstance(node.get("env"), list) else []:
                if entry.get("name") in CREDENTIALS:
                    assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], entry["name"]
        spec = doc.get("spec")
        if isinstance(spec, dict) and "runtimeEnvYAML" in spec:  # job metadata, shown on the dashboard
            assert CREDENTIALS.isdisjoint((yaml.safe_load(spec["runtimeEnvYAML"]) or {}).get("env_vars", {}))
    assert all(CREDENTIALS.isdisjoint(literals) for literals in configmap_literals().values())
    for doc in kube("RayCluster"):  # the Ray pods read S3: their keys come from the Secret
        for c in containers(doc):
            assert {"secretRef": {"name": "sempart-s3"}} in c["envFrom"], c["name"]


KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
ASSIGNED = re.compile(r"(?i)\baws_(?:secret_access_key|access_key_id|session_token)\b\s*[:=]\s*[\"']?([^\s\"',}]*)")


def credential_findings(text: str, allowed: frozenset[str] = frozenset()) -> list[str]:
    """Literal AWS key ids, and credential variables given a value that is not a
    variable reference ($X) or one of `allowed`."""
    found = KEY_ID.findall(text)
    for match in ASSIGNED.finditer(text):
        value = match.group(1)
        if value and not value.startswith("$") and value not in allowed:
            found.append(match.group(0))
    return found


def test_no_credentials_written_in_any_file() -> None:
    files = [p for p in INFRA.rglob("*") if p.is_file()] + [p for p in (REPO / "jobs").rglob("*") if p.is_file()]
    files += [DOCS, REPO / ".dockerignore"]
    assert len(files) >= 12
    for path in files:
        # moto's fake keys, printed by the local S3 script, are the only literal allowed.
        allowed = frozenset({"testing"}) if INFRA / "local" in path.parents else frozenset()
        assert credential_findings(path.read_text(errors="replace"), allowed) == [], path


def test_credential_scan_finds_planted_keys() -> None:
    assert credential_findings("key: AKIAIOSFODNN7EXAMPLE")
    assert credential_findings("- name: AWS_SECRET_ACCESS_KEY\n  value: x") == []  # YAML env: see the test above
    assert credential_findings("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY")
    assert credential_findings('aws_access_key_id: "abc123"')
    assert credential_findings("export AWS_SECRET_ACCESS_KEY=testing")
    assert credential_findings("export AWS_SECRET_ACCESS_KEY=testing", frozenset({"testing"})) == []
    assert credential_findings('--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"') == []


def test_aws_cluster_config_passes_ray_up_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = load_docs(AWS)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before touching AWS
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_1x"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers and all(re.match(r"(g|p)\d", t["node_config"]["InstanceType"]) for t in workers.values())
    assert all(0 <= t["min_workers"] <= t["max_workers"] for t in workers.values())
    assert config["setup_commands"] == config["head_setup_commands"] == config["worker_setup_commands"] == []
    assert not [n for n in walk(config) if "IamInstanceProfile" in n]  # a comment shows it; no fake ARN


def glob_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over a/b/c paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        regex = glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


def test_dockerignore_sends_only_what_the_image_installs() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    for path in [".venv/bin/python", ".git/HEAD", "demo-work/labels/part-1.parquet", "tests/data/duts-te/x.jpg",
                 "pipeline/__pycache__/cli.cpython-311.pyc", "sempart_core/__pycache__/model.cpython-311.pyc",
                 "docs/gallery.jpg", "sempart.egg-info/PKG-INFO", "benchmarks/latency.py", "infra/docker/Dockerfile",
                 ".pytest_cache/v/cache/lastfailed"]:
        assert dockerignored(path, patterns), path
    sent = [p.relative_to(REPO).as_posix() for src in ("sempart_core", "pipeline", "jobs")
            for p in (REPO / src).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert "pipeline/cli.py" in sent and "jobs/configs/label.yaml" in sent
    for path in ["pyproject.toml", "README.md", *sent]:
        assert not dockerignored(path, patterns), path
