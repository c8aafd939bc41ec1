"""VQGAN API, presets, native checkpoints and the taming importer's error paths."""

from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from models import checkpoint, taming_release
from models.losses import VGG16_FILE, VQGANLoss, VQGANLossConfig, hinge_d_loss, vanilla_d_loss
from models.quantize import QuantizerConfig
from models.vqgan import PRESETS, VQGAN, VQGANConfig

TINY = VQGANConfig(
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    resolution=16,
    z_channels=8,
    embed_dim=4,
    codebook_size=16,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    """Every preset builds (on the meta device: no memory for the big ones) and maps an image of
    its resolution to the code grid its downsampling factor says."""
    cfg = PRESETS[name]
    with torch.device("meta"):
        m = VQGAN.from_config(name)
        side = cfg.resolution
        z = m.encode_pre_quant(torch.empty(1, cfg.in_channels, side, side))
        out = m.decode(z)
    f = 2 ** (len(cfg.ch_mult) - 1)
    assert m.config.downsample_factor == f
    assert tuple(z.shape) == (1, cfg.embed_dim, side // f, side // f)
    assert tuple(out.shape) == (1, cfg.out_channels, side, side)
    codebook = [p for p in m.quantize.parameters() if p.shape[-1] == cfg.embed_dim and p.dim() == 2]
    assert codebook and codebook[-1].shape[0] == cfg.codebook_size


def test_encode_decode_shapes_and_non_square():
    torch.manual_seed(0)
    m = VQGAN(TINY).eval()
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        quant, qloss, codes = m.encode(x)
        assert quant.shape == (2, 4, 8, 12) and codes.shape == (2, 8, 12) and qloss.ndim == 0
        xrec = m.decode(quant)
        assert xrec.shape == x.shape
        assert torch.equal(m.decode_codes(codes), xrec)  # decode_codes(codes) == decode(quant), exactly


@pytest.mark.parametrize(
    "quantizer",
    [
        QuantizerConfig(),
        QuantizerConfig(l2_norm=True, ema_decay=0.9, dead_code_threshold=0.5, kmeans_init=True),
    ],
)
def test_native_checkpoint_roundtrip_exact(tmp_path, quantizer):
    torch.manual_seed(0)
    cfg = VQGANConfig(**{**TINY.__dict__, "quantizer": quantizer})
    m = VQGAN(cfg)
    m.train()
    m(torch.rand(2, 3, 16, 16))  # move training buffers off their initial values
    m.eval()
    path = tmp_path / "m.safetensors"
    checkpoint.save_native(m, path, extra={"step": 7})
    m2, extra = checkpoint.load_native(path)
    assert extra == {"step": 7} and m2.config == cfg
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(m(x)[0], m2.eval()(x)[0])


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_pickle_payloads_are_refused(tmp_path):
    _Payload.marker = str(tmp_path / "pwned")
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {}, "x": _Payload()}, f)
    with pytest.raises(checkpoint.CheckpointError, match="not a native checkpoint"):
        checkpoint.load_native(evil)
    rel = tmp_path / "release"
    (rel / "checkpoints").mkdir(parents=True)
    (rel / "configs").mkdir()
    shutil.copy(evil, rel / "checkpoints" / "last.ckpt")
    (rel / "configs" / "model.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {
                    "target": "taming.models.vqgan.VQModel",
                    "params": {"embed_dim": 4, "n_embed": 16, "ddconfig": {}},
                }
            }
        )
    )
    with pytest.raises(checkpoint.CheckpointError, match="pickled Python objects"):
        taming_release.load_taming(rel)
    assert not Path(_Payload.marker).exists()  # nothing was executed


def _fake_release(
    tmp_path: Path,
    releases,
    drop_key: str | None = None,
    n_embed: int | None = None,
    target: str | None = None,
) -> Path:
    src = releases("taming/vqgan")
    dst = tmp_path / "rel"
    shutil.copytree(src, dst)
    cfg = yaml.safe_load((dst / "configs" / "model.yaml").read_text())
    if n_embed:
        cfg["model"]["params"]["n_embed"] = n_embed
    if target:
        cfg["model"]["target"] = target
    (dst / "configs" / "model.yaml").write_text(yaml.safe_dump(cfg))
    if drop_key:
        ck = torch.load(dst / "checkpoints" / "last.ckpt", weights_only=True)
        del ck["state_dict"][drop_key]
        torch.save(ck, dst / "checkpoints" / "last.ckpt")
    return dst


