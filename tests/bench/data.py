"""The benchmarks' real data: Fashion-MNIST from the Debian package `dataset-fashion-mnist`."""

from __future__ import annotations

from pathlib import Path


def fashion_mnist_shards(tmp: Path, images: int, rows_per_shard: int):
    """The first ``images`` Fashion-MNIST images ingested as the demo does (1 channel, padded to 32)."""
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
