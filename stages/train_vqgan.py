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
import io as _io
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from infra import config as config_lib
from infra import io, model_store, tracking
from infra.imaging import depth_maps, image_grid, label_colors, label_maps, pngs_to_array

log = logging.getLogger(__name__)
STAGE = "train_vqgan"
MODEL_FILE = "model.safetensors"


@dataclass(frozen=True)
class TrainVQGANConfig:
    images_uri: str = ""  # committed image shards ("" = the pipeline's ingest output)
    output_uri: str = ""  # checkpoints and the final model ("" = derived from run.root_uri)
    # what to learn a codebook for: the images, their 1-channel depth maps (the depth stage's
    # `depth` column) or their label maps (`segmentation`, one-hot, binary cross-entropy)
    input: Literal["image", "depth", "segmentation"] = "image"
    segmentation_classes: int | None = None  # one-hot channels ("None" = the segmentation stage's labels)
    preset: str = "f4-small"  # models.vqgan.PRESETS; in/out channels follow the input
    codebook_size: int | None = None  # override the preset's
    steps: int = 1500
    batch_size: int = 64  # global, split over the workers
    lr: float = 1e-3  # with warm-up, cosine decay and clipping (bench: 25.2 dB vs 23.2 dB at 2e-4)
    warmup_steps: int = 100
    cosine_decay: bool = True  # half-cosine from lr down to min_lr_ratio * lr at `steps`
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float | None = None  # EMA of the weights (the EMA model is the one saved)
    perceptual_weight: float = 0.0  # LPIPS needs vgg16-397923af.pth (hub cache or vgg16_uri)
    vgg16_uri: str | None = None
    disc_start: int = 1_000_000  # the demo's budget trains without the GAN; set lower to use it
    disc_weight: float = 0.8
    codebook_weight: float = 1.0
    dead_code_threshold: float = 1.0  # restart codes used < this many times per batch (EMA); 0: off
    hflip: bool = True  # augmentation of the train split
    crop_size: int | None = None  # random crops of this size for training (validation: centre crop)
    seed: int = 0
    register_name: str | None = None  # register the final model under this name ...
    register_alias: str = "candidate"  # ... with this alias
    # execution only (not part of the config hash)
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    bf16: bool = True  # autocast on GPU
    checkpoint_every: int = 250
    log_every: int = 25
    image_every: int = 250
    val_every: int = 500  # validate (rank 0, the EMA weights when kept) every N steps; 0: only at the end
    max_failures: int = 2
    val_images: int = 2000  # cap on the validation images


EXECUTION_FIELDS = (
    "output_uri",
    "num_workers",
    "cpus_per_worker",
    "use_gpu",
    "bf16",
    "checkpoint_every",
    "log_every",
    "image_every",
    "val_every",
    "max_failures",
    "val_images",
)


def input_channels(cfg: TrainVQGANConfig, image_channels: int) -> int:
    return {"image": image_channels, "depth": 1, "segmentation": cfg.segmentation_classes}[cfg.input]


def segmentation_classes(images: io.Manifest, hops: int = 8) -> int | None:
    """The label count the segmentation stage recorded, on this output or an output it derives from."""
    m: io.Manifest | None = images
    for _ in range(hops):
        if m is None:
            return None
        if m.extra.get("segmentation_labels"):
            return len(m.extra["segmentation_labels"])
        ups = [u for u in m.input_uris if io.exists(io.join(u, io.MANIFEST_NAME))]
        m = io.read_manifest(ups[0]) if ups else None
    return None


def model_config(cfg: TrainVQGANConfig, channels: int):
    """The preset with this run's channels, codebook size, resolution and codebook options."""
    from models.quantize import QuantizerConfig
    from models.vqgan import PRESETS

    if cfg.preset not in PRESETS:
        raise config_lib.ConfigError(f"train_vqgan.preset: unknown {cfg.preset!r}; known: {sorted(PRESETS)}")
    base = PRESETS[cfg.preset]
    q = dataclasses.replace(base.quantizer, dead_code_threshold=cfg.dead_code_threshold)
    return dataclasses.replace(
        base,
        in_channels=channels,
        out_channels=channels,
        resolution=cfg.crop_size or base.resolution,
        quantizer=QuantizerConfig(**dataclasses.asdict(q)),
        codebook_size=cfg.codebook_size or base.codebook_size,
        segmentation_labels=channels if cfg.input == "segmentation" else None,
    )


