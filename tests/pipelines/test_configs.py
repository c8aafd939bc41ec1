"""Every shipped pipeline config loads and resolves (types, keys, derived URIs) without any service."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra import config as config_lib
from pipelines import full

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "pipelines" / "configs").glob("*.yaml"))


def test_the_shipped_configs_are_there():
    want = {"demo", "smoke", "folder", "fmnist-quality", "edges2img", "superres", "depth2img", "seg2img"}
    assert want <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_a_shipped_config_resolves(path):
    needs_source = path.stem in ("folder", "smoke", "depth2img", "seg2img")  # the user names their folder
    overrides = ["ingest.source_uri=/data/images"] if needs_source else []
    cfg = full.resolve(config_lib.load(full.FullConfig, path, overrides))
    root = cfg.run.root_uri
    assert cfg.sample.model_uri and cfg.evaluate.generated_uri.startswith(root)


EDGES2IMG = {
    "run": {"root_uri": "/runs/e2i"},
    "ingest": {"source_format": "fashion_mnist", "resolution": 32, "channels": 1, "resize": "pad"},
    "edges": {},
    "train_vqgan": {},
    "condition_vqgan": {"input": "edges"},
    "tokenize_images": {},
    "train_gpt": {"condition": "edges"},
    "sample": {},
}


def _load(tmp_path, data: dict, *overrides: str) -> full.FullConfig:
    import yaml

    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    return full.resolve(config_lib.load(full.FullConfig, tmp_path / "p.yaml", list(overrides)))


def test_a_condition_tokenizer_is_wired_through_the_chain(tmp_path):
    """edges -> its own VQGAN -> edges_codes beside the image codes -> a GPT with the edges prefix ->
    samples from those codes: every URI derived from run.root_uri."""
    cfg = _load(tmp_path, EDGES2IMG)
    assert cfg.edges.images_uri == "/runs/e2i/images" and cfg.edges.output_uri == "/runs/e2i/edges"
    assert cfg.train_vqgan.images_uri == "/runs/e2i/images"  # the image tokenizer: plain images
    assert (cfg.condition_vqgan.images_uri, cfg.condition_vqgan.output_uri) == (
        "/runs/e2i/edges",
        "/runs/e2i/edges-vqgan",
    )
    assert cfg.tokenize_images.images_uri == "/runs/e2i/edges"
    assert cfg.tokenize_images.edges_tokenizer_uri == "/runs/e2i/edges-vqgan"
    assert cfg.sample.conditions_uri == cfg.train_gpt.codes_uri == "/runs/e2i/codes"
    assert cfg.sample.conditions_split == "held-out"  # conditions the generator did not train on
    names = [n for n, _, _ in full._configured(cfg)]
    assert names[:6] == ["ingest", "edges", "train_vqgan", "condition_vqgan", "tokenize_images", "train_gpt"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"condition_vqgan": None}, "train_gpt.condition=edges needs edges_codes"),
        ({"condition_vqgan": {"input": "image"}}, "condition_vqgan.input: name the condition column"),
        ({"condition_vqgan": {"input": "lowres"}}, "condition_vqgan.input=lowres: no lowres stage"),
    ],
)
def test_a_miswired_condition_fails_in_one_line(tmp_path, change, message):
    data = {k: v for k, v in {**EDGES2IMG, **change}.items() if v is not None}
    with pytest.raises(config_lib.ConfigError, match=message) as e:
        _load(tmp_path, data)
    assert "\n" not in str(e.value)
