"""Synthetic code shards with a learnable rule, committed in the tokenize stage's format.

Row r of class c: a random first code s, then ``code[t] = (code[t - 1] + c + 1) % K``. Given the
class and the previous code every code but the first is determined, so a class-conditional model
can get far below the unigram entropy (log2 K bits: the codes are uniform), while an unconditional
one cannot tell the step size before the second code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from infra import schemas, stage
from infra.code_shards import CodeShards, ConditionCodes
from infra.stage import InputRef


def rule_codes(labels: np.ndarray, tokens: int, k: int, rng: np.random.Generator) -> np.ndarray:
    start = rng.integers(0, k, len(labels))
    steps = np.arange(tokens)[None, :] * (labels[:, None] + 1)
    return (start[:, None] + steps) % k


def write_code_shards(
    uri: str,
    *,
    n_train: int,
    n_val: int,
    k: int,
    grid: tuple[int, int],
    classes: int,
    tokenizer_uri: str,
    tokenizer_sha256: str,
    labelled: bool = True,
    shards: int = 2,
    seed: int = 0,
    depth_codebook: int = 0,
    depth_grid: tuple[int, int] | None = None,
    random_codes: bool = False,
) -> stage.Manifest:
    """``depth_codebook`` > 0 adds a ``depth_codes`` column (random codes on ``depth_grid``, default
    a half-size grid) as a depth tokenizer would; ``random_codes``: uniform random codes (nothing
    to learn but the rows themselves: a set that overfits) instead of the class rule."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    t = grid[0] * grid[1]
    labels = rng.integers(0, classes, n)
    codes = rng.integers(0, k, (n, t)) if random_codes else rule_codes(labels, t, k, rng)
    split = np.array(["train"] * n_train + ["val"] * n_val)
    order = rng.permutation(n)  # splits mixed over the shards
    conditions = {}
    if depth_codebook:
        half = depth_grid or (grid[0] // 2, grid[1] // 2)
        conditions["depth_codes"] = ConditionCodes(
            codebook_size=depth_codebook,
            grid=half,
            tokenizer_uri="/depth.safetensors",
            tokenizer_sha256="d" * 64,
        )
        depth = rng.integers(0, depth_codebook, (n, half[0] * half[1]))
    dataset = CodeShards(
        codebook_size=k,
        grid=grid,
        tokenizer_uri=tokenizer_uri,
        tokenizer_sha256=tokenizer_sha256,
        label_names=[f"class{c}" for c in range(classes)] if labelled else None,
        augmentations=["identity"],
        crop_size=None,
        image_size=(2 * grid[0], 2 * grid[1]),
        conditions=conditions,
    )
    schema = dataset.schema()
    config = {"crop_size": None, "synthetic": "rule_codes", "seed": seed}
    out = stage.StageOutput(uri, "tokenize_images", f"synthetic-{seed}-{n}-{k}-{labelled}-{depth_codebook}")
    markers = []
    for i, part in enumerate(np.array_split(order, shards)):
        extra_cols = {"depth_codes": schemas.encode_codes(depth[part])} if depth_codebook else {}
        table = pa.table(
            {
                "image_id": [f"img{j:06d}" for j in part],
                "aug_id": [0] * len(part),
                "label": [int(labels[j]) if labelled else None for j in part],
                "split": split[part].tolist(),
                "grid_h": [grid[0]] * len(part),
                "grid_w": [grid[1]] * len(part),
                "codes": schemas.encode_codes(codes[part]),
                **extra_cols,
            },
            schema=schema,
        )
        markers.append(out.write_shard(i, table, {"images": len(part)}))
    manifest, _ = out.commit(
        config=config,
        config_hash="synthetic",
        inputs=[InputRef.weights("tokenizer", tokenizer_uri, tokenizer_sha256)],
        markers=markers,
        counts={"images": n, "rows": n, "shards": shards},
        dataset=dataset.to_json(),
    )
    return manifest


def unigram_bits(codes: np.ndarray, k: int) -> float:
    p = np.bincount(codes.reshape(-1), minlength=k) / codes.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def tokenizer_file(root: Path, k: int, name: str = "tokenizer", seed: int = 0) -> tuple[str, str]:
    """A random tiny 1-channel VQGAN (f2, 16x16 -> 8x8 codes, ``k`` codes) saved natively as
    ``root/<name>.safetensors``; (uri, sha256)."""
    import torch

    from infra import storage
    from models import checkpoint
    from models.vqgan import VQGAN
    from tests.tiny import tiny_vqgan

    torch.manual_seed(seed)
    path = root / f"{name}.safetensors"
    checkpoint.save_native(VQGAN(tiny_vqgan(in_channels=1, out_channels=1, codebook_size=k)).eval(), path)
    return str(path), storage.file_sha256(path)
