"""VQGAN training through real Ray Train (2 workers), the MLflow server and its registry, and the
stage resumed after its driver was SIGKILLed mid-run (from the newest checkpoint: weights, both
optimizers, the EMA, the data position). A Ray Train worker lost mid-run is tested for the shared
scaffolding in ``tests/infra/test_ray_train.py`` and on a lost node in the two-node test.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from infra import config, model_store, stage, storage
from infra.devices import Resources
from models.vqgan_training import VQGANRecipe
from stages import train_vqgan
from tests import images
from tests.killing import kill_stage_when


@pytest.fixture(scope="module")
def image_shards(stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    res = images.ingested_noise(root, 48, 20, "L", "test-train", resolution=32, channels=1, val_fraction=0.25)
    return res.output_uri


def test_two_workers_train_killed_resumed_register(image_shards, tmp_path, mlflow_client):
    """The driver is SIGKILLed once two checkpoints are written; the same config again resumes from
    the newest (the weights, both optimizers, the EMA and the data position), trains the rest of
    the budget (the MLflow run records the resume and logs only the later steps), validates,
    commits and registers."""
    cfg = train_vqgan.TrainVQGANConfig(
        images_uri=image_shards,
        output_uri=str(tmp_path / "vq"),
        steps=12,
        batch_size=8,
        recipe=VQGANRecipe(warmup_steps=2, disc_start=8, ema_decay=0.9),
        checkpoint_every=4,
        log_every=2,
        image_every=6,
        val_every=6,
        resources=Resources(workers=2),
        register_name="test-vqgan",
        dead_code_threshold=0.5,
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"run": {"experiment": "test-train"}, "train_vqgan": config.to_dict(cfg)}))
    checkpoints = ".attempts/*/ray/*/checkpoint_*/state.pt"
    kill_stage_when("stages.train_vqgan", path, tmp_path / "vq", checkpoints, count=2)
    res = train_vqgan.run(cfg, "test-train")
    manifest = res.manifest
    assert not res.cached and res.counts["steps"] == 12
    assert 0 <= res.figures["val/codebook_usage"] <= 1 and res.figures["val/psnr"] > 0
    run = mlflow_client.get_run(manifest.mlflow_run_id)
    resumed = mlflow_client.get_metric_history(run.info.run_id, "train/resumed_from_step")
    assert [m.value for m in resumed] in ([4], [8]), resumed  # the newest complete checkpoint
    start = int(resumed[0].value)
    history = mlflow_client.get_metric_history(run.info.run_id, "train/rec_loss")
    assert [m.step for m in history] == [s for s in (2, 4, 6, 8, 10, 12) if s > start]  # nothing redone
    assert "train/disc_loss" in run.data.metrics and "train/codebook_usage" in run.data.metrics
    val = mlflow_client.get_metric_history(run.info.run_id, "val/psnr")
    assert sorted(m.step for m in val) == [s for s in (6, 12) if s > start]  # every val_every, and the end
    arts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "reconstructions")}
    assert arts == {f"reconstructions/step_{s:07d}.png" for s in (6, 12) if s > start}
    # registered: later stages read models:/test-vqgan@candidate
    loaded = model_store.load_first_stage("models:/test-vqgan@candidate")
    assert loaded.model.config.in_channels == 1
    native = storage.read_bytes(manifest.data_uris()[0])
    assert storage.sha256(native) == manifest.files[0].sha256
    with torch.no_grad():
        assert loaded.model.encode(torch.zeros(1, 1, 32, 32))[2].shape == (1, 8, 8)
    # resubmitting the finished run is a no-op
    again = train_vqgan.run(dataclasses.replace(cfg, resources=Resources(workers=1)), "test-train")
    assert again.cached and again.manifest.mlflow_run_id == manifest.mlflow_run_id
    assert res.model_uri == f"models:/test-vqgan/{manifest.registered['version']}"
    # too little training data for the batch: refused before any work
    with pytest.raises(stage.InputError, match="train_vqgan.batch_size=64 is split over 2 workers"):
        train_vqgan.run(
            dataclasses.replace(cfg, batch_size=64, output_uri=str(tmp_path / "big")), "test-train"
        )
    assert not (tmp_path / "big").exists()
