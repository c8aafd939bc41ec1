"""pipelines/full.py as a plain command and as a Ray job, with MLflow parent/child runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from infra import stage
from pipelines import full
from tests import images

ROOT = Path(__file__).resolve().parents[2]


def _source(tmp_path: Path, n: int = 6) -> Path:
    files = {
        f"{c}/{i}.png": images.encode(images.noise(20, 20, "RGB", i), "PNG") for i in range(n) for c in "ab"
    }
    files["a/broken.jpg"] = b"\xff\xd8\xff\xe0 not really"
    images.write_tree(tmp_path / "src", files)
    return tmp_path / "src"


def test_parent_and_child_runs_and_rerun(stack, tmp_path, mlflow_client):
    src = _source(tmp_path)
    cfg_path = tmp_path / "p.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "t1", "experiment": "test-pipeline", "root_uri": str(tmp_path / "run")},
                "ingest": {"source_uri": str(src), "resolution": 8},
            }
        )
    )
    summary = full.main(["--config", str(cfg_path)])
    assert summary["ingest"]["output_uri"] == str(tmp_path / "run" / "images")
    assert (summary["ingest"]["read"], summary["ingest"]["written"], summary["ingest"]["rejected"]) == (
        13,
        12,
        1,
    )

    parent = mlflow_client.get_run(summary["mlflow_run_id"])
    assert parent.data.tags["kind"] == "pipeline" and parent.data.tags["ingest.cached"] == "False"
    assert parent.data.params["ingest.resolution"] == "8"
    exp = mlflow_client.get_experiment_by_name("test-pipeline")
    children = mlflow_client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert [c.data.tags["stage"] for c in children] == ["ingest"]
    child = children[0]
    assert child.data.metrics["ingest/written"] == 12 and child.data.metrics["ingest/rejected"] == 1
    assert child.data.tags["input_uri.0"] == str(src)
    assert stage.read_manifest(summary["ingest"]["output_uri"]).mlflow_run_id == child.info.run_id

    again = full.main(["--config", str(cfg_path), "run.name=t2"])
    assert again["ingest"]["cached"] is True
    assert mlflow_client.get_run(again["mlflow_run_id"]).data.tags["ingest.cached"] == "True"
    children2 = mlflow_client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{again['mlflow_run_id']}'"
    )
    assert children2 == []  # nothing was redone


def test_ray_job_submit(stack, tmp_path):
    """The pipeline under `ray job submit --working-dir .` against a separate Ray head (as `make up`)."""
    from infra import services

    src = _source(tmp_path, n=3)
    env_for_head = {**stack["s3"].env(), **stack["mlflow"].env()}
    head = services.RayHead(tmp_path / "head", num_cpus=2).start(env=env_for_head)
    try:
        env = {**os.environ, **head.env()}
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            "pipelines/full.py",
            "--config",
            "pipelines/configs/demo.yaml",
            f"ingest.source_uri={src}",
            "ingest.source_format=auto",
            "ingest.channels=3",
            f"run.root_uri={tmp_path / 'job'}",
            "train_vqgan=null",  # the demo's training and tokenization are not what this test is about
            "tokenize_images=null",
            "train_gpt=null",
            "sample=null",
            "evaluate=null",
            "run.experiment=test-job",
        ]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        assert "succeeded" in out.stdout
    finally:
        head.stop()
    m = stage.read_manifest(str(tmp_path / "job" / "images"))
    assert (m.counts["written"], m.counts["rejected"]) == (6, 1)
    from mlflow.tracking import MlflowClient

    run = MlflowClient(stack["mlflow"].uri).get_run(m.mlflow_run_id)  # logged to the shared server
    assert run.data.metrics["ingest/written"] == 6
    json.dumps(m.to_json())


def test_pipeline_with_tokenize(stack, tmp_path):
    import torch

    from models import checkpoint
    from models.vqgan import VQGAN
    from tests.tiny import tiny_vqgan

    src = _source(tmp_path, n=4)
    torch.manual_seed(0)
    tok = VQGAN(tiny_vqgan(resolution=8, codebook_size=32))
    checkpoint.save_native(tok, tmp_path / "tok.safetensors")
    cfg_path = tmp_path / "p.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "tok", "experiment": "test-pipeline", "root_uri": str(tmp_path / "run")},
                "ingest": {"source_uri": str(src), "resolution": 8},
                "tokenize_images": {"tokenizer_uri": str(tmp_path / "tok.safetensors")},
                "train_gpt": {  # the transformer on those codes, chained by the pipeline
                    "condition": "unconditional",
                    "n_layer": 1,
                    "n_head": 1,
                    "n_embd": 16,
                    "steps": 3,
                    "batch_size": 2,
                    "warmup_steps": 1,
                    "num_workers": 1,
                    "cpus_per_worker": 0.5,
                    "sample_every": 3,
                    "samples_per_condition": 2,
                },
                "sample": {"num_samples": 3, "batch_size": 2},  # a generated dataset from it
                # and its evaluation against the ingested images (unlabelled samples: no classifier)
                "evaluate": {"reference_split": None, "classifier": False, "inception": "off"},
            }
        )
    )
    summary = full.main(["--config", str(cfg_path)])
    t = summary["tokenize_images"]
    assert t["output_uri"] == str(tmp_path / "run" / "codes") and (t["images"], t["rows"]) == (8, 8)
    m = stage.read_manifest(t["output_uri"])
    assert m.inputs[0].uri == summary["ingest"]["output_uri"] and m.extra["grid"] == [4, 4]
    g = summary["train_gpt"]
    assert (
        g["output_uri"] == str(tmp_path / "run" / "gpt") and g["steps"] == 3 and g["val/bits_per_token"] > 0
    )
    gm = stage.read_manifest(g["output_uri"])
    assert (
        gm.inputs[0].uri == t["output_uri"]
        and gm.extra["generator"]["tokenizer_sha256"] == m.extra["tokenizer_sha256"]
    )
    s = summary["sample"]
    assert s["output_uri"] == str(tmp_path / "run" / "samples") and s["samples"] == 3
    sm = stage.read_manifest(s["output_uri"])
    assert sm.extra["generator"]["training_run_id"] == gm.mlflow_run_id
    assert [i.uri for i in sm.inputs if i.name == "generator"] == [g["output_uri"]]
    e = summary["evaluate"]
    assert e["generated_images"] == 3 and 0 <= e["memorized_fraction"] <= 1
    em = stage.read_manifest(e["output_uri"])
    assert {i.name: i.uri for i in em.inputs if i.kind == "output"} == {
        "generated": s["output_uri"],
        "reference": summary["ingest"]["output_uri"],
    }


def test_pipeline_with_depth(stack, tmp_path):
    import torch

    from models.midas import MidasSmall

    src = _source(tmp_path, n=2)
    torch.save(MidasSmall().state_dict(), tmp_path / "midas.pt")
    cfg_path = tmp_path / "p.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "dep", "experiment": "test-pipeline", "root_uri": str(tmp_path / "run")},
                "ingest": {"source_uri": str(src), "resolution": 32},
                "depth": {"weights_uri": str(tmp_path / "midas.pt")},
            }
        )
    )
    summary = full.main(["--config", str(cfg_path)])
    assert summary["depth"]["output_uri"] == str(tmp_path / "run" / "depth")
    assert (summary["depth"]["written"], summary["depth"]["rejected"]) == (4, 0)
    inputs = stage.read_manifest(summary["depth"]["output_uri"]).inputs
    assert [(i.name, i.uri) for i in inputs if i.kind == "output"] == [
        ("images", summary["ingest"]["output_uri"])
    ]
    assert [i.name for i in inputs if i.kind == "weights"] == ["weights"]  # the MiDaS file, by its sha256
