"""Tokenize: image shards -> Parquet code shards, with a VQGAN loaded once per Ray actor.

Input: committed image shards (the ingest output) and a tokenizer URI: a native checkpoint (local or
``s3://``), an official taming release, or ``models:/<name>@<alias>`` from the MLflow registry.
Output: one code file per image data file (deterministic assignment, the same split), one row per
(image, augmentation): ``image_id``, ``aug_id``, ``label``, ``split``, ``grid_h``, ``grid_w`` and
``codes`` (2 bytes per code, zstd), described by ``infra.code_shards.CodeShards`` (the tokenizer's
URI and sha256, the codebook, the grid, the augmentations) in the manifest and every file. The
tokenizer's weights are part of the output's identity, so moving an alias to a new version is a
different config, never a stale no-op. A rerun after a kill tokenizes only the missing shards and
gives byte-identical files.

    python -m stages.tokenize_images images_uri=... tokenizer_uri=models:/demo-vqgan@candidate output_uri=...
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from infra import code_shards, image_shards, model_store, pool, schemas, stage, storage, tracking
from infra import config as config_lib
from infra.code_shards import CodeShards, ConditionCodes
from infra.config import execution_field, input_field, output_field
from infra.devices import Precision, Resources, auto_batch_size, placement
from infra.imaging import decode_column
from infra.stage import FileEntry, InputError, InputRef, ShardMarker, StageResult, StageRun

log = logging.getLogger(__name__)
STAGE = "tokenize_images"
HEADLINE = ("rows", "bytes_per_code", "images_per_s")  # the figures a pipeline's summary shows for this stage


@dataclass(frozen=True)
class TokenizeConfig:
    # native checkpoint, taming release, models:/<name>@<alias> ("" = the pipeline's); the
    # tokenizers count by their weights (sha256), not by the URI they were reached through
    tokenizer_uri: str = input_field()
    # condition tokenizers (train_vqgan with input=<column>): the column -> <column>_codes
    depth_tokenizer_uri: str | None = input_field(None)  # 1-channel VQGAN for `depth` -> depth_codes
    segmentation_tokenizer_uri: str | None = input_field(None)  # one-hot VQGAN -> segmentation_codes
    edges_tokenizer_uri: str | None = input_field(None)  # 1-channel VQGAN for `edges` -> edges_codes
    lowres_tokenizer_uri: str | None = input_field(None)  # VQGAN for `lowres` -> lowres_codes
    images_uri: str = input_field()  # committed image shards ("" = the pipeline's ingest output)
    output_uri: str = output_field()  # "" = derived by the pipeline from run.root_uri
    hflip: bool = False  # also tokenize the mirrored image (aug_id 1)
    num_crops: int = 0  # LlamaGen's recipe: extra random crops (aug_id 2, 3, ...), fixed per image_id
    crop_size: int | None = None  # tokenize crops of this side: aug 0/1 use the centre crop
    splits: list[str] | None = None  # only the data files of these splits (None: all)
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # execution only (not part of the identity)
    batch_size: int | None = execution_field(None)  # per forward pass; None: auto_batch_size (pixels, device)
    resources: Resources = execution_field(default_factory=Resources)  # workers: actors, a model each

    def __post_init__(self):
        if self.num_crops and not self.crop_size:
            raise ValueError("num_crops needs crop_size")


def _augmentations(cfg: TokenizeConfig) -> list[str]:
    return ["identity"] + (["hflip"] if cfg.hflip else []) + [f"crop{k}" for k in range(cfg.num_crops)]


@dataclass(frozen=True)
class TokenizePlan:
    """What tokenize will read and write, from the image shards' manifest and the tokenizers' headers."""

    inputs: tuple[InputRef, ...]  # the image shards (by identity) and every tokenizer (by sha256)
    source: stage.Manifest  # the image shards read
    files: tuple[FileEntry, ...]  # their data files to tokenize (of the chosen splits): one output shard each
    images: int
    dataset: CodeShards
    conditions: tuple[tuple[str, str], ...]  # (code column, the image-shard column it tokenizes)

    def summary(self, cfg: TokenizeConfig) -> str:
        d = self.dataset
        conds = "".join(f" + {c}" for c, _ in self.conditions)
        return (
            f"{stage.counted(self.images, 'image')} in {stage.counted(len(self.files), 'file')} from "
            f"{cfg.images_uri} x "
            f"{len(d.augmentations)} views -> {d.grid[0]}x{d.grid[1]} codes of {d.codebook_size}{conds} "
            f"(tokenizer sha256 {d.tokenizer_sha256[:12]}) on {cfg.resources.describe()}"
        )


def _grid(header, size: tuple[int, int], crop: int | None, what: str) -> tuple[int, int]:
    f = header.config.downsample_factor
    h, w = (crop, crop) if crop else size
    if h % f or w % f:
        raise InputError(f"{what}: {h}x{w} images are not a multiple of its downsampling factor {f}")
    return h // f, w // f


def plan(cfg: TokenizeConfig) -> TokenizePlan:
    """Check the image shards against the tokenizers' headers (no weights loaded); every problem
    fails here, by name."""
    if not cfg.images_uri or not cfg.tokenizer_uri:
        raise config_lib.ConfigError("tokenize_images: images_uri and tokenizer_uri must be set")
    images = stage.read_manifest(cfg.images_uri)  # raises a clear error when not committed
    described = image_shards.describe(images)
    tok = model_store.first_stage_header(cfg.tokenizer_uri)  # fails before any work on a bad URI
    mcfg = tok.config
    if mcfg.in_channels != described.channels:
        raise InputError(
            f"the tokenizer {cfg.tokenizer_uri} takes {mcfg.in_channels}-channel images but {cfg.images_uri} "
            f"holds {described.channels}-channel images"
        )
    if mcfg.codebook_size > schemas.MAX_CODEBOOK:
        raise InputError(f"codebook of {mcfg.codebook_size} codes does not fit 2 bytes per code")
    side = described.resolution
    if cfg.crop_size and (side is None or cfg.crop_size >= side):
        raise InputError(f"crop_size {cfg.crop_size} must be below the image side {side} (square images)")
    inputs = [InputRef.output("images", images), InputRef.weights("tokenizer", cfg.tokenizer_uri, tok.sha256)]
    conditions, columns = {}, []
    for col, source in code_shards.CONDITION_SOURCES.items():
        uri = getattr(cfg, f"{source}_tokenizer_uri")
        if not uri:
            continue
        header = model_store.first_stage_header(uri, f" ({col})")
        if source not in described.annotations:
            raise InputError(
                f"{cfg.images_uri} has no `{source}` column: run the {source} stage first and tokenize "
                "its output"
            )
        want = {"depth": 1, "edges": 1, "lowres": described.channels}.get(source)
        if want is not None and header.config.in_channels != want:
            raise InputError(
                f"the {source} tokenizer {uri} must take {want} channel(s), not {header.config.in_channels}"
            )
        grid = _grid(header, described.size, cfg.crop_size, f"the {source} tokenizer {uri}")
        conditions[col] = ConditionCodes(
            codebook_size=header.config.codebook_size,
            grid=grid,
            tokenizer_uri=uri,
            tokenizer_sha256=header.sha256,
        )
        columns.append((col, source))
        inputs.append(InputRef.weights(f"{col}_tokenizer", uri, header.sha256))
    chosen = [f for f in images.data_files() if cfg.splits is None or f.split in cfg.splits]
    dataset = CodeShards(
        codebook_size=mcfg.codebook_size,
        grid=_grid(tok, described.size, cfg.crop_size, f"the tokenizer {cfg.tokenizer_uri}"),
        tokenizer_uri=cfg.tokenizer_uri,
        tokenizer_sha256=tok.sha256,
        label_names=described.label_names,
        augmentations=_augmentations(cfg),
        crop_size=cfg.crop_size,
        image_size=described.size,
        conditions=conditions,
    )
    images.check_sizes()
    return TokenizePlan(
        tuple(inputs), images, tuple(chosen), sum(f.rows for f in chosen), dataset, tuple(columns)
    )


class TokenizeShards(pool.Worker):
    """Ray Data actor: loads the tokenizers once, then tokenizes whole image files per call."""

    def __init__(self, cfg: TokenizeConfig, p: TokenizePlan, out: stage.StageOutput):
        import torch

        t0 = time.perf_counter()
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # in the actor
        self.cfg, self.p, self.out, self.schema = cfg, p, out, p.dataset.schema()
        place = placement(cfg.resources, cfg.precision)
        self.device, self.dtype = place.device, place.dtype

        def load(uri: str, sha256: str):
            model = model_store.load_first_stage(uri, sha256).model.to(self.device, self.dtype).eval()
            return model.to(memory_format=torch.channels_last)

        d = p.dataset
        self.model = load(d.tokenizer_uri, d.tokenizer_sha256)
        self.cond_models = {c: load(v.tokenizer_uri, v.tokenizer_sha256) for c, v in d.conditions.items()}
        ready = time.perf_counter() - t0
        log.info("tokenize: actor ready in %.1f s (%s, %s)", ready, self.device, self.dtype)

    def _encode(self, model, x: np.ndarray, segmentation: bool = False) -> np.ndarray:
        """Codes (N, h, w) of x (images, or label ids with ``segmentation``)."""
        from models.vqgan import encode_batches

        bs = self.cfg.batch_size or auto_batch_size(*x.shape[-2:], self.device)
        return encode_batches(model, x, bs, self.device, self.dtype, segmentation)

    def _conditions(self, t: pa.Table) -> dict[str, tuple]:
        """column -> (model, compact array (N, C, H, W), is a label map) for the condition tokenizers."""
        out = {}
        for col, source in self.p.conditions:
            model = self.cond_models[col]
            arr = decode_column(source, image_shards.column_values(t, source), model.config.in_channels)
            out[col] = (model, arr, source == "segmentation")
        return out

    def process(self, shard: int, item: dict[str, Any]) -> ShardMarker:
        columns = ["image_id", "image", "label", "split", *(source for _, source in self.p.conditions)]
        t_start = time.perf_counter()
        t = pool.read_item(item, columns)
        ids = t["image_id"].to_pylist()
        pngs = schemas.image_bytes(t["image"])
        inputs = {"codes": (self.model, decode_column("image", pngs, self.model.config.in_channels), False)}
        inputs.update(self._conditions(t))
        t_decoded = time.perf_counter()
        per_col = {
            col: [
                (aug_id, self._encode(model, view, seg))
                for aug_id, view in code_shards.views(
                    arr, ids, self.p.dataset.augmentations, self.cfg.crop_size
                )
            ]
            for col, (model, arr, seg) in inputs.items()
        }
        t_encoded = time.perf_counter()
        rows = self._rows(t, per_col)
        small = ["image_id", "aug_id", "label", "split", "grid_h", "grid_w"]  # codes: plain, no stats
        marker = self.out.write_shard(
            shard,
            rows,
            {"images": t.num_rows},
            use_dictionary=small,
            write_statistics=small,
            compression_level=3,
        )
        log.info(
            "tokenize: shard %d written (%d images, %d rows): read+decode %.1f s, encode %.1f s, "
            "write %.1f s",
            shard,
            t.num_rows,
            rows.num_rows,
            t_decoded - t_start,
            t_encoded - t_decoded,
            time.perf_counter() - t_encoded,
        )
        return marker

    def _rows(self, t: pa.Table, per_col: dict[str, list[tuple[int, np.ndarray]]]) -> pa.Table:
        grid = self.p.dataset.grid
        for col, per_aug in per_col.items():
            for _, codes in per_aug:
                want = grid if col == "codes" else self.p.dataset.conditions[col].grid
                if len(codes) and tuple(codes.shape[1:]) != tuple(want):
                    raise ValueError(f"{col}: the tokenizer gave {codes.shape[1:]} codes, the plan {want}")
        augs = [a for a, _ in per_col["codes"]]
        order = [(i, a) for i in range(t.num_rows) for a in augs]  # image by image, then augmentation
        data = {
            "image_id": [t["image_id"][i].as_py() for i, _ in order],
            "aug_id": [a for _, a in order],
            "label": [t["label"][i].as_py() for i, _ in order],
            "split": [t["split"][i].as_py() for i, _ in order],
            "grid_h": [grid[0]] * len(order),
            "grid_w": [grid[1]] * len(order),
        }
        for col, per_aug in per_col.items():
            flat = {a: c.reshape(len(c), -1) for a, c in per_aug}
            data[col] = schemas.encode_codes(np.stack([flat[a][i] for i, a in order]) if order else [])
        return pa.table(data, schema=self.schema)


def run(cfg: TokenizeConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> StageResult:
    """Run (or resume, or reuse) the tokenize stage."""
    p = plan(cfg)
    job = StageRun(STAGE, cfg, p.inputs, experiment)
    if (done := job.cached()) is not None:
        return done
    log.info("tokenize: %s", p.summary(cfg))
    with job:
        tracking.set_tags({"tokenizer_sha256": p.dataset.tokenizer_sha256})
        markers, reused = pool.map_items(
            TokenizeShards,
            (cfg, p, job.out),
            pool.file_items(p.source, list(p.files)),
            job.out,
            cfg.resources,
        )
        n_images = sum(m.counts["images"] for m in markers)
        rows = sum(m.rows for m in markers)
        n_aug = len(p.dataset.augmentations)
        if n_images != p.images or rows != n_images * n_aug:
            raise RuntimeError(
                f"tokenize counts do not add up: {n_images} images read of {p.images}, x {n_aug} "
                f"augmentations != {rows} rows"
            )
        files = [f for m in markers for f in m.data]
        code_bytes = sum(_column_bytes(job.out.file_uri(f), "codes") for f in files)
        n_codes = max(rows * p.dataset.num_tokens, 1)
        fresh = reused < len(markers)
        return job.commit(
            markers,
            counts={"images": n_images, "rows": rows, "shards": len(markers), "reused_shards": reused},
            figures={
                "images_per_s": n_images / max(job.seconds, 1e-9) if fresh else 0.0,
                "bytes_per_code": code_bytes / n_codes,
                "file_bytes_per_code": sum(f.bytes for f in files) / n_codes,
            },
            dataset=p.dataset,
        )


def _column_bytes(uri: str, column: str) -> int:
    """Compressed on-disk bytes of one column (from the Parquet footer alone)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    idx = meta.schema.to_arrow_schema().get_field_index(column)
    return sum(meta.row_group(g).column(idx).total_compressed_size for g in range(meta.num_row_groups))


def main(argv: list[str] | None = None) -> StageResult:
    from infra.cli import stage_main

    return stage_main(STAGE, TokenizeConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
