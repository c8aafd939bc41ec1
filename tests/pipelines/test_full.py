"""pipelines/full.py as a plain command and as a Ray job, with MLflow parent/child runs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from infra import code_shards, stage
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
    assert parent.data.metrics["ingest/written"] == 12  # the headline figures on the parent too
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
    assert [(r["stage"], r["status"]) for r in again["stages"]] == [("ingest", "cached")]
    assert again["table"].splitlines()[0].split() == ["stage", "status", "seconds", "output", "figures"]
    table = mlflow_client.download_artifacts(again["mlflow_run_id"], "pipeline_summary.txt", str(tmp_path))
    assert "ingest" in Path(table).read_text() and "written=12" in Path(table).read_text()

    # --explain: the plan, nothing run (no new MLflow run, the manifest untouched)
    committed = stage.read_manifest(summary["ingest"]["output_uri"])
    runs_before = len(mlflow_client.search_runs([exp.experiment_id]))
    plan = full.main(["--config", str(cfg_path), "--explain"])["plan"]
    assert [(p["stage"], p["action"]) for p in plan] == [("ingest", "cached")]
    assert plan[0]["plan"] == f"13 of 13 images from {src} (folder) -> 1 shard, 8x8x3, 2 classes"
    changed = full.main(["--config", str(cfg_path), "--explain", "ingest.resolution=16"])["plan"]
    assert changed[0]["action"] == "stop" and changed[0]["why"] == ["config changed (resolution: 8 -> 16)"]
    assert len(mlflow_client.search_runs([exp.experiment_id])) == runs_before
    assert stage.read_manifest(summary["ingest"]["output_uri"]).identity == committed.identity
    # without replace_changed the run stops at the changed stage, with the reason and nothing overwritten
    with pytest.raises(SystemExit):
        full.main(["--config", str(cfg_path), "ingest.resolution=16"])
    assert stage.read_manifest(summary["ingest"]["output_uri"]).identity == committed.identity
    # with it the old manifest is set aside and the stage runs again
    replan = full.main(
        ["--config", str(cfg_path), "--explain", "ingest.resolution=16", "run.replace_changed=true"]
    )
    assert replan["plan"][0]["action"] == "rerun"
    redone = full.main(["--config", str(cfg_path), "ingest.resolution=16", "run.replace_changed=true"])
    assert redone["ingest"]["cached"] is False and redone["ingest"]["written"] == 12
    m = stage.read_manifest(summary["ingest"]["output_uri"])
    assert m.config["resolution"] == 16 and m.identity != committed.identity
    kept = list((tmp_path / "run" / "images" / "_replaced").glob("*.json"))
    assert [json.loads(k.read_text())["identity"] for k in kept] == [committed.identity]
    assert not (tmp_path / "run" / "images" / ".attempts").exists()  # attempts go at the commit
    assert sum(f.rows for f in m.files) == 12 == pq.read_table(tmp_path / "run" / "images").num_rows


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
            }
        )
    )
    summary = full.main(["--config", str(cfg_path)])
    t = summary["tokenize_images"]
    assert t["output_uri"] == str(tmp_path / "run" / "codes") and (t["images"], t["rows"]) == (8, 8)
    m = stage.read_manifest(t["output_uri"])
    assert m.inputs[0].uri == summary["ingest"]["output_uri"] and code_shards.describe(m).grid == (4, 4)
    # a changed ingest config: it and everything after it would run again
    # (the chain through train_gpt, sample and evaluate: tests/pipelines/test_cluster.py)
    plan = full.main(["--config", str(cfg_path), "--explain", "ingest.resolution=16"])["plan"]
    assert [(p["stage"], p["action"]) for p in plan] == [("ingest", "stop"), ("tokenize_images", "stop")]
    assert plan[0]["why"] == ["config changed (resolution: 8 -> 16)"]
    assert plan[1]["why"] == [f"input {summary['ingest']['output_uri']} is made again first"]
    assert plan[1]["plan"] == f"planned once {summary['ingest']['output_uri']} is made"
    # each stage's plan: what it reads and how much work, from the manifests and the model header
    plan = full.main(["--config", str(cfg_path), "--explain"])["plan"]
    files = len(stage.read_manifest(summary["ingest"]["output_uri"]).files)  # a file per split
    want = (
        f"8 images in {files} file{'s' if files > 1 else ''} from {summary['ingest']['output_uri']} x 1 views"
    )
    assert plan[1]["plan"].startswith(want), plan[1]["plan"]
    assert [
        p["action"] for p in full.explain(full.resolve(full.config_lib.load(full.FullConfig, cfg_path)))
    ] == [
        "cached",
        "cached",
    ]


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
