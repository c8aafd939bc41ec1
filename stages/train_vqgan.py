"""Train a VQGAN on image shards with Ray Train, tracked in MLflow, registered in the model registry.

The paper's recipe (L1, LPIPS when its VGG16 trunk is present, codebook loss, a PatchGAN from
``disc_start`` with the adaptive weight, two Adam optimizers) plus warm-up and cosine decay,
clipping, an optional EMA and codebook health, as one pure-torch step (``models.vqgan_training``) on Ray
Train workers that all-reduce their gradients and see the train split in a seeded, resumable order.
Checkpoints, resume after a worker death or a resubmission, and rank-0 logging are the shared
scaffolding's (``infra.ray_train``). At the end the model is validated (PSNR, SSIM, codebook usage
on the val split), written as a native checkpoint, committed and registered.

    python -m stages.train_vqgan --config pipelines/configs/demo.yaml train_vqgan.steps=300
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from infra import config as config_lib
from infra import image_shards, model_store, previews, ray_train, stage, tracking
from infra.config import execution_field, input_field, output_field
from infra.devices import Resources
from infra.imaging import decode_column
from infra.stage import InputError, InputRef, StageResult, StageRun
from models.vqgan import VQGANConfig
from models.vqgan_training import VQGANRecipe

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
    # `depth` column), their label maps (`segmentation`, one-hot, binary cross-entropy), their
    # 1-channel edge maps (`edges`) or their low-resolution copies (`lowres`, the image's channels)
    input: Literal["image", "depth", "segmentation", "edges", "lowres"] = "image"
    segmentation_classes: int | None = None  # one-hot channels (None: the segmentation stage's labels)
    preset: str = "f4-small"  # models.vqgan.PRESETS; in/out channels follow the input
    codebook_size: int | None = None  # override the preset's
    dead_code_threshold: float = 1.0  # restart codes used < this many times per batch (EMA); 0: off
    steps: int = 1500  # optimizer steps (the training budget)
    batch_size: int = 64  # global, split over the workers
    # optimizer schedule (lr 1e-3, warm-up, cosine decay, clipping), EMA, loss terms (LPIPS weight,
    # the PatchGAN's start and weight, the codebook weight): models.vqgan_training.VQGANRecipe
    recipe: VQGANRecipe = field(default_factory=VQGANRecipe)
    vgg16_uri: str | None = input_field(None)  # the LPIPS trunk (vgg16-397923af.pth); None: the hub cache
    hflip: bool = True  # augmentation of the train split
    crop_size: int | None = None  # random crops of this size for training (validation: centre crop)
    seed: int = 0  # initialisation, data order, augmentation
    shuffle_buffer: int = 2048  # rows each worker shuffles within, per epoch (0: shard order only)
    register_name: str | None = None  # register the final model under this name ...
    register_alias: str = "candidate"  # ... with this alias
    # execution only (not part of the identity)
    resources: Resources = execution_field(default_factory=lambda: Resources(workers=2))  # Ray Train workers
    bf16: bool = execution_field(True)  # autocast on GPU
    checkpoint_every: int = execution_field(250)  # steps between resumable checkpoints
    log_every: int = execution_field(25)  # steps between logged metrics and progress lines
    image_every: int = execution_field(250)  # steps between logged reconstruction grids
    val_every: int = execution_field(500)  # validate (rank 0, EMA weights when kept); 0: only at the end
    max_failures: int = execution_field(
        2
    )  # worker failures Ray Train recovers from (from the last checkpoint)
    val_images: int = execution_field(2000)  # cap on the validation images

    def __post_init__(self):
        from models.vqgan import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r}; known: {sorted(PRESETS)}")
        if self.input == "segmentation" and self.recipe.perceptual_weight > 0:
            raise ValueError("recipe.perceptual_weight must be 0 for input=segmentation")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")


@dataclass(frozen=True)
class TrainVQGANPlan:
    """What training will read and build, from the image shards' manifest and descriptor."""

    inputs: tuple[InputRef, ...]  # the image shards (and the LPIPS trunk when the loss uses it)
    train_files: tuple[str, ...]  # the train split's data files
    train_rows: int
    image_channels: int
    model: VQGANConfig
    vgg16_path: str | None  # the LPIPS trunk, when found (perceptual loss, validation LPIPS)
    perceptual: str  # what the perceptual term runs as, for the run's tags

    def summary(self, cfg: TrainVQGANConfig) -> str:
        m = self.model
        return (
            f"{self.train_rows:,} train rows of `{cfg.input}` ({m.in_channels} channels) -> {cfg.preset} "
            f"(f{m.downsample_factor}, {m.codebook_size} codes), {cfg.steps} steps x {cfg.batch_size} on "
            f"{cfg.resources.describe()}; perceptual loss {self.perceptual}"
        )