@pytest.mark.parity
def test_taming_import_errors_are_clear(tmp_path, releases):
    with pytest.raises(checkpoint.CheckpointError, match=r"missing keys: decoder\.conv_out\.bias"):
        taming_release.load_taming(_fake_release(tmp_path / "a", releases, drop_key="decoder.conv_out.bias"))
    with pytest.raises(checkpoint.CheckpointError, match=r"shape mismatches: quantize\.embedding\.weight"):
        taming_release.load_taming(_fake_release(tmp_path / "b", releases, n_embed=64))
    with pytest.raises(checkpoint.CheckpointError, match="EMAVQ"):
        ema_vq = _fake_release(tmp_path / "c", releases, target="taming.models.vqgan.EMAVQ")
        taming_release.load_taming(ema_vq)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        taming_release.load_taming(tmp_path / "nowhere")
    ok = taming_release.load_taming(releases("taming/vqgan"))  # without the loss: loss.* ignored
    assert ok.loss is None and ok.global_step is not None


def test_loss_without_vgg_trunk_names_the_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=VGG16_FILE):
        VQGANLoss(VQGANLossConfig(perceptual_weight=1.0))
    with pytest.raises(FileNotFoundError, match="not found at"):
        VQGANLoss(VQGANLossConfig(), vgg16_path=tmp_path / "nope.pth")
    with caplog.at_level(logging.INFO, logger="models.losses"):
        loss = VQGANLoss(VQGANLossConfig(perceptual_weight=0.0, disc_num_layers=1))
    assert loss.perceptual_mode == "off" and "perceptual term off" in caplog.text
    x = torch.rand(2, 3, 16, 16)
    _, logs = loss.generator_loss(torch.tensor(0.1), x, x.flip(0), global_step=0, last_layer=None)
    assert float(logs["p_loss"]) == 0.0 and float(logs["disc_factor"]) == 0.0


@pytest.mark.slow
def test_loss_loads_vgg_trunk_from_hub_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    trunk = tmp_path / "torch" / "hub" / "checkpoints" / VGG16_FILE
    trunk.parent.mkdir(parents=True)
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    torch.save(vgg.state_dict(), trunk)
    loss = VQGANLoss(VQGANLossConfig(disc_num_layers=1))
    assert str(trunk) in loss.perceptual_mode
    assert torch.equal(getattr(loss.perceptual_loss.net.slice3, "10").weight, vgg.features[10].weight)
    loss.train()
    assert not loss.perceptual_loss.training  # LPIPS stays a fixed, dropout-free metric
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    a = loss.perceptual_loss(x, -x)
    assert torch.equal(a, loss.perceptual_loss(x, -x)) and float(a) > 0


def test_disc_losses_on_constructed_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
    expected = 0.5 * (torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake).mean())
    assert float(vanilla_d_loss(real, fake)) == pytest.approx(float(expected))


def test_adaptive_weight_and_disc_start():
    torch.manual_seed(0)
    m = VQGAN(TINY)
    loss = VQGANLoss(VQGANLossConfig(perceptual_weight=0.0, disc_start=5, disc_num_layers=1))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    quant, qloss, _ = m.encode(x)
    xrec = m.decode(quant)
    total_before, before = loss.generator_loss(qloss, x, xrec, 4, m.last_layer)
    total_after, after = loss.generator_loss(qloss, x, xrec, 5, m.last_layer)
    assert float(before["disc_factor"]) == 0 and float(after["disc_factor"]) == 1
    assert float(after["d_weight"]) > 0
    torch.testing.assert_close(total_before, before["nll_loss"] + before["quant_loss"])
    torch.testing.assert_close(
        total_after, after["nll_loss"] + after["d_weight"] * after["g_loss"] + after["quant_loss"]
    )
    d_loss, d = loss.discriminator_loss(x, xrec, 4)
    assert float(d_loss) == 0.0 and set(d) == {"disc_loss", "logits_real", "logits_fake"}


