"""infra/k8s/: the KubeRay manifests and the image agree with the pipeline they run (no cluster here:
the fields the pipeline depends on, checked against the code)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from infra import cluster
from infra import config as config_lib
from pipelines import full

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"


def _docs() -> dict[str, dict]:
    docs = {}
    for f in sorted(K8S.glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            docs[d["kind"]] = d
    return docs


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _home() -> str:
    return re.search(r"TAMING_HOME=(\S+)", (K8S / "Dockerfile").read_text()).group(1)


def test_manifests_fit_the_pipeline():
    docs = _docs()
    assert set(docs) == {"RayCluster", "RayJob", "Secret"}
    rc, job, secret = docs["RayCluster"], docs["RayJob"], docs["Secret"]
    assert rc["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]

    # one Ray version: the cluster's, the image's base and the pin the code was measured with
    pin = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert rc["spec"]["rayVersion"] == pin
    assert f"rayproject/ray:{pin}-" in (K8S / "Dockerfile").read_text()

    head = rc["spec"]["headGroupSpec"]
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    pods = [head["template"], *(g["template"] for g in groups.values()), job["spec"]["submitterPodTemplate"]]
    containers = [c for p in pods for c in _containers(p)]
    assert len({c["image"] for c in containers}) == 1  # one image everywhere
    for c in containers:  # MLflow / S3 settings from the Secret in every pod
        assert {"secretRef": {"name": secret["metadata"]["name"]}} in c["envFrom"]
    keys = set(secret["stringData"])
    assert {"MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= keys
    # credentials reach the workers from the Secret, never through the job's runtime_env (which Ray
    # writes into its logs): the driver forwards none of them
    assert not {k for k in cluster.FORWARD_ENV if "SECRET" in k or "KEY" in k or "TOKEN" in k}

    # the driver needs no CPU of its own for work, no GPU: the head takes none
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in str(head)
    gpu = groups["gpu"]
    gpu_limit = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["rayStartParams"]["num-gpus"] == gpu_limit["nvidia.com/gpu"] == "1"
    cpu_per_pod = {
        n: float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        for n, g in groups.items()
    }

    # the entrypoint: the image's copy of pipelines/full.py, a config that loads, S3 for everything
    argv = shlex.split(job["spec"]["entrypoint"])
    home = _home()
    assert argv[:1] == ["python"] and argv[1] == f"{home}/pipelines/full.py" and argv[2] == "--config"
    config_path = ROOT / Path(argv[3]).relative_to(home)
    assert config_path.exists()
    cfg = full.resolve(config_lib.load(full.FullConfig, config_path, argv[4:]))
    stages = [(n, getattr(cfg, n)) for n, _ in full.STAGES if getattr(cfg, n) is not None]
    assert [n for n, _ in stages] == [
        "ingest", "train_vqgan", "tokenize_images", "train_gpt", "sample", "evaluate",
    ]  # fmt: skip
    assert cfg.run.root_uri.startswith("s3://") and cfg.ingest.source_uri.startswith("s3://")
    for name, s in stages:
        assert s.output_uri.startswith("s3://"), name
        # what each stage asks for fits on one pod of a worker group
        assert s.resources.gpus_per_worker <= float(gpu_limit["nvidia.com/gpu"]), name
        assert s.resources.cpus_per_worker <= max(cpu_per_pod.values()), name
    assert cfg.train_gpt.resources.use_gpu and cfg.sample.resources.gpus_per_worker == 1


def test_image_holds_the_code_it_runs():
    text = (K8S / "Dockerfile").read_text()
    assert "-c constraints.txt" in text  # the same pins as here
    for pkg in ("infra", "stages", "models", "pipelines"):
        assert re.search(rf"^COPY .*\b{pkg} ", text, re.M), pkg
    home = _home()
    assert re.search(r"^ENV PYTHONPATH=\$\{TAMING_HOME\}$", text, re.M) and home.startswith("/")
    assert re.search(r"^ENV TAMING_LOCAL_DIR=/tmp/", text, re.M)  # logs and caches in scratch space