def plan(cfg: TrainVQGANConfig) -> TrainVQGANPlan:
    """Check the input against the config and derive the model; every problem fails here, by name."""
    from models.losses import find_vgg16, require_vgg16
    from models.vqgan import preset

    if not cfg.images_uri:
        raise config_lib.ConfigError("train_vqgan.images_uri is not set")
    images = stage.read_manifest(cfg.images_uri)
    described = image_shards.describe(images)
    images.check_sizes()
    if cfg.input != "image" and cfg.input not in described.annotations:
        raise InputError(
            f"train_vqgan.input={cfg.input}: {cfg.images_uri} has no `{cfg.input}` column "
            f"(run the {cfg.input} stage first and train on its output)"
        )
    n_train = images.rows("train")
    ray_train.check_batch(
        STAGE, cfg.images_uri, n_train, "images", cfg.batch_size, cfg.resources.workers or 1,
        " (lower the batch size or ingest more images)",
    )  # fmt: skip
    classes = cfg.segmentation_classes
    if cfg.input == "segmentation" and classes is None:
        classes = len(described.annotations["segmentation"].labels or [])
        if not classes:
            raise config_lib.ConfigError(
                "train_vqgan.segmentation_classes: not set, and the segmentation stage recorded no labels"
            )
    channels = {"depth": 1, "segmentation": classes, "edges": 1}.get(cfg.input, described.channels)
    mcfg = preset(
        cfg.preset,
        channels=channels,
        codebook_size=cfg.codebook_size,
        resolution=cfg.crop_size,
        dead_code_threshold=cfg.dead_code_threshold,
        segmentation=cfg.input == "segmentation",
    )
    vgg = str(model_store.local_path(cfg.vgg16_uri)) if cfg.vgg16_uri else None
    inputs = [InputRef.output("images", images)]
    trunk = None
    if cfg.recipe.perceptual_weight > 0:  # fail before any work, naming the file
        trunk = require_vgg16(vgg, f"train_vqgan.recipe.perceptual_weight={cfg.recipe.perceptual_weight}")
        inputs.append(InputRef.weights("vgg16", str(trunk), model_store.file_sha256(trunk)))
        perceptual = f"lpips-vgg16 ({trunk})"
    else:
        trunk = find_vgg16(vgg) if cfg.input != "segmentation" else None  # for the validation LPIPS
        perceptual = "off (recipe.perceptual_weight=0)"
    return TrainVQGANPlan(
        tuple(inputs),
        tuple(images.data_uris("train")),
        n_train,
        described.channels,
        mcfg,
        str(trunk) if trunk is not None else None,
        perceptual,
    )


def build_trainer(cfg: TrainVQGANConfig, mcfg: VQGANConfig, vgg16_path=None, device="cpu", bf16=False):
    """The model, loss and optimizers of ``cfg`` (a fresh start; seed the RNG first for a fixed init)."""
    import torch

    from models.losses import VQGANLoss
    from models.vqgan import VQGAN
    from models.vqgan_training import VQGANTrainer

    loss = None
    if cfg.input != "segmentation":
        loss = VQGANLoss(cfg.recipe.loss_config(mcfg.in_channels), vgg16_path=vgg16_path).to(device)
    return VQGANTrainer(
        VQGAN(mcfg).to(device),
        loss,
        cfg.recipe,
        cfg.steps,
        objective="bce" if cfg.input == "segmentation" else "image",
        autocast_dtype=torch.bfloat16 if bf16 and device.startswith("cuda") else None,
    )


