"""Evaluate: how good a generator and its dataset are, every figure traceable to its inputs.

Inputs: a generated image-shard output (the ``sample`` stage's) and a reference image-shard output
(``reference_split`` of it, e.g. the ingested real ``test`` split); ``train_uri`` (default: the
reference's ``train_split``) gives the real training images for the real-data classifier and the
memorisation check. Each set is capped at ``max_images`` (a fixed seeded sample).

- **Inception metrics** (torch-fidelity: FID, KID, IS, precision/recall; images resized the way it
  documents, to 299 px with its TensorFlow-compatible bilinear filter; grayscale repeated to RGB;
  precision/recall on the Inception pool features, as ADM's evaluator, not torch-fidelity's
  default VGG16, so one weights file serves all four).
  The weights file (``weights-inception-2015-12-05-6726825d.pth``) comes from
  ``inception_weights_uri`` (local or ``s3://``) or the torch hub cache. ``inception: required``
  fails naming the file when it is absent, ``skip_if_missing`` skips these metrics and says so,
  ``off`` never runs them.
- **Without downloaded weights** (``models.evaluation``): the classification accuracy score (a
  timm ``classifier_model`` trained on the generated images with their labels, tested on the
  reference split: ``classifier_score``; the same classifier trained on as many real training
  images: ``classifier_score_real``; their ratio), the Fréchet distance in the real classifier's
  features (``domain_fid``), how often the real classifier agrees with the generated labels
  (``label_consistency``), per class; memorisation (``memorized_fraction``: the share of generated
  images whose nearest training image, searched among all of them or ``memorization_images``, is
  at most as far as the ``memorization_quantile`` of the real test images' nearest distances, so
  exact copies always count), ``duplicate_fraction``
  within the generated set, ``class_balance`` (normalised entropy of the generated labels).
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
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from infra import config as config_lib
from infra import image_shards, model_store, stage, tracking
from infra.config import execution_field, input_field, output_field
from infra.stage import InputError, InputRef, StageResult, StageRun

log = logging.getLogger(__name__)
STAGE = "evaluate"
HEADLINE = (
    "classifier_score",
    "classifier_score_real",
    "domain_fid",
    "memorized_fraction",
    "fid",
)  # the figures a pipeline's summary shows for this stage
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's standard weights
MAX_GRID_CLASSES = 10


@dataclass(frozen=True)
class EvaluateConfig:
    generated_uri: str = input_field()  # the sample stage's output ("" = the pipeline's)
    reference_uri: str = input_field()  # real image shards ("" = the pipeline's ingest output)
    reference_split: str | None = "test"  # the real images compared against (None: all)
    train_uri: str | None = input_field(None)  # real training images; None: the reference's train split
    train_split: str = "train"
    output_uri: str = output_field()
    max_images: int = 10_000  # per set (generated, reference, train): a fixed seeded sample
    seed: int = 0
    inception: Literal["required", "skip_if_missing", "off"] = "required"
    inception_weights_uri: str | None = input_field(None)  # None: the torch hub cache's file
    classifier: bool = True  # classification accuracy score and domain FID (needs labels)
    classifier_model: str = "resnet10t"  # timm architecture, trained from scratch
    classifier_epochs: int = 15
    classifier_batch_size: int = 64
    classifier_lr: float = 3e-3
    memorization_quantile: float = 0.01
    memorization_images: int | None = None  # training images searched for neighbours (None: all)
    tokenizer_uri: str | None = input_field(None)  # also evaluate this tokenizer's reconstructions
    vgg16_uri: str | None = input_field(None)  # LPIPS trunk for the tokenizer evaluation
    # execution only (not part of the identity)
    batch_size: int = execution_field(64)  # Inception forward passes
    num_cpus: float = execution_field(1.0)  # of the Ray task that computes
    num_gpus: float = execution_field(0.0)

    def __post_init__(self):
        if self.max_images < 2:
            raise ValueError("max_images must be >= 2")
        if not 0 < self.memorization_quantile < 1:
            raise ValueError("memorization_quantile must lie in (0, 1)")

    @property
    def recipe(self):
        from models.evaluation import ClassifierRecipe

        return ClassifierRecipe(
            model=self.classifier_model,
            epochs=self.classifier_epochs,
            batch_size=self.classifier_batch_size,
            lr=self.classifier_lr,
            seed=self.seed,
        )


@dataclass(frozen=True)
class Sets:
    """Where each image set is read from: (URI, split or None) and how many images it has there."""

    generated: tuple[str, None] | None
    reference: tuple[str, str | None]
    train: tuple[str, str | None] | None
    channels: int
    classes: int | None  # classes for the classifier (None: no classifier score)
    label_names: list[str] | None
    inception_path: str | None  # local file; None: Inception metrics off or skipped
    inception_note: str
    vgg16_path: str | None
    registry: dict[str, Any] | None  # the generator's registry name and version, from the samples' lineage


def _count(uri: str, split: str | None) -> tuple[int, int]:
    """(images, labelled images) of an image-shard output, in ``split`` if given."""
    t = stage.read_committed_table(uri, ["split", "label"])
    keep = np.ones(t.num_rows, bool) if split is None else np.asarray(t["split"].to_pylist()) == split
    labels = t["label"].to_numpy(zero_copy_only=False)
    return int(keep.sum()), int((keep & ~np.isnan(labels.astype(float))).sum())


def plan(cfg: EvaluateConfig) -> tuple[Sets, list[InputRef]]:
    """Check the inputs before any work; every problem fails here, naming it."""
    from models.losses import find_vgg16

    if not cfg.reference_uri:
        raise config_lib.ConfigError("evaluate.reference_uri is not set")
    if not cfg.generated_uri and not cfg.tokenizer_uri:
        raise config_lib.ConfigError("evaluate: set generated_uri (a sample output) and/or tokenizer_uri")
    ref_m = stage.read_manifest(cfg.reference_uri)
    inputs = [InputRef.output("reference", ref_m)]
    ref_info = image_shards.info(ref_m)
    n_ref, n_ref_lab = _count(cfg.reference_uri, cfg.reference_split)
    if n_ref < 2:
        raise InputError(f"evaluate: {cfg.reference_uri} has {n_ref} images in split {cfg.reference_split!r}")
    generated, train, classes, registry = None, None, None, None
    names = ref_info["label_names"]
    if cfg.generated_uri:
        gen_m = stage.read_manifest(cfg.generated_uri)
        inputs.append(InputRef.output("generated", gen_m))
        registry = (gen_m.extra.get("generator") or {}).get("registry")
        gen_info = image_shards.info(gen_m)
        n_gen, n_gen_lab = _count(cfg.generated_uri, None)
        if n_gen < 2:
            raise InputError(f"evaluate: the generated set {cfg.generated_uri} holds {n_gen} images")
        if gen_info["channels"] != ref_info["channels"]:
            raise InputError(
                f"evaluate: the generated images have {gen_info['channels']} channels, the reference images "
                f"{ref_info['channels']}"
            )
        generated = (cfg.generated_uri, None)
        train_uri = cfg.train_uri or cfg.reference_uri
        if cfg.train_uri:
            inputs.append(InputRef.output("train", stage.read_manifest(cfg.train_uri)))
        n_train, n_train_lab = _count(train_uri, cfg.train_split)
        if n_train < 1:
            raise InputError(f"evaluate: {train_uri} has no images in split {cfg.train_split!r}")
        train = (train_uri, cfg.train_split)
        if cfg.classifier:
            missing = [
                what
                for what, n, lab in (("generated", n_gen, n_gen_lab), ("reference", n_ref, n_ref_lab))
                if lab < n
            ] + (["train"] if n_train_lab < n_train else [])
            if missing:
                raise InputError(
                    f"evaluate.classifier: the classification score needs labels, and the "
                    f"{', '.join(missing)} images have none (or not all); set classifier=false"
                )
            names = gen_info["label_names"] or names
            classes = len(names) if names else None
    inception_path, note = None, "off (inception=off)"
    if cfg.inception != "off":
        try:
            p = model_store.resolve_weights(cfg.inception_weights_uri or "", INCEPTION_FILE)
            inception_path, note = str(p), f"ran ({INCEPTION_FILE}, sha256 {model_store.file_sha256(p)})"
            inputs.append(InputRef.weights("inception", str(p), model_store.file_sha256(p)))
        except FileNotFoundError as e:
            if cfg.inception == "required":
                raise FileNotFoundError(
                    f"evaluate: FID, KID, IS and precision/recall need the Inception file {INCEPTION_FILE}: "
                    f"{e}; or set inception=skip_if_missing / off"
                ) from None
            note = f"skipped: {INCEPTION_FILE} not found (set inception_weights_uri)"
    vgg = None
    if cfg.tokenizer_uri:
        tok = model_store.load_first_stage(cfg.tokenizer_uri)
        inputs.append(InputRef.weights("tokenizer", cfg.tokenizer_uri, tok.sha256))
        if tok.model.config.in_channels != ref_info["channels"]:
            raise InputError(
                f"evaluate.tokenizer_uri takes {tok.model.config.in_channels}-channel images, the reference "
                f"images have {ref_info['channels']}"
            )
        found = find_vgg16(model_store.local_path(cfg.vgg16_uri) if cfg.vgg16_uri else None)
        vgg = str(found) if found else None
    sets = Sets(
        generated, (cfg.reference_uri, cfg.reference_split), train, int(ref_info["channels"] or 3),
        classes, names, inception_path, note, vgg, registry,
    )  # fmt: skip
    return sets, inputs


def _read(uri: str, split: str | None, n: int, seed: int, channels: int):
    """uint8 images (N, C, H, W), labels (N,) (-1 when missing) of a fixed seeded sample of <= n."""
    import torch

    from infra.imaging import pngs_to_array

    t = stage.read_committed_table(uri, ["image", "label", "split"])
    if split is not None:
        t = t.filter(np.asarray(t["split"].to_pylist()) == split)
    if t.num_rows > n:
        t = t.take(np.sort(np.random.default_rng(seed).choice(t.num_rows, n, replace=False)))
    x = pngs_to_array(t["image"].to_pylist(), channels)
    x = torch.from_numpy(np.rint((x + 1) * 127.5).astype(np.uint8))
    labels = torch.tensor([-1 if v is None else int(v) for v in t["label"].to_pylist()], dtype=torch.long)
    return x, labels


def _inception(x_a, x_b, path: str, batch: int, cuda: bool) -> dict[str, float]:
    """torch-fidelity's FID, KID, IS (of ``x_a``) and precision/recall between two uint8 sets."""
    import torch
    import torch_fidelity

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x if x.shape[1] == 3 else x.repeat(1, 3, 1, 1)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    n = min(len(x_a), len(x_b))
    m = torch_fidelity.calculate_metrics(
        input1=Images(x_a),
        input2=Images(x_b),
        fid=True,
        kid=True,
        isc=True,
        prc=True,
        feature_extractor="inception-v3-compat",  # one weights file for all four metrics:
        feature_layer_prc="2048",  # precision/recall on Inception pool features (as ADM's evaluator)
        feature_extractor_weights_path=path,
        batch_size=batch,
        cuda=cuda,
        kid_subset_size=min(1000, n),
        isc_splits=min(10, len(x_a)),
        verbose=False,
        cache=False,
    )
    keys = {
        "frechet_inception_distance": "fid",
        "kernel_inception_distance_mean": "kid",
        "kernel_inception_distance_std": "kid_std",
        "inception_score_mean": "is",
        "inception_score_std": "is_std",
        "precision": "precision",
        "recall": "recall",
    }
    return {ours: float(m[theirs]) for theirs, ours in keys.items() if theirs in m}