def build_trainer(cfg: TrainVQGANConfig, channels: int, vgg16_path: str | None = None, device: str = "cpu"):
    """The model, loss and optimizers of ``cfg`` for ``channels`` model input channels (a fresh
    start; seed the RNG first for a fixed init)."""
    import torch

    from models.losses import VQGANLoss, VQGANLossConfig
    from models.training import Schedule, VQGANTrainer
    from models.vqgan import VQGAN

    mcfg = model_config(cfg, channels)
    model = VQGAN(mcfg).to(device)
    loss = None
    if cfg.input != "segmentation":
        loss_cfg = VQGANLossConfig(
            disc_start=cfg.disc_start,
            disc_weight=cfg.disc_weight,
            codebook_weight=cfg.codebook_weight,
            perceptual_weight=cfg.perceptual_weight,
            disc_in_channels=mcfg.in_channels,
            disc_num_layers=2,
        )
        loss = VQGANLoss(loss_cfg, vgg16_path=vgg16_path).to(device)
    schedule = Schedule(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.cosine_decay, cfg.min_lr_ratio)
    bf16 = cfg.use_gpu and device.startswith("cuda") and cfg.bf16
    return VQGANTrainer(
        model,
        loss,
        schedule,
        objective="bce" if cfg.input == "segmentation" else "image",
        grad_clip=cfg.grad_clip,
        ema_decay=cfg.ema_decay,
        codebook_weight=cfg.codebook_weight,
        autocast_dtype=torch.bfloat16 if bf16 else None,
    )


def _to_model_input(cfg: TrainVQGANConfig, batch: dict):
    """A training batch as model input: images/depth as they are, label maps one-hot."""
    from models.training import one_hot

    x = batch["x"]
    if cfg.input == "segmentation":
        return one_hot(x, cfg.segmentation_classes)
    return x.float()


def train_loop(loop: dict[str, Any]) -> None:
    """Ray Train worker: the two-optimizer VQGAN loop with checkpointing and rank-0 logging."""
    import ray.train
    import torch

    from models.training import evaluate, hflip_, random_crop

    cfg: TrainVQGANConfig = loop["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)  # same init everywhere
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    trainer = build_trainer(cfg, loop["channels"], loop.get("vgg16_path"), device)
    states = []
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            states.append(torch.load(Path(d) / "state.pt", map_location=device, weights_only=True))
    if (newest := _latest_checkpoint(loop["run_uri"], device)) is not None:
        states.append(newest)  # maybe newer: written just before a crash, before Ray recorded it
    data = {"epoch": 0, "batch": 0}  # the data position: epoch, and batches done in it
    if states:
        state = max(states, key=lambda st: int(st["step"]))
        trainer.load_state_dict(state)
        data = dict(state.get("data") or data)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 7919 * trainer.step)
    mlflow = None
    if rank == 0 and loop.get("run_id"):
        import mlflow

        mlflow.set_tracking_uri(loop["tracking_uri"])
        mlflow.start_run(run_id=loop["run_id"])
        if trainer.step:
            mlflow.log_metric("train/resumed_from_step", trainer.step, step=trainer.step)
    shard = ray.train.get_dataset_shard("train")
    per_worker = max(1, cfg.batch_size // world)
    t_last, seen, val = time.perf_counter(), 0, None
    while trainer.step < cfg.steps:
        skip, batches = data["batch"], 0  # resuming mid-epoch: pass over the batches already trained on
        for batch in shard.iter_torch_batches(batch_size=per_worker, drop_last=True, device=device):
            batches += 1
            if batches <= skip:
                continue
            if trainer.step >= cfg.steps:
                break
            data["batch"] = batches
            x = _to_model_input(cfg, batch)
            if cfg.crop_size:
                x = random_crop(x, cfg.crop_size, gen)
            if cfg.hflip:
                x = hflip_(x, gen)
            logs, xrec = trainer.train_step(x)
            step = trainer.step
            seen += x.shape[0] * world
            if mlflow is not None and step % cfg.log_every == 0:
                now = time.perf_counter()
                metrics = {f"train/{k}": v for k, v in logs.items()}
                metrics["train/images_per_s"] = seen / (now - t_last)
                mlflow.log_metrics(metrics, step=step)
                t_last, seen = now, 0
            if mlflow is not None and cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
                if val is None:
                    val = _load_split(cfg, loop["image_channels"], cfg.val_images)
                model = trainer.final_model()
                labels = None if val[1] is None else val[1].to(device)
                metrics = evaluate(model, val[0].to(device), model.config.codebook_size, labels=labels)
                mlflow.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=step)
            if mlflow is not None and (step % cfg.image_every == 0 or step == cfg.steps):
                mlflow.log_image(
                    _reconstruction_grid(cfg, x[:8], xrec[:8]),
                    artifact_file=f"reconstructions/step_{step:07d}.png",
                )
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                with tempfile.TemporaryDirectory() as d:
                    checkpoint = None
                    if rank == 0:
                        torch.save({**trainer.state_dict(), "data": dict(data)}, Path(d) / "state.pt")
                        checkpoint = ray.train.Checkpoint.from_directory(d)
                    ray.train.report({"step": step, "loss": logs["total_loss"]}, checkpoint=checkpoint)
        else:  # the epoch ran out
            if batches == 0:
                raise ValueError(
                    f"a worker got no full batch of {per_worker} training images: the train split "
                    f"is smaller than batch_size={cfg.batch_size} (or num_workers={world} too many)"
                )
            data = {"epoch": data["epoch"] + 1, "batch": 0}
    if mlflow is not None:
        mlflow.end_run()


