"""Tokenize: image shards -> Parquet code shards, with a VQGAN loaded once per Ray actor.

Input: committed image shards (the ingest output) and a tokenizer URI: a native checkpoint (local or
``s3://``), an official taming release, or ``models:/<name>@<alias>`` from the MLflow registry.
Output: one code shard per image shard (deterministic assignment), one row per (image,
augmentation): ``image_id``, ``aug_id``, ``label``, ``split``, ``grid_h``, ``grid_w`` and ``codes``
(2 bytes per code, zstd). The tokenizer's sha256, codebook size and code dtype go into the file
metadata and the manifest; the tokenizer's weights are part of the output's identity, so moving an
alias to a new version is a different config, never a stale no-op. A rerun after a kill
tokenizes only the missing shards and gives byte-identical files.

    python -m stages.tokenize_images images_uri=... tokenizer_uri=models:/demo-vqgan@candidate output_uri=...
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from infra import code_shards, image_shards, model_store, pool, schemas, stage, storage, tracking
from infra import config as config_lib
from infra.config import execution_field, input_field, output_field
from infra.devices import Precision, placement
from infra.imaging import decode_column
from infra.stage import InputError, InputRef, ShardMarker, StageResult, StageRun

log = logging.getLogger(__name__)
STAGE = "tokenize_images"
HEADLINE = ("rows", "bytes_per_code", "images_per_s")  # the figures a pipeline's summary shows for this stage


@dataclass(frozen=True)
class TokenizeConfig:
    # native checkpoint, taming release, models:/<name>@<alias> ("" = the pipeline's); the
    # tokenizers count by their weights (sha256), not by the URI they were reached through
    tokenizer_uri: str = input_field()
    depth_tokenizer_uri: str | None = input_field(None)  # 1-channel VQGAN for `depth` -> depth_codes
    segmentation_tokenizer_uri: str | None = input_field(None)  # one-hot VQGAN -> segmentation_codes
    images_uri: str = input_field()  # committed image shards ("" = the pipeline's ingest output)
    output_uri: str = output_field()  # "" = derived by the pipeline from run.root_uri
    hflip: bool = False  # also tokenize the mirrored image (aug_id 1)
    num_crops: int = 0  # LlamaGen's recipe: extra random crops (aug_id 2, 3, ...), fixed per image_id
    crop_size: int | None = None  # tokenize crops of this side: aug 0/1 use the centre crop
    splits: list[str] | None = None  # only these splits (None: all)
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # execution only (not part of the identity)
    batch_size: int | None = execution_field(None)  # per forward pass; None: auto_batch_size (pixels, device)
    concurrency: int = execution_field(1)  # actors (each holds one copy of the model)
    num_cpus: float = execution_field(1.0)  # per actor
    num_gpus: float = execution_field(0.0)  # per actor

    def __post_init__(self):
        if self.num_crops and not self.crop_size:
            raise ValueError("num_crops needs crop_size")


CPU_BATCH_PIXELS = 32 * 1024  # fastest here: f16 at 256px one image, f4 at 32px 32 images (bench_tokenize)
GPU_BATCH_PIXELS = 64 * 256 * 256  # 64 images at 256px (not measured: no GPU session yet)


def auto_batch_size(height: int, width: int, device: str) -> int:
    """Images per forward pass when the config leaves it open: a pixel budget, not an image count.

    On CPU, small batches are faster (the activations stay in cache): with two 1-thread actors the
    f16 encoder ran 1.61 s/image at batch 1 and 2.5 s/image at batch 32; the demo tokenizer 610
    images/s at batch 32 and 390 at batch 256.
    """
    budget = GPU_BATCH_PIXELS if device == "cuda" else CPU_BATCH_PIXELS
    return int(min(1024, max(1, budget // max(1, height * width))))


def _augmentations(cfg: TokenizeConfig) -> list[str]:
    return ["identity"] + (["hflip"] if cfg.hflip else []) + [f"crop{k}" for k in range(cfg.num_crops)]


class TokenizeShards(pool.Worker):
    """Ray Data actor: loads the tokenizer once, then tokenizes whole image shards per call."""

    def __init__(self, cfg: TokenizeConfig, out: stage.StageOutput, metadata: dict[str, str]):
        import torch

        t0 = time.perf_counter()
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # in the actor
        self.cfg, self.out, self.metadata = cfg, out, metadata
        place = placement(cfg.num_cpus, cfg.num_gpus, cfg.precision)
        self.device, self.dtype = place.device, place.dtype

        def load(uri):
            model = model_store.load_first_stage(uri).model.to(self.device, self.dtype).eval()
            return model.to(memory_format=torch.channels_last)

        self.model = load(cfg.tokenizer_uri)
        self.cond_models = {}
        if cfg.depth_tokenizer_uri:
            self.cond_models["depth_codes"] = load(cfg.depth_tokenizer_uri)
        if cfg.segmentation_tokenizer_uri:
            self.cond_models["segmentation_codes"] = load(cfg.segmentation_tokenizer_uri)
        ready = time.perf_counter() - t0
        log.info("tokenize: actor ready in %.1f s (%s, %s)", ready, self.device, self.dtype)

    def _encode(self, model, x: np.ndarray, expand=None) -> np.ndarray:
        """Codes (N, h, w) of x; ``expand`` turns a compact batch (e.g. label ids) into model input."""
        import torch

        if not len(x):
            return np.zeros((0, 1, 1), np.int64)
        codes = []
        bs = self.cfg.batch_size or auto_batch_size(*x.shape[-2:], self.device)
        with torch.inference_mode():
            for lo in range(0, len(x), bs):
                # channels-last memory (no copy for decoded images, which are NHWC already): the
                # convolutions run ~20% faster than on NCHW on CPU (tests/bench/bench_tokenize.py)
                nhwc = np.ascontiguousarray(x[lo : lo + bs].transpose(0, 2, 3, 1))
                batch = torch.from_numpy(nhwc).permute(0, 3, 1, 2).to(self.device)
                batch = expand(batch) if expand is not None else batch
                batch = batch.to(self.dtype).contiguous(memory_format=torch.channels_last)
                codes.append(model.encode(batch)[2].cpu().numpy())
        return np.concatenate(codes)  # (N, h, w)

    def _views(self, full: np.ndarray, ids: list[str]):
        """(aug_id, array) for every augmentation of a batch (N, C, H, W): the same views for
        images and their condition maps."""
        x = full
        if self.cfg.crop_size:  # every row at the crop size: identity/hflip use the centre crop
            c, side = self.cfg.crop_size, full.shape[-1]
            o = (side - c) // 2
            x = full[..., o : o + c, o : o + c]
        for aug_id, aug in enumerate(_augmentations(self.cfg)):
            if aug == "identity":
                yield aug_id, x
            elif aug == "hflip":
                yield aug_id, x[..., ::-1]
            else:
                k, c = int(aug[4:]), self.cfg.crop_size
                offs = [code_shards.crop_offset(i, k, full.shape[-1], c) for i in ids]
                yield aug_id, np.stack([full[n, :, r : r + c, q : q + c] for n, (r, q) in enumerate(offs)])

    def _conditions(self, t: pa.Table) -> dict[str, tuple]:
        """column -> (model, compact array (N, C, H, W), expand) for the configured condition tokenizers."""
        from models.training import one_hot

        out = {}
        if "depth_codes" in self.cond_models:
            arr = decode_column("depth", t["depth"].to_pylist())
            out["depth_codes"] = (self.cond_models["depth_codes"], arr, None)
        if "segmentation_codes" in self.cond_models:
            model = self.cond_models["segmentation_codes"]
            k = model.config.in_channels
            arr = decode_column("segmentation", t["segmentation"].to_pylist())
            out["segmentation_codes"] = (model, arr, functools.partial(one_hot, classes=k))
        return out

    def process(self, shard: int, item: dict[str, Any]) -> ShardMarker:
        columns = ["image_id", "image", "label", "split"]
        columns += [
            c
            for c, on in (("depth", "depth_codes"), ("segmentation", "segmentation_codes"))
            if on in self.cond_models
        ]
        t_start = time.perf_counter()
        t = storage.read_parquet(item["uri"], columns)
        if self.cfg.splits is not None:
            t = t.filter(pa.compute.is_in(t["split"], pa.array(self.cfg.splits)))
        ids = t["image_id"].to_pylist()
        inputs = {
            "codes": (
                self.model,
                decode_column("image", t["image"].to_pylist(), self.model.config.in_channels),
                None,
            )
        }
        inputs.update(self._conditions(t))
        t_decoded = time.perf_counter()
        per_col = {
            col: [(aug_id, self._encode(model, view, expand)) for aug_id, view in self._views(arr, ids)]
            for col, (model, arr, expand) in inputs.items()
        }
        t_encoded = time.perf_counter()
        rows = self._rows(t, per_col)
        small = ["image_id", "aug_id", "label", "split", "grid_h", "grid_w"]  # codes: plain, no stats
        marker = self.out.write_shard(
            shard,
            {"data": rows},
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
        n = t.num_rows
        grids = {(col, a): c.shape[1:] for col, per_aug in per_col.items() for a, c in per_aug if len(c)}
        main = {g for (col, _), g in grids.items() if col == "codes"}
        if len(main) > 1:
            raise ValueError(f"augmentations give different code grids {sorted(main)}; use one crop size")
        augs = [a for a, _ in per_col["codes"]]
        order = [(i, a) for i in range(n) for a in augs]  # image by image, then augmentation
        lengths = {col: int(np.prod(per_aug[0][1].shape[1:])) for col, per_aug in per_col.items()}
        grid_h, grid_w = per_col["codes"][0][1].shape[1:]
        cond = {col: length for col, length in lengths.items() if col != "codes"}
        schema = schemas.with_metadata(schemas.code_schema(lengths["codes"], cond), self.metadata)
        data = {
            "image_id": [t["image_id"][i].as_py() for i, _ in order],
            "aug_id": [a for _, a in order],
            "label": [t["label"][i].as_py() for i, _ in order],
            "split": [t["split"][i].as_py() for i, _ in order],
            "grid_h": [grid_h] * len(order),
            "grid_w": [grid_w] * len(order),
        }
        for col, per_aug in per_col.items():
            flat = {a: c.reshape(len(c), -1) for a, c in per_aug}
            data[col] = schemas.encode_codes(np.stack([flat[a][i] for i, a in order]) if order else [])
        return pa.table(data, schema=schema)


def _check_conditions(cfg: TokenizeConfig, images: stage.Manifest) -> dict[str, model_store.LoadedModel]:
    """Load the condition tokenizers and check that the image shards carry their columns."""
    wanted = {
        "depth_codes": (cfg.depth_tokenizer_uri, "depth"),
        "segmentation_codes": (cfg.segmentation_tokenizer_uri, "segmentation"),
    }
    out = {}
    for col, (uri, source) in wanted.items():
        if not uri:
            continue
        loaded = model_store.load_first_stage(uri)
        if images.files and source not in stage.column_names(images):
            raise InputError(
                f"{cfg.images_uri} has no `{source}` column: run the {source} stage first "
                "and tokenize its output"
            )
        if source == "depth" and loaded.model.config.in_channels != 1:
            raise InputError(
                f"the depth tokenizer {uri} must take 1 channel, not {loaded.model.config.in_channels}"
            )
        out[col] = loaded
    return out


def _check_compatible(cfg: TokenizeConfig, images: stage.Manifest, loaded: model_store.LoadedModel) -> None:
    mcfg = loaded.model.config
    described = image_shards.info(images)
    channels = described["channels"]
    if channels is not None and channels != mcfg.in_channels:
        raise InputError(
            f"the tokenizer {cfg.tokenizer_uri} takes {mcfg.in_channels}-channel images but {cfg.images_uri} "
            f"holds {channels}-channel images"
        )
    if mcfg.codebook_size > schemas.MAX_CODEBOOK:
        raise InputError(f"codebook of {mcfg.codebook_size} codes does not fit 2 bytes per code")
    side = described["resolution"]
    if cfg.crop_size and side is not None and cfg.crop_size >= side:
        raise InputError(f"crop_size {cfg.crop_size} must be below the image side {side}")


def run(cfg: TokenizeConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> StageResult:
    """Run (or resume, or reuse) the tokenize stage."""
    if not cfg.images_uri or not cfg.tokenizer_uri:
        raise config_lib.ConfigError("tokenize_images: images_uri and tokenizer_uri must be set")
    images = stage.read_manifest(cfg.images_uri)  # raises a clear error when not committed
    loaded = model_store.load_first_stage(cfg.tokenizer_uri)  # fails before any work on a bad URI
    _check_compatible(cfg, images, loaded)
    mcfg = loaded.model.config
    conds = _check_conditions(cfg, images)
    inputs = [
        InputRef.output("images", images),
        InputRef.weights("tokenizer", cfg.tokenizer_uri, loaded.sha256),
    ]
    inputs += [InputRef.weights(f"{col}_tokenizer", c.uri, c.sha256) for col, c in conds.items()]
    job = StageRun(STAGE, cfg, cfg.output_uri, inputs, experiment)
    if (done := job.cached()) is not None:
        return done
    metadata = {
        "taming.tokenizer_uri": cfg.tokenizer_uri,
        "taming.tokenizer_sha256": loaded.sha256,
        "taming.codebook_size": str(mcfg.codebook_size),
        "taming.code_dtype": schemas.CODE_DTYPE,
        "taming.augmentations": json.dumps(_augmentations(cfg)),
        **{f"taming.{col}.tokenizer_sha256": c.sha256 for col, c in conds.items()},
        **{f"taming.{col}.codebook_size": str(c.model.config.codebook_size) for col, c in conds.items()},
    }
    with job:
        tracking.set_tags({"tokenizer_sha256": loaded.sha256})
        markers, reused = pool.map_items(
            TokenizeShards,
            (cfg, job.out, metadata),
            pool.shard_items(images.data_uris()),
            job.out,
            concurrency=cfg.concurrency,
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
        )
        n_images = sum(m.counts["images"] for m in markers)
        rows = sum(m.rows() for m in markers)
        n_aug = len(_augmentations(cfg))
        if rows != n_images * n_aug:
            raise RuntimeError(
                f"tokenize counts do not add up: {n_images} images x {n_aug} augmentations != {rows}"
            )
        expected_images = sum(f.rows for f in images.files)
        if cfg.splits is None and n_images != expected_images:
            raise RuntimeError(f"tokenize read {n_images} images but the image shards hold {expected_images}")
        grid = (mcfg.resolution // mcfg.downsample_factor,) * 2  # nominal; rows carry the real grid
        data_uris = [job.out.file_uri(m) for m in markers]
        data_bytes = sum(m.files["data"].bytes for m in markers)
        code_bytes = sum(_column_bytes(u, "codes") for u in data_uris)
        first = storage.read_parquet(data_uris[0], ["grid_h", "grid_w"])
        if first.num_rows:
            grid = (first["grid_h"][0].as_py(), first["grid_w"][0].as_py())
        n_codes = max(rows * grid[0] * grid[1], 1)
        fresh = reused < len(markers)
        return job.commit(
            markers,
            counts={"images": n_images, "rows": rows, "shards": len(markers), "reused_shards": reused},
            figures={
                "images_per_s": n_images / max(job.seconds, 1e-9) if fresh else 0.0,
                "bytes_per_code": code_bytes / n_codes,
                "file_bytes_per_code": data_bytes / n_codes,
            },
            extra={
                "tokenizer_uri": cfg.tokenizer_uri,
                "tokenizer_sha256": loaded.sha256,
                "codebook_size": mcfg.codebook_size,
                "grid": list(grid),
                "code_dtype": schemas.CODE_DTYPE,
                "augmentations": _augmentations(cfg),
                "label_names": image_shards.info(images)["label_names"],
            },
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
