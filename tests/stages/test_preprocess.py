"""Depth and segmentation stages on random-weight official-format models, through real Ray + MLflow."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from infra import image_shards, schemas, stage
from infra.devices import Resources
from infra.imaging import pngs_to_array
from models.deeplab import DeepLabMSC, segment
from models.midas import MidasSmall, predict_depth
from models.vqgan_training import VQGANRecipe
from stages import depth, segmentation
from tests import images
from tests.killing import kill_stage_when


@pytest.fixture(scope="module")
def shards(stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    # val_fraction 0: image ids hash the (temporary) path, so no held-out split, deterministically
    res = images.ingested_noise(
        root, 6, 40, "RGB", "test-pre", classes="x", resolution=32, rows_per_shard=4, val_fraction=0.0
    )
    torch.manual_seed(0)
    midas = MidasSmall().eval()
    torch.save(midas.state_dict(), root / "midas_v21_small_256.pt")  # the official file format
    deeplab = DeepLabMSC().eval()
    torch.save(deeplab.state_dict(), root / "deeplab.pth")
    return {"root": root, "images": res.output_uri, "midas": midas, "deeplab": deeplab}


def _inputs(uri: str) -> tuple[list[str], torch.Tensor]:
    t = stage.read_committed_table(uri).sort_by("image_id")
    return t["image_id"].to_pylist(), torch.from_numpy(pngs_to_array(schemas.image_bytes(t["image"]), 3))


def test_depth_stage(shards, tmp_path, s3_bucket):
    import s3fs

    s3fs.S3FileSystem().put(str(shards["root"] / "midas_v21_small_256.pt"), f"{s3_bucket}/w/midas.pt")
    cfg = depth.DepthConfig(
        images_uri=shards["images"],
        output_uri=f"{s3_bucket}/depth",
        weights_uri=f"{s3_bucket}/w/midas.pt",
        batch_size=4,
    )
    res = depth.run(cfg, "test-pre")
    manifest = res.manifest
    assert not res.cached and res.counts == {
        "read": 6,
        "written": 6,
        "rejected": 0,
        "shards": 2,
        "reused_shards": 0,
    }
    t = stage.read_committed_table(manifest.output_uri, verify=True).sort_by("image_id")
    assert {"image", "label", "split", "depth", "depth_min", "depth_max"} <= set(t.column_names)
    ids, x = _inputs(shards["images"])
    assert t["image_id"].to_pylist() == ids
    maps = depth.decode_f16(t["depth"], 32, 32).astype(np.float32)
    assert maps.min() >= -1.0 and maps.max() <= 1.0
    with torch.no_grad():
        raw = predict_depth(shards["midas"], x).numpy()
    lo, hi = raw.min(axis=(1, 2)), raw.max(axis=(1, 2))
    np.testing.assert_allclose(t["depth_min"].to_numpy(), lo, rtol=1e-5, atol=1e-6)
    expect = 2 * (raw - lo[:, None, None]) / np.maximum(hi - lo, 1e-8)[:, None, None] - 1
    np.testing.assert_allclose(maps, expect, atol=2e-3)  # float16 storage
    assert depth.run(cfg, "test-pre").cached  # rerun: a no-op
    with pytest.raises(stage.OutputConflictError):  # other weights at the same output: refused
        torch.manual_seed(1)
        torch.save(MidasSmall().state_dict(), tmp_path / "other.pt")
        depth.run(dataclasses.replace(cfg, weights_uri=str(tmp_path / "other.pt")), "test-pre")


def test_depth_missing_weights_is_clear(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match="midas_v21_small_256.pt"):
        depth.run(depth.DepthConfig(images_uri=shards["images"], output_uri=str(tmp_path / "d")), "test-pre")
    assert not (tmp_path / "d").exists()


def test_segmentation_stage(shards, tmp_path):
    cfg = segmentation.SegmentationConfig(
        images_uri=shards["images"],
        output_uri=str(tmp_path / "seg"),
        weights_uri=str(shards["root"] / "deeplab.pth"),
        batch_size=3,
    )
    manifest = segmentation.run(cfg, "test-pre").manifest
    labels_of = image_shards.describe(manifest).annotations["segmentation"].labels
    assert manifest.counts["written"] == 6 and len(labels_of) == 182
    t = stage.read_committed_table(manifest.output_uri).sort_by("image_id")
    ids, x = _inputs(shards["images"])
    labels, _ = segment(shards["deeplab"], x)
    got = np.stack([np.frombuffer(b, dtype=np.uint8).reshape(32, 32) for b in t["segmentation"].to_pylist()])
    assert (got == labels.numpy()).mean() > 0.999


@pytest.fixture(scope="module")
def annotated(shards, tmp_path_factory):
    """Image shards with `depth` and `segmentation` columns (depth stage, then segmentation on it)."""
    root = tmp_path_factory.mktemp("annotated")
    d = depth.run(
        depth.DepthConfig(
            images_uri=shards["images"],
            output_uri=str(root / "depth"),
            weights_uri=str(shards["root"] / "midas_v21_small_256.pt"),
        ),
        "test-pre",
    )
    s = segmentation.run(
        segmentation.SegmentationConfig(
            images_uri=d.output_uri,
            output_uri=str(root / "seg"),
            weights_uri=str(shards["root"] / "deeplab.pth"),
        ),
        "test-pre",
    )
    return s.output_uri


def test_tokenize_with_depth_and_segmentation_codes(shards, annotated, tmp_path):
    """Depth and segmentation columns become depth_codes / segmentation_codes with their own VQGANs."""
    from models import checkpoint
    from models.vqgan import VQGAN
    from stages import tokenize_images
    from tests.tiny import tiny_vqgan

    torch.manual_seed(0)
    paths = {}
    for name, cin in (("img", 3), ("depth", 1), ("seg", 182)):
        paths[name] = tmp_path / f"{name}.safetensors"
        vq = VQGAN(tiny_vqgan(in_channels=cin, out_channels=cin, resolution=32))
        vq.quantize.embedding.weight.data.normal_()  # well-separated codes: no near-ties between batchings
        checkpoint.save_native(vq, paths[name])
    cfg = tokenize_images.TokenizeConfig(
        tokenizer_uri=str(paths["img"]),
        images_uri=annotated,
        output_uri=str(tmp_path / "codes"),
        hflip=True,
        depth_tokenizer_uri=str(paths["depth"]),
        segmentation_tokenizer_uri=str(paths["seg"]),
    )
    res = tokenize_images.run(cfg, "test-pre")
    t = stage.read_committed_table(res.output_uri).sort_by(
        [("image_id", "ascending"), ("aug_id", "ascending")]
    )
    assert res.counts["rows"] == 12 and {"depth_codes", "segmentation_codes"} <= set(t.column_names)
    src = stage.read_committed_table(annotated).sort_by("image_id")
    dmodel, _ = checkpoint.load_native(paths["depth"])
    dmaps = torch.from_numpy(depth.decode_f16(src["depth"], 32, 32).astype(np.float32))[:, None]
    with torch.no_grad():
        want = dmodel.eval().encode(dmaps)[2].reshape(6, -1)
        want_flip = dmodel.encode(dmaps.flip(-1))[2].reshape(6, -1)
    from infra import schemas

    got = torch.from_numpy(schemas.decode_codes(t["depth_codes"], want.shape[1]))
    assert torch.equal(got[0::2], want) and torch.equal(got[1::2], want_flip)  # the same views as the image
    with pytest.raises(stage.InputError, match="no `depth` column"):
        tokenize_images.run(
            dataclasses.replace(cfg, images_uri=shards["images"], output_uri=str(tmp_path / "x"))
        )


def test_segmentation_with_torchvision_deeplabv3(shards, tmp_path):
    from models.deeplab import segment_v3, torchvision_deeplabv3

    torch.manual_seed(0)
    model = torchvision_deeplabv3()
    torch.save(model.state_dict(), tmp_path / "deeplabv3_resnet101_coco-586e9e4e.pth")
    cfg = segmentation.SegmentationConfig(
        images_uri=shards["images"],
        output_uri=str(tmp_path / "seg3"),
        model="torchvision_deeplabv3_voc",
        v3_resize=64,
        weights_uri=str(tmp_path / "deeplabv3_resnet101_coco-586e9e4e.pth"),
    )
    manifest = segmentation.run(cfg, "test-pre").manifest
    described = image_shards.describe(manifest).annotations["segmentation"]
    assert described.labels[0] == "__background__" and manifest.counts["written"] == 6
    t = stage.read_committed_table(manifest.output_uri).sort_by("image_id")
    _, x = _inputs(shards["images"])
    labels, _ = segment_v3(model, x, 64)
    got = np.stack([np.frombuffer(b, dtype=np.uint8).reshape(32, 32) for b in t["segmentation"].to_pylist()])
    assert (got == labels.numpy()).mean() > 0.999


def test_depth_killed_and_resumed(shards, tmp_path):
    """The shared shard-map contract: a killed depth run resumes with the finished shards kept."""

    import yaml

    imgs = images.ingested_noise(
        tmp_path, 24, 64, "RGB", "test-pre", classes="x", resolution=64, rows_per_shard=4
    )
    out = tmp_path / "depth"
    weights = str(shards["root"] / "midas_v21_small_256.pt")
    (tmp_path / "cfg.yaml").write_text(
        yaml.safe_dump(
            {
                "run": {"experiment": "test-pre"},
                "depth": {"images_uri": imgs.output_uri, "output_uri": str(out), "weights_uri": weights},
            }
        )
    )
    kill_stage_when("stages.depth", tmp_path / "cfg.yaml", out, ".attempts/*/_shards/part-*.json")
    manifest = depth.run(
        depth.DepthConfig(images_uri=imgs.output_uri, output_uri=str(out), weights_uri=weights), "test-pre"
    ).manifest
    assert manifest.counts["reused_shards"] >= 1 and manifest.counts["written"] == 24
    t = stage.read_committed_table(str(out), verify=True)
    assert len(set(t["image_id"].to_pylist())) == 24


def test_train_condition_tokenizers_and_tokenize_with_them(annotated, tmp_path, mlflow_client):
    """taming's condition stages, trained by train_vqgan from the preprocessing columns: a 1-channel
    depth VQGAN and a one-hot segmentation VQGAN (BCE); registered, then used by tokenization."""
    from stages import tokenize_images, train_vqgan

    common = dict(
        images_uri=annotated,
        steps=4,
        batch_size=2,
        recipe=VQGANRecipe(warmup_steps=1),
        log_every=1,
        image_every=4,
        checkpoint_every=4,
        resources=Resources(workers=1),
        codebook_size=32,
    )
    dm = train_vqgan.run(
        train_vqgan.TrainVQGANConfig(
            input="depth", output_uri=str(tmp_path / "dvq"), register_name="test-depth-vq", **common
        ),
        "test-pre",
    )
    sm = train_vqgan.run(
        train_vqgan.TrainVQGANConfig(
            input="segmentation", output_uri=str(tmp_path / "svq"), register_name="test-seg-vq", **common
        ),
        "test-pre",
    )
    assert dm.manifest.extra["model_config"]["in_channels"] == 1 and "val/psnr" in dm.figures
    assert sm.manifest.extra["model_config"]["in_channels"] == 182  # the segmentation stage's label count
    assert 0 <= sm.figures["val/pixel_accuracy"] <= 1 and "val/psnr" not in sm.figures
    seg_run = mlflow_client.get_run(sm.manifest.mlflow_run_id)
    assert "train/bce_loss" in seg_run.data.metrics and "train/disc_loss" not in seg_run.data.metrics
    assert seg_run.data.tags["objective"] == "bce+codebook"
    assert seg_run.data.tags["val/split"] == "train"  # these shards have no held-out split
    arts = {a.path for a in mlflow_client.list_artifacts(sm.manifest.mlflow_run_id, "reconstructions")}
    assert arts == {"reconstructions/step_0000004.png"}
    assert "val/lpips" in mlflow_client.get_run(dm.manifest.mlflow_run_id).data.tags  # says why it is missing
    from models import checkpoint
    from models.vqgan import PRESETS, VQGAN

    rgb = dataclasses.replace(PRESETS["f4-small"], in_channels=3, out_channels=3)
    checkpoint.save_native(VQGAN(rgb), tmp_path / "rgb.safetensors")  # any image tokenizer will do
    res = tokenize_images.run(
        tokenize_images.TokenizeConfig(
            tokenizer_uri=str(tmp_path / "rgb.safetensors"),
            images_uri=annotated,
            output_uri=str(tmp_path / "codes"),
            depth_tokenizer_uri="models:/test-depth-vq@candidate",
            segmentation_tokenizer_uri="models:/test-seg-vq@candidate",
        ),
        "test-pre",
    )
    t = stage.read_committed_table(res.output_uri)
    assert res.counts["rows"] == 6 and {"depth_codes", "segmentation_codes"} <= set(t.column_names)
    with pytest.raises(stage.InputError, match="committed tokenize_images output, not image shards"):
        train_vqgan.run(
            train_vqgan.TrainVQGANConfig(
                input="segmentation",
                images_uri=str(tmp_path / "codes"),
                output_uri=str(tmp_path / "x"),
            )
        )


def test_edges_and_lowres_stages(shards, tmp_path):
    """The weight-free conditions: Canny edges and 4x4 block means, as PNG columns (the Image
    feature) that equal models.conditions on the input images; the parameters in the annotation
    and the identity; a factor that does not divide the image side fails before any work."""
    from datasets import load_dataset

    from models.conditions import canny, degrade, to_gray
    from stages import edges, lowres

    e_cfg = edges.EdgesConfig(images_uri=shards["images"], output_uri=str(tmp_path / "edges"), batch_size=4)
    e = edges.run(e_cfg, "test-pre")
    assert e.counts["written"] == 6 and e.counts["rejected"] == 0
    l_cfg = lowres.LowresConfig(images_uri=e.output_uri, output_uri=str(tmp_path / "low"), factor=4)
    low = lowres.run(l_cfg, "test-pre")
    t = stage.read_committed_table(low.output_uri, verify=True).sort_by("image_id")
    ids, x = _inputs(shards["images"])
    assert t["image_id"].to_pylist() == ids
    got_edges = pngs_to_array(schemas.image_bytes(t["edges"]), 1)
    want_edges = canny(to_gray(x.numpy()), 50.0, 150.0, 1.0)
    assert np.array_equal(np.rint((got_edges[:, 0] + 1) * 127.5).astype(np.uint8), want_edges)
    assert 0.02 < (want_edges > 0).mean() < 0.9  # noise has edges, not everywhere
    got_low = np.rint((pngs_to_array(schemas.image_bytes(t["lowres"]), 3) + 1) * 127.5).astype(np.uint8)
    u8 = np.rint((x.numpy() + 1) * 127.5).astype(np.uint8)
    assert np.array_equal(got_low, degrade(u8, 4))
    assert np.array_equal(got_low[:, :, ::4, ::4], got_low[:, :, 3::4, 3::4])  # one colour per block
    described = image_shards.describe(low.manifest).annotations
    assert described["edges"].params == {"low": 50.0, "high": 150.0, "sigma": 1.0}
    assert described["lowres"].params == {"factor": 4} and described["lowres"].weights_sha256 == ""
    ds = load_dataset("parquet", data_files=[low.output_uri + "/data/*.parquet"], split="train")
    assert ds.features["edges"].__class__.__name__ == "Image" and ds[0]["lowres"].size == (32, 32)
    assert edges.run(e_cfg, "test-pre").cached
    with pytest.raises(stage.OutputConflictError):  # other thresholds at the same output: refused
        edges.run(dataclasses.replace(e_cfg, low=10.0), "test-pre")
    with pytest.raises(stage.InputError, match="not a multiple"):
        lowres.run(dataclasses.replace(l_cfg, factor=5, output_uri=str(tmp_path / "x")), "test-pre")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="low < high"):
        edges.EdgesConfig(low=100.0, high=50.0)


def test_edges_and_lowres_condition_tokenizers(shards, tmp_path):
    """train_vqgan learns a 1-channel codebook for `edges` and an image-channel one for `lowres`;
    tokenize_images writes edges_codes / lowres_codes with them; the wrong channel count is refused."""
    from models import checkpoint
    from models.vqgan import VQGAN
    from stages import edges, lowres, tokenize_images, train_vqgan
    from tests.tiny import tiny_vqgan

    e = edges.run(edges.EdgesConfig(images_uri=shards["images"], output_uri=str(tmp_path / "e")), "test-pre")
    low = lowres.run(lowres.LowresConfig(images_uri=e.output_uri, output_uri=str(tmp_path / "l")), "test-pre")
    common = dict(
        images_uri=low.output_uri,
        steps=2,
        batch_size=2,
        recipe=VQGANRecipe(warmup_steps=1),
        log_every=1,
        image_every=2,
        checkpoint_every=2,
        resources=Resources(workers=1),
        codebook_size=16,
    )
    models = {
        name: train_vqgan.run(
            train_vqgan.TrainVQGANConfig(input=name, output_uri=str(tmp_path / f"{name}-vq"), **common),
            "test-pre",
        )
        for name in ("edges", "lowres")
    }
    assert models["edges"].manifest.extra["model_config"]["in_channels"] == 1
    assert models["lowres"].manifest.extra["model_config"]["in_channels"] == 3
    torch.manual_seed(0)
    checkpoint.save_native(
        VQGAN(tiny_vqgan(in_channels=3, out_channels=3, resolution=32)), tmp_path / "img.safetensors"
    )
    cfg = tokenize_images.TokenizeConfig(
        tokenizer_uri=str(tmp_path / "img.safetensors"),
        images_uri=low.output_uri,
        output_uri=str(tmp_path / "codes"),
        edges_tokenizer_uri=models["edges"].output_uri,
        lowres_tokenizer_uri=models["lowres"].output_uri,
    )
    res = tokenize_images.run(cfg, "test-pre")
    t = stage.read_committed_table(res.output_uri)
    assert res.counts["rows"] == 6 and {"edges_codes", "lowres_codes"} <= set(t.column_names)
    grid = tuple(res.manifest.dataset["conditions"]["lowres_codes"]["grid"])
    assert grid == (8, 8)  # f4 on 32x32: the image codes' grid, a code per 4x4 block
    with pytest.raises(stage.InputError, match="must take 1 channel"):
        tokenize_images.plan(
            dataclasses.replace(
                cfg, edges_tokenizer_uri=models["lowres"].output_uri, output_uri=str(tmp_path / "x")
            )
        )


def _as_generated(root, images_uri: str, order: list[int] | None = None) -> str:
    """The real images of ``images_uri`` committed as "samples" of their own conditions (the
    ``condition_image_id`` column): a perfect conditional generator; ``order`` pairs image i with
    condition order[i] instead (a generator that ignores its condition)."""
    import pyarrow as pa

    from infra.stage import StageOutput

    t = stage.read_committed_table(images_uri, ["image_id", "image"]).sort_by("image_id")
    ids = t["image_id"].to_pylist()
    cond = [ids[j] for j in order] if order is not None else ids
    table = pa.table({"image": t["image"], "condition_image_id": pa.array(cond, pa.string())})
    out = StageOutput(str(root), "sample", f"fake-{abs(hash((images_uri, str(order)))) % 10**8}")
    out.commit(
        config={},
        config_hash="x",
        inputs=[],
        markers=[out.write_shard(0, table, {"read": len(ids)})],
        counts={},
    )
    return out.output_uri


def test_condition_fidelity_figures(shards, annotated, tmp_path):
    """stages.fidelity on samples that are the real images themselves (perfect fidelity: edge F1 1,
    depth AbsRel ~0 and delta1 1, segmentation accuracy and mIoU 1, low-resolution consistency far
    above bicubic's) and on the same images paired with other images' conditions (worse)."""
    from stages import edges, fidelity, lowres

    e = edges.run(edges.EdgesConfig(images_uri=annotated, output_uri=str(tmp_path / "e")), "test-pre")
    low = lowres.run(lowres.LowresConfig(images_uri=e.output_uri, output_uri=str(tmp_path / "l")), "test-pre")
    m = stage.read_manifest(low.output_uri)
    described = image_shards.describe(m).annotations
    weights = {
        "depth": str(shards["root"] / "midas_v21_small_256.pt"),
        "segmentation": str(shards["root"] / "deeplab.pth"),
    }

    def source(column):
        return fidelity.ConditionSource(column, low.output_uri, described[column], 3, weights.get(column))

    same = _as_generated(tmp_path / "same", low.output_uri)
    swapped = _as_generated(tmp_path / "swapped", low.output_uri, [1, 2, 3, 4, 5, 0])
    f = {c: fidelity.figures(source(c), same, 100, 0) for c in ("edges", "lowres", "depth", "segmentation")}
    assert f["edges"]["edges/f1"] == 1.0 and f["edges"]["edges/f1_unpaired"] < 0.9
    assert f["lowres"]["lowres/consistency_psnr"] > 60 > f["lowres"]["lowres/bicubic_consistency_psnr"]
    assert f["lowres"]["lowres/psnr_to_real"] > 60 and f["lowres"]["lowres/bicubic_psnr_to_real"] < 40
    assert f["depth"]["depth/absrel"] < 0.01 and f["depth"]["depth/delta1"] == 1.0
    assert (
        f["segmentation"]["segmentation/pixel_accuracy"] == 1.0
        and f["segmentation"]["segmentation/miou"] == 1.0
    )
    assert "diversity" not in f["edges"]  # one sample per condition
    g = {c: fidelity.figures(source(c), swapped, 100, 0) for c in ("edges", "lowres", "depth")}
    assert g["edges"]["edges/f1"] < 0.9 and g["lowres"]["lowres/consistency_psnr"] < 40
    assert g["depth"]["depth/absrel"] > f["depth"]["depth/absrel"]
