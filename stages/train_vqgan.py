"""Train a VQGAN on image shards with Ray Train, tracked in MLflow, registered in the model registry.

The paper's recipe (L1, LPIPS when its VGG16 trunk is present, codebook loss, a PatchGAN from
``disc_start`` with the adaptive weight, two Adam optimizers) plus warm-up and cosine decay,
clipping, an optional EMA and codebook health, as one pure-torch step (``models.training``) on Ray
Train workers that all-reduce their gradients and see the train split in a seeded, resumable order.
Checkpoints, resume after a worker death or a resubmission, and rank-0 logging are the shared
scaffolding's (``infra.ray_train``). At the end the model is validated (PSNR, SSIM, codebook usage
on the val split), written as a native checkpoint, committed and registered.

    python -m stages.train_vqgan --config pipelines/configs/demo.yaml train_vqgan.steps=300
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

from infra import config as config_lib
from infra import image_shards, model_store, ray_train, stage, tracking
from infra.config import execution_field, input_field, output_field
from infra.imaging import decode_column, reconstruction_grid
from infra.stage import InputError, InputRef, StageResult, StageRun

log = logging.getLogger(__name__)
STAGE = "train_vqgan"
HEADLINE = (
    "steps",
    "val/psnr",
    "val/ssim",
    "val/lpips",
    "val/codebook_usage",
)  # the figures a pipeline's summary shows for this stage


@dataclass(frozen=True)
class TrainVQGANConfig:
    images_uri: str = input_field()  # committed image shards ("" = the pipeline's ingest output)
    output_uri: str = output_field()  # checkpoints and the final model ("" = derived from run.root_uri)
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
    vgg16_uri: str | None = input_field(None)
    disc_start: int = 1_000_000  # the demo's budget trains without the GAN; set lower to use it
    disc_weight: float = 0.8
    codebook_weight: float = 1.0
    dead_code_threshold: float = 1.0  # restart codes used < this many times per batch (EMA); 0: off
    hflip: bool = True  # augmentation of the train split
    crop_size: int | None = None  # random crops of this size for training (validation: centre crop)
    seed: int = 0  # initialisation, data order, augmentation
    shuffle_buffer: int = 2048  # rows each worker shuffles within, per epoch (0: shard order only)
    register_name: str | None = None  # register the final model under this name ...
    register_alias: str = "candidate"  # ... with this alias
    # execution only (not part of the identity)
    num_workers: int = execution_field(2)
    cpus_per_worker: float = execution_field(1.0)
    use_gpu: bool = execution_field(False)
    bf16: bool = execution_field(True)  # autocast on GPU
    checkpoint_every: int = execution_field(250)
    log_every: int = execution_field(25)
    image_every: int = execution_field(250)
    val_every: int = execution_field(500)  # validate (rank 0, EMA weights when kept); 0: only at the end
    max_failures: int = execution_field(2)
    val_images: int = execution_field(2000)  # cap on the validation images

    def __post_init__(self):
        from models.vqgan import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r}; known: {sorted(PRESETS)}")
        if self.input == "segmentation" and self.perceptual_weight > 0:
            raise ValueError("perceptual_weight must be 0 for input=segmentation")


def model_config(cfg: TrainVQGANConfig, channels: int):
    """The preset with this run's channels, codebook size, resolution and codebook options."""
    from models.vqgan import preset

    return preset(
        cfg.preset,
        channels=channels,
        codebook_size=cfg.codebook_size,
        resolution=cfg.crop_size,
        dead_code_threshold=cfg.dead_code_threshold,
        segmentation=cfg.input == "segmentation",
    )