def _write_release(root: Path, target: str, params: dict, state: dict) -> Path:
    (root / "checkpoints").mkdir(parents=True)
    (root / "configs").mkdir()
    torch.save({"state_dict": state, "global_step": 3}, root / "checkpoints" / "last.ckpt")
    (root / "configs" / "model.yaml").write_text(
        yaml.safe_dump({"model": {"target": target, "params": params}})
    )
    return root


def test_segmentation_release_imports(tmp_path):
    """VQSegmentationModel: one-hot input of n labels, with taming's colorize buffer."""
    torch.manual_seed(0)
    cfg = VQGANConfig(**{**TINY.__dict__, "in_channels": 5, "out_channels": 5, "segmentation_labels": 5})
    src = VQGAN(cfg)
    dd = dict(
        double_z=False,
        z_channels=8,
        resolution=16,
        in_channels=5,
        out_ch=5,
        ch=32,
        ch_mult=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[8],
        dropout=0.0,
    )
    params = {
        "n_labels": 5,
        "embed_dim": 4,
        "n_embed": 16,
        "ddconfig": dd,
        "lossconfig": {"target": "taming.modules.losses.segmentation.BCELossWithQuant"},
    }
    rel = _write_release(
        tmp_path / "seg", "taming.models.vqgan.VQSegmentationModel", params, src.state_dict()
    )
    imported = taming_release.load_taming(rel)
    m = imported.model
    assert m.config.segmentation_labels == 5 and torch.equal(m.colorize, src.colorize)
    onehot = torch.nn.functional.one_hot(torch.randint(0, 5, (1, 16, 16)), 5).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        assert m(onehot)[0].shape == (1, 5, 16, 16)
    with pytest.raises(checkpoint.CheckpointError, match="cannot be imported"):
        taming_release.load_taming(rel, with_loss=True)  # BCE loss: not the VQGAN loss


def test_native_header_without_the_weights(tmp_path):
    torch.manual_seed(0)
    m = VQGAN(TINY)
    path = tmp_path / "m.safetensors"
    checkpoint.save_native(m, path, extra={"stage": "train_vqgan"})
    header = checkpoint.read_header(path)
    assert (header.kind, header.config, header.extra) == ("vqgan", TINY, {"stage": "train_vqgan"})
    path.write_bytes(path.read_bytes()[:100])  # a header cut short
    with pytest.raises(checkpoint.CheckpointError, match="not a native checkpoint"):
        checkpoint.read_header(path)


def test_a_release_config_is_read_as_declared(tmp_path):
    """configs/model.yaml, or the one configs/*-project.yaml taming writes; a yaml elsewhere beside
    the checkpoint is never taken, and two candidates ask for config_path."""
    rel = tmp_path / "rel"
    (rel / "checkpoints").mkdir(parents=True)
    (rel / "checkpoints" / "last.ckpt").write_bytes(b"")
    (rel / "checkpoints" / "model.yaml").write_text("model: {}")  # beside the ckpt: not declared
    with pytest.raises(FileNotFoundError, match="found none"):
        taming_release.resolve_release(rel)
    (rel / "configs").mkdir()
    (rel / "configs" / "2020-11-09T13-31-51-project.yaml").write_text("model: {}")
    assert taming_release.resolve_release(rel)[1].name == "2020-11-09T13-31-51-project.yaml"
    (rel / "configs" / "2020-11-10T00-00-00-project.yaml").write_text("model: {}")
    with pytest.raises(FileNotFoundError, match="pass config_path"):
        taming_release.resolve_release(rel / "checkpoints" / "last.ckpt")
    (rel / "configs" / "model.yaml").write_text("model: {}")
    assert taming_release.resolve_release(rel)[1].name == "model.yaml"


def test_native_checkpoint_bytes_are_deterministic():
    torch.manual_seed(0)
    m = VQGAN(TINY)
    a, b = checkpoint.to_bytes(m, {"x": 1, "y": 2}), checkpoint.to_bytes(m, {"y": 2, "x": 1})
    assert a == b
    m2, _ = checkpoint.from_bytes(a)
    assert checkpoint.to_bytes(m2, {"x": 1, "y": 2}) == a
