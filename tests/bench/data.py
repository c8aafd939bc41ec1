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