def build_trainer(
    cfg: TrainVQGANConfig, channels: int, vgg16_path: str | None = None, device="cpu", bf16=False
):
    """The model, loss and optimizers of ``cfg`` (a fresh start; seed the RNG first for a fixed init)."""
    import torch

    from models.losses import VQGANLoss, VQGANLossConfig
    from models.training import Schedule, VQGANTrainer
    from models.vqgan import VQGAN

    mcfg = model_config(cfg, channels)
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
    return VQGANTrainer(
        VQGAN(mcfg).to(device),
        loss,
        Schedule(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.cosine_decay, cfg.min_lr_ratio),
        objective="bce" if cfg.input == "segmentation" else "image",
        grad_clip=cfg.grad_clip,
        ema_decay=cfg.ema_decay,
        codebook_weight=cfg.codebook_weight,
        autocast_dtype=torch.bfloat16 if bf16 and device.startswith("cuda") else None,
    )


def _model_input(cfg: TrainVQGANConfig, x):
    from models.training import one_hot

    return one_hot(x, cfg.segmentation_classes) if cfg.input == "segmentation" else x.float()


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: the two-optimizer VQGAN loop (scaffolding: ``infra.ray_train.Session``)."""
    import torch

    from models.training import hflip_, random_crop

    cfg: TrainVQGANConfig = config["cfg"]
    session = ray_train.Session(config)
    torch.manual_seed(cfg.seed)  # same init everywhere
    trainer = build_trainer(cfg, config["channels"], config["vgg16_path"], session.device, session.place.bf16)
    if (state := session.restore()) is not None:
        trainer.load_state_dict(state)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + session.rank + 7919 * trainer.step)
    held = None
    with session.tracking():
        for batch in session.batches("train", max(1, cfg.batch_size // session.world)):
            x = _model_input(cfg, batch["x"])
            x = random_crop(x, cfg.crop_size, gen) if cfg.crop_size else x
            x = hflip_(x, gen) if cfg.hflip else x
            logs, xrec = trainer.train_step(x)
            step, last = trainer.step, trainer.step >= cfg.steps
            session.count(x.shape[0])
            if step % cfg.log_every == 0:
                metrics = {f"train/{k}": v for k, v in logs.items()}
                session.log_metrics({**metrics, "train/images_per_s": session.items_per_s()}, step=step)
            if session.is_chief and cfg.val_every and step % cfg.val_every == 0 and not last:
                held = held or _held_out(cfg, config["image_channels"])
                session.log_metrics(_validate(cfg, trainer.final_model(), held, session.device), step=step)
            if step % cfg.image_every == 0 or last:
                grid = reconstruction_grid(x[:8], xrec[:8], cfg.input == "segmentation")
                session.log_image(grid, f"reconstructions/step_{step:07d}.png")
            if step % cfg.checkpoint_every == 0 or last:
                session.report(step, {"loss": logs["total_loss"]}, trainer.state_dict())
            if last:
                break


def _held_out(cfg: TrainVQGANConfig, image_channels: int):
    """The held-out data as (model input, labels or None, split name)."""
    import torch

    from models.training import center_crop

    t, split = stage.read_held_out(cfg.images_uri, [cfg.input], cfg.val_images)
    x = torch.from_numpy(decode_column(cfg.input, t[cfg.input].to_pylist(), image_channels))
    x = center_crop(x, cfg.crop_size) if cfg.crop_size else x
    return (_model_input(cfg, x), x[:, 0], split) if cfg.input == "segmentation" else (x, None, split)


def _validate(cfg: TrainVQGANConfig, model, held, device: str = "cpu", lpips=None) -> dict[str, float]:
    from models.training import evaluate

    x, labels, _ = held
    labels = None if labels is None else labels.to(device)
    scores = evaluate(model, x.to(device), model.config.codebook_size, lpips=lpips, labels=labels)
    return {f"val/{k}": float(v) for k, v in scores.items()}


def run(cfg: TrainVQGANConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> StageResult:
    """Train (or resume, or reuse) a VQGAN."""
    from models.losses import LPIPS, find_vgg16, require_vgg16
    from models.vqgan import VQGAN

    if not cfg.images_uri:
        raise config_lib.ConfigError("train_vqgan.images_uri is not set")
    images = stage.read_manifest(cfg.images_uri)
    if cfg.input not in stage.column_names(images):  # the shard column of that name
        raise InputError(
            f"train_vqgan.input={cfg.input}: {cfg.images_uri} has no `{cfg.input}` column "
            f"(run the {cfg.input} stage first and train on its output)"
        )
    n_train = sum(
        s == "train" for s in stage.read_committed_table(cfg.images_uri, ["split"])["split"].to_pylist()
    )
    if n_train < cfg.batch_size:
        raise InputError(
            f"{cfg.images_uri} holds {n_train} training images, fewer than train_vqgan.batch_size="
            f"{cfg.batch_size}: lower the batch size or ingest more images"
        )
    if cfg.input == "segmentation" and cfg.segmentation_classes is None:
        labels = stage.lineage_value(images, "segmentation_labels")
        if labels is None:
            raise config_lib.ConfigError(
                "train_vqgan.segmentation_classes: not set, and the segmentation stage recorded no labels"
            )
        cfg = dataclasses.replace(cfg, segmentation_classes=len(labels))
    image_channels = image_shards.info(images)["channels"] or 3
    channels = {"image": image_channels, "depth": 1, "segmentation": cfg.segmentation_classes}[cfg.input]
    mcfg = model_config(cfg, channels)
    vgg = str(model_store.local_path(cfg.vgg16_uri)) if cfg.vgg16_uri else None
    inputs = [InputRef.output("images", images)]
    trunk = None
    if cfg.perceptual_weight > 0:  # fail before any work, naming the file
        trunk = require_vgg16(vgg, f"train_vqgan.perceptual_weight={cfg.perceptual_weight}")
        inputs.append(InputRef.weights("vgg16", str(trunk), model_store.file_sha256(trunk)))
    elif cfg.input != "segmentation":
        trunk = find_vgg16(vgg)  # None: LPIPS cannot be computed for validation
    job = StageRun(STAGE, cfg, cfg.output_uri, inputs, experiment)
    if (done := job.cached()) is not None:
        return done
    with job:
        perceptual = f"lpips-vgg16 ({trunk})" if cfg.perceptual_weight > 0 else "off (perceptual_weight=0)"
        objective = "bce+codebook" if cfg.input == "segmentation" else "l1+perceptual+gan+codebook"
        tracking.set_tags({"perceptual": perceptual, "objective": objective})

        def train_rows(b: dict) -> dict:  # the train split, decoded
            keep = [v for v, s in zip(b[cfg.input], b["split"]) if s == "train"]
            return {"x": decode_column(cfg.input, keep, image_channels)}

        shards = ray_train.read_parquet(images.data_uris(), [cfg.input, "split"], cfg.seed)
        loop_config = {"cfg": cfg, "channels": channels, "image_channels": image_channels, "vgg16_path": vgg}
        datasets = {"train": shards.map_batches(train_rows, batch_format="numpy")}
        execution = {k: getattr(cfg, k) for k in ray_train.FIT_FIELDS}
        state = ray_train.fit(job, train_loop, loop_config, datasets, **execution)
        train_seconds = job.seconds
        model = VQGAN(mcfg)
        model.load_state_dict(state["ema"] if state.get("ema") else state["model"])
        held = _held_out(cfg, image_channels)
        lpips = LPIPS(trunk) if trunk is not None else None
        figures = _validate(cfg, model, held, lpips=lpips)
        tracking.set_tags({"val/split": held[2]})
        if lpips is None and cfg.input != "segmentation":
            why = "not computed: no VGG16 trunk of LPIPS (vgg16-397923af.pth) in the hub cache or vgg16_uri"
            tracking.set_tags({"val/lpips": why})
            log.warning("train_vqgan: val LPIPS %s; PSNR/SSIM only", why)
        return ray_train.commit_model(
            job,
            model,
            counts={"steps": int(state["step"])},
            figures={**figures, "train_seconds": train_seconds},
            extra={"stage": STAGE, "step": int(state["step"]), "model_config": dataclasses.asdict(mcfg)},
            register_name=cfg.register_name,
            register_alias=cfg.register_alias,
            step=int(state["step"]),
        )


def main(argv: list[str] | None = None) -> StageResult:
    from infra.cli import stage_main

    return stage_main(STAGE, TrainVQGANConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
