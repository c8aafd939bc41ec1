"""VQGAN training through real Ray Train (2 workers), the MLflow server and its registry.

A Ray Train worker SIGKILLed mid-run (FailureConfig replaces it and the run resumes from its
checkpoint) is tested once for the shared scaffolding, in ``tests/stages/test_train_gpt.py``; here
the resume after the whole driver is killed covers the VQGAN state (weights, both optimizers, EMA).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from infra import model_store, stage, storage
from stages import train_vqgan
from tests import images


@pytest.fixture(scope="module")
def image_shards(stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    res = images.ingested_noise(root, 48, 20, "L", "test-train", resolution=32, channels=1, val_fraction=0.25)
    return res.output_uri


def test_two_workers_train_checkpoint_register(image_shards, tmp_path, mlflow_client):
    cfg = train_vqgan.TrainVQGANConfig(
        images_uri=image_shards,
        output_uri=str(tmp_path / "vq"),
        steps=12,
        batch_size=8,
        warmup_steps=2,
        checkpoint_every=5,
        log_every=2,
        image_every=6,
        val_every=6,
        num_workers=2,
        register_name="test-vqgan",
        disc_start=8,
        dead_code_threshold=0.5,
    )
    res = train_vqgan.run(cfg, "test-train")
    manifest = res.manifest
    assert not res.cached and res.counts["steps"] == 12
    assert 0 <= res.figures["val/codebook_usage"] <= 1 and res.figures["val/psnr"] > 0
    run = mlflow_client.get_run(manifest.mlflow_run_id)
    history = mlflow_client.get_metric_history(run.info.run_id, "train/rec_loss")
    assert [m.step for m in history] == [2, 4, 6, 8, 10, 12]
    assert "train/disc_loss" in run.data.metrics and "train/codebook_usage" in run.data.metrics
    val = mlflow_client.get_metric_history(run.info.run_id, "val/psnr")
    assert sorted(m.step for m in val) == [6, 12]  # every val_every steps, and at the end
    arts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "reconstructions")}
    assert arts == {"reconstructions/step_0000006.png", "reconstructions/step_0000012.png"}
    # registered: later stages read models:/test-vqgan@candidate
    loaded = model_store.load_first_stage("models:/test-vqgan@candidate")
    assert loaded.model.config.in_channels == 1
    native = storage.read_bytes(manifest.data_uris()[0])
    assert storage.sha256(native) == manifest.files[0].sha256
    with torch.no_grad():
        assert loaded.model.encode(torch.zeros(1, 1, 32, 32))[2].shape == (1, 8, 8)
    # resubmitting the finished run is a no-op
    again = train_vqgan.run(dataclasses.replace(cfg, num_workers=1), "test-train")
    assert again.cached and again.manifest.mlflow_run_id == manifest.mlflow_run_id
    assert res.model_uri == f"models:/test-vqgan/{manifest.registered['version']}"
    # too little training data for the batch: refused before any work
    with pytest.raises(stage.InputError, match="fewer than train_vqgan.batch_size=64"):
        train_vqgan.run(
            dataclasses.replace(cfg, batch_size=64, output_uri=str(tmp_path / "big")), "test-train"
        )
    assert not (tmp_path / "big").exists()
