"""The benchmarks' real data: Fashion-MNIST from the Debian package `dataset-fashion-mnist`."""

from __future__ import annotations

from pathlib import Path


def fashion_mnist_shards(tmp: Path, images: int, rows_per_shard: int):
    """``images`` Fashion-MNIST images (a fixed sample: ingest's max_images) ingested as the demo does."""
    from stages import ingest

    return ingest.run(
        ingest.IngestConfig(
            source_format="fashion_mnist",
            output_uri=str(tmp / "fm"),
            resolution=32,
            channels=1,
            resize="pad",
            max_images=images,
            rows_per_shard=rows_per_shard,
        ),
        "bench",
    )


def pipeline_codes(config: str) -> str:
    """The code shards of a shipped pipeline config (``pipelines/configs/<config>.yaml``): the
    pipeline up to tokenize under its own root_uri (reused when it ran before). Returns their URI."""
    import dataclasses

    from infra import config as config_lib
    from pipelines import full

    root = Path(__file__).resolve().parents[2]
    cfg = config_lib.load(full.FullConfig, root / "pipelines" / "configs" / f"{config}.yaml")
    cfg = dataclasses.replace(
        cfg,
        train_gpt=None,
        sample=None,
        evaluate=None,
        promote=None,
        run=dataclasses.replace(cfg.run, root_uri=str(root / cfg.run.root_uri)),
    )
    return full.run(cfg)["tokenize_images"]["output_uri"]


def demo_codes() -> str:
    """The demo's Fashion-MNIST code shards (f4-small tokenizer, 8x8 codes of 512): the demo pipeline
    up to tokenize under .local/runs/demo (reused when `make demo` ran; else ingest, VQGAN training
    and tokenization run first, ~8 min here). Returns the code shards' URI."""
    return pipeline_codes("demo")


def code_arrays(uri: str, split: str, condition: str | None = None):
    """(labels, codes) of one split of a code-shard output as torch int64 tensors; with
    ``condition`` (a condition code column, e.g. ``lowres_codes``) its codes instead of the labels."""
    import torch

    from infra import code_shards, stage

    t = stage.read_committed_table(uri, code_shards.COLUMNS + ([condition] if condition else []), split)
    rows = code_shards.decode_rows(t, code_shards.describe(uri).num_tokens)
    return torch.from_numpy(rows[condition or "label"]), torch.from_numpy(rows["codes"])
