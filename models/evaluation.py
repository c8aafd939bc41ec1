"""Generator evaluation that needs no downloaded weights (pure torch; the ``evaluate`` stage's body).

- Classification accuracy score (Ravuri & Vinyals 2019): a small timm classifier trained on the
  generated images with their conditioning labels and tested on real images, beside the same
  classifier trained on as many real images (the upper bound).
- The Fréchet distance in that real-trained classifier's feature space (the "domain FID" of
  MNIST-style data, where Inception features say little); the distance itself is torch-fidelity's.
- Memorisation: nearest-neighbour pixel distances of generated and of real test images to the
  training images; the duplicate rate within a set; class balance.

Inception-based FID / KID / IS / precision-recall need a weights file: ``infra.inception``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ClassifierRecipe:
    model: str = "resnet10t"  # a timm architecture, trained from scratch
    epochs: int = 5  # passes over the real training images
    batch_size: int = 128  # images per step
    lr: float = 2e-3  # AdamW's peak learning rate
    weight_decay: float = 0.05  # AdamW's weight decay
    seed: int = 0  # initialisation and order


@dataclass(frozen=True)
class ClassifierConfig:
    """A trained image classifier as a native checkpoint declares it (``models.checkpoint``)."""

    model: str  # the timm architecture
    classes: int
    in_chans: int
    size: tuple[int, int]  # the image size it was trained at
    label_names: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        names = d.get("label_names")
        return cls(d["model"], d["classes"], d["in_chans"], tuple(d["size"]), tuple(names) if names else None)


class Classifier(nn.Module):
    """A timm classifier of uint8 images with its config: what evaluate trains on the real images
    and commits, and what ``sample``'s rejection sampling ranks candidates by."""

    def __init__(self, config: ClassifierConfig):
        import timm

        super().__init__()
        self.config = config
        self.net = timm.create_model(
            config.model, pretrained=False, num_classes=config.classes, in_chans=config.in_chans
        )

    @classmethod
    def wrap(cls, net: nn.Module, config: ClassifierConfig) -> Classifier:
        out = cls(config)
        out.net.load_state_dict(net.state_dict())
        return out.eval()

    @torch.no_grad()
    def probability(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The probability of ``labels`` (N,) for uint8 images ``x`` (N, C, H, W)."""
        p = self.net(_as_input(x).to(next(self.parameters()).device)).float().softmax(-1)
        return p.gather(1, labels.to(p.device)[:, None])[:, 0]


def _as_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1]."""
    return x.float() / 127.5 - 1.0


def train_classifier(x: torch.Tensor, y: torch.Tensor, classes: int, recipe: ClassifierRecipe) -> nn.Module:
    """A timm classifier trained from scratch on uint8 images ``x`` (N, C, H, W) with labels ``y``:
    AdamW, cosine decay, random horizontal flips, a seeded order."""
    import timm

    g = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    model = timm.create_model(recipe.model, pretrained=False, num_classes=classes, in_chans=x.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * math.ceil(len(x) / recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=max(steps, 1), pct_start=0.15)
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(x), generator=g)
        for lo in range(0, len(x), recipe.batch_size):
            idx = order[lo : lo + recipe.batch_size]
            xb = _as_input(x[idx])
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels (N,), penultimate features (N, D)) of uint8 images ``x``."""
    preds, feats = [], []
    for lo in range(0, len(x), batch):
        f = model.forward_head(model.forward_features(_as_input(x[lo : lo + batch])), pre_logits=True)
        preds.append(model.get_classifier()(f).argmax(-1))
        feats.append(f.double())
    if not preds:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, dtype=torch.float64)
    return torch.cat(preds), torch.cat(feats)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (torch-fidelity's)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    stats = [fid_features_to_statistics(f.double()) for f in (a, b)]
    return float(fid_statistics_to_metric(stats[0], stats[1], False)["frechet_inception_distance"])


@torch.no_grad()
def nearest_distances(x: torch.Tensor, ref: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """For each image of ``x`` the L2 distance (pixels in [0, 1], per-pixel RMS) to its nearest
    image in ``ref``; both uint8 (N, C, H, W) of one size. The neighbour is found with one matrix
    product per chunk (|a|^2 + |b|^2 - 2ab), its distance then computed exactly, so an exact copy
    is at distance 0."""
    a = x.flatten(1).float() / 255
    b = ref.flatten(1).float() / 255
    b2 = (b * b).sum(1)
    out = []
    for lo in range(0, len(a), chunk):
        ac = a[lo : lo + chunk]
        nearest = (b2[None, :] - 2 * ac @ b.T).argmin(1)  # |a|^2 is the same along a row
        out.append((ac - b[nearest]).pow(2).mean(1).sqrt())
    return torch.cat(out) if out else torch.zeros(0)


def duplicate_fraction(x: torch.Tensor) -> float:
    """The share of images that are exact pixel copies of an earlier image of the same set."""
    seen = {bytes(np.ascontiguousarray(im.numpy())) for im in x}
    return 1.0 - len(seen) / max(len(x), 1)


def normalised_entropy(labels: torch.Tensor, classes: int) -> float:
    """Entropy of the label histogram over log(classes): 1 for perfectly balanced classes."""
    if classes < 2 or not len(labels):
        return 1.0
    p = torch.bincount(labels, minlength=classes).double() / len(labels)
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(classes))


def memorization(x_gen: torch.Tensor, x_ref: torch.Tensor, x_train: torch.Tensor, quantile: float) -> dict:
    """Memorisation and duplicates of uint8 generated images: the share whose nearest training
    image is at most as far as the ``quantile`` of the real test images' nearest distances (so
    exact copies always count), the threshold, both medians, and the duplicate rate."""
    d_gen = nearest_distances(x_gen, x_train)
    d_ref = nearest_distances(x_ref, x_train)
    threshold = float(torch.quantile(d_ref, quantile))
    return {
        "duplicate_fraction": duplicate_fraction(x_gen),
        "memorized_fraction": float((d_gen <= threshold).float().mean()),
        "memorization_threshold": threshold,
        "nn_distance_generated_median": float(d_gen.median()),
        "nn_distance_reference_median": float(d_ref.median()),
    }


@dataclass
class ClassifierScores:
    figures: dict[str, float]
    per_class: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    real_train_images: int = 0
    real_classifier: nn.Module | None = None  # the timm net trained on the real images


def classifier_scores(
    x_gen, y_gen, x_ref, y_ref, x_train, y_train, classes: int, recipe: ClassifierRecipe, names=None
) -> ClassifierScores:
    """The classification accuracy score of the generated images (a classifier trained on them,
    tested on the real reference images) beside the same classifier trained on as many real
    training images, their ratio, the label consistency and the domain FID in the real classifier's
    features, class balance; the same per class (uint8 images, int64 labels)."""
    real_idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(recipe.seed))[
        : len(x_gen)
    ]
    fake_clf = train_classifier(x_gen, y_gen, classes, recipe)
    real_clf = train_classifier(x_train[real_idx], y_train[real_idx], classes, recipe)
    p_fake, _ = predict(fake_clf, x_ref)
    p_real, f_ref = predict(real_clf, x_ref)
    p_gen, f_gen = predict(real_clf, x_gen)
    fig = {"class_balance": normalised_entropy(y_gen, classes)}
    fig["classifier_score"] = float((p_fake == y_ref).float().mean())
    fig["classifier_score_real"] = float((p_real == y_ref).float().mean())
    fig["classifier_score_ratio"] = fig["classifier_score"] / max(fig["classifier_score_real"], 1e-9)
    fig["label_consistency"] = float((p_gen == y_gen).float().mean())
    fig["domain_fid"] = frechet_distance(f_gen, f_ref)
    fig["predicted_class_balance"] = normalised_entropy(p_gen, classes)
    per = {}
    for cls in range(classes):
        r, g = y_ref == cls, y_gen == cls
        per[names[cls] if names else str(cls)] = {
            "generated_images": int(g.sum()),
            "classifier_score": float((p_fake[r] == cls).float().mean()) if r.any() else None,
            "classifier_score_real": float((p_real[r] == cls).float().mean()) if r.any() else None,
            "label_consistency": float((p_gen[g] == cls).float().mean()) if g.any() else None,
            "domain_fid": frechet_distance(f_gen[g], f_ref[r]) if g.sum() >= 50 and r.sum() >= 50 else None,
        }
    return ClassifierScores(fig, per, len(real_idx), real_clf)
