"""Train a VQGAN on image shards with Ray Train, tracked in MLflow, registered in the model registry.

The paper's recipe: L1 (+ LPIPS when its VGG16 trunk is present) + codebook loss, a PatchGAN
discriminator switched on at ``disc_start`` with the adaptive weight, two Adam optimizers (betas
0.5, 0.9); plus warm-up and cosine decay, gradient clipping, an optional EMA of the weights and
codebook health (usage, perplexity, dead-code restart kept identical across workers). Workers
average gradients with an all-reduce (gloo on CPU, NCCL on GPU). Checkpoints (weights, both
optimizers, the discriminator, EMA, the step) go to the run's storage every ``checkpoint_every``
steps; a worker failure (``max_failures``) or a resubmission of the same job resumes from the last
one, and the logged step keeps increasing. At the end the model is validated (PSNR, SSIM, codebook
usage on the val split), written as a native checkpoint, committed and registered.

    python -m stages.train_vqgan --config pipelines/configs/demo.yaml train_vqgan.steps=300
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infra import config as config_lib
from infra import io, model_store, tracking
from infra.imaging import image_grid, pngs_to_array

log = logging.getLogger(__name__)
STAGE = "train_vqgan"
MODEL_FILE = "model.safetensors"


@dataclass(frozen=True)
class TrainVQGANConfig:
    images_uri: str = ""  # committed image shards ("" = the pipeline's ingest output)
    output_uri: str = ""  # checkpoints and the final model ("" = derived from run.root_uri)
    preset: str = "f4-small"  # models.vqgan.PRESETS; in/out channels follow the images
    codebook_size: int | None = None  # override the preset's
    steps: int = 1500
    batch_size: int = 64  # global, split over the workers
    lr: float = 2e-4
    warmup_steps: int = 100
    cosine_decay: bool = True
    grad_clip: float = 1.0
    ema_decay: float | None = None  # EMA of the weights (the EMA model is the one saved)
    perceptual_weight: float = 0.0  # LPIPS needs vgg16-397923af.pth (hub cache or vgg16_uri)
    vgg16_uri: str | None = None
    disc_start: int = 1_000_000  # the demo's budget trains without the GAN; set lower to use it
    disc_weight: float = 0.8
    codebook_weight: float = 1.0
    dead_code_threshold: float = 0.0  # restart codes used fewer times than this (EMA count)
    hflip: bool = True  # augmentation of the train split
    seed: int = 0
    register_name: str | None = None  # register the final model under this name ...
    register_alias: str = "candidate"  # ... with this alias
    # execution only (not part of the config hash)
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    checkpoint_every: int = 250
    log_every: int = 25
    image_every: int = 250
    max_failures: int = 2
    val_images: int = 2000  # cap on the validation images


EXECUTION_FIELDS = (
    "output_uri",
    "num_workers",
    "cpus_per_worker",
    "use_gpu",
    "checkpoint_every",
    "log_every",
    "image_every",
    "max_failures",
    "val_images",
)


def model_config(cfg: TrainVQGANConfig, channels: int):
    from models.quantize import QuantizerConfig
    from models.vqgan import PRESETS

    base = PRESETS[cfg.preset]
    q = dataclasses.replace(base.quantizer, dead_code_threshold=cfg.dead_code_threshold)
    return dataclasses.replace(
        base,
        in_channels=channels,
        out_channels=channels,
        quantizer=QuantizerConfig(**dataclasses.asdict(q)),
        codebook_size=cfg.codebook_size or base.codebook_size,
    )


def lr_at(cfg: TrainVQGANConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if not cfg.cosine_decay:
        return cfg.lr
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _allreduce_grads(params, world: int) -> None:
    import torch.distributed as dist

    if world > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def train_loop(loop: dict[str, Any]) -> None:
    """Ray Train worker: the two-optimizer VQGAN loop with checkpointing and rank-0 logging."""
    import ray.train
    import torch

    from models.losses import VQGANLoss, VQGANLossConfig
    from models.vqgan import VQGAN

    cfg: TrainVQGANConfig = loop["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)  # same init everywhere
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    model = VQGAN(loop["model_cfg"]).to(device)
    loss_cfg = VQGANLossConfig(
        disc_start=cfg.disc_start,
        disc_weight=cfg.disc_weight,
        codebook_weight=cfg.codebook_weight,
        perceptual_weight=cfg.perceptual_weight,
        disc_in_channels=loop["model_cfg"].in_channels,
        disc_num_layers=2,
    )
    loss_fn = VQGANLoss(loss_cfg, vgg16_path=loop.get("vgg16_path")).to(device)
    opt_g = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if cfg.ema_decay else None
    step = 0
    states = []
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            states.append(torch.load(Path(d) / "state.pt", map_location=device, weights_only=True))
    if loop.get("fallback_checkpoint"):  # maybe newer: written by a run that died before Ray recorded it
        states.append(torch.load(loop["fallback_checkpoint"], map_location=device, weights_only=True))
    state = max(states, key=lambda st: int(st["step"])) if states else None
    if state is not None:
        model.load_state_dict(state["model"])
        loss_fn.discriminator.load_state_dict(state["disc"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        ema = state.get("ema")
        step = int(state["step"])
    mlflow = None
    if rank == 0 and loop.get("run_id"):
        import mlflow

        mlflow.set_tracking_uri(loop["tracking_uri"])
        mlflow.start_run(run_id=loop["run_id"])
    shard = ray.train.get_dataset_shard("train")
    per_worker = max(1, cfg.batch_size // world)
    t_last, seen = time.perf_counter(), 0
    while step < cfg.steps:
        for batch in shard.iter_torch_batches(batch_size=per_worker, drop_last=True, device=device):
            if step >= cfg.steps:
                break
            x = batch["x"].float()
            if cfg.hflip:
                flip = torch.rand(x.shape[0], device=device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            for g in opt_g.param_groups + opt_d.param_groups:
                g["lr"] = lr_at(cfg, step)
            model.train()
            out = model.encode_with_stats(x)
            xrec = model.decode(out.quant)
            g_loss, glog = loss_fn.generator_loss(out.loss, x, xrec, step, model.last_layer)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            _allreduce_grads(model.parameters(), world)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt_g.step()
            dlog = {}
            if step >= cfg.disc_start:
                d_loss, dlog = loss_fn.discriminator_loss(x, xrec, step)
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                _allreduce_grads(loss_fn.discriminator.parameters(), world)
                opt_d.step()
            if ema is not None:
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        if v.dtype.is_floating_point:
                            ema[k].mul_(cfg.ema_decay).add_(v.detach(), alpha=1 - cfg.ema_decay)
                        else:
                            ema[k].copy_(v)
            step += 1
            seen += x.shape[0] * world
            if mlflow is not None and step % cfg.log_every == 0:
                now = time.perf_counter()
                metrics = {f"train/{k}": float(v) for k, v in {**glog, **dlog}.items()}
                metrics.update(
                    {
                        "train/lr": lr_at(cfg, step - 1),
                        "train/codebook_usage": float(out.usage),
                        "train/perplexity": float(out.perplexity),
                        "train/images_per_s": seen / (now - t_last),
                    }
                )
                mlflow.log_metrics(metrics, step=step)
                t_last, seen = now, 0
            if mlflow is not None and (step % cfg.image_every == 0 or step == cfg.steps):
                pairs = torch.stack([x[:8], xrec[:8].detach().clamp(-1, 1)], 1).flatten(0, 1)
                arr = ((pairs.cpu().numpy() + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
                mlflow.log_image(
                    image_grid([a[..., 0] if a.shape[-1] == 1 else a for a in arr], ncol=8),
                    artifact_file=f"reconstructions/step_{step:07d}.png",
                )
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                with tempfile.TemporaryDirectory() as d:
                    checkpoint = None
                    if rank == 0:
                        torch.save(
                            {
                                "model": model.state_dict(),
                                "disc": loss_fn.discriminator.state_dict(),
                                "opt_g": opt_g.state_dict(),
                                "opt_d": opt_d.state_dict(),
                                "ema": ema,
                                "step": step,
                            },
                            Path(d) / "state.pt",
                        )
                        checkpoint = ray.train.Checkpoint.from_directory(d)
                    ray.train.report({"step": step, "loss": float(g_loss.detach())}, checkpoint=checkpoint)
    if mlflow is not None:
        mlflow.end_run()


def _load_split(images_uri: str, channels: int, limit: int | None = None):
    """The held-out images: the ``val`` split, or ``test`` where the source has no val split."""
    import torch

    t = io.read_committed_table(images_uri, ["image", "split"])
    splits = np.asarray(t["split"].to_pylist())
    split = "val" if (splits == "val").any() else "test"
    t = t.filter(splits == split)
    if t.num_rows == 0:
        raise ValueError(f"{images_uri} has no val or test images to validate on")
    if limit is not None:
        t = t.slice(0, limit)
    return torch.from_numpy(pngs_to_array(t["image"].to_pylist(), channels))


def _latest_checkpoint(run_uri: str) -> str | None:
    """The newest complete ``state.pt`` under a Ray Train run folder (local storage), if any.

    Ray Train resumes from the checkpoints it recorded; a driver killed between a checkpoint's upload
    and its recording leaves one Ray does not know about. This finds it, so no finished step is lost.
    """
    import torch

    if io.is_remote(run_uri) or not Path(run_uri).is_dir():
        return None
    for d in sorted(Path(run_uri).glob("checkpoint_*"), reverse=True):
        try:
            torch.load(d / "state.pt", map_location="cpu", weights_only=True)
            return str(d / "state.pt")
        except Exception:  # noqa: BLE001 - a partial copy: try the next older one
            continue
    return None


def validate(model, x, batch: int = 256) -> dict[str, float]:
    import torch

    from models.metrics import psnr, ssim
    from models.quantize import usage_stats

    ps, ss, counts = [], [], torch.zeros(model.config.codebook_size)
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            quant, _, codes = model.encode(xb)
            rec = model.decode(quant).clamp(-1, 1)
            ps.append(psnr(rec, xb))
            ss.append(ssim(rec, xb))
            counts += usage_stats(codes, model.config.codebook_size)[2]
    return {
        "val/psnr": float(torch.cat(ps).mean()),
        "val/ssim": float(torch.cat(ss).mean()),
        "val/codebook_usage": float((counts > 0).float().mean()),
        "val/images": len(x),
    }


def run(cfg: TrainVQGANConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> tuple[io.Manifest, bool]:
    """Train (or resume, or reuse) a VQGAN; returns the manifest and whether it was already committed."""
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from infra.cluster import ensure_ray
    from models import checkpoint as ckpt_lib
    from models.vqgan import VQGAN

    if not cfg.images_uri or not cfg.output_uri:
        raise config_lib.ConfigError("train_vqgan.images_uri and train_vqgan.output_uri must be set")
    images = io.read_manifest(cfg.images_uri)
    channels = int(images.config.get("channels", 3))
    mcfg = model_config(cfg, channels)
    chash = io.sha256(
        f"{config_lib.config_hash(cfg, exclude=EXECUTION_FIELDS)}:{images.config_hash}".encode()
    )[:16]
    out = io.StageOutput(cfg.output_uri, STAGE, chash)
    if (m := out.committed()) is not None:
        return m, True
    vgg = None
    if cfg.perceptual_weight > 0 and cfg.vgg16_uri:
        vgg = str(model_store.local_path(cfg.vgg16_uri))
    with tracking.stage_run(STAGE, cfg, [cfg.images_uri], out.output_uri, experiment) as run_id:
        tracking.set_tags(
            {"perceptual": "lpips-vgg16" if cfg.perceptual_weight > 0 else "off (perceptual_weight=0)"}
        )
        ensure_ray()
        ds = ray.data.read_parquet(images.data_uris(), columns=["image", "split"])
        ds = ds.map_batches(
            lambda b: {
                "x": pngs_to_array([im for im, sp in zip(b["image"], b["split"]) if sp == "train"], channels)
            },
            batch_format="numpy",
        )
        storage = io.join(out.work_uri, "ray")
        if not io.is_remote(storage):
            Path(storage).mkdir(parents=True, exist_ok=True)
        fallback = _latest_checkpoint(io.join(storage, f"train_vqgan-{chash}"))
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "cfg": cfg,
                "model_cfg": mcfg,
                "run_id": run_id,
                "tracking_uri": tracking.tracking_uri(),
                "vgg16_path": vgg,
                "fallback_checkpoint": fallback,
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.num_workers,
                use_gpu=cfg.use_gpu,
                resources_per_worker={"CPU": cfg.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=f"train_vqgan-{chash}",
                storage_path=storage,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
            datasets={"train": ds},
        )
        t0 = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - t0
        with result.checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
        model = VQGAN(mcfg)
        model.load_state_dict(state["ema"] if state.get("ema") else state["model"])
        metrics = validate(model, _load_split(cfg.images_uri, channels, cfg.val_images))
        tracking.log_metrics({**metrics, "train/seconds": seconds}, step=int(state["step"]))
        if cfg.perceptual_weight <= 0:
            tracking.set_tags({"val/lpips": "not computed: perceptual term off / no VGG16 trunk"})
        extra = {"stage": STAGE, "step": int(state["step"]), **metrics}
        data = ckpt_lib.to_bytes(model, extra)  # the registered copy below has these very bytes
        io.write_bytes(io.join(out.work_uri, MODEL_FILE), data)
        marker = {
            "index": 0,
            "files": {
                "data": {
                    "path": f"{io.ATTEMPTS_DIR}/{chash}/{MODEL_FILE}",
                    "rows": 1,
                    "bytes": len(data),
                    "sha256": io.sha256(data),
                }
            },
        }
        version = None
        if cfg.register_name:
            version = model_store.register(
                model, cfg.register_name, cfg.register_alias, tags=metrics, extra=extra
            )
        manifest = out.commit(
            config=config_lib.to_dict(cfg),
            input_uris=[cfg.images_uri],
            markers=[marker],
            counts={"steps": int(state["step"])},
            mlflow_run_id=run_id,
            extra={
                **metrics,
                "model_config": dataclasses.asdict(mcfg),
                "registered_version": version,
                "registered_name": cfg.register_name,
                "train_seconds": seconds,
            },
        )
    return manifest, False


def main(argv: list[str] | None = None) -> None:
    from infra.cli import stage_cli

    cfg, experiment = stage_cli(STAGE, TrainVQGANConfig, __doc__, argv)
    manifest, cached = run(cfg, experiment)
    print(
        json.dumps(
            {
                "output_uri": manifest.output_uri,
                "cached": cached,
                **manifest.counts,
                **{k: v for k, v in manifest.extra.items() if k.startswith("val/")},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