def _model_input(cfg: TrainVQGANConfig, mcfg: VQGANConfig, x):
    from models.vqgan_training import one_hot

    return one_hot(x, mcfg.in_channels) if cfg.input == "segmentation" else x.float()


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: the two-optimizer VQGAN loop (scaffolding: ``infra.ray_train.Session``)."""
    import torch

    from models.vqgan_training import hflip_, random_crop

    cfg: TrainVQGANConfig = config["cfg"]
    p: TrainVQGANPlan = config["plan"]
    session = ray_train.Session(config)
    torch.manual_seed(cfg.seed)  # same init everywhere
    trainer = build_trainer(cfg, p.model, p.vgg16_path, session.device, session.place.bf16)
    if (state := session.restore()) is not None:
        trainer.load_state_dict(state)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + session.rank + 7919 * trainer.step)
    held = None
    with session.tracking():
        for batch in session.batches("train", max(1, cfg.batch_size // session.world)):
            x = _model_input(cfg, p.model, batch["x"])
            x = random_crop(x, cfg.crop_size, gen) if cfg.crop_size else x
            x = hflip_(x, gen) if cfg.hflip else x
            logs, xrec = trainer.train_step(x)
            step, last = trainer.step, trainer.step >= cfg.steps
            session.count(x.shape[0])
            if step % cfg.log_every == 0:
                metrics = {f"train/{k}": v for k, v in logs.items()}
                session.log_metrics({**metrics, "train/images_per_s": session.items_per_s()}, step=step)
            if session.is_chief and cfg.val_every and step % cfg.val_every == 0 and not last:
                held = held or _held_out(cfg, p)
                session.log_metrics(_validate(cfg, trainer.final_model(), held, session.device), step=step)
            if step % cfg.image_every == 0 or last:
                grid = previews.reconstructions(x[:8], xrec[:8], cfg.input == "segmentation")
                session.log_image(grid, f"reconstructions/step_{step:07d}.png")
            if step % cfg.checkpoint_every == 0 or last:
                session.report(step, {"loss": logs["total_loss"]}, trainer.state_dict())
            if last:
                break


def _held_out(cfg: TrainVQGANConfig, p: TrainVQGANPlan):
    """The held-out data as (model input, labels or None, split name)."""
    import torch

    from models.vqgan_training import center_crop

    t, split = stage.read_held_out(cfg.images_uri, [cfg.input], cfg.val_images)
    values = image_shards.column_values(t, cfg.input)
    x = torch.from_numpy(decode_column(cfg.input, values, p.image_channels))
    x = center_crop(x, cfg.crop_size) if cfg.crop_size else x
    model_x = _model_input(cfg, p.model, x)
    return (model_x, x[:, 0], split) if cfg.input == "segmentation" else (model_x, None, split)


def _validate(cfg: TrainVQGANConfig, model, held, device: str = "cpu", lpips=None) -> dict[str, float]:
    from models.vqgan_training import evaluate

    x, labels, _ = held
    labels = None if labels is None else labels.to(device)
    scores = evaluate(model, x.to(device), model.config.codebook_size, lpips=lpips, labels=labels)
    return {f"val/{k}": float(v) for k, v in scores.items()}


def run(cfg: TrainVQGANConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> StageResult:
    """Train (or resume, or reuse) a VQGAN."""
    from models.losses import LPIPS
    from models.vqgan import VQGAN

    p = plan(cfg)
    job = StageRun(STAGE, cfg, p.inputs, experiment)
    if (done := job.cached()) is not None:
        return done
    log.info("train_vqgan: %s", p.summary(cfg))
    stage.read_manifest(cfg.images_uri).verify("train")  # what Ray Data reads next, checked first
    with job:
        objective = "bce+codebook" if cfg.input == "segmentation" else "l1+perceptual+gan+codebook"
        tracking.set_tags({"perceptual": p.perceptual, "objective": objective})

        def train_rows(b: dict) -> dict:  # the train split, decoded
            return {"x": decode_column(cfg.input, image_shards.column_values(b, cfg.input), p.image_channels)}

        shards = ray_train.read_parquet(list(p.train_files), [cfg.input], cfg.seed)
        datasets = {"train": shards.map_batches(train_rows, batch_format="pyarrow")}
        state = ray_train.fit(job, train_loop, {"cfg": cfg, "plan": p}, datasets, cfg)
        train_seconds = job.seconds
        model = VQGAN(p.model)
        model.load_state_dict(state["ema"] if state.get("ema") else state["model"])
        held = _held_out(cfg, p)
        lpips = LPIPS(p.vgg16_path) if p.vgg16_path is not None else None
        figures = _validate(cfg, model, held, lpips=lpips)
        tracking.set_tags({"val/split": held[2]})
        if lpips is None and cfg.input != "segmentation":
            why = "not computed: no VGG16 trunk of LPIPS (vgg16-397923af.pth) in the hub cache or vgg16_uri"
            tracking.set_tags({"val/lpips": why})
            log.warning("train_vqgan: val LPIPS %s; PSNR/SSIM only", why)
        step = int(state["step"])
        return ray_train.commit_model(
            job,
            model,
            counts={"steps": step},
            figures={**figures, "train_seconds": train_seconds},
            extra={"stage": STAGE, "step": step, "model_config": dataclasses.asdict(p.model)},
            register_name=cfg.register_name,
            register_alias=cfg.register_alias,
            step=step,
        )


def main(argv: list[str] | None = None) -> StageResult:
    from infra.cli import stage_main

    return stage_main(STAGE, TrainVQGANConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