def compute(cfg: EvaluateConfig, sets: Sets) -> dict[str, Any]:
    """The stage's work (one Ray task): every figure, per-class figures, preview images."""
    import torch

    from infra.devices import placement
    from models import evaluation as ev

    cuda = placement(cfg.num_cpus, cfg.num_gpus, "fp32").device == "cuda"  # threads, device
    out: dict[str, Any] = {"figures": {}, "per_class": {}, "counts": {}, "timings_s": {}}
    fig, counts, times = out["figures"], out["counts"], out["timings_s"]
    c = sets.channels
    t0 = time.perf_counter()
    x_ref, y_ref = _read(*sets.reference, cfg.max_images, cfg.seed, c)
    counts["reference_images"] = len(x_ref)
    if sets.generated is not None:
        x_gen, y_gen = _read(*sets.generated, cfg.max_images, cfg.seed + 1, c)
        x_tr, y_tr = _read(*sets.train, cfg.max_images, cfg.seed + 2, c)
        counts.update(generated_images=len(x_gen), train_images=len(x_tr))
        if x_gen.shape[2:] != x_ref.shape[2:]:  # a generator of another size: compare at the real size
            x_gen = torch.nn.functional.interpolate(x_gen.float(), size=x_ref.shape[2:], mode="area")
            x_gen = x_gen.round().clamp(0, 255).to(torch.uint8)
        times["read"] = time.perf_counter() - t0
        t = time.perf_counter()
        fig["duplicate_fraction"] = ev.duplicate_fraction(x_gen)
        x_all, _ = _read(*sets.train, cfg.memorization_images or 2**62, cfg.seed + 3, c)
        counts["memorization_train_images"] = len(x_all)
        d_gen = ev.nearest_distances(x_gen, x_all)
        d_ref = ev.nearest_distances(x_ref, x_all)
        del x_all
        threshold = float(torch.quantile(d_ref, cfg.memorization_quantile))
        fig["memorized_fraction"] = float((d_gen <= threshold).float().mean())
        fig["memorization_threshold"] = threshold
        fig["nn_distance_generated_median"] = float(d_gen.median())
        fig["nn_distance_reference_median"] = float(d_ref.median())
        times["memorization"] = time.perf_counter() - t
        if sets.classes:
            k = sets.classes
            fig["class_balance"] = ev.normalised_entropy(y_gen, k)
            t = time.perf_counter()
            real_idx = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(cfg.seed))[
                : len(x_gen)
            ]
            fake_clf = ev.train_classifier(x_gen, y_gen, k, cfg.recipe)
            real_clf = ev.train_classifier(x_tr[real_idx], y_tr[real_idx], k, cfg.recipe)
            times["classifiers"] = time.perf_counter() - t
            p_fake, _ = ev.predict(fake_clf, x_ref)
            p_real, f_ref = ev.predict(real_clf, x_ref)
            p_gen, f_gen = ev.predict(real_clf, x_gen)
            fig["classifier_score"] = float((p_fake == y_ref).float().mean())
            fig["classifier_score_real"] = float((p_real == y_ref).float().mean())
            fig["classifier_score_ratio"] = fig["classifier_score"] / max(fig["classifier_score_real"], 1e-9)
            fig["label_consistency"] = float((p_gen == y_gen).float().mean())
            fig["domain_fid"] = ev.frechet_distance(f_gen, f_ref)
            fig["predicted_class_balance"] = ev.normalised_entropy(p_gen, k)
            counts["classifier_real_train_images"] = len(real_idx)
            per = out["per_class"]
            for cls in range(k):
                r, g = y_ref == cls, y_gen == cls
                name = sets.label_names[cls] if sets.label_names else str(cls)
                per[name] = {
                    "generated_images": int(g.sum()),
                    "classifier_score": float((p_fake[r] == cls).float().mean()) if r.any() else None,
                    "classifier_score_real": float((p_real[r] == cls).float().mean()) if r.any() else None,
                    "label_consistency": float((p_gen[g] == cls).float().mean()) if g.any() else None,
                    "domain_fid": ev.frechet_distance(f_gen[g], f_ref[r])
                    if g.sum() >= 50 and r.sum() >= 50
                    else None,
                }
            out["grid"] = _class_grid(x_ref, y_ref, x_gen, y_gen, min(k, MAX_GRID_CLASSES))
        if sets.inception_path:
            t = time.perf_counter()
            fig.update(_inception(x_gen, x_ref, sets.inception_path, cfg.batch_size, cuda))
            times["inception"] = time.perf_counter() - t
    if cfg.tokenizer_uri:
        t = time.perf_counter()
        out["tokenizer"] = _tokenizer_figures(cfg, sets, x_ref, cuda)
        fig.update({f"tokenizer/{k}": v for k, v in out["tokenizer"].items()})
        times["tokenizer"] = time.perf_counter() - t
    return out


