"""Write tests/data/kuberay_crd_v1.json: KubeRay's ray.io/v1 RayCluster and RayJob schemas.

    python tests/data/make_kuberay_schema.py KUBERAY_CHECKOUT [REF]

Reads `ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml` at REF (a tag
or commit of github.com/ray-project/kuberay) with `git show`, keeps the served `v1`
openAPIV3Schema of each, drops `description` texts and `status`, and stores the pod
template and RayCluster spec once under `$defs` (they repeat: head, workers, submitter,
RayJob's rayClusterSpec), so the file stays small enough to ship with the tests.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parent / "kuberay_crd_v1.json"
CRDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}


def crd_schema(repo: str, ref: str, plural: str) -> dict:
    path = f"ray-operator/config/crd/bases/ray.io_{plural}.yaml"
    text = subprocess.run(["git", "-C", repo, "show", f"{ref}:{path}"], check=True, capture_output=True, text=True).stdout
    crd = yaml.safe_load(text)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def without_descriptions(node):
    if isinstance(node, dict):
        return {k: without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [without_descriptions(v) for v in node]
    return node


def main(repo: str, ref: str = "v1.7.0") -> None:
    commit = subprocess.run(["git", "-C", repo, "rev-parse", f"{ref}^{{commit}}"], check=True, capture_output=True,
                            text=True).stdout.strip()
    cluster, job = (without_descriptions(crd_schema(repo, ref, CRDS[k])) for k in ("RayCluster", "RayJob"))
    for schema in (cluster, job):
        schema["properties"].pop("status", None)
    cluster_spec = cluster["properties"]["spec"]
    head_template = cluster_spec["properties"]["headGroupSpec"]["properties"]["template"]
    worker_template = cluster_spec["properties"]["workerGroupSpecs"]["items"]["properties"]["template"]
    job_spec = job["properties"]["spec"]["properties"]
    # The factoring below is only valid because these really are the same schema.
    assert head_template == worker_template == job_spec["submitterPodTemplate"]
    assert job_spec["rayClusterSpec"] == cluster_spec
    pod_template = head_template
    ref_pod = {"$ref": "#/$defs/PodTemplateSpec"}
    cluster_spec["properties"]["headGroupSpec"]["properties"]["template"] = ref_pod
    cluster_spec["properties"]["workerGroupSpecs"]["items"]["properties"]["template"] = ref_pod
    cluster["properties"]["spec"] = {"$ref": "#/$defs/RayClusterSpec"}
    job_spec["submitterPodTemplate"] = ref_pod
    job_spec["rayClusterSpec"] = {"$ref": "#/$defs/RayClusterSpec"}
    doc = {
        "_source": {
            "repository": "https://github.com/ray-project/kuberay",
            "ref": ref,
            "commit": commit,
            "files": [f"ray-operator/config/crd/bases/ray.io_{p}.yaml" for p in CRDS.values()],
            "made_by": "tests/data/make_kuberay_schema.py (descriptions and status removed, repeats moved to $defs)",
        },
        "$defs": {"PodTemplateSpec": pod_template, "RayClusterSpec": cluster_spec},
        "RayCluster": cluster,
        "RayJob": job,
    }
    OUT.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) from {ref} = {commit}")


if __name__ == "__main__":
    main(*sys.argv[1:])