def _reconstruction_grid(cfg: TrainVQGANConfig, x, xrec) -> np.ndarray:
    """Inputs over their reconstructions, one PNG-ready grid (label maps drawn in label colours)."""
    import torch

    if cfg.input == "segmentation":
        tiles = [label_colors(t.argmax(0).cpu().numpy()) for pair in zip(x, xrec) for t in pair]
        return image_grid(tiles, ncol=8)
    pairs = torch.stack([x, xrec.clamp(-1, 1)], 1).flatten(0, 1).float()
    arr = ((pairs.cpu().numpy() + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    return image_grid([a[..., 0] if a.shape[-1] == 1 else a for a in arr], ncol=8)


def decode_column(cfg: TrainVQGANConfig, blobs: list[bytes], image_channels: int) -> np.ndarray:
    """A shard column as compact arrays: images/depth float32 in [-1, 1], label maps uint8 (N, 1, H, W)."""
    if cfg.input == "depth":
        return depth_maps(blobs)
    if cfg.input == "segmentation":
        return label_maps(blobs)
    return pngs_to_array(blobs, image_channels)


def _load_split(cfg: TrainVQGANConfig, image_channels: int, limit: int | None = None):
    """The held-out data: the ``val`` split, else ``test``, else (tagged as such) ``train``, as
    (model input, labels or None, split name)."""
    import torch

    from models.training import center_crop, one_hot

    column = cfg.input  # the shard column of that name
    t = io.read_committed_table(cfg.images_uri, [column, "split"])
    splits = np.asarray(t["split"].to_pylist())
    split = next((s for s in ("val", "test", "train") if (splits == s).any()), None)
    if split is None:
        raise ValueError(f"{cfg.images_uri} has no images to validate on")
    if split == "train":
        log.warning("train_vqgan: %s has no val or test split: validating on train images", cfg.images_uri)
    t = t.filter(splits == split)
    if limit is not None:
        t = t.slice(0, limit)
    x = torch.from_numpy(decode_column(cfg, t[column].to_pylist(), image_channels))
    if cfg.crop_size:
        x = center_crop(x, cfg.crop_size)
    if cfg.input == "segmentation":
        return one_hot(x, cfg.segmentation_classes), x[:, 0], split
    return x, None, split


def _latest_checkpoint(run_uri: str, device: str = "cpu") -> dict | None:
    """The newest complete checkpoint state under a Ray Train run folder (local or remote), if any.

    Ray Train resumes from the checkpoints it recorded; a process killed between a checkpoint's upload
    and its recording (the driver, or a worker) leaves one Ray does not know about. This finds it, so
    no finished step is lost. Folder names carry their creation time, so they sort by age.
    """
    import torch

    names = [d for d in io.list_dirs(run_uri) if d.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_")]
    for d in sorted(names, reverse=True):
        try:
            data = io.read_bytes(io.join(d, "state.pt"))
            return torch.load(_io.BytesIO(data), map_location=device, weights_only=True)
        except Exception:  # noqa: BLE001 - missing or a partial copy: try the next older one
            continue
    return None


def run(cfg: TrainVQGANConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> tuple[io.Manifest, bool]:
    """Train (or resume, or reuse) a VQGAN; returns the manifest and whether it was already committed."""
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from infra.cluster import ensure_ray
    from models import checkpoint as ckpt_lib
    from models.losses import LPIPS, find_vgg16
    from models.training import evaluate
    from models.vqgan import VQGAN

    if not cfg.images_uri or not cfg.output_uri:
        raise config_lib.ConfigError("train_vqgan.images_uri and train_vqgan.output_uri must be set")
    images = io.read_manifest(cfg.images_uri)
    column = cfg.input  # the shard column of that name
    if column not in io.column_names(images):
        raise ValueError(
            f"train_vqgan.input={cfg.input}: {cfg.images_uri} has no `{column}` column "
            f"(run the {column} stage first and train on its output)"
        )
    if cfg.input == "segmentation" and cfg.segmentation_classes is None:
        classes = segmentation_classes(images)
        if classes is None:
            raise config_lib.ConfigError(
                "train_vqgan.segmentation_classes: not set, and the segmentation stage recorded no labels"
            )
        cfg = dataclasses.replace(cfg, segmentation_classes=classes)
    image_channels = int(images.config.get("channels", 3))
    channels = input_channels(cfg, image_channels)
    mcfg = model_config(cfg, channels)
    chash = io.sha256(
        f"{config_lib.config_hash(cfg, exclude=EXECUTION_FIELDS)}:{images.config_hash}".encode()
    )[:16]
    out = io.StageOutput(cfg.output_uri, STAGE, chash)
    if (m := out.committed()) is not None:
        return m, True
    vgg = str(model_store.local_path(cfg.vgg16_uri)) if cfg.vgg16_uri else None
    trunk = find_vgg16(vgg) if cfg.input != "segmentation" else None  # None: LPIPS cannot be computed
    if cfg.input == "segmentation" and cfg.perceptual_weight > 0:
        raise config_lib.ConfigError("train_vqgan.perceptual_weight must be 0 for input=segmentation")
    if cfg.perceptual_weight > 0 and trunk is None:  # fail before any work, naming the file
        from models.losses import VGG16_FILE

        raise FileNotFoundError(
            f"train_vqgan.perceptual_weight={cfg.perceptual_weight} needs the VGG16 trunk of LPIPS "
            f"({VGG16_FILE}) in the torch hub cache ({torch.hub.get_dir()}/checkpoints) or at "
            "train_vqgan.vgg16_uri; it cannot be downloaded here. "
            "Set perceptual_weight=0 to train without it."
        )
    with tracking.stage_run(STAGE, cfg, [cfg.images_uri], out.output_uri, experiment) as run_id:
        tracking.set_tags(
            {
                "perceptual": f"lpips-vgg16 ({trunk})"
                if cfg.perceptual_weight > 0
                else "off (perceptual_weight=0)",
                "objective": "bce+codebook" if cfg.input == "segmentation" else "l1+perceptual+gan+codebook",
            }
        )
        ensure_ray()
        ds = ray.data.read_parquet(images.data_uris()).select_columns([column, "split"])
        ds = ds.map_batches(
            lambda b: {
                "x": decode_column(
                    cfg, [v for v, sp in zip(b[column], b["split"]) if sp == "train"], image_channels
                )
            },
            batch_format="numpy",
        )
        storage = io.join(out.work_uri, "ray")
        if not io.is_remote(storage):
            Path(storage).mkdir(parents=True, exist_ok=True)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "cfg": cfg,
                "channels": channels,
                "image_channels": image_channels,
                "run_id": run_id,
                "tracking_uri": tracking.tracking_uri(),
                "vgg16_path": vgg,
                "run_uri": io.join(storage, f"train_vqgan-{chash}"),
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
        x_val, labels, split = _load_split(cfg, image_channels, cfg.val_images)
        lpips = LPIPS(trunk) if trunk is not None else None
        metrics = {
            f"val/{k}": v
            for k, v in evaluate(model, x_val, mcfg.codebook_size, lpips=lpips, labels=labels).items()
        }
        tracking.log_metrics({**metrics, "train/seconds": seconds}, step=int(state["step"]))
        tracking.set_tags({"val/split": split})
        if lpips is None and cfg.input != "segmentation":
            tracking.set_tags(
                {
                    "val/lpips": "not computed: the VGG16 trunk of LPIPS (vgg16-397923af.pth) is not "
                    "in the torch hub cache and no vgg16_uri was given"
                }
            )
            log.warning("train_vqgan: val LPIPS not computed (no VGG16 trunk); PSNR/SSIM only")
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
    from infra.cli import stage_main

    stage_main(STAGE, TrainVQGANConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