def _tokenizer_figures(cfg: EvaluateConfig, sets: Sets, x_ref, cuda: bool) -> dict[str, float]:
    import torch

    from models.losses import LPIPS
    from models.training import evaluate as reconstruction

    model = model_store.load_first_stage(cfg.tokenizer_uri).model.eval()
    device = "cuda" if cuda else "cpu"
    x = (x_ref.float() / 127.5 - 1).to(device)
    lpips = LPIPS(sets.vgg16_path).to(device) if sets.vgg16_path else None
    figs = reconstruction(model.to(device), x, model.config.codebook_size, lpips=lpips)
    figs = {k: float(v) for k, v in figs.items() if k != "images"}
    if sets.inception_path:
        with torch.inference_mode():
            rec = torch.cat([model.decode(model.encode(x[i : i + 64])[0]) for i in range(0, len(x), 64)])
        rec_u8 = ((rec.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        figs["rfid"] = _inception(rec_u8, x_ref, sets.inception_path, cfg.batch_size, cuda)["fid"]
    return figs


def _class_grid(x_ref, y_ref, x_gen, y_gen, classes: int, per: int = 6) -> np.ndarray:
    """Rows: classes; left ``per`` real images, right ``per`` generated ones."""
    from infra.imaging import image_grid

    def hwc(im):  # uint8 (C, H, W) -> (H, W) or (H, W, 3)
        arr = im.permute(1, 2, 0).numpy()
        return arr[..., 0] if arr.shape[-1] == 1 else arr

    images = []
    for cls in range(classes):
        for x, y in ((x_ref, y_ref), (x_gen, y_gen)):
            ims = [hwc(im) for im in x[y == cls][:per]]
            images += ims + [np.zeros_like(hwc(x[0]))] * (per - len(ims))
    return image_grid(images, 2 * per)


def _bar_chart(per_class: dict[str, dict[str, Any]]) -> np.ndarray | None:
    """Per-class classifier scores (generated-trained vs real-trained) as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_class)
    gen = [per_class[n]["classifier_score"] or 0 for n in names]
    real = [per_class[n]["classifier_score_real"] or 0 for n in names]
    figure, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 3.5), dpi=100)
    pos = np.arange(len(names))
    ax.bar(pos - 0.2, real, 0.4, label="trained on real")
    ax.bar(pos + 0.2, gen, 0.4, label="trained on generated")
    ax.set_xticks(pos, names, rotation=45, ha="right")
    ax.set_ylabel("accuracy on real test images")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower left", fontsize="small")
    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image


def run(cfg: EvaluateConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> StageResult:
    """Evaluate (or reuse the committed evaluation of) a generated dataset and/or a tokenizer."""
    import ray
    import torch_fidelity

    from infra.cluster import ensure_ray

    sets, inputs = plan(cfg)
    job = StageRun(STAGE, cfg, cfg.output_uri, inputs, experiment)
    if (done := job.cached()) is not None:
        return done
    with job:
        tracking.set_tags({"evaluate/inception": sets.inception_note})
        log.info("evaluate: Inception metrics %s", sets.inception_note)
        ensure_ray()
        task = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)(compute)
        result = ray.get(task.remote(cfg, sets))
        figures = {k: v for k, v in result["figures"].items() if v is not None}
        registry = sets.registry
        import timm
        import torch

        report = {
            "figures": figures,
            "per_class": result["per_class"],
            "counts": result["counts"],
            "timings_s": result["timings_s"],
            "inputs": [dataclasses.asdict(i) for i in inputs],
            "inception": sets.inception_note,
            "libraries": {
                "torch-fidelity": torch_fidelity.__version__,
                "timm": timm.__version__,
                "torch": torch.__version__,
            },
            "seed": cfg.seed,
            "classifier": dataclasses.asdict(cfg.recipe) if sets.classes else None,
            "generator_registry": registry,
        }
        marker = job.out.write_file(0, "metrics.json", json.dumps(report, indent=2, default=float).encode())
        if result.get("grid") is not None:
            tracking.log_image(result["grid"], "evaluation/real_vs_generated.png")
        if result["per_class"]:
            tracking.log_dict(result["per_class"], "evaluation/per_class.json")
            tracking.log_image(_bar_chart(result["per_class"]), "evaluation/per_class_scores.png")
        if registry:
            tracking.tag_model_version(
                registry["name"], registry["version"], {f"eval/{k}": f"{v:.6g}" for k, v in figures.items()}
            )
        return job.commit(
            [marker],
            counts=result["counts"],
            figures=figures,
            extra={
                "inception": sets.inception_note,
                "generator_registry": registry,
                "per_class": result["per_class"],
            },
        )


def main(argv: list[str] | None = None) -> StageResult:
    from infra.cli import stage_main

    return stage_main(STAGE, EvaluateConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
